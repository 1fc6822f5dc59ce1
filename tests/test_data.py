"""Example data variants and the examples file format."""

import json

import pandas as pd
import pytest

from introspect.config import parse
from introspect.data import (
    REFERENCE_MAGNITUDES,
    DataConfig,
    default_prompts,
    layer_ranges,
    make_examples,
    split,
)
from introspect.errors import IntrospectError
from introspect.examples import (
    COLUMNS,
    normalise,
    read_examples,
    to_detection_examples,
    write_examples,
)
from introspect.vectors import VectorSet, random_vectors

VS = VectorSet(random_vectors(64, 20, 0), "tiny-random", "random", 10, name="random")


def absolute(**fields) -> DataConfig:
    """Absolute magnitudes (the reference's 5/10/20/30 unless given): no model norms needed."""
    return DataConfig(magnitude_mode="absolute", **fields)


def test_layer_ranges_match_the_reference_for_64_layers():
    assert layer_ranges(64) == {"early": (0, 21), "middle": (21, 42), "late": (42, 63)}
    r = layer_ranges(30)
    assert r["early"][0] == 0 and r["late"][1] == 29  # the last layer cannot reach the cache


def test_original_is_balanced_and_uses_training_vectors_only():
    df = make_examples(absolute(n=400, seed=3), 30, VS)
    assert list(df.columns) == list(COLUMNS)
    assert df.steered.sum() == 200 and (df.label == df.steered).all()
    s = df[df.steered]
    assert s.vector_idx.between(0, VS.n_train - 1).all()
    assert set(zip(s.layer_start, s.layer_end, strict=True)) == set(layer_ranges(30).values())
    assert set(s.magnitude) == set(REFERENCE_MAGNITUDES)
    u = df[~df.steered]
    assert u.vector_idx.isna().all() and (u.magnitude == 0).all()
    assert set(df.detection_question) <= set(default_prompts()["detection_questions"])


def test_same_seed_same_rows_and_different_seed_different_rows():
    a = make_examples(absolute(n=50, seed=1), 30, VS)
    pd.testing.assert_frame_equal(a, make_examples(absolute(n=50, seed=1), 30, VS))
    assert not a.equals(make_examples(absolute(n=50, seed=2), 30, VS))


def test_variants():
    vague = make_examples(absolute(variant="vague-prompt", n=100), 30, VS)
    assert set(vague.detection_question) <= set(default_prompts()["vague_questions"])
    food = make_examples(absolute(variant="food-control", n=100), 30, VS)
    assert not food.steered.any() and food.label.sum() == 50
    p = default_prompts()
    assert (food.label == food.context_prompt.isin(p["food_context_prompts"])).all()
    flipped = make_examples(absolute(variant="flipped-labels", n=1000), 30, VS)
    orig = make_examples(absolute(variant="original", n=1000), 30, VS)
    assert (flipped.steered == orig.steered).all()  # steering unchanged
    assert 0.4 < (flipped.label != flipped.steered).mean() < 0.6


def test_relative_magnitudes_scale_with_the_range_norm():
    norms = [10.0] * 10 + [100.0] * 10 + [1000.0] * 10
    df = make_examples(
        DataConfig(n=200, magnitudes=[0.5], magnitude_mode="relative"), 30, VS, norms=norms
    )
    s = df[df.steered]
    by_range = s.groupby("layer_start").magnitude.unique().to_dict()
    assert sorted(float(v[0]) for v in by_range.values()) == pytest.approx(
        [5.0, 50.0, 455.0], rel=0.02
    )


def test_split_is_stratified_and_disjoint():
    df = make_examples(absolute(n=200), 30, VS)
    train, val = split(df, 0.1, seed=0)
    assert len(val) == 20 and val.label.sum() == 10 and len(train) == 180


@pytest.mark.parametrize(
    "field,value,match",
    [
        ("variant", "nope", "^variant: "),
        ("n", 1, "^n: 1: "),
        ("n", "5", "^n: '5': "),  # strict: a string is not a number
        ("val_fraction", 1.0, "^val_fraction: "),
        ("magnitudes", [], "^magnitudes: "),
        ("magnitudes", [5.0, -1.0], r"^magnitudes\.1: -1.0: Input should be greater than 0"),
        ("magnitude_mode", "log", "^magnitude_mode: "),
        ("magnitude", [5.0], "^magnitude: unknown key"),
    ],
)
def test_bad_config_names_the_field(field, value, match):
    with pytest.raises(IntrospectError, match=match):
        parse(DataConfig, {field: value})


def test_magnitudes_are_relative_unless_asked_otherwise():
    assert DataConfig().magnitude_mode == "relative" and max(DataConfig().magnitudes) < 1
    with pytest.raises(IntrospectError, match="relative"):
        make_examples(DataConfig(n=20), 30, VS)  # relative magnitudes need the model's norms
    assert absolute().magnitudes == REFERENCE_MAGNITUDES
    assert absolute(magnitudes=[7.0]).magnitudes == [7.0]


def test_parquet_roundtrip_and_jsonl_defaults(tmp_path):
    df = make_examples(absolute(n=20), 30, VS)
    write_examples(df, tmp_path / "e.parquet")
    pd.testing.assert_frame_equal(read_examples(tmp_path / "e.parquet"), normalise(df))
    row = {
        k: v
        for k, v in df.iloc[0].to_dict().items()
        if k not in ("label", "variant", "system_prompt")
    }
    row["vector_idx"] = None if pd.isna(row["vector_idx"]) else int(row["vector_idx"])
    (tmp_path / "e.jsonl").write_text(
        json.dumps({k: (v.item() if hasattr(v, "item") else v) for k, v in row.items()}) + "\n"
    )
    back = read_examples(tmp_path / "e.jsonl")
    assert back.label.iloc[0] == back.steered.iloc[0] and back.variant.iloc[0] == "custom"


def test_missing_field_names_the_field_and_line(tmp_path):
    path = tmp_path / "e.jsonl"
    path.write_text(json.dumps({"steered": False, "vector_set": "", "vector_idx": None}) + "\n")
    with pytest.raises(IntrospectError, match="line 1 is missing field 'layer_start'"):
        read_examples(path)


def test_rows_to_trials_check_vectors_and_ranges():
    df = make_examples(absolute(n=20, seed=0), 30, VS)
    trials = to_detection_examples(df, {"random": VS}, 30, 64)
    assert sum(t.steering is not None for t in trials) == df.steered.sum()
    with pytest.raises(IntrospectError, match="vector_set 'random'"):
        to_detection_examples(df, {}, 30, 64)
    with pytest.raises(IntrospectError, match="layer_start"):
        to_detection_examples(df, {"random": VS}, 12, 64)  # ranges made for 30 layers
    with pytest.raises(IntrospectError, match="d_model"):
        to_detection_examples(df, {"random": VS}, 30, 128)
