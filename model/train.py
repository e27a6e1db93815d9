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
    net.eval()
    want = pts.category_points | pts.observable
    starts, ends = log.user_start[:-1], log.user_start[1:]
    lengths = ends - starts
    users = [u for u in np.argsort(-lengths, kind="stable") if lengths[u] and want[starts[u] : ends[u]].any()]
    tot_nll = tot_bce = 0.0
    n_cat = n_buy = 0
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
        out, _ = net(f)
        v = torch.from_numpy(valid).to(device)
        cat_t = torch.from_numpy(np.where(valid, pts.cat_target[idx], -1)).to(device)
        obs = torch.from_numpy(valid & pts.observable[idx]).to(device) & v
        buy = torch.from_numpy(pts.purchase[idx]).to(device)
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
