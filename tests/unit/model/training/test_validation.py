"""Scoring on validation points (model/training/validation.py)."""

import numpy as np
import torch

from demandstream.model.core.encoding import category_hashes, category_index, encode_log
from demandstream.model.data.split import Split, next_category_targets, phase_points
from demandstream.model.training.train import TrainConfig, train
from demandstream.model.training.validation import phase_targets
from tests.unit.model.data.test_split import HORIZON
from tests.unit.model.training.test_train import TINY_MODEL, tiny_log


def test_the_purchase_bce_of_the_purchase_head_alone_is_validation_metrics_own():
    """The purchase-head phase compares validation BCE after every epoch without the category head;
    the comparison must be the one validation_metrics made (same batches, same sums)."""

    from demandstream.model.training.validation import validation_metrics, validation_purchase_bce

    log = tiny_log(1500)
    res = train(
        log, TrainConfig(epochs=1, lanes=16, bptt=16, threads=1, refit=False), TINY_MODEL, progress=False
    )
    split = Split(float(np.quantile(log.ts, 0.8)), float(np.quantile(log.ts, 0.9)), float(log.ts.max()))
    cats = category_index(log, res.vocab)
    pts = phase_points(log, split, "valid", cats, HORIZON)
    va = phase_targets(pts, next_category_targets(category_hashes(log), log.user_start))
    feats = encode_log(log, res.net.cfg, res.vocab)
    full = validation_metrics(res.net, feats, log, va, 1.0, torch.device("cpu"))
    assert full["n_purchase_points"] > 0
    assert validation_purchase_bce(res.net, feats, log, va, torch.device("cpu")) == full["purchase_bce"]
