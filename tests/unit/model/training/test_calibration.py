"""Platt calibration of the purchase logit (model/training/calibration.py)."""

import functools

import numpy as np
import pytest
import torch

from demandstream.model.core.encoding import category_hashes, category_index, encode_log
from demandstream.model.data.split import Split, next_category_targets, phase_points
from demandstream.model.training.train import TrainConfig, train
from demandstream.model.training.validation import phase_targets
from tests.unit.model.data.test_split import HORIZON
from tests.unit.model.training.test_train import ANY_VALID, TINY_MODEL, tiny_log


@functools.cache  # trained once per test session; calibrate() itself resets the net's calibration
def _calibration_case():
    """A tiny log, its points (train phase: enough purchase labels) and a trained but overconfident net."""

    log = tiny_log(3000, seed=5)
    split = Split(float(np.quantile(log.ts, 0.9)), float(log.ts.max()) + 1, float(log.ts.max()) + 1)
    # A briefly trained net (its logits rank buyers), then made overconfident: p ~ 0.95 far too often.
    # cascade_init off: the selection then keeps a trained epoch (the untrained start has no purchase skill)
    tcfg = TrainConfig(
        epochs=2,
        lanes=16,
        bptt=16,
        threads=1,
        calibrate=False,
        lr=1e-2,
        refit=False,
        cascade_init=False,
        **ANY_VALID,
    )
    res = train(log, tcfg, TINY_MODEL, progress=False, split=split)
    net, vocab, cfg = res.net, res.vocab, res.net.cfg
    with torch.no_grad():
        net.purchase[-1].bias.add_(3.0)
    pts = phase_points(log, split, "train", category_index(log, vocab), HORIZON)
    targets = phase_targets(pts, next_category_targets(category_hashes(log), log.user_start))
    return net, encode_log(log, cfg, vocab), log, targets


def test_calibration_reduces_validation_log_loss_and_lives_in_the_network():

    from demandstream.model.training.calibration import calibrate
    from demandstream.model.training.validation import validation_metrics

    net, feats, log, pts = _calibration_case()
    assert int(pts.purchase[pts.observable].sum()) >= 20  # the case exercises a real fit
    before = validation_metrics(net, feats, log, pts, 1.0, torch.device("cpu"))
    info = calibrate(net, feats, log, pts, torch.device("cpu"))
    after_m = validation_metrics(net, feats, log, pts, 1.0, torch.device("cpu"))
    # calibration is monotone in the logit: the category ranking (MRR) cannot move
    assert after_m["mrr@20"] == pytest.approx(before["mrr@20"])
    before, after = before["purchase_bce"], after_m["purchase_bce"]
    assert info["applied"] and info["b"] < 0  # pulls the inflated propensities down
    assert after < before - 0.1
    assert info["bce_after"] == pytest.approx(after, abs=1e-4)
    assert (float(net.purchase_scale), float(net.purchase_shift)) == pytest.approx((info["a"], info["b"]))


def test_calibration_is_skipped_with_too_few_positives_or_one_class():

    from demandstream.model.training.calibration import calibrate

    net, feats, log, pts = _calibration_case()
    info = calibrate(net, feats, log, pts, torch.device("cpu"), min_positives=10**6)
    assert not info["applied"] and "positive" in info["reason"]
    assert (float(net.purchase_scale), float(net.purchase_shift)) == (1.0, 0.0)
    negatives_only = pts._replace(observable=pts.observable & (pts.purchase == 0))
    info = calibrate(net, feats, log, negatives_only, torch.device("cpu"))
    assert not info["applied"] and "single class" in info["reason"]
    # a validation window no longer than the horizon has no observable purchase window at all
    nothing = pts._replace(observable=np.zeros_like(pts.observable))
    info = calibrate(net, feats, log, nothing, torch.device("cpu"))
    assert not info["applied"] and info["n_points"] == 0
    assert info["reason"] == "no observable validation purchase points"


def test_calibration_needs_a_validation_window_of_a_daily_cycle():
    """Purchase rates follow the hour: the same overconfident case that is fitted on a day's window
    keeps the identity on a four-hour one, and says why."""

    from demandstream.model.training.calibration import (
        CALIBRATION_MIN_WINDOW_S,
        calibrate,
        calibration_summary,
    )

    net, feats, log, pts = _calibration_case()
    info = calibrate(net, feats, log, pts, torch.device("cpu"), window_s=4 * 3600.0)
    assert not info["applied"] and info["reason"].startswith(
        "the validation window spans 4 h, less than 24 h"
    )
    assert calibration_summary(info).endswith(",window<1d)")  # what `demandstream train` prints
    assert (float(net.purchase_scale), float(net.purchase_shift)) == (1.0, 0.0)
    info = calibrate(net, feats, log, pts, torch.device("cpu"), window_s=CALIBRATION_MIN_WINDOW_S)
    assert info["applied"]
    info = calibrate(net, feats, log, pts, torch.device("cpu"), window_s=3600.0, min_window_s=0.0)
    assert info["applied"]
    with torch.no_grad():  # the case is shared (cached): leave it uncalibrated, as it was made
        net.purchase_scale.fill_(1.0)
        net.purchase_shift.fill_(0.0)


def test_calibration_keeps_the_identity_when_the_labels_follow_the_model():
    """Labels drawn from the model's own propensities: it is calibrated by construction, so Cox's test
    must not reject it and Platt's fit (of that noise) must not be installed. The overconfident case
    above is rejected (p far below the level) and fitted."""

    from demandstream.model.training.calibration import calibrate
    from demandstream.model.training.validation import full_context_batches

    net, feats, log, pts = _calibration_case()
    with torch.no_grad():
        net.purchase_scale.fill_(1.0)
        net.purchase_shift.fill_(0.0)
    # the batches yield ``pts.purchase`` of their rows: with row numbers in its place they name them
    numbered = pts._replace(purchase=np.arange(len(pts.purchase), dtype=np.int64))
    rows, logits = [], []
    for b in full_context_batches(net, feats, log, numbered, torch.device("cpu"), purchase_only=True):
        rows.append(b.buy[b.obs].numpy())
        logits.append(b.out["purchase_logit"][b.obs].double().numpy())
    rows, z = np.concatenate(rows), np.concatenate(logits)
    drawn = pts.purchase.copy()
    drawn[rows] = np.random.default_rng(11).random(len(z)) < 1 / (1 + np.exp(-z))
    assert 20 <= drawn[rows].sum() < len(rows)  # a real fit happens, and is then refused
    info = calibrate(net, feats, log, pts._replace(purchase=drawn), torch.device("cpu"))
    assert not info["applied"] and "no miscalibration" in info["reason"]
    assert info["p_value"] >= 0.05 and "fitted_a" in info
    assert (float(net.purchase_scale), float(net.purchase_shift)) == (1.0, 0.0)
    info = calibrate(net, feats, log, pts, torch.device("cpu"))
    with torch.no_grad():  # the case is shared (cached): leave it uncalibrated, as it was made
        net.purchase_scale.fill_(1.0)
        net.purchase_shift.fill_(0.0)
    assert info["applied"] and info["p_value"] < 1e-6
