"""The choice of epoch (model/training/selection.py)."""

import numpy as np
import torch

from tests.unit.model.training.test_train import TINY_MODEL


def test_selection_keeps_the_cascade_head_with_the_best_purchase_epoch_when_training_does_not_beat_it():
    """Epoch 0 (the calibrated cascade) wins validation MRR@20: its category head is combined with the LSTM
    and purchase head of the trained epoch with the lowest purchase BCE; otherwise one epoch is taken whole."""

    from demandstream.model.core.network import DemandLSTM
    from demandstream.model.training.selection import CATEGORY_HEAD, select_epoch

    net = DemandLSTM(TINY_MODEL)
    states = {}
    for ep in range(3):
        states[ep] = {
            k: torch.full_like(v, float(ep)) if v.is_floating_point() else v.clone()
            for k, v in net.state_dict().items()
        }
    hist = [
        {"epoch": 0, "mrr@20": 0.70, "category_nll": 2.0, "purchase_bce": 0.9},
        {"epoch": 1, "mrr@20": 0.69, "category_nll": 1.9, "purchase_bce": 0.40},
        {"epoch": 2, "mrr@20": 0.68, "category_nll": 1.8, "purchase_bce": 0.45},
    ]
    epochs, cat_epoch, best = select_epoch(net, hist, states)
    assert (epochs, cat_epoch) == (1, 0) and best["mrr@20"] == 0.70 and best["purchase_bce"] == 0.40
    for k, v in net.state_dict().items():
        if v.is_floating_point():
            assert float(v.flatten()[0]) == (0.0 if k.startswith(CATEGORY_HEAD) else 1.0), k
    hist[2]["mrr@20"] = 0.71  # a trained epoch beats the cascade: taken whole
    epochs, cat_epoch, _ = select_epoch(net, hist, states)
    assert (epochs, cat_epoch) == (2, 2)
    assert all(float(v.flatten()[0]) == 2.0 for v in net.state_dict().values() if v.is_floating_point())
    # the one-standard-error rule: epoch 2's lead over epoch 0 (paired differences 0.05 and -0.03, standard
    # error 0.004 over 100 points) is real, so it is kept; with differences of 0.29 and -0.27 (standard
    # error 0.028) validation cannot tell epoch 0 from it, and the earliest such epoch is chosen
    rr = {0: np.full(100, 0.70), 1: np.full(100, 0.69), 2: np.r_[np.full(50, 0.75), np.full(50, 0.67)]}
    assert select_epoch(net, hist, states, rr, 1.0)[:2] == (2, 2)
    rr[2] = np.r_[np.full(50, 0.99), np.full(50, 0.43)]
    assert select_epoch(net, hist, states, rr, 1.0)[:2] == (1, 0)  # the cascade head, epoch 1's purchase head
    assert select_epoch(net, hist, states, rr, 0.0)[:2] == (2, 2)  # 0 standard errors: the best epoch
