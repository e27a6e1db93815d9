"""Encoding events into the feature arrays DemandLSTM reads, for one step or a whole log.

Both paths go through :func:`event_features`, which advances the user's :class:`~demandstream.model.core.state.UserState`
summary with :func:`~demandstream.model.core.state.observe` and returns one named row of features; :class:`FeatureBuffer`
stores rows column by column. Streaming and offline encoding therefore cannot differ.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import torch

from demandstream.model.core.events import TYPE_INDEX, Event
from demandstream.model.core.features import (
    Vocabulary,
    category_hash,
    gap_bucket,
    hash_bucket,
    price_bucket,
    query_tokens,
)
from demandstream.model.core.network import ModelConfig
from demandstream.model.core.state import UserState, new_state, observe

if TYPE_CHECKING:  # the core runs on duck-typed logs; the data layer is never imported by it
    from demandstream.model.data.eventlog import EventLog

_AGE_MAX = 0xFFFF  # ages beyond this many events are all "long ago"; stored as uint16

#: Seconds-since features of something that never happened (no add-to-cart yet): far beyond any horizon.
NEVER_S = 1e8


class EncodedEvent(NamedTuple):
    """One encoded event: the features of the step and the history summary *after* the event."""

    etype: int
    item: int
    cat: int  #: vocabulary index of the event's category (0 = none or unknown)
    price: int
    gap: int
    query: Sequence[int]
    hist_cats: list[int]  #: category hashes of the slots (-1 = empty)
    hist_counts: list[int]
    hist_last: list[int]  #: events_seen when each slot was last seen (ages derive per batch)
    hist_ts: list[int]  #: second when each slot was last seen (seconds-since derive per batch)
    hist_cart: list[int]
    hist_etype: list[int]
    hist_session: list[int]  #: events in each slot's category during the current session
    cart: int
    purchases: int
    events_seen: int
    session_adds: int
    add_secs: float  #: seconds since the last add-to-cart (NEVER_S when none)
    streak: int  #: consecutive events in the current category
    now: float  #: the user's event time after this event


def event_features(
    cfg: ModelConfig,
    s: UserState,
    cat: int,
    cat_hash: int,
    etype: int,
    ts: float,
    item_id: str | None,
    price: float | None,
    query: str | None,
) -> EncodedEvent:
    """Apply one event to state ``s``; return its feature row (the one definition of an encoded event)."""
    gap = observe(s, cat_hash, etype, ts)
    seen = s.events_seen
    now = s.last_ts
    # Positional: keywords would cost ~1.3 µs an event, on the stream's hot path (a NamedTuple binds
    # them in Python); tests/unit/model/core/test_encoding.py checks every field by name instead.
    return EncodedEvent(
        etype,
        hash_bucket(item_id, cfg.item_buckets),
        cat,
        price_bucket(price),
        gap_bucket(gap),
        query_tokens(query, cfg.query_buckets, cfg.query_tokens) if query else (),
        s.hist_cats.copy(),
        s.hist_counts.copy(),
        s.hist_last.copy(),
        s.hist_ts.copy(),
        s.hist_cart.copy(),
        s.hist_etype.copy(),
        s.hist_session.copy(),
        s.cart,
        s.purchases,
        seen,
        s.session_adds,
        NEVER_S if math.isnan(s.last_add_ts) else max(0.0, now - s.last_add_ts),
        s.streak,
        now,
    )


#: Columns of a FeatureBuffer: name -> (numpy dtype of storage, torch dtype handed to the network).
#: ``hist_*`` columns have one value per history slot, ``query`` one per query token, the rest one.
#: The columns of :data:`DERIVED_COLUMNS` are computed per batch with numpy; every other column is the
#: field of :class:`EncodedEvent` of the same name.
COLUMNS: dict[str, tuple[type, torch.dtype]] = {
    "etype": (np.int64, torch.int64),
    "item": (np.int64, torch.int64),
    "cat": (np.int64, torch.int64),
    "price": (np.int64, torch.int64),
    "gap": (np.int64, torch.int64),
    "query": (np.int64, torch.int64),
    "hist_cats": (np.int64, torch.int64),
    "hist_vocab": (np.int64, torch.int64),
    "hist_counts": (np.float32, torch.float32),
    "hist_ages": (np.float32, torch.float32),
    "hist_secs": (np.float32, torch.float32),
    "hist_cart": (np.float32, torch.float32),
    "hist_etype": (np.int64, torch.int64),
    "cart": (np.float32, torch.float32),
    "purchases": (np.float32, torch.float32),
    "events_seen": (np.float32, torch.float32),
    "session_adds": (np.float32, torch.float32),
    "add_secs": (np.float32, torch.float32),
    "hist_session": (np.float32, torch.float32),
    "streak": (np.float32, torch.float32),
}
#: Columns derived per batch: the vocabulary index of each slot's hash, events since each slot was last
#: seen (0 = this event) and seconds since.
DERIVED_COLUMNS = ("hist_vocab", "hist_ages", "hist_secs")
#: Columns copied from the EncodedEvent field of the same name (``query`` is padded on its own).
_COPIED_COLUMNS = tuple(n for n in COLUMNS if n not in DERIVED_COLUMNS and n != "query")


class FeatureBuffer:
    """Preallocated feature arrays for ``n`` rows; reused across micro-batches to avoid allocation.

    ``vocab`` maps each history slot's category hash to its vocabulary index (``hist_vocab``).
    """

    def __init__(self, cfg: ModelConfig, n: int, vocab: Vocabulary):
        self.cfg = cfg
        self.vocab = vocab
        self.n = n
        k, q = cfg.history_slots, cfg.query_tokens
        self.cols: dict[str, np.ndarray] = {}
        for name, (dtype, _) in COLUMNS.items():
            shape = (n, k) if name.startswith("hist_") else (n, q) if name == "query" else (n,)
            self.cols[name] = np.zeros(shape, dtype)

    def __getattr__(self, name: str) -> np.ndarray:
        cols = self.__dict__.get("cols")
        if cols is not None and name in cols:
            return cols[name]
        raise AttributeError(name)

    def put_rows(self, start: int, rows: Sequence[EncodedEvent]) -> None:
        """Write :func:`event_features` rows into consecutive rows, one column at a time."""
        if not rows:
            return
        end = start + len(rows)
        cols = self.cols
        # one transposition in C instead of a getattr per row and column (put_rows led the profile)
        by_field = dict(zip(EncodedEvent._fields, zip(*rows, strict=True), strict=True))
        for name in _COPIED_COLUMNS:
            cols[name][start:end] = by_field[name]
        q = cols["query"][start:end]
        q[:] = 0
        for i, tokens in enumerate(by_field["query"]):
            if tokens:
                q[i, : len(tokens)] = tokens
        hist = cols["hist_cats"][start:end]
        cols["hist_vocab"][start:end] = self.vocab.index_of_hashes(hist)
        seen = np.array(by_field["events_seen"], np.int64)[:, None]
        last = np.array(by_field["hist_last"], np.int64)
        cols["hist_ages"][start:end] = np.minimum(seen - last, _AGE_MAX)
        now = np.array(by_field["now"], np.float64)[:, None]
        slot_ts = np.array(by_field["hist_ts"], np.float64)
        cols["hist_secs"][start:end] = np.where(hist >= 0, np.maximum(0.0, now - slot_ts), NEVER_S)

    def tensors(
        self, rows: slice | np.ndarray, device: torch.device | str = "cpu"
    ) -> dict[str, torch.Tensor]:
        """Feature tensors of the selected rows (leading dims follow ``rows``' shape)."""
        out = {}
        for name, (_, tdtype) in COLUMNS.items():
            x = torch.from_numpy(np.ascontiguousarray(self.cols[name][rows]))
            out[name] = x.to(device=device, dtype=tdtype, non_blocking=True)
        return out


def encode_event(cfg: ModelConfig, vocab: Vocabulary, s: UserState, e: Event) -> EncodedEvent:
    """:func:`event_features` of a parsed :class:`~demandstream.model.core.events.Event`."""
    return event_features(
        cfg,
        s,
        cat=vocab.index(e.category),
        cat_hash=category_hash(e.category),
        etype=TYPE_INDEX[e.type],
        ts=e.ts,
        item_id=e.item_id,
        price=e.price,
        query=e.query,
    )


def encode_events(buf: FeatureBuffer, events: Sequence[Event], states: Sequence[UserState]) -> None:
    """Streaming: rows 0..len(events)-1 of ``buf`` for one event per (distinct) user; states advance."""
    cfg, vocab = buf.cfg, buf.vocab
    buf.put_rows(0, [encode_event(cfg, vocab, s, e) for e, s in zip(events, states, strict=True)])


def encode_log(log: EventLog, cfg: ModelConfig, vocab: Vocabulary) -> FeatureBuffer:
    """Offline: features of every row of a log sorted by user and time (user_start set).

    Each user's state summary starts empty at the user's first row, exactly as in the stream.
    """
    if log.user_start is None:
        raise ValueError("encode_log needs a log sorted_by_user_time()")
    buf = FeatureBuffer(cfg, len(log), vocab)
    cats = category_index(log, vocab)
    hashes = category_hashes(log)
    items, queries = log.items, log.queries
    for u in range(log.n_users):
        s = new_state(cfg.layers, 1, cfg.history_slots)  # h/c unused here: only the summary matters
        s0, s1 = int(log.user_start[u]), int(log.user_start[u + 1])
        rows = []
        for i in range(s0, s1):
            it, q, p = int(log.item[i]), int(log.query[i]), float(log.price[i])
            rows.append(
                event_features(
                    cfg,
                    s,
                    cat=int(cats[i]),
                    cat_hash=int(hashes[i]),
                    etype=int(log.etype[i]),
                    ts=float(log.ts[i]),
                    item_id=items[it] if it >= 0 else None,
                    price=None if p != p else p,
                    query=queries[q] if q >= 0 else None,
                )
            )
        buf.put_rows(s0, rows)
    return buf


def category_index(log: EventLog, vocab: Vocabulary) -> np.ndarray:
    """Vocabulary index of every row's category (0 = unknown or none)."""
    cat_of = np.array([vocab.index(c) for c in log.categories] + [0], dtype=np.int32)
    return cat_of[log.category]


def category_hashes(log: EventLog) -> np.ndarray:
    """:func:`~demandstream.model.core.features.category_hash` of every row's raw category (0 = none)."""
    h = np.array([category_hash(c) for c in log.categories] + [0], dtype=np.int64)
    return h[log.category]


def padded_user_batches(
    user_start: np.ndarray, want: np.ndarray, max_cells: int
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Whole user sequences in padded batches, for running a log through the network offline.

    Users holding at least one ``want`` row are taken longest first, as many per batch as fit in
    ``max_cells`` (users x steps) cells, so padding stays small. Yields ``(idx, real)``: ``idx[b, t]`` is
    the log row of step ``t`` of the batch's user ``b``, padded after the user's end with its own last
    row (an LSTM is causal, so padding after the end never changes earlier outputs); ``real`` marks the
    cells that are the user's rows.

    >>> starts = np.array([0, 3, 4, 4])  # users of 3, 1 and 0 rows
    >>> [(i.tolist(), r.tolist()) for i, r in padded_user_batches(starts, np.ones(4, bool), 6)]
    [([[0, 1, 2], [3, 3, 3]], [[True, True, True], [True, False, False]])]
    """
    starts, ends = user_start[:-1], user_start[1:]
    lengths = ends - starts
    users = [
        u for u in np.argsort(-lengths, kind="stable") if lengths[u] > 0 and want[starts[u] : ends[u]].any()
    ]
    i = 0
    while i < len(users):
        t_max = int(lengths[users[i]])
        batch = users[i : i + max(1, max_cells // t_max)]
        i += len(batch)
        idx = np.empty((len(batch), t_max), np.int64)
        real = np.zeros((len(batch), t_max), bool)
        for k, u in enumerate(batch):
            s, e = int(starts[u]), int(ends[u])
            idx[k, : e - s] = np.arange(s, e)
            idx[k, e - s :] = e - 1
            real[k, : e - s] = True
        yield idx, real
