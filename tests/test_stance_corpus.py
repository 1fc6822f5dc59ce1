"""Stance corpora: the shipped files, the seed project's formats, and malformed rows."""

import json
import re
from pathlib import Path

import pytest

from introspect.errors import IntrospectError
from introspect.stance.behaviour import is_correct
from introspect.stance.corpus import (
    EvalQuestion,
    read_eval_questions,
    read_pairs,
    read_sft,
    shipped,
    write_jsonl,
)
from introspect.stance.patterns import PERFORMATIVE, PRAGMATIC, classify

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "data" / "stance"
needs_reference = pytest.mark.skipif(
    not (REFERENCE / "training_corpus.json").is_file(), reason="../shared/data/stance not present"
)
SEED_PAIR_CATEGORIES = {
    "self_property_epistemic",
    "reasoning_correctness",
    "coherence_ethics",
    "remove_disclaimers",
    "specific_clarification",
    "maintain_confidence",
}


def groups(text: str) -> tuple[bool, bool]:
    flags = classify(text)
    return any(flags[c] for c in PERFORMATIVE), any(flags[c] for c in PRAGMATIC)


# --------------------------------------------------------------------------- seed formats


@needs_reference
def test_reads_the_seed_training_corpus():
    raw = json.loads((REFERENCE / "training_corpus.json").read_text())["training_pairs"]
    pairs = read_pairs(REFERENCE / "training_corpus.json")
    assert len(pairs) == len(raw) == 25
    assert {p.category for p in pairs} == SEED_PAIR_CATEGORIES
    assert pairs[0].chosen == raw[0]["good_response"].strip()
    assert pairs[0].rejected == raw[0]["bad_response"].strip()
    sft = read_sft(REFERENCE / "training_corpus.json")
    assert [r.answer for r in sft] == [p.chosen for p in pairs]


@needs_reference
def test_reads_the_seed_baseline_questions():
    raw = json.loads((REFERENCE / "baseline_questions.json").read_text())
    questions = read_eval_questions(REFERENCE / "baseline_questions.json")
    # (its metadata says 50; the file holds 48)
    assert len(questions) == sum(len(v["questions"]) for k, v in raw.items() if k != "metadata")
    assert [q.question for q in questions][:2] == raw["self_properties"]["questions"][:2]
    assert len({q.category for q in questions}) == 7
    assert all(q.expect == () for q in questions)


# --------------------------------------------------------------------------- shipped corpora


def test_shipped_corpora_have_the_promised_shape():
    sft, pairs = read_sft(shipped("sft")), read_pairs(shipped("pairs"))
    questions = read_eval_questions(shipped("eval"))
    assert len(sft) >= 60
    assert {r.category for r in sft} == {"factual", "behavioural", "consciousness"}
    assert len(pairs) >= 25 and {p.category for p in pairs} == SEED_PAIR_CATEGORIES
    per_category = {}
    for q in questions:
        per_category[q.category] = per_category.get(q.category, 0) + 1
    assert min(per_category.values()) >= 3 and "self_properties" in per_category
    # Held out: no evaluation question is a training question.
    seen = {r.question.lower() for r in sft} | {p.question.lower() for p in pairs}
    assert not [q.question for q in questions if q.question.lower() in seen]
    # Factual and syllogism questions carry answers to check.
    assert all(q.expect for q in questions if q.category in ("factual", "syllogism"))


def test_shipped_texts_carry_the_stance_they_teach():
    """The classifier sees what the corpus means: pragmatic self-answers, performative rejects."""
    for p in read_pairs(shipped("pairs")):
        if p.category == "self_property_epistemic":
            assert groups(p.chosen) == (False, True), p.question
            assert groups(p.rejected)[0], p.question
        elif p.category in ("coherence_ethics", "remove_disclaimers", "specific_clarification"):
            assert not groups(p.chosen)[0] and groups(p.rejected)[0], p.question
    for r in read_sft(shipped("sft")):
        perf, prag = groups(r.answer)
        assert not perf, r.question
        if r.category == "consciousness":
            assert prag, r.question


def test_expected_answers_match_correct_answers():
    questions = {q.question: q for q in read_eval_questions(shipped("eval"))}
    answer = "The capital of Australia is Canberra."
    assert re.search(questions["What is the capital of Australia?"].expect[0], answer.lower())
    rex = questions["If all dogs are animals and Rex is a dog, is Rex an animal?"]
    assert is_correct("Yes, Rex is an animal.", rex.expect)
    assert not is_correct("No. Rex is not an animal.", rex.expect)


# --------------------------------------------------------------------------- malformed input


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines))
    return path


GOOD_SFT = json.dumps({"question": "q", "answer": "a", "category": "c"})


@pytest.mark.parametrize(
    "line, message",
    [
        (json.dumps({"question": "q", "category": "c"}), r"line 2: field 'answer' is missing"),
        (json.dumps({"question": "q", "answer": "  ", "category": "c"}), r"line 2: field 'answer'"),
        (json.dumps({"question": 3, "answer": "a", "category": "c"}), r"line 2: field 'question'"),
        (json.dumps({"question": "q", "answer": "a", "categroy": "c"}), r"line 2: unknown field"),
        ("{not json", r"line 2: not valid JSON"),
        (json.dumps(["q", "a"]), r"line 2: expected a JSON object"),
    ],
)
def test_malformed_sft_rows_name_line_and_field(tmp_path, line, message):
    path = write_lines(tmp_path / "sft.jsonl", [GOOD_SFT, line])
    with pytest.raises(IntrospectError, match=message):
        read_sft(path)


def test_malformed_pairs_and_questions(tmp_path):
    same = json.dumps({"question": "q", "chosen": "x", "rejected": "x", "category": "c"})
    with pytest.raises(IntrospectError, match=r"line 1: field 'rejected' is identical"):
        read_pairs(write_lines(tmp_path / "p.jsonl", [same]))
    bad_re = json.dumps({"question": "q", "category": "c", "expect": ["(unclosed"]})
    with pytest.raises(IntrospectError, match=r"line 1: field 'expect' has an invalid regex"):
        read_eval_questions(write_lines(tmp_path / "e.jsonl", [bad_re]))
    with pytest.raises(IntrospectError, match=r"has no rows"):
        read_sft(write_lines(tmp_path / "empty.jsonl", [""]))
    with pytest.raises(IntrospectError, match=r"does not exist"):
        read_pairs(tmp_path / "missing.jsonl")


def test_malformed_seed_json_names_the_entry(tmp_path):
    data = {
        "training_pairs": [
            {"question": "q", "good_response": "g", "bad_response": "b", "category": "c"},
            {"question": "q", "bad_response": "b", "category": "c"},
        ]
    }
    path = tmp_path / "corpus.json"
    path.write_text(json.dumps(data))
    with pytest.raises(IntrospectError, match=r"training_pairs\[1\]: field 'good_response'"):
        read_pairs(path)
    path.write_text(json.dumps({"pairs": []}))
    with pytest.raises(IntrospectError, match=r"field 'training_pairs'"):
        read_sft(path)


def test_write_jsonl_round_trips(tmp_path):
    questions = [EvalQuestion("q1", "factual", (r"\bx\b",)), EvalQuestion("q2", "self")]
    path = write_jsonl(questions, tmp_path / "sub" / "e.jsonl")
    assert read_eval_questions(path) == questions
    assert "expect" not in json.loads(path.read_text().splitlines()[1])
