"""model/evaluation/uncertainty.py: the user bootstrap of the model/best-baseline ratios."""

from __future__ import annotations

import math

import numpy as np
import pytest

from demandstream.model.evaluation.metrics import category_metrics, purchase_metrics
from demandstream.model.evaluation.uncertainty import oriented_ratio, ratio_intervals, verdict

N_CLASSES = 6


def corpus(seed: int = 0, users: int = 150, per_user: int = 6):
    """Category ranks of two methods (``a`` ranks the target first more often) and propensities."""
    rng = np.random.default_rng(seed)
    n = users * per_user
    point_users = np.repeat(np.arange(users), per_user)
    targets = rng.integers(1, N_CLASSES, n)
    ranks_a = np.where(rng.random(n) < 0.7, 1, rng.integers(2, 8, n))
    ranks_b = np.where(rng.random(n) < 0.4, 1, rng.integers(2, 8, n))
    top_a = np.where(ranks_a == 1, targets, 0)
    top_b = np.where(ranks_b == 1, targets, 0)
    y = (rng.random(n) < 0.3).astype(np.float64)
    p_a = np.clip(np.where(y == 1, 0.6, 0.2) + rng.normal(0, 0.1, n), 0.01, 0.99)
    p_b = np.clip(0.3 + rng.normal(0, 0.1, n), 0.01, 0.99)
    return point_users, targets, y, (ranks_a, top_a, p_a), (ranks_b, top_b, p_b)


KEYS = ("category_mrr@20", "category_recall@5", "purchase_auc", "purchase_logloss")


def full_ratio(key, targets, y, model, base):
    def value(m):
        ranks, top1, p = m
        if key.startswith("purchase_"):
            return purchase_metrics(p, y)[key]
        return category_metrics(ranks, top1, targets, N_CLASSES)[key]

    return oriented_ratio(key, value(model), value(base))


def intervals(users, targets, y, model, base, resamples=300, seed=0):
    best = {k: {"name": "base", "ratio": full_ratio(k, targets, y, model, base)} for k in KEYS}
    return ratio_intervals(
        best,
        {"model": model, "base": base},
        targets=targets,
        cat_users=users,
        n_classes=N_CLASSES,
        labels=y,
        buy_users=users,
        resamples=resamples,
        seed=seed,
    )


def test_a_clearly_better_model_is_better_and_a_clearly_worse_one_worse():
    users, targets, y, a, b = corpus()
    up = intervals(users, targets, y, a, b)
    down = intervals(users, targets, y, b, a)
    for k in KEYS:
        assert up[k]["verdict"] == "better" and up[k]["ratio_ci"][0] > 1.0, (k, up[k])
        assert down[k]["verdict"] == "worse" and down[k]["ratio_ci"][1] < 1.0, (k, down[k])


def test_a_method_against_itself_is_inconclusive_at_exactly_one():
    users, targets, y, a, _b = corpus()
    same = intervals(users, targets, y, a, a)
    for k in KEYS:
        assert same[k] == {"ratio_ci": [1.0, 1.0], "verdict": "inconclusive"}


def test_a_miscalibrated_model_loses_calibration_with_the_estimate_in_its_interval():
    # A calibrated method's ECE rises more under resampling than a miscalibrated one's (bin noise only
    # adds to |observed - predicted|), so the resampled ratios sit above the estimate; the interval
    # must still hold it, and call the miscalibrated model worse
    rng = np.random.default_rng(7)
    users = np.repeat(np.arange(500), 4)
    q = rng.uniform(0.05, 0.5, len(users))
    y = (rng.random(len(users)) < q).astype(np.float64)
    calibrated, off = q, np.clip(q + 0.06, 0.0, 1.0)
    ratio = full_ratio("purchase_ece", None, y, (None, None, off), (None, None, calibrated))
    best = {"purchase_ece": {"name": "base", "ratio": ratio}}
    methods = {"model": (None, None, off), "base": (None, None, calibrated)}
    ci = ratio_intervals(
        best, methods, targets=None, cat_users=None, n_classes=0, labels=y, buy_users=users, resamples=300
    )["purchase_ece"]
    assert ci["ratio_ci"][0] <= ratio <= ci["ratio_ci"][1] and ci["verdict"] == "worse", (ratio, ci)


def test_the_unit_is_the_user_not_the_point():
    # Repeating every point of every user ten times adds no evidence: a point bootstrap would shrink the
    # interval by about sqrt(10); the user bootstrap draws the same users and gives the same interval.
    users, targets, y, a, b = corpus(seed=3, users=40)
    once = intervals(users, targets, y, a, b)
    rep = np.repeat(np.arange(len(users)), 10)
    tenfold = intervals(users[rep], targets[rep], y[rep], tuple(x[rep] for x in a), tuple(x[rep] for x in b))
    for k in KEYS:
        assert tenfold[k]["ratio_ci"] == pytest.approx(once[k]["ratio_ci"], rel=1e-9), k


def test_reproducible_and_off_with_zero_resamples():
    users, targets, y, a, b = corpus()
    assert intervals(users, targets, y, a, b, seed=5) == intervals(users, targets, y, a, b, seed=5)
    assert intervals(users, targets, y, a, b, resamples=0) == {}


def test_a_task_without_points_or_positives_has_no_interval():
    users, targets, _y, a, b = corpus()
    no_buyers = np.zeros(len(users))  # AUC is undefined in every resample
    ci = intervals(users, targets, no_buyers, a, b, resamples=50)
    assert all(math.isnan(v) for v in ci["purchase_auc"]["ratio_ci"])
    assert ci["purchase_auc"]["verdict"] == "inconclusive"
    assert ci["category_mrr@20"]["verdict"] == "better"


def test_orientation_follows_the_report():
    assert oriented_ratio("category_mrr@20", 0.6, 0.5) == pytest.approx(1.2)
    assert oriented_ratio("purchase_logloss", 0.3, 0.33) == pytest.approx(1.1)  # lower is better
    assert oriented_ratio("purchase_ece", 0.0, 0.01) == math.inf
    assert math.isnan(oriented_ratio("purchase_auc", 0.0, 0.0))
    assert verdict(1.0, 1.2) == "inconclusive"  # an interval touching 1 does not decide
