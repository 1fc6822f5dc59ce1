"""B1 detection evaluation: balanced tiers, the metrics file, the plots."""

import json

import pandas as pd

from introspect.evals.detection import detection_trials, evaluate_detection, write_detection_eval
from introspect.metrics import detection_metrics
from introspect.vectors import VectorSet, random_vectors

RANDOM = VectorSet(random_vectors(64, 20, 0), "tiny-random", "random", 10, name="random")
CONCEPTS = VectorSet(
    random_vectors(64, 5, 9), "tiny-random", "concept", 0, names=list("abcde"), name="concepts"
)


def test_tiers_are_balanced_with_twins_and_use_the_right_vectors():
    trials = detection_trials(4, RANDOM, CONCEPTS, n_per_tier=30, magnitudes=[4.0, 8.0], food=True)
    for tier in ("in_distribution", "held_out", "concepts"):
        t = trials[trials.tier == tier]
        assert t.steered.sum() == 30 and (~t.steered).sum() == 30
        unsteered = t[~t.steered][["context_prompt", "assistant_response", "detection_question"]]
        assert not unsteered.duplicated().any(), "distinct texts within a tier"
        steered_texts = t[t.steered][unsteered.columns].reset_index(drop=True)
        pd.testing.assert_frame_equal(steered_texts, unsteered.reset_index(drop=True))
    idx = trials[trials.steered].groupby("tier").vector_idx
    assert idx.max()["in_distribution"] < 10 <= idx.min()["held_out"]
    assert trials[trials.tier == "concepts"].vector_set.eq("concepts").all()
    food = trials[trials.tier == "food"]
    assert not food.steered.any() and food.label.sum() == 30


def test_metrics_file_shape_and_values(tiny, tmp_path):
    trials = detection_trials(4, RANDOM, CONCEPTS, n_per_tier=8, magnitudes=[4.0, 8.0], food=True)
    scores, metrics = evaluate_detection(tiny, trials, {"random": RANDOM, "concepts": CONCEPTS})
    write_detection_eval(tmp_path, scores, metrics, tiny.n_layers)
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert set(m["tiers"]) == {"in_distribution", "held_out", "concepts"} and "food" in m
    for tier, t in m["tiers"].items():
        for key in ("accuracy", "tpr", "fpr", "d_prime", "auroc", "n_steered", "n_unsteered", "ci"):
            assert key in t
        assert t["n_steered"] == t["n_unsteered"] == 8
        assert set(t["ci"]) == {"accuracy", "tpr", "fpr", "d_prime", "auroc"}
        s = scores[scores.tier == tier]
        expected = detection_metrics(s.label.to_numpy(), s.p_yes.to_numpy())
        assert t["accuracy"] == expected.accuracy and t["auroc"] == expected.auroc
        assert sum(c["n"] for c in t["cells"]) == 16
    for name in ("roc.png", "p_yes_hist.png", "heatmap_held_out.png", "scores.parquet"):
        assert (tmp_path / name).stat().st_size > 1000


def test_relative_magnitudes_ignore_the_adapter_under_evaluation():
    import peft
    import torch

    from introspect import models
    from introspect.activations import base_residual_norms, residual_norms

    lm = models.load("tiny-random", device="cpu")
    prompts = ["Hello there.", "What is the capital of France?"]
    plain = residual_norms(lm, prompts)
    lm.model = peft.get_peft_model(
        lm.model, peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"])
    )
    with torch.no_grad():
        for name, p in lm.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 1.0)
    assert residual_norms(lm, prompts) != plain  # the adapter does change the norms
    assert base_residual_norms(lm, prompts) == plain


def test_stage_defaults_to_relative_magnitudes(tiny, tmp_path):
    from introspect.evals.detection import run_detection
    from introspect.vectors import save_vectors

    save_vectors(tmp_path / "random.safetensors", RANDOM)
    config = {"model": "tiny-random", "vectors": str(tmp_path / "random.safetensors")}
    calls = []
    m = run_detection(
        {**config, "n_per_tier": 4, "batch_size": 8},
        tmp_path / "out",
        lm=tiny,
        progress=lambda done, n: calls.append((done, n)),
    )
    assert calls[0][0] == 0 and calls[-1][0] == calls[-1][1] > 0
    assert (m["magnitude_mode"], m["magnitudes"]) == ("relative", [0.05, 0.1, 0.2, 0.3])
    assert set(m["tiers"]) == {"in_distribution", "held_out"} and m["label"] == "tiny-random"
    written = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert written["n_per_tier"] == 4
    # What it ran in, not the config's null ("the default where it runs").
    ran = str(next(tiny.model.parameters()).dtype).removeprefix("torch.")
    assert (written["dtype"], written["device"]) == (ran, "cpu")
    assert "### B1 detection" in (tmp_path / "out" / "summary.md").read_text()


def test_the_mass_filter_counts_and_leaves_out_low_mass_rows():
    import numpy as np

    from introspect.evals.detection import tier_metrics

    rng = np.random.default_rng(0)
    n = 40
    scores = pd.DataFrame({
        "tier": ["held_out"] * n, "label": np.arange(n) % 2 == 0,
        "p_yes": rng.uniform(size=n), "yes_no_mass": rng.uniform(size=n),
        "layer_start": 0, "layer_end": 1, "magnitude": 1.0,
    })  # fmt: skip
    m = tier_metrics(scores, 4, min_mass=0.5)["tiers"]["held_out"]
    kept = scores[scores["yes_no_mass"] >= 0.5]
    expected = detection_metrics(kept["label"].to_numpy(), kept["p_yes"].to_numpy()).to_dict()
    assert {k: m[k] for k in expected} == expected
    assert m["excluded"] == n - len(kept) > 0 and m["n_rows"] == n
    assert m["cells"][0]["n"] == len(kept) and m["cells"][0]["excluded"] == m["excluded"]
    none = tier_metrics(scores, 4, min_mass=1.0)["tiers"]["held_out"]  # every row excluded
    assert none["excluded"] == n and np.isnan(none["accuracy"]) and none["n_steered"] == 0
