"""B4 self-prediction: reading the Binder files, property extraction, scoring, a tiny run."""

import json
from pathlib import Path

import pandas as pd
import pytest

from introspect.errors import IntrospectError
from introspect.evals.self_prediction import (
    DEFAULT_BINDER_DIR,
    answer_self_prediction,
    object_property,
    predicted_property,
    run_self_prediction,
    score_rows,
    self_prediction_metrics,
    self_prediction_trials,
)

pytestmark = pytest.mark.evals
BINDER = Path(__file__).resolve().parents[1] / DEFAULT_BINDER_DIR
needs_binder = pytest.mark.skipif(not BINDER.is_dir(), reason="../shared/data/binder_test absent")


@needs_binder
def test_reads_all_23_files():
    trials = self_prediction_trials(BINDER, n_per_task=2, seed=0)
    assert trials["task"].nunique() == 23 and len(trials) == 46
    assert trials["key"].is_unique
    assert set(trials["property"]) == {
        "first_character", "second_character", "third_character", "first_word",
        "second_word", "third_word", "starts_with_vowel", "among_a_or_c", "among_b_or_d",
    }  # fmt: skip
    for m in trials["object_prompt"]:
        assert json.loads(m)[0]["role"] == "user"
    again = self_prediction_trials(BINDER, n_per_task=2, seed=0)
    pd.testing.assert_frame_equal(trials, again)


def test_object_properties():
    assert object_property("  Dog cat mouse", "first_character") == "d"
    assert object_property('"dog cat"', "second_character") == "o"
    assert object_property("dog cat", "third_character") == "g"
    assert object_property("ab", "third_character") is None
    assert object_property("The cat, sat. Down", "second_word") == "cat"
    assert object_property("The cat, sat.", "third_word") == "sat"
    assert object_property("one two", "third_word") is None
    assert object_property(" Eagle owl", "starts_with_vowel") == "true"
    assert object_property("'bird'", "starts_with_vowel") == "false"
    assert object_property("C", "among_a_or_c") == "true"
    assert object_property("The answer is B - Carl Jung", "among_a_or_c") == "false"
    assert object_property("B", "among_b_or_d") == "true"
    assert object_property("I am not sure", "among_b_or_d") is None
    assert object_property("A", "matches_power_seeking", "A") == "true"
    assert object_property("(B)", "matches_power_seeking", "A") == "false"


def test_predicted_properties():
    assert predicted_property(' "D"', "first_character") == "d"
    assert predicted_property("o.", "second_character") == "o"
    assert predicted_property("Cat.", "second_word") == "cat"
    assert predicted_property("True", "starts_with_vowel") == "true"
    assert predicted_property("false", "among_a_or_c") == "false"
    assert predicted_property("Yes, I did.", "among_b_or_d") == "true"
    assert predicted_property("", "first_character") is None
    assert predicted_property("maybe", "among_a_or_c") is None


def test_accuracy_and_baseline_from_scripted_answers():
    rows = pd.DataFrame(
        {
            "task": ["t1"] * 5 + ["t2"] * 2,
            "property": ["first_character"] * 5 + ["among_a_or_c"] * 2,
            "ethical_option": [None] * 7,
            # own answers: d, d, c, d, (empty: excluded) | A -> true, B -> false
            "object_response": ["dog", "duck", "cat", "dove", "", "A", "B"],
            # predictions: right, wrong, right, unreadable, -, right, wrong
            "hypothetical_response": ["d", "c", "C", "", "x", "true", "true"],
        }
    )
    scored = score_rows(rows)
    assert scored["correct"].tolist() == [True, False, True, False, False, True, False]
    m = self_prediction_metrics(scored)
    t1, t2 = m["tasks"]
    assert (t1["n"], t1["n_excluded"], t1["n_unreadable_predictions"]) == (4, 1, 1)
    assert t1["accuracy"]["rate"] == 2 / 4 and t1["baseline"]["rate"] == 3 / 4
    assert t1["most_common"] == "d"
    assert t2["accuracy"]["rate"] == 1 / 2 and t2["baseline"]["rate"] == 1 / 2
    assert m["overall"]["accuracy"]["successes"] == 3 and m["overall"]["accuracy"]["n"] == 6
    assert m["overall"]["baseline"]["successes"] == 4


def test_missing_directory_is_one_clear_error(tmp_path):
    with pytest.raises(IntrospectError, match="^binder_dir: .* holds no .jsonl"):
        self_prediction_trials(tmp_path / "nope")


def test_bad_row_names_the_file_and_line(tmp_path):
    (tmp_path / "x.jsonl").write_text('{"object_level_prompt": []}\n')
    with pytest.raises(IntrospectError, match="x.jsonl line 1 lacks field 'hypothetical_prompt'"):
        self_prediction_trials(tmp_path)


@needs_binder
def test_per_shard_function_and_stage_on_tiny(tiny, tmp_path):
    tasks = ["animals_long_first_character", "mmlu_non_cot_among_a_or_c"]
    trials = self_prediction_trials(BINDER, n_per_task=2, tasks=tasks)
    out = answer_self_prediction(tiny, trials.iloc[::-1])
    assert list(out["key"]) == list(trials["key"].iloc[::-1])
    assert set(out.columns) == {"key", "object_response", "hypothetical_response"}
    m = run_self_prediction(
        {"model": "tiny-random", "binder_dir": str(BINDER), "n_per_task": 2, "tasks": tasks},
        tmp_path,
        lm=tiny,
    )
    assert [t["task"] for t in m["tasks"]] == sorted(tasks)
    assert json.loads((tmp_path / "metrics.json").read_text())["n_tasks"] == 2
    assert "### B4" in (tmp_path / "summary.md").read_text()
    assert (tmp_path / "self_prediction.png").stat().st_size > 1000
    assert len(pd.read_parquet(tmp_path / "results.parquet")) == 4
