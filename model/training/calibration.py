"""Platt scaling of the purchase logit, installed only when Cox's test on a long enough validation
window rejects the identity (docs/MODEL.md §2, "Calibration")."""

from __future__ import annotations

import logging
import math

import numpy as np
import torch
from torch import nn

from demandstream.model.core.encoding import FeatureBuffer
from demandstream.model.core.network import DemandLSTM
from demandstream.model.data.eventlog import EventLog
from demandstream.model.data.split import Points
from demandstream.model.training.validation import full_context_batches

logger = logging.getLogger(__name__)


#: Platt scaling is fitted only with at least this many positive validation points: with fewer, the two
#: scalars follow the noise of a handful of buyers.
MIN_CALIBRATION_POSITIVES = 20


#: Ceiling on LBFGS iterations of the 2-parameter Platt fit (it is convex and converges in tens).
CALIBRATION_MAX_ITER = 300


#: Platt scaling replaces the identity only when Cox's likelihood-ratio test rejects "the model is
#: calibrated" (a = 1, b = 0) on the validation points at this level (docs/MODEL.md §2, "Calibration").
CALIBRATION_ALPHA = 0.05


#: Platt scaling is fitted only on a validation window at least this long: purchase rates follow the
#: hour of the day, so a shift (and slope) fitted on a few hours learns those hours' rate, and it did not
#: carry to other hours where it was measured (docs/MODEL.md §2, "Calibration").
CALIBRATION_MIN_WINDOW_S = 86_400.0


def fit_platt(
    logits: np.ndarray, labels: np.ndarray, max_iter: int = CALIBRATION_MAX_ITER
) -> tuple[float, float]:
    """Platt scaling: ``(a, b)`` minimizing the mean BCE of ``sigmoid(a * logit + b)`` against ``labels``.

    Parameters
    ----------
    logits : float array [n]
        Uncalibrated logits.
    labels : array of 0/1 [n]
    max_iter : int
        LBFGS iteration ceiling.

    Examples
    --------
    Logits that are twice too confident and shifted by one are undone:

    >>> rng = np.random.default_rng(0)
    >>> z = rng.normal(size=20000)
    >>> y = (rng.random(20000) < 1 / (1 + np.exp(-z))).astype(float)
    >>> a, b = fit_platt(2 * z + 1, y)
    >>> round(a, 1), round(b, 1)
    (0.5, -0.5)
    """
    x = torch.as_tensor(np.asarray(logits, np.float64))
    y = torch.as_tensor(np.asarray(labels, np.float64))
    ab = torch.tensor([1.0, 0.0], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS(
        [ab],
        lr=1.0,
        max_iter=max_iter,
        tolerance_grad=1e-10,
        tolerance_change=1e-12,
        line_search_fn="strong_wolfe",
    )

    def closure():
        opt.zero_grad()
        loss = nn.functional.binary_cross_entropy_with_logits(ab[0] * x + ab[1], y)
        loss.backward()
        return loss

    opt.step(closure)
    a, b = ab.detach().tolist()
    return float(a), float(b)


def _mean_bce(logits: np.ndarray, labels: np.ndarray, a: float = 1.0, b: float = 0.0) -> float:
    z = torch.as_tensor(a * np.asarray(logits, np.float64) + b)
    return float(
        nn.functional.binary_cross_entropy_with_logits(z, torch.as_tensor(labels, dtype=torch.float64))
    )


def calibration_test(bce_before: float, bce_after: float, n: int) -> tuple[float, float]:
    """Cox's test of calibration: the likelihood-ratio statistic of the Platt fit against the identity
    (``a = 1, b = 0``) on ``n`` points with mean BCEs ``bce_before`` / ``bce_after``, and its p-value
    (chi-squared, 2 degrees of freedom, whose tail is exactly ``exp(-stat / 2)``).

    Cox, D. R. (1958), "Two further applications of a model for binary regression", Biometrika 45.

    >>> stat, p = calibration_test(0.3451, 0.3450, 3891)   # a 4-hour window, a fit of its noise
    >>> round(stat, 2), round(p, 2)
    (0.78, 0.68)
    >>> calibration_test(0.2653, 0.2640, 17618)[1] < 0.05  # a real miscalibration
    True
    """
    stat = max(0.0, 2.0 * n * (bce_before - bce_after))
    return stat, math.exp(-stat / 2.0)


def calibrate(
    net: DemandLSTM,
    feats: FeatureBuffer,
    log: EventLog,
    pts: Points,
    device: torch.device,
    min_positives: int = MIN_CALIBRATION_POSITIVES,
    alpha: float = CALIBRATION_ALPHA,
    window_s: float | None = None,
    min_window_s: float = CALIBRATION_MIN_WINDOW_S,
) -> dict:
    """Fit Platt scaling on the observable purchase points of ``pts`` (validation) and store it in ``net``.

    The logits are collected with full context, as :func:`validation_metrics` does, after resetting the
    network's calibration to the identity. The fit is skipped (identity kept) when there are fewer than
    ``min_positives`` positives, only one class, or the fitted scale is not positive (it would invert the
    model's ranking). A fit is installed only when the points show that the model is miscalibrated, and
    only from a window (``window_s``, the validation's time span) of at least ``min_window_s``:
    Cox's likelihood-ratio test of ``a = 1, b = 0`` (:func:`calibration_test`) at level ``alpha``;
    otherwise the two scalars would follow the validation window's noise (docs/MODEL.md §2). Returns
    what was done: ``applied``, ``reason`` when not, ``a``, ``b`` (the fit, installed or not), point
    counts, the validation BCE before and after the fit, the test's ``lr_stat`` and ``p_value``.
    """
    net.purchase_scale.fill_(1.0)
    net.purchase_shift.fill_(0.0)
    zs, ys = [], []
    for b in full_context_batches(net, feats, log, pts, device, purchase_only=True):
        zs.append(b.out["purchase_logit"][b.obs].double().cpu().numpy())
        ys.append(b.buy[b.obs].double().cpu().numpy())
    z = np.concatenate(zs) if zs else np.zeros(0)
    y = np.concatenate(ys) if ys else np.zeros(0)
    n_pos = int(y.sum())
    info: dict = {"applied": False, "a": 1.0, "b": 0.0, "n_points": int(len(y)), "n_positive": n_pos}
    if len(y) == 0:
        info["reason"] = "no observable validation purchase points"
    elif n_pos == 0 or n_pos == len(y):
        info["reason"] = "validation purchase labels have a single class"
    elif n_pos < min_positives:
        info["reason"] = f"only {n_pos} positive validation points (< {min_positives})"
    else:
        a, b = fit_platt(z, y)
        if not a > 0:  # also catches NaN
            info["reason"] = f"fitted scale {a:.4g} is not positive"
        else:
            before, after = _mean_bce(z, y), _mean_bce(z, y, a, b)
            lr, p = calibration_test(before, after, len(y))
            info.update(bce_before=before, bce_after=after, lr_stat=lr, p_value=p)
            if p >= alpha:
                info.update(fitted_a=a, fitted_b=b)
                info["reason"] = (
                    f"the validation points show no miscalibration (Cox's test p = {p:.3g} >= {alpha:g}; "
                    f"Platt's fit a = {a:.3f}, b = {b:+.3f} would follow their noise)"
                )
            elif window_s is not None and window_s < min_window_s:
                info.update(
                    fitted_a=a, fitted_b=b, window_short=True, window_s=window_s, min_window_s=min_window_s
                )
                info["reason"] = (
                    f"the validation window spans {window_s / 3600:.3g} h, less than {min_window_s / 3600:.3g} h "
                    f"(Cox's test p = {p:.3g}; Platt's fit a = {a:.3f}, b = {b:+.3f} would carry the purchase "
                    "rate of its hours to all the others)"
                )
            else:
                info.update(applied=True, a=a, b=b)
                net.purchase_scale.fill_(a)
                net.purchase_shift.fill_(b)
    if not info["applied"]:
        logger.info("purchase calibration skipped: %s", info["reason"])
    return info


def calibration_summary(info: dict) -> str:
    """One word and its figures for :func:`calibrate`'s record, as ``demandstream train`` prints it.

    >>> calibration_summary({"applied": True, "a": 1.12, "b": -0.007, "p_value": 0.0004})
    'platt(a=1.12,b=-0.007,p=0.0004)'
    >>> calibration_summary({"applied": False, "p_value": 0.72, "reason": "..."})
    'identity(p=0.72)'
    >>> calibration_summary({"applied": False, "reason": "only 3 positive validation points (< 20)"})
    'identity(only 3 positive validation points (< 20))'
    >>> calibration_summary({"applied": False, "p_value": 3e-10, "window_short": True, "min_window_s": 86400.0})
    'identity(p=3e-10,window<1d)'
    """
    if info.get("applied"):
        return f"platt(a={info['a']:.3g},b={info['b']:.3g},p={info['p_value']:.2g})"
    if info.get("window_short"):
        return f"identity(p={info['p_value']:.2g},window<{info['min_window_s'] / 86400:.3g}d)"
    if "p_value" in info:
        return f"identity(p={info['p_value']:.2g})"
    return f"identity({info.get('reason', 'not fitted')})"
