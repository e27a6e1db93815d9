"""Training DemandLSTM on a historical log: truncated BPTT over session-parallel lanes, chosen on validation.

The loop follows GRU4Rec's session-parallel mini-batches (Hidasi et al., ICLR 2016): ``B`` lanes each
hold one user; every iteration advances all lanes by a window of up to ``W`` events, carrying each lane's
(h, c) into the next window (detached: truncated BPTT) and resetting it when the lane takes a new user.
Users are shuffled every epoch; each window's loss is scaled by the share of its lanes × steps holding
real events, so the end of an epoch, when only a few lanes are still busy, cannot undo what it learned.
The learning rate warms up linearly, then follows a cosine to zero over the epoch budget.

Before the first step the network ranks categories exactly like the rule cascade
(:func:`demandstream.model.core.network.init_like_cascade`) with a Markov table learned from the training rows, so
training starts from the strongest heuristic. Loss = next-category NLL (targets the model can rank: in
the vocabulary, or in the user's history slots) + ``purchase_weight`` × BCE on observable purchase labels.

Selection and refit (docs/MODEL.md §2): after every epoch the model is scored on validation points with
full context; the epoch with the best validation MRR@20 is kept (ties: lower purchase log loss), and
training stops after ``patience`` epochs without improvement. Then, unless ``refit`` is off, a fresh
network is trained the same way on train + validation for the chosen number of epochs, so that model and
baselines see the same data before the test start. A validation window too small to decide anything
(< ``min_valid_category_points`` or < ``min_valid_positives``) is replaced by a hold-out of the last
``holdout_fraction`` of the training time, unless that hold-out has no more of either than the window
it would replace; the metrics say which chose and why.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from demandstream.model.core import checkpoint
from demandstream.model.core.encoding import (
    FeatureBuffer,
    category_hashes,
    category_index,
    encode_log,
    padded_user_batches,
)
from demandstream.model.core.features import PURCHASE_HORIZON_S, Vocabulary
from demandstream.model.core.network import (
    DemandLSTM,
    ModelConfig,
    funnel_table,
    head_block_rows,
    init_like_cascade,
    markov_tables,
)
from demandstream.model.core.scoring import resolve_device
from demandstream.model.data.eventlog import EventLog
from demandstream.model.data.sampling import (
    available_memory_bytes,
    suggested_user_sample,
    training_memory_bytes,
)
from demandstream.model.data.split import (
    Points,
    Split,
    main_span,
    next_category_targets,
    phase_points,
    temporal_split,
)
from demandstream.model.errors import DataError, OptionError
from demandstream.model.evaluation.baselines import CascadeMix, CascadeRecent
from demandstream.model.evaluation.evaluate import start_summary
from demandstream.model.training.averaging import WeightAverage

logger = logging.getLogger(__name__)

#: Each window is as long as this quantile of the lanes' remaining user lengths (at most ``bptt``):
#: padding stays small when lanes hold users of very different lengths.
WINDOW_QUANTILE = 0.75

#: Validation runs whole padded sequences in batches of at most this many (user, step) cells.
VALID_BATCH_CELLS = 1 << 15

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

#: The refit replays the selection's epochs, unless its training events are more than this many times
#: the selection's: then an epoch is no longer the same amount of training, and it replays the
#: selection's optimizer steps on the selection's learning-rate schedule (docs/MODEL.md §2, "Refit").
REFIT_STEPS_ABOVE_RATIO = 2.0

#: A training window whose category cells times output columns exceed this many floats runs its
#: category head a block of cells at a time (:func:`_blocked_window_backward`): at thousands of
#: categories the head's [cells, C + K] passes, forward and backward, are the epoch, and blocks that
#: stay in a core's cache were 23-32 % cheaper (docs/BENCHMARKS.md). Below it (a few hundred categories,
#: e.g. every generated shop and the REES46 samples) a window is one call, as before.
TRAIN_BLOCK_FLOATS = 1 << 20

#: Rank cut-off of the selection metric (MRR@20, the report's headline category metric).
SELECT_K = 20


@dataclass
class TrainConfig:
    """Training hyper-parameters (the network's own live in :class:`~demandstream.model.core.network.ModelConfig`)."""

    epochs: int = 12  #: upper bound (and the length of the cosine schedule); early stopping ends sooner
    lanes: int = 32  #: B, users advanced side by side (GRU4Rec's mini-batch)
    bptt: int = 32  #: W, events per window; gradients flow at most this far back
    lr: float = 3e-3  #: AdamW peak step size
    warmup_fraction: float = 0.05  #: share of all steps over which the step size rises linearly
    weight_decay: float = 1e-4  #: AdamW decoupled weight decay
    clip_norm: float = 5.0  #: gradient-norm clip; LSTMs occasionally spike
    purchase_weight: float = 1.0  #: weight of the purchase BCE relative to the category NLL
    patience: int = 3  #: epochs without validation improvement before stopping
    seed: int = 0
    threads: int | None = None  #: torch CPU threads; None = all cores
    max_categories: int = 50_000  #: vocabulary cap; categories beyond it are still repeated via history slots
    horizon_s: float = PURCHASE_HORIZON_S  #: purchase horizon (the stream's signals use the same)
    device: str = "auto"
    calibrate: bool = True  #: Platt-scale the purchase logit on validation points after training
    #: ... only when the validation points show miscalibration at this level (Cox's test); above 1 always fits
    calibration_alpha: float = CALIBRATION_ALPHA
    #: ... and only on a validation window at least this long (a daily cycle); 0 fits on any window
    calibration_min_window_s: float = CALIBRATION_MIN_WINDOW_S
    cascade_init: bool = True  #: start the feature weights where the ranking equals the rule cascade
    #: give the cascade start the history window validation chooses for ``cascade_recent`` (§4.10)
    choose_history_window: bool = True
    markov_leave_out: str = (
        "user"  #: what a training row's Markov features leave out: "user", "past", "row", "none"
    )
    refit: bool = True  #: after choosing the epochs on validation, retrain on train + validation
    #: ... replaying the chosen optimizer steps instead of epochs when the refit's events exceed this many
    #: times the selection's (:func:`refit_replay`)
    refit_steps_above_ratio: float = REFIT_STEPS_ABOVE_RATIO
    min_valid_category_points: int = 1000  #: below this (or the next), validate on a training hold-out
    min_valid_positives: int = 50
    holdout_fraction: float = 0.1  #: share of the training time span held out in that case
    #: after the joint epochs, up to this many epochs of the purchase head alone (the rest frozen), as
    #: many as lower the validation purchase log loss; 0 turns the phase off
    purchase_epochs: int = 8
    #: the category head is the earliest epoch whose validation MRR@20 is within this many standard
    #: errors of the best epoch's (the paired difference over the same points; Breiman's one-standard-
    #: error rule); 0 takes the best epoch itself
    select_se: float = 1.0
    #: weights are measured, kept and shipped as an exponential moving average of the optimizer's
    #: iterates with this decay per step (Polyak averaging, model/training/averaging.py; 0 turns it off)
    ema_decay: float = 0.995


def _bar_off(progress: bool) -> bool | None:
    """tqdm's ``disable``: off when not asked for; when asked, None lets tqdm turn it off unless
    stderr is a terminal."""
    return None if progress else True


#: Where the bar cannot show (output to a log file), a progress line every this many seconds instead.
PROGRESS_LINE_S = 60.0


class _Progress:
    """An epoch's progress: tqdm's bar with the running loss on a terminal; in a log file, where tqdm
    turns the bar off, a line every :data:`PROGRESS_LINE_S` seconds, so that an epoch of a large shop
    (minutes) is not silent until its end; nothing when progress was not asked for."""

    def __init__(self, total: int, desc: str, progress: bool):
        from tqdm import tqdm

        self.bar = tqdm(total=total, desc=desc, unit="ev", disable=_bar_off(progress), leave=False)
        self.lines = progress and self.bar.disable
        self.total, self.desc, self.done = total, desc, 0
        self.t0 = self.last = time.perf_counter()
        self.postfix: dict[str, str] = {}

    def update(self, n: int) -> None:
        self.bar.update(n)
        self.done += n
        if self.lines and time.perf_counter() - self.last >= PROGRESS_LINE_S:
            from tqdm import tqdm

            self.last = time.perf_counter()
            rate = self.done / max(self.last - self.t0, 1e-9)
            loss = "".join(f", {k} {v}" for k, v in self.postfix.items())
            tqdm.write(f"{self.desc}: {self.done:,} of {self.total:,} events, {rate:,.0f} events/s{loss}")

    def set_postfix(self, **kw: str) -> None:
        self.postfix = kw
        self.bar.set_postfix(**kw)

    def close(self) -> None:
        self.bar.close()


@dataclass
class TrainResult:
    net: DemandLSTM
    vocab: Vocabulary
    metrics: dict = field(default_factory=dict)


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % (1 << 32))


def _user_ranges(user_start: np.ndarray, mask: np.ndarray) -> list[tuple[int, int]]:
    """(start, end) rows of every user's masked prefix (rows are time-sorted, so a mask ts < T is one)."""
    out = []
    csum = np.r_[0, np.cumsum(mask)]
    for u in range(len(user_start) - 1):
        s, e = int(user_start[u]), int(user_start[u + 1])
        k = int(csum[e] - csum[s])
        if k > 0:
            out.append((s, s + k))
    return out


def _epoch_order(ranges: list[tuple[int, int]], rng: np.random.Generator) -> list[tuple[int, int]]:
    """Users in a fresh random order every epoch (SGD's assumption; GRU4Rec shuffles sessions too)."""
    return [ranges[i] for i in rng.permutation(len(ranges))]


def _lane_windows(ranges: list[tuple[int, int]], lanes: int, window: int):
    """Yield (idx [B, T], valid [B, T], reset [B]) windows of GRU4Rec session-parallel lanes.

    ``reset[b]`` says lane b starts a new user in this window (its state must be zeroed). A lane whose
    user ends inside the window repeats the user's last row (masked out): the LSTM is causal, so padding
    after the end cannot change earlier outputs. When no users remain, finished lanes go idle.
    """
    queue = iter(ranges)
    cur: list[list[int] | None] = [None] * lanes  # [pos, end] per lane
    started = [False] * lanes
    while True:
        reset = np.zeros(lanes, bool)
        for b in range(lanes):
            if cur[b] is None or cur[b][0] >= cur[b][1]:
                nxt = next(queue, None)
                cur[b] = None if nxt is None else [nxt[0], nxt[1]]
                reset[b] = True
                started[b] = nxt is not None
        active = [b for b in range(lanes) if cur[b] is not None]
        if not active:
            return
        # Window length: the WINDOW_QUANTILE of the lanes' remaining lengths (capped at W), not the
        # maximum: a few long users then continue in the next window (state carried) instead of
        # forcing every short lane to pad up to W.
        rem = np.array([cur[b][1] - cur[b][0] for b in active])
        t = int(min(window, max(1, np.ceil(np.quantile(rem, WINDOW_QUANTILE)))))
        idx = np.zeros((len(active), t), np.int64)
        valid = np.zeros((len(active), t), bool)
        for k, b in enumerate(active):
            pos, end = cur[b]
            n = min(t, end - pos)
            idx[k, :n] = np.arange(pos, pos + n)
            idx[k, n:] = pos + n - 1
            valid[k, :n] = True
            cur[b][0] = pos + n
        yield np.array(active), idx, valid, reset


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


def _blocked_window_backward(
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
    unblocked window (:func:`_loss_terms`), accumulated into the parameters' ``.grad``; returns the
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


def _loss_terms(
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


class _Batch(NamedTuple):
    out: dict
    f: dict
    cat_t: torch.Tensor
    hash_t: torch.Tensor
    buy: torch.Tensor
    obs: torch.Tensor


def _full_context_batches(
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
    for b in _full_context_batches(net, feats, log, pts, device):
        # the category points' logits, selected once for the loss and the ranks
        m = b.cat_t >= 0
        out = {"cat_logits": b.out["cat_logits"][m], "purchase_logit": b.out["purchase_logit"]}
        nll, bce, nc, nb = _loss_terms(net, out, b.f, b.cat_t, b.hash_t, b.buy, b.obs)
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
    for b in _full_context_batches(net, feats, log, pts, device, purchase_only=True):
        k = int(b.obs.sum())
        if k:
            logits = b.out["purchase_logit"][b.obs]
            tot += float(
                nn.functional.binary_cross_entropy_with_logits(logits, b.buy[b.obs].float(), reduction="sum")
            )
            n += k
    return tot / n if n else math.nan


def _validation_with_ranks(
    net: DemandLSTM,
    feats: FeatureBuffer,
    log: EventLog,
    pts: Targets,
    tcfg: TrainConfig,
    device: torch.device,
) -> tuple[dict[str, float], np.ndarray]:
    """:func:`validation_metrics` and every category point's reciprocal rank, for :func:`one_se_epoch`."""
    parts: list = []
    val = validation_metrics(net, feats, log, pts, tcfg.purchase_weight, device, parts)
    return val, np.concatenate(parts) if parts else np.zeros(0)


#: Parameters of the next-category head. At the cascade start their LSTM-dependent parts are zero, so
#: that head can be combined with the LSTM and purchase head of any epoch without changing its output.
CATEGORY_HEAD = (
    "slot_w0",
    "vocab_w0",
    "slot_ctx.",
    "vocab_ctx.",
    "explore.",
    "repeat_query.",
    "repeat_emb.",
    "mix_decay",
)


def _snapshot(net: DemandLSTM) -> dict:
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def _improves(history: list[dict], val: dict) -> bool:
    """Whether ``val`` beats every earlier epoch on validation MRR@20 or on purchase BCE."""
    mrr = [h["mrr@20"] for h in history if not math.isnan(h.get("mrr@20", math.nan))]
    bce = [
        h["purchase_bce"]
        for h in history
        if h["epoch"] > 0 and not math.isnan(h.get("purchase_bce", math.nan))
    ]
    return (not math.isnan(val["mrr@20"]) and (not mrr or val["mrr@20"] > max(mrr) + 1e-9)) or (
        not math.isnan(val["purchase_bce"]) and (not bce or val["purchase_bce"] < min(bce) - 1e-9)
    )


def one_se_epoch(history: list[dict], rr: dict[int, np.ndarray], n_se: float) -> int:
    """The earliest epoch whose validation MRR@20 is within ``n_se`` standard errors of the best one's.

    The standard error is that of the mean paired difference of reciprocal ranks (``rr[epoch]``, the
    same points in the same order), so it measures how much two epochs really differ on these points.
    Without ``rr`` for an epoch, or with ``n_se`` 0, the best epoch itself (earliest on ties). Why: the
    refit replays the chosen count on more data, and an epoch on the edge of overfitting (validation
    MRR falling off a cliff one epoch later, as on the cosmetics sample from epoch 4) lands there less
    reliably than an earlier one that validation cannot tell from it (Hastie, Tibshirani & Friedman,
    *Elements of Statistical Learning*, §7.10: the one-standard-error rule).

    >>> h = [{"epoch": 0, "mrr@20": 0.60}, {"epoch": 1, "mrr@20": 0.70}, {"epoch": 2, "mrr@20": 0.71}]
    >>> rr = {0: np.full(100, 0.6), 1: np.r_[np.full(50, 0.55), np.full(50, 0.85)], 2: np.full(100, 0.71)}
    >>> one_se_epoch(h, rr, 1.0), one_se_epoch(h, rr, 0.0)
    (1, 2)
    """

    def key(h):
        v = h.get("mrr@20", math.nan)
        return -math.inf if math.isnan(v) else v

    best = max(history, key=lambda h: (key(h), -h["epoch"]))
    if n_se <= 0 or best["epoch"] not in rr:
        return best["epoch"]
    for h in sorted(history, key=lambda h: h["epoch"]):
        e = h["epoch"]
        if e == best["epoch"]:
            break
        if e not in rr or len(rr[e]) != len(rr[best["epoch"]]) or not len(rr[e]):
            continue
        d = rr[best["epoch"]] - rr[e]
        se = float(d.std(ddof=1) / math.sqrt(len(d))) if len(d) > 1 else 0.0
        if key(h) >= key(best) - n_se * se:
            return e
    return best["epoch"]


def _select(
    net: DemandLSTM,
    history: list[dict],
    states: dict[int, dict],
    rr: dict[int, np.ndarray] | None = None,
    n_se: float = 0.0,
    purchase_judged: bool = True,
) -> tuple[int, int, dict]:
    """Load the chosen weights into ``net``; return (epochs to train, category-head epoch, its metrics).

    The category head comes from the epoch :func:`one_se_epoch` picks (the best validation MRR@20
    with ``n_se`` 0, earliest on ties), the rest from that same epoch, except when it is epoch 0 (the
    untrained start): then the LSTM and the purchase head come from the trained epoch with the lowest
    validation purchase BCE, unless validation cannot judge purchases (``purchase_judged`` False,
    :func:`purchase_unjudged`): then nothing trained is kept, and the refit trains no joint epoch.
    """
    cat_ep = one_se_epoch(history, rr or {}, n_se)
    trained = [h for h in history if h["epoch"] > 0]
    if cat_ep > 0 or not trained or not purchase_judged:
        net.load_state_dict(states[cat_ep])
        return cat_ep, cat_ep, next(h for h in history if h["epoch"] == cat_ep)
    buy_ep = min(
        trained,
        key=lambda h: (
            h["purchase_bce"] if not math.isnan(h.get("purchase_bce", math.nan)) else math.inf,
            h["epoch"],
        ),
    )["epoch"]
    merged = dict(states[buy_ep])
    merged.update({k: v for k, v in states[0].items() if k.startswith(CATEGORY_HEAD)})
    net.load_state_dict(merged)
    hb = next(h for h in history if h["epoch"] == buy_ep)
    h0 = history[0]
    return buy_ep, 0, {**hb, "mrr@20": h0["mrr@20"], "category_nll": h0["category_nll"], "epoch": buy_ep}


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
    for b in _full_context_batches(net, feats, log, pts, device, purchase_only=True):
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


def _markov_pairs(
    log: EventLog, cats: np.ndarray, rows: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(current, next) vocabulary-index pairs of consecutive ``rows`` of one user, the row index of each
    pair, and every row's current category (0 = none yet). The current category of an event without
    one is the user's last known category, as the network's history slots have it."""
    n = len(cats)
    user_first = np.repeat(log.user_start[:-1], np.diff(log.user_start))
    known = rows & (cats > 0)
    last_known = np.maximum.accumulate(np.where(known, np.arange(n), -1))
    current = np.where(last_known >= user_first, cats[np.maximum(last_known, 0)], 0)
    nxt = np.r_[cats[1:], 0]
    same_user = np.r_[user_first[1:], -1] == user_first
    ok = same_user & rows & np.r_[rows[1:], False] & (current > 0) & (nxt > 0)
    return np.stack([current[ok], nxt[ok]], axis=1), np.flatnonzero(ok), current.astype(np.int64)


class PairCounts(NamedTuple):
    """Each user's transitions, keyed ``user * C + a``: how many leave ``a`` (``total``) and how many go
    to each stored successor of ``a`` (``to_next``, aligned with the Markov table's row ``a``).

    One lookup answers both questions for any array of keys; a key with no transition (``a = 0``
    included) answers zeros.

    >>> pc = PairCounts.of(np.array([0, 0, 1]), np.array([[1, 2], [1, 3], [1, 2]]), np.array([[0, 0], [2, 3]]), 2)
    >>> [x.tolist() for x in pc.lookup(np.array([0 * 2 + 1, 1 * 2 + 1, 1 * 2 + 0]))]
    [[[1.0, 1.0], [1.0, 0.0], [0.0, 0.0]], [2.0, 1.0, 0.0]]
    """

    keys: np.ndarray  #: int64, sorted and unique
    total: np.ndarray  #: float32 [keys]
    to_next: np.ndarray  #: float32 [keys, K]

    @classmethod
    def of(cls, pair_user: np.ndarray, pairs: np.ndarray, table_next: np.ndarray, c: int) -> PairCounts:
        key = pair_user.astype(np.int64) * c + pairs[:, 0]
        order = np.argsort(key, kind="stable")
        key, a, b = key[order], pairs[order, 0], pairs[order, 1]
        keys, first, total = np.unique(key, return_index=True, return_counts=True)
        # Markov rows hold distinct successors (0 pads them and is never a pair's successor)
        hits = (table_next[a] == b[:, None]).astype(np.float32)
        to_next = np.add.reduceat(hits, first, axis=0) if len(key) else hits
        return cls(keys, total.astype(np.float32), to_next)

    def lookup(self, key: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(to_next [..., K], total [...])`` of each key of ``key`` (any shape), float32."""
        if not len(self.keys):
            return np.zeros((*np.shape(key), self.to_next.shape[1]), np.float32), np.zeros(
                np.shape(key), np.float32
            )
        i = np.searchsorted(self.keys, key).clip(max=len(self.keys) - 1)
        hit = self.keys[i] == key
        return self.to_next[i] * hit[..., None], self.total[i] * hit


class OwnCounts(NamedTuple):
    """Per row, the Markov transitions its own training contributed (see :meth:`DemandLSTM.markov_row`),
    for the row's current category and for every category in its history
    (:meth:`DemandLSTM.markov_history`), looked up per batch.

    Why per batch, from per-user tables: stored per row, the current category's counts were 128 bytes
    per event of the log and their computation held about 1.2 KB per event of temporaries (a million-
    event log's preparation peaked 1.2 GB above its features); and looking the per-slot counts up as
    three binary searches per (row, slot, successor) cost 50 ms of every 1,024-event training step.
    """

    current: np.ndarray  #: int64 [n]: the row's current category
    table_next: np.ndarray  #: int64 [C, K]: the stored successors of each category
    #: the row's user [n] (``"user"`` and ``"past"`` modes)
    user: np.ndarray | None = None
    #: ``"user"`` mode: every transition of the row's user is left out, whenever it happened
    pair_counts: PairCounts | None = None
    #: ``"past"`` mode: the counts of (user, a) and (user, a, b) pairs at or after a row
    past: tuple[CountsFrom, CountsFrom] | None = None
    #: ``"row"`` mode: each row's own transition, (float32 [n, K] to each stored successor, float32 [n])
    by_row: tuple[np.ndarray, np.ndarray] | None = None

    def current_counts(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Own transitions of rows ``idx`` (any shape) to each stored successor of the row's current
        category (float32 [..., K]) and out of it in all (float32 [...])."""
        if self.by_row is not None:
            count, total = self.by_row
            return count[idx], total[idx]
        cur = self.current[idx]
        key = self.user[idx] * int(self.table_next.shape[0]) + cur
        if self.pair_counts is not None:
            return self.pair_counts.lookup(key)
        return self._past_counts(key, cur, idx)

    def attach(self, f: dict, idx: np.ndarray, device: torch.device, cells: np.ndarray | None = None) -> None:
        """Add the row's own counts to the features ``f`` of the log rows ``idx`` ([B, T] or [n]).

        With ``cells`` (a bool mask of ``idx``'s shape), the per-slot counts are computed only there and
        are zero elsewhere: only the heads read them, and a pass that runs the heads at a sample of
        points (the cascade-scale fit) would otherwise look up every slot of every cell of the log
        (about 2 minutes of a million-event log's preparation)."""
        count, total = self.current_counts(idx)
        f["markov_own_count"] = torch.from_numpy(count).to(device)
        f["markov_own_total"] = torch.from_numpy(total).to(device)
        hv = f["hist_vocab"].cpu().numpy()  # [..., slots]
        if cells is None:
            slot_total, slot_count = self._slot_counts(hv, idx)
        else:
            k = int(self.table_next.shape[1])
            slot_total = np.zeros(hv.shape, np.float32)
            slot_count = np.zeros((*hv.shape, k), np.float32)
            slot_total[cells], slot_count[cells] = self._slot_counts(hv[cells], idx[cells])
        f["markov_own_slot_count"] = torch.from_numpy(slot_count).to(device)
        f["markov_own_slot_total"] = torch.from_numpy(slot_total).to(device)

    def _past_counts(self, key: np.ndarray, a: np.ndarray, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``"past"`` mode: transitions of keys ``user * C + a`` at or after rows ``idx`` (same shape)."""
        ua, uab = self.past
        c = int(self.table_next.shape[0])
        total = ua.at_or_after(key, idx)
        count = uab.at_or_after(key[..., None] * c + self.table_next[a], idx[..., None])
        known = a > 0
        return count * known[..., None], total * known

    def _slot_counts(self, hv: np.ndarray, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Own transitions out of each history slot's category ([..., slots]) and to each of its stored
        successors ([..., slots, K]), for rows ``idx`` whose slots hold the vocabulary indices ``hv``."""
        if self.by_row is not None:
            count, total = self.by_row
            is_current = (hv == self.current[idx][..., None]) & (hv > 0)
            slot_total = np.where(is_current, total[idx][..., None], 0.0).astype(np.float32)
            slot_count = np.where(is_current[..., None], count[idx][..., None, :], 0.0).astype(np.float32)
            return slot_total, slot_count
        key = self.user[idx][..., None] * int(self.table_next.shape[0]) + hv
        if self.pair_counts is not None:
            slot_count, slot_total = self.pair_counts.lookup(key)
        else:
            slot_count, slot_total = self._past_counts(key, hv, np.broadcast_to(idx[..., None], hv.shape))
        return slot_total, slot_count


class CountsFrom(NamedTuple):
    """How often each key occurs at or after a given row: ``keys`` sorted and unique, ``comp`` the
    sorted ``rank of the key * stride + row`` of every occurrence.

    >>> cf = CountsFrom.of(np.array([7, 3, 7, 7]), np.array([0, 1, 2, 5]), n_rows=6)
    >>> cf.at_or_after(np.array([7, 7, 7, 3, 4]), np.array([0, 2, 3, 0, 0])).tolist()
    [3.0, 2.0, 1.0, 1.0, 0.0]
    """

    keys: np.ndarray
    comp: np.ndarray
    stride: int

    @classmethod
    def of(cls, keys: np.ndarray, rows: np.ndarray, n_rows: int) -> CountsFrom:
        uniq, rank = np.unique(keys, return_inverse=True)
        stride = n_rows + 1
        return cls(uniq, np.sort(rank.astype(np.int64) * stride + rows), stride)

    def at_or_after(self, q: np.ndarray, row: np.ndarray | int = 0) -> np.ndarray:
        """Occurrences of each key of ``q`` at a row ``>= row`` (broadcast; 0 = all of them), float32."""
        if not len(self.keys):
            return np.zeros(np.shape(q), np.float32)
        i = np.searchsorted(self.keys, q).clip(max=len(self.keys) - 1)
        lo = np.searchsorted(self.comp, i * self.stride + row)
        hi = np.searchsorted(self.comp, (i + 1) * self.stride)
        return np.where(self.keys[i] == q, hi - lo, 0).astype(np.float32)


def own_markov_counts(
    log: EventLog,
    pairs: np.ndarray,
    pair_rows: np.ndarray,
    current: np.ndarray,
    table_next: np.ndarray,
    mode: str,
) -> OwnCounts | None:
    """What each training row must not see of the Markov table: its own transition (``mode="row"``),
    every transition of its own user (``"user"``: a user's later transitions are the future, and even
    the earlier ones make the training feature stronger than it is for a user the table never saw), or
    its user's transitions from this row on (``"past"``: the table then holds what it holds for a
    returning user at test time, the user's earlier transitions). ``"none"`` (ablation only) leaves
    the table as it is.

    >>> from demandstream.model.core.events import Event
    >>> log = EventLog.from_events([Event(f"e{i}", "u", float(i), "view", "i") for i in range(3)]).sorted_by_user_time()
    >>> pairs, rows = np.array([[1, 2], [2, 1]]), np.array([0, 1])
    >>> oc = own_markov_counts(log, pairs, rows, np.array([1, 2, 1]), np.array([[0, 0], [0, 2], [0, 1]]), "user")
    >>> [a.tolist() for a in oc.current_counts(np.arange(3))]
    [[[0.0, 1.0], [0.0, 1.0], [0.0, 1.0]], [1.0, 1.0, 1.0]]
    >>> oc = own_markov_counts(log, pairs, rows, np.array([1, 2, 1]), np.array([[0, 0], [0, 2], [0, 1]]), "past")
    >>> [a.tolist() for a in oc.current_counts(np.arange(3))]
    [[[0.0, 1.0], [0.0, 1.0], [0.0, 0.0]], [1.0, 1.0, 0.0]]
    """
    n, k = len(current), table_next.shape[1]
    if mode == "none":
        return None
    if mode == "row":
        count = np.zeros((n, k), np.float32)
        total = np.zeros(n, np.float32)
        total[pair_rows] = 1.0
        count[pair_rows] = table_next[pairs[:, 0]] == pairs[:, 1:2]
        return OwnCounts(current, table_next, by_row=(count, total))
    if mode not in ("user", "past"):
        raise ValueError(f"unknown markov_leave_out {mode!r}: expected user, past, row or none")
    c = int(table_next.shape[0])
    user = np.repeat(np.arange(log.n_users, dtype=np.int64), np.diff(log.user_start))
    pu = user[pair_rows]
    if mode == "user":
        return OwnCounts(current, table_next, user, pair_counts=PairCounts.of(pu, pairs, table_next, c))
    ua = CountsFrom.of(pu * c + pairs[:, 0], pair_rows, n)
    uab = CountsFrom.of((pu * c + pairs[:, 0]) * c + pairs[:, 1], pair_rows, n)
    return OwnCounts(current, table_next, user, past=(ua, uab))


#: Training points on which the cascade's scale is fitted (a 1-parameter fit: a sample suffices).
SCALE_FIT_POINTS = 20_000
#: ... and fewer when points x (C + K) columns would pass this: the fit holds a few float64 copies of
#: that matrix, 4 GB at 3,600 categories with 20,000 points, and a shop may have 50,000 categories.
SCALE_FIT_FLOATS = 1 << 25
#: Up to this many logits the fit runs on the whole matrix at once; a larger one (a catalog of more than
#: ~400 categories) is scored in chunks of :data:`SCALE_FIT_CHUNK_FLOATS`, its float64 copies made per
#: chunk: measured on a generated shop of 5,730 categories, the whole-matrix fit (5,839 points) was the
#: peak of training (2.74 GB), about 1.2 GB above the epochs'.
SCALE_FIT_WHOLE_FLOATS = 1 << 23
SCALE_FIT_CHUNK_FLOATS = 1 << 21


@torch.no_grad()
def _calibrate_cascade_scale(
    net: DemandLSTM,
    feats: FeatureBuffer,
    log: EventLog,
    tr: Targets,
    device: torch.device,
    rng: np.random.Generator,
    own: OwnCounts | None = None,
) -> float:
    """Multiply the cascade's base weights by the temperature that minimises the training NLL.

    The cascade weights only fix an order; their scale makes the initial distribution far too sharp
    (NLL ~5 nats on the cosmetics sample). Left to Adam, which moves every weight by about the step
    size whatever its gradient, the first epochs spend themselves undoing that sharpness in ways that
    reorder the ranking. One scalar fitted by LBFGS keeps the cascade's order exactly and starts
    gradient training from calibrated probabilities. Returns the fitted scale.
    """
    rows = np.flatnonzero(tr.cat >= 0)
    if not len(rows):
        return 1.0
    columns = int(net.pop_logp.shape[0]) + net.cfg.history_slots
    size = min(SCALE_FIT_POINTS, max(1, SCALE_FIT_FLOATS // columns), len(rows))
    rows = np.sort(rng.choice(rows, size=size, replace=False))
    sample = np.full(len(tr.cat), -1, np.int64)
    sample[rows] = tr.cat[rows]
    was_training = net.training
    net.eval()
    parts = []
    only_sample = Targets(tr.mask, sample, tr.cat_hash, tr.purchase, np.zeros_like(tr.observable))
    for b in _full_context_batches(net, feats, log, only_sample, device, own):
        m = b.cat_t >= 0
        parts.append((b.out["cat_logits"][m], b.f["hist_cats"][m], b.cat_t[m], b.hash_t[m]))
    whole = sum(p[0].numel() for p in parts) <= SCALE_FIT_WHOLE_FLOATS
    if whole:
        chunks = [_scale_fit_chunk(net, *(torch.cat(x) for x in zip(*parts, strict=True)), keep_double=True)]
    else:
        rows_per = max(1, SCALE_FIT_CHUNK_FLOATS // columns)
        chunks = [
            _scale_fit_chunk(net, *(x[i : i + rows_per] for x in part), keep_double=False)
            for part in parts
            for i in range(0, part[0].shape[0], rows_per)
        ]
    del parts
    n = sum(len(c[2]) for c in chunks)
    # the temperature is fitted as its log: a negative scale would turn the masked columns' -1e9 into
    # the largest logits, and the line search does try one
    log_scale = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_scale], lr=1.0, max_iter=100, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        with torch.enable_grad():
            if whole:
                z, f, cat_t, hash_t = chunks[0]
                loss = -net.category_log_prob({"cat_logits": log_scale.exp() * z}, f, cat_t, hash_t).mean()
                loss.backward()
                return loss
            # the mean over every point, one chunk's graph at a time (the gradients add up in log_scale)
            total = torch.zeros((), dtype=torch.float64)
            for z, f, cat_t, hash_t in chunks:
                zd = z.double()
                part = (
                    -net.category_log_prob({"cat_logits": log_scale.exp() * zd}, f, cat_t, hash_t).sum() / n
                )
                part.backward()
                total += part.detach()
            return total

    opt.step(closure)
    a = float(log_scale.detach().exp().clamp(min=1e-3))
    net.slot_w0.mul_(a)
    net.vocab_w0.mul_(a)
    net.train(was_training)
    logger.info("cascade scale fitted on %d training points: %.4f", n, a)
    return a


def _finite_logits(z: torch.Tensor) -> torch.Tensor:
    """-inf marks candidates that are never scored; a large finite value keeps them at probability 0
    without turning the scale's gradient into NaN."""
    return torch.where(torch.isfinite(z), z, torch.full_like(z, -1e9))


def _scale_fit_chunk(net: DemandLSTM, logits, hist_cats, cat_t, hash_t, keep_double: bool) -> tuple:
    """The rankable points of one chunk of the cascade-scale fit: ``(logits, {"hist_cats": ...}, cat_t,
    hash_t)``, the never-scored candidates made finite, the logits as float64 (``keep_double``) or
    narrowed back to float32, to be widened per use: the same values either way, since they came as
    float32 and -1e9 is one (2^9 × 1,953,125)."""
    z = _finite_logits(logits.double())
    f = {"hist_cats": hist_cats}
    ok = torch.isfinite(net.category_log_prob({"cat_logits": z}, f, cat_t, hash_t))  # rankable targets only
    kept = z[ok] if keep_double else z[ok].float()
    return kept, {"hist_cats": hist_cats[ok]}, cat_t[ok], hash_t[ok]


@dataclass
class _Fit:
    """One training run's outcome."""

    net: DemandLSTM
    history: list[dict]
    best_epoch: int
    best: dict | None
    train_seconds: float
    steps: int
    n_train: int
    n_users: int
    category_epoch: int  #: epoch whose category head was kept (0 = the calibrated cascade start)
    purchase_epochs: int = 0  #: epochs of the purchase head alone after the joint ones
    purchase_history: list[dict] = field(default_factory=list)
    #: the purchase phase started from the funnel table alone (the MLP's correction reset to zero)
    purchase_from_funnel: bool = False
    #: the length of the learning-rate schedule in optimizer steps (warm-up and cosine over it)
    schedule_steps: int = 0
    #: the same for the purchase-head phase (cosine over its whole budget)
    purchase_schedule_steps: int = 0
    #: why the validation points could not judge a purchase head ("" when they could, or without them)
    purchase_unjudged: str = ""

    def steps_at(self, epoch: int) -> int:
        """Optimizer steps taken by the end of ``epoch`` (0 for the start)."""
        return _steps_at(self.history, epoch)

    def purchase_steps_at(self, epoch: int) -> int:
        """Optimizer steps of the purchase-head phase by the end of its ``epoch`` (0 for its start)."""
        return _steps_at(self.purchase_history, epoch)


def _steps_at(history: list[dict], epoch: int) -> int:
    """The ``steps`` count a phase's history recorded at the end of ``epoch`` (0 when it has none)."""
    return next((int(h.get("steps", 0)) for h in history if h["epoch"] == epoch), 0)


def _fit(
    log: EventLog,
    feats: FeatureBuffer,
    vocab: Vocabulary,
    tr: Targets,
    va: Targets | None,
    mcfg: ModelConfig,
    tcfg: TrainConfig,
    device: torch.device,
    rng: np.random.Generator,
    epochs: int,
    progress: bool,
    desc: str,
    category_from_start: bool = False,
    start_mixture: bool = False,
    purchase_epochs: int | None = None,
    purchase_from_funnel: bool = False,
    max_steps: int | None = None,
    schedule_steps: int | None = None,
    purchase_max_steps: int | None = None,
    purchase_schedule_steps: int | None = None,
) -> _Fit:
    """Train a fresh network on the ``tr`` points for up to ``epochs`` epochs; with ``va``, keep the best
    epoch by :func:`_better` and stop after ``patience`` epochs without improvement. ``max_steps`` ends
    the joint training after that many optimizer steps, mid-epoch if need be, and ``schedule_steps``
    lays the learning-rate schedule over that many steps instead of ``tcfg.epochs`` epochs of these
    points (a refit replaying a selection's steps, :data:`REFIT_STEPS_ABOVE_RATIO`). Then the purchase
    head alone (:func:`_fit_purchase_head`): as many epochs as ``va`` chooses, or ``purchase_epochs``
    (from the funnel table alone when ``purchase_from_funnel``, as a validated run chose), bounded and
    scheduled the same way by ``purchase_max_steps`` and ``purchase_schedule_steps``."""
    from tqdm import tqdm

    tr_mask = tr.mask
    ranges = _user_ranges(log.user_start, tr_mask)
    n_train = int(tr_mask.sum())
    cats = feats.cat
    net = DemandLSTM(mcfg).to(device)
    pairs, pair_rows, current = _markov_pairs(log, cats, tr_mask)
    tables = markov_tables(cats[tr_mask], pairs, len(vocab), mcfg.markov_top_k)
    obs = tr_mask & tr.observable
    tables["funnel_logit"] = funnel_table(feats.etype[obs], feats.cart[obs] > 0, tr.purchase[obs])
    net.set_tables(tables)
    own = own_markov_counts(log, pairs, pair_rows, current, tables["next"], tcfg.markov_leave_out)
    if tcfg.cascade_init:
        init_like_cascade(net, mixture=start_mixture)
        _calibrate_cascade_scale(net, feats, log, tr, device, rng, own)
    opt = torch.optim.AdamW(net.parameters(), lr=tcfg.lr, weight_decay=tcfg.weight_decay)
    # steps per epoch are known only after dealing the lanes once; the windows do not depend on the order
    steps_per_epoch = sum(1 for _ in _lane_windows(ranges, tcfg.lanes, tcfg.bptt))
    total = max(1, schedule_steps or steps_per_epoch * tcfg.epochs)
    warm = max(1, int(tcfg.warmup_fraction * total))

    def lr_at(step: int) -> float:
        if step < warm:
            return tcfg.lr * (step + 1) / warm
        return tcfg.lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warm) / max(1, total - warm))))

    history: list[dict] = []
    states: dict[int, dict] = {}
    rr_by_epoch: dict[int, np.ndarray] = {}  # validation reciprocal ranks per epoch (one_se_epoch)
    start = _snapshot(net)
    if va is not None and epochs > 0:
        # Epoch 0, the untrained start (the calibrated cascade when cascade_init), is a candidate for
        # the category head: training must beat it on validation MRR@20 to be kept.
        val0, rr_by_epoch[0] = _validation_with_ranks(net, feats, log, va, tcfg, device)
        states[0] = _snapshot(net)
        history.append({"epoch": 0, "train_loss": math.nan, "steps": 0, **val0})
    train_time, step, bad = 0.0, 0, 0
    ema = WeightAverage(net, tcfg.ema_decay) if tcfg.ema_decay > 0 else None
    for epoch in range(1, epochs + 1):
        net.train()
        h, c = net.initial_state(tcfg.lanes, device)
        run_loss, run_n = 0.0, 0
        t_ep = time.perf_counter()
        bar = _Progress(n_train, f"{desc} epoch {epoch}", progress)
        for active, idx, valid, reset in _lane_windows(_epoch_order(ranges, rng), tcfg.lanes, tcfg.bptt):
            keep = (~torch.from_numpy(reset).to(device)).float().view(1, -1, 1)
            h, c = (h * keep).detach(), (c * keep).detach()
            a = torch.from_numpy(active).to(device)
            f = feats.tensors(idx, device)
            if own is not None:
                own.attach(f, idx, device)
            cat_t = torch.from_numpy(np.where(valid, tr.cat[idx], -1)).to(device)
            hash_t = torch.from_numpy(tr.cat_hash[idx]).to(device)
            obs = torch.from_numpy(valid & tr.observable[idx]).to(device)
            buy = torch.from_numpy(tr.purchase[idx]).to(device)
            # Scale by the share of the full lanes × window that holds real events, so a window where
            # only a few lanes are still busy moves the weights proportionally less.
            share = float(valid.sum()) / (tcfg.lanes * valid.shape[1])
            for g in opt.param_groups:
                g["lr"] = lr_at(step)
            opt.zero_grad(set_to_none=True)
            columns = net.pop_logp.shape[0] + f["hist_cats"].shape[-1]
            if int((cat_t >= 0).sum()) * columns > TRAIN_BLOCK_FLOATS:
                loss_value, (h_a, c_a) = _blocked_window_backward(
                    net, f, (h[:, a], c[:, a]), cat_t, hash_t, buy, obs, share, tcfg.purchase_weight
                )
            else:
                out, (h_a, c_a) = net(f, (h[:, a], c[:, a]), cat_at=cat_t >= 0)
                nll, bce, n_cat, n_buy = _loss_terms(net, out, f, cat_t, hash_t, buy, obs)
                loss = share * (nll / max(n_cat, 1) + tcfg.purchase_weight * bce / max(n_buy, 1))
                loss.backward()
                loss_value = float(loss.detach())
            nn.utils.clip_grad_norm_(net.parameters(), tcfg.clip_norm)
            opt.step()
            if ema is not None:
                ema.update()
            step += 1
            h, c = h.clone(), c.clone()
            h[:, a], c[:, a] = h_a.detach(), c_a.detach()
            run_loss += loss_value / share * int(valid.sum())
            run_n += int(valid.sum())
            bar.update(int(valid.sum()))
            bar.set_postfix(loss=f"{run_loss / max(run_n, 1):.3f}")
            if max_steps is not None and step >= max_steps:
                break
        bar.close()
        train_time += time.perf_counter() - t_ep
        entry = {"epoch": epoch, "train_loss": run_loss / max(run_n, 1), "steps": step}
        # the average, not the iterate, is what is measured and kept; training goes on from the iterate
        averaged = ema.swapped() if ema is not None else contextlib.nullcontext()
        if va is not None:
            with averaged:
                val, rr_by_epoch[epoch] = _validation_with_ranks(net, feats, log, va, tcfg, device)
                states[epoch] = _snapshot(net)
            entry.update(val)
            if progress:
                tqdm.write(
                    f"{desc} epoch {epoch}: train loss {entry['train_loss']:.4f}  valid MRR@20 "
                    f"{val['mrr@20']:.4f}  category nll {val['category_nll']:.4f}  purchase bce "
                    f"{val['purchase_bce']:.4f}"
                )
            improved = _improves(history, val)
            bad = 0 if improved else bad + 1
        elif progress:
            tqdm.write(f"{desc} epoch {epoch}: train loss {entry['train_loss']:.4f}")
        history.append(entry)
        logger.info("%s epoch %d: %s", desc, epoch, entry)
        if va is not None and bad >= tcfg.patience:
            break
        if max_steps is not None and step >= max_steps:
            break
    if ema is not None and va is None:  # a replay (the refit) keeps the average of its last epoch
        ema.install()
    unjudged = purchase_unjudged(va) if va is not None else ""
    if va is not None and states:
        # without the funnel base the start's purchase head is an untrained MLP, not a counter to fall back to
        judged = not (mcfg.funnel_base and unjudged)
        best_epoch, category_epoch, best = _select(net, history, states, rr_by_epoch, tcfg.select_se, judged)
    else:
        best_epoch, category_epoch, best = len(history), len(history), None
        if category_from_start:  # the refit of a model whose category head is its start
            net.load_state_dict(
                {**net.state_dict(), **{k: v for k, v in start.items() if k.startswith(CATEGORY_HEAD)}}
            )
            category_epoch = 0
    p_epochs, p_from_funnel, p_history, p_seconds, p_total = _fit_purchase_head(
        net,
        feats,
        log,
        tr,
        va,
        tcfg,
        device,
        rng,
        ranges,
        purchase_epochs,
        purchase_from_funnel,
        progress,
        desc,
        purchase_max_steps,
        purchase_schedule_steps,
        unjudged,
    )
    net.eval()
    return _Fit(
        net,
        history,
        best_epoch,
        best,
        train_time + p_seconds,
        step,
        n_train,
        len(ranges),
        category_epoch,
        p_epochs,
        p_history,
        p_from_funnel,
        total,
        p_total,
        unjudged,
    )


def refit_replay(chosen: _Fit, n_refit: int, ratio: float = REFIT_STEPS_ABOVE_RATIO) -> dict:
    """What the refit replays of the selection run ``chosen``, given its own training events.

    Epochs as a rule: with the usual split the refit adds an eighth to the data, and an epoch is about
    the same training. When the refit's events exceed ``ratio`` times the selection's (a log whose rate
    ramps, so the default split's validation outweighs its training), its epochs would be that many
    times the updates validation judged: it replays the chosen epoch's optimizer steps, on the
    selection's learning-rate schedule, instead.

    The purchase-head phase that follows is replayed alike: its chosen epochs' steps on its own schedule.

    >>> fit = _Fit(None, [{"epoch": 1, "steps": 20}, {"epoch": 2, "steps": 40}], 2, None, 0.0, 60, 1000, 50, 2,
    ...            1, [{"epoch": 0, "steps": 0}, {"epoch": 1, "steps": 15}], schedule_steps=240,
    ...            purchase_schedule_steps=120)
    >>> refit_replay(fit, 1125)
    {'replayed': 'epochs'}
    >>> refit_replay(fit, 6000)  # doctest: +NORMALIZE_WHITESPACE
    {'replayed': 'steps', 'max_steps': 40, 'schedule_steps': 240, 'purchase_max_steps': 15,
     'purchase_schedule_steps': 120}
    """
    if n_refit <= ratio * chosen.n_train:
        return {"replayed": "epochs"}
    steps = chosen.steps_at(chosen.best_epoch)
    logger.info(
        "the refit trains on %d events, %.1f times the selection's %d: it replays the chosen %d steps, not %d epochs",
        n_refit,
        n_refit / max(chosen.n_train, 1),
        chosen.n_train,
        steps,
        chosen.best_epoch,
    )
    return {
        "replayed": "steps",
        "max_steps": steps,
        "schedule_steps": chosen.schedule_steps,
        "purchase_max_steps": chosen.purchase_steps_at(chosen.purchase_epochs),
        "purchase_schedule_steps": chosen.purchase_schedule_steps,
    }


def _fit_purchase_head(
    net: DemandLSTM,
    feats: FeatureBuffer,
    log: EventLog,
    tr: Targets,
    va: Targets | None,
    tcfg: TrainConfig,
    device: torch.device,
    rng: np.random.Generator,
    ranges: list[tuple[int, int]],
    epochs: int | None,
    from_funnel: bool,
    progress: bool,
    desc: str,
    max_steps: int | None = None,
    schedule_steps: int | None = None,
    unjudged: str = "",
) -> tuple[int, bool, list[dict], float, int]:
    """Epochs of the purchase MLP alone, everything else frozen; returns (epochs kept, whether it started
    from the funnel table alone, history, seconds, the length of its learning-rate schedule in steps).

    The joint epochs are chosen by the category head (validation MRR@20), and the purchase head then
    has had only as many epochs as the categories needed (often 1-2: a 25k-event shop overfits its
    categories after that), while its log loss keeps falling for longer. Training it alone on the
    chosen recurrent state cannot change a ranking. With ``va`` the phase keeps the epoch count with
    the lowest validation purchase BCE (0: none) and stops after ``patience`` epochs without one;
    without, it runs ``epochs``, the count a validated run chose (the refit).

    Before that, the funnel table alone (the MLP's output layer reset to zero) competes with the joint
    epochs' purchase head on validation BCE, so a recurrent state that hurts purchases on held-out
    users falls back to the counter; ``from_funnel`` replays that choice without ``va``. ``max_steps``
    ends the phase after that many optimizer steps and ``schedule_steps`` lays its schedule over that
    many (a refit replaying the selection's steps, :func:`refit_replay`). ``unjudged`` is
    :func:`purchase_unjudged` of ``va`` when it says the points cannot judge a head.
    """
    start_bce = None  # validation BCE of the head the phase starts from, when already measured
    if va is not None and unjudged:
        # No validation point can tell a trained head from the counter it starts from (a log loss on one
        # class rewards whichever head predicts that class hardest): ship the counter, train nothing.
        logger.info("%s purchase head: %s, so it is the funnel table alone", desc, unjudged)
        if net.cfg.funnel_base:
            _reset_purchase_correction(net)
        return 0, net.cfg.funnel_base, [], 0.0, 0
    if net.cfg.funnel_base and va is not None:
        joint_bce = validation_purchase_bce(net, feats, log, va, device)
        joint = {k: v.clone() for k, v in net.purchase.state_dict().items()}
        _reset_purchase_correction(net)
        funnel_bce = validation_purchase_bce(net, feats, log, va, device)
        from_funnel = funnel_bce < joint_bce
        if not from_funnel:
            net.purchase.load_state_dict(joint)
        start_bce = funnel_bce if from_funnel else joint_bce
        logger.info(
            "%s purchase head: validation BCE %.4f after the joint epochs, %.4f for the funnel table alone",
            desc,
            joint_bce,
            funnel_bce,
        )
    elif net.cfg.funnel_base and from_funnel:
        _reset_purchase_correction(net)
    from_funnel = bool(from_funnel and net.cfg.funnel_base)
    budget = tcfg.purchase_epochs
    if epochs is None:
        epochs = budget if va is not None else 0
    if epochs <= 0 or budget <= 0:
        return 0, from_funnel, [], 0.0, 0

    frozen = [(p, p.requires_grad) for p in net.parameters()]
    for p in net.parameters():
        p.requires_grad_(False)
    params = list(net.purchase.parameters())
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=tcfg.lr, weight_decay=tcfg.weight_decay)
    steps_per_epoch = sum(1 for _ in _lane_windows(ranges, tcfg.lanes, tcfg.bptt))
    # the same schedule whether chosen or replayed (over the selection's steps when those are replayed)
    total = max(1, schedule_steps or steps_per_epoch * budget)
    history: list[dict] = []
    best_bce, best_n, best_state, bad = math.inf, 0, None, 0
    # Averaged as the joint epochs are (model/training/averaging.py): the head's last iterate swings
    # with the users that happen to close an epoch, the average of the recent ones does not.
    ema = WeightAverage(net.purchase, tcfg.ema_decay) if tcfg.ema_decay > 0 else None
    if va is not None:
        if start_bce is None:
            start_bce = validation_purchase_bce(net, feats, log, va, device)
        best_bce = start_bce
        best_state = {k: v.clone() for k, v in net.purchase.state_dict().items()}
        history.append({"epoch": 0, "purchase_bce": best_bce, "steps": 0})
    step, seconds = 0, 0.0
    for epoch in range(1, epochs + 1):
        net.train()
        t_ep = time.perf_counter()
        h, c = net.initial_state(tcfg.lanes, device)
        bar = _Progress(int(tr.mask.sum()), f"{desc} purchase {epoch}", progress)
        run, run_n = 0.0, 0
        for active, idx, valid, reset in _lane_windows(_epoch_order(ranges, rng), tcfg.lanes, tcfg.bptt):
            keep = (~torch.from_numpy(reset).to(device)).float().view(1, -1, 1)
            h, c = h * keep, c * keep
            a = torch.from_numpy(active).to(device)
            f = feats.tensors(idx, device)
            out, (h_a, c_a) = net(f, (h[:, a], c[:, a]), purchase_only=True)
            obs = torch.from_numpy(valid & tr.observable[idx]).to(device)
            h, c = h.clone(), c.clone()
            h[:, a], c[:, a] = h_a.detach(), c_a.detach()
            bar.update(int(valid.sum()))
            n_buy = int(obs.sum())
            if not n_buy:
                continue
            buy = torch.from_numpy(tr.purchase[idx]).to(device)
            # Every observable point weighs the same, as in the joint loop's share rule: the windows
            # that close an epoch hold one or two long users, and a per-window mean let each of their
            # steps move the head as far as a full window's (measured on a 10,000-category log: the
            # in-sample mean propensity then ended an epoch anywhere between 0.054 and 0.106 against a
            # base rate of 0.100, docs/MODEL.md §2).
            capacity = tcfg.lanes * valid.shape[1]
            loss = (
                nn.functional.binary_cross_entropy_with_logits(
                    out["purchase_logit"][obs], buy[obs].float(), reduction="sum"
                )
                / capacity
            )
            for g in opt.param_groups:
                g["lr"] = tcfg.lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, step / total)))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(params, tcfg.clip_norm)
            opt.step()
            if ema is not None:
                ema.update()
            step += 1
            run += float(loss.detach()) * capacity
            run_n += n_buy
            bar.set_postfix(bce=f"{run / max(run_n, 1):.4f}")
            if max_steps is not None and step >= max_steps:
                break
        bar.close()
        seconds += time.perf_counter() - t_ep
        entry = {"epoch": epoch, "train_bce": run / max(run_n, 1), "steps": step}
        if va is not None:
            with ema.swapped() if ema is not None else contextlib.nullcontext():
                entry["purchase_bce"] = validation_purchase_bce(net, feats, log, va, device)
                if entry["purchase_bce"] < best_bce:
                    best_bce, best_n, bad = entry["purchase_bce"], epoch, 0
                    best_state = {k: v.clone() for k, v in net.purchase.state_dict().items()}
                else:
                    bad += 1
        history.append(entry)
        logger.info("%s purchase head epoch %d: %s", desc, epoch, entry)
        if va is not None and bad >= tcfg.patience:
            break
        if max_steps is not None and step >= max_steps:
            break
    if va is None:
        best_n = epochs
        if ema is not None:
            ema.install()
    elif best_state is not None:
        net.purchase.load_state_dict(best_state)
    for p, flag in frozen:
        p.requires_grad_(flag)
    return best_n, from_funnel, history, seconds, total


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


@torch.no_grad()
def _reset_purchase_correction(net: DemandLSTM) -> None:
    """Zero the purchase MLP's output layer: the purchase logit is then the funnel table's alone."""
    nn.init.zeros_(net.purchase[-1].weight)
    nn.init.zeros_(net.purchase[-1].bias)


def _selection_counts(log: EventLog, split: Split, tcfg: TrainConfig) -> tuple[int, int]:
    """Next-category points and observable purchase positives of ``split``'s validation window."""
    pts = phase_points(log, split, "valid", log.category, tcfg.horizon_s)
    return int((pts.cat_target >= 0).sum()), int(pts.purchase[pts.observable].sum())


def choose_history_window(
    log: EventLog, split: Split, slots: int, horizon_s: float, mixture: bool = True
) -> dict:
    """The cascade start's history window (:attr:`ModelConfig.history_window`), chosen on ``split``'s
    validation window exactly as the ``cascade_recent`` baseline chooses its own (docs/MODEL.md §4.10),
    in the log's own category space: the baseline's settings, with ``window`` None when validation
    chose the whole history or a window no smaller than the ``slots`` the state keeps.

    Training starts from the strongest counter the report compares it with, so that where no trained
    epoch beats the start on validation, the model ties that counter instead of a weaker one.
    ``mixture`` False leaves ``cascade_mix`` out (a model without the history mixture cannot start
    from it).
    """
    cats = (np.asarray(log.category, np.int64) + 1).astype(np.int32)  # 0: no category
    best: dict | None = None
    candidates = ((False, CascadeRecent()), (True, CascadeMix()))
    for mix, baseline in candidates if mixture else candidates[:1]:
        baseline.fit(
            cats,
            log.etype,
            log.ts,
            log.user_start,
            log.ts < split.valid_end,
            horizon_s,
            len(log.categories) + 1,
            valid_start=split.train_end,
        )
        chosen = {**baseline.settings(), "mixture": mix}
        if "validation_mrr@20" not in chosen:
            return {**chosen, "mixture": False}  # nothing to choose on: the plain cascade
        score = max(chosen["validation_mrr@20"].values())
        if best is None or score > best["score"]:  # ties: the plain Markov tier
            best = {**chosen, "score": score}
    window = best.pop("window")
    best.pop("score")
    return {"window": window if window is not None and window < slots else None, **best}


def _selection_split(log: EventLog, split: Split, tcfg: TrainConfig) -> tuple[Split, dict]:
    """The split that chooses the epochs: the given one, or a hold-out at the end of the training time
    when the validation window is too small to decide anything (see the module docstring)."""
    n_cat, n_pos = _selection_counts(log, split, tcfg)
    info = {"source": "validation", "n_category_points": n_cat, "n_positives": n_pos}
    if n_cat >= tcfg.min_valid_category_points and n_pos >= tcfg.min_valid_positives:
        return split, info
    # the training time of the main body: a row stamped years early must not make the hold-out years long
    train_ts = log.ts[log.ts < split.train_end]
    start = main_span(train_ts)[0] if train_ts.size else float(log.ts.min())
    t1 = start + (1.0 - tcfg.holdout_fraction) * (split.train_end - start)
    holdout = Split(t1, split.train_end, split.end_ts)
    h_cat, h_pos = _selection_counts(log, holdout, tcfg)
    too_few = (
        f"validation window has {n_cat} next-category points and {n_pos} positives (needs "
        f"{tcfg.min_valid_category_points} and {tcfg.min_valid_positives})"
    )
    small = h_cat < tcfg.min_valid_category_points or h_pos < tcfg.min_valid_positives
    if small and h_cat <= n_cat and h_pos <= n_pos:
        # A hold-out with no more of either kind of evidence would only choose on less: a validation
        # window as long as the purchase horizon has no observable purchase window, yet thousands of
        # next-category points, against a hold-out of a few minutes.
        info.update(
            reason=f"{too_few}, and a hold-out of the last {tcfg.holdout_fraction:.0%} of the training "
            f"time has no more ({h_cat} and {h_pos}): validation still chose the epochs, on little "
            "evidence; a longer validation window would help",
            holdout_category_points=h_cat,
            holdout_positives=h_pos,
        )
        logger.warning("%s", info["reason"])
        return split, info
    info.update(
        source="holdout",
        reason=f"{too_few}: the last {tcfg.holdout_fraction:.0%} of the training time chose the epochs instead",
        holdout_start=t1,
        holdout_category_points=h_cat,
        holdout_positives=h_pos,
    )
    logger.warning("%s", info["reason"])
    if small:
        # Said, not refused: a small shop still gets a model; it should know how little chose it.
        logger.warning(
            "the hold-out is small too (%d next-category points, %d positives): the epochs are chosen on "
            "little or no evidence; a longer log would let validation decide",
            h_cat,
            h_pos,
        )
    return holdout, info


def _prepare(
    log: EventLog, split: Split, fit_end: float, tcfg: TrainConfig, mcfg: ModelConfig, next_hash: np.ndarray
):
    """Vocabulary of the rows before ``fit_end``, its config, the encoded log, train/valid targets of
    ``split``, and how many categories of those rows the vocabulary cap left out."""
    fit_rows = log.ts < fit_end
    vocab = Vocabulary.build(
        (log.categories[c] if c >= 0 else None for c in log.category[fit_rows]), max_size=tcfg.max_categories
    )
    seen = log.category[fit_rows]
    beyond = len(np.unique(seen[seen >= 0])) - (len(vocab) - 1)
    if beyond > 0:
        # Not silent: those categories are still remembered and repeated through the history slots'
        # hashes, but the model cannot propose them to a user who never touched them.
        logger.warning(
            "%d categories beyond the vocabulary cap (max_categories=%d): repeatable through the "
            "history slots, never explored",
            beyond,
            tcfg.max_categories,
        )
    cfg = ModelConfig(**{**asdict(mcfg), "n_categories": len(vocab)})
    feats = encode_log(log, cfg, vocab)
    cats = category_index(log, vocab)
    tr = phase_targets(phase_points(log, split, "train", cats, tcfg.horizon_s), next_hash)
    va = phase_targets(phase_points(log, split, "valid", cats, tcfg.horizon_s), next_hash)
    return vocab, cfg, feats, tr, va, max(0, int(beyond))


def train(
    log: EventLog,
    tcfg: TrainConfig | None = None,
    mcfg: ModelConfig | None = None,
    progress: bool = True,
    split: Split | None = None,
) -> TrainResult:
    """Train a DemandLSTM on the rows of ``log`` before ``T2``: choose on validation, then refit.

    Parameters
    ----------
    log : EventLog
        Any log; it is sorted by user and time here if needed.
    tcfg, mcfg : TrainConfig, ModelConfig, optional
        ``mcfg.n_categories`` is replaced by the size of the vocabulary built from the fitted rows.
    progress : bool
        Show a tqdm bar with the running loss when stderr is a terminal (in a log file a bar is megabytes
        of carriage returns; the per-epoch lines are printed and logged either way).
    split : Split, optional
        Defaults to :func:`demandstream.model.data.split.temporal_split` (80/10/10 of the time span of the
        log's main body).
    """
    tcfg = tcfg or TrainConfig()
    mcfg = mcfg or ModelConfig()
    split = split or temporal_split(log)
    torch.set_num_threads(tcfg.threads or os.cpu_count() or 1)
    seed_everything(tcfg.seed)
    rng = np.random.default_rng(tcfg.seed)
    device = resolve_device(tcfg.device)

    log = log.take(
        np.flatnonzero(log.ts < split.valid_end)
    ).sorted_by_user_time()  # test rows never reach training
    if not (log.ts < split.train_end).any():
        raise DataError("no training events before the train end T1")
    next_hash = next_category_targets(category_hashes(log), log.user_start)

    sel_split, selection = _selection_split(log, split, tcfg)
    t0 = time.perf_counter()
    window = {"window": mcfg.history_window, "chosen_on": "the model configuration"}
    if tcfg.cascade_init and tcfg.choose_history_window and mcfg.history_window is None:
        window = choose_history_window(
            log, sel_split, mcfg.history_slots, tcfg.horizon_s, mixture=mcfg.markov_history
        )
        mcfg = replace(mcfg, history_window=window["window"])
        logger.info(
            "start of the category head: %s (chosen on %s)",
            start_summary(window["window"], bool(window.get("mixture"))),
            f"{window['validation_points']:,} validation points"
            if "validation_points" in window
            else "nothing",
        )
    vocab, cfg, feats, tr, va, beyond_cap = _prepare(
        log, sel_split, sel_split.train_end, tcfg, mcfg, next_hash
    )
    n_valid_points = int(va.mask.sum())
    encode_s = time.perf_counter() - t0
    logger.info(
        "choosing on %s: %d training events, %d categories, device %s",
        selection["source"],
        int(tr.mask.sum()),
        len(vocab),
        device,
    )
    start_mixture = bool(window.get("mixture"))
    chosen = _fit(
        log,
        feats,
        vocab,
        tr,
        va,
        cfg,
        tcfg,
        device,
        rng,
        tcfg.epochs,
        progress,
        "choose",
        start_mixture=start_mixture,
    )
    net = chosen.net
    if tcfg.calibrate:
        calib = calibrate(
            net,
            feats,
            log,
            va,
            device,
            alpha=tcfg.calibration_alpha,
            window_s=sel_split.valid_end - sel_split.train_end,
            min_window_s=tcfg.calibration_min_window_s,
        )
    else:
        calib = {"applied": False, "reason": "disabled (TrainConfig.calibrate=False)"}
    metrics: dict = {
        "selection": {
            **selection,
            "split": sel_split.to_dict(),
            "best_epoch": chosen.best_epoch,
            "category_epoch": chosen.category_epoch,
            "purchase_epochs": chosen.purchase_epochs,
            "purchase_history": chosen.purchase_history,
            "purchase_from_funnel": chosen.purchase_from_funnel,
            # why no trained purchase head could be kept ("" when validation judged one)
            "purchase_unjudged": chosen.purchase_unjudged,
            "best": chosen.best,
            "history": chosen.history,
            "optimizer_steps": chosen.steps,
            "n_train_events": chosen.n_train,
            "train_seconds": chosen.train_seconds,
        },
    }
    final, train_s = chosen, chosen.train_seconds
    if tcfg.refit:
        # Refit: the same recipe on everything before T2 for the chosen number of epochs, so the model
        # sees the data the baselines see. Its validation rows are now training rows, so calibration
        # keeps the scale fitted above on the chosen model's held-out validation predictions.
        all_split = Split(split.valid_end, split.valid_end + 1.0, split.end_ts)
        # the selection's features and targets go before the refit's are built: each is a row per event
        del feats, tr, va
        vocab, cfg, feats, tr_all, _, beyond_cap = _prepare(
            log, all_split, split.valid_end, tcfg, mcfg, next_hash
        )
        replay = refit_replay(chosen, int(tr_all.mask.sum()), tcfg.refit_steps_above_ratio)
        final = _fit(
            log,
            feats,
            vocab,
            tr_all,
            None,
            cfg,
            tcfg,
            device,
            rng,
            chosen.best_epoch,
            progress,
            "refit",
            category_from_start=chosen.category_epoch == 0,
            start_mixture=start_mixture,
            purchase_epochs=chosen.purchase_epochs,
            purchase_from_funnel=chosen.purchase_from_funnel,
            max_steps=replay.get("max_steps"),
            schedule_steps=replay.get("schedule_steps"),
            purchase_max_steps=replay.get("purchase_max_steps"),
            purchase_schedule_steps=replay.get("purchase_schedule_steps"),
        )
        with torch.no_grad():
            final.net.purchase_scale.copy_(net.purchase_scale)
            final.net.purchase_shift.copy_(net.purchase_shift)
        net = final.net
        train_s += final.train_seconds
        metrics["refit"] = {
            **replay,
            "epochs": chosen.best_epoch,
            "category_epoch": final.category_epoch,
            "optimizer_steps": final.steps,
            "n_train_events": final.n_train,
            "history": final.history,
            "purchase_history": final.purchase_history,
            "train_seconds": final.train_seconds,
        }
    epochs_run = len(chosen.history) + (len(final.history) if final is not chosen else 0)
    n_ev = chosen.n_train * len(chosen.history) + (
        final.n_train * len(final.history) if final is not chosen else 0
    )
    hist = chosen.history
    metrics.update(
        {
            "train_events_per_s": n_ev / train_s if train_s > 0 else math.nan,
            "encode_seconds": encode_s,
            "train_seconds": train_s,
            "epochs_run": epochs_run,
            "best_epoch": chosen.best_epoch,
            "best_valid_loss": chosen.best["loss"] if chosen.best else math.nan,
            "best_valid_mrr@20": chosen.best["mrr@20"] if chosen.best else math.nan,
            "valid_losses": [h.get("loss") for h in hist],
            "valid_mrr@20": [h.get("mrr@20") for h in hist],
            "train_losses": [h["train_loss"] for h in hist],
            "optimizer_steps": chosen.steps + (final.steps if final is not chosen else 0),
            "history": hist,
            "n_train_events": final.n_train,
            "n_valid_points": n_valid_points,
            "n_train_users": final.n_users,
            "n_categories": len(vocab),
            "n_categories_beyond_cap": beyond_cap,
            "split": split.to_dict(),
            "train_config": asdict(tcfg),
            "device": str(device),
            "threads": torch.get_num_threads(),
            "calibration": calib,
            "history_window": window,
            # where the shipped purchase head comes from, in words (train's summary, evaluate's report)
            "purchase_head": purchase_head_summary(metrics["selection"]),
        }
    )
    return TrainResult(net.cpu().eval(), vocab, metrics)


def run_training(
    data,
    fmt: str,
    out: str | Path,
    epochs: int | None = None,
    device: str = "auto",
    train_end: str | float | None = None,
    valid_end: str | float | None = None,
    seed: int = 0,
    progress: bool = True,
    user_sample: float = 1.0,
    **kw,
) -> dict:
    """CLI entry (``demandstream train``): load, split, train, save the checkpoint; return a summary.

    ``user_sample`` below 1 trains on that stable fraction of the users
    (:mod:`~demandstream.model.data.sampling`), for logs too large to train on whole; the checkpoint
    records it. Extra keyword arguments set :class:`TrainConfig` fields (e.g. ``lanes=128``) or
    :class:`~demandstream.model.core.network.ModelConfig` fields (e.g. ``hidden=64``).
    """
    from demandstream.model.data.loaders import load_log

    tkw = {k: v for k, v in kw.items() if k in TrainConfig.__dataclass_fields__}
    mkw = {k: v for k, v in kw.items() if k in ModelConfig.__dataclass_fields__}
    unknown = set(kw) - set(tkw) - set(mkw)
    if unknown:
        raise OptionError(f"unknown training option(s): {', '.join(sorted(unknown))}")
    tcfg = TrainConfig(seed=seed, device=device, **tkw)
    if epochs is not None:
        tcfg.epochs = epochs
    log = load_log(data, fmt, keep_ids=False, user_sample=user_sample)
    split = temporal_split(log, train_end, valid_end)
    _warn_if_memory_short(log, split, user_sample)
    res = train(log, tcfg, ModelConfig(**mkw), progress=progress, split=split)
    res.metrics["user_sample"] = user_sample
    version = checkpoint.save(out, res.net, res.vocab, res.metrics)
    m = res.metrics
    return {
        "model": str(out),
        "model_version": version,
        "n_events": len(log),
        "n_users": log.n_users,
        "user_sample": user_sample,
        **{
            k: m[k]
            for k in (
                "n_train_events",
                "n_categories",
                "epochs_run",
                "best_epoch",
                "best_valid_loss",
                "best_valid_mrr@20",
                "optimizer_steps",
                "train_events_per_s",
                "train_seconds",
                "split",
                "device",
            )
        },
        # the cascade start's history window ("all": every slot, as the plain cascade)
        "history_window": m["history_window"]["window"] or "all",
        # whether the start's Markov tier is the history mixture (cascade_mix) or the last category's row
        "history_mixture": bool(m["history_window"].get("mixture", False)),
        "purchase_head": m["purchase_head"],
        "purchase_calibration": calibration_summary(m["calibration"]),
    }


def _warn_if_memory_short(log: EventLog, split: Split, user_sample: float) -> None:
    """Say before training, not by an out-of-memory kill, that the log needs a user sample."""
    available = available_memory_bytes()
    if available is None:
        return
    before = log.ts < split.valid_end  # what the refit trains on, and the vocabulary's rows
    rows = int(np.count_nonzero(before))
    categories = int(np.unique(log.category[before & (log.category >= 0)]).size)
    fraction = suggested_user_sample(rows, categories, available)
    if fraction is None:
        return
    if training_memory_bytes(int(rows * fraction), categories) <= available:
        remedy = f"--sample-users {fraction * user_sample:.2g} would fit"
    else:
        remedy = (
            "even a 1 % user sample would not fit: train on a shorter span of the log or a larger machine"
        )
    logger.warning(
        "training on %s events of %s categories needs about %.1f GB and %.1f GB is available: it may run out "
        "of memory; %s",
        f"{rows:,}",
        f"{categories:,}",
        training_memory_bytes(rows, categories) / 1e9,
        available / 1e9,
        remedy,
    )


def purchase_head_summary(selection: dict) -> str:
    """Where the shipped purchase head comes from, as ``demandstream train`` prints it.

    >>> purchase_head_summary({"purchase_unjudged": "no observable validation purchase window"})
    'funnel table (no observable validation purchase window)'
    >>> purchase_head_summary({"purchase_from_funnel": True, "purchase_epochs": 0})
    'funnel table (won validation)'
    >>> purchase_head_summary({"purchase_from_funnel": False, "purchase_epochs": 3, "best_epoch": 2})
    'joint epoch 2 + 3 epochs alone'
    >>> purchase_head_summary({"purchase_from_funnel": True, "purchase_epochs": 1})
    'funnel table + 1 epoch alone'
    """
    if selection.get("purchase_unjudged"):
        return f"funnel table ({selection['purchase_unjudged']})"
    start = (
        "funnel table"
        if selection.get("purchase_from_funnel")
        else f"joint epoch {selection.get('best_epoch')}"
    )
    n = selection.get("purchase_epochs", 0)
    return f"{start} + {n} epoch{'s' if n != 1 else ''} alone" if n else f"{start} (won validation)"


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
