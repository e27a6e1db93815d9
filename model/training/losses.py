"""The training losses: next-category NLL over the rankable targets and the purchase BCE over observable
labels, and a training window's backward pass in blocks of cells for large catalogs."""

from __future__ import annotations

import torch
from torch import nn

from demandstream.model.core.network import DemandLSTM, head_block_rows


def _category_nll(
    net: DemandLSTM, logits: torch.Tensor, hist_cats: torch.Tensor, cat_t: torch.Tensor, hash_t: torch.Tensor
) -> tuple[torch.Tensor | None, int]:
    """Summed NLL of the rankable targets among category cells (their logits, history and targets),
    and how many there are; None when no target can be ranked."""
    lp = net.category_log_prob({"cat_logits": logits}, {"hist_cats": hist_cats}, cat_t, hash_t)
    ok = torch.isfinite(lp)
    n = int(ok.sum())
    return (-lp[ok].sum() if n else None), n


def _purchase_bce(
    purchase_logit: torch.Tensor, buy: torch.Tensor, obs: torch.Tensor
) -> tuple[torch.Tensor | None, int]:
    """Summed purchase BCE over the observable cells, and how many there are; None when there are none."""
    n = int(obs.sum())
    if not n:
        return None, 0
    bce = nn.functional.binary_cross_entropy_with_logits(
        purchase_logit[obs], buy[obs].float(), reduction="sum"
    )
    return bce, n


def loss_terms(
    net: DemandLSTM,
    out: dict,
    f: dict,
    cat_t: torch.Tensor,
    hash_t: torch.Tensor,
    buy: torch.Tensor,
    obs: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """Summed category NLL (over rankable targets) and purchase BCE over the given cells, with counts.

    ``out["cat_logits"]`` holds only the cells where ``cat_t >= 0``, in order (:meth:`DemandLSTM.heads`'
    ``cat_at``), so that no [cells, C + K] tensor is copied to select them; every other input covers
    every cell."""
    zero = out["purchase_logit"].sum() * 0.0
    cat_mask = cat_t >= 0
    nll, n_cat = None, 0
    if bool(cat_mask.any()):
        nll, n_cat = _category_nll(
            net, out["cat_logits"], f["hist_cats"][cat_mask], cat_t[cat_mask], hash_t[cat_mask]
        )
    bce, n_buy = _purchase_bce(out["purchase_logit"], buy, obs)
    return zero if nll is None else nll, zero if bce is None else bce, n_cat, n_buy


def blocked_window_backward(
    net: DemandLSTM,
    f: dict,
    state: tuple[torch.Tensor, torch.Tensor],
    cat_t: torch.Tensor,
    hash_t: torch.Tensor,
    buy: torch.Tensor,
    obs: torch.Tensor,
    share: float,
    purchase_weight: float,
) -> tuple[float, tuple[torch.Tensor, torch.Tensor]]:
    """One training window's forward and backward with the category head a block of cells at a time:
    the gradients of ``share * (nll / n_cat + purchase_weight * bce / n_buy)``, the loss of the
    unblocked window (:func:`loss_terms`), accumulated into the parameters' ``.grad``; returns the
    loss's value and the window's final (h, c).

    The LSTM runs once and dropout is drawn over every cell, as :meth:`DemandLSTM.heads` does. The
    category head's input is cut from the graph, each block's NLL is backpropagated to it and to the
    head's weights, then the sum reaches the LSTM in one backward with the purchase loss. The
    gradients are the unblocked window's up to the order of float sums."""
    x = net.embed(f)
    lstm_out, state = net.lstm(x, state)
    sel = cat_t >= 0
    purchase_logit, hd_sel, f_sel, step_sel = net.purchase_and_category_inputs(lstm_out, f, sel)
    z = hd_sel.detach().requires_grad_()
    ct, ht = cat_t[sel], hash_t[sel]
    n, nll, n_cat = z.shape[0], 0.0, 0
    rows = head_block_rows(net.pop_logp.shape[0] + f["hist_cats"].shape[-1])
    for i in range(0, n, rows):
        b = slice(i, min(n, i + rows))
        fb = {k: v[b] for k, v in f_sel.items()}
        logits = net.category_head(z[b], fb, tuple(v[b] for v in step_sel))["cat_logits"]
        block_nll, block_n = _category_nll(net, logits, fb["hist_cats"], ct[b], ht[b])
        if block_nll is not None:
            block_nll.backward()
            nll += float(block_nll.detach())
            n_cat += block_n
    scale = share / max(n_cat, 1)
    for p in net.parameters():  # so far only the blocks' gradients: the category head's own weights
        if p.grad is not None:
            p.grad.mul_(scale)
    rest = purchase_logit.sum() * 0.0
    if z.grad is not None:
        rest = rest + (hd_sel * (z.grad * scale)).sum()
    bce_t, n_buy = _purchase_bce(purchase_logit, buy, obs)
    bce = 0.0
    if bce_t is not None:
        rest = rest + share * purchase_weight * bce_t / n_buy
        bce = float(bce_t.detach())
    rest.backward()
    return share * (nll / max(n_cat, 1) + purchase_weight * bce / max(n_buy, 1)), state
