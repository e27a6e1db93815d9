"""DemandLSTM: a one-step-at-a-time LSTM over a user's events with two heads.

**Next category: a hybrid of what the heuristics know and what the LSTM learns.** One softmax ranks two
kinds of candidates (docs/MODEL.md §1):

- each *history slot* (a category the user touched; the slot holds the category's hash, so a category
  outside the vocabulary can be repeated too), scored by explicit features: is it the category of the
  current event, of the previous one, is it in the cart and how many items, log count, recency in
  events and in seconds, the type of the last event on it, the Markov probability of moving to it from
  the current category, its popularity, whether the vocabulary knows it; plus an LSTM term;
- every *other vocabulary category*, scored by the Markov probability from the current category
  (a sparse top-K transition table learned from training data, backed off to popularity) and the LSTM's
  own term ("explore").

The weights of those features are not fixed: they are a base vector plus a linear function of the
context (the LSTM output, the event type, the time gap, the cart), so the model learns *when* to copy
the last category and when not to (RepeatNet, Ren et al., AAAI 2019; kNN/RNN hybrids, Jannach &
Ludewig, RecSys 2017). :func:`init_like_cascade` starts the weights where the ranking equals the rule
cascade (last category, cart, history by count, Markov successors, popularity), so training begins at
the strongest heuristic and moves only where data says so.

**Purchase**: the cart-aware funnel's log-odds (a table of P(purchase | event type, cart non-empty) learned
from training labels, the ``funnel_cart`` baseline) plus a small MLP over the LSTM output and the funnel
(event type, cart, add-to-carts in the session, seconds since the last add, whether the current category
is in the cart, the user's purchase rate, the time gap) that corrects it; the MLP's output layer starts
at zero, so training starts at the counter. Platt-scaled by two buffers fitted on validation points
(identity before).

:meth:`DemandLSTM.forward` runs whole sequences (training, offline scoring); :meth:`DemandLSTM.step`
advances a batch of users by one event each (streaming). Both use the same weights and give the same
numbers (tests/unit/model/core/test_network.py checks max |Δ| ≤ 1e-5).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from demandstream.model.core.events import EVENT_TYPES
from demandstream.model.core.features import N_GAP_BUCKETS, N_PRICE_BUCKETS, PURCHASE_HORIZON_S

if TYPE_CHECKING:
    from demandstream.model.core.compiled import CompiledHeads

#: Events after which the purchase head's history-length input reaches 1/2 (it saturates toward 1):
#: about one shopping session, the scale at which a personal purchase rate starts to mean something.
HISTORY_HALF_WEIGHT = 16.0

#: Additive smoothing of the Markov table toward popularity (as the ``markov`` baseline): a rarely seen
#: current category backs off to popularity.
MARKOV_ALPHA = 1.0

#: Seconds are fed as log1p(s) / log1p(one day), so a day is 1.0 and the input stays O(1).
_LOG_DAY = math.log1p(86400.0)

#: Names of the slot features, in order (the base weights and the "why" of a ranking use them).
SLOT_FEATURES = (
    "in_history",
    "is_last",
    "is_previous",
    "in_cart",
    "cart_items",
    "log_count",
    "log_age_events",
    "log_age_seconds",
    *(f"last_{t}" for t in EVENT_TYPES),
    "markov",
    "popularity",
    "in_vocabulary",
    "log_session_count",
    "last_streak",
    "markov_history",
)
#: Slot features of a model with a history window (:attr:`ModelConfig.history_window`), after
#: :data:`SLOT_FEATURES`: the slot is not among the window's most recently seen ones, and that flag
#: times the slot's Markov log-probability, log count, cart flag and history mixture, so that the
#: cascade start can drop such a slot to the Markov tier, as the ``cascade_recent`` and ``cascade_mix``
#: baselines do (docs/MODEL.md §4.10).
WINDOW_SLOT_FEATURES = (
    "beyond_window",
    "beyond_window_markov",
    "beyond_window_log_count",
    "beyond_window_in_cart",
    "beyond_window_markov_history",
)
#: Names of the features of a vocabulary category outside the history.
VOCAB_FEATURES = ("markov", "popularity", "markov_history")

#: Initial recency decay of the history mixture (:meth:`DemandLSTM.markov_history`): the k-th most recent
#: category of the user weighs decay**k. Learned in training (a sigmoid keeps it in (0, 1)).
MIX_DECAY_INIT = 0.5

#: Outside training, the heads run on blocks of rows (:func:`head_block_rows`) of about this many
#: floats of one [rows, C + K] tensor, so that their dozen passes over it stay in a core's cache:
#: heads and top-k over 2,048 rows at 4,085 categories took 12.9k events/s at once and 26.9k in blocks
#: of 256 rows (docs/BENCHMARKS.md). Offline, the blocks also bound memory: a batch of long users
#: times a shop's 10,000 categories was GBs per tensor, and the head builds several.
HEAD_BLOCK_FLOATS = 1 << 18
#: A block has at least this many rows: the heads' ~200 tensor operations cost the same for 1 row as
#: for 256, and at a small catalog smaller blocks were slower (168 categories: 100k events/s in
#: blocks of 256, 135k of 1,024).
HEAD_BLOCK_MIN_ROWS = 256


def head_block_rows(columns: int) -> int:
    """Rows per block of the heads at ``columns`` = C + K output columns (outside training).

    >>> head_block_rows(4101), head_block_rows(184)
    (256, 1424)
    """
    return max(HEAD_BLOCK_MIN_ROWS, HEAD_BLOCK_FLOATS // max(1, columns))


@dataclass
class ModelConfig:
    """Hyper-parameters of DemandLSTM; saved in every checkpoint.

    The defaults keep the per-user state under 1.2 KB (hidden 96 float32 h and c = 768 bytes) while
    leaving the history slots, not the hidden state, to remember recent categories.
    """

    n_categories: int = 2
    hidden: int = 96
    layers: int = 1
    history_slots: int = 16
    item_buckets: int = 1 << 14
    query_buckets: int = 1 << 12
    query_tokens: int = 8
    emb_type: int = 8
    emb_item: int = 32
    emb_category: int = 32
    emb_price: int = 4
    emb_gap: int = 8
    emb_query: int = 16
    emb_repeat: int = 32
    purchase_hidden: int = 32
    dropout: float = 0.1
    markov_top_k: int = 32  #: successors kept per category in the checkpoint's transition table
    # ablation switches (docs/MODEL.md §5); the defaults are the product
    context_weights: bool = True  #: feature weights depend on the context (else one global vector)
    lstm_terms: bool = True  #: the LSTM's own repeat and explore terms
    markov_history: bool = True  #: the Markov mixture over all the user's categories as a feature
    funnel_base: bool = True  #: the purchase logit is the funnel table's log-odds plus the MLP's correction
    #: The cascade start's history and cart tiers keep only this many of the most recently seen slots
    #: (None: all of them). Training chooses it on validation, as ``cascade_recent`` chooses its own.
    history_window: int | None = None

    def to_dict(self) -> dict:
        d = asdict(self)
        if d["history_window"] is None:
            # a model without a window has the config, and so the model_version, of one from before it
            del d["history_window"]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        return cls(**known)


def _identity_calibration_if_missing(state_dict, prefix, *_args) -> None:
    """Checkpoints written before calibration existed load with the identity (a=1, b=0), i.e. unchanged."""
    state_dict.setdefault(prefix + "purchase_scale", torch.tensor(1.0))
    state_dict.setdefault(prefix + "purchase_shift", torch.tensor(0.0))
    # and before the funnel base existed with a zero one: the MLP alone, as they were trained
    state_dict.setdefault(prefix + "funnel_logit", torch.zeros(len(EVENT_TYPES), 2))


def markov_tables(cats: np.ndarray, nxt: np.ndarray, n_categories: int, top_k: int) -> dict[str, np.ndarray]:
    """Popularity and sparse top-K Markov transition counts from training rows and (current, next) pairs.

    ``cats`` are the vocabulary indices of every training row (popularity), ``nxt`` pairs as an [m, 2]
    array. The network turns counts into ``P(b | a) = (n(a, b) + alpha * pop(b)) / (n(a) + alpha)``
    (:meth:`DemandLSTM.markov_row`); successors beyond the K most frequent keep ``n(a, b) = 0``.
    Counts, not log-probabilities, are stored so that training can leave each row's own transition out.

    >>> t = markov_tables(np.array([1, 2, 1, 2, 1, 3]), np.array([[1, 2], [1, 2], [1, 3]]), 4, 1)
    >>> t["next"][1].tolist(), t["count"][1].tolist(), float(t["total"][1])
    ([2], [2.0], 3.0)
    """
    cats = np.asarray(cats, np.int64)
    counts = np.bincount(cats[cats > 0], minlength=n_categories)[:n_categories].astype(np.float64)
    counts[0] = 0.0
    pop = (counts + 0.5) / (counts.sum() + 0.5 * n_categories)  # add-half: no category has probability 0
    nxt = np.asarray(nxt, np.int64).reshape(-1, 2)
    ok = (nxt[:, 0] > 0) & (nxt[:, 1] > 0)
    keys, n = np.unique(nxt[ok, 0] * n_categories + nxt[ok, 1], return_counts=True)
    src, dst = keys // n_categories, keys % n_categories
    totals = np.bincount(src, weights=n, minlength=n_categories)[:n_categories]
    top_next = np.zeros((n_categories, top_k), np.int64)
    top_count = np.zeros((n_categories, top_k))
    order = np.lexsort((dst, -n, src))  # by source, then most frequent successor first
    src_o, dst_o, n_o = src[order], dst[order], n[order]
    first = np.searchsorted(src_o, np.arange(n_categories))
    rank = np.arange(len(src_o)) - first[src_o]
    keep = rank < top_k
    top_next[src_o[keep], rank[keep]] = dst_o[keep]
    top_count[src_o[keep], rank[keep]] = n_o[keep]
    return {"pop_logp": np.log(pop), "next": top_next, "count": top_count, "total": totals}


def funnel_table(etype: np.ndarray, has_cart: np.ndarray, label: np.ndarray) -> np.ndarray:
    """Log-odds of P(purchase within the horizon | event type, cart non-empty) [n_types, 2], Laplace
    smoothed ``(k + 1) / (n + 2)`` per cell as the ``funnel_cart`` baseline, from observable training
    points (censored ones left out by the caller). The purchase head adds the MLP's correction to it.

    >>> t = funnel_table(np.array([2, 2, 2, 0]), np.array([True, True, True, False]), np.array([1, 1, 0, 0]))
    >>> round(float(t[2, 1]), 4), round(float(t[0, 0]), 4), float(t[1, 0])   # 3/5, 1/3, unseen 1/2
    (0.4055, -0.6931, 0.0)
    """
    cell = np.asarray(etype, np.int64) * 2 + np.asarray(has_cart, bool)
    n_cells = 2 * len(EVENT_TYPES)
    n = np.bincount(cell, minlength=n_cells).astype(np.float64)
    k = np.bincount(cell, weights=np.asarray(label, np.float64), minlength=n_cells)
    p = (k + 1.0) / (n + 2.0)
    return np.log(p / (1.0 - p)).reshape(len(EVENT_TYPES), 2)


def _rows(table: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``table[idx]`` for an integer tensor ``idx`` of any shape, as one ``index_select``.

    The same gather as advanced indexing, without ``aten::index``'s generic path, which was the top
    frame of the heads on a worker's small batches (docs/BENCHMARKS.md, 2026-12-06).

    >>> _rows(torch.tensor([[1.0, 2.0], [3.0, 4.0]]), torch.tensor([[1], [0]])).tolist()
    [[[3.0, 4.0]], [[1.0, 2.0]]]
    """
    return table.index_select(0, idx.reshape(-1)).view(*idx.shape, *table.shape[1:])


def _recency_rank(ages: torch.Tensor, known: torch.Tensor) -> torch.Tensor:
    """Rank of each slot by ``ages`` among the ``known`` slots, 0 for the most recent: [..., K] float.

    Counted pairwise (K is small) rather than by two sorts. Known slots have distinct ages (each was
    last seen at a different event); the ranks of the others are never used.

    >>> _recency_rank(torch.tensor([3.0, 0.0, 7.0, 1.0]), torch.tensor([True, True, False, True])).tolist()
    [2.0, 0.0, 3.0, 1.0]
    """
    a = ages.masked_fill(~known, float("inf"))
    return (a.unsqueeze(-2) < a.unsqueeze(-1)).sum(-1).float()


class DemandLSTM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        n_types = len(EVENT_TYPES)
        c, k = cfg.n_categories, cfg.markov_top_k
        self.emb_type = nn.Embedding(n_types, cfg.emb_type)
        self.emb_item = nn.Embedding(cfg.item_buckets, cfg.emb_item, padding_idx=0)
        self.emb_cat = nn.Embedding(c, cfg.emb_category, padding_idx=0)
        self.emb_price = nn.Embedding(N_PRICE_BUCKETS, cfg.emb_price)
        self.emb_gap = nn.Embedding(N_GAP_BUCKETS, cfg.emb_gap)
        self.emb_query = nn.Embedding(cfg.query_buckets, cfg.emb_query, padding_idx=0)
        d_in = cfg.emb_type + cfg.emb_item + cfg.emb_category + cfg.emb_price + cfg.emb_gap + cfg.emb_query
        self.drop = nn.Dropout(cfg.dropout)
        self.lstm = nn.LSTM(
            d_in,
            cfg.hidden,
            num_layers=cfg.layers,
            batch_first=True,
            dropout=cfg.dropout if cfg.layers > 1 else 0.0,
        )
        # context of the feature weights: LSTM output, event type, time gap, cart state
        d_ctx = cfg.hidden + n_types + N_GAP_BUCKETS + 4
        n_slot, n_vocab = len(slot_features(cfg)), len(VOCAB_FEATURES)
        self.slot_w0 = nn.Parameter(torch.zeros(n_slot))
        self.vocab_w0 = nn.Parameter(torch.zeros(n_vocab))
        self.mix_decay = nn.Parameter(torch.tensor(math.log(MIX_DECAY_INIT / (1.0 - MIX_DECAY_INIT))))
        self.slot_ctx = nn.Linear(d_ctx, n_slot)
        self.vocab_ctx = nn.Linear(d_ctx, n_vocab)
        # the LSTM's own terms: explore over every category, repeat affinity of a slot's category
        self.explore = nn.Linear(cfg.hidden, c)
        self.repeat_query = nn.Linear(cfg.hidden, cfg.emb_repeat)
        self.repeat_emb = nn.Embedding(c, cfg.emb_repeat)
        for lin in (self.slot_ctx, self.vocab_ctx, self.explore, self.repeat_query):
            nn.init.zeros_(lin.weight)  # start as the explicit features alone; the LSTM earns its say
            nn.init.zeros_(lin.bias)
        n_funnel = n_types + 3 + N_GAP_BUCKETS + 2 + 5
        self.purchase = nn.Sequential(
            nn.Linear(cfg.hidden + n_funnel, cfg.purchase_hidden),
            nn.ReLU(),
            nn.Linear(cfg.purchase_hidden, 1),
        )
        if cfg.funnel_base:  # a correction of the funnel table: zero until trained
            nn.init.zeros_(self.purchase[-1].weight)
            nn.init.zeros_(self.purchase[-1].bias)
        # Global tables learned from training data (markov_tables): buffers, so the checkpoint (and
        # model_version) carries them and the optimizer never moves them.
        self.register_buffer("pop_logp", torch.full((c,), -math.log(max(c - 1, 1))))
        self.register_buffer("markov_next", torch.zeros(c, k, dtype=torch.int64))
        self.register_buffer("markov_count", torch.zeros(c, k))
        self.register_buffer("markov_total", torch.zeros(c))
        # log-odds of P(purchase within the horizon | event type, cart non-empty) (funnel_table)
        self.register_buffer("funnel_logit", torch.zeros(n_types, 2))
        # Platt scaling of the purchase logit (demandstream.model.training.calibration.calibrate); identity until fitted.
        self.register_buffer("purchase_scale", torch.tensor(1.0))
        self.register_buffer("purchase_shift", torch.tensor(0.0))
        self._register_load_state_dict_pre_hook(_identity_calibration_if_missing)
        # one-hot rows as gathers from identities (not in the checkpoint: they are not learned)
        self.register_buffer("eye_type", torch.eye(n_types), persistent=False)
        self.register_buffer("eye_gap", torch.eye(N_GAP_BUCKETS), persistent=False)

    @torch.no_grad()
    def set_tables(self, tables: dict[str, np.ndarray]) -> None:
        """Install :func:`markov_tables` output (trained on training rows only)."""
        self.pop_logp.copy_(torch.as_tensor(tables["pop_logp"], dtype=torch.float32))
        self.markov_next.copy_(torch.as_tensor(tables["next"]))
        self.markov_count.copy_(torch.as_tensor(tables["count"], dtype=torch.float32))
        self.markov_total.copy_(torch.as_tensor(tables["total"], dtype=torch.float32))
        if "funnel_logit" in tables and self.cfg.funnel_base:
            self.funnel_logit.copy_(torch.as_tensor(tables["funnel_logit"], dtype=torch.float32))

    # -- inputs ---------------------------------------------------------------------------------

    def embed(self, f: dict[str, torch.Tensor]) -> torch.Tensor:
        q = f["query"]
        q_mask = (q > 0).unsqueeze(-1).float()
        q_emb = (self.emb_query(q) * q_mask).sum(-2) / q_mask.sum(-2).clamp(min=1.0)
        x = torch.cat(
            [
                self.emb_type(f["etype"]),
                self.emb_item(f["item"]),
                self.emb_cat(f["cat"]),
                self.emb_price(f["price"]),
                self.emb_gap(f["gap"]),
                q_emb,
            ],
            dim=-1,
        )
        return self.drop(x)

    # -- heads ----------------------------------------------------------------------------------

    def markov_row(
        self, src: torch.Tensor, own_count: torch.Tensor | None = None, own_total: torch.Tensor | None = None
    ) -> torch.Tensor:
        """log P(next = c | current = src) for every vocabulary category c: [..., C].

        ``own_count`` [..., K] / ``own_total`` [...] (training only) are the transitions the row's own
        user contributed to the table (counts for ``src``'s K stored successors, and in all): they are
        subtracted, so a training row never sees its user's own transitions, its target's above all,
        in its features (out-of-sample, as every later user will).
        """
        total = _rows(self.markov_total, src)
        nxt, count = _rows(self.markov_next, src), _rows(self.markov_count, src)
        if own_count is not None and own_total is not None:
            total = (total - own_total).clamp(min=0.0)
            count = (count - own_count).clamp(min=0.0)
        denom = (total + MARKOV_ALPHA).unsqueeze(-1)
        dense = torch.log(MARKOV_ALPHA / denom) + self.pop_logp
        top = torch.log((count + MARKOV_ALPHA * _rows(self.pop_logp.exp(), nxt)) / denom)
        # in place: with thousands of categories every [..., C] pass counts (docs/BENCHMARKS.md)
        return dense.scatter_(-1, nxt, torch.maximum(top, dense.gather(-1, nxt)))

    def markov_history(
        self,
        hv: torch.Tensor,
        known: torch.Tensor,
        ages: torch.Tensor,
        own_count: torch.Tensor | None = None,
        own_total: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """log sum_s w_s P(next = c | category of slot s) for every vocabulary category c: [..., C].

        The Markov rows of *all* the user's known categories (``hv`` [..., K] where ``known``), mixed with
        weights decaying by recency rank (the most recent, ``ages`` smallest, weighs 1, the next
        ``decay``, ...; normalised): where a user's recent categories point together, like a session
        kNN (Jannach & Ludewig, RecSys 2017) over the stored transition table. Popularity when the user
        has no known category. ``own_count`` [..., K, top-K] / ``own_total`` [..., K] (training only)
        are the user's own transitions, left out as in :meth:`markov_row`.
        """
        rank = _recency_rank(ages, known)
        w = torch.where(known, torch.sigmoid(self.mix_decay) ** rank, torch.zeros_like(rank))
        wsum = w.sum(-1, keepdim=True)
        w = w / wsum.clamp(min=1e-12)
        total, nxt, count = (
            _rows(self.markov_total, hv),
            _rows(self.markov_next, hv),
            _rows(self.markov_count, hv),
        )
        if own_count is not None and own_total is not None:
            total = (total - own_total).clamp(min=0.0)
            count = (count - own_count).clamp(min=0.0)
        denom = total + MARKOV_ALPHA
        # a row without a known category has w = 0 everywhere, so (0 + 1) * pop is exactly popularity:
        # the same numbers as a final where(wsum > 0, mix, pop), one [..., C] pass fewer
        base = (w * MARKOV_ALPHA / denom).sum(-1, keepdim=True) + (wsum == 0)
        mix = (base * self.pop_logp.exp()).scatter_add_(
            -1, nxt.flatten(-2), ((w / denom).unsqueeze(-1) * count).flatten(-2)
        )
        return torch.log(mix)

    def heads(
        self,
        h: torch.Tensor,
        f: dict[str, torch.Tensor],
        explain: bool = False,
        purchase_only: bool = False,
        cat_at: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Head outputs from LSTM outputs ``h`` [..., hidden] and the step's features.

        ``cat_logits`` [..., C + K]: the first C columns score vocabulary categories outside the history
        (-inf for those in it and for index 0), the last K score the history slots (-inf when empty).
        With ``explain``, the terms those logits are sums of are returned too, under keys starting with
        ``x_`` (:mod:`demandstream.model.core.explain` names them); they cost nothing otherwise.
        With ``cat_at`` (a boolean mask over ``h``'s leading dims), the category outputs are computed
        only at those cells ([n, C + K], row-major order) and ``purchase_logit`` at every cell: training
        scores a next category at about half of a window's cells (the rest pad lanes or have no next
        category), and the [cells, C + K] work is what grows with a shop's catalog. The numbers at those
        cells equal the unmasked call's, dropout included (its mask is drawn over every cell, as without).
        """
        purchase_logit, hd, f, step = self.purchase_and_category_inputs(
            h, f, None if purchase_only else cat_at
        )
        if purchase_only:
            return {"purchase_logit": purchase_logit}
        out = self.category_head(hd, f, step, explain)
        out["purchase_logit"] = purchase_logit
        return out

    def purchase_and_category_inputs(
        self, h: torch.Tensor, f: dict[str, torch.Tensor], cat_at: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor], tuple[torch.Tensor, ...]]:
        """What :meth:`heads` computes before its category part: dropout over every cell of ``h``, the
        purchase logit at every cell, then the dropped-out output, features and :meth:`_step_inputs`
        that :meth:`category_head` takes, at the cells ``cat_at`` (all when None)."""
        hd = self.drop(h)
        step = self._step_inputs(f)
        purchase_logit = self.purchase_head(hd, f, step)
        if cat_at is not None:
            hd, step = hd[cat_at], tuple(s[cat_at] for s in step)
            f = {k: v[cat_at] for k, v in f.items()}
        return purchase_logit, hd, f, step

    def category_head(
        self,
        hd: torch.Tensor,
        f: dict[str, torch.Tensor],
        step: tuple[torch.Tensor, ...],
        explain: bool = False,
    ) -> dict[str, torch.Tensor]:
        """The next-category part of :meth:`heads`: ``cat_logits`` (and with ``explain`` its terms) from
        the dropped-out LSTM output ``hd`` [..., hidden], the step's features and their
        :meth:`_step_inputs`. Training with a large catalog calls it a block of cells at a time."""
        cfg = self.cfg
        etype_1h, gap_1h, has_cart, log_cart, adds = step
        ctx = torch.cat(
            [
                hd,
                etype_1h,
                gap_1h,
                has_cart,
                log_cart,
                (adds > 0).float(),
                torch.log1p(f["streak"]).unsqueeze(-1),
            ],
            dim=-1,
        )

        cats, hv = f["hist_cats"], f["hist_vocab"]
        valid = cats > 0
        ages = f["hist_ages"]
        # the current category: the most recently seen slot (this event's, when it has one)
        recent = ages.masked_fill(~valid, float("inf")).argmin(-1, keepdim=True)
        src = hv.gather(-1, recent).squeeze(-1) * valid.any(-1).long()
        mk = self.markov_row(src, f.get("markov_own_count"), f.get("markov_own_total"))  # [..., C]
        slot_mk = mk.gather(-1, hv)
        if cfg.markov_history:
            mix = self.markov_history(
                hv, valid & (hv > 0), ages, f.get("markov_own_slot_count"), f.get("markov_own_slot_total")
            )
        else:
            mix = torch.zeros_like(mk)
        slot_cart = f["hist_cart"]
        slot_mix = mix.gather(-1, hv)
        phi = torch.cat(
            [
                torch.ones_like(ages).unsqueeze(-1),
                (ages == 0).float().unsqueeze(-1),
                (ages == 1).float().unsqueeze(-1),
                (slot_cart > 0).float().unsqueeze(-1),
                torch.log1p(slot_cart).unsqueeze(-1),
                torch.log1p(f["hist_counts"]).unsqueeze(-1),
                torch.log1p(ages).unsqueeze(-1),
                (torch.log1p(f["hist_secs"]) / _LOG_DAY).unsqueeze(-1),
                _rows(self.eye_type, f["hist_etype"]),
                slot_mk.unsqueeze(-1),
                _rows(self.pop_logp, hv).unsqueeze(-1),
                (hv > 0).float().unsqueeze(-1),
                torch.log1p(f["hist_session"]).unsqueeze(-1),
                ((ages == 0).float() * torch.log1p(f["streak"]).unsqueeze(-1)).unsqueeze(-1),
                slot_mix.unsqueeze(-1),
                *self._window_features(ages, valid, slot_mk, f["hist_counts"], slot_cart, slot_mix),
            ],
            dim=-1,
        )  # [..., K, F]
        sw, vw = self.slot_w0, self.vocab_w0
        if cfg.context_weights:
            sw = sw + self.slot_ctx(ctx)
            vw = vw + self.vocab_ctx(ctx)
        else:
            sw = sw.expand(*ctx.shape[:-1], -1)
            vw = vw.expand(*ctx.shape[:-1], -1)
        slot_score = (phi * sw.unsqueeze(-2)).sum(-1)
        # Serving (no gradient, not explained) writes the logits straight into their [..., C + K] tensor
        # and the explore term's matrix product into it too: with thousands of categories the concatenation
        # and the product's own output were a sixth of the stream's step (docs/BENCHMARKS.md). Training
        # keeps the out-of-place form autograd needs, and so do the compiled heads (inductor fuses these
        # passes anyway, and refuses ``out=`` under dynamic shapes); they agree to float rounding (a test).
        serving = not explain and not torch.is_grad_enabled() and not torch.compiler.is_compiling()
        n_vocab = mk.shape[-1]
        logits = mk.new_empty(*mk.shape[:-1], n_vocab + hv.shape[-1]) if serving else None
        # the same sums as vw0 * mk + vw1 * pop + vw2 * mix, accumulated in place (fewer [..., C] passes)
        vocab_score = torch.mul(vw[..., 0:1], mk, out=logits[..., :n_vocab]) if serving else vw[..., 0:1] * mk
        vocab_score.addcmul_(vw[..., 1:2], self.pop_logp).addcmul_(vw[..., 2:3], mix)
        repeat = explore = None
        if cfg.lstm_terms:
            repeat = (self.repeat_emb(hv) * self.repeat_query(hd).unsqueeze(-2)).sum(-1)
            slot_score = slot_score + repeat
            if serving and vocab_score.dim() == 2:
                vocab_score.add_(self.explore.bias).addmm_(hd, self.explore.weight.t())
            else:
                explore = self.explore(hd)
                vocab_score.add_(explore)
        slot_score = slot_score.masked_fill(~valid, float("-inf"))
        # a category in the history is scored once, by its slot; index 0 (unknown) is never predicted
        vocab_score.scatter_(-1, torch.where(valid, hv, 0), float("-inf"))
        vocab_score[..., 0] = float("-inf")
        if serving:
            logits[..., n_vocab:] = slot_score
        else:
            logits = torch.cat([vocab_score, slot_score], dim=-1)

        out = {"cat_logits": logits}
        if explain:
            out.update(
                x_phi=phi,
                x_sw=sw,
                x_repeat=torch.zeros_like(slot_score) if repeat is None else repeat,
                x_mk=mk,
                x_mix=mix,
                x_vw=vw,
                x_explore=torch.zeros_like(mk) if explore is None else explore,
                x_src=src,
            )
        return out

    def _window_features(
        self,
        ages: torch.Tensor,
        valid: torch.Tensor,
        slot_mk: torch.Tensor,
        counts: torch.Tensor,
        slot_cart: torch.Tensor,
        slot_mix: torch.Tensor,
    ) -> list[torch.Tensor]:
        """The :data:`WINDOW_SLOT_FEATURES` columns ([..., K, 1] each), none without a history window."""
        window = self.cfg.history_window
        if window is None:
            return []
        beyond = ((_recency_rank(ages, valid) >= window) & valid).float()
        return [
            beyond.unsqueeze(-1),
            (beyond * slot_mk).unsqueeze(-1),
            (beyond * torch.log1p(counts)).unsqueeze(-1),
            (beyond * (slot_cart > 0).float()).unsqueeze(-1),
            (beyond * slot_mix).unsqueeze(-1),
        ]

    def _step_inputs(self, f: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """The step's inputs both heads read, computed once: one-hot event type and time gap, cart
        non-empty, log1p(cart size), add-to-carts in the session, each [..., width]."""
        cart = f["cart"].unsqueeze(-1)
        return (
            _rows(self.eye_type, f["etype"]),
            _rows(self.eye_gap, f["gap"]),
            (cart > 0).float(),
            torch.log1p(cart),
            f["session_adds"].unsqueeze(-1),
        )

    def purchase_head(
        self, hd: torch.Tensor, f: dict[str, torch.Tensor], step: tuple[torch.Tensor, ...] | None = None
    ) -> torch.Tensor:
        """Purchase logit [...] from the (dropped-out) LSTM output ``hd`` and the step's funnel features:
        ``funnel_cart``'s table plus the MLP's correction, Platt-scaled. It reads no category score, so
        the purchase-head phase of training and the calibration run it alone (``purchase_only``).
        ``step`` is :meth:`_step_inputs` of ``f`` when the caller has it already."""
        etype_1h, gap_1h, has_cart, log_cart, adds = self._step_inputs(f) if step is None else step
        ages, slot_cart = f["hist_ages"], f["hist_cart"]
        in_cart_now = ((ages == 0) & (slot_cart > 0)).any(-1, keepdim=True).float()
        add_secs = f["add_secs"].unsqueeze(-1)
        funnel = torch.cat(
            [
                etype_1h,
                log_cart,
                has_cart,
                torch.log1p(f["purchases"]).unsqueeze(-1),
                # the user's own purchase rate and how much history backs it (bounded inputs)
                (f["purchases"] / f["events_seen"].clamp(min=1.0)).unsqueeze(-1),
                (f["events_seen"] / (f["events_seen"] + HISTORY_HALF_WEIGHT)).unsqueeze(-1),
                gap_1h,
                torch.log1p(adds),
                (adds > 0).float(),
                torch.log1p(add_secs) / _LOG_DAY,
                (add_secs < PURCHASE_HORIZON_S).float(),
                in_cart_now,
            ],
            dim=-1,
        )
        purchase_logit = self.purchase(torch.cat([hd, funnel], dim=-1)).squeeze(-1)
        cell = f["etype"] * 2 + (f["cart"] > 0).long()
        purchase_logit = purchase_logit + self.funnel_logit.reshape(-1)[cell]
        purchase_logit = (
            self.purchase_scale * purchase_logit + self.purchase_shift
        )  # identity unless calibrated
        return purchase_logit

    @staticmethod
    def category_probs(out: dict[str, torch.Tensor], f: dict[str, torch.Tensor]) -> torch.Tensor:
        """Next-category distribution [..., C + K]: vocabulary categories first, then the history slots
        whose category is outside the vocabulary (0 for the slots of vocabulary categories, whose
        probability is added to their vocabulary column)."""
        p = torch.softmax(out["cat_logits"], dim=-1)
        hv = f["hist_vocab"]
        k = hv.shape[-1]
        pv, ps = p[..., :-k], p[..., -k:]
        known = hv > 0
        pv = pv.scatter_add(-1, hv, ps * known)
        return torch.cat([pv, ps * ~known], dim=-1)

    @staticmethod
    def category_top(
        out: dict[str, torch.Tensor], f: dict[str, torch.Tensor], k: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``k`` most probable next categories: probabilities [..., k] and their columns in
        :meth:`category_probs`'s layout [..., k], largest first. The same numbers as
        ``category_probs(out, f).topk(k)`` (exact ties may come in another order).

        Every category has exactly one finite logit (a vocabulary column, or the history slot that
        scores it), so the top of the logits is the top of the distribution, and the slots'
        probabilities need not be moved to their vocabulary columns first: two [..., C + K] passes
        fewer, which at a catalog of thousands of categories is a sixth of the stream's step
        (docs/BENCHMARKS.md). ``k`` must not exceed the number of categories with a finite logit (at
        least C - 1, the vocabulary without its unknown index; the Scorer's ``top_k`` is capped so).
        """
        logits = out["cat_logits"]
        cols = logits.topk(k, dim=-1).indices
        # one fused softmax is faster here than a log-sum-exp over the logits (several passes on CPU)
        p = torch.softmax(logits, dim=-1).gather(-1, cols)
        hv = f["hist_vocab"]
        n_vocab = logits.shape[-1] - hv.shape[-1]
        # a slot whose category the vocabulary knows is reported at that vocabulary column
        slot_vocab = hv.gather(-1, (cols - n_vocab).clamp(min=0))
        return p, torch.where((cols >= n_vocab) & (slot_vocab > 0), slot_vocab, cols)

    @staticmethod
    def category_log_prob(
        out: dict[str, torch.Tensor],
        f: dict[str, torch.Tensor],
        target: torch.Tensor,
        target_hash: torch.Tensor,
    ) -> torch.Tensor:
        """log P(next category) for targets given as vocabulary index and category hash (training loss).

        -inf where the target can be ranked neither as a vocabulary category nor as a history slot.
        """
        lp = torch.log_softmax(out["cat_logits"], dim=-1)
        k = f["hist_cats"].shape[-1]
        lp_v = lp[..., :-k].gather(-1, target.clamp(min=0).unsqueeze(-1))
        lp_v = lp_v.masked_fill((target <= 0).unsqueeze(-1), float("-inf"))
        lp_s = lp[..., -k:].masked_fill(f["hist_cats"] != target_hash.unsqueeze(-1), float("-inf"))
        return torch.logsumexp(torch.cat([lp_v, lp_s], dim=-1), dim=-1)

    @staticmethod
    def target_columns(f: dict[str, torch.Tensor], cat_t: torch.Tensor, hash_t: torch.Tensor, n_vocab: int):
        """Column of each target in :meth:`category_probs`'s output, -1 where it has none: the vocabulary
        index (``cat_t`` > 0), else the history slot holding the target's hash (``hash_t``) outside it."""
        match = (f["hist_cats"] == hash_t.unsqueeze(-1)) & (f["hist_vocab"] == 0) & (hash_t > 0).unsqueeze(-1)
        slot_col = torch.where(match.any(-1), n_vocab + match.float().argmax(-1), -1)
        return torch.where(cat_t > 0, cat_t, slot_col)

    # -- running --------------------------------------------------------------------------------

    def initial_state(self, batch: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        z = torch.zeros(self.cfg.layers, batch, self.cfg.hidden, device=device)
        return z, z.clone()

    def forward(
        self,
        f: dict[str, torch.Tensor],
        state=None,
        explain: bool = False,
        purchase_only: bool = False,
        cat_at: torch.Tensor | None = None,
    ):
        """Whole sequences: features [B, T, ...] -> (head outputs [B, T, ...], (h, c) [layers, B, hidden]).
        With ``purchase_only``, the outputs are the purchase logit alone (the category head is skipped);
        with ``cat_at`` [B, T], the category outputs only at those cells (:meth:`heads`)."""
        x = self.embed(f)
        if state is None:
            state = self.initial_state(x.shape[0], x.device)
        out, state = self.lstm(x, state)
        return self.heads(out, f, explain, purchase_only, cat_at), state

    def forward_at(
        self,
        f: dict[str, torch.Tensor],
        where: torch.Tensor,
        explain: bool = False,
        purchase_only: bool = False,
    ) -> Iterator[tuple[slice, dict[str, torch.Tensor], dict[str, torch.Tensor]]]:
        """Whole sequences [B, T] from the initial state, head outputs only at the cells ``where`` [B, T].

        Yields ``(part, outputs, features)``: ``part`` is a slice of the selected cells in row-major
        (user, step) order, ``outputs`` and ``features`` are theirs ([n, ...]). The LSTM runs over every
        cell (the state needs the whole sequence), the heads only where asked and a block of rows at a
        time (:func:`head_block_rows`): offline scoring and validation ask for a window's points
        after long histories, and the heads' [cells, C + K] tensors are what grows with a shop's
        categories (:meth:`heads_in_blocks`). The numbers equal :meth:`forward`'s at those cells.
        """
        x = self.embed(f)
        out, _ = self.lstm(x, self.initial_state(x.shape[0], x.device))
        w = where.to(out.device)
        yield from self.heads_in_blocks(out[w], {k: v[w] for k, v in f.items()}, explain, purchase_only)

    def heads_in_blocks(
        self,
        h: torch.Tensor,
        f: dict[str, torch.Tensor],
        explain: bool = False,
        purchase_only: bool = False,
        compiled: CompiledHeads | None = None,
    ) -> Iterator[tuple[slice, dict[str, torch.Tensor], dict[str, torch.Tensor]]]:
        """:meth:`heads` of ``h`` [n, hidden] and its rows' features, a block of :func:`head_block_rows`
        rows at a time: ``(part, outputs, features)`` per block, ``part`` a slice of the n rows. Each
        row's numbers are those of one call over all of them (the heads work row by row). With
        ``compiled`` (of this net) and not ``explain``, the blocks run compiled."""
        if compiled is None or explain or purchase_only:
            heads = functools.partial(self.heads, explain=explain, purchase_only=purchase_only)
        else:
            heads = compiled.heads
        n = h.shape[0]
        rows = head_block_rows(self.pop_logp.shape[0] + f["hist_cats"].shape[-1])
        if n <= rows:  # the stream's usual micro-batch: no slicing of the features
            yield slice(0, n), heads(h, f), f
            return
        for i in range(0, n, rows):
            part = slice(i, min(n, i + rows))
            fb = {k: v[part] for k, v in f.items()}
            yield part, heads(h[part], fb), fb

    def recur_packed(
        self, rows: dict[str, torch.Tensor], lengths: np.ndarray, state: tuple[torch.Tensor, torch.Tensor]
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """Sequences of different lengths from given states through the LSTM: its output at every row
        [n, hidden], in the rows' order, and the final (h, c) of each user at its own last step; the
        heads are the caller's (:meth:`heads_in_blocks`).

        ``rows`` holds every feature of the n = sum(``lengths``) events in (user, step) order, user b's
        ``lengths[b]`` events after the users before it. The stream uses it when a micro-batch holds
        several events of one user: one call instead of one :meth:`step` per event, with the same
        numbers. Only the n real rows are embedded, and they go to the LSTM in its packed (time-major)
        layout by one gather (:func:`packed_order`), with no padded [B, T] tensor on either side.
        """
        perm, batch_sizes, order = packed_order(lengths)
        dev = rows["etype"].device
        perm_t = torch.from_numpy(perm).to(dev)
        order_t = torch.from_numpy(order).to(dev)
        packed = nn.utils.rnn.PackedSequence(
            self.embed(rows)[perm_t],
            torch.from_numpy(batch_sizes),
            order_t,
            torch.empty_like(order_t).scatter_(0, order_t, torch.arange(len(order), device=dev)),
        )
        out, state = self.lstm(packed, state)
        h = torch.empty_like(out.data)
        h[perm_t] = out.data
        return h, state

    def step(
        self,
        f: dict[str, torch.Tensor],
        state: tuple[torch.Tensor, torch.Tensor],
        explain: bool = False,
        compiled: CompiledHeads | None = None,
    ):
        """One event per user: features [B, ...] -> (head outputs [B, ...], new (h, c)). With
        ``compiled`` (of this net) and not ``explain``, the heads run compiled, with the same numbers to
        float rounding. The stream's step is :meth:`recur` and :meth:`heads_in_blocks`, the same."""
        h, state = self.recur(f, state)
        heads = self.heads if compiled is None or explain else compiled.heads
        return heads(h, f, explain), state

    def recur(
        self, f: dict[str, torch.Tensor], state: tuple[torch.Tensor, torch.Tensor]
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """:meth:`step` without the heads: the LSTM's output [B, hidden] and the new (h, c)."""
        x = self.embed(f).unsqueeze(1)
        out, state = self.lstm(x, state)
        return out.squeeze(1), state


def packed_order(lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Where each step of a packed LSTM batch comes from, for users with ``lengths`` [B] (all >= 1)
    whose rows are stored in (user, step) order.

    Returns ``(perm, batch_sizes, order)``: ``order`` the users longest first (stable), ``batch_sizes[t]``
    how many users have a step t, and ``perm[i]`` the row of the i-th packed step (time-major, users
    in ``order``), the layout ``torch.nn.utils.rnn.PackedSequence`` holds.

    >>> perm, sizes, order = packed_order(np.array([1, 3, 2]))
    >>> perm.tolist(), sizes.tolist(), order.tolist()
    ([1, 4, 0, 2, 5, 3], [3, 2, 1], [1, 2, 0])
    """
    lengths = np.asarray(lengths, np.int64)
    order = np.argsort(-lengths, kind="stable")
    starts = np.cumsum(lengths) - lengths
    batch_sizes = np.bincount(lengths - 1, minlength=int(lengths.max()))[::-1].cumsum()[::-1].copy()
    t = np.repeat(np.arange(len(batch_sizes)), batch_sizes)
    j = np.arange(len(t)) - np.repeat(np.cumsum(batch_sizes) - batch_sizes, batch_sizes)
    return starts[order[j]] + t, batch_sizes, order


#: Base weights that make the ranking equal the rule cascade (see :func:`init_like_cascade`).
CASCADE_SLOT_WEIGHTS = {
    "in_history": 2.0,  # any history category above every other (Markov log-probabilities are <= 0)
    "is_last": 8.0,  # the current category first
    "in_cart": 4.0,  # then the cart (4 > the count term of any realistic count)
    "log_count": 0.5,  # then the rest of the history by count
    "log_age_events": -1e-3,  # ties by recency
}
CASCADE_VOCAB_WEIGHTS = {"markov": 1.0}  # outside the history: Markov successors, backed off to popularity
#: With a history window, a slot beyond it loses its history, count and cart terms and gains the Markov
#: term of a category outside the history: the cascade_recent baseline's ranking.
CASCADE_WINDOW_WEIGHTS = {
    "beyond_window": -CASCADE_SLOT_WEIGHTS["in_history"],
    "beyond_window_markov": CASCADE_VOCAB_WEIGHTS["markov"],
    "beyond_window_log_count": -CASCADE_SLOT_WEIGHTS["log_count"],
    "beyond_window_in_cart": -CASCADE_SLOT_WEIGHTS["in_cart"],
}
#: The start of ``cascade_mix``: outside the history, and beyond the window, the history mixture ranks
#: instead of the current category's Markov row.
CASCADE_MIX_VOCAB_WEIGHTS = {"markov_history": 1.0}
CASCADE_MIX_WINDOW_WEIGHTS = {
    **{k: v for k, v in CASCADE_WINDOW_WEIGHTS.items() if k != "beyond_window_markov"},
    "beyond_window_markov_history": 1.0,
}


def slot_features(cfg: ModelConfig) -> tuple[str, ...]:
    """Names of a history slot's features for a model of ``cfg``, in the order the head stacks them.

    >>> slot_features(ModelConfig()) == SLOT_FEATURES
    True
    >>> slot_features(ModelConfig(history_window=8))[-len(WINDOW_SLOT_FEATURES) :] == WINDOW_SLOT_FEATURES
    True
    """
    return SLOT_FEATURES + (WINDOW_SLOT_FEATURES if cfg.history_window is not None else ())


@torch.no_grad()
def init_like_cascade(net: DemandLSTM, mixture: bool = False) -> None:
    """Set the base feature weights so that, before any training, the ranking is the rule cascade:
    last category, cart, other history categories by count (recent first on ties), Markov successors of
    the current category, popularity; with a history window, the cart and history tiers hold only the
    window's most recently seen slots (``cascade_recent``); with ``mixture``, the categories outside
    those tiers are ranked by the history mixture instead of the current category's Markov row
    (``cascade_mix``), which needs the mixture (``ModelConfig.markov_history``). The context terms and
    the LSTM terms start at zero."""
    if mixture and not net.cfg.markov_history:
        raise ValueError("a cascade_mix start needs the history mixture (ModelConfig.markov_history)")
    net.slot_w0.zero_()
    net.vocab_w0.zero_()
    names = slot_features(net.cfg)
    window = {}
    if net.cfg.history_window is not None:
        window = CASCADE_MIX_WINDOW_WEIGHTS if mixture else CASCADE_WINDOW_WEIGHTS
    for name, w in {**CASCADE_SLOT_WEIGHTS, **window}.items():
        net.slot_w0[names.index(name)] = w
    for name, w in (CASCADE_MIX_VOCAB_WEIGHTS if mixture else CASCADE_VOCAB_WEIGHTS).items():
        net.vocab_w0[VOCAB_FEATURES.index(name)] = w
