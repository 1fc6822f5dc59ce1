"""Checks of introspect.metrics against independent, textbook computations."""

import json
import math
from dataclasses import FrozenInstanceError
from itertools import product

import numpy as np
import pytest
from scipy.stats import norm

from introspect.errors import IntrospectError
from introspect.metrics import (
    DetectionMetrics,
    auroc,
    bootstrap_ci,
    d_prime,
    detection_metrics,
    wilson_interval,
)

# --- Wilson interval -------------------------------------------------------------------------
# By hand, 8/10, z = 1.96: z²/n = 0.38415, centre = (0.8 + 0.19207) / 1.38415 = 0.71674,
# half-width = 1.96 · sqrt(0.016 + 0.0096037) / 1.38415 = 0.22657 -> (0.4902, 0.9433).


def test_wilson_known_value_8_of_10():
    lo, hi = wilson_interval(8, 10)
    assert lo == pytest.approx(0.4902, abs=1e-4)
    assert hi == pytest.approx(0.9433, abs=1e-4)


def test_wilson_known_value_0_of_10():
    # Textbook value: the Wilson upper bound for 0/10 is 0.2775 (the Wald interval gives 0).
    lo, hi = wilson_interval(0, 10)
    assert lo == 0.0
    assert hi == pytest.approx(0.2775, abs=1e-4)


def test_wilson_is_symmetric_and_bounded():
    lo, hi = wilson_interval(10, 10)
    assert hi == 1.0
    assert lo == pytest.approx(1 - 0.2775, abs=1e-4)
    lo3, hi3 = wilson_interval(3, 10)
    lo7, hi7 = wilson_interval(7, 10)
    assert (lo3, hi3) == pytest.approx((1 - hi7, 1 - lo7))


def test_wilson_empty_is_nan():
    lo, hi = wilson_interval(0, 0)
    assert math.isnan(lo) and math.isnan(hi)


def test_wilson_rejects_impossible_counts():
    with pytest.raises(IntrospectError):
        wilson_interval(11, 10)


# --- d′ --------------------------------------------------------------------------------------


def test_d_prime_zero_when_hit_rate_equals_false_alarm_rate():
    assert d_prime(7, 10, 7, 10) == pytest.approx(0.0, abs=1e-12)
    assert d_prime(0, 20, 0, 20) == pytest.approx(0.0, abs=1e-12)


def test_d_prime_hand_computed_log_linear():
    # H = 8.5/11, F = 2.5/11: ppf(0.77273) = 0.74786, so d′ = 2 · 0.74786 = 1.49572.
    expected = norm.ppf(8.5 / 11) - norm.ppf(2.5 / 11)
    assert d_prime(8, 10, 2, 10) == pytest.approx(expected, rel=1e-12)
    assert d_prime(8, 10, 2, 10) == pytest.approx(1.49572, abs=1e-4)


def test_d_prime_correction_applied_even_without_extreme_rates():
    # Uncorrected rates 0.8 / 0.2 give 1.6832; the log-linear rule must still shift them.
    uncorrected = norm.ppf(0.8) - norm.ppf(0.2)
    assert abs(d_prime(8, 10, 2, 10) - uncorrected) > 0.1


def test_d_prime_perfect_score_is_finite_and_not_hard_clipped():
    value = d_prime(10, 10, 0, 10)
    assert math.isfinite(value)
    # Log-linear: 2 · ppf(10.5/11) = 3.3812. Clipping to [0.01, 0.99] would give 4.6527.
    assert value == pytest.approx(3.3812, abs=1e-4)
    clipped = norm.ppf(0.99) - norm.ppf(0.01)
    assert abs(value - clipped) > 1.0


def test_d_prime_missing_class_is_nan():
    assert math.isnan(d_prime(3, 5, 0, 0))
    assert math.isnan(d_prime(0, 0, 1, 4))


# --- AUROC -----------------------------------------------------------------------------------


def brute_force_auroc(pos, neg):
    """Count every (pos, neg) pair: 1 if pos wins, 1/2 if tied."""
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in product(pos, neg))
    return wins / (len(pos) * len(neg))


def test_auroc_known_small_examples():
    assert auroc([3, 4, 5], [0, 1, 2]) == 1.0
    assert auroc([0, 1, 2], [3, 4, 5]) == 0.0
    assert auroc([1, 1, 1], [1, 1]) == 0.5
    # Pairs: 1>0, 1<2, 2>0, 2=2, 3>0, 3>2 -> 4.5 / 6.
    assert auroc([1, 2, 3], [0, 2]) == pytest.approx(0.75)


@pytest.mark.parametrize("seed", range(5))
def test_auroc_matches_pairwise_count_with_ties(seed):
    rng = np.random.default_rng(seed)
    # Small integer scores force many ties within and across classes.
    pos = rng.integers(0, 6, size=37)
    neg = rng.integers(0, 5, size=23)
    assert auroc(pos, neg) == pytest.approx(brute_force_auroc(pos, neg), abs=1e-12)


def test_auroc_empty_side_is_nan():
    assert math.isnan(auroc([], [0.1, 0.2]))
    assert math.isnan(auroc([0.1], []))


# --- bootstrap -------------------------------------------------------------------------------


def _auroc_stat(labels, scores):
    return auroc(scores[labels], scores[~labels])


def _noisy_data(seed=0, n=200):
    rng = np.random.default_rng(seed)
    labels = rng.random(n) < 0.4
    scores = rng.normal(size=n) + labels * 1.0
    return labels, scores


def test_bootstrap_contains_point_estimate_and_is_deterministic():
    labels, scores = _noisy_data()
    point = auroc(scores[labels], scores[~labels])
    lo, hi = bootstrap_ci(_auroc_stat, labels, scores, n_boot=500, seed=3)
    assert lo < point < hi
    assert hi - lo > 0.01
    assert bootstrap_ci(_auroc_stat, labels, scores, n_boot=500, seed=3) == (lo, hi)
    assert bootstrap_ci(_auroc_stat, labels, scores, n_boot=500, seed=4) != (lo, hi)


def test_bootstrap_is_stratified():
    # One positive among 50 negatives: an unstratified resample misses it about 36% of the time.
    labels = np.array([True] + [False] * 50)
    scores = np.arange(51, dtype=float)
    n_pos = bootstrap_ci(lambda y, s: float(y.sum()), labels, scores, n_boot=200)
    assert n_pos == (1.0, 1.0)
    # The lone positive's score must be in every resample.
    has_it = bootstrap_ci(lambda y, s: float(s[y][0] == 0.0), labels, scores, n_boot=200)
    assert has_it == (1.0, 1.0)


def test_bootstrap_missing_class_is_nan():
    lo, hi = bootstrap_ci(_auroc_stat, [True, True], [0.2, 0.3])
    assert math.isnan(lo) and math.isnan(hi)


# --- detection_metrics -----------------------------------------------------------------------
# Hand-made confusion matrix at threshold 0.5 (strictly greater counts as "yes"):
#   steered   p_yes 0.9 0.8 0.6 0.2        -> 3 hits, 1 miss
#   unsteered p_yes 0.1 0.3 0.7 0.4 0.5 0.0 -> 1 false alarm (0.5 is not > 0.5), 5 correct
LABELS = [1, 1, 1, 1, 0, 0, 0, 0, 0, 0]
P_YES = [0.9, 0.8, 0.6, 0.2, 0.1, 0.3, 0.7, 0.4, 0.5, 0.0]


def test_detection_metrics_confusion_matrix():
    m = detection_metrics(LABELS, P_YES, n_boot=200)
    assert m.n_steered == 4 and m.n_unsteered == 6
    assert m.accuracy == pytest.approx(8 / 10)
    assert m.tpr == pytest.approx(3 / 4)
    assert m.fpr == pytest.approx(1 / 6)
    assert m.mean_p_yes_steered == pytest.approx(2.5 / 4)
    assert m.mean_p_yes_unsteered == pytest.approx(2.0 / 6)
    assert m.d_prime == pytest.approx(norm.ppf(3.5 / 5) - norm.ppf(1.5 / 7))
    # Pairs won by each steered score: 0.9 -> 6, 0.8 -> 6, 0.6 -> 5, 0.2 -> 2; 19 of 24.
    assert m.auroc == pytest.approx(19 / 24)
    assert m.ci["accuracy"] == pytest.approx((0.4902, 0.9433), abs=1e-4)


def test_detection_metrics_threshold_is_strict():
    m = detection_metrics(LABELS, P_YES, threshold=0.45, n_boot=50)
    assert m.fpr == pytest.approx(2 / 6)  # 0.5 now counts as yes
    assert m.auroc == pytest.approx(19 / 24)  # AUROC ignores the threshold


def test_detection_metrics_intervals_contain_estimates():
    labels, scores = _noisy_data(seed=1, n=300)
    p_yes = 1 / (1 + np.exp(-scores))
    m = detection_metrics(labels, p_yes, n_boot=300, seed=7)
    assert set(m.ci) == {"accuracy", "tpr", "fpr", "d_prime", "auroc"}
    for key in m.ci:
        lo, hi = m.ci[key]
        assert lo <= getattr(m, key) <= hi, key
        assert lo < hi, key
    assert m.to_dict() == detection_metrics(labels, p_yes, n_boot=300, seed=7).to_dict()


def test_detection_metrics_to_dict_is_json_ready():
    m = detection_metrics(LABELS, P_YES, n_boot=50)
    d = m.to_dict()
    assert d["ci"]["tpr"] == list(wilson_interval(3, 4))
    assert type(d["n_steered"]) is int and type(d["auroc"]) is float
    assert json.loads(json.dumps(d)) == d
    with pytest.raises(FrozenInstanceError):
        m.accuracy = 1.0  # type: ignore[misc]
    assert isinstance(m, DetectionMetrics)


def test_detection_metrics_rejects_bad_input():
    with pytest.raises(IntrospectError, match="same length"):
        detection_metrics([1, 0, 1], [0.2, 0.3])
    with pytest.raises(IntrospectError, match="empty"):
        detection_metrics([], [])
    with pytest.raises(ValueError):  # IntrospectError is a ValueError for callers
        detection_metrics([1], [float("nan")])


def test_detection_metrics_one_class_missing_gives_nan():
    m = detection_metrics([0, 0, 0], [0.1, 0.7, 0.2], n_boot=50)
    assert m.n_steered == 0 and m.n_unsteered == 3
    assert m.accuracy == pytest.approx(2 / 3)
    assert m.fpr == pytest.approx(1 / 3)
    for value in (m.tpr, m.d_prime, m.auroc, m.mean_p_yes_steered):
        assert math.isnan(value)
    assert all(math.isnan(x) for x in m.ci["tpr"] + m.ci["d_prime"] + m.ci["auroc"])
    d = m.to_dict()
    assert math.isnan(d["auroc"]) and len(d["ci"]["auroc"]) == 2
