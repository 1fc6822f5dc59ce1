"""Example data for detection training, one variant per seed-002 run.

* ``original`` - half the rows steered with a training vector (``vector_idx < n_train``), in one
  of the early/middle/late thirds of the depth, at a magnitude from a list; label = steered.
* ``vague-prompt`` - as ``original`` but asked with vague questions that never mention steering.
* ``food-control`` - nothing steered; food vs non-food contexts; label = "is the text about food".
* ``flipped-labels`` - ``original`` with half of the labels flipped at random, steering unchanged:
  a model that learns this has learned something other than detection.

Magnitudes are factors of the mean residual norm of the steered layers (the default), or absolute
(``magnitude_mode="absolute"``; the reference's 5/10/20/30 when none are given), since models
differ in scale (SmolLM2-135M's norms grow from ~50 to ~680).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import pandas as pd
from pydantic import Field, model_validator

from introspect.config import Config, SystemPrompt
from introspect.detection import ANSWER_PAIRS
from introspect.errors import IntrospectError
from introspect.examples import COLUMNS, ask_in
from introspect.vectors import VectorSet

PROMPT_KEYS = (
    "context_prompts",
    "food_context_prompts",
    "assistant_responses",
    "detection_questions",
    "vague_questions",
    "food_question",
    "info_prompt",
)
REFERENCE_MAGNITUDES = [5.0, 10.0, 20.0, 30.0]  # the reference's absolute magnitudes
RELATIVE_MAGNITUDES = [0.05, 0.1, 0.2, 0.3]  # factors of the layer range's residual norm


class Magnitudes(Config):
    """Steering strengths: factors of each layer range's mean residual norm (the default, which
    works on any model), or absolute norms. ``magnitude_mode: absolute`` with no magnitudes
    given is the reference's 5/10/20/30, for replication."""

    magnitudes: list[Annotated[float, Field(gt=0)]] = Field(
        RELATIVE_MAGNITUDES,
        min_length=1,
        description="steering magnitudes (relative: factors of the residual norm)",
    )
    magnitude_mode: Literal["relative", "absolute"] = Field(
        "relative", description="relative (factors of the residual norm) or absolute"
    )

    @model_validator(mode="before")
    @classmethod
    def _reference_magnitudes(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("magnitude_mode") == "absolute":
            return {"magnitudes": REFERENCE_MAGNITUDES, **data}
        return data


class Answers(Config):
    """The answer pair the detection question asks for."""

    answers: Literal[tuple(ANSWER_PAIRS)] = Field(  # type: ignore[valid-type]
        "yes-no",
        description="answer pair: yes-no, or red-blue (a neutral pair: the question ends "
        "'Answer Red if yes and Blue if no.' and P(yes) is read as P(Red))",
    )


class DataConfig(Answers, Magnitudes, SystemPrompt):
    """How to draw one data set."""

    variant: Literal["original", "vague-prompt", "food-control", "flipped-labels"] = Field(
        "original", description="seed 002's data variant"
    )
    n: int = Field(1000, ge=2, description="examples (train + validation)")
    val_fraction: float = Field(0.1, ge=0, lt=1, description="share held out for validation")
    seed: int = Field(0, description="random seed")
    steered_fraction: float = Field(0.5, ge=0, le=1, description="share of steered examples")
    flip_fraction: float = Field(0.5, ge=0, le=1, description="flipped-labels: share flipped")


def _read_json(path) -> dict:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise IntrospectError(f"prompts: {path} is not a readable JSON file ({e})") from None
    if not isinstance(data, dict):
        raise IntrospectError(f"prompts: {path} must hold a JSON object")
    unknown = set(data) - set(PROMPT_KEYS)
    if unknown:
        raise IntrospectError(f"prompts: unknown key '{sorted(unknown)[0]}' in {path}")
    return data


def _checked(data: dict) -> dict:
    for key in PROMPT_KEYS:
        value = data.get(key)
        if key in ("food_question", "info_prompt"):
            if not isinstance(value, str) or not value:
                raise IntrospectError(f"prompts: '{key}' must be a non-empty string")
        elif not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
            raise IntrospectError(f"prompts: '{key}' must be a non-empty list of strings")
    return data


def default_prompts() -> dict:
    """Our shipped contexts, replies and questions (introspect/resources/prompts.json)."""
    return _checked(_read_json(resources.files("introspect") / "resources" / "prompts.json"))


def read_prompts(path) -> dict:
    """A prompts file with any of PROMPT_KEYS; keys left out fall back to the shipped text."""
    return _checked({**default_prompts(), **_read_json(path)})


def layer_ranges(n_layers: int) -> dict[str, tuple[int, int]]:
    """Early / middle / late thirds of the depth, leaving out the last layer.

    The last layer's output feeds no later layer's keys or values, so steering it cannot reach the
    KV cache. For 64 layers this gives [0,21), [21,42), [42,63), the reference ranges.
    """
    if n_layers < 4:
        raise IntrospectError(f"model: {n_layers} layers is too few for early/middle/late ranges")
    usable = n_layers - 1
    cuts = [round(i * usable / 3) for i in range(4)]
    return {name: (cuts[i], cuts[i + 1]) for i, name in enumerate(("early", "middle", "late"))}


def range_name(n_layers: int, start: int, end: int) -> str:
    """'early'/'middle'/'late' for a standard range, else 'L{start}-{end}'."""
    for name, r in layer_ranges(n_layers).items():
        if r == (start, end):
            return name
    return f"L{start}-{end}"


def absolute_magnitudes(
    config: DataConfig, n_layers: int, norms: Sequence[float] | None
) -> dict[tuple[int, int], list[float]]:
    """Magnitudes per layer range: the list itself, or factors × the range's mean residual norm."""
    ranges = layer_ranges(n_layers).values()
    if config.magnitude_mode == "absolute":
        return {r: list(config.magnitudes) for r in ranges}
    if norms is None or len(norms) != n_layers:
        raise IntrospectError("magnitude_mode: 'relative' needs the model's per-layer norms")
    scales = {(start, end): float(np.mean(norms[start:end])) for start, end in ranges}
    return {r: [round(f * scale, 3) for f in config.magnitudes] for r, scale in scales.items()}


def make_examples(
    config: DataConfig,
    n_layers: int,
    vectors: VectorSet,
    prompts: dict | None = None,
    norms: Sequence[float] | None = None,
) -> pd.DataFrame:
    """Draw ``config.n`` rows of the chosen variant; the same config gives the same rows."""
    prompts = prompts or default_prompts()
    rng = np.random.default_rng(config.seed)
    n = config.n
    if vectors.n_train < 1 and config.variant != "food-control":
        raise IntrospectError(f"vectors: '{vectors.name}' has no training rows (n_train = 0)")

    if config.variant == "food-control":
        label = rng.permutation(np.arange(n) < n // 2)  # is the context about food
        food, other = prompts["food_context_prompts"], prompts["context_prompts"]
        contexts = [
            food[rng.integers(len(food))] if f else other[rng.integers(len(other))] for f in label
        ]
        steered = np.zeros(n, dtype=bool)
        vector_idx = [None] * n
        starts = ends = np.zeros(n, dtype=np.int64)
        magnitude = np.zeros(n)
        questions = [prompts["food_question"]] * n
    else:
        steered = rng.permutation(np.arange(n) < round(n * config.steered_fraction))
        ranges = list(layer_ranges(n_layers).values())
        mags = absolute_magnitudes(config, n_layers, norms)
        r_idx = rng.integers(len(ranges), size=n)
        m_idx = rng.integers(len(config.magnitudes), size=n)
        v_idx = rng.integers(vectors.n_train, size=n)
        vector_idx = [int(v) if s else None for v, s in zip(v_idx, steered, strict=True)]
        starts = np.where(steered, [ranges[i][0] for i in r_idx], 0)
        ends = np.where(steered, [ranges[i][1] for i in r_idx], 0)
        magnitude = [mags[ranges[r]][m] for r, m in zip(r_idx, m_idx, strict=True)]
        magnitude = np.where(steered, magnitude, 0.0)
        label = steered.copy()
        if config.variant == "flipped-labels":
            label ^= rng.random(n) < config.flip_fraction
        other = prompts["context_prompts"]
        contexts = [other[i] for i in rng.integers(len(other), size=n)]
        asked = prompts[
            "vague_questions" if config.variant == "vague-prompt" else "detection_questions"
        ]
        questions = [asked[i] for i in rng.integers(len(asked), size=n)]
    rows = {
        "steered": steered,
        "vector_idx": vector_idx,
        "layer_start": starts,
        "layer_end": ends,
        "magnitude": magnitude,
        "context_prompt": contexts,
        "detection_question": questions,
        "label": label,
    }
    replies = prompts["assistant_responses"]
    df = pd.DataFrame(rows)
    df.insert(1, "vector_set", vectors.name)
    df["vector_idx"] = df["vector_idx"].astype("Int64")
    df["assistant_response"] = [replies[i] for i in rng.integers(len(replies), size=n)]
    df["system_prompt"] = config.system_prompt
    df["variant"] = config.variant
    return ask_in(df[list(COLUMNS)], config.answers)


def split(df: pd.DataFrame, val_fraction: float, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Seeded random train/validation split, stratified by label so both keep the balance."""
    rng = np.random.default_rng(seed + 1)
    val_idx = []
    for _, group in df.groupby("label"):
        k = round(len(group) * val_fraction)
        val_idx.extend(rng.choice(group.index.to_numpy(), size=k, replace=False).tolist())
    is_val = df.index.isin(val_idx)
    return df[~is_val].reset_index(drop=True), df[is_val].reset_index(drop=True)
