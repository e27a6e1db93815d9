"""Per-user state: the LSTM (h, c) plus a small bounded summary of the user's own history.

The summary is what the next-category head reads (docs/ARCHITECTURE.md, "State"): the last ``K``
distinct categories, each slot keyed by the *hash* of the raw category name (so a category the
vocabulary does not know can still be remembered and repeated), with its count, the event index and
the second at which it was last seen, how many of its items are in the cart and the type of the last
event on it and how many events it had in the current session; the streak of consecutive events in
the current category; and funnel counters (cart, purchases, add-to-carts in the current session, time
of the last add). It is advanced by :func:`observe`, the same pure function offline and in the stream, so the
two cannot diverge.

The binary layout (:func:`pack` / :func:`unpack`) is what the stream stores in the ``user-state`` table:
a 57-byte header, h and c as float32, 18 bytes per history slot and the last top-k prediction; 1,153
bytes for the default model (hidden 96, 1 layer, 16 slots, top 5), within the 1.2 KB budget.

>>> s = new_state(layers=1, hidden=4, slots=3)
>>> for cat, etype, ts in [(7, 0, 10.0), (8, 0, 20.0), (7, 2, 25.5)]:
...     gap = observe(s, cat, etype, ts)
>>> s.hist_cats, s.hist_counts, s.hist_last, s.hist_ts, s.hist_cart, s.hist_session, s.streak, s.cart, gap
([7, 8, -1], [2, 1, 0], [3, 2, 0], [25, 20, 0], [1, 0, 0], [2, 1, 0], 1, 1, 5.5)
>>> t = unpack(pack(s, model_version="0a1b2c3d"))
>>> t.hist_cats == s.hist_cats and t.hist_ts == s.hist_ts and t.events_seen == 3 and t.model_version == "0a1b2c3d"
True
"""

from __future__ import annotations

import functools
import math
import operator
import struct
from dataclasses import dataclass, field
from itertools import chain

import numpy as np

from demandstream.model.core.events import TYPE_INDEX

EMPTY = -1
_ADD, _REMOVE, _PURCHASE = TYPE_INDEX["add_to_cart"], TYPE_INDEX["remove_from_cart"], TYPE_INDEX["purchase"]
COUNT_MAX = 0xFFFF  # counters are stored as uint16 and saturate
SLOT_CART_MAX = 0xFF  # items of one category in the cart: uint8, saturating
TS_MAX = 0xFFFFFFFF  # slot times are whole unix seconds in a uint32 (until 2106)

#: A gap longer than this between two events of a user starts a new session (the 30-minute rule of web
#: analytics); the session's add-to-cart counter then restarts.
SESSION_GAP_S = 1800.0

MAGIC = b"DS"
FORMAT = 2
#: Header fields in order, with their struct codes: names, not positions, are how code reads them.
HEADER_FIELDS = (
    ("magic", "2s"),
    ("format", "B"),
    ("flags", "B"),
    ("model_version", "4s"),
    ("partition", "i"),
    ("offset", "q"),
    ("events_seen", "I"),
    ("last_ts", "d"),
    ("cart", "H"),
    ("purchases", "H"),
    ("hidden", "H"),
    ("layers", "B"),
    ("slots", "B"),
    ("last_propensity", "f"),
    ("n_top", "B"),
    ("session_adds", "H"),
    ("last_add_ts", "d"),
    ("streak", "H"),
)
_HEADER = struct.Struct("<" + "".join(code for _, code in HEADER_FIELDS))
_FIELD = {name: i for i, (name, _) in enumerate(HEADER_FIELDS)}
_LAYERS, _HIDDEN, _SLOTS, _NTOP = (_FIELD[name] for name in ("layers", "hidden", "slots", "n_top"))
#: Bytes of the header; h and c (float32) follow it.
HEADER_BYTES = _HEADER.size
#: History-slot fields in stored order, each a column of ``slots`` values with its struct code:
#: category hash int32, count uint16, last event index uint32, last second uint32, items in the cart
#: uint8, last event type uint8, events in the current session uint16. As for the header, names, not
#: positions, are how code reads them.
SLOT_FIELDS = (
    ("hist_cats", "i"),
    ("hist_counts", "H"),
    ("hist_last", "I"),
    ("hist_ts", "I"),
    ("hist_cart", "B"),
    ("hist_etype", "B"),
    ("hist_session", "H"),
)
_SLOT_NAMES = tuple(name for name, _ in SLOT_FIELDS)
_slot_lists = operator.attrgetter(*_SLOT_NAMES)  # a state's slot lists in stored order
#: bytes per history slot (18)
SLOT_BYTES = struct.calcsize("<" + "".join(code for _, code in SLOT_FIELDS))
_SLOT_STRUCT = "".join("{k}" + code for _, code in SLOT_FIELDS)


class StateFormatError(ValueError):
    """A stored state record that cannot be decoded (wrong magic, format or size)."""


@dataclass(slots=True)
class UserState:
    """One user's state. ``partition``/``offset`` record the last applied source event (-1 = none)."""

    h: np.ndarray  # float32 [layers, hidden]
    c: np.ndarray  # float32 [layers, hidden]
    hist_cats: list[int]  # category_hash per slot, EMPTY when unused
    hist_counts: list[int]  # events seen in that category
    hist_last: list[int]  # events_seen value when the category was last seen
    hist_ts: list[int] = field(default_factory=list)  # whole unix second when last seen
    hist_cart: list[int] = field(default_factory=list)  # items of that category in the cart
    hist_etype: list[int] = field(default_factory=list)  # type of the last event on that category
    hist_session: list[int] = field(default_factory=list)  # events in that category this session
    events_seen: int = 0
    last_ts: float = math.nan
    cart: int = 0
    purchases: int = 0
    session_adds: int = 0  # add-to-carts since the session began (SESSION_GAP_S)
    last_add_ts: float = math.nan  # time of the last add-to-cart
    streak: int = 0  # consecutive events (with a category) in the current category
    partition: int = -1
    offset: int = -1
    model_version: str = field(default="00000000")
    #: the last prediction made from this state, so a query costs a read, not a model step: (code, p)
    #: with code >= 0 a vocabulary index and code < 0 minus the category_hash of a category outside it
    last_top: list[tuple[int, float]] = field(default_factory=list)
    last_propensity: float = math.nan


#: The fields of the history summary: integers that a replay, a restore or the stream must reproduce
#: exactly (h and c are floats, compared within a tolerance; event times may be NaN).
SUMMARY_FIELDS = (
    "events_seen",
    "hist_cats",
    "hist_counts",
    "hist_last",
    "hist_ts",
    "hist_cart",
    "hist_etype",
    "hist_session",
    "cart",
    "purchases",
    "session_adds",
    "streak",
)


def new_state(layers: int, hidden: int, slots: int) -> UserState:
    """The state of a user never seen before: zeros, empty history."""
    return UserState(
        h=np.zeros((layers, hidden), dtype=np.float32),
        c=np.zeros((layers, hidden), dtype=np.float32),
        hist_cats=[EMPTY] * slots,
        hist_counts=[0] * slots,
        hist_last=[0] * slots,
        hist_ts=[0] * slots,
        hist_cart=[0] * slots,
        hist_etype=[0] * slots,
        hist_session=[0] * slots,
    )


def observe(s: UserState, cat: int, etype: int, ts: float) -> float | None:
    """Advance the history summary and funnel counters by one event; return the time gap it encodes.

    ``cat`` is the event's :func:`~demandstream.model.core.features.category_hash` (0 = no category). Returns None for
    the user's first event, else the gap in seconds since the previous event (negative gaps, from
    out-of-order timestamps, count as 0: events apply in arrival order).
    """
    gap = None if s.events_seen == 0 else max(0.0, ts - s.last_ts)
    s.events_seen += 1
    s.last_ts = ts if s.events_seen == 1 else max(ts, s.last_ts)
    if gap is None or gap > SESSION_GAP_S:
        s.session_adds = 0
        s.hist_session = [0] * len(s.hist_session)
    j = -1
    if cat > 0:
        cats = s.hist_cats
        try:
            j = cats.index(cat)
            s.hist_counts[j] = min(COUNT_MAX, s.hist_counts[j] + 1)
            s.streak = min(COUNT_MAX, s.streak + 1) if s.hist_last[j] == s.events_seen - 1 else 1
        except ValueError:
            # Evict the least recently seen slot (empty slots have hist_last 0, so they go first).
            j = min(range(len(cats)), key=s.hist_last.__getitem__)
            cats[j] = cat
            s.hist_counts[j] = 1
            s.hist_cart[j] = 0
            s.hist_session[j] = 0
            s.streak = 1
        s.hist_session[j] = min(COUNT_MAX, s.hist_session[j] + 1)
        s.hist_last[j] = s.events_seen
        s.hist_ts[j] = min(TS_MAX, max(0, int(math.floor(s.last_ts))))
        s.hist_etype[j] = etype
    if etype == _ADD:
        s.cart = min(COUNT_MAX, s.cart + 1)
        s.session_adds = min(COUNT_MAX, s.session_adds + 1)
        s.last_add_ts = ts
        if j >= 0:
            s.hist_cart[j] = min(SLOT_CART_MAX, s.hist_cart[j] + 1)
    elif etype == _REMOVE or etype == _PURCHASE:
        s.cart = max(0, s.cart - 1)
        if j >= 0:
            s.hist_cart[j] = max(0, s.hist_cart[j] - 1)
        if etype == _PURCHASE:
            s.purchases = min(COUNT_MAX, s.purchases + 1)
    return gap


def pack(s: UserState, model_version: str | None = None) -> bytes:
    """Encode a state as compact bytes (see the module docstring for the layout)."""
    layers, hidden = s.h.shape
    slots = len(s.hist_cats)
    ntop = len(s.last_top)
    # positional, in the order of _HEADER_ORDER (= HEADER_FIELDS, checked at import; test_state.py checks
    # the bytes against the layout built by name): a dict of the names cost a microsecond per user and
    # micro-batch, on the stream's hot path
    header = _HEADER.pack(
        MAGIC,
        FORMAT,
        0,
        bytes.fromhex(model_version or s.model_version),
        s.partition,
        s.offset,
        s.events_seen,
        s.last_ts,
        s.cart,
        s.purchases,
        hidden,
        layers,
        slots,
        s.last_propensity,
        ntop,
        s.session_adds,
        s.last_add_ts,
        s.streak,
    )
    return b"".join(
        (
            header,
            np.ascontiguousarray(s.h, dtype=np.float32).tobytes(),
            np.ascontiguousarray(s.c, dtype=np.float32).tobytes(),
            _slot_struct(slots).pack(*chain.from_iterable(_slot_lists(s))),
            _top_struct(ntop).pack(*chain((i for i, _ in s.last_top), (p for _, p in s.last_top))),
        )
    )


#: The order in which :func:`pack` passes the header's values, checked against HEADER_FIELDS below.
_HEADER_ORDER = (
    "magic",
    "format",
    "flags",
    "model_version",
    "partition",
    "offset",
    "events_seen",
    "last_ts",
    "cart",
    "purchases",
    "hidden",
    "layers",
    "slots",
    "last_propensity",
    "n_top",
    "session_adds",
    "last_add_ts",
    "streak",
)
if _HEADER_ORDER != tuple(name for name, _ in HEADER_FIELDS):
    raise AssertionError("pack() passes the header's values out of HEADER_FIELDS order")


@functools.lru_cache(maxsize=16)
def _slot_struct(slots: int) -> struct.Struct:
    """The compiled struct of ``slots`` history slots (column by column)."""
    return struct.Struct("<" + _SLOT_STRUCT.format(k=slots))


@functools.lru_cache(maxsize=64)
def _top_struct(ntop: int) -> struct.Struct:
    """The compiled struct of a stored top-k: ``ntop`` codes (int32), then their probabilities."""
    return struct.Struct(f"<{ntop}i{ntop}f")


def unpack(data: bytes) -> UserState:
    """Decode :func:`pack`'s bytes; raises :class:`StateFormatError` on anything else."""
    if len(data) < HEADER_BYTES:
        raise StateFormatError(f"state record of {len(data)} bytes is shorter than its header")
    hd = _HEADER.unpack_from(data)
    magic, fmt = hd[_FIELD["magic"]], hd[_FIELD["format"]]
    if magic != MAGIC or fmt != FORMAT:
        raise StateFormatError(f"not a demandstream state record (magic {magic!r}, format {fmt})")
    layers, hidden, slots, ntop = hd[_LAYERS], hd[_HIDDEN], hd[_SLOTS], hd[_NTOP]
    n = layers * hidden
    expected = HEADER_BYTES + 8 * n + SLOT_BYTES * slots + 8 * ntop
    if len(data) != expected:
        raise StateFormatError(f"state record has {len(data)} bytes, expected {expected}")
    # h and c in one copy, as two views of it (a state's h and c are replaced, never written into)
    hc = np.frombuffer(data, np.float32, 2 * n, HEADER_BYTES).reshape(2, layers, hidden).copy()
    o = HEADER_BYTES + 8 * n
    # struct beats numpy for these short arrays (a decode per user per batch is on the hot path)
    sv = _slot_struct(slots).unpack_from(data, o)
    top = _top_struct(ntop).unpack_from(data, o + SLOT_BYTES * slots)
    return UserState(
        hc[0],
        hc[1],
        *[list(sv[j * slots : (j + 1) * slots]) for j in range(len(_SLOT_NAMES))],
        events_seen=hd[_FIELD["events_seen"]],
        last_ts=hd[_FIELD["last_ts"]],
        cart=hd[_FIELD["cart"]],
        purchases=hd[_FIELD["purchases"]],
        session_adds=hd[_FIELD["session_adds"]],
        last_add_ts=hd[_FIELD["last_add_ts"]],
        streak=hd[_FIELD["streak"]],
        partition=hd[_FIELD["partition"]],
        offset=hd[_FIELD["offset"]],
        model_version=hd[_FIELD["model_version"]].hex(),
        last_top=list(zip(top[:ntop], top[ntop:], strict=True)),
        last_propensity=hd[_FIELD["last_propensity"]],
    )


def peek_last_ts(data: bytes) -> float:
    """Event time of the last event applied to a record, without decoding the arrays (TTL scans)."""
    if len(data) < HEADER_BYTES:
        raise StateFormatError("state record shorter than its header")
    return _HEADER.unpack_from(data)[_FIELD["last_ts"]]
