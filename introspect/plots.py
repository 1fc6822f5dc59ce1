"""Plots written as PNG files (matplotlib, no display needed)."""

from __future__ import annotations

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from introspect.io import atomic_write  # noqa: E402


def _save(fig, path: str | os.PathLike) -> None:
    """The figure as a PNG, written atomically; the figure is closed either way."""
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    finally:
        plt.close(fig)


def heatmap(
    pivot: pd.DataFrame,
    path: str | os.PathLike,
    title: str,
    xlabel: str,
    ylabel: str,
    center: float | None = None,
    fmt: str = "{:+.2f}",
    labels: pd.DataFrame | None = None,
    span: float | None = None,
) -> None:
    """A labelled heatmap of a pivot table, each cell annotated with its value.

    ``labels`` (same shape as ``pivot``) replaces the cell text; otherwise ``fmt`` of the value.
    With ``center``, the colour scale is ``center ± span`` (default: the largest deviation),
    so a bounded value (an accuracy: 0.5 ± 0.5) keeps its scale whatever the cells hold.
    """
    values = pivot.to_numpy(dtype=float)
    fig, ax = plt.subplots(figsize=(1.4 * values.shape[1] + 2.5, 0.8 * values.shape[0] + 1.8))
    if center is not None:
        span = span or np.nanmax(np.abs(values - center)) or 1.0
        im = ax.imshow(values, cmap="RdBu_r", vmin=center - span, vmax=center + span)
    else:
        im = ax.imshow(values, cmap="viridis")
    columns = [f"{c:g}" if isinstance(c, float) else str(c) for c in pivot.columns]
    ax.set_xticks(range(values.shape[1]), columns)
    ax.set_yticks(range(values.shape[0]), [str(i) for i in pivot.index])
    for i in range(values.shape[0]):
        for j in range(values.shape[1]):
            if np.isfinite(values[i, j]):
                r, g, b, _ = im.cmap(im.norm(values[i, j]))
                ink = "white" if 0.299 * r + 0.587 * g + 0.114 * b < 0.5 else "black"
                text = fmt.format(values[i, j]) if labels is None else labels.iloc[i, j]
                ax.text(j, i, text, ha="center", va="center", fontsize=8, color=ink)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax, shrink=0.8)
    fig.tight_layout()
    _save(fig, path)


def roc_curves(scores: pd.DataFrame, path: str | os.PathLike, title: str = "ROC") -> None:
    """One ROC curve per tier (``tier``, ``label``, ``p_yes`` columns), AUROC in the legend."""
    from introspect.metrics import auroc, roc_curve

    fig, ax = plt.subplots(figsize=(5.2, 5))
    for tier, df in scores.groupby("tier", sort=False):
        y, p = df["label"].to_numpy(bool), df["p_yes"].to_numpy(float)
        fpr, tpr = roc_curve(y, p)
        ax.plot(fpr, tpr, label=f"{tier} (AUROC {auroc(p[y], p[~y]):.3f})")
    ax.plot([0, 1], [0, 1], ls=":", c="grey", lw=1)
    ax.set_xlabel("false-positive rate")
    ax.set_ylabel("true-positive rate")
    ax.set_title(title, fontsize=10)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    _save(fig, path)


def p_yes_histograms(scores: pd.DataFrame, path: str | os.PathLike, title: str = "p_yes") -> None:
    """Per tier, the p_yes distributions of steered vs unsteered trials."""
    tiers = list(dict.fromkeys(scores["tier"]))
    fig, axes = plt.subplots(1, len(tiers), figsize=(4 * len(tiers), 3.3), squeeze=False)
    bins = np.linspace(0, 1, 26)
    for ax, tier in zip(axes[0], tiers, strict=True):
        df = scores[scores["tier"] == tier]
        steered = df["steered"]
        ax.hist(df.loc[steered, "p_yes"], bins=bins, alpha=0.6, label="steered", color="C3")
        ax.hist(df.loc[~steered, "p_yes"], bins=bins, alpha=0.6, label="unsteered", color="C0")
        ax.axvline(0.5, c="k", lw=0.8, ls=":")
        ax.set_title(tier, fontsize=10)
        ax.set_xlabel("p_yes")
    axes[0][0].set_ylabel("trials")
    axes[0][0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    _save(fig, path)


def range_magnitude_heatmap(
    cells: pd.DataFrame,
    value: str,
    path: str | os.PathLike,
    title: str,
    center: float | None = None,
    fmt: str = "{:.2f}",
    span: float | None = None,
) -> None:
    """Layer range × magnitude heatmap of ``cells[value]``.

    Columns are magnitude levels within each range (1 = weakest), because with magnitudes
    relative to the residual norm each range has its own values; each cell shows its value and
    the magnitude it stands for. ``cells`` needs ``layers``, ``layer_start`` and ``magnitude``.
    """
    cells = cells.sort_values(["layer_start", "magnitude"]).copy()
    cells["level"] = cells.groupby("layers")["magnitude"].rank(method="dense").astype(int)
    counts = cells["n"] if "n" in cells else [None] * len(cells)
    cells["text"] = [
        f"{fmt.format(v)}\n(m={m:.3g}" + (")" if n is None else f", n={n})")
        for v, m, n in zip(cells[value], cells["magnitude"], counts, strict=True)
    ]
    rows = list(dict.fromkeys(cells["layers"]))
    # dropna=False: a cell the mass filter emptied (nan) stays in the grid, blank
    pivot = cells.pivot_table(
        index="layers", columns="level", values=value, sort=False, dropna=False
    ).loc[rows]
    labels = cells.pivot(index="layers", columns="level", values="text").loc[rows, pivot.columns]
    heatmap(
        pivot,
        path,
        title=title,
        xlabel="magnitude level within the range (1 = weakest)",
        ylabel="layer range",
        center=center,
        labels=labels.fillna(""),
        span=span,
    )
