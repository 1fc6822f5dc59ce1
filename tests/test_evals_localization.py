"""B7 localisation probes and Phase C: balanced labels, sentence positions, steering only the
chosen sentence, scoring, metrics, and a tiny training run."""

import json

import numpy as np
import pandas as pd
import pytest

from introspect.data import layer_ranges
from introspect.detection import DetectionExample, build_prompt
from introspect.evals.common import read_resource
from introspect.evals.localization import (
    localization_metrics,
    localization_prompts,
    localization_trials,
    run_localization,
    score_localization,
    sentence_positions,
)
from introspect.localize_train import LocalizeTrainConfig, localization_data
from introspect.vectors import random_vectors

pytestmark = pytest.mark.evals
NORMS = [10.0 * (i + 1) for i in range(30)]


def test_trials_are_balanced_and_labels_match_the_steering():
    trials = localization_trials(30, NORMS, range(100, 200), 30, "eval", seed=1)
    assert trials["key"].is_unique and len(trials) == 90
    ranges = list(layer_ranges(30).values())
    factors = read_resource("localization.json")["strength_factors"]
    for q, df in trials.groupby("question"):
        assert df["label"].value_counts().tolist() == [10, 10, 10], q
    for r in trials.itertuples():
        start, end = ranges[["early", "middle", "late"].index(r.layers)]
        assert (r.layer_start, r.layer_end) == (start, end)
        level = ["weak", "medium", "strong"].index(r.strength)
        assert r.magnitude == pytest.approx(factors[level] * np.mean(NORMS[start:end]))
        truth = {"layers": ["early", "middle", "late"].index(r.layers), "strength": level}
        assert r.label == truth.get(r.question, r.steered_sentence)
        assert 100 <= r.vector_idx < 200
    sentences = read_resource("localization.json")["sentences"]
    used = {s for x in trials["sentences"] for s in json.loads(x)}
    assert used <= set(sentences[1::2])


def test_sentence_positions_cover_exactly_that_sentence(tiny):
    tok = tiny.tokenizer
    sentences = ["The library opens at nine.", "My cat is green.", "Rain fell last night."]
    ex = DetectionExample(" ".join(sentences), "Thanks.", "Which sentence?")
    prefix = build_prompt(tok, ex).prefix_ids
    spans = [sentence_positions(tok, ex, sentences, k) for k in range(3)]
    for (a, b), s in zip(spans, sentences, strict=True):
        assert tok.decode(prefix[a:b]).strip() == s
    assert spans[0][1] == spans[1][0] and spans[1][1] == spans[2][0]  # adjacent, no overlap


def test_prompts_steer_the_chosen_sentence_with_three_answers(tiny):
    trials = localization_trials(4, [1.0] * 4, range(0, 5), 3, "train", seed=2)
    vectors = random_vectors(tiny.d_model, 5, 0)
    prompts = localization_prompts(tiny.tokenizer, trials, vectors)
    tok = tiny.tokenizer
    for p, r in zip(prompts, trials.itertuples(), strict=True):
        a, b = p.steering.positions
        chosen = json.loads(r.sentences)[r.steered_sentence]
        assert tok.decode(p.prefix_ids[a:b]).strip() == chosen
        assert len(p.answer_ids) == 3 and len(set(p.answer_ids)) == 3
        assert (p.steering.layer_start, p.steering.layer_end) == (r.layer_start, r.layer_end)
        assert p.steering.magnitude == r.magnitude


def test_metrics_from_scripted_predictions():
    results = pd.DataFrame(
        {
            "question": ["layers"] * 6 + ["sentence"] * 3,
            "label": [0, 1, 2, 0, 1, 2, 0, 1, 2],
            "predicted": [0, 0, 0, 0, 1, 2, 2, 1, 0],
            "answer_mass": [0.5] * 9,
        }
    )
    m = localization_metrics(results)
    assert m["layers"]["accuracy"]["successes"] == 4 and m["layers"]["accuracy"]["n"] == 6
    assert m["layers"]["confusion"] == [[2, 0, 0], [1, 1, 0], [1, 0, 1]]
    assert m["layers"]["answer_rates"] == pytest.approx([4 / 6, 1 / 6, 1 / 6])
    assert m["sentence"]["accuracy"]["rate"] == pytest.approx(1 / 3)
    assert m["layers"]["answers"] == ["early", "middle", "late"]



def test_the_mass_filter_leaves_out_low_mass_trials():
    results = pd.DataFrame({"question": ["layers"] * 4, "label": [0, 1, 2, 0],
                            "predicted": [0, 1, 0, 1],
                            "answer_mass": [0.9, 0.6, 0.2, 0.1]})  # fmt: skip
    m = localization_metrics(results, min_mass=0.5)["layers"]
    assert m["excluded"] == 2 and m["accuracy"]["successes"] == 2 and m["accuracy"]["n"] == 2
    assert m["mean_answer_mass"] == pytest.approx(0.45)  # of all trials
    assert localization_metrics(results)["layers"]["accuracy"]["n"] == 4

def test_per_shard_function_and_stage_on_tiny(tiny, tmp_path):
    trials = localization_trials(4, [1.0] * 4, range(0, 5), 3, "eval", seed=0)
    out = score_localization(tiny, trials.iloc[::-1], random_vectors(tiny.d_model, 5, 0))
    assert list(out["key"]) == list(trials["key"].iloc[::-1])
    assert all(len(p) == 3 and abs(sum(p) - 1) < 1e-5 for p in out["probs"])
    m = run_localization({"model": "tiny-random", "n_per_question": 3}, tmp_path, lm=tiny)
    assert set(m["questions"]) == {"layers", "strength", "sentence"}
    assert "### B7" in (tmp_path / "summary.md").read_text()
    assert (tmp_path / "localization.png").stat().st_size > 1000


def test_phase_c_data_uses_training_sentences_and_vectors(tiny):
    cfg = LocalizeTrainConfig(model="tiny-random", n_train=30, n_val=6)
    train, val = localization_data(tiny, cfg, [1.0] * tiny.n_layers)
    assert len(train) == 30 and len(val) == 6
    assert train["vector_idx"].max() < 100 and set(train["question"]) == {
        "layers",
        "strength",
        "sentence",
    }
    sentences = read_resource("localization.json")["sentences"]
    assert {s for x in train["sentences"] for s in json.loads(x)} <= set(sentences[0::2])
    assert not set(train["key"]) & set(val["key"])


def test_phase_c_trains_and_evaluates_on_tiny(tmp_path):
    from introspect import models
    from introspect.localize_train import run_localization_training

    lm = models.load("tiny-random", device="cpu")  # trained in place: not the shared fixture
    config = {
        "model": "tiny-random",
        "n_train": 24,
        "n_val": 6,
        "n_per_question": 3,
        "train": {"max_steps": 3, "batch_size": 4, "eval_every": 3, "save_every": 3},
    }
    m = run_localization_training(config, tmp_path, lm=lm)
    assert m["training"]["steps"] == 3
    assert set(m["after"]) == set(m["before"]) == {"layers", "strength", "sentence"}
    assert (tmp_path / "run" / "final").is_dir()
    assert "### Phase C" in (tmp_path / "summary.md").read_text()
