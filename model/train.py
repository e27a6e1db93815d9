"""Training DemandLSTM on a historical log: truncated BPTT over session-parallel lanes.

The loop follows GRU4Rec's session-parallel mini-batches (Hidasi et al., ICLR 2016): ``B`` lanes each
hold one user; every iteration advances all lanes by a window of up to ``W`` events, carrying each lane's
(h, c) into the next window (detached: truncated BPTT) and resetting it when the lane takes a new user.
Users are dealt longest first (equal lengths in random order) and each window's loss is scaled by the
share of its lanes × steps holding real events, so the end of an epoch, when only a few lanes are still
busy, cannot undo what the epoch learned.

Loss = masked next-category NLL (targets inside the vocabulary only) + ``purchase_weight`` × BCE on
observable purchase labels. Only rows before ``T1`` are inputs or labels of training (see
:mod:`model.data`); early stopping reads the validation loss, computed with each user's full context
up to ``T2`` and scored on validation points only.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from model import checkpoint
from model.data import Points, Split, phase_points, temporal_split
from model.encoding import FeatureBuffer, category_index, encode_log
from model.eventlog import EventLog
from model.features import Vocabulary
from model.network import DemandLSTM, ModelConfig
from model.scoring import resolve_device

logger = logging.getLogger(__name__)

#: Each window is as long as this quantile of the lanes' remaining user lengths (at most ``bptt``):
#: padding stays small when lanes hold users of very different lengths.
WINDOW_QUANTILE = 0.75

#: Validation runs whole padded sequences in batches of at most this many (user, step) cells.
VALID_BATCH_CELLS = 1 << 15

#: Platt scaling is fitted only with at least this many positive validation points: with fewer, the two
#: scalars follow the noise of a handful of buyers (the multicategory sample of docs/MODEL.md has 7).
MIN_CALIBRATION_POSITIVES = 20

#: Ceiling on LBFGS iterations of the 2-parameter Platt fit (it is convex and converges in tens).
CALIBRATION_MAX_ITER = 300

#: The data-driven repeat prior keeps the gate's initial probability inside [p, 1 - p]: a degenerate
#: training sample (all repeats, no repeats) must not start the gate saturated, where gradients vanish.
REPEAT_PRIOR_MIN_P = 0.05


@dataclass
class TrainConfig:
    """Training hyper-parameters (the network's own live in :class:`~model.network.ModelConfig`).

    With these defaults a 20k-event log trains in about 10-20 s on 2 idle CPU cores (8-14k events/s;
    docs/MODEL.md has the measurements, also under load); ``patience`` stops earlier when validation
    loss stalls.
    """

    epochs: int = 8  #: upper bound; early stopping usually ends sooner
    lanes: int = 128  #: B, users advanced side by side (GRU4Rec's mini-batch)
    bptt: int = 32  #: W, events per window; gradients flow at most this far back
    lr: float = 3e-3  #: AdamW step size
    weight_decay: float = 1e-4  #: AdamW decoupled weight decay
    clip_norm: float = 5.0  #: gradient-norm clip; LSTMs occasionally spike
    purchase_weight: float = 1.0  #: weight of the purchase BCE relative to the category NLL
    patience: int = 2  #: epochs without validation improvement before stopping
    seed: int = 0
    threads: int | None = None  #: torch CPU threads; None = all cores
    max_categories: int = 5000  #: vocabulary size cap (most frequent training categories)
    horizon_s: float = 1800.0  #: purchase horizon, DESIGN §7
    device: str = "auto"
    calibrate: bool = True  #: Platt-scale the purchase logit on validation points after training
    repeat_prior_init: bool = True  #: start the repeat gate at the training share of repeats


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
    """Users longest first, equal lengths in random order.

    Longest-first keeps the lanes busy to the end of the epoch: were a long user dealt last, the epoch
    would end with a few lanes running alone, and Adam would take full-size steps on gradients from a
    handful of users, undoing what the epoch learned (we measured the full-context loss rising while
    the windowed training loss stayed flat).
    """
    lengths = np.array([e - s for s, e in ranges])
    order = np.lexsort((rng.random(len(ranges)), -lengths))
    return [ranges[i] for i in order]


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


def _loss_terms(
    net: DemandLSTM, out: dict, f: dict, cat_t: torch.Tensor, buy: torch.Tensor, obs: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """Summed category NLL and purchase BCE over the given cells, with their counts."""
    cat_mask = cat_t > 0
    n_cat, n_buy = int(cat_mask.sum()), int(obs.sum())
    if n_cat:
        sel = {k: v[cat_mask] for k, v in out.items()}
        nll = -net.category_log_prob(sel, f["hist_cats"][cat_mask], cat_t[cat_mask]).sum()
    else:
        nll = out["purchase_logit"].sum() * 0.0
    if n_buy:
        bce = nn.functional.binary_cross_entropy_with_logits(
            out["purchase_logit"][obs], buy[obs].float(), reduction="sum"
        )
    else:
        bce = out["purchase_logit"].sum() * 0.0
    return nll, bce, n_cat, n_buy


def _full_context_batches(
    net: DemandLSTM, feats: FeatureBuffer, log: EventLog, pts: Points, device: torch.device
):
    """Yield (head outputs, features, category targets, purchase labels, observable mask) per batch of
    users that hold a point of ``pts``; every user runs from its first event (eval mode, no grad)."""
    net.eval()
    want = pts.category_points | pts.observable
    starts, ends = log.user_start[:-1], log.user_start[1:]
    lengths = ends - starts
    users = [u for u in np.argsort(-lengths, kind="stable") if lengths[u] and want[starts[u] : ends[u]].any()]
    i = 0
    while i < len(users):
        t_max = int(lengths[users[i]])
        batch = users[i : i + max(1, VALID_BATCH_CELLS // t_max)]
        i += len(batch)
        idx = np.empty((len(batch), t_max), np.int64)
        valid = np.zeros((len(batch), t_max), bool)
        for k, u in enumerate(batch):
            s, e = int(starts[u]), int(ends[u])
            idx[k, : e - s] = np.arange(s, e)
            idx[k, e - s :] = e - 1
            valid[k, : e - s] = True
        f = feats.tensors(idx, device)
        with torch.no_grad():
            out, _ = net(f)
        cat_t = torch.from_numpy(np.where(valid, pts.cat_target[idx], -1)).to(device)
        obs = torch.from_numpy(valid & pts.observable[idx]).to(device)
        buy = torch.from_numpy(pts.purchase[idx]).to(device)
        yield out, f, cat_t, buy, obs


@torch.no_grad()
def validation_loss(
    net: DemandLSTM,
    feats: FeatureBuffer,
    log: EventLog,
    pts: Points,
    purchase_weight: float,
    device: torch.device,
) -> dict[str, float]:
    """Mean category NLL and purchase BCE on validation points, each user run from its first event."""
    tot_nll = tot_bce = 0.0
    n_cat = n_buy = 0
    for out, f, cat_t, buy, obs in _full_context_batches(net, feats, log, pts, device):
        nll, bce, nc, nb = _loss_terms(net, out, f, cat_t, buy, obs)
        tot_nll += float(nll)
        tot_bce += float(bce)
        n_cat += nc
        n_buy += nb
    cat_loss = tot_nll / n_cat if n_cat else math.nan
    buy_loss = tot_bce / n_buy if n_buy else math.nan
    total = (0.0 if math.isnan(cat_loss) else cat_loss) + purchase_weight * (
        0.0 if math.isnan(buy_loss) else buy_loss
    )
    return {
        "loss": total,
        "category_nll": cat_loss,
        "purchase_bce": buy_loss,
        "n_category_points": n_cat,
        "n_purchase_points": n_buy,
    }


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


def calibrate(
    net: DemandLSTM,
    feats: FeatureBuffer,
    log: EventLog,
    pts: Points,
    device: torch.device,
    min_positives: int = MIN_CALIBRATION_POSITIVES,
) -> dict:
    """Fit Platt scaling on the observable purchase points of ``pts`` (validation) and store it in ``net``.

    The logits are collected with full context, as :func:`validation_loss` does, after resetting the
    network's calibration to the identity. The fit is skipped (identity kept) when there are fewer than
    ``min_positives`` positives, only one class, or the fitted scale is not positive (it would invert the
    model's ranking). Returns what was done: ``applied``, ``reason`` when skipped, ``a``, ``b``, point
    counts and the validation BCE before and after.
    """
    net.purchase_scale.fill_(1.0)
    net.purchase_shift.fill_(0.0)
    zs, ys = [], []
    for out, _f, _cat_t, buy, obs in _full_context_batches(net, feats, log, pts, device):
        zs.append(out["purchase_logit"][obs].double().cpu().numpy())
        ys.append(buy[obs].double().cpu().numpy())
    z = np.concatenate(zs) if zs else np.zeros(0)
    y = np.concatenate(ys) if ys else np.zeros(0)
    n_pos = int(y.sum())
    info: dict = {"applied": False, "a": 1.0, "b": 0.0, "n_points": int(len(y)), "n_positive": n_pos}
    if n_pos == 0 or n_pos == len(y):
        info["reason"] = "validation purchase labels have a single class"
    elif n_pos < min_positives:
        info["reason"] = f"only {n_pos} positive validation points (< {min_positives})"
    else:
        a, b = fit_platt(z, y)
        if not a > 0:  # also catches NaN
            info["reason"] = f"fitted scale {a:.4g} is not positive"
        else:
            info.update(applied=True, a=a, b=b, bce_before=_mean_bce(z, y), bce_after=_mean_bce(z, y, a, b))
            net.purchase_scale.fill_(a)
            net.purchase_shift.fill_(b)
    if not info["applied"]:
        logger.info("purchase calibration skipped: %s", info["reason"])
    return info


def repeat_prior(feats: FeatureBuffer, pts: Points) -> float | None:
    """Share of the training next-category targets found in the user's history slots (None: no target).

    It is the rate the repeat gate should start from (DESIGN §10 measures 78 % on the cosmetics log).

    >>> from model.network import ModelConfig
    >>> buf = FeatureBuffer(ModelConfig(history_slots=2), 3)
    >>> buf.hist_cats[:] = [[5, 6], [5, -1], [7, 5]]
    >>> repeat_prior(buf, Points(np.ones(3, bool), np.array([6, 9, -1]), np.zeros(3, np.int8), np.ones(3, bool)))
    0.5
    """
    t = pts.cat_target
    rows = np.flatnonzero(t > 0)
    if not len(rows):
        return None
    return float((feats.hist_cats[rows] == t[rows, None]).any(1).mean())


@torch.no_grad()
def init_repeat_prior(net: DemandLSTM, p_repeat: float) -> None:
    """Start the repeat gate's bias at logit(``p_repeat``) (clipped to [p, 1 - p], see REPEAT_PRIOR_MIN_P).

    A default initialisation starts the gate near 1/2; on small logs early stopping ends training
    within a few epochs, before the gate has moved to the repeat rate the data shows at once. Only the
    bias is set: the gate's weights keep their random start, so it still learns when to explore.
    """
    p = min(max(p_repeat, REPEAT_PRIOR_MIN_P), 1.0 - REPEAT_PRIOR_MIN_P)
    net.gate.bias.fill_(math.log(p / (1.0 - p)))


def train(
    log: EventLog,
    tcfg: TrainConfig | None = None,
    mcfg: ModelConfig | None = None,
    progress: bool = True,
    split: Split | None = None,
) -> TrainResult:
    """Train a DemandLSTM on the rows of ``log`` before ``T2`` (validation for early stopping).

    Parameters
    ----------
    log : EventLog
        Any log; it is sorted by user and time here if needed.
    tcfg, mcfg : TrainConfig, ModelConfig, optional
        ``mcfg.n_categories`` is replaced by the size of the vocabulary built from training rows.
    progress : bool
        Show a tqdm bar with the running loss.
    split : Split, optional
        Defaults to :func:`model.data.temporal_split` (80/10/10 of the time span).
    """
    from tqdm import tqdm

    tcfg = tcfg or TrainConfig()
    mcfg = ModelConfig(**asdict(mcfg)) if mcfg is not None else ModelConfig()
    split = split or temporal_split(log)
    torch.set_num_threads(tcfg.threads or os.cpu_count() or 1)
    seed_everything(tcfg.seed)
    rng = np.random.default_rng(tcfg.seed)
    device = resolve_device(tcfg.device)

    before_t2 = np.flatnonzero(log.ts < split.valid_end)
    log = log.take(before_t2).sorted_by_user_time()  # test rows never reach training
    train_rows = log.ts < split.train_end
    if not train_rows.any():
        raise ValueError("no training events before the train end T1")
    vocab = Vocabulary.build(
        (log.categories[c] if c >= 0 else None for c in log.category[train_rows]),
        max_size=tcfg.max_categories,
    )
    mcfg.n_categories = len(vocab)
    t0 = time.perf_counter()
    feats = encode_log(log, mcfg, vocab)
    encode_s = time.perf_counter() - t0
    cats = category_index(log, vocab)
    tr = phase_points(log, split, "train", cats, tcfg.horizon_s)
    va = phase_points(log, split, "valid", cats, tcfg.horizon_s)
    ranges = _user_ranges(log.user_start, tr.mask)
    n_train = int(tr.mask.sum())
    logger.info(
        "training on %d events of %d users, %d categories, device %s",
        n_train,
        len(ranges),
        len(vocab),
        device,
    )

    net = DemandLSTM(mcfg).to(device)
    prior = repeat_prior(feats, tr) if tcfg.repeat_prior_init else None
    if prior is not None:
        init_repeat_prior(net, prior)
    opt = torch.optim.AdamW(net.parameters(), lr=tcfg.lr, weight_decay=tcfg.weight_decay)
    best = {"loss": math.inf, "epoch": 0, "state": None}
    history: list[dict] = []
    train_time = 0.0
    bad_epochs = 0
    for epoch in range(1, tcfg.epochs + 1):
        net.train()
        order = _epoch_order(ranges, rng)
        h, c = net.initial_state(tcfg.lanes, device)
        run_loss, run_n = 0.0, 0
        t_ep = time.perf_counter()
        bar = tqdm(total=n_train, desc=f"epoch {epoch}", unit="ev", disable=not progress, leave=False)
        for active, idx, valid, reset in _lane_windows(order, tcfg.lanes, tcfg.bptt):
            rs = torch.from_numpy(reset).to(device)
            keep = (~rs).float().view(1, -1, 1)
            h, c = (h * keep).detach(), (c * keep).detach()
            a = torch.from_numpy(active).to(device)
            f = feats.tensors(idx, device)
            out, (h_a, c_a) = net(f, (h[:, a], c[:, a]))
            v = valid
            cat_t = torch.from_numpy(np.where(v, tr.cat_target[idx], -1)).to(device)
            obs = torch.from_numpy(v & tr.observable[idx]).to(device)
            buy = torch.from_numpy(tr.purchase[idx]).to(device)
            nll, bce, n_cat, n_buy = _loss_terms(net, out, f, cat_t, buy, obs)
            # Scale by the share of the full lanes × window that holds real events, so a window where
            # only a few lanes are still busy moves the weights proportionally less.
            share = float(v.sum()) / (tcfg.lanes * v.shape[1])
            loss = share * (nll / max(n_cat, 1) + tcfg.purchase_weight * bce / max(n_buy, 1))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(net.parameters(), tcfg.clip_norm)
            opt.step()
            h, c = h.clone(), c.clone()
            h[:, a], c[:, a] = h_a.detach(), c_a.detach()
            run_loss += float(loss.detach()) / share * int(v.sum())
            run_n += int(v.sum())
            bar.update(int(v.sum()))
            bar.set_postfix(loss=f"{run_loss / max(run_n, 1):.3f}")
        bar.close()
        train_time += time.perf_counter() - t_ep
        val = validation_loss(net, feats, log, va, tcfg.purchase_weight, device)
        val["epoch"] = epoch
        val["train_loss"] = run_loss / max(run_n, 1)
        history.append(val)
        logger.info("epoch %d: train loss %.4f, valid loss %.4f", epoch, val["train_loss"], val["loss"])
        if progress:
            tqdm.write(
                f"epoch {epoch}: train loss {val['train_loss']:.4f}  valid loss {val['loss']:.4f} "
                f"(category nll {val['category_nll']:.4f}, purchase bce {val['purchase_bce']:.4f})"
            )
        no_valid = val["n_category_points"] + val["n_purchase_points"] == 0
        if no_valid or val["loss"] < best["loss"]:
            best = {
                "loss": val["loss"],
                "epoch": epoch,
                "state": {k: v.detach().clone() for k, v in net.state_dict().items()},
            }
            bad_epochs = 0
        else:
            bad_epochs += 1
            if bad_epochs >= tcfg.patience:
                break
    net.load_state_dict(best["state"])
    net.eval()
    if tcfg.calibrate:
        calib = calibrate(net, feats, log, va, device)
    else:
        calib = {"applied": False, "reason": "disabled (TrainConfig.calibrate=False)"}
    epochs_run = len(history)
    metrics = {
        "train_events_per_s": n_train * epochs_run / train_time if train_time > 0 else math.nan,
        "encode_seconds": encode_s,
        "train_seconds": train_time,
        "epochs_run": epochs_run,
        "best_epoch": best["epoch"],
        "best_valid_loss": best["loss"],
        "valid_losses": [h_["loss"] for h_ in history],
        "train_losses": [h_["train_loss"] for h_ in history],
        "history": history,
        "n_train_events": n_train,
        "n_valid_points": int(va.mask.sum()),
        "n_train_users": len(ranges),
        "n_categories": len(vocab),
        "split": split.to_dict(),
        "train_config": asdict(tcfg),
        "device": str(device),
        "threads": torch.get_num_threads(),
        "calibration": calib,
        "repeat_prior": prior,
    }
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
    **kw,
) -> dict:
    """CLI entry (``demandstream train``): load, split, train, save the checkpoint; return a summary.

    Extra keyword arguments set :class:`TrainConfig` fields (e.g. ``lanes=128``) or
    :class:`~model.network.ModelConfig` fields (e.g. ``hidden=64``).
    """
    from model.loaders import load_log

    tkw = {k: v for k, v in kw.items() if k in TrainConfig.__dataclass_fields__}
    mkw = {k: v for k, v in kw.items() if k in ModelConfig.__dataclass_fields__}
    unknown = set(kw) - set(tkw) - set(mkw)
    if unknown:
        raise ValueError(f"unknown training option(s): {', '.join(sorted(unknown))}")
    tcfg = TrainConfig(seed=seed, device=device, **tkw)
    if epochs is not None:
        tcfg.epochs = epochs
    log = load_log(data, fmt, keep_ids=False)
    split = temporal_split(log, train_end, valid_end)
    res = train(log, tcfg, ModelConfig(**mkw), progress=progress, split=split)
    version = checkpoint.save(out, res.net, res.vocab, res.metrics)
    m = res.metrics
    return {
        "model": str(out),
        "model_version": version,
        "n_events": len(log),
        "n_users": log.n_users,
        **{
            k: m[k]
            for k in (
                "n_train_events",
                "n_categories",
                "epochs_run",
                "best_epoch",
                "best_valid_loss",
                "train_events_per_s",
                "train_seconds",
                "split",
                "device",
            )
        },
    }
