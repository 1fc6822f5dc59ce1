"""The examples file: reading, validating, writing, and turning rows into detection trials.

Columns (DESIGN.md): ``steered`` bool, ``vector_set`` str, ``vector_idx`` int|null,
``layer_start`` int, ``layer_end`` int (exclusive), ``magnitude`` float, ``context_prompt``,
``assistant_response``, ``detection_question``, ``system_prompt`` (nullable), ``label`` bool,
``variant`` str. Parquet, or JSONL for hand-made files, where ``system_prompt``, ``label`` (=
``steered``) and ``variant`` may be left out.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

import pandas as pd

from introspect.detection import DetectionExample, score_detection
from introspect.errors import IntrospectError
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
    if "system_prompt" not in df.columns:
        df["system_prompt"] = None
    if "label" not in df.columns:
        df["label"] = df["steered"]
    if "variant" not in df.columns:
        df["variant"] = "custom"
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
    steered_without_vector = df["steered"] & df["vector_idx"].isna()
    if steered_without_vector.any():
        row = int(steered_without_vector.idxmax())
        raise IntrospectError(f"examples: row {row} is steered but has no 'vector_idx'")
    return df


def write_examples(df: pd.DataFrame, path: str | os.PathLike) -> None:
    """Write parquet atomically (temp file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        df.to_parquet(tmp, index=False)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def to_detection_examples(
    df: pd.DataFrame, vector_sets: Mapping[str, VectorSet], n_layers: int, d_model: int
) -> list[DetectionExample]:
    """Rows → trials. Steered rows look up their vector by ``vector_set`` and ``vector_idx``."""
    for vs in vector_sets.values():
        vs.check_model(d_model)
    out = []
    for i, row in enumerate(df.itertuples(index=False)):
        steering = None
        if row.steered:
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
        out.append(
            DetectionExample(
                context_prompt=row.context_prompt,
                assistant_response=row.assistant_response,
                detection_question=row.detection_question,
                system_prompt=None if pd.isna(row.system_prompt) else row.system_prompt,
                steering=steering,
            )
        )
    return out


def score_examples(
    lm: LoadedModel,
    df: pd.DataFrame,
    vector_sets: Mapping[str, VectorSet],
    batch_size: int = 16,
    info_prompt: str | None = None,
    progress: bool = False,
) -> pd.DataFrame:
    """The scores table: the example columns plus ``p_yes`` and ``yes_no_mass``."""
    examples = to_detection_examples(df, vector_sets, lm.n_layers, lm.d_model)
    scores = score_detection(lm.model, lm.tokenizer, examples, batch_size, info_prompt, progress)
    out = df.copy()
    out["p_yes"] = scores.p_yes
    out["yes_no_mass"] = scores.yes_no_mass
    return out
