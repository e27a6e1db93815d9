"""Scoring a network on validation points with each user's full context: MRR@20 and the losses the
epoch selection reads (:mod:`demandstream.model.training.selection`)."""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from demandstream.model.core.encoding import FeatureBuffer, padded_user_batches
from demandstream.model.core.network import DemandLSTM
from demandstream.model.data.eventlog import EventLog
from demandstream.model.data.split import Points
from demandstream.model.training.leave_out import OwnCounts
from demandstream.model.training.losses import loss_terms

#: Validation runs whole padded sequences in batches of at most this many (user, step) cells.
VALID_BATCH_CELLS = 1 << 15


#: Rank cut-off of the selection metric (MRR@20, the report's headline category metric).
SELECT_K = 20


class Targets(NamedTuple):
    """Per-row labels of one phase, as the loss and the validation metrics read them."""

    mask: np.ndarray  #: rows of the phase
    cat: np.ndarray  #: vocabulary index of the next category (0 = outside it), -1 = no category point
    cat_hash: np.ndarray  #: category_hash of the next category (0 where none)
    purchase: np.ndarray
    observable: np.ndarray


def phase_targets(pts: Points, next_hash: np.ndarray) -> Targets:
    return Targets(
        pts.mask, pts.cat_target, np.where(pts.cat_target >= 0, next_hash, 0), pts.purchase, pts.observable
    )


class _Batch(NamedTuple):
    out: dict
    f: dict
    cat_t: torch.Tensor
    hash_t: torch.Tensor
    buy: torch.Tensor
    obs: torch.Tensor


def full_context_batches(
    net: DemandLSTM,
    feats: FeatureBuffer,
    log: EventLog,
    pts: Targets,
    device: torch.device,
    own: OwnCounts | None = None,
    purchase_only: bool = False,
):
    """Yield :class:`_Batch` es of the points of ``pts`` ([n, ...] each, in the same order on every
    call); every user runs from its first event (eval mode, no grad), the heads only at the points
    (:meth:`DemandLSTM.forward_at`; with ``purchase_only``, the purchase head alone)."""
    net.eval()
    want = (pts.cat >= 0) | pts.observable
    for idx, real in padded_user_batches(log.user_start, want, VALID_BATCH_CELLS):
        f = feats.tensors(idx, device)
        cells = real & want[idx]
        if own is not None:
            own.attach(f, idx, device, cells)
        rows = idx[cells]
        with torch.no_grad():
            for part, out, fc in net.forward_at(f, torch.from_numpy(cells), purchase_only=purchase_only):
                r = rows[part]
                yield _Batch(
                    out,
                    fc,
                    torch.from_numpy(pts.cat[r]).to(device),
                    torch.from_numpy(pts.cat_hash[r]).to(device),
                    torch.from_numpy(pts.purchase[r]).to(device),
                    torch.from_numpy(pts.observable[r]).to(device),
                )


def target_ranks(
    net: DemandLSTM, out: dict, f: dict, cat_t: torch.Tensor, hash_t: torch.Tensor
) -> torch.Tensor:
    """Rank of each target under the model's distribution (ties count against it; a target the model
    cannot rank gets rank ``C + K + 1``). Cells are flattened: inputs are [n, ...]."""
    probs = net.category_probs(out, f)
    c = probs.shape[-1] - f["hist_cats"].shape[-1]
    col = net.target_columns(f, cat_t, hash_t, c)
    p_t = probs.gather(-1, col.clamp(min=0).unsqueeze(-1))
    rank = (probs >= p_t).sum(-1)
    return torch.where(col >= 0, rank, probs.shape[-1] + 1)


@torch.no_grad()
def validation_metrics(
    net: DemandLSTM,
    feats: FeatureBuffer,
    log: EventLog,
    pts: Targets,
    purchase_weight: float,
    device: torch.device,
    rr_out: list | None = None,
) -> dict[str, float]:
    """MRR@20, category NLL and purchase BCE on validation points, each user run from its first event.

    With ``rr_out``, each category point's reciprocal rank (0 beyond rank 20) is appended to it, in an
    order that is the same on every call with the same ``pts``."""
    tot_nll = tot_bce = rr = 0.0
    n_cat = n_buy = n_rank = 0
    for b in full_context_batches(net, feats, log, pts, device):
        # the category points' logits, selected once for the loss and the ranks
        m = b.cat_t >= 0
        out = {"cat_logits": b.out["cat_logits"][m], "purchase_logit": b.out["purchase_logit"]}
        nll, bce, nc, nb = loss_terms(net, out, b.f, b.cat_t, b.hash_t, b.buy, b.obs)
        tot_nll += float(nll)
        tot_bce += float(bce)
        n_cat += nc
        n_buy += nb
        if bool(m.any()):
            ranks = target_ranks(
                net,
                out,
                {k: b.f[k][m] for k in ("hist_cats", "hist_vocab")},
                b.cat_t[m],
                b.hash_t[m],
            )
            point_rr = torch.where(ranks <= SELECT_K, 1.0 / ranks.double(), 0.0)
            rr += float(point_rr.sum())
            if rr_out is not None:
                rr_out.append(point_rr.cpu().numpy())
            n_rank += int(m.sum())
    cat_loss = tot_nll / n_cat if n_cat else math.nan
    buy_loss = tot_bce / n_buy if n_buy else math.nan
    total = (0.0 if math.isnan(cat_loss) else cat_loss) + purchase_weight * (
        0.0 if math.isnan(buy_loss) else buy_loss
    )
    return {
        "loss": total,
        "mrr@20": rr / n_rank if n_rank else math.nan,
        "category_nll": cat_loss,
        "purchase_bce": buy_loss,
        "n_category_points": n_rank,
        "n_purchase_points": n_buy,
    }


@torch.no_grad()
def validation_purchase_bce(
    net: DemandLSTM, feats: FeatureBuffer, log: EventLog, pts: Targets, device: torch.device
) -> float:
    """:func:`validation_metrics`' ``purchase_bce`` (the same batches and sums, so the same number) from
    the purchase head alone: the purchase-head phase compares it after every epoch, and the category
    head, frozen then, is most of the cost on a shop with many categories."""
    tot = 0.0
    n = 0
    for b in full_context_batches(net, feats, log, pts, device, purchase_only=True):
        k = int(b.obs.sum())
        if k:
            logits = b.out["purchase_logit"][b.obs]
            tot += float(
                nn.functional.binary_cross_entropy_with_logits(logits, b.buy[b.obs].float(), reduction="sum")
            )
            n += k
    return tot / n if n else math.nan


def purchase_unjudged(va: Targets) -> str:
    """Why the validation points cannot judge a purchase head, or "" when they can: they need observable
    purchase windows of both outcomes. A validation window no longer than the horizon has none (every
    window runs past its end, §2 of docs/MODEL.md, "Honest labels"); one with only negatives would
    prefer the head that predicts lowest.

    >>> t = np.array([True, True, True]); f = ~t
    >>> purchase_unjudged(Targets(t, t, t, np.array([True, False, False]), t))
    ''
    >>> purchase_unjudged(Targets(t, t, t, t, f)), purchase_unjudged(Targets(t, t, t, f, t))
    ('no observable validation purchase window', 'no validation purchase window of both outcomes (0 of 3 bought)')
    """
    obs = va.mask & va.observable
    n, pos = int(obs.sum()), int((obs & va.purchase.astype(bool)).sum())
    if n == 0:
        return "no observable validation purchase window"
    if pos in (0, n):
        return f"no validation purchase window of both outcomes ({pos} of {n} bought)"
    return ""
