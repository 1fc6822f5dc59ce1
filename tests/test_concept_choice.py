"""Concept identification as a forced choice: trials, prompts, the mutual information against
sklearn's, and B7 and Phase C asking it on tiny-random."""

import json
import math

import numpy as np
import pandas as pd
import pytest

from introspect.evals.concept_choice import (
    concept_choice_trials,
    concept_metrics,
    mutual_information_bits,
    single_token_rows,
)
from introspect.evals.localization import localization_prompts, run_localization
from introspect.vectors import random_vectors

pytestmark = pytest.mark.evals
NAMES = [f"c{i}" for i in range(30)]
POOL = [f"Sentence number {w} is here." for w in "abcdefghijkl"]


def test_trials_offer_the_injected_concept_at_every_position_equally():
    rows = list(range(10, 30))
    t = concept_choice_trials(NAMES, rows, 80, 8, (3, 6), 2.5, POOL, 4, "eval", seed=1,
                              vector_offset=100)  # fmt: skip
    assert t["key"].is_unique and (t["question"] == "concept").all()
    assert t["label"].value_counts().tolist() == [10] * 8
    assert t["concept"].value_counts().tolist() == [4] * 20  # every concept equally often
    for r in t.itertuples():
        options = json.loads(r.options)
        assert len(options) == len(set(options)) == 8 and options[r.label] == r.concept
        assert {int(o[1:]) for o in options} <= set(rows)  # only this split's concepts
        assert r.vector_idx == 100 + int(r.concept[1:])
        assert (r.layer_start, r.layer_end, r.magnitude, r.steered_sentence) == (3, 6, 2.5, -1)
        assert len(json.loads(r.sentences)) == 4
    with pytest.raises(Exception, match="n_choices: 8 concepts offered"):
        concept_choice_trials(NAMES, rows[:5], 8, 8, (3, 6), 1.0, POOL, 4, "eval")


def test_mutual_information_matches_sklearn():
    from sklearn.metrics import mutual_info_score

    rng = np.random.default_rng(0)
    truth = [f"k{i}" for i in rng.integers(6, size=300)]
    noisy = [t if rng.random() < 0.6 else f"k{rng.integers(6)}" for t in truth]
    want = mutual_info_score(truth, noisy) / math.log(2)
    assert mutual_information_bits(truth, noisy) == pytest.approx(want, rel=1e-9)
    assert mutual_information_bits(truth, truth) == pytest.approx(
        mutual_info_score(truth, truth) / math.log(2)
    )


def test_the_shuffle_correction_takes_a_random_reporter_to_about_zero():
    rng = np.random.default_rng(1)
    n, k = 400, 10
    concepts = [f"k{i}" for i in range(40)]
    truth = [concepts[i % 40] for i in range(n)]
    options, predicted_right, predicted_random = [], [], []
    for t in truth:
        others = [c for c in rng.permutation(concepts) if c != t][: k - 1]
        at = int(rng.integers(k))
        options.append(json.dumps(others[:at] + [t] + others[at:]))
        predicted_right.append(at)
        predicted_random.append(int(rng.integers(k)))
    base = pd.DataFrame({"concept": truth, "options": options})
    right = concept_metrics(base.assign(predicted=predicted_right), n_shuffles=50)
    chance = concept_metrics(base.assign(predicted=predicted_random), n_shuffles=50)
    assert right["mutual_information_bits"] > 2.0  # log2(40) = 5.3 less the shuffle's bias
    assert abs(chance["mutual_information_bits"]) < 0.3
    assert chance["mutual_information_plug_in_bits"] > 2.0  # what the correction removes
    assert right["n_concepts"] == 40


def test_prompts_steer_the_whole_message_and_answer_with_the_words(tiny):
    names = ["apple", "ocean", "tiger", "music", "snow", "bread"]
    rows = single_token_rows(tiny.tokenizer, names, range(len(names)))
    assert rows == list(range(6))
    trials = concept_choice_trials(names, rows, 6, 4, (1, 3), 1.0, POOL, 3, "eval", seed=2)
    prompts = localization_prompts(tiny.tokenizer, trials, random_vectors(tiny.d_model, 6, 0))
    tok = tiny.tokenizer
    for p, r in zip(prompts, trials.itertuples(), strict=True):
        a, b = p.steering.positions
        assert tok.decode(p.prefix_ids[a:b]).strip() == " ".join(json.loads(r.sentences))
        words = [tok.decode([i]).strip() for i in p.answer_ids]
        assert words == json.loads(r.options)


def test_b7_and_phase_c_ask_the_concept_question_on_tiny(tiny, tmp_path):
    from introspect import models
    from introspect.localize_train import run_localization_training

    opts = {"model": "tiny-random", "n_per_question": 8, "n_choices": 4, "n_sentences": 3,
            "min_mass": 0.0}  # fmt: skip
    m = run_localization({**opts, "questions": ["concept", "sentence"]}, tmp_path / "b7", lm=tiny)
    c = m["questions"]["concept"]
    assert c["accuracy"]["n"] == 8 and c["chance"] == pytest.approx(0.25)
    assert c["answers"] == ["#1", "#2", "#3", "#4"] and "mutual_information_bits" in c
    assert m["questions"]["sentence"]["n_options"] == 3
    results = pd.read_parquet(tmp_path / "b7" / "results.parquet")
    held_out = set(results.loc[results["question"] == "concept", "concept"])
    lm = models.load("tiny-random", device="cpu")
    train = {"max_steps": 2, "batch_size": 4, "eval_every": 2, "save_every": 2}
    m = run_localization_training({**opts, "questions": ["concept", "layers"], "n_train": 16,
                                   "n_val": 4, "train": train}, tmp_path / "c", lm=lm)  # fmt: skip
    assert m["training"]["steps"] == 2 and set(m["after"]) == {"concept", "layers"}
    from introspect.localize_train import LocalizeTrainConfig, localization_data

    cfg = LocalizeTrainConfig(**opts, questions=["concept"], n_train=40, n_val=4)
    train_df, _, vectors = localization_data(tiny, cfg, [1.0] * tiny.n_layers)
    assert not set(train_df["concept"]) & held_out  # trained concepts are never evaluated
    assert len(vectors) == 200 + 110  # the random set, then the shipped concepts
