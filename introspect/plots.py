"""Plots written as PNG files (matplotlib, no display needed)."""

from __future__ import annotations

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402


def heatmap(
    pivot: pd.DataFrame,
    path: str | os.PathLike,
    title: str,
    xlabel: str,
    ylabel: str,
    center: float | None = None,
    fmt: str = "{:+.2f}",
) -> None:
    """A labelled heatmap of a pivot table, each cell annotated with its value."""
    values = pivot.to_numpy(dtype=float)
    fig, ax = plt.subplots(figsize=(1.4 * values.shape[1] + 2.5, 0.8 * values.shape[0] + 1.8))
    if center is not None:
        span = np.nanmax(np.abs(values - center)) or 1.0
        im = ax.imshow(values, cmap="RdBu_r", vmin=center - span, vmax=center + span)
    else:
        im = ax.imshow(values, cmap="viridis")
    ax.set_xticks(
        range(values.shape[1]),
        [f"{c:g}" if isinstance(c, float) else str(c) for c in pivot.columns],
    )
    ax.set_yticks(range(values.shape[0]), [str(i) for i in pivot.index])
    for i in range(values.shape[0]):
        for j in range(values.shape[1]):
            if np.isfinite(values[i, j]):
                ax.text(j, i, fmt.format(values[i, j]), ha="center", va="center", fontsize=9)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax, shrink=0.8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
