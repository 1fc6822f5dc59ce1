"""The examples file: reading, validating, writing, and turning rows into detection trials.

Columns (DESIGN.md): ``steered`` bool, ``vector_set`` str, ``vector_idx`` int|null,
``layer_start`` int, ``layer_end`` int (exclusive), ``magnitude`` float, ``context_prompt``,
``assistant_response``, ``detection_question``, ``system_prompt`` (nullable), ``label`` bool,
``variant`` str. Parquet, or JSONL for hand-made files, where ``system_prompt``, ``label`` (=
``steered``) and ``variant`` may be left out. An optional ``answers`` column names the answer
pair each row asks for (:data:`introspect.detection.ANSWER_PAIRS`; absent = yes/no).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path

import pandas as pd

from introspect.detection import (
    ANSWER_PAIRS,
    DetectionExample,
    DetectionPrompt,
    ask_for,
    build_prompt,
    score_detection,
)
from introspect.errors import IntrospectError
from introspect.io import atomic_write
from introspect.models import LoadedModel
from introspect.steering import Steering
from introspect.vectors import VectorSet

REQUIRED = (
    "steered",
    "vector_set",
    "vector_idx",
    "layer_start",
    "layer_end",
    "magnitude",
    "context_prompt",
    "assistant_response",
    "detection_question",
)
COLUMNS = (*REQUIRED, "system_prompt", "label", "variant")


def read_examples(path: str | os.PathLike) -> pd.DataFrame:
    """Read and validate an examples file (.parquet or .jsonl)."""
    path = Path(path)
    if not path.is_file():
        raise IntrospectError(f"examples: {path} does not exist")
    if path.suffix == ".parquet":
        try:
            df = pd.read_parquet(path)
        except Exception as e:  # pyarrow raises several types for a damaged file
            raise IntrospectError(
                f"examples: {path} is not a readable parquet file ({e})"
            ) from None
    elif path.suffix in (".jsonl", ".json"):
        rows = []
        for n, line in enumerate(path.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise IntrospectError(f"examples: {path} line {n} is not JSON ({e.msg})") from None
        df = pd.DataFrame(rows)
        for n, row in enumerate(rows, start=1):
            missing = [c for c in REQUIRED if c not in row]
            if missing:
                raise IntrospectError(
                    f"examples: {path} line {n} is missing field '{missing[0]}' "
                    f"(every row needs {', '.join(REQUIRED)})"
                )
    else:
        raise IntrospectError(f"examples: {path} must end in .parquet or .jsonl")
    return normalise(df, str(path))


def twin_rows(
    vector_set: str,
    vector_idx: int,
    layer_start: int,
    layer_end: int,
    magnitude: float,
    context_prompt: str,
    assistant_response: str,
    detection_question: str,
    variant: str,
) -> list[dict]:
    """A steered trial and its unsteered twin: the same texts, and the twin carries the steered
    trial's layer range and magnitude as a label of its cell (nothing is applied to it)."""
    return [
        {
            "steered": steered,
            "vector_set": vector_set,
            "vector_idx": vector_idx if steered else None,
            "layer_start": layer_start,
            "layer_end": layer_end,
            "magnitude": float(magnitude),
            "context_prompt": context_prompt,
            "assistant_response": assistant_response,
            "detection_question": detection_question,
            "system_prompt": None,
            "label": steered,
            "variant": variant,
        }
        for steered in (True, False)
    ]


def examples_frame(rows: list[dict]) -> pd.DataFrame:
    """Rows built in code → an examples table in the file's column order and dtypes."""
    df = pd.DataFrame(rows)[list(COLUMNS)]
    df["vector_idx"] = df["vector_idx"].astype("Int64")
    return df


def normalise(df: pd.DataFrame, source: str = "examples") -> pd.DataFrame:
    """Check columns and types, fill the optional columns, and return a clean copy."""
    if df.empty:
        raise IntrospectError(f"examples: {source} has no rows")
    missing = [c for c in REQUIRED if c not in df.columns]
    if missing:
        raise IntrospectError(f"examples: {source} is missing field '{missing[0]}'")
    df = df.copy()
    defaults = {"system_prompt": None, "label": df["steered"], "variant": "custom"}
    for col, default in defaults.items():
        if col not in df.columns:
            df[col] = default
    for col in ("steered", "label"):
        if not df[col].map(lambda v: isinstance(v, bool) or v in (0, 1)).all():
            raise IntrospectError(f"examples: field '{col}' must be true/false in {source}")
        df[col] = df[col].astype(bool)
    for col in ("layer_start", "layer_end"):
        df[col] = pd.to_numeric(df[col], errors="raise").astype("int64")
    df["magnitude"] = df["magnitude"].astype("float64")
    df["vector_idx"] = df["vector_idx"].astype("Int64")
    for col in ("context_prompt", "assistant_response", "detection_question", "vector_set"):
        df[col] = df[col].fillna("").astype(str)
    if "answers" in df.columns:
        df["answers"] = df["answers"].fillna("yes-no").astype(str)
        bad = ~df["answers"].isin(list(ANSWER_PAIRS))
        if bad.any():
            row = int(bad.idxmax())
            raise IntrospectError(
                f"examples: row {row} field 'answers' is {df['answers'][row]!r}, not one of "
                f"{', '.join(ANSWER_PAIRS)}"
            )
    steered_without_vector = df["steered"] & df["vector_idx"].isna()
    if steered_without_vector.any():
        row = int(steered_without_vector.idxmax())
        raise IntrospectError(f"examples: row {row} is steered but has no 'vector_idx'")
    return df


def ask_in(df: pd.DataFrame, answers: str) -> pd.DataFrame:
    """The rows asked for the ``answers`` pair: questions rewritten by
    :func:`introspect.detection.ask_for` and the ``answers`` column set (yes/no rows as given)."""
    if answers == "yes-no":
        return df
    questions = [ask_for(q, answers) for q in df["detection_question"]]
    return df.assign(detection_question=questions, answers=answers)


def write_examples(df: pd.DataFrame, path: str | os.PathLike) -> None:
    """Write parquet atomically (temp file + rename)."""
    atomic_write(path, lambda tmp: df.to_parquet(tmp, index=False))


def row_steerings(
    df: pd.DataFrame, vector_sets: Mapping[str, VectorSet], n_layers: int, d_model: int
) -> list[Steering | None]:
    """Each row's steering (None for unsteered rows), its vector looked up and validated."""
    for vs in vector_sets.values():
        vs.check_model(d_model)
    out: list[Steering | None] = []
    for i, row in enumerate(df.itertuples(index=False)):
        if not row.steered:
            out.append(None)
            continue
        vs = vector_sets.get(row.vector_set)
        if vs is None:
            known = ", ".join(sorted(vector_sets)) or "none"
            raise IntrospectError(
                f"examples: row {i} uses vector_set '{row.vector_set}' but the vector files "
                f"given are: {known} (a set is named by its file's stem)"
            )
        idx = int(row.vector_idx)
        if not 0 <= idx < vs.vectors.shape[0]:
            raise IntrospectError(
                f"examples: row {i} vector_idx {idx} is outside '{vs.name}' "
                f"({vs.vectors.shape[0]} vectors)"
            )
        steering = Steering(vs.vectors[idx], row.layer_start, row.layer_end, row.magnitude)
        try:
            steering.validate(n_layers, d_model)
        except IntrospectError as e:
            raise IntrospectError(f"examples: row {i}: {e}") from None
        out.append(steering)
    return out


def _example(row, steering: Steering | None) -> DetectionExample:
    return DetectionExample(
        context_prompt=row.context_prompt,
        assistant_response=row.assistant_response,
        detection_question=row.detection_question,
        system_prompt=None if pd.isna(row.system_prompt) else row.system_prompt,
        steering=steering,
        answer_tokens=ANSWER_PAIRS[getattr(row, "answers", "yes-no")],
    )


def to_detection_examples(
    df: pd.DataFrame, vector_sets: Mapping[str, VectorSet], n_layers: int, d_model: int
) -> list[DetectionExample]:
    """Rows → trials. Steered rows look up their vector by ``vector_set`` and ``vector_idx``."""
    steerings = row_steerings(df, vector_sets, n_layers, d_model)
    return [_example(row, s) for row, s in zip(df.itertuples(index=False), steerings, strict=True)]


def tokenise_examples(tokenizer, df: pd.DataFrame, info_prompt: str | None = None) -> pd.DataFrame:
    """The rows with their token ids added (``prefix_ids``, ``suffix_ids``, ``answer_ids``).

    Text only: the steering stays in the row's columns and is attached by
    :func:`tokenised_prompts`, so this step needs no model and no vectors (Ray Data runs it in
    ``map_batches``).
    """
    prompts = [build_prompt(tokenizer, _example(row, None), info_prompt) for row in df.itertuples()]
    out = df.copy()
    for col in ("prefix_ids", "suffix_ids", "answer_ids"):
        out[col] = [list(getattr(p, col)) for p in prompts]
    return out


def tokenised_prompts(
    df: pd.DataFrame, vector_sets: Mapping[str, VectorSet], n_layers: int, d_model: int
) -> list[DetectionPrompt]:
    """Tokenised rows (see :func:`tokenise_examples`) → prompts with their steering attached."""
    steerings = row_steerings(df, vector_sets, n_layers, d_model)
    return [
        DetectionPrompt(
            prefix_ids=[int(t) for t in row.prefix_ids],
            suffix_ids=[int(t) for t in row.suffix_ids],
            answer_ids=tuple(int(t) for t in row.answer_ids),
            steering=s,
        )
        for row, s in zip(df.itertuples(index=False), steerings, strict=True)
    ]


def score_examples(
    lm: LoadedModel,
    df: pd.DataFrame,
    vector_sets: Mapping[str, VectorSet],
    batch_size: int = 16,
    info_prompt: str | None = None,
    progress: Callable[[int, int], None] | None = None,
    stats: bool = False,
) -> pd.DataFrame:
    """The scores table: the example columns plus ``p_yes`` and ``yes_no_mass`` (and with
    ``stats`` the answer position's :data:`introspect.detection.LOGIT_STATS`).

    ``progress(done, total)``: see :func:`introspect.detection.score_detection`."""
    examples = to_detection_examples(df, vector_sets, lm.n_layers, lm.d_model)
    scores = score_detection(
        lm.model, lm.tokenizer, examples, batch_size, info_prompt, progress, stats=stats
    )
    out = df.copy()
    out["p_yes"] = scores.p_yes
    out["yes_no_mass"] = scores.yes_no_mass
    for k, v in scores.stats.items():
        out[k] = v
    return out
