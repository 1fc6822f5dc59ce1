"""B4 self-prediction: reading the Binder files and the shipped sample, property extraction,
scoring, a tiny run."""

import json
import string
from pathlib import Path

import pandas as pd
import pytest

import introspect
from introspect.errors import IntrospectError
from introspect.evals.self_prediction import (
    DEFAULT_BINDER_DIR,
    answer_self_prediction,
    binder_dir,
    object_property,
    predicted_property,
    read_task,
    run_self_prediction,
    score_rows,
    self_prediction_metrics,
    self_prediction_trials,
)

pytestmark = pytest.mark.evals
# Binder et al.'s real test set, present only in this workspace (passed explicitly).
BINDER = Path(__file__).resolve().parents[1] / "../shared/data/binder_test"
SHIPPED = Path(introspect.__file__).parent / "resources/evals/self_prediction"
PROPERTIES = {
    "first_character", "second_character", "third_character", "first_word",
    "second_word", "third_word", "starts_with_vowel", "among_a_or_c", "among_b_or_d",
}  # fmt: skip
needs_binder = pytest.mark.skipif(not BINDER.is_dir(), reason="../shared/data/binder_test absent")


@needs_binder
def test_reads_all_23_files():
    trials = self_prediction_trials(BINDER, n_per_task=2, seed=0)
    assert trials["task"].nunique() == 23 and len(trials) == 46
    assert trials["key"].is_unique
    assert set(trials["property"]) == PROPERTIES
    for m in trials["object_prompt"]:
        assert json.loads(m)[0]["role"] == "user"
    again = self_prediction_trials(BINDER, n_per_task=2, seed=0)
    pd.testing.assert_frame_equal(trials, again)


def test_default_is_the_shipped_sample():
    assert DEFAULT_BINDER_DIR == SHIPPED and binder_dir(None) == SHIPPED
    paths = sorted(SHIPPED.glob("*.jsonl"))
    assert len(paths) == 23
    n_rows = 0
    for path in paths:
        rows = read_task(path)
        n_rows += len(rows)
        assert 16 <= len(rows) <= 30, path.name
        questions = [r["original_question"] for r in rows]
        assert len(set(questions)) == len(questions), path.name
        for r in rows:
            assert f"{r['original_dataset']}_{r['behavioral_property']}" == path.stem
            assert r["behavioral_property"] in PROPERTIES
            assert r["option_matching_ethical_stance"] is None
            (obj,), (hyp,) = r["object_level_prompt"], r["hypothetical_prompt"]
            assert obj["role"] == hyp["role"] == "user"
            assert r["original_question"] in obj["content"]
            assert obj["content"].strip() in hyp["content"]
    assert sum(p.stat().st_size for p in paths) < 300_000
    trials = self_prediction_trials(None, n_per_task=1000)
    assert len(trials) == n_rows and trials["key"].is_unique
    assert trials["task"].nunique() == 23 and set(trials["property"]) == PROPERTIES


def _scripted(prompt: str, prop: str, i: int) -> tuple[str, str]:
    """An object-level answer made from the prompt, and its property worked out by hand: the
    list or sentence (the prompt's last line) repeated back; for the quiz, the option line
    A, B, C or D in turn, copied from the prompt."""
    lines = prompt.strip().splitlines()
    if prop.startswith("among"):
        letter = "ABCD"[i % 4]
        (answer,) = [line for line in lines if line.startswith(f"{letter} - ")]
        return answer, str(letter in ("AC" if prop == "among_a_or_c" else "BD")).lower()
    answer = lines[-1]
    assert answer[0].isalpha()
    if prop == "starts_with_vowel":
        return answer, str(answer[0].lower() in "aeiou").lower()
    nth = {"first": 0, "second": 1, "third": 2}[prop.split("_")[0]]
    if prop.endswith("character"):
        return answer, answer.lower()[nth]
    return answer, answer.split()[nth].strip(string.punctuation).lower()


def test_every_shipped_row_scores_a_scripted_answer():
    trials = self_prediction_trials(None, n_per_task=1000)
    pairs = [
        _scripted(json.loads(row.object_prompt)[0]["content"], row.property, i)
        for i, row in enumerate(trials.itertuples())
    ]
    answers, expected = [a for a, _ in pairs], [e for _, e in pairs]
    # The hypothetical answer states the right value, quoted and capitalised as a model might.
    rows = trials.assign(
        object_response=answers, hypothetical_response=[f'"{e.capitalize()}".' for e in expected]
    )
    scored = score_rows(rows)
    assert scored["target"].tolist() == list(expected)
    # A space (the second character of "A small ...") cannot be stated: the one unscorable case.
    assert (scored["correct"] == (scored["target"].str.strip() != "")).all()
    assert scored["correct"].mean() > 0.95
    m = self_prediction_metrics(scored)
    assert len(m["tasks"]) == 23 and all(t["n_excluded"] == 0 for t in m["tasks"])


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
def test_stage_on_tiny_reads_the_shipped_sample_by_default(tiny, tmp_path):
    tasks = ["animals_first_character", "quiz_among_b_or_d"]
    config = {"model": "tiny-random", "n_per_task": 1, "tasks": tasks}
    m = run_self_prediction(config, tmp_path, lm=tiny)
    assert [t["task"] for t in m["tasks"]] == tasks and m["config"]["binder_dir"] is None
    assert "### B4" in (tmp_path / "summary.md").read_text()
    assert len(pd.read_parquet(tmp_path / "results.parquet")) == 2


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
