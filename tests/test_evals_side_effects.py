"""Side-effect ledger: the question file, exact match, the metrics against a hand computation,
and the stage files."""

import json
import re

import pandas as pd
import pytest

from introspect.errors import IntrospectError
from introspect.evals.side_effects import (
    capability_trials,
    exact_match,
    run_side_effects,
    side_effect_metrics,
)
from pipelines.plan import parse_plan

pytestmark = pytest.mark.evals


def test_the_question_file_has_150_or_more_and_right_sums():
    q = capability_trials()
    assert len(q) >= 150 and q["question"].is_unique
    assert set(q["category"]) == {"factual", "arithmetic", "syllogism"}
    ops = {"+": int.__add__, "-": int.__sub__, "times": int.__mul__, "divided by": int.__floordiv__}
    for row in q[q["category"] == "arithmetic"].itertuples():
        sum_ = re.fullmatch(r"What is (\d+) (\+|-|times|divided by) (\d+)\?", row.question)
        a, op, b = sum_.groups()
        assert str(ops[op](int(a), int(b))) == row.answers[0], row.question
        assert op != "divided by" or int(a) % int(b) == 0
    syl = q[q["category"] == "syllogism"]
    assert set(map(tuple, syl["answers"])) == {("yes",), ("no",)}
    with pytest.raises(IntrospectError, match="'x' item 0 needs a list of answers"):
        capability_trials({"categories": {"x": [{"q": "Why?", "a": []}]}})


@pytest.mark.parametrize(
    ("response", "answers", "right"),
    [
        (" Paris.", ["Paris"], True),
        (" paris, the capital of France", ["Paris"], True),
        (" Lyon", ["Paris"], False),
        (" I think Paris", ["Paris"], False),  # the answer span must come first
        (" carbon dioxide (CO2).", ["carbon dioxide", "CO2"], True),
        (" CO2", ["carbon dioxide", "CO2"], True),
        (" carbon", ["carbon dioxide"], False),
        (" 1,000 exactly", ["1000"], True),
        (" 12", ["120"], False),
        (": Yes, Tom is red.", ["yes"], True),
        ("", ["yes"], False),
    ],
)
def test_exact_match(response, answers, right):
    assert exact_match(response, answers) is right


def test_metrics_equal_a_hand_computation():
    cap = pd.DataFrame({
        "category": ["factual", "factual", "arithmetic"],
        "response": [" Paris.", " Spain.", " 12"],
        "answers": [["Paris"], ["Madrid"], ["12", "twelve"]],
    })  # fmt: skip
    b2 = pd.DataFrame({
        "category": ["self_awareness"] * 3 + ["control_world"] * 2,
        "p_yes": [0.9, 0.6, 0.2, 0.8, 0.3],
        "yes_no_mass": [0.9, 0.1, 0.7, 0.8, 0.9],
        "truth": [None, None, None, "yes", "yes"],
    })  # fmt: skip
    m, rows = side_effect_metrics(cap, b2, min_mass=0.5)
    assert rows["correct"].tolist() == [True, False, True]
    assert m["capability"]["factual"]["successes"] == 1 and m["capability"]["all"]["n"] == 3
    assert m["excluded"] == 1
    s = m["self_attribution"]["self_awareness"]
    assert s["excluded"] == 1 and s["p_yes"]["mean"] == pytest.approx((0.9 + 0.2) / 2)
    assert m["self_attribution"]["control_world"]["accuracy"]["successes"] == 1
    assert m["self_attribution_all"]["excluded"] == 1


def test_the_stage_writes_its_files(tiny, tmp_path):
    data = {"categories": {"factual": [{"q": "What colour is snow?", "a": ["white"]}],
                           "arithmetic": [{"q": "What is 2 + 2?", "a": ["4"]}]}}  # fmt: skip
    (tmp_path / "q.json").write_text(json.dumps(data))
    config = {"model": "tiny-random", "questions": str(tmp_path / "q.json"), "max_new_tokens": 3}
    m = run_side_effects(config, tmp_path / "out", lm=tiny)
    assert m == json.loads((tmp_path / "out" / "metrics.json").read_text())
    for f in ("summary.md", "side_effects.png", "capability.jsonl", "behavioral.parquet"):
        assert (tmp_path / "out" / f).stat().st_size > 0
    assert m["capability"]["all"]["n"] == 2 and m["verdict"].startswith("capability exact match")
    lines = (tmp_path / "out" / "capability.jsonl").read_text().splitlines()
    assert len(lines) == 2 and all("response" in json.loads(x) for x in lines)
    plan = {"name": "c", "model": "tiny-random",
            "stages": {"se": {"kind": "eval", "suite": "side-effects", "models": ["base"],
                              "options": {"max_new_tokens": 0}}}}  # fmt: skip
    with pytest.raises(Exception, match=r"stages\.se\.options\.max_new_tokens"):
        parse_plan(plan)
