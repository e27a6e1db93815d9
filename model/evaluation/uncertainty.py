"""How sure is "the model beats the best baseline"? A user-level bootstrap of each ratio.

A report's ``best_baseline.<metric>.ratio`` (model / best baseline, > 1 = the model is better) is one
number from one test window. Its points are not independent: a user's consecutive events share
almost everything, so a bootstrap over points would be far too narrow. The unit resampled here is the
**user** (the cluster bootstrap; Field & Welsh, "Bootstrapping clustered data", JRSS B 2007): each
resample draws the test users with replacement, keeps all points of each drawn user (as many times
as drawn), and recomputes the model's metric and the best baseline's on those points, with the same
metric functions as the report (:mod:`demandstream.model.evaluation.metrics`). Both methods are
scored on the same resampled points (a paired comparison), so the shared difficulty of a window
cancels out.

The interval is the **basic** (reverse-percentile) bootstrap interval of the log ratio (Davison &
Hinkley, "Bootstrap Methods and their Application", 1997, §5.2): with q the quantiles of the
resampled log ratios and r the report's ratio, ``[r² / e^q_hi, r² / e^q_lo]``. For the means
(MRR, recall, log loss) it equals the plain percentile interval up to Monte-Carlo noise. It matters
for the expected calibration error: a resample's ECE is biased upward (bin noise only adds to
``|observed − predicted|``), far more for a near-calibrated method than for a miscalibrated one, so
the percentile interval of an ECE ratio sits on the wrong side of the estimate (cosmetics in Taobao
format, seed 0: ratio 0.214, percentile interval [0.140, 2.601]); the basic interval takes that
bias back out, as it assumes the resamples scatter around the estimate as the estimate scatters
around the truth.

``verdict`` reads it: ``better`` when the whole interval is above 1, ``worse`` when it is below 1,
``inconclusive`` otherwise (the test window cannot tell the two apart at that level).

>>> rng = np.random.default_rng(0)
>>> users = np.repeat(np.arange(200), 5)                 # 200 users, 5 points each
>>> y = (rng.random(1000) < 0.3).astype(float)
>>> good, noise = np.where(y == 1, 0.7, 0.2), rng.random(1000)
>>> auc = {m: purchase_metrics(p, y)["purchase_auc"] for m, p in (("model", good), ("coin", noise))}
>>> best = {"purchase_auc": {"name": "coin", "ratio": auc["model"] / auc["coin"]}}
>>> ci = ratio_intervals(best, {"model": (None, None, good), "coin": (None, None, noise)},
...                      targets=None, cat_users=None, n_classes=0, labels=y, buy_users=users,
...                      resamples=200)
>>> ci["purchase_auc"]["verdict"], ci["purchase_auc"]["ratio_ci"][0] > 1.5
('better', True)
"""

from __future__ import annotations

import math

import numpy as np

from demandstream.model.evaluation.metrics import (
    CATEGORY_KEYS,
    LOWER_IS_BETTER,
    PURCHASE_KEYS,
    category_metrics,
    purchase_metrics,
)

#: Resamples of the user bootstrap: 1,000 keeps the Monte-Carlo error of a 95 % percentile interval's
#: ends well below the widths seen on our test windows (Efron & Tibshirani 1993, ch. 13 ask for
#: 1,000 or more for percentile intervals); ``demandstream evaluate --bootstrap`` changes it, 0 turns it off.
BOOTSTRAP_RESAMPLES = 1000
#: Two-sided coverage of the interval.
BOOTSTRAP_LEVEL = 0.95
#: The resamples are drawn from this seed, so a report is reproducible.
BOOTSTRAP_SEED = 0


def oriented_ratio(key: str, model: float, best: float) -> float:
    """The report's ratio: ``model / best``, or ``best / model`` where lower is better; NaN where
    undefined (0 / 0, a NaN), inf for x / 0.

    >>> oriented_ratio("purchase_auc", 0.8, 0.5), oriented_ratio("purchase_ece", 0.02, 0.01)
    (1.6, 0.5)
    """
    num, den = (best, model) if key in LOWER_IS_BETTER else (model, best)
    if math.isnan(num) or math.isnan(den) or (num == 0 and den == 0):
        return math.nan
    if den == 0:
        return math.inf
    return num / den


def verdict(lo: float, hi: float) -> str:
    """``better`` / ``worse`` when the interval ``[lo, hi]`` lies above / below 1, else ``inconclusive``.

    >>> verdict(1.01, 1.05), verdict(0.9, 0.99), verdict(0.99, 1.02), verdict(math.nan, math.nan)
    ('better', 'worse', 'inconclusive', 'inconclusive')
    """
    if lo > 1.0:
        return "better"
    if hi < 1.0:
        return "worse"
    return "inconclusive"


def _metrics_on(idx_cat, idx_buy, method, targets, n_classes, labels, keys) -> dict[str, float]:
    ranks, top1, props = method
    out: dict[str, float] = {}
    if ranks is not None and idx_cat is not None and any(k in CATEGORY_KEYS for k in keys):
        out.update(category_metrics(ranks[idx_cat], top1[idx_cat], targets[idx_cat], n_classes))
    if props is not None and idx_buy is not None and any(k in PURCHASE_KEYS for k in keys):
        out.update(purchase_metrics(props[idx_buy], labels[idx_buy]))
    return out


def _resampled_index(point_users: np.ndarray, draws: np.ndarray) -> np.ndarray:
    """The points of a resample: every point of user u, ``draws[u]`` times."""
    return np.repeat(np.arange(point_users.shape[0]), draws[point_users])


def ratio_intervals(
    best: dict[str, dict],
    scored: dict[str, tuple],
    *,
    targets: np.ndarray | None,
    cat_users: np.ndarray | None,
    n_classes: int,
    labels: np.ndarray | None,
    buy_users: np.ndarray | None,
    resamples: int = BOOTSTRAP_RESAMPLES,
    level: float = BOOTSTRAP_LEVEL,
    seed: int = BOOTSTRAP_SEED,
) -> dict[str, dict]:
    """Per metric of ``best`` (:func:`~demandstream.model.evaluation.evaluate.best_baselines`: its
    ``name`` and ``ratio``), the user-bootstrap interval of the model's ratio to the best baseline:
    ``{"ratio_ci": [lo, hi], "verdict": ...}``.

    ``scored`` maps ``"model"`` and each baseline to ``(ranks, top1, propensities)`` at the report's
    points (None where a method does not score a task); ``cat_users`` / ``buy_users`` give each
    category / purchase point's user (any integer ids; NaN intervals when a task has no points).
    A resample whose ratio is undefined (a metric of no value there, e.g. AUC without a positive) is
    left out; with fewer than half of them defined, or no finite positive ratio, the interval is NaN.
    """
    if resamples <= 0 or not best:
        return {}
    uid_parts = [u for u in (cat_users, buy_users) if u is not None and len(u)]
    if not uid_parts:
        return {}
    _, inverse = np.unique(np.concatenate(uid_parts), return_inverse=True)
    n_users = int(inverse.max()) + 1
    cu = inverse[: len(cat_users)] if cat_users is not None and len(cat_users) else None
    bu = inverse[len(inverse) - len(buy_users) :] if buy_users is not None and len(buy_users) else None

    keys = list(best)
    methods = {"model"} | {best[k]["name"] for k in keys}
    rng = np.random.default_rng(seed)
    ratios = {k: np.full(resamples, np.nan) for k in keys}
    for r in range(resamples):
        draws = np.bincount(rng.integers(0, n_users, n_users), minlength=n_users)
        idx_cat = _resampled_index(cu, draws) if cu is not None else None
        idx_buy = _resampled_index(bu, draws) if bu is not None else None
        vals = {
            m: _metrics_on(idx_cat, idx_buy, scored[m], targets, n_classes, labels, keys) for m in methods
        }
        for k in keys:
            mv, bv = vals["model"].get(k, math.nan), vals[best[k]["name"]].get(k, math.nan)
            ratios[k][r] = oriented_ratio(k, float(mv), float(bv))
    tail = 100.0 * (1.0 - level) / 2.0
    out: dict[str, dict] = {}
    for k in keys:
        estimate = best[k].get("ratio", math.nan)
        with np.errstate(divide="ignore"):
            logs = np.log(ratios[k])
        logs = logs[np.isfinite(logs)]
        if logs.size * 2 < resamples or not (0.0 < estimate < math.inf):
            lo = hi = math.nan
        else:
            q_lo, q_hi = np.percentile(logs, [tail, 100.0 - tail])
            centre = 2.0 * math.log(estimate)
            lo, hi = math.exp(centre - q_hi), math.exp(centre - q_lo)
        out[k] = {"ratio_ci": [lo, hi], "verdict": verdict(lo, hi)}
    return out
