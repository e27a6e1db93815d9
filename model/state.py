"""Per-user state: the LSTM (h, c) plus a small bounded summary of the user's own history.

The summary is what the repeat-aware head reads (DESIGN §10): the last ``K`` distinct categories with
their counts and the event index at which each was last seen, and funnel counters. It is advanced by
:func:`observe`, the same pure function offline and in the stream, so the two cannot diverge.

The binary layout (:func:`pack` / :func:`unpack`) is what the stream stores in the ``user-state`` table:
a 45-byte header, h and c as float32, the history slots and the last top-k prediction; 1013 bytes
for the default model (hidden 96, 1 layer, 16 slots, top 5), within the 1.2 KB budget of DESIGN §5.

>>> s = new_state(layers=1, hidden=4, slots=3)
>>> for cat, etype, ts in [(7, 0, 10.0), (8, 0, 20.0), (7, 2, 25.0)]:
...     gap = observe(s, cat, etype, ts)
>>> s.hist_cats, s.hist_counts, s.hist_last, s.cart, gap
([7, 8, -1], [2, 1, 0], [3, 2, 0], 1, 5.0)
>>> t = unpack(pack(s, model_version="0a1b2c3d"))
>>> t.hist_cats == s.hist_cats and t.events_seen == 3 and t.model_version == "0a1b2c3d"
True
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass, field

import numpy as np

from model.events import TYPE_INDEX

EMPTY = -1
_ADD, _REMOVE, _PURCHASE = TYPE_INDEX["add_to_cart"], TYPE_INDEX["remove_from_cart"], TYPE_INDEX["purchase"]
_COUNT_MAX = 0xFFFF  # counters are stored as uint16 and saturate

MAGIC = b"DS"
FORMAT = 1
# magic, format, flags, model_version (4 bytes), partition, offset, events_seen, last_ts, cart,
# purchases, hidden, layers, slots, last propensity, number of last top categories
_HEADER = struct.Struct("<2sBB4siqIdHHHBBfB")


class StateFormatError(ValueError):
    """A stored state record that cannot be decoded (wrong magic, format or size)."""


@dataclass(slots=True)
class UserState:
    """One user's state. ``partition``/``offset`` record the last applied source event (-1 = none)."""

    h: np.ndarray  # float32 [layers, hidden]
    c: np.ndarray  # float32 [layers, hidden]
    hist_cats: list[int]  # category index per slot, EMPTY when unused
    hist_counts: list[int]  # events seen in that category
    hist_last: list[int]  # events_seen value when the category was last seen
    events_seen: int = 0
    last_ts: float = math.nan
    cart: int = 0
    purchases: int = 0
    partition: int = -1
    offset: int = -1
    model_version: str = field(default="00000000")
    #: the last prediction made from this state, so a query costs a read, not a model step
    last_top: list[tuple[int, float]] = field(default_factory=list)
    last_propensity: float = math.nan


def new_state(layers: int, hidden: int, slots: int) -> UserState:
    """The state of a user never seen before: zeros, empty history."""
    return UserState(
        h=np.zeros((layers, hidden), dtype=np.float32),
        c=np.zeros((layers, hidden), dtype=np.float32),
        hist_cats=[EMPTY] * slots,
        hist_counts=[0] * slots,
        hist_last=[0] * slots,
    )


def observe(s: UserState, cat: int, etype: int, ts: float) -> float | None:
    """Advance the history summary and funnel counters by one event; return the time gap it encodes.

    Returns None for the user's first event, else the gap in seconds since the previous event
    (negative gaps, from out-of-order timestamps, count as 0: events apply in arrival order).
    """
    gap = None if s.events_seen == 0 else max(0.0, ts - s.last_ts)
    s.events_seen += 1
    s.last_ts = ts if s.events_seen == 1 else max(ts, s.last_ts)
    if cat > 0:
        cats = s.hist_cats
        try:
            j = cats.index(cat)
            s.hist_counts[j] = min(_COUNT_MAX, s.hist_counts[j] + 1)
        except ValueError:
            # Evict the least recently seen slot (empty slots have hist_last 0, so they go first).
            j = min(range(len(cats)), key=s.hist_last.__getitem__)
            cats[j] = cat
            s.hist_counts[j] = 1
        s.hist_last[j] = s.events_seen
    if etype == _ADD:
        s.cart = min(_COUNT_MAX, s.cart + 1)
    elif etype == _REMOVE or etype == _PURCHASE:
        s.cart = max(0, s.cart - 1)
        if etype == _PURCHASE:
            s.purchases = min(_COUNT_MAX, s.purchases + 1)
    return gap


def pack(s: UserState, model_version: str | None = None) -> bytes:
    """Encode a state as compact bytes (see the module docstring for the layout)."""
    layers, hidden = s.h.shape
    slots = len(s.hist_cats)
    header = _HEADER.pack(
        MAGIC, FORMAT, 0, bytes.fromhex(model_version or s.model_version), s.partition, s.offset,
        s.events_seen, s.last_ts, s.cart, s.purchases, hidden, layers, slots, s.last_propensity, len(s.last_top),
    )
    return b"".join((
        header,
        np.ascontiguousarray(s.h, dtype=np.float32).tobytes(),
        np.ascontiguousarray(s.c, dtype=np.float32).tobytes(),
        struct.pack(f"<{slots}i{slots}H{slots}I", *s.hist_cats, *s.hist_counts, *s.hist_last),
        struct.pack(f"<{len(s.last_top)}i{len(s.last_top)}f", *(i for i, _ in s.last_top),
                    *(p for _, p in s.last_top)),
    ))


def unpack(data: bytes) -> UserState:
    """Decode :func:`pack`'s bytes; raises :class:`StateFormatError` on anything else."""
    if len(data) < _HEADER.size:
        raise StateFormatError(f"state record of {len(data)} bytes is shorter than its header")
    (magic, fmt, _flags, version, partition, offset, events_seen, last_ts, cart, purchases, hidden, layers,
     slots, last_prop, ntop) = _HEADER.unpack_from(data)
    if magic != MAGIC or fmt != FORMAT:
        raise StateFormatError(f"not a demandstream state record (magic {magic!r}, format {fmt})")
    n = layers * hidden
    expected = _HEADER.size + 8 * n + 10 * slots + 8 * ntop
    if len(data) != expected:
        raise StateFormatError(f"state record has {len(data)} bytes, expected {expected}")
    buf = memoryview(data)
    o = _HEADER.size
    h = np.frombuffer(buf, np.float32, n, o).reshape(layers, hidden).copy()
    o += 4 * n
    c = np.frombuffer(buf, np.float32, n, o).reshape(layers, hidden).copy()
    o += 4 * n
    # struct beats numpy for these short arrays (a decode per user per batch is on the hot path)
    cats = list(struct.unpack_from(f"<{slots}i", data, o))
    o += 4 * slots
    counts = list(struct.unpack_from(f"<{slots}H", data, o))
    o += 2 * slots
    last = list(struct.unpack_from(f"<{slots}I", data, o))
    o += 4 * slots
    top_i = struct.unpack_from(f"<{ntop}i", data, o)
    top_p = struct.unpack_from(f"<{ntop}f", data, o + 4 * ntop)
    return UserState(h, c, cats, counts, last, events_seen, last_ts, cart, purchases, partition, offset,
                     version.hex(), list(zip(top_i, top_p, strict=True)), last_prop)


def peek_last_ts(data: bytes) -> float:
    """Event time of the last event applied to a record, without decoding the arrays (TTL scans)."""
    if len(data) < _HEADER.size:
        raise StateFormatError("state record shorter than its header")
    return _HEADER.unpack_from(data)[7]
