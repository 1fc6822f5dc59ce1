"""The logit-shift baseline: can a probe that reads only the output's shape tell steered caches?

Hahami et al. (arXiv 2512.12411) and Sridharan ("Introspection or entropy?") argue that binary
steering detection is explained by a global shift of the logits. If so, a simple classifier on
statistics of the next-token distribution after an *unrelated* question, asked over the same
steered cache, should separate steered from unsteered caches about as well as the model's own
answer to "were your activations modified?" does. This module is that classifier: a logistic
regression on standardised features, scored out of fold, with folds grouped (by question) so
that no group is both trained on and scored.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from introspect.metrics import _auroc_stat, auroc, bootstrap_ci


def probe_auroc(
    features: pd.DataFrame,
    steered: np.ndarray,
    groups: np.ndarray,
    folds: int = 5,
    n_boot: int = 1000,
    seed: int = 0,
) -> dict:
    """Out-of-fold AUROC (with a bootstrap 95 % interval) of a logistic regression predicting
    ``steered`` from ``features``; ``groups`` never straddle a train/test split. nan when there
    are fewer than two groups or only one class."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GroupKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x = features.to_numpy(dtype=float)
    y = np.asarray(steered).astype(bool)
    out = {"features": list(features.columns), "n": int(y.size), "folds": 0,
           "auroc": math.nan, "ci": [math.nan, math.nan]}  # fmt: skip
    k = min(folds, len(np.unique(groups)))
    if k < 2 or y.all() or not y.any():
        return out
    scores = np.empty(y.size)
    for train, test in GroupKFold(n_splits=k).split(x, y, groups):
        if y[train].all() or not y[train].any():  # a fold of one class cannot be fitted
            scores[test] = 0.0
            continue
        model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))
        scores[test] = model.fit(x[train], y[train]).decision_function(x[test])
    lo, hi = bootstrap_ci(_auroc_stat, y, scores, n_boot=n_boot, seed=seed)
    return out | {"folds": k, "auroc": auroc(scores[y], scores[~y]), "ci": [lo, hi]}
