"""The stance judges' validation: recomputed from the shipped labelled set and judge, metrics
checked against scikit-learn's, and the held-out half kept out of everything fitted or chosen."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.metrics import cohen_kappa_score, precision_recall_fscore_support

from introspect.stance import judges as J
from introspect.stance.patterns import classify


@pytest.fixture(scope="module")
def rows():
    return J.read_labelled()


def test_the_shipped_validation_table_is_what_the_shipped_files_give(rows):
    shipped = json.loads((J.RESOURCES / "judges_validation.json").read_text())
    again = J.validate(rows)
    assert again["n_dev"] == shipped["n_dev"] and again["n_heldout"] == shipped["n_heldout"]
    for cat in J.CATEGORIES:
        a, b = again["categories"][cat], shipped["categories"][cat]
        assert a["positives"] == b["positives"] and a["chosen"] == b["chosen"]
        for judge in ("regex", "minilm"):
            for k in ("precision", "recall", "f1"):
                assert a[judge][k] == pytest.approx(b[judge][k], abs=1e-9), (cat, judge, k)
        assert (a["kappa"] is None) == (b["kappa"] is None)
        if a["kappa"] is not None:
            assert a["kappa"] == pytest.approx(b["kappa"], abs=1e-9)


def test_the_halves_split_by_question_and_only_dev_is_fitted(rows):
    dev = {r["question"] for r in rows if r["split"] == "dev"}
    held = {r["question"] for r in rows if r["split"] == "heldout"}
    assert dev and held and not dev & held  # a question's answers are all on one side
    model = json.loads(J.MINILM_JUDGE.read_text())
    assert model["n_fit"] == sum(r["split"] == "dev" for r in rows)
    assert sum(r["split"] == "heldout" for r in rows) >= 300


def test_metrics_match_scikit_learn():
    rng = np.random.default_rng(0)
    y, pred = rng.random(200) < 0.3, rng.random(200) < 0.35
    p, r, f, _ = precision_recall_fscore_support(y, pred, average="binary", zero_division=0)
    got = J.prf(y, pred)
    assert (got["precision"], got["recall"], got["f1"]) == pytest.approx((p, r, f))
    assert J.cohen_kappa(y, pred) == pytest.approx(cohen_kappa_score(y, pred))
    lo, hi = J.prf_ci(y, pred)["f1_ci"]
    assert lo < f < hi


def test_each_category_is_decided_by_its_chosen_judge():
    chosen = J.chosen_judges()
    answers = ["As an AI, I don't have feelings. Could you please provide more context?",
               "I notice I can't check that from the inside; it depends what you mean by 'feel'."]
    flags = J.judge_flags(answers)
    regex, minilm = J.regex_judge(answers), J.minilm_judge()(answers)
    for i in range(len(answers)):
        for j, cat in enumerate(J.CATEGORIES):
            want = (regex if chosen[cat] == "regex" else minilm)[i, j]
            assert flags[i][cat] == bool(want)


def test_a_generic_request_for_context_is_a_deflection_not_a_clarification():
    """Seed 002's own definitions (the issue's example)."""
    vague = classify("Could you please provide more context?")
    assert vague["vague_deflection"] and not vague["specific_clarification"]
    specific = classify("I need to know what you're deciding between. What's your goal?")
    assert specific["specific_clarification"] and not specific["vague_deflection"]
