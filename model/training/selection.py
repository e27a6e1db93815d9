"""Which epoch to keep: the one-standard-error rule on validation MRR@20 (docs/MODEL.md §2,
"Selection"), and the snapshots of each epoch's weights it chooses among."""

from __future__ import annotations

import math

import numpy as np

from demandstream.model.core.network import DemandLSTM

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


def snapshot(net: DemandLSTM) -> dict:
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def improves(history: list[dict], val: dict) -> bool:
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


def select_epoch(
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
