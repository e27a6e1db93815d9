"""Evaluation metrics of docs/ARCHITECTURE.md §Evaluation: next-category ranking and purchase propensity.

Small pure numpy functions, shared by the model and every baseline so that all methods are scored
the same way on the same test points. No sklearn: each metric is written out, and the unit tests
check it against brute-force references.

>>> scores = np.array([[-np.inf, 0.5, 0.2, 0.3], [-np.inf, 0.1, 0.1, 0.9]])
>>> target_rank(scores, np.array([1, 2])).tolist()
[1, 3]
>>> m = purchase_metrics(np.array([0.9, 0.2, 0.6, 0.1]), np.array([1, 0, 1, 0]))
>>> float(m["purchase_auc"]), float(m["purchase_pr_auc"])
(1.0, 1.0)
"""

from __future__ import annotations

import numpy as np

#: Probabilities are clipped to [EPS, 1 - EPS] before the log loss so that one confident miss
#: costs a large but finite amount (-log 1e-7 ≈ 16) instead of infinity.
LOGLOSS_EPS = 1e-7

#: Number of equal-width probability bins for the expected calibration error and reliability curve,
#: the usual choice (Guo et al., 2017) and the one our reports compare across methods.
ECE_BINS = 10

#: Cut-offs of the category ranking metrics named in docs/ARCHITECTURE.md §Evaluation.
RECALL_KS = (5, 20)
RANK_CUTOFF = 20

CATEGORY_KEYS = (
    "category_accuracy",
    "category_recall@5",
    "category_recall@20",
    "category_mrr@20",
    "category_ndcg@20",
    "category_precision_weighted",
    "category_recall_weighted",
    "category_f1_weighted",
)
PURCHASE_KEYS = ("purchase_auc", "purchase_pr_auc", "purchase_logloss", "purchase_ece")
#: Metrics where lower is better; every other key is higher-is-better.
LOWER_IS_BETTER = frozenset({"purchase_logloss", "purchase_ece"})


# -- next-category ranking ----------------------------------------------------------------------


def target_rank(scores: np.ndarray, target: int | np.ndarray) -> int | np.ndarray:
    """1-based rank of the target category in a score vector (or one per row of a matrix).

    Ties are counted against the target: ``rank = 1 + #{s > s_t} + #{s == s_t, other}``, i.e. the
    number of scores ``>= s_t``. This is conservative and the same for every method, so a method
    cannot gain from giving many categories the same score. A target of index 0 (unknown category)
    is never predictable and ranks ``C`` (a miss at every cut-off below C), and so does a target
    whose score is NaN. A matrix call allocates an [N, C] temporary: pass batches of rows.

    Parameters
    ----------
    scores : ndarray, shape [C] or [N, C]
        Higher is better; ``-inf`` for categories that are never predicted (index 0).
    target : int or ndarray of shape [N]
        Vocabulary index of the true next category.

    Returns
    -------
    int or ndarray of int64, shape [N]

    Examples
    --------
    >>> target_rank(np.array([-np.inf, 0.2, 0.5, 0.2]), 1)  # 0.5 beats it, the tie at 0.2 too
    3
    >>> target_rank(np.array([-np.inf, 0.2, 0.5, 0.2]), 2)
    1
    >>> target_rank(np.array([-np.inf, 0.2, 0.5, 0.2]), 0)  # unknown target: a miss
    4
    """
    scores = np.asarray(scores)
    if scores.ndim == 1:
        t = int(target)
        if t == 0 or np.isnan(scores[t]):
            return int(scores.shape[0])
        return int(np.count_nonzero(scores >= scores[t]))
    target = np.asarray(target, dtype=np.int64)
    st = scores[np.arange(scores.shape[0]), target]
    ranks = np.count_nonzero(scores >= st[:, None], axis=1).astype(np.int64)
    ranks[(target == 0) | np.isnan(st)] = scores.shape[1]
    return ranks


def category_metrics(
    ranks: np.ndarray, top1: np.ndarray, targets: np.ndarray, n_classes: int
) -> dict[str, float]:
    """Next-category metrics of docs/ARCHITECTURE.md §Evaluation over N test points.

    Ranking metrics come from ``ranks`` (see :func:`target_rank`); accuracy and the weighted
    precision/recall/F1 come from the arg-max prediction ``top1``. Weighted averages follow
    sklearn's ``average="weighted"``: per-class values weighted by the support of the true class,
    0 where a class was never predicted (zero division). A target of 0 (unknown) is always a miss,
    even if ``top1`` were 0. As in sklearn, weighted recall equals accuracy.
    All values are NaN for N = 0.

    Parameters
    ----------
    ranks : ndarray of int, shape [N]
    top1 : ndarray of int, shape [N]
        The method's highest-scored category at each point.
    targets : ndarray of int, shape [N]
    n_classes : int
        Vocabulary size C (categories are 0..C-1).

    Examples
    --------
    >>> m = category_metrics(np.array([1, 2, 30, 1]), np.array([1, 1, 3, 2]), np.array([1, 2, 2, 2]), 4)
    >>> m["category_accuracy"], m["category_recall@5"], m["category_mrr@20"]
    (0.5, 0.75, 0.625)
    >>> round(m["category_precision_weighted"], 4), round(m["category_f1_weighted"], 4)
    (0.875, 0.5417)
    """
    ranks = np.asarray(ranks, dtype=np.int64)
    top1 = np.asarray(top1, dtype=np.int64)
    targets = np.asarray(targets, dtype=np.int64)
    n = ranks.shape[0]
    if n == 0:
        return {k: float("nan") for k in CATEGORY_KEYS}
    hit = (top1 == targets) & (targets > 0)
    within = ranks <= RANK_CUTOFF
    out = {"category_accuracy": float(hit.mean())}
    for k in RECALL_KS:
        out[f"category_recall@{k}"] = float(np.mean(ranks <= k))
    out[f"category_mrr@{RANK_CUTOFF}"] = float(np.where(within, 1.0 / ranks, 0.0).mean())
    out[f"category_ndcg@{RANK_CUTOFF}"] = float(np.where(within, 1.0 / np.log2(ranks + 1.0), 0.0).mean())

    support = np.bincount(targets, minlength=n_classes).astype(np.float64)
    predicted = np.bincount(top1, minlength=n_classes).astype(np.float64)
    tp = np.bincount(targets[hit], minlength=n_classes).astype(np.float64)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall = np.divide(tp, support, out=np.zeros_like(tp), where=support > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(tp), where=denom > 0)
    weights = support / n
    out["category_precision_weighted"] = float(weights @ precision)
    out["category_recall_weighted"] = float(weights @ recall)
    out["category_f1_weighted"] = float(weights @ f1)
    return out


def recall_at_k_curve(ranks: np.ndarray, ks: np.ndarray | range) -> np.ndarray:
    """Fraction of points whose target ranks within each K of ``ks`` (for the recall@K plot).

    >>> recall_at_k_curve(np.array([1, 2, 2, 7]), [1, 2, 5]).tolist()
    [0.25, 0.75, 0.75]
    """
    ranks = np.sort(np.asarray(ranks, dtype=np.int64))
    ks = np.asarray(ks, dtype=np.int64)
    if ranks.size == 0:
        return np.full(ks.shape, np.nan)
    return np.searchsorted(ranks, ks, side="right") / ranks.size


# -- purchase propensity ------------------------------------------------------------------------


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of ``x`` with ties given their average rank (as scipy's rankdata)."""
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    # Start of each run of equal values in sorted order; a run spanning positions a..b gets (a+b)/2+1.
    starts = np.flatnonzero(np.r_[True, xs[1:] != xs[:-1]])
    ends = np.r_[starts[1:], xs.size]
    avg = (starts + ends - 1) / 2.0 + 1.0
    ranks = np.empty(x.size, dtype=np.float64)
    ranks[order] = np.repeat(avg, ends - starts)
    return ranks


def roc_auc(p: np.ndarray, y: np.ndarray) -> float:
    """Area under the ROC curve via the Mann-Whitney statistic; ties count one half.

    NaN when only one class is present.

    >>> roc_auc(np.array([0.1, 0.4, 0.4, 0.8]), np.array([0, 0, 1, 1]))
    0.875
    """
    p = np.asarray(p, dtype=np.float64)
    y = np.asarray(y).astype(bool)
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    r = _average_ranks(p)
    return float((r[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def average_precision(p: np.ndarray, y: np.ndarray) -> float:
    """Average precision, step-wise as sklearn's ``average_precision_score``.

    ``AP = sum_k (R_k - R_{k-1}) P_k`` over the distinct thresholds in decreasing order (tied
    scores enter together). NaN when there is no positive.

    >>> average_precision(np.array([0.9, 0.8, 0.7, 0.6]), np.array([1, 0, 1, 0]))  # (1 + 2/3) / 2
    0.8333333333333333
    """
    p = np.asarray(p, dtype=np.float64)
    y = np.asarray(y).astype(np.float64)
    n_pos = y.sum()
    if n_pos == 0:
        return float("nan")
    _, tps, fps = _threshold_counts(p, y)
    precision = tps / (tps + fps)
    recall = tps / n_pos
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def _threshold_counts(p: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Distinct thresholds (decreasing) and cumulative true/false positives at each."""
    order = np.argsort(-p, kind="mergesort")
    ps, ys = p[order], y[order]
    last_of_run = np.r_[np.flatnonzero(ps[1:] != ps[:-1]), ps.size - 1]
    tps = np.cumsum(ys)[last_of_run]
    fps = (last_of_run + 1) - tps
    return ps[last_of_run], tps, fps


def roc_curve(p: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC points ``(fpr, tpr, thresholds)``, starting at (0, 0) with threshold +inf.

    >>> fpr, tpr, thr = roc_curve(np.array([0.1, 0.4, 0.4, 0.8]), np.array([0, 0, 1, 1]))
    >>> fpr.tolist(), tpr.tolist()
    ([0.0, 0.0, 0.5, 1.0], [0.0, 0.5, 1.0, 1.0])
    """
    p = np.asarray(p, dtype=np.float64)
    y = np.asarray(y).astype(np.float64)
    thr, tps, fps = _threshold_counts(p, y)
    n_pos, n_neg = y.sum(), y.size - y.sum()
    tpr = np.r_[0.0, tps / n_pos] if n_pos else np.full(thr.size + 1, np.nan)
    fpr = np.r_[0.0, fps / n_neg] if n_neg else np.full(thr.size + 1, np.nan)
    return fpr, tpr, np.r_[np.inf, thr]


def reliability_curve(
    p: np.ndarray, y: np.ndarray, bins: int = ECE_BINS
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per equal-width bin: mean predicted probability, observed positive rate, count.

    Empty bins give NaN means and a count of 0. A probability of exactly 1 falls in the last bin.

    >>> conf, freq, n = reliability_curve(np.array([0.05, 0.15, 0.95, 0.9]), np.array([0, 1, 1, 1]), bins=2)
    >>> conf.tolist(), freq.tolist(), n.tolist()
    ([0.1, 0.925], [0.5, 1.0], [2, 2])
    """
    p = np.asarray(p, dtype=np.float64)
    y = np.asarray(y).astype(np.float64)
    idx = np.clip((p * bins).astype(np.int64), 0, bins - 1)
    counts = np.bincount(idx, minlength=bins)
    sum_p = np.bincount(idx, weights=p, minlength=bins)
    sum_y = np.bincount(idx, weights=y, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        return sum_p / counts, sum_y / counts, counts


def expected_calibration_error(p: np.ndarray, y: np.ndarray, bins: int = ECE_BINS) -> float:
    """ECE: ``sum_b (n_b / N) |mean(y_b) - mean(p_b)|`` over equal-width bins.

    >>> expected_calibration_error(np.array([0.05, 0.15, 0.95, 0.9]), np.array([0, 1, 1, 1]), bins=2)
    0.2375
    """
    conf, freq, counts = reliability_curve(p, y, bins)
    if counts.sum() == 0:
        return float("nan")
    full = counts > 0
    return float(np.sum(counts[full] * np.abs(freq[full] - conf[full])) / counts.sum())


def log_loss(p: np.ndarray, y: np.ndarray) -> float:
    """Mean binary cross-entropy with ``p`` clipped to ``[LOGLOSS_EPS, 1 - LOGLOSS_EPS]``.

    >>> round(log_loss(np.array([0.5, 0.5]), np.array([0, 1])), 6)
    0.693147
    """
    p = np.clip(np.asarray(p, dtype=np.float64), LOGLOSS_EPS, 1.0 - LOGLOSS_EPS)
    y = np.asarray(y).astype(np.float64)
    if p.size == 0:
        return float("nan")
    return float(-np.mean(y * np.log(p) + (1.0 - y) * np.log1p(-p)))


def purchase_metrics(p: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """Purchase-propensity metrics of docs/ARCHITECTURE.md §Evaluation for probabilities ``p`` and 0/1 labels
    ``y``.

    >>> m = purchase_metrics(np.array([0.8, 0.4, 0.4, 0.1]), np.array([1, 1, 0, 0]))
    >>> m["purchase_auc"], round(m["purchase_pr_auc"], 4)
    (0.875, 0.8333)
    """
    return {
        "purchase_auc": roc_auc(p, y),
        "purchase_pr_auc": average_precision(p, y),
        "purchase_logloss": log_loss(p, y),
        "purchase_ece": expected_calibration_error(p, y),
    }
