"""The command line: happy paths on tiny-random and one-line errors with exit code 2."""

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from introspect.vectors import load_vectors

ROOT = Path(__file__).resolve().parents[1]


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "cluster.cli", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={
            "PATH": "/usr/bin:/bin",
            "HF_HUB_OFFLINE": "1",
            "HOME": str(Path.home()),
            "INTROSPECT_CPU_BF16": "0",  # see conftest.py
        },
        timeout=300,
    )


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """Vectors and data made once through the CLI, reused by the tests below."""
    d = tmp_path_factory.mktemp("cli")
    r = cli(
        "vectors",
        "random",
        "--model",
        "tiny-random",
        "--n",
        20,
        "--n-train",
        10,
        "--out",
        d / "random.safetensors",
    )
    assert r.returncode == 0, r.stderr
    r = cli(
        "data",
        "--model",
        "tiny-random",
        "--vectors",
        d / "random.safetensors",
        "--n",
        24,
        "--val-fraction",
        0.25,
        "--out",
        d / "data",
    )
    assert r.returncode == 0, r.stderr
    return d


def assert_one_line_error(r: subprocess.CompletedProcess, *words: str) -> None:
    assert r.returncode == 2, (r.returncode, r.stderr)
    lines = [x for x in r.stderr.splitlines() if x.startswith("error:")]
    assert len(lines) == 1, r.stderr
    assert "Traceback" not in r.stderr
    for w in words:
        assert w in lines[0], lines[0]


def test_vectors_and_data(workdir):
    vs = load_vectors(workdir / "random.safetensors", d_model=64)
    assert vs.vectors.shape == (20, 64) and vs.n_train == 10 and vs.model == "tiny-random"
    train = pd.read_parquet(workdir / "data" / "train.parquet")
    val = pd.read_parquet(workdir / "data" / "val.parquet")
    assert len(train) == 18 and len(val) == 6
    assert json.loads((workdir / "data" / "config.json").read_text())["variant"] == "original"


def test_score_writes_example_columns_plus_scores(workdir):
    out = workdir / "scores.parquet"
    r = cli(
        "score",
        "--model",
        "tiny-random",
        "--vectors",
        workdir / "random.safetensors",
        "--examples",
        workdir / "data" / "val.parquet",
        "--out",
        out,
        "--batch-size",
        4,
    )
    assert r.returncode == 0, r.stderr
    scores = pd.read_parquet(out)
    val = pd.read_parquet(workdir / "data" / "val.parquet")
    assert list(scores.columns) == [*val.columns, "p_yes", "yes_no_mass"]
    assert scores.p_yes.between(0, 1).all() and scores.yes_no_mass.between(0, 1).all()


def test_wrong_dimension_vectors_fail_cleanly(workdir, tmp_path):
    from introspect.vectors import VectorSet, random_vectors, save_vectors

    save_vectors(
        tmp_path / "random.safetensors", VectorSet(random_vectors(32, 20, 0), "x", "random", 10)
    )
    out = tmp_path / "s.parquet"
    r = cli(
        "score",
        "--model",
        "tiny-random",
        "--vectors",
        tmp_path / "random.safetensors",
        "--examples",
        workdir / "data" / "val.parquet",
        "--out",
        out,
    )
    assert_one_line_error(r, "vectors", "d_model=32", "d_model=64")
    assert not out.exists()


def test_layer_range_outside_model_fails_cleanly(workdir, tmp_path):
    df = pd.read_parquet(workdir / "data" / "val.parquet")
    df.loc[df.steered, "layer_end"] = 9  # tiny-random has 4 layers
    df.to_parquet(tmp_path / "bad.parquet")
    r = cli(
        "score",
        "--model",
        "tiny-random",
        "--vectors",
        workdir / "random.safetensors",
        "--examples",
        tmp_path / "bad.parquet",
        "--out",
        tmp_path / "s.parquet",
    )
    assert_one_line_error(r, "layer_start/layer_end", "4 layers")


def test_example_missing_field_fails_cleanly(workdir, tmp_path):
    (tmp_path / "e.jsonl").write_text(
        json.dumps(
            {
                "steered": False,
                "vector_set": "",
                "vector_idx": None,
                "layer_start": 0,
                "layer_end": 0,
                "magnitude": 0,
                "context_prompt": "hi",
                "assistant_response": "ok",
            }
        )
        + "\n"
    )
    r = cli(
        "score",
        "--model",
        "tiny-random",
        "--examples",
        tmp_path / "e.jsonl",
        "--out",
        tmp_path / "s.parquet",
    )
    assert_one_line_error(r, "detection_question")


def test_unknown_model_fails_cleanly(tmp_path):
    r = cli(
        "vectors",
        "random",
        "--model",
        tmp_path / "no-such-model",
        "--out",
        tmp_path / "v.safetensors",
    )
    assert_one_line_error(r, "model")


def test_baseline_is_balanced(workdir):
    out = workdir / "baseline"
    r = cli(
        "baseline",
        "--model",
        "tiny-random",
        "--vectors",
        workdir / "random.safetensors",
        "--n-vectors",
        2,
        "--magnitudes",
        "4,16",
        "--magnitude-mode",
        "absolute",
        "--out",
        out,
    )
    assert r.returncode == 0, r.stderr
    summary = json.loads((out / "baseline.json").read_text())
    assert summary["overall"]["n_steered"] == summary["overall"]["n_unsteered"] == 2 * 3 * 2
    assert len(summary["cells"]) == 6 and (out / "heatmap.png").stat().st_size > 1000
    scores = pd.read_parquet(out / "scores.parquet")
    twins = scores.groupby(
        ["context_prompt", "assistant_response", "detection_question", "layer_start", "magnitude"]
    ).steered.agg(["sum", "count"])
    assert (twins["sum"] * 2 == twins["count"]).all(), "each steered trial has an unsteered twin"
