"""Encoding events into the feature arrays DemandLSTM reads, for one step or a whole log.

Two implementations of one definition:

- :func:`event_features` advances one user's :class:`~demandstream.model.core.state.UserState` summary
  with :func:`~demandstream.model.core.state.observe` and returns one named row; :meth:`FeatureBuffer.put_rows`
  stores such rows. Plain Python, one event at a time: the executable specification.
- :func:`encode_rows` (the stream's micro-batches, on states held as arrays), :func:`encode_batch`
  (the same on :class:`~demandstream.model.core.state.UserState` objects) and :func:`encode_log`
  (offline) do the same for a whole batch in the compiled loop of
  :mod:`demandstream.model.core.encoding_kernel`; only what needs
  Python objects (hashing strings, query tokens) stays per event. Both production paths go through it,
  so streaming and offline encoding cannot differ, and tests/unit/model/core/test_encoding_kernel.py
  proves it equal to the specification on a hypothesis-generated corpus.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from operator import attrgetter
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import torch

from demandstream.model.core import encoding_kernel as kernel
from demandstream.model.core.events import TYPE_INDEX, Event
from demandstream.model.core.features import (
    GAP_EDGES_S,
    Vocabulary,
    category_hash,
    gap_bucket,
    hash_bucket,
    price_bucket,
    query_tokens,
)
from demandstream.model.core.network import ModelConfig
from demandstream.model.core.state import (
    COUNT_MAX,
    EMPTY,
    SESSION_GAP_S,
    SLOT_CART_MAX,
    TS_MAX,
    UserState,
    observe,
)

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
#: Storage is as narrow as the values allow (event types, gap and price buckets fit a byte; buckets,
#: vocabulary indices and the 31-bit category hashes with their -1 sentinel fit 32 bits; the slots'
#: counts, ages and session counts saturate at 0xFFFF and their cart counts at 0xFF, as the state stores
#: them, model/core/state.py): training holds one row per event of the log, 1,176 bytes a row at 64
#: bits, 387 here (531 while those four slot columns were float32), and :meth:`FeatureBuffer.tensors`
#: widens each batch to the network's dtype, to the same values.
COLUMNS: dict[str, tuple[type, torch.dtype]] = {
    "etype": (np.int8, torch.int64),
    "item": (np.int32, torch.int64),
    "cat": (np.int32, torch.int64),
    "price": (np.int8, torch.int64),
    "gap": (np.int8, torch.int64),
    "query": (np.int32, torch.int64),
    "hist_cats": (np.int32, torch.int64),
    "hist_vocab": (np.int32, torch.int64),
    "hist_counts": (np.uint16, torch.float32),
    "hist_ages": (np.uint16, torch.float32),
    "hist_secs": (np.float32, torch.float32),
    "hist_cart": (np.uint8, torch.float32),
    "hist_etype": (np.int8, torch.int64),
    "cart": (np.float32, torch.float32),
    "purchases": (np.float32, torch.float32),
    "events_seen": (np.float32, torch.float32),
    "session_adds": (np.float32, torch.float32),
    "add_secs": (np.float32, torch.float32),
    "hist_session": (np.uint16, torch.float32),
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
        _put_query_tokens(cols["query"][start:end], by_field["query"])
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
            if x.dtype == torch.uint16:
                # torch's 16-bit unsigned type is a "barebones" one (few kernels beyond the CPU's copies,
                # pytorch/pytorch#116594), so it is widened here rather than on a CUDA device
                x = x.to(tdtype)
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
    if len(events) != len(states):
        raise ValueError(f"{len(events)} events for {len(states)} states: one state per event")
    encode_batch(buf, [[e] for e in events], states)


def encode_batch(buf: FeatureBuffer, seqs: Sequence[Sequence[Event]], states: Sequence[UserState]) -> None:
    """Streaming: the rows of every event of ``seqs`` (user by user, each user's events in order) from
    row 0 of ``buf``; each user's state advances by all of its events. Users are distinct.

    The same rows and states as :func:`encode_event` called per event (the specification), in one
    compiled loop.
    """
    if len(seqs) != len(states):
        raise ValueError(f"{len(seqs)} event sequences for {len(states)} states")
    summaries = summary_arrays(states)
    encode_rows(buf, seqs, summaries, np.arange(len(states), dtype=np.int64))
    store_summaries(states, summaries)


def encode_rows(
    buf: FeatureBuffer, seqs: Sequence[Sequence[Event]], summaries: Summaries, rows: np.ndarray
) -> None:
    """:func:`encode_batch` on summaries held as arrays: the events of ``seqs[i]`` advance row
    ``rows[i]`` of ``summaries`` (rows distinct), and their feature rows start at row 0 of ``buf``."""
    events = [e for q in seqs for e in q]
    n = len(events)
    if n == 0:
        return
    cols, cfg, vindex = buf.cols, buf.cfg, buf.vocab.index
    categories = [e.category for e in events]
    cols["cat"][:n] = [vindex(c) for c in categories]
    etype = np.array([TYPE_INDEX[e.type] for e in events], np.int64)
    cols["etype"][:n] = etype
    cols["item"][:n] = [hash_bucket(e.item_id, cfg.item_buckets) for e in events]
    cols["price"][:n] = [price_bucket(e.price) for e in events]
    _put_query_tokens(
        cols["query"][:n],
        [query_tokens(e.query, cfg.query_buckets, cfg.query_tokens) if e.query else () for e in events],
    )
    user = np.repeat(np.asarray(rows, np.int64), [len(q) for q in seqs])
    _advance(
        buf,
        0,
        user,
        np.array([category_hash(c) for c in categories], np.int64),
        etype,
        np.array([e.ts for e in events], np.float64),
        summaries,
    )


def encode_log(log: EventLog, cfg: ModelConfig, vocab: Vocabulary) -> FeatureBuffer:
    """Offline: features of every row of a log sorted by user and time (user_start set).

    Each user's state summary starts empty at the user's first row, exactly as in the stream. Strings
    (items, prices, queries) are encoded once per distinct value; the summaries advance in the
    compiled loop, :data:`LOG_CHUNK_USERS` users at a time.
    """
    if log.user_start is None:
        raise ValueError("encode_log needs a log sorted_by_user_time()")
    buf = FeatureBuffer(cfg, len(log), vocab)
    cols = buf.cols
    cols["cat"][:] = category_index(log, vocab)
    etype = np.asarray(log.etype, np.int64)
    cols["etype"][:] = etype
    item_bucket = np.array([hash_bucket(it, cfg.item_buckets) for it in log.items] + [0], np.int64)
    cols["item"][:] = item_bucket[log.item]  # a missing item (-1) takes the trailing 0
    prices, price_of = np.unique(np.asarray(log.price, np.float64), return_inverse=True)
    cols["price"][:] = np.array([price_bucket(float(p)) for p in prices], np.int64)[price_of.ravel()]
    with_query = np.flatnonzero(np.asarray(log.query) >= 0)
    if len(with_query):
        tokens_of = [query_tokens(q, cfg.query_buckets, cfg.query_tokens) if q else () for q in log.queries]
        q = np.zeros((len(with_query), cfg.query_tokens), np.int64)
        _put_query_tokens(q, [tokens_of[int(i)] for i in log.query[with_query]])
        cols["query"][with_query] = q
    hashes = category_hashes(log)
    ts = np.asarray(log.ts, np.float64)
    starts = log.user_start
    for u0 in range(0, log.n_users, LOG_CHUNK_USERS):
        u1 = min(u0 + LOG_CHUNK_USERS, log.n_users)
        s0, s1 = int(starts[u0]), int(starts[u1])
        if s1 == s0:
            continue
        user = np.repeat(np.arange(u1 - u0, dtype=np.int64), np.diff(starts[u0 : u1 + 1]))
        summaries = fresh_summaries(u1 - u0, cfg.history_slots)
        _advance(buf, s0, user, hashes[s0:s1], etype[s0:s1], ts[s0:s1], summaries)
    return buf


#: encode_log advances this many users' summaries per compiled call (its working arrays: ~1 KB a user).
LOG_CHUNK_USERS = 1 << 16


class Summaries(NamedTuple):
    """Users' history summaries as the arrays :func:`demandstream.model.core.encoding_kernel.advance` updates."""

    hist: np.ndarray  #: int64 [users, len(kernel.SLOT_ROWS), slots]
    ints: np.ndarray  #: int64 [users, len(kernel.INT_FIELDS)]
    floats: np.ndarray  #: float64 [users, len(kernel.FLOAT_FIELDS)]


_slot_rows = attrgetter(*kernel.SLOT_ROWS)
_int_fields = attrgetter(*kernel.INT_FIELDS)
_float_fields = attrgetter(*kernel.FLOAT_FIELDS)


def summary_arrays(states: Sequence[UserState]) -> Summaries:
    """The summaries of ``states`` as arrays (one row per state)."""
    return Summaries(
        np.array([_slot_rows(s) for s in states], np.int64),
        np.array([_int_fields(s) for s in states], np.int64).reshape(len(states), len(kernel.INT_FIELDS)),
        np.array([_float_fields(s) for s in states], np.float64).reshape(
            len(states), len(kernel.FLOAT_FIELDS)
        ),
    )


def fresh_summaries(n_users: int, slots: int) -> Summaries:
    """The summaries of ``n_users`` users never seen (as :func:`~demandstream.model.core.state.new_state`)."""
    hist = np.zeros((n_users, len(kernel.SLOT_ROWS), slots), np.int64)
    hist[:, kernel.SLOT_ROWS.index("hist_cats")] = EMPTY
    ints = np.zeros((n_users, len(kernel.INT_FIELDS)), np.int64)
    floats = np.full((n_users, len(kernel.FLOAT_FIELDS)), math.nan)
    return Summaries(hist, ints, floats)


def store_summaries(states: Sequence[UserState], summaries: Summaries) -> None:
    """Write the arrays back into ``states`` (Python ints and floats, as :func:`observe` leaves them)."""
    # Spelled out in the kernel's layout order (a setattr per name cost 2 µs a user and micro-batch);
    # tests/unit/model/core/test_encoding_kernel.py checks every field against its array by name.
    for s, hist, ints, floats in zip(
        states, summaries.hist.tolist(), summaries.ints.tolist(), summaries.floats.tolist(), strict=True
    ):
        s.hist_cats, s.hist_counts, s.hist_last, s.hist_ts, s.hist_cart, s.hist_etype, s.hist_session = hist
        s.events_seen, s.cart, s.purchases, s.session_adds, s.streak = ints
        s.last_ts, s.last_add_ts = floats


#: The kernel's integer limits, in the order of kernel.LIMIT_NAMES.
_LIMITS = np.array(
    [
        {
            "count_max": COUNT_MAX,
            "slot_cart_max": SLOT_CART_MAX,
            "ts_max": TS_MAX,
            "age_max": _AGE_MAX,
            "add": TYPE_INDEX["add_to_cart"],
            "remove": TYPE_INDEX["remove_from_cart"],
            "purchase": TYPE_INDEX["purchase"],
        }[name]
        for name in kernel.LIMIT_NAMES
    ],
    np.int64,
)
_GAP_EDGES = np.array(GAP_EDGES_S, np.float64)


def _advance(
    buf: FeatureBuffer,
    start: int,
    user: np.ndarray,
    cat_hash: np.ndarray,
    etype: np.ndarray,
    ts: np.ndarray,
    summaries: Summaries,
) -> None:
    """Rows ``start..start+len(user)-1``: the summary-derived columns, by the compiled loop."""
    end = start + len(user)
    c = {name: col[start:end] for name, col in buf.cols.items()}
    kernel.advance(
        user,
        np.ascontiguousarray(cat_hash, np.int64),
        np.ascontiguousarray(etype, np.int64),
        np.ascontiguousarray(ts, np.float64),
        summaries.hist,
        summaries.ints,
        summaries.floats,
        _LIMITS,
        SESSION_GAP_S,
        NEVER_S,
        _GAP_EDGES,
        c["gap"],
        c["hist_cats"],
        c["hist_counts"],
        c["hist_ages"],
        c["hist_secs"],
        c["hist_cart"],
        c["hist_etype"],
        c["hist_session"],
        c["cart"],
        c["purchases"],
        c["events_seen"],
        c["session_adds"],
        c["add_secs"],
        c["streak"],
    )
    hist_vocab, hist_cats = c["hist_vocab"], c["hist_cats"]
    # in slices: the lookup's int64 temporaries are ~0.4 KB a row, 400 MB for a million-row log at once
    for r in range(0, len(hist_cats), _VOCAB_LOOKUP_ROWS):
        hist_vocab[r : r + _VOCAB_LOOKUP_ROWS] = buf.vocab.index_of_hashes(
            hist_cats[r : r + _VOCAB_LOOKUP_ROWS]
        )


#: rows of hash -> vocabulary lookups per slice in :func:`_advance`
_VOCAB_LOOKUP_ROWS = 1 << 16


def warm_up(buf: FeatureBuffer) -> None:
    """Compile the kernel now (or load it from numba's disk cache), on ``buf``'s column types, so that
    the first micro-batch a worker serves does not wait for it (~1 s the first time on a machine)."""
    none = np.zeros(0, np.int64)
    _advance(buf, 0, none, none, none, np.zeros(0, np.float64), fresh_summaries(0, buf.cfg.history_slots))


def _put_query_tokens(q: np.ndarray, token_lists: Sequence[Sequence[int]]) -> None:
    """Row i of ``q``: the tokens of ``token_lists[i]``, zero-padded."""
    q[:] = 0
    for i, tokens in enumerate(token_lists):
        if tokens:
            q[i, : len(tokens)] = tokens


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
