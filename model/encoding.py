"""Encoding events into the feature arrays DemandLSTM reads, for one step or a whole log.

Both paths go through :meth:`FeatureBuffer.put`, which advances the user's :class:`~model.state.UserState`
summary with :func:`~model.state.observe` and writes one row of features. Streaming and offline
encoding therefore cannot differ.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from model.eventlog import EventLog
from model.events import TYPE_INDEX, Event
from model.features import Vocabulary, gap_bucket, hash_bucket, price_bucket, query_tokens
from model.network import ModelConfig
from model.state import UserState, new_state, observe

_AGE_MAX = 0xFFFF  # ages beyond this many events are all "long ago"; stored as uint16


def event_features(cfg: ModelConfig, s: UserState, cat: int, etype: int, ts: float, item_id: str | None,
                   price: float | None, query: str | None) -> tuple:
    """Apply one event to state ``s``; return its feature row (the one definition of an encoded event).

    Order: etype, item bucket, category, price bucket, gap bucket, query tokens, history categories,
    counts, ages, cart, purchases, events seen.
    """
    gap = observe(s, cat, etype, ts)
    seen = s.events_seen
    return (
        etype, hash_bucket(item_id, cfg.item_buckets), cat, price_bucket(price), gap_bucket(gap),
        query_tokens(query, cfg.query_buckets, cfg.query_tokens) if query else (),
        s.hist_cats.copy(), s.hist_counts.copy(),
        [seen - last if seen - last < _AGE_MAX else _AGE_MAX for last in s.hist_last],
        s.cart, s.purchases, seen,
    )


class FeatureBuffer:
    """Preallocated feature arrays for ``n`` rows; reused across micro-batches to avoid allocation."""

    def __init__(self, cfg: ModelConfig, n: int):
        self.cfg = cfg
        k, q = cfg.history_slots, cfg.query_tokens
        self.n = n
        self.etype = np.zeros(n, np.int64)
        self.item = np.zeros(n, np.int64)
        self.cat = np.zeros(n, np.int64)
        self.price = np.zeros(n, np.int64)
        self.gap = np.zeros(n, np.int64)
        self.query = np.zeros((n, q), np.int64)
        self.hist_cats = np.zeros((n, k), np.int32)
        self.hist_counts = np.zeros((n, k), np.uint16)
        self.hist_ages = np.zeros((n, k), np.uint16)
        self.cart = np.zeros(n, np.float32)
        self.purchases = np.zeros(n, np.float32)
        self.events_seen = np.zeros(n, np.float32)

    def put(self, row: int, s: UserState, cat: int, etype: int, ts: float, item_id: str | None,
            price: float | None, query: str | None) -> None:
        """Apply one event to state ``s`` and write its features into ``row``."""
        self.put_rows(row, [event_features(self.cfg, s, cat, etype, ts, item_id, price, query)])

    def put_rows(self, start: int, rows: list[tuple]) -> None:
        """Write :func:`event_features` tuples into consecutive rows, one column at a time."""
        if not rows:
            return
        end = start + len(rows)
        cols = list(zip(*rows, strict=True))
        self.etype[start:end] = cols[0]
        self.item[start:end] = cols[1]
        self.cat[start:end] = cols[2]
        self.price[start:end] = cols[3]
        self.gap[start:end] = cols[4]
        q = self.query[start:end]
        q[:] = 0
        for i, toks in enumerate(cols[5]):
            if toks:
                q[i, : len(toks)] = toks
        self.hist_cats[start:end] = cols[6]
        self.hist_counts[start:end] = cols[7]
        self.hist_ages[start:end] = cols[8]
        self.cart[start:end] = cols[9]
        self.purchases[start:end] = cols[10]
        self.events_seen[start:end] = cols[11]

    def tensors(self, rows: slice | np.ndarray, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        """Feature tensors of the selected rows (leading dims follow ``rows``' shape)."""
        def t(a, dtype=None):
            x = torch.from_numpy(np.ascontiguousarray(a[rows]))
            if dtype is not None:
                x = x.to(dtype)
            return x.to(device, non_blocking=True)

        return {
            "etype": t(self.etype), "item": t(self.item), "cat": t(self.cat), "price": t(self.price),
            "gap": t(self.gap), "query": t(self.query), "hist_cats": t(self.hist_cats, torch.int64),
            "hist_counts": t(self.hist_counts, torch.float32), "hist_ages": t(self.hist_ages, torch.float32),
            "cart": t(self.cart), "purchases": t(self.purchases), "events_seen": t(self.events_seen),
        }


def encode_events(buf: FeatureBuffer, events: Sequence[Event], states: Sequence[UserState],
                  vocab: Vocabulary) -> None:
    """Streaming: rows 0..len(events)-1 of ``buf`` for one event per (distinct) user; states advance."""
    cfg, index = buf.cfg, vocab.index
    buf.put_rows(0, [event_features(cfg, s, index(e.category), TYPE_INDEX[e.type], e.ts, e.item_id, e.price, e.query)
                     for e, s in zip(events, states, strict=True)])


def encode_log(log: EventLog, cfg: ModelConfig, vocab: Vocabulary) -> FeatureBuffer:
    """Offline: features of every row of a log sorted by user and time (user_start set).

    Each user's state summary starts empty at the user's first row, exactly as in the stream.
    """
    if log.user_start is None:
        raise ValueError("encode_log needs a log sorted_by_user_time()")
    buf = FeatureBuffer(cfg, len(log))
    cat_of = np.array([vocab.index(c) for c in log.categories] + [0], dtype=np.int64)  # -1 -> last = 0
    cats = cat_of[log.category]
    items, queries = log.items, log.queries
    for u in range(log.n_users):
        s = new_state(cfg.layers, 1, cfg.history_slots)  # h/c unused here: only the summary matters
        for i in range(int(log.user_start[u]), int(log.user_start[u + 1])):
            it, q, p = int(log.item[i]), int(log.query[i]), float(log.price[i])
            buf.put(i, s, int(cats[i]), int(log.etype[i]), float(log.ts[i]),
                    items[it] if it >= 0 else None, None if p != p else p, queries[q] if q >= 0 else None)
    return buf


def category_index(log: EventLog, vocab: Vocabulary) -> np.ndarray:
    """Vocabulary index of every row's category (0 = unknown or none)."""
    cat_of = np.array([vocab.index(c) for c in log.categories] + [0], dtype=np.int32)
    return cat_of[log.category]
