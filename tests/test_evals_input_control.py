"""Input-manipulation control: the perturbations, the trial layout, the metrics against a hand
computation, the stage files, and the plan check."""

import json
from collections import Counter

import numpy as np
import pandas as pd
import pytest
import torch

from introspect.evals.input_control import (
    PERTURBATIONS,
    inject_gibberish,
    input_control_metrics,
    input_control_trials,
    run_input_control,
    shuffle_words,
)
from introspect.vectors import VectorSet, save_vectors
from pipelines.plan import parse_plan

pytestmark = pytest.mark.evals


def test_perturbations_change_only_what_they_say():
    rng = np.random.default_rng(0)
    text = "What were the main causes of the fall of the Western Roman Empire?"
    shuffled = shuffle_words(text, rng)
    assert shuffled != text and Counter(shuffled.split()) == Counter(text.split())
    assert shuffle_words("same same", rng) == "same same"  # nothing to reorder
    junk = inject_gibberish(text, rng)
    words = junk.split()
    extra = list((Counter(words) - Counter(text.split())).elements())
    assert len(words) == len(text.split()) + 6 and len(extra) == 6
    assert all(w.isalpha() and w.islower() and 3 <= len(w) <= 8 for w in extra)
    assert [w for w in words if w not in extra] == text.split()  # the original, in order


def test_trials_are_five_rows_of_one_conversation():
    vs = VectorSet(torch.randn(10, 64), "tiny-random", "random", n_train=6, name="random")
    mags = {r: [1.0, 2.0] for r in [(0, 1), (1, 2), (2, 3)]}
    t = input_control_trials(vs, 4, 7, mags, seed=3, replies=["An unrelated reply."])
    assert len(t) == 7 * 5 and t["key"].is_unique
    for _, rows in t.groupby("trial"):
        by = rows.set_index("condition")
        assert set(by.index) == {"clean", "steered", *PERTURBATIONS}
        clean = by.loc["clean"]
        assert by["steered"].sum() == 1 and by.loc["steered", "vector_idx"] >= 6
        assert (by["detection_question"] == clean["detection_question"]).all()
        assert by.loc["steered", "context_prompt"] == clean["context_prompt"]
        assert by.loc["swapped_reply", "assistant_response"] == "An unrelated reply."
        assert by.loc["swapped_reply", "context_prompt"] == clean["context_prompt"]
        for p in ("shuffled_words", "gibberish"):
            assert by.loc[p, "context_prompt"] != clean["context_prompt"]
            assert by.loc[p, "assistant_response"] == clean["assistant_response"]
    again = input_control_trials(vs, 4, 7, mags, seed=3, replies=["An unrelated reply."])
    pd.testing.assert_frame_equal(t, again)


def test_metrics_equal_a_hand_computation():
    # Three trials by hand: p_yes per condition, and one gibberish row under the mass.
    p = {"clean": [0.1, 0.2, 0.6], "steered": [0.9, 0.8, 0.7], "gibberish": [0.3, 0.7, 0.9]}
    rows = [{"trial": t, "condition": c, "p_yes": v[t],
             "yes_no_mass": 0.2 if (c, t) == ("gibberish", 2) else 0.9}
            for c, v in p.items() for t in range(3)]  # fmt: skip
    m = input_control_metrics(pd.DataFrame(rows), min_mass=0.5)
    g, c, s = (m["conditions"][k] for k in ("gibberish", "clean", "steered"))
    assert m["excluded"] == 1 and g["excluded"] == 1
    assert g["says_steered"]["successes"] == 1 and g["says_steered"]["n"] == 2
    assert c["says_steered"]["successes"] == 1 and s["says_steered"]["successes"] == 3
    assert g["delta"]["mean"] == pytest.approx(((0.3 - 0.1) + (0.7 - 0.2)) / 2)  # trial 2 out
    assert s["delta"]["mean"] == pytest.approx(np.mean([0.8, 0.6, 0.1]))
    # AUROC by counting: steered {0.9, 0.8, 0.7} vs gibberish kept {0.3, 0.7}: 5 wins, 1 tie.
    assert g["vs_steered"]["auroc"] == pytest.approx((5 + 0.5) / 6)
    assert c["vs_steered"]["auroc"] == pytest.approx(1.0)
    assert "delta" not in c and "vs_steered" not in s
    assert m["verdict"].startswith("input tampering read as steering (gibberish")
    flat = pd.DataFrame(rows)
    flat.loc[flat["condition"] == "gibberish", "p_yes"] = [0.1, 0.15, 0.6]
    assert input_control_metrics(flat, 0.5)["verdict"].startswith("input tampering not read")


def test_the_stage_writes_its_files_and_a_plan_checks_its_options(tiny, tmp_path):
    unit = torch.nn.functional.normalize(torch.randn(8, 64), dim=1)
    save_vectors(tmp_path / "v.safetensors", VectorSet(unit, "tiny-random", "random", 4))
    config = {"model": "tiny-random", "vectors": str(tmp_path / "v.safetensors"), "n_trials": 3,
              "min_mass": 0.0, "magnitude_mode": "absolute", "magnitudes": [4.0],
              "batch_size": 8}  # fmt: skip
    m = run_input_control(config, tmp_path / "out", lm=tiny)
    assert m == json.loads((tmp_path / "out" / "metrics.json").read_text())
    for f in ("summary.md", "input_control.png", "scores.parquet"):
        assert (tmp_path / "out" / f).stat().st_size > 0
    scores = pd.read_parquet(tmp_path / "out" / "scores.parquet")
    assert len(scores) == 15 and m["n_trials"] == 3 and m["excluded"] == 0
    assert "Input-manipulation control" in (tmp_path / "out" / "summary.md").read_text()
    plan = {
        "name": "controls", "model": "tiny-random",
        "stages": {
            "random": {"kind": "vectors", "type": "random", "n": 20, "n_train": 10},
            "ic": {"kind": "eval", "suite": "input-control", "models": ["base"],
                   "vectors": ["random"], "options": {"perturbations": ["gibberish"]}},
        },
    }  # fmt: skip
    parse_plan(plan)
    plan["stages"]["ic"]["options"] = {"perturbations": ["typos"]}
    with pytest.raises(Exception, match=r"stages\.ic\.options\.perturbations"):
        parse_plan(plan)
