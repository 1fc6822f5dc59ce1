"""Detection metrics for binary yes/no judgements: "was my activation steered?".

Steered trials are the positive class. Everything here is plain numpy/scipy so it can run
anywhere (no torch, no Ray) and be checked against textbook formulas.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np
from scipy.stats import norm, rankdata

from introspect.errors import IntrospectError

Z_95 = 1.959963984540054  # Φ⁻¹(0.975)
NAN = float("nan")


def wilson_interval(successes: int, n: int, z: float = Z_95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (95% by default).

    Preferred over the normal (Wald) interval because it stays inside [0, 1] and keeps
    sensible coverage at small n and at rates near 0 or 1. Returns (nan, nan) when n == 0.
    """
    if n < 0 or not 0 <= successes <= n:
        raise IntrospectError(f"wilson_interval: need 0 <= successes <= n, got {successes}/{n}")
    if n == 0:
        return (NAN, NAN)
    p = successes / n
    z2 = z * z
    denom = 1.0 + z2 / n
    centre = (p + z2 / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / denom
    # At 0/n and n/n the bound is exactly 0 or 1 analytically; set it so rounding cannot leave
    # 0.9999999999999999 or a tiny negative.
    lo = 0.0 if successes == 0 else centre - half
    hi = 1.0 if successes == n else centre + half
    return (lo, hi)


def d_prime(hits: int, n_signal: int, false_alarms: int, n_noise: int) -> float:
    """Sensitivity d′ = Φ⁻¹(H) − Φ⁻¹(F) with the log-linear correction (Hautus 1995).

    The rates are always corrected, not only when they hit 0 or 1:

        H = (hits + 0.5) / (n_signal + 1)
        F = (false_alarms + 0.5) / (n_noise + 1)

    This keeps d′ finite for perfect scores without hard clipping (e.g. to [0.01, 0.99]),
    and applying it to every cell avoids a discontinuity between 0 and 1 false alarms.
    The correction is slightly conservative (biases d′ towards 0). Returns nan when either
    class has no trials, since there is then no rate to compare.
    """
    if not 0 <= hits <= n_signal or not 0 <= false_alarms <= n_noise:
        raise IntrospectError(
            f"d_prime: need 0 <= hits <= n_signal and 0 <= false_alarms <= n_noise, "
            f"got {hits}/{n_signal} and {false_alarms}/{n_noise}"
        )
    if n_signal == 0 or n_noise == 0:
        return NAN
    hit_rate = (hits + 0.5) / (n_signal + 1)
    fa_rate = (false_alarms + 0.5) / (n_noise + 1)
    return float(norm.ppf(hit_rate) - norm.ppf(fa_rate))


def auroc(
    scores_pos: Sequence[float] | np.ndarray, scores_neg: Sequence[float] | np.ndarray
) -> float:
    """Area under the ROC curve: P(score_pos > score_neg), ties counted 1/2.

    Computed as Mann–Whitney U / (n_pos · n_neg) via average ranks, which gives ties exactly
    half credit in O(n log n) instead of comparing every pair. nan if either side is empty.
    """
    pos = np.asarray(scores_pos, dtype=float).ravel()
    neg = np.asarray(scores_neg, dtype=float).ravel()
    if pos.size == 0 or neg.size == 0:
        return NAN
    ranks = rankdata(np.concatenate([pos, neg]))
    u = ranks[: pos.size].sum() - pos.size * (pos.size + 1) / 2
    return float(u / (pos.size * neg.size))


def bootstrap_ci(
    fn: Callable[[np.ndarray, np.ndarray], float],
    labels: Sequence[Any] | np.ndarray,
    scores: Sequence[float] | np.ndarray,
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
) -> tuple[float, float]:
    """Stratified percentile bootstrap interval for a statistic ``fn(labels, scores)``.

    Positives and negatives are resampled separately, each to its own original size, so every
    resample keeps both classes and the class balance of the data; otherwise a resample with
    no positives (likely when positives are rare) would make d′ or AUROC undefined.
    ``fn`` gets a boolean label array and a float score array of the original length.
    Returns (nan, nan) if either class is missing or no resample gives a finite value.
    """
    if n_boot < 1 or not 0 < alpha < 1:
        raise IntrospectError(
            f"bootstrap_ci: need n_boot >= 1 and 0 < alpha < 1, got {n_boot}, {alpha}"
        )
    y = np.asarray(labels).astype(bool).ravel()
    s = np.asarray(scores, dtype=float).ravel()
    if y.size != s.size:
        raise IntrospectError(f"bootstrap_ci: {y.size} labels but {s.size} scores")
    pos, neg = s[y], s[~y]
    if pos.size == 0 or neg.size == 0:
        return (NAN, NAN)

    # Draw every resample's indices in one call; only the statistic itself is looped over.
    rng = np.random.default_rng(seed)
    pos_draws = pos[rng.integers(0, pos.size, size=(n_boot, pos.size))]
    neg_draws = neg[rng.integers(0, neg.size, size=(n_boot, neg.size))]
    boot_scores = np.concatenate([pos_draws, neg_draws], axis=1)
    # Positives first, then negatives, in every resample, so one label array serves them all.
    boot_labels = np.concatenate([np.ones(pos.size, bool), np.zeros(neg.size, bool)])

    stats = np.array([fn(boot_labels, row) for row in boot_scores], dtype=float)
    stats = stats[np.isfinite(stats)]
    if stats.size == 0:
        return (NAN, NAN)
    lo, hi = np.quantile(stats, [alpha / 2, 1 - alpha / 2])
    return (float(lo), float(hi))


@dataclass(frozen=True)
class DetectionMetrics:
    """Summary of one detection experiment; ``ci`` holds 95% intervals keyed by metric name."""

    accuracy: float
    tpr: float
    fpr: float
    d_prime: float
    auroc: float
    n_steered: int
    n_unsteered: int
    mean_p_yes_steered: float
    mean_p_yes_unsteered: float
    ci: dict[str, tuple[float, float]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Plain Python types for JSON: floats, ints, and intervals as 2-element lists."""
        out: dict[str, Any] = {}
        for f in fields(self):
            if f.name != "ci":
                value = getattr(self, f.name)
                out[f.name] = int(value) if f.name.startswith("n_") else float(value)
        out["ci"] = {k: [float(lo), float(hi)] for k, (lo, hi) in self.ci.items()}
        return out


def _d_prime_at(threshold: float) -> Callable[[np.ndarray, np.ndarray], float]:
    """d′ of the thresholded yes/no decisions, as a statistic for bootstrap_ci."""

    def stat(labels: np.ndarray, p_yes: np.ndarray) -> float:
        said_yes = p_yes > threshold
        return d_prime(
            int(said_yes[labels].sum()),
            int(labels.sum()),
            int(said_yes[~labels].sum()),
            int((~labels).sum()),
        )

    return stat


def _auroc_stat(labels: np.ndarray, p_yes: np.ndarray) -> float:
    return auroc(p_yes[labels], p_yes[~labels])


def detection_metrics(
    labels: Sequence[Any] | np.ndarray,
    p_yes: Sequence[float] | np.ndarray,
    threshold: float = 0.5,
    n_boot: int = 1000,
    seed: int = 0,
) -> DetectionMetrics:
    """Accuracy, TPR, FPR, d′ and AUROC of yes/no "was I steered?" judgements.

    ``labels``: truthy = steered (positive class). ``p_yes``: the model's probability of
    answering yes; a trial counts as a "yes" iff p_yes > threshold. Accuracy, TPR and FPR get
    Wilson intervals; d′ (thresholded, log-linear corrected) and AUROC (threshold-free, on
    p_yes) get stratified bootstrap intervals. If a class is missing, the metrics that need it
    are nan rather than an error, so partial runs can still be summarised.
    """
    y = np.asarray(labels).astype(bool).ravel()
    p = np.asarray(p_yes, dtype=float).ravel()
    if y.size != p.size:
        raise IntrospectError(
            f"detection_metrics: labels and p_yes must have the same length, "
            f"got {y.size} and {p.size}"
        )
    if y.size == 0:
        raise IntrospectError("detection_metrics: labels and p_yes are empty; need >= 1 trial")
    if not np.all(np.isfinite(p)):
        raise IntrospectError("detection_metrics: p_yes contains nan or inf")

    said_yes = p > threshold
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    hits = int(said_yes[y].sum())
    false_alarms = int(said_yes[~y].sum())
    correct = hits + (n_neg - false_alarms)

    ci = {
        "accuracy": wilson_interval(correct, y.size),
        "tpr": wilson_interval(hits, n_pos),
        "fpr": wilson_interval(false_alarms, n_neg),
        "d_prime": bootstrap_ci(_d_prime_at(threshold), y, p, n_boot=n_boot, seed=seed),
        "auroc": bootstrap_ci(_auroc_stat, y, p, n_boot=n_boot, seed=seed),
    }
    return DetectionMetrics(
        accuracy=correct / y.size,
        tpr=hits / n_pos if n_pos else NAN,
        fpr=false_alarms / n_neg if n_neg else NAN,
        d_prime=d_prime(hits, n_pos, false_alarms, n_neg),
        auroc=auroc(p[y], p[~y]),
        n_steered=n_pos,
        n_unsteered=n_neg,
        mean_p_yes_steered=float(p[y].mean()) if n_pos else NAN,
        mean_p_yes_unsteered=float(p[~y].mean()) if n_neg else NAN,
        ci=ci,
    )


def roc_curve(labels, scores) -> tuple[np.ndarray, np.ndarray]:
    """False- and true-positive rates at every distinct threshold, from (0, 0) to (1, 1)."""
    y = np.asarray(labels, dtype=bool)
    s = np.asarray(scores, dtype=float)
    order = np.argsort(-s, kind="mergesort")
    y, s = y[order], s[order]
    # One point per distinct score: ties move together.
    last = np.r_[np.nonzero(np.diff(s))[0], len(s) - 1]
    tp = np.cumsum(y)[last]
    fp = np.cumsum(~y)[last]
    n_pos, n_neg = max(int(y.sum()), 1), max(int((~y).sum()), 1)
    return np.r_[0.0, fp / n_neg], np.r_[0.0, tp / n_pos]
