"""A columnar, memory-bounded log of events: what loaders produce and training reads.

Ten million :class:`~demandstream.model.core.events.Event` objects would not fit in a few GB; an :class:`EventLog`
keeps one small numpy column per field and interns the strings (users, items, categories,
queries) in tables, so ten million rows take well under 1 GB.

>>> from demandstream.model.core.events import Event
>>> log = EventLog.from_events([
...     Event("e2", "u1", 20.0, "purchase", "i1", "a.b", 9.5),
...     Event("e1", "u1", 10.0, "view", "i1", "a.b", 9.5),
...     Event("e3", "u2", 15.0, "search", query="red shoes"),
... ])
>>> log = log.sorted_by_user_time()
>>> [e.event_id for e in log.user_events(0)]
['e1', 'e2']
>>> len(log), log.n_users
(3, 2)
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

from demandstream.model.core.events import EVENT_TYPES, TYPE_INDEX, Event

NONE = -1  # index meaning "no value" in the interned string columns


class Interner:
    """Maps strings to dense int indices, in first-seen order."""

    __slots__ = ("index", "values")

    def __init__(self, values: Iterable[str] = ()):
        self.values: list[str] = []
        self.index: dict[str, int] = {}
        for v in values:
            self.add(v)

    def add(self, value: str | None) -> int:
        if value is None:
            return NONE
        i = self.index.get(value)
        if i is None:
            i = self.index[value] = len(self.values)
            self.values.append(value)
        return i

    def __len__(self) -> int:
        return len(self.values)


@dataclass
class EventLog:
    """Events as parallel numpy columns plus interned string tables.

    Columns (all of length ``n``): ``user`` (int32 into ``users``), ``ts`` (float64 unix s),
    ``etype`` (int8 into :data:`~demandstream.model.core.events.EVENT_TYPES`), ``item``, ``category``, ``query``
    (int32 into their tables, -1 for none), ``price`` (float32, NaN for none). ``event_ids`` and
    ``session_ids`` are optional (None when a loader was asked not to keep them).
    After :meth:`sorted_by_user_time`, ``user_start`` holds CSR offsets: user u's events are
    rows ``user_start[u]:user_start[u+1]`` in time order (file order for equal times).
    """

    user: np.ndarray
    ts: np.ndarray
    etype: np.ndarray
    item: np.ndarray
    category: np.ndarray
    price: np.ndarray
    query: np.ndarray
    users: list[str]
    items: list[str]
    categories: list[str]
    queries: list[str]
    event_ids: list[str] | None = None
    session_ids: list[str | None] | None = None
    user_start: np.ndarray | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return int(self.ts.shape[0])

    @property
    def n_users(self) -> int:
        return len(self.users)

    # -- building -------------------------------------------------------------------------------

    @classmethod
    def from_events(cls, events: Iterable[Event], keep_ids: bool = True) -> EventLog:
        """Build a log from Event objects (small data, tests, the generator)."""
        b = EventLogBuilder(keep_ids=keep_ids)
        for e in events:
            b.append(e)
        return b.build()

    # -- reshaping ------------------------------------------------------------------------------

    def take(self, rows: np.ndarray) -> EventLog:
        """A new log with the given rows (string tables shared, not copied)."""
        rows = np.asarray(rows)
        return EventLog(
            user=self.user[rows],
            ts=self.ts[rows],
            etype=self.etype[rows],
            item=self.item[rows],
            category=self.category[rows],
            price=self.price[rows],
            query=self.query[rows],
            users=self.users,
            items=self.items,
            categories=self.categories,
            queries=self.queries,
            event_ids=[self.event_ids[i] for i in rows] if self.event_ids is not None else None,
            session_ids=[self.session_ids[i] for i in rows] if self.session_ids is not None else None,
        )

    def sorted_by_user_time(self) -> EventLog:
        """Rows grouped by user, each user's rows in (ts, original row) order, with ``user_start``."""
        return self._grouped(np.lexsort((np.arange(len(self)), self.ts, self.user)))

    def sorted_by_user_arrival(self) -> EventLog:
        """Rows grouped by user in arrival order, as the stream sees them
        (docs/ARCHITECTURE.md §Semantics)."""
        return self._grouped(np.lexsort((np.arange(len(self)), self.user)))

    def _grouped(self, order: np.ndarray) -> EventLog:
        out = self.take(order)
        out.user_start = csr_offsets(out.user, self.n_users)
        return out

    def user_rows(self, u: int) -> slice:
        """Row slice of user ``u`` (needs :meth:`sorted_by_user_time`)."""
        if self.user_start is None:
            raise ValueError("call sorted_by_user_time() first")
        return slice(int(self.user_start[u]), int(self.user_start[u + 1]))

    # -- back to events -------------------------------------------------------------------------

    def event(self, i: int) -> Event:
        """Row ``i`` as an :class:`Event` (ids synthesized as ``row-<i>`` when not kept)."""
        item = int(self.item[i])
        cat = int(self.category[i])
        q = int(self.query[i])
        price = float(self.price[i])
        return Event(
            event_id=self.event_ids[i] if self.event_ids is not None else f"row-{i}",
            user_id=self.users[int(self.user[i])],
            ts=float(self.ts[i]),
            type=EVENT_TYPES[int(self.etype[i])],
            item_id=self.items[item] if item >= 0 else None,
            category=self.categories[cat] if cat >= 0 else None,
            price=None if np.isnan(price) else price,
            query=self.queries[q] if q >= 0 else None,
            session_id=self.session_ids[i] if self.session_ids is not None else None,
        )

    def user_events(self, u: int) -> list[Event]:
        s = self.user_rows(u)
        return [self.event(i) for i in range(s.start, s.stop)]


def csr_offsets(keys: np.ndarray, n_groups: int) -> np.ndarray:
    """CSR offsets of rows sorted by an integer key in ``0..n_groups-1``: group g owns rows
    ``offsets[g]:offsets[g + 1]`` (``n_groups + 1`` int64 values; a group without rows has an empty range).

    >>> csr_offsets(np.array([0, 0, 2]), 4).tolist()
    [0, 2, 2, 3, 3]
    """
    return np.concatenate([[0], np.cumsum(np.bincount(keys, minlength=n_groups))]).astype(np.int64)


class EventLogBuilder:
    """Appends events row by row into growable arrays; memory ~40 bytes per row plus strings."""

    _CHUNK = 1 << 16

    def __init__(self, keep_ids: bool = True):
        self.keep_ids = keep_ids
        self.users = Interner()
        self.items = Interner()
        self.categories = Interner()
        self.queries = Interner()
        self._cols: dict[str, list[np.ndarray]] = {k: [] for k in _DTYPES}
        self._buf = {k: np.empty(self._CHUNK, dtype=dt) for k, dt in _DTYPES.items()}
        self._n = 0
        self.event_ids: list[str] | None = [] if keep_ids else None
        self.session_ids: list[str | None] | None = [] if keep_ids else None

    def append(self, e: Event) -> None:
        self.append_fields(
            e.user_id,
            e.ts,
            TYPE_INDEX[e.type],
            e.item_id,
            e.category,
            e.price,
            e.query,
            e.event_id,
            e.session_id,
        )

    def append_fields(
        self,
        user_id: str,
        ts: float,
        etype: int,
        item_id: str | None,
        category: str | None,
        price: float | None,
        query: str | None,
        event_id: str | None = None,
        session_id: str | None = None,
    ) -> None:
        n = self._n
        b = self._buf
        b["user"][n] = self.users.add(user_id)
        b["ts"][n] = ts
        b["etype"][n] = etype
        b["item"][n] = self.items.add(item_id)
        b["category"][n] = self.categories.add(category)
        b["price"][n] = np.nan if price is None else price
        b["query"][n] = self.queries.add(query)
        if self.event_ids is not None:
            self.event_ids.append(event_id if event_id is not None else f"row-{self.rows}")
            self.session_ids.append(session_id)
        self._n = n + 1
        if self._n == self._CHUNK:
            self._flush()

    @property
    def rows(self) -> int:
        return sum(len(c) for c in self._cols["ts"]) + self._n

    def _flush(self) -> None:
        for k, buf in self._buf.items():
            self._cols[k].append(buf[: self._n].copy())
        self._n = 0

    def build(self) -> EventLog:
        self._flush()
        cols = {k: (np.concatenate(v) if v else np.empty(0, dtype=_DTYPES[k])) for k, v in self._cols.items()}
        return EventLog(
            **cols,
            users=self.users.values,
            items=self.items.values,
            categories=self.categories.values,
            queries=self.queries.values,
            event_ids=self.event_ids,
            session_ids=self.session_ids,
        )


_DTYPES = {
    "user": np.int32,
    "ts": np.float64,
    "etype": np.int8,
    "item": np.int32,
    "category": np.int32,
    "price": np.float32,
    "query": np.int32,
}
