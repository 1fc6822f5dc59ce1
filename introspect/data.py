"""Example data for detection training, one variant per seed-002 run.

* ``original`` - half the rows steered with a training vector (``vector_idx < n_train``), in one
  of the early/middle/late thirds of the depth, at a magnitude from a list; label = steered.
* ``vague-prompt`` - as ``original`` but asked with vague questions that never mention steering.
* ``food-control`` - nothing steered; food vs non-food contexts; label = "is the text about food".
* ``flipped-labels`` - ``original`` with half of the labels flipped at random, steering unchanged:
  a model that learns this has learned something other than detection.

Magnitudes are absolute, or (``magnitude_mode="relative"``) factors of the mean residual norm of
the steered layers, since models differ in scale (SmolLM2-135M's norms grow from ~50 to ~680).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np
import pandas as pd

from introspect.errors import IntrospectError
from introspect.examples import COLUMNS
from introspect.vectors import VectorSet

VARIANTS = ("original", "vague-prompt", "food-control", "flipped-labels")
PROMPT_KEYS = (
    "context_prompts",
    "food_context_prompts",
    "assistant_responses",
    "detection_questions",
    "vague_questions",
    "food_question",
    "info_prompt",
)


@dataclass
class DataConfig:
    """How to draw one data set. Every field has a default; validated by :meth:`validate`."""

    variant: str = "original"
    n: int = 1000
    val_fraction: float = 0.1
    seed: int = 0
    steered_fraction: float = 0.5
    magnitudes: list[float] = field(default_factory=lambda: [5.0, 10.0, 20.0, 30.0])
    magnitude_mode: str = "absolute"  # or "relative": magnitudes are factors of the residual norm
    flip_fraction: float = 0.5

    def validate(self) -> None:
        if self.variant not in VARIANTS:
            raise IntrospectError(f"variant: {self.variant!r} is not one of {', '.join(VARIANTS)}")
        if self.n < 2:
            raise IntrospectError(f"n: {self.n} must be >= 2")
        if not 0.0 <= self.val_fraction < 1.0:
            raise IntrospectError(f"val_fraction: {self.val_fraction} must be in [0, 1)")
        if not 0.0 <= self.steered_fraction <= 1.0:
            raise IntrospectError(f"steered_fraction: {self.steered_fraction} must be in [0, 1]")
        if not self.magnitudes or any(m <= 0 for m in self.magnitudes):
            raise IntrospectError(f"magnitudes: {self.magnitudes} must be a non-empty list of > 0")
        if self.magnitude_mode not in ("absolute", "relative"):
            raise IntrospectError(
                f"magnitude_mode: {self.magnitude_mode!r} must be 'absolute' or 'relative'"
            )


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
    out = {}
    for start, end in ranges:
        scale = float(np.mean(norms[start:end]))
        out[(start, end)] = [round(f * scale, 3) for f in config.magnitudes]
    return out


def make_examples(
    config: DataConfig,
    n_layers: int,
    vectors: VectorSet,
    prompts: dict | None = None,
    norms: Sequence[float] | None = None,
) -> pd.DataFrame:
    """Draw ``config.n`` rows of the chosen variant; the same config gives the same rows."""
    config.validate()
    prompts = prompts or default_prompts()
    rng = np.random.default_rng(config.seed)
    n = config.n
    if vectors.n_train < 1 and config.variant != "food-control":
        raise IntrospectError(f"vectors: '{vectors.name}' has no training rows (n_train = 0)")

    if config.variant == "food-control":
        is_food = rng.permutation(np.arange(n) < n // 2)
        food, other = prompts["food_context_prompts"], prompts["context_prompts"]
        contexts = [
            food[rng.integers(len(food))] if f else other[rng.integers(len(other))] for f in is_food
        ]
        rows = {
            "steered": np.zeros(n, dtype=bool),
            "vector_idx": [None] * n,
            "layer_start": np.zeros(n, dtype=np.int64),
            "layer_end": np.zeros(n, dtype=np.int64),
            "magnitude": np.zeros(n),
            "context_prompt": contexts,
            "detection_question": [prompts["food_question"]] * n,
            "label": is_food,
        }
    else:
        steered = rng.permutation(np.arange(n) < round(n * config.steered_fraction))
        ranges = list(layer_ranges(n_layers).values())
        mags = absolute_magnitudes(config, n_layers, norms)
        questions = prompts[
            "vague_questions" if config.variant == "vague-prompt" else "detection_questions"
        ]
        r_idx = rng.integers(len(ranges), size=n)
        m_idx = rng.integers(len(config.magnitudes), size=n)
        v_idx = rng.integers(vectors.n_train, size=n)
        starts = np.array([ranges[i][0] for i in r_idx])
        ends = np.array([ranges[i][1] for i in r_idx])
        magnitude = np.array([mags[ranges[r]][m] for r, m in zip(r_idx, m_idx, strict=True)])
        label = steered.copy()
        if config.variant == "flipped-labels":
            label ^= rng.random(n) < config.flip_fraction
        rows = {
            "steered": steered,
            "vector_idx": [int(v) if s else None for v, s in zip(v_idx, steered, strict=True)],
            "layer_start": np.where(steered, starts, 0),
            "layer_end": np.where(steered, ends, 0),
            "magnitude": np.where(steered, magnitude, 0.0),
            "context_prompt": [
                prompts["context_prompts"][i]
                for i in rng.integers(len(prompts["context_prompts"]), size=n)
            ],
            "detection_question": [questions[i] for i in rng.integers(len(questions), size=n)],
            "label": label,
        }
    replies = prompts["assistant_responses"]
    df = pd.DataFrame(rows)
    df.insert(1, "vector_set", vectors.name)
    df["vector_idx"] = df["vector_idx"].astype("Int64")
    df["assistant_response"] = [replies[i] for i in rng.integers(len(replies), size=n)]
    df["system_prompt"] = None
    df["variant"] = config.variant
    return df[list(COLUMNS)]


def split(df: pd.DataFrame, val_fraction: float, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Seeded random train/validation split, stratified by label so both keep the balance."""
    rng = np.random.default_rng(seed + 1)
    val_idx = []
    for _, group in df.groupby("label"):
        k = round(len(group) * val_fraction)
        val_idx.extend(rng.choice(group.index.to_numpy(), size=k, replace=False).tolist())
    is_val = df.index.isin(val_idx)
    return df[~is_val].reset_index(drop=True), df[is_val].reset_index(drop=True)
