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

This module is the loop and the refit; the parts it runs have modules of their own: the losses
(:mod:`~demandstream.model.training.losses`), the leave-out of a user's own transitions
(:mod:`~demandstream.model.training.leave_out`), the cascade start's scale
(:mod:`~demandstream.model.training.cascade_scale`), scoring on validation and the choice of epoch
(:mod:`~demandstream.model.training.validation`, :mod:`~demandstream.model.training.selection`) and Platt
calibration (:mod:`~demandstream.model.training.calibration`).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from demandstream.model.core import checkpoint
from demandstream.model.core.encoding import (
    FeatureBuffer,
    category_hashes,
    category_index,
    encode_log,
)
from demandstream.model.core.features import PURCHASE_HORIZON_S, Vocabulary
from demandstream.model.core.network import (
    DemandLSTM,
    ModelConfig,
    funnel_table,
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
from demandstream.model.training.calibration import (
    CALIBRATION_ALPHA,
    CALIBRATION_MIN_WINDOW_S,
    calibrate,
    calibration_summary,
)
from demandstream.model.training.cascade_scale import fit_cascade_scale
from demandstream.model.training.leave_out import markov_pairs, own_markov_counts
from demandstream.model.training.losses import blocked_window_backward, loss_terms
from demandstream.model.training.selection import CATEGORY_HEAD, improves, select_epoch, snapshot
from demandstream.model.training.validation import (
    Targets,
    phase_targets,
    purchase_unjudged,
    validation_metrics,
    validation_purchase_bce,
)

logger = logging.getLogger(__name__)

#: Each window is as long as this quantile of the lanes' remaining user lengths (at most ``bptt``):
#: padding stays small when lanes hold users of very different lengths.
WINDOW_QUANTILE = 0.75


#: The refit replays the selection's epochs, unless its training events are more than this many times
#: the selection's: then an epoch is no longer the same amount of training, and it replays the
#: selection's optimizer steps on the selection's learning-rate schedule (docs/MODEL.md §2, "Refit").
REFIT_STEPS_ABOVE_RATIO = 2.0

#: A training window whose category cells times output columns exceed this many floats runs its
#: category head a block of cells at a time (:func:`blocked_window_backward`): at thousands of
#: categories the head's [cells, C + K] passes, forward and backward, are the epoch, and blocks that
#: stay in a core's cache were 23-32 % cheaper (docs/BENCHMARKS.md). Below it (a few hundred categories,
#: e.g. every generated shop and the REES46 samples) a window is one call, as before.
TRAIN_BLOCK_FLOATS = 1 << 20


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
    pairs, pair_rows, current = markov_pairs(log, cats, tr_mask)
    tables = markov_tables(cats[tr_mask], pairs, len(vocab), mcfg.markov_top_k)
    obs = tr_mask & tr.observable
    tables["funnel_logit"] = funnel_table(feats.etype[obs], feats.cart[obs] > 0, tr.purchase[obs])
    net.set_tables(tables)
    own = own_markov_counts(log, pairs, pair_rows, current, tables["next"], tcfg.markov_leave_out)
    if tcfg.cascade_init:
        init_like_cascade(net, mixture=start_mixture)
        fit_cascade_scale(net, feats, log, tr, device, rng, own)
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
    start = snapshot(net)
    if va is not None and epochs > 0:
        # Epoch 0, the untrained start (the calibrated cascade when cascade_init), is a candidate for
        # the category head: training must beat it on validation MRR@20 to be kept.
        val0, rr_by_epoch[0] = _validation_with_ranks(net, feats, log, va, tcfg, device)
        states[0] = snapshot(net)
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
                loss_value, (h_a, c_a) = blocked_window_backward(
                    net, f, (h[:, a], c[:, a]), cat_t, hash_t, buy, obs, share, tcfg.purchase_weight
                )
            else:
                out, (h_a, c_a) = net(f, (h[:, a], c[:, a]), cat_at=cat_t >= 0)
                nll, bce, n_cat, n_buy = loss_terms(net, out, f, cat_t, hash_t, buy, obs)
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
                states[epoch] = snapshot(net)
            entry.update(val)
            if progress:
                tqdm.write(
                    f"{desc} epoch {epoch}: train loss {entry['train_loss']:.4f}  valid MRR@20 "
                    f"{val['mrr@20']:.4f}  category nll {val['category_nll']:.4f}  purchase bce "
                    f"{val['purchase_bce']:.4f}"
                )
            improved = improves(history, val)
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
        best_epoch, category_epoch, best = select_epoch(
            net, history, states, rr_by_epoch, tcfg.select_se, judged
        )
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
