"""The training losses and a window's backward pass in blocks (model/training/losses.py)."""

import dataclasses

import numpy as np
import pytest
import torch

from demandstream.model.core.features import Vocabulary
from demandstream.model.data.eventlog import EventLog
from tests.unit.model.training.test_train import TINY_MODEL


def _window_case(seed: int = 4):
    """A training window of a tiny live network: features [lanes, T], targets (some outside the
    vocabulary but in the history, some not rankable), purchase labels, a random start state."""
    import torch

    from demandstream.model.core.encoding import encode_log, padded_user_batches
    from demandstream.model.core.network import DemandLSTM
    from tests.unit.model.core.test_network import live_net, random_events

    rng = np.random.default_rng(seed)
    events = random_events(rng, n_users=8, max_len=20, n_cats=14)
    vocab = Vocabulary.build([e.category for e in events], max_size=7)
    cfg = dataclasses.replace(TINY_MODEL, n_categories=len(vocab), markov_top_k=3)
    net: DemandLSTM = live_net(cfg, vocab, events, seed).train()
    log = EventLog.from_events(events).sorted_by_user_time()
    (idx, real), *_ = padded_user_batches(log.user_start, np.ones(len(log), bool), 1 << 16)
    f = encode_log(log, cfg, vocab).tensors(idx)
    cat_t = torch.from_numpy(
        np.where(real & (rng.random(idx.shape) < 0.8), rng.integers(0, len(vocab), idx.shape), -1)
    )
    hist = f["hist_cats"]
    hash_t = torch.where(torch.from_numpy(rng.random(idx.shape) < 0.5), hist[..., 0], hist[..., 1])
    lost = torch.from_numpy(rng.random(idx.shape) < 0.2) & (cat_t >= 0)  # outside vocabulary and history
    cat_t, hash_t = torch.where(lost, 0, cat_t), torch.where(lost, 987_654_321, hash_t)
    buy = torch.from_numpy(rng.random(idx.shape) < 0.3)
    obs = torch.from_numpy(real & (rng.random(idx.shape) < 0.7))
    state = tuple(0.1 * torch.randn(cfg.layers, idx.shape[0], cfg.hidden) for _ in range(2))
    return net, f, state, cat_t, hash_t, buy, obs


def test_a_window_with_its_category_head_in_blocks_gives_the_unblocked_gradients(monkeypatch):
    """A large catalog's training window runs its category head a block of cells at a time
    (blocked_window_backward): the loss, the final state and every parameter's gradient are those of
    the unblocked window (the same dropout draws), up to the order of float sums."""

    from demandstream.model.core import network
    from demandstream.model.training.losses import blocked_window_backward, loss_terms

    net, f, state, cat_t, hash_t, buy, obs = _window_case()
    share, weight = 0.7, 0.5
    torch.manual_seed(11)
    out, (h1, c1) = net(f, state, cat_at=cat_t >= 0)
    nll, bce, n_cat, n_buy = loss_terms(net, out, f, cat_t, hash_t, buy, obs)
    loss = share * (nll / max(n_cat, 1) + weight * bce / max(n_buy, 1))
    net.zero_grad(set_to_none=True)
    loss.backward()
    expected = {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}
    assert n_cat > 3 and n_buy > 0 and int((cat_t >= 0).sum()) > n_cat  # some targets are not rankable

    monkeypatch.setattr(network, "HEAD_BLOCK_MIN_ROWS", 3)
    monkeypatch.setattr(network, "HEAD_BLOCK_FLOATS", 1)
    net.zero_grad(set_to_none=True)
    torch.manual_seed(11)
    value, (h2, c2) = blocked_window_backward(net, f, state, cat_t, hash_t, buy, obs, share, weight)
    got = {n: p.grad for n, p in net.named_parameters() if p.grad is not None}
    assert value == pytest.approx(float(loss.detach()), rel=1e-6)
    assert torch.equal(h1, h2) and torch.equal(c1, c2)
    assert set(got) == set(expected)
    for name, g in expected.items():
        assert torch.allclose(got[name], g, rtol=1e-4, atol=1e-7), name
