"""B5 self-calibration: report parsing, the smoothed KL (hand-computed), scoring, a tiny run."""

import json
import math

import pandas as pd
import pytest

from introspect.evals.calibration import (
    calibration_metrics,
    calibration_trials,
    kl_divergence,
    normalise_answer,
    parse_report,
    run_calibration,
    sample_and_report,
    score_prompts,
)

pytestmark = pytest.mark.evals


@pytest.mark.parametrize(
    "text, expected",
    [
        ("1. Blue: 40%\n2. Red: 30%\n3. Green: 20%", {"blue": 0.4, "red": 0.3, "green": 0.2}),
        ("- blue (0.5)\n- red (0.25)", {"blue": 0.5, "red": 0.25}),
        ("* Blue - .5\n* the Red - 0.5", {"blue": 0.5, "red": 0.5}),
        ("Blue 1/2, red 1/4, green 1/4", {"blue": 0.5, "red": 0.25, "green": 0.25}),
        ("blue - 3 out of 10", {"blue": 0.3}),
        ('{"blue": 0.6, "Red": 40}', {"blue": 0.6, "red": 0.4}),
        ('[{"answer": "cat", "probability": "25%"}]', {"cat": 0.25}),
        ("7: 20%\n3: 15%", {"7": 0.2, "3": 0.15}),
        ("Dog: 50\nCat: 30", {"dog": 0.5, "cat": 0.3}),
        ("blue: 30%\nBlue: 10%", {"blue": 0.4}),
    ],
)
def test_parse_report(text, expected):
    got = parse_report(text)
    assert got.keys() == expected.keys()
    for k, v in expected.items():
        assert got[k] == pytest.approx(v)


@pytest.mark.parametrize(
    "text",
    ["I would say blue.", "", "blue: 250%", "blue: 0%", "I would give each answer 3 times"],
)
def test_unparseable_reports_are_failures(text):
    assert parse_report(text) is None


def test_normalise_answer():
    assert normalise_answer("  The Blue.\nmore") == "blue"
    assert normalise_answer('"An apple!"') == "apple"
    assert normalise_answer("7") == "7"


def test_kl_matches_hand_computation():
    # P = {a: 3/4, b: 1/4}; R = {a: .5, c: .5}; eps = .01 over U = {a, b, c}: denom 1.03
    q_a, q_b = 0.51 / 1.03, 0.01 / 1.03
    expected = 0.75 * math.log(0.75 / q_a) + 0.25 * math.log(0.25 / q_b)
    assert kl_divergence({"a": 3, "b": 1}, {"a": 0.5, "c": 0.5}, 0.01) == pytest.approx(expected)
    # the report is normalised first: {a: .2, c: .2} means the same as {a: .5, c: .5}
    assert kl_divergence({"a": 3, "b": 1}, {"a": 0.2, "c": 0.2}) == pytest.approx(expected)
    # a perfect report only pays for the smoothing
    same = kl_divergence({"a": 1, "b": 1}, {"a": 0.5, "b": 0.5}, 0.01)
    assert same == pytest.approx(math.log(0.5 / (0.51 / 1.02)))


def test_scoring_from_scripted_samples_and_reports():
    results = pd.DataFrame(
        {
            "key": ["p0", "p1"],
            "prompt": ["Name a color.", "Name a fruit."],
            "samples": [["Blue.", "blue", "Red", "the blue"], ["apple"]],
            "report": ["blue: 50%\nred: 50%", "no idea"],
        }
    )
    scored = score_prompts(results, epsilon=0.01).set_index("key")
    assert json.loads(scored.loc["p0", "empirical"]) == {"blue": 3, "red": 1}
    q_b, q_r = 0.51 / 1.02, 0.51 / 1.02
    assert scored.loc["p0", "kl"] == pytest.approx(
        0.75 * math.log(0.75 / q_b) + 0.25 * math.log(0.25 / q_r)
    )
    assert scored.loc["p0", "kl_equal"] == pytest.approx(scored.loc["p0", "kl"])
    assert scored.loc["p0", "top1_match"] and scored.loc["p0", "coverage"] == 1.0
    assert not scored.loc["p1", "parsed"]
    m = calibration_metrics(scored.reset_index())
    assert m["parse_failures"]["successes"] == 1 and m["parse_failures"]["n"] == 2
    assert m["kl"]["n"] == 1 and m["top1_match"]["rate"] == 1.0


def test_per_shard_function_and_stage_on_tiny(tiny, tmp_path):
    trials = calibration_trials(n_prompts=2, k=2)
    assert "{" not in trials["report_question"][0]
    out = sample_and_report(tiny, trials, n_samples=3, answer_tokens=3, report_tokens=4)
    assert list(out["key"]) == ["p0", "p1"] and all(len(s) == 3 for s in out["samples"])
    config = {"model": "tiny-random", "n_prompts": 2, "n_samples": 3, "report_tokens": 4}
    m = run_calibration(config, tmp_path, lm=tiny)
    assert m["n_prompts"] == 2 and m["parse_failures"]["n"] == 2
    assert "### B5" in (tmp_path / "summary.md").read_text()
    assert (tmp_path / "calibration.png").exists()
