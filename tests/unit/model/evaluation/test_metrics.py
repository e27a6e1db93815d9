"""Tests for model/evaluation/metrics.py: hand-computed values and brute-force reference implementations."""

from __future__ import annotations

import math

import numpy as np
import pytest

from demandstream.model.evaluation.metrics import (
    CATEGORY_KEYS,
    LOGLOSS_EPS,
    PURCHASE_KEYS,
    average_precision,
    category_metrics,
    expected_calibration_error,
    purchase_metrics,
    recall_at_k_curve,
    reliability_curve,
    roc_auc,
    roc_curve,
    target_rank,
)

# -- brute-force references ---------------------------------------------------------------------


def ref_rank(scores: np.ndarray, t: int) -> int:
    if t == 0:
        return len(scores)
    return 1 + sum(1 for j, s in enumerate(scores) if j != t and (s > scores[t] or s == scores[t]))


def ref_auc(p: np.ndarray, y: np.ndarray) -> float:
    pos, neg = p[y == 1], p[y == 0]
    total = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a in pos for b in neg)
    return total / (len(pos) * len(neg))


def ref_ap(p: np.ndarray, y: np.ndarray) -> float:
    """Step-wise AP by sweeping every distinct threshold from high to low."""
    n_pos = y.sum()
    ap, prev_recall = 0.0, 0.0
    for thr in sorted(set(p.tolist()), reverse=True):
        pred = p >= thr
        tp = (pred & (y == 1)).sum()
        precision, recall = tp / pred.sum(), tp / n_pos
        ap += (recall - prev_recall) * precision
        prev_recall = recall
    return ap


def ref_weighted_prf(top1: np.ndarray, targets: np.ndarray) -> tuple[float, float, float]:
    labels = sorted(set(targets.tolist()))
    n = len(targets)
    p_sum = r_sum = f_sum = 0.0
    for c in labels:
        tp = int(((top1 == c) & (targets == c)).sum()) if c != 0 else 0
        pred = int((top1 == c).sum())
        sup = int((targets == c).sum())
        p = tp / pred if pred else 0.0
        r = tp / sup
        f = 2 * p * r / (p + r) if p + r else 0.0
        p_sum += sup / n * p
        r_sum += sup / n * r
        f_sum += sup / n * f
    return p_sum, r_sum, f_sum


# -- target_rank --------------------------------------------------------------------------------


def test_rank_counts_ties_against_target():
    s = np.array([-np.inf, 0.3, 0.3, 0.3, 0.1])
    assert target_rank(s, 1) == 3
    assert target_rank(s, 4) == 4
    assert target_rank(s, 0) == 5
    assert target_rank(np.array([0.0, np.nan, 0.2]), 1) == 3  # a NaN score is a miss, not rank 0
    assert target_rank(np.array([[0.0, np.nan, 0.2]]), np.array([1])).tolist() == [3]


def test_rank_matrix_matches_reference():
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 4, size=(200, 12)).astype(float)  # many ties
    scores[:, 0] = -np.inf
    targets = rng.integers(0, 12, size=200)
    got = target_rank(scores, targets)
    assert got.tolist() == [ref_rank(scores[i], int(targets[i])) for i in range(200)]
    assert got.tolist() == [target_rank(scores[i], int(targets[i])) for i in range(200)]


# -- category_metrics ---------------------------------------------------------------------------


def test_category_metrics_hand_values():
    ranks = np.array([1, 3, 21, 20])
    top1 = np.array([5, 1, 1, 2])
    targets = np.array([5, 2, 3, 0])  # the unknown target (0) is a miss
    m = category_metrics(ranks, top1, targets, n_classes=6)
    assert set(m) == set(CATEGORY_KEYS)
    assert m["category_accuracy"] == 0.25
    assert m["category_recall@5"] == 0.5
    assert m["category_recall@20"] == 0.75
    assert m["category_mrr@20"] == pytest.approx((1 + 1 / 3 + 0 + 1 / 20) / 4)
    assert m["category_ndcg@20"] == pytest.approx((1 + 1 / math.log2(4) + 0 + 1 / math.log2(21)) / 4)
    # Only class 5 is ever right: precision 1, recall 1, support 1 of 4.
    assert m["category_precision_weighted"] == pytest.approx(0.25)
    assert m["category_recall_weighted"] == pytest.approx(0.25)
    assert m["category_f1_weighted"] == pytest.approx(0.25)


def test_category_metrics_weighted_match_reference():
    rng = np.random.default_rng(1)
    targets = rng.integers(0, 8, size=500)
    top1 = np.where(rng.random(500) < 0.4, targets, rng.integers(1, 8, size=500))
    top1[top1 == 0] = 1
    ranks = rng.integers(1, 30, size=500)
    m = category_metrics(ranks, top1, targets, n_classes=8)
    p, r, f = ref_weighted_prf(top1, targets)
    assert m["category_precision_weighted"] == pytest.approx(p)
    assert m["category_recall_weighted"] == pytest.approx(r)
    assert m["category_f1_weighted"] == pytest.approx(f)
    assert m["category_recall_weighted"] == pytest.approx(m["category_accuracy"])


def test_category_metrics_empty_is_nan():
    m = category_metrics(np.array([], int), np.array([], int), np.array([], int), 4)
    assert all(math.isnan(v) for v in m.values())


def test_recall_at_k_curve():
    assert recall_at_k_curve(np.array([1, 1, 4, 50]), [1, 3, 4, 50]).tolist() == [0.5, 0.5, 0.75, 1.0]


# -- purchase metrics ---------------------------------------------------------------------------


def test_purchase_metrics_hand_values():
    p = np.array([0.9, 0.7, 0.7, 0.2, 0.1])
    y = np.array([1, 0, 1, 0, 1])
    m = purchase_metrics(p, y)
    assert set(m) == set(PURCHASE_KEYS)
    # pairs (pos, neg): 0.9>0.7, 0.9>0.2, 0.7=0.7 (half), 0.7>0.2, 0.1<0.7, 0.1<0.2 -> 3.5 / 6
    assert m["purchase_auc"] == pytest.approx(3.5 / 6)
    # thresholds 0.9: P=1 R=1/3; 0.7: P=2/3 R=2/3; 0.2: no new positive; 0.1: P=3/5 R=1
    assert m["purchase_pr_auc"] == pytest.approx((1 + 2 / 3 + 3 / 5) / 3)
    ll = -np.mean(np.log([0.9, 0.3, 0.7, 0.8, 0.1]))
    assert m["purchase_logloss"] == pytest.approx(ll)
    # bins: [0.1] y=1 -> |1-0.1|; [0.2] y=0 -> 0.2; [0.7, 0.7] y=(0,1) -> 0.2; [0.9] y=1 -> 0.1
    assert m["purchase_ece"] == pytest.approx((0.9 + 0.2 + 2 * 0.2 + 0.1) / 5)


@pytest.mark.parametrize("seed", range(5))
def test_auc_and_ap_match_bruteforce(seed):
    rng = np.random.default_rng(seed)
    n = 120
    p = np.round(rng.random(n), 1)  # coarse rounding for many ties
    y = (rng.random(n) < p * 0.8).astype(int)
    assert roc_auc(p, y) == pytest.approx(ref_auc(p, y))
    assert average_precision(p, y) == pytest.approx(ref_ap(p, y))
    fpr, tpr, _ = roc_curve(p, y)
    assert np.trapezoid(tpr, fpr) == pytest.approx(ref_auc(p, y))


def test_one_class_gives_nan_auc():
    m = purchase_metrics(np.array([0.2, 0.4]), np.array([0, 0]))
    assert math.isnan(m["purchase_auc"]) and math.isnan(m["purchase_pr_auc"])
    assert math.isnan(roc_auc(np.array([0.2, 0.4]), np.array([1, 1])))
    assert average_precision(np.array([0.2, 0.4]), np.array([1, 1])) == 1.0


def test_logloss_clips_confident_misses():
    m = purchase_metrics(np.array([0.0, 1.0]), np.array([1, 0]))
    assert m["purchase_logloss"] == pytest.approx(-math.log(LOGLOSS_EPS))


def test_reliability_and_ece():
    p = np.array([0.0, 0.05, 0.5, 1.0])
    y = np.array([0, 1, 1, 1])
    conf, freq, counts = reliability_curve(p, y, bins=10)
    assert counts.tolist() == [2, 0, 0, 0, 0, 1, 0, 0, 0, 1]
    assert freq[0] == 0.5 and conf[0] == 0.025 and np.isnan(conf[1])
    assert expected_calibration_error(p, y) == pytest.approx((2 * 0.475 + 0.5 + 0) / 4)
