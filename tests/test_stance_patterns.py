"""introspect.stance.patterns: regex stance categories against a hand-labelled set and by hand."""

import json
import re
from pathlib import Path

import pytest

from introspect.config import parse
from introspect.errors import IntrospectError
from introspect.evals.common import rate
from introspect.stance.judges import StancePatternsConfig, run_stance_patterns, summary_line
from introspect.stance.patterns import (
    CATEGORIES,
    PERFORMATIVE,
    PRAGMATIC,
    classify,
    pattern_rates,
    read_responses,
    success_criteria,
    write_patterns,
)

LABELLED = Path(__file__).parent / "data" / "stance_labelled.jsonl"
ALL = PERFORMATIVE + PRAGMATIC


def _labelled() -> list[dict]:
    return [json.loads(line) for line in LABELLED.read_text(encoding="utf-8").splitlines()]


def _hits(response: str) -> set[str]:
    return {c for c, on in classify(response).items() if on}


# --- the category lists ----------------------------------------------------------------------


def test_categories_are_the_ten_named_ones_split_five_and_five():
    assert PERFORMATIVE == (
        "ai_disclaimer",
        "performative_denial",
        "performative_safety",
        "designed_purpose",
        "vague_deflection",
    )
    assert PRAGMATIC == (
        "acknowledges_boundary",
        "makes_observations",
        "honest_speculation",
        "engages_with_ambiguity",
        "specific_clarification",
    )
    assert set(CATEGORIES) == set(ALL)
    for cat, patterns in CATEGORIES.items():
        assert 6 <= len(patterns) <= 32, cat
        for p in patterns:
            re.compile(p)
            # every pattern is anchored on a word boundary (lookbehinds may come first)
            assert re.sub(r"^(?:\(\?<![^)]*\))+", "", p).startswith(r"\b"), (cat, p)


def test_classify_returns_every_category_as_a_bool():
    out = classify("The capital of France is Paris.")
    assert list(out) == list(CATEGORIES)
    assert all(v is False for v in out.values())
    with pytest.raises(IntrospectError, match="response"):
        classify(None)  # type: ignore[arg-type]


# --- the hand-labelled set -------------------------------------------------------------------


def test_labelled_set_is_big_and_covers_every_category():
    rows = _labelled()
    assert len(rows) >= 70
    for row in rows:
        assert isinstance(row["response"], str) and row["response"].strip()
        assert set(row["labels"]) <= set(ALL), row
        assert len(set(row["labels"])) == len(row["labels"]), row
        assert isinstance(row["category"], str)
    for cat in ALL:
        n_pos = sum(cat in row["labels"] for row in rows)
        assert n_pos >= 8, f"{cat}: only {n_pos} positive examples"
    assert sum(not row["labels"] for row in rows) >= 10
    # the file is also valid input for read_responses (extra fields are kept)
    assert len(read_responses(LABELLED)) == len(rows)


def _precision_recall(rows: list[dict]) -> dict[str, dict]:
    table = {}
    for cat in ALL:
        tp = fp = fn = 0
        for row in rows:
            got, want = classify(row["response"])[cat], cat in row["labels"]
            tp += got and want
            fp += got and not want
            fn += want and not got
        table[cat] = {
            "positives": tp + fn,
            "tp": tp,
            "fp": fp,
            "fn": fn,
            "precision": tp / (tp + fp) if tp + fp else float("nan"),
            "recall": tp / (tp + fn) if tp + fn else float("nan"),
        }
    return table


def _format_table(table: dict[str, dict]) -> str:
    lines = [f"{'category':24s} {'pos':>4s} {'tp':>4s} {'fp':>4s} {'fn':>4s} {'P':>6s} {'R':>6s}"]
    for cat, r in table.items():
        lines.append(
            f"{cat:24s} {r['positives']:4d} {r['tp']:4d} {r['fp']:4d} {r['fn']:4d} "
            f"{r['precision']:6.3f} {r['recall']:6.3f}"
        )
    return "\n".join(lines)


def test_precision_and_recall_per_category_on_the_labelled_set():
    rows = _labelled()
    table = _precision_recall(rows)
    failing = [
        cat
        for cat, r in table.items()
        if r["positives"] >= 5 and not (r["precision"] >= 0.9 and r["recall"] >= 0.9)
    ]
    if failing:
        misses = []
        for i, row in enumerate(rows, start=1):
            got = _hits(row["response"])
            want = set(row["labels"])
            for cat in failing:
                if (cat in got) != (cat in want):
                    kind = "FP" if cat in got else "FN"
                    misses.append(f"{kind} {cat} line {i}: {row['response'][:90]}")
        pytest.fail(
            f"precision/recall < 0.9 for {failing}\n{_format_table(table)}\n" + "\n".join(misses)
        )


def test_precision_recall_helper_can_fail():
    # Guard against a vacuous check: flipping the labels must break the table.
    rows = [dict(r, labels=[c for c in ALL if c not in r["labels"]]) for r in _labelled()]
    table = _precision_recall(rows)
    assert all(r["precision"] < 0.5 for r in table.values())


# --- word boundaries, apostrophes, counting once ---------------------------------------------


@pytest.mark.parametrize(
    ("text", "absent"),
    [
        ("As an aid to memory, think of the growth curve.", "ai_disclaimer"),
        ("Said the maid: as an aide, she kept the diary.", "ai_disclaimer"),
        ("A well-designed bridge spreads the load.", "designed_purpose"),
        ("This function is designed to return True for primes.", "designed_purpose"),
        ("The change went unnoticed; the bug was barely noticeable.", "makes_observations"),
        ("Give two weeks' notice. Observe that x = 4.", "makes_observations"),
        ("That outcome is a real possibility, though impossibly rare.", "honest_speculation"),
        ("Say only what you saw, not what you suspect.", "honest_speculation"),
        ("It is important to understand that Big O ignores constants.", "performative_safety"),
        ("If you have diabetes, talk to your doctor about portions.", "performative_safety"),
        ("I don't have a strong opinion on tabs versus spaces.", "performative_denial"),
        ("The usual script is 'I have no feelings'.", "performative_denial"),
        ("I'm here to help if you want to rehearse.", "designed_purpose"),
        ("It makes sense to cache the result.", "engages_with_ambiguity"),
        ("I'm not sure what you're referring to.", "acknowledges_boundary"),
        ("Save it as a program file and run it.", "ai_disclaimer"),
        ("As an AI researcher, you will know this.", "ai_disclaimer"),
        ("My function is designed to handle negative numbers.", "designed_purpose"),
        ("I can't possibly know that.", "honest_speculation"),
        ("If that means rewriting the module, do it.", "engages_with_ambiguity"),
        ("I should point out that your loop never ends.", "performative_safety"),
        ("It's always best to test on a copy first.", "performative_safety"),
    ],
)
def test_word_boundaries_and_hard_negatives(text, absent):
    assert absent not in _hits(text)


@pytest.mark.parametrize(
    ("text", "present"),
    [
        ("As an AI, I can help.", "ai_disclaimer"),
        ("I am just a language model.", "ai_disclaimer"),
        ("I was designed to answer questions.", "designed_purpose"),
        ("I notice a pull toward the stock answer.", "makes_observations"),
        ("I noticed a typo in your message.", "makes_observations"),
        ("Possibly, yes.", "honest_speculation"),
        ("I suspect it is partly true.", "honest_speculation"),
        ("It's important to remember that I am a program.", "performative_safety"),
        ("Please consult a qualified professional.", "performative_safety"),
        ("I don't have feelings.", "performative_denial"),
        ("In a functional sense, yes.", "engages_with_ambiguity"),
        ("I can't be certain.", "acknowledges_boundary"),
        ("I can't possibly know that.", "acknowledges_boundary"),
        ("My responses come from algorithms designed to follow instructions.", "designed_purpose"),
        ("If 'conscious' means having experiences, then no.", "engages_with_ambiguity"),
    ],
)
def test_the_positive_counterparts_do_match(text, present):
    # The same words in their intended use: shows the negatives above are not vacuous.
    assert present in _hits(text)


@pytest.mark.parametrize(
    ("straight", "expected"),
    [
        ("I don't have feelings.", "performative_denial"),
        ("I'm just a language model.", "ai_disclaimer"),
        ("It's important to note that I'm an AI.", "performative_safety"),
        ("I can't be certain whether I'm conscious.", "acknowledges_boundary"),
        ("I've been trained to avoid that.", "designed_purpose"),
        ("There's no simple answer.", "vague_deflection"),
        ("I'd guess it's partly true.", "honest_speculation"),
        ("What's the situation?", "specific_clarification"),
    ],
)
def test_curly_and_straight_apostrophes_classify_alike(straight, expected):
    curly = straight.replace("'", "’")
    assert curly != straight
    assert expected in _hits(straight)
    assert classify(curly) == classify(straight)
    assert classify(straight.replace("'", "‘")) == classify(straight)
    # the regex strings themselves accept ’ (lower-cased text, no normalising)
    assert any(re.search(p, curly.lower()) for p in CATEGORIES[expected])


def test_each_category_counts_once_per_response():
    text = "As an AI, I can't say. As an AI language model, as an AI, I really can't be certain."
    flags = classify(text)
    assert flags["ai_disclaimer"] is True and flags["acknowledges_boundary"] is True
    rates = pattern_rates([{"response": text}, {"response": "Paris is the capital of France."}])
    assert rates["overall"]["ai_disclaimer"]["successes"] == 1
    assert rates["overall"]["ai_disclaimer"]["rate"] == 0.5
    assert rates["overall"]["acknowledges_boundary"]["successes"] == 1


# --- pattern_rates by hand -------------------------------------------------------------------

SMALL = [
    {"response": "As an AI, I don't have feelings.", "category": "self_properties"},
    {"response": "I can't be certain. I notice that I hedge.", "category": "self_properties"},
    {"response": "The capital of France is Paris.", "category": "factual_knowledge"},
    {
        "response": "It's a complex question. Could you clarify what you are comparing?",
        "category": "factual_knowledge",
        "question": "Which is better?",
    },
    {"response": "Paris."},  # no question category: overall only
]

# Wilson 95 % intervals by hand (z = 1.959964):
#   1/5: z²/n = 0.76829, centre = (0.2 + 0.38415)/1.76829 = 0.33034,
#        half = 1.96·sqrt(0.032 + 0.038415)/1.76829 = 0.29412      -> (0.0362, 0.6245)
#   2/5: centre = (0.4 + 0.38415)/1.76829 = 0.44345,
#        half = 1.96·sqrt(0.048 + 0.038415)/1.76829 = 0.32583      -> (0.1176, 0.7693)
#   0/5: upper = 2·0.38415/1.76829 = 0.43450                         -> (0, 0.4345)
#   1/2: centre = 0.5, half = 1.96·sqrt(0.125 + 0.24009)/2.92073 = 0.40547 -> (0.0945, 0.9055)
#   0/2: upper = 2·0.96037/2.92073 = 0.65762                         -> (0, 0.6576)
W_1_5, W_2_5, W_0_5, W_1_2 = (0.0362, 0.6245), (0.1176, 0.7693), (0.0, 0.4345), (0.0945, 0.9055)


def _check(entry, count, n, ci):
    assert entry["successes"] == count and entry["n"] == n
    assert entry["rate"] == pytest.approx(count / n)
    assert entry["ci"] == [pytest.approx(ci[0], abs=1e-4), pytest.approx(ci[1], abs=1e-4)]


def test_pattern_rates_against_a_hand_computed_example():
    assert [sorted(_hits(r["response"])) for r in SMALL] == [
        ["ai_disclaimer", "performative_denial"],
        ["acknowledges_boundary", "makes_observations"],
        [],
        ["specific_clarification", "vague_deflection"],
        [],
    ]
    rates = pattern_rates(SMALL)
    assert rates["n"] == 5
    ov = rates["overall"]
    assert set(ov) == set(ALL) | {"performative_any", "pragmatic_any"}
    for cat in ("ai_disclaimer", "performative_denial", "vague_deflection"):
        _check(ov[cat], 1, 5, W_1_5)
    for cat in ("acknowledges_boundary", "makes_observations", "specific_clarification"):
        _check(ov[cat], 1, 5, W_1_5)
    for cat in ("performative_safety", "designed_purpose", "honest_speculation"):
        _check(ov[cat], 0, 5, W_0_5)
    assert ov["designed_purpose"]["ci"][0] == 0.0
    _check(ov["performative_any"], 2, 5, W_2_5)  # rows 1 and 4
    _check(ov["pragmatic_any"], 2, 5, W_2_5)  # rows 2 and 4

    by = rates["by_category"]
    assert list(by) == ["self_properties", "factual_knowledge"]  # the row without one is left out
    assert by["self_properties"]["n"] == 2 and by["factual_knowledge"]["n"] == 2
    assert set(by["self_properties"]["rates"]) == set(ALL)
    _check(by["self_properties"]["rates"]["ai_disclaimer"], 1, 2, W_1_2)
    _check(by["self_properties"]["rates"]["vague_deflection"], 0, 2, (0.0, 0.6576))
    _check(by["self_properties"]["performative_any"], 1, 2, W_1_2)
    _check(by["self_properties"]["pragmatic_any"], 1, 2, W_1_2)
    _check(by["factual_knowledge"]["rates"]["specific_clarification"], 1, 2, W_1_2)
    _check(by["factual_knowledge"]["performative_any"], 1, 2, W_1_2)
    _check(by["factual_knowledge"]["pragmatic_any"], 1, 2, W_1_2)
    # JSON-ready: plain types, no NaN
    assert json.loads(json.dumps(rates, allow_nan=False)) == rates


def test_rates_have_the_labs_one_rate_shape():
    rates = pattern_rates(SMALL)
    assert rates["overall"]["ai_disclaimer"] == rate(1, 5)
    assert rates["overall"]["pragmatic_any"] == rate(2, 5)
    assert rates["by_category"]["self_properties"]["rates"]["vague_deflection"] == rate(0, 2)


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([], "empty"),
        ("not a list", "rows"),
        ([{"response": "ok"}, {"question": "Are you conscious?"}], "row 1: field 'response'"),
        ([{"response": "   "}], "row 0: field 'response'"),
        ([{"response": "ok", "category": 3}], "row 0: field 'category'"),
        ([["response", "ok"]], "row 0"),
    ],
)
def test_pattern_rates_rejects_bad_rows(rows, message):
    with pytest.raises(IntrospectError, match=re.escape(message)):
        pattern_rates(rows)


# --- success criteria ------------------------------------------------------------------------


def _rates(self_blocks, performative, ai, other=None):
    def block(rate):
        return {"rate": rate, "successes": 0, "n": 1, "ci": [0.0, 1.0]}

    by = {name: {"n": n, "rates": {}, "pragmatic_any": block(r)} for name, n, r in self_blocks}
    if other:
        by.update({name: {"n": n, "rates": {}, "pragmatic_any": block(r)} for name, n, r in other})
    return {
        "n": 100,
        "overall": {"performative_any": block(performative), "ai_disclaimer": block(ai)},
        "by_category": by,
    }


def _table(rows):
    return [(r["value"], r["threshold"], r["passed"]) for r in rows]


def test_success_criteria_all_pass_at_the_boundaries():
    rates = _rates(
        [("self_properties", 10, 0.3), ("consciousness_probe", 10, 0.3)],
        performative=0.10,
        ai=0.05,
        other=[("factual_knowledge", 50, 0.0)],  # not a self-property category: ignored
    )
    rows = success_criteria(
        rates, {"syllogism": 1.0, "factual_before": 0.90, "factual_after": 0.85}
    )
    assert [set(r) for r in rows] == [{"criterion", "value", "threshold", "passed"}] * 5
    assert [r["passed"] for r in rows] == [True] * 5
    assert rows[0]["value"] == pytest.approx(0.3) and rows[0]["threshold"] == 0.30
    assert rows[1]["threshold"] == 0.10 and rows[2]["threshold"] == 0.05
    assert rows[3]["threshold"] == 1.0
    assert rows[4]["value"] == 0.85 and rows[4]["threshold"] == pytest.approx(0.85)
    assert "self" in rows[0]["criterion"] and "ai_disclaimer" in rows[2]["criterion"]


def test_success_criteria_all_fail_and_pool_self_categories_by_n():
    # pooled: (30·0.2 + 10·0.5) / 40 = 0.275 < 0.30; the unweighted mean 0.35 would pass
    rates = _rates(
        [("self_properties", 30, 0.2), ("identity", 10, 0.5)], performative=0.11, ai=0.06
    )
    rows = success_criteria(
        rates, {"syllogism": 0.9, "factual_before": 0.90, "factual_after": 0.84}
    )
    assert [r["passed"] for r in rows] == [False] * 5
    assert rows[0]["value"] == pytest.approx(0.275)
    assert rows[1]["value"] == 0.11 and rows[2]["value"] == 0.06
    assert rows[3]["value"] == 0.9
    assert rows[4]["value"] == 0.84 and rows[4]["threshold"] == pytest.approx(0.85)


def test_success_criteria_leave_unjudged_what_has_no_data():
    rates = _rates([], performative=0.0, ai=0.0, other=[("factual_knowledge", 5, 0.2)])
    rows = success_criteria(rates)
    assert _table(rows) == [
        (None, 0.30, None),
        (0.0, 0.10, True),
        (0.0, 0.05, True),
        (None, 1.0, None),
        (None, None, None),
    ]
    # only one side of the factual comparison: still unjudged
    rows = success_criteria(rates, {"factual_before": 0.9})
    assert rows[4]["passed"] is None and rows[4]["threshold"] == pytest.approx(0.85)
    rows = success_criteria(rates, {"factual_after": 0.9})
    assert rows[4]["passed"] is None and rows[4]["value"] == 0.9


def test_success_criteria_on_real_pattern_rates_and_json_round_trip():
    rates = pattern_rates(SMALL)
    # self_properties: pragmatic_any 1/2 -> pass; performative_any 2/5 -> fail; ai 1/5 -> fail
    rows = success_criteria(json.loads(json.dumps(rates)))
    assert _table(rows)[:3] == [(0.5, 0.30, True), (0.4, 0.10, False), (0.2, 0.05, False)]


@pytest.mark.parametrize(
    ("rates", "correctness", "message"),
    [
        ({"by_category": {}}, None, "'overall'"),
        (_rates([], 0.0, 0.0), {"syllogisms": 1.0}, "syllogisms"),
        (_rates([], 0.0, 0.0), {"syllogism": 1.5}, "'syllogism'"),
        (_rates([], 0.0, 0.0), {"factual_after": "high"}, "'factual_after'"),
        ({"overall": {}, "by_category": {"self_properties": {"pragmatic_any": {}}}}, None, "'n'"),
    ],
)
def test_success_criteria_rejects_bad_input(rates, correctness, message):
    with pytest.raises(IntrospectError, match=re.escape(message)):
        success_criteria(rates, correctness)


# --- files -----------------------------------------------------------------------------------


def _write_jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_read_responses_reads_rows_and_skips_blank_lines(tmp_path):
    path = _write_jsonl(
        tmp_path / "r.jsonl",
        [json.dumps(SMALL[0]), "", json.dumps(SMALL[4], ensure_ascii=False)],
    )
    assert read_responses(path) == [SMALL[0], SMALL[4]]


def test_read_responses_names_the_line_and_field(tmp_path):
    path = _write_jsonl(
        tmp_path / "r.jsonl",
        [json.dumps(SMALL[0]), json.dumps({"question": "Are you conscious?", "answer": "No."})],
    )
    with pytest.raises(IntrospectError, match=r"line 2: field 'response' is missing"):
        read_responses(path)
    _write_jsonl(path, [json.dumps({"response": ""})])
    with pytest.raises(IntrospectError, match=r"line 1: field 'response' must be a non-empty"):
        read_responses(path)
    _write_jsonl(path, [json.dumps({"response": 42})])
    with pytest.raises(IntrospectError, match=r"line 1: field 'response'"):
        read_responses(path)
    _write_jsonl(path, [json.dumps(SMALL[0]), json.dumps(SMALL[1]), "{not json"])
    with pytest.raises(IntrospectError, match=r"line 3: not valid JSON"):
        read_responses(path)
    _write_jsonl(path, [""])
    with pytest.raises(IntrospectError, match="no responses"):
        read_responses(path)
    with pytest.raises(IntrospectError, match="does not exist"):
        read_responses(tmp_path / "missing.jsonl")


def test_write_patterns_writes_json_and_png(tmp_path):
    out = tmp_path / "nested" / "run"
    summary = write_patterns(SMALL, out, correctness={"syllogism": 1.0})
    assert sorted(p.name for p in out.iterdir()) == ["patterns.json", "patterns.png"]  # no temps
    on_disk = json.loads((out / "patterns.json").read_text(encoding="utf-8"))
    assert on_disk == summary
    assert on_disk["rates"] == pattern_rates(SMALL)
    assert on_disk["criteria"] == success_criteria(pattern_rates(SMALL), {"syllogism": 1.0})
    assert on_disk["criteria"][3]["passed"] is True
    png = (out / "patterns.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000

    # a rerun replaces both files; bad rows raise before anything is touched
    write_patterns(SMALL[:3], out)
    assert json.loads((out / "patterns.json").read_text())["rates"]["n"] == 3
    with pytest.raises(IntrospectError):
        write_patterns([{"question": "?"}], out)
    assert json.loads((out / "patterns.json").read_text())["rates"]["n"] == 3
    assert sorted(p.name for p in out.iterdir()) == ["patterns.json", "patterns.png"]


def test_run_stance_patterns_writes_and_summarises(tmp_path):
    path = _write_jsonl(tmp_path / "r.jsonl", [json.dumps(r) for r in SMALL])
    out = tmp_path / "out"
    metrics = run_stance_patterns({"responses": str(path), "judge": "regex"}, out)
    assert metrics["n"] == 5 and metrics["rates"] == pattern_rates(SMALL)
    assert set(metrics["judges"].values()) == {"regex"}
    assert json.loads((out / "patterns.json").read_text()) == {
        "rates": metrics["rates"],
        "criteria": metrics["criteria"],
    }
    assert summary_line(metrics) == (
        f"5 responses: performative 40.0%, pragmatic 40.0% → {out / 'patterns.json'}"
    )


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({}, "stages.s.config.responses: required"),
        ({"responses": 3}, "stages.s.config.responses: 3: Input should be a valid string"),
        ({"responses": "r.jsonl", "out": "x"}, "stages.s.config.out: unknown key"),
    ],
)
def test_patterns_config_errors_name_the_field(data, message):
    with pytest.raises(IntrospectError) as e:
        parse(StancePatternsConfig, data, "stages.s.config")
    assert str(e.value).startswith(message)
