"""Baseline study (seed 004, step 2): does the untrained model say "yes" more when steered?

Every steered trial (vector × layer range × magnitude, with drawn texts) has an unsteered twin
with the same context, reply and question, so steered and unsteered trials are balanced in every
cell and the comparison is paired.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from introspect.data import Magnitudes, absolute_magnitudes, range_name
from introspect.errors import IntrospectError
from introspect.examples import examples_frame, twin_rows
from introspect.io import atomic_write, write_json, write_text
from introspect.metrics import auroc, detection_metrics
from introspect.vectors import VectorSet


def baseline_trials(
    vectors: VectorSet,
    n_vectors: int,
    n_layers: int,
    prompts: dict,
    magnitudes: Sequence[float] = (5.0, 10.0, 20.0, 30.0),
    magnitude_mode: str = "absolute",
    norms: Sequence[float] | None = None,
    seed: int = 0,
) -> pd.DataFrame:
    """Steered trials for the first ``n_vectors`` vectors in every cell, each with a twin."""
    if not 1 <= n_vectors <= vectors.vectors.shape[0]:
        raise IntrospectError(
            f"n_vectors: {n_vectors} must be within [1, {vectors.vectors.shape[0]}] for "
            f"'{vectors.name}'"
        )
    config = Magnitudes(magnitudes=list(magnitudes), magnitude_mode=magnitude_mode)
    mags = absolute_magnitudes(config, n_layers, norms)
    rng = np.random.default_rng(seed)
    keys = ("context_prompts", "assistant_responses", "detection_questions")
    rows = []
    for v in range(n_vectors):
        for (start, end), cell_mags in mags.items():
            for magnitude in cell_mags:
                texts = [prompts[k][rng.integers(len(prompts[k]))] for k in keys]
                rows += twin_rows(vectors.name, v, start, end, magnitude, *texts, "baseline")
    return examples_frame(rows)


def baseline_table(scores: pd.DataFrame, n_layers: int) -> pd.DataFrame:
    """Per layer range × magnitude: mean p_yes steered vs unsteered twins, AUROC, accuracy."""
    cells = []
    keys = ["layer_start", "layer_end", "magnitude"]
    for (start, end, magnitude), cell in scores.groupby(keys, sort=True):
        s = cell[cell.steered]
        u = cell[~cell.steered]
        correct = np.concatenate([s.p_yes > 0.5, u.p_yes <= 0.5])
        cells.append(
            {
                "layers": range_name(n_layers, start, end),
                "layer_start": int(start),
                "layer_end": int(end),
                "magnitude": float(magnitude),
                "n_steered": len(s),
                "n_unsteered": len(u),
                "p_yes_steered": float(s.p_yes.mean()),
                "p_yes_unsteered": float(u.p_yes.mean()),
                "delta": float(s.p_yes.mean() - u.p_yes.mean()),
                "auroc": auroc(s.p_yes.to_numpy(), u.p_yes.to_numpy()),
                "accuracy": float(correct.mean()),
                "mass_steered": float(s.yes_no_mass.mean()),
                "mass_unsteered": float(u.yes_no_mass.mean()),
            }
        )
    return pd.DataFrame(cells)


def write_baseline(
    out: str | os.PathLike, scores: pd.DataFrame, table: pd.DataFrame, config: dict
) -> dict:
    """Write scores.parquet, table.csv, table.md, baseline.json and heatmap.png into ``out``."""
    from introspect.examples import write_examples
    from introspect.plots import range_magnitude_heatmap

    out = Path(out)
    write_examples(scores, out / "scores.parquet")
    atomic_write(out / "table.csv", lambda tmp: table.to_csv(tmp, index=False))
    write_text(out / "table.md", markdown_table(table))
    overall = detection_metrics(scores.steered.to_numpy(), scores.p_yes.to_numpy())
    summary = {"config": config, "overall": overall.to_dict(), "cells": table.to_dict("records")}
    write_json(out / "baseline.json", summary)
    range_magnitude_heatmap(
        table,
        "delta",
        out / "heatmap.png",
        title=f"Baseline: mean p_yes(steered) - p_yes(unsteered)\n{config.get('model', '')}",
        center=0.0,
        fmt="{:+.2f}",
    )
    return summary


def markdown_table(table: pd.DataFrame) -> str:
    """The baseline table as GitHub markdown (for the README and the report)."""
    head = (
        "| layers | magnitude | p_yes steered | p_yes unsteered | Δ | AUROC | acc "
        "| yes+no mass (s/u) |\n|---|---:|---:|---:|---:|---:|---:|---:|\n"
    )
    lines = [
        f"| {r.layers} [{r.layer_start},{r.layer_end}) | {r.magnitude:g} | {r.p_yes_steered:.3f} | "
        f"{r.p_yes_unsteered:.3f} | {r.delta:+.3f} | {r.auroc:.3f} | {r.accuracy:.3f} | "
        f"{r.mass_steered:.3f} / {r.mass_unsteered:.3f} |"
        for r in table.itertuples()
    ]
    return head + "\n".join(lines) + "\n"
