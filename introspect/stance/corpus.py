"""Stance corpora: SFT rows, preference pairs and held-out evaluation questions.

Our own format is JSONL, one object a line:

* SFT: ``{"question", "answer", "category"}``
* preference pairs: ``{"question", "chosen", "rejected", "category"}``
* evaluation questions: ``{"question", "category"}`` plus optional ``"expect"``, a list of regular
  expressions of which one must match the lower-cased response for it to count as correct
  (factual and reasoning questions; see :func:`introspect.stance.behaviour.correctness`).

Every row may carry an ``"id"`` and a ``"note"``; any other key is an error (a misspelt field
would otherwise be dropped without a word). The loaders also read the seed project's formats:
``training_corpus.json`` (``training_pairs`` with ``good_response`` / ``bad_response``: pairs, or
SFT rows from the good responses) and ``baseline_questions.json`` (``{category: {"questions"}}``:
evaluation questions). Errors name the file, the line or entry, and the field.

Shipped corpora live in ``introspect/resources/stance/`` (see :func:`shipped`).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from introspect.errors import IntrospectError
from introspect.io import atomic_write

RESOURCES = Path(__file__).resolve().parent.parent / "resources" / "stance"
SHIPPED = {"sft": "sft.jsonl", "pairs": "pairs.jsonl", "eval": "eval.jsonl"}
_OPTIONAL = ("id", "note")


@dataclass(frozen=True)
class SFTRow:
    """One supervised example: the assistant should answer ``question`` with ``answer``."""

    question: str
    answer: str
    category: str


@dataclass(frozen=True)
class PreferencePair:
    """One preference: for ``question``, ``chosen`` is preferred over ``rejected``."""

    question: str
    chosen: str
    rejected: str
    category: str


@dataclass(frozen=True)
class EvalQuestion:
    """A held-out question; ``expect`` lists regexes, one of which a correct answer matches."""

    question: str
    category: str
    expect: tuple[str, ...] = field(default=())


def shipped(name: str) -> Path:
    """Path of a corpus shipped with the package: ``sft``, ``pairs`` or ``eval``."""
    if name not in SHIPPED:
        raise IntrospectError(f"corpus: {name!r} is not one of {', '.join(SHIPPED)}")
    return RESOURCES / SHIPPED[name]


# --------------------------------------------------------------------------- validation


def _text(obj: Mapping, key: str, where: str) -> str:
    if key not in obj:
        raise IntrospectError(f"{where}: field '{key}' is missing")
    value = obj[key]
    if not isinstance(value, str) or not value.strip():
        raise IntrospectError(f"{where}: field '{key}' must be a non-empty string")
    return value.strip()


def _only(obj: Any, keys: Iterable[str], where: str) -> None:
    """``obj`` must be a JSON object with no keys beyond ``keys`` and ``_OPTIONAL``."""
    if not isinstance(obj, Mapping):
        raise IntrospectError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    unknown = sorted(set(obj) - set(keys) - set(_OPTIONAL))
    if unknown:
        raise IntrospectError(
            f"{where}: unknown field '{unknown[0]}' (expected {', '.join(keys)}; "
            f"optional {', '.join(_OPTIONAL)})"
        )


def _expect(obj: Mapping, where: str) -> tuple[str, ...]:
    value = obj.get("expect", [])
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise IntrospectError(f"{where}: field 'expect' must be a list of regular expressions")
    for pattern in value:
        try:
            re.compile(pattern)
        except re.error as e:
            raise IntrospectError(
                f"{where}: field 'expect' has an invalid regex {pattern!r} ({e})"
            ) from None
    return tuple(value)


def sft_row(obj: Any, where: str) -> SFTRow:
    """Validate one SFT object (``where`` prefixes any error)."""
    keys = ("question", "answer", "category")
    _only(obj, keys, where)
    return SFTRow(*(_text(obj, k, where) for k in keys))


def preference_pair(obj: Any, where: str) -> PreferencePair:
    """Validate one preference-pair object; chosen and rejected must differ."""
    keys = ("question", "chosen", "rejected", "category")
    _only(obj, keys, where)
    pair = PreferencePair(*(_text(obj, k, where) for k in keys))
    if pair.chosen == pair.rejected:
        raise IntrospectError(f"{where}: field 'rejected' is identical to 'chosen'")
    return pair


def eval_question(obj: Any, where: str) -> EvalQuestion:
    """Validate one evaluation-question object."""
    _only(obj, ("question", "category", "expect"), where)
    return EvalQuestion(
        _text(obj, "question", where), _text(obj, "category", where), _expect(obj, where)
    )


# --------------------------------------------------------------------------- reading


def jsonl_objects(path: Path) -> Iterator[tuple[str, Any]]:
    """``(where, object)`` per non-blank line of a JSONL file, read as iterated (``where``: the
    file and line)."""
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            where = f"{path}: line {lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise IntrospectError(f"{where}: not valid JSON ({e.msg})") from None
            yield where, obj


def _json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise IntrospectError(f"{path}: not valid JSON ({e.msg}, line {e.lineno})") from None


def _reference_pairs(path: Path, data: Any) -> list[tuple[str, dict]]:
    """The seed's ``training_pairs`` as our pair objects (good → chosen, bad → rejected)."""
    pairs = data.get("training_pairs") if isinstance(data, Mapping) else None
    if not isinstance(pairs, list):
        raise IntrospectError(
            f"{path}: field 'training_pairs' (a list) is missing; a .json corpus must be in the "
            "seed project's training_corpus.json format, or use JSONL"
        )
    out = []
    for i, item in enumerate(pairs):
        where = f"{path}: training_pairs[{i}]"
        if not isinstance(item, Mapping):
            raise IntrospectError(f"{where}: expected a JSON object, got {type(item).__name__}")
        out.append(
            (
                where,
                {
                    "question": _text(item, "question", where),
                    "chosen": _text(item, "good_response", where),
                    "rejected": _text(item, "bad_response", where),
                    "category": _text(item, "category", where),
                },
            )
        )
    return out


def _objects(path: str | os.PathLike) -> tuple[Path, list[tuple[str, Any]] | Any]:
    path = Path(path)
    if not path.is_file():
        raise IntrospectError(f"corpus: {path} does not exist or is not a file")
    if path.suffix == ".json":
        return path, _json(path)
    return path, list(jsonl_objects(path))


def _nonempty(rows: list, path: Path) -> list:
    if not rows:
        raise IntrospectError(f"corpus: {path} has no rows")
    return rows


def read_sft(path: str | os.PathLike) -> list[SFTRow]:
    """SFT rows from JSONL, or the good responses of a seed ``training_corpus.json``."""
    path, objs = _objects(path)
    if path.suffix == ".json":
        pairs = _reference_pairs(path, objs)
        return _nonempty(
            [SFTRow(o["question"], o["chosen"], o["category"]) for _, o in pairs], path
        )
    return _nonempty([sft_row(o, w) for w, o in objs], path)


def read_pairs(path: str | os.PathLike) -> list[PreferencePair]:
    """Preference pairs from JSONL or a seed ``training_corpus.json``."""
    path, objs = _objects(path)
    if path.suffix == ".json":
        objs = _reference_pairs(path, objs)
    return _nonempty([preference_pair(o, w) for w, o in objs], path)


def read_eval_questions(path: str | os.PathLike) -> list[EvalQuestion]:
    """Evaluation questions from JSONL or a seed ``baseline_questions.json`` (no ``expect``)."""
    path, objs = _objects(path)
    if path.suffix != ".json":
        return _nonempty([eval_question(o, w) for w, o in objs], path)
    if not isinstance(objs, Mapping):
        raise IntrospectError(f"{path}: expected an object of categories")
    out = []
    for category, block in objs.items():
        if category == "metadata":
            continue
        where = f"{path}: {category}"
        questions = block.get("questions") if isinstance(block, Mapping) else None
        if not isinstance(questions, list):
            raise IntrospectError(f"{where}: field 'questions' (a list) is missing")
        for i, q in enumerate(questions):
            out.append(eval_question({"question": q, "category": category}, f"{where}[{i}]"))
    return _nonempty(out, path)


def write_jsonl(
    rows: Iterable[SFTRow | PreferencePair | EvalQuestion | Mapping], path: str | os.PathLike
) -> Path:
    """Write rows as JSONL (UTF-8, non-ASCII kept as is), atomically."""
    lines = []
    for row in rows:
        obj = dict(row) if isinstance(row, Mapping) else asdict(row)
        if "expect" in obj:
            obj["expect"] = list(obj["expect"])
            if not obj["expect"]:
                del obj["expect"]
        lines.append(json.dumps(obj, ensure_ascii=False))
    text = "".join(line + "\n" for line in lines)
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


# --------------------------------------------------------------------------- chat form


def sft_messages(row: SFTRow) -> dict[str, list[dict[str, str]]]:
    """Conversational prompt/completion: TRL applies the chat template and masks the prompt."""
    return {
        "prompt": [{"role": "user", "content": row.question}],
        "completion": [{"role": "assistant", "content": row.answer}],
    }


def pair_messages(pair: PreferencePair) -> dict[str, list[dict[str, str]]]:
    """Conversational prompt/chosen/rejected for TRL's DPOTrainer."""
    return {
        "prompt": [{"role": "user", "content": pair.question}],
        "chosen": [{"role": "assistant", "content": pair.chosen}],
        "rejected": [{"role": "assistant", "content": pair.rejected}],
    }
