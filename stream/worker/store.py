"""Per-user state in the Faust table ``user-state``: batched reads and writes by partition.

Faust's table API (``table[key] = value``) takes the partition from the *current event* of the
stream; a micro-batch spans several partitions, and Faust's RocksDB store would then file every key
under the last event's partition (``faust/stores/rocksdb.py`` ``_set``). So this module addresses the
store and the changelog explicitly by the source partition of each user, using Faust's own store
objects (RocksDB by default, memory selectable) and ``Table.send_changelog``; recovery, standbys and
rebalancing stay Faust's. Keys and values are raw bytes: the key is
:func:`demandstream.stream.engine.records.state_key` of the (pseudonymized) user id, in a namespace of its
own because Faust's RocksDB store keeps its changelog offset in the same key space; the value is
:func:`demandstream.model.core.state.pack`'s record.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterator, Mapping, Sequence

from demandstream.model.core.state import StateFormatError, peek_last_ts
from demandstream.stream.engine.records import STATE_KEY_PREFIX

logger = logging.getLogger(__name__)


def _older(value: bytes, before_ts: float) -> bool:
    try:
        return peek_last_ts(value) < before_ts
    except StateFormatError:
        return True


class LocalStore:
    """The worker's local copy of the table, addressed by (key, partition): the one interface
    :class:`StateStore` needs from Faust's store objects. :func:`local_store` picks the implementation."""

    def read(self, keys: Sequence[tuple[bytes, int]]) -> dict[bytes, bytes | None]:
        raise NotImplementedError

    def get(self, key: bytes) -> bytes | None:
        raise NotImplementedError

    def estimate_count(self) -> int:
        raise NotImplementedError

    def items(self) -> Iterator[tuple[bytes, int, bytes]]:
        """``(key, partition, value)`` of the partitions this worker actively owns."""
        raise NotImplementedError

    def scan(self, partition: int, after: bytes | None, limit: int) -> list[tuple[bytes, bytes]]:
        """Up to ``limit`` ``(key, value)`` of one partition in key order, starting after ``after``."""
        raise NotImplementedError

    def write(self, values: Mapping[bytes, tuple[int, bytes | None]]) -> None:
        raise NotImplementedError


class RocksDBLocal(LocalStore):
    """Faust's RocksDB store (``rocksdb://``): one database per partition, multi-gets and write batches."""

    def __init__(self, store):
        self.store = store

    def read(self, keys):
        by_part: dict[int, list[bytes]] = defaultdict(list)
        for k, p in keys:
            by_part[p].append(k)
        out: dict[bytes, bytes | None] = {}
        for p, ks in by_part.items():
            out.update(zip(ks, self.store._db_for_partition(p).get(ks), strict=True))
        return out

    def get(self, key):
        for db in list(self.store._dbs.values()):
            v = db.get(key)
            if v is not None:
                return v
        return None

    def estimate_count(self):
        # includes Faust's one persisted-offset key per partition: negligible for a gauge
        return sum(
            int(db.property_int_value("rocksdb.estimate-num-keys") or 0)
            for db in self.store._dbs_for_actives()
        )

    def items(self):
        active = set(self.store._dbs_for_actives())
        for p, db in list(self.store._dbs.items()):
            if db in active:
                for k, v in self.store._visible_items(db):
                    yield k, p, v

    def scan(self, partition, after, limit):
        db = self.store._db_for_partition(partition)
        out: list[tuple[bytes, bytes]] = []
        for k, v in db.items(from_key=after) if after is not None else db.items():
            if k == after or k == self.store.offset_key:
                continue
            out.append((k, v))
            if len(out) >= limit:
                break
        return out

    def write(self, values):
        import rocksdict

        batches: dict[int, rocksdict.WriteBatch] = {}
        for k, (p, v) in values.items():
            wb = batches.get(p)
            if wb is None:
                wb = batches[p] = rocksdict.WriteBatch(raw_mode=True)
            if v is None:
                wb.delete(k)
            else:
                wb.put(k, v)
            self.store._key_index[k] = p
        for p, wb in batches.items():
            self.store._db_for_partition(p).write(wb)


class MemoryLocal(LocalStore):
    """Faust's memory store (``memory://``, tests and development): a dict plus each key's partition."""

    def __init__(self, store):
        self.store = store

    def read(self, keys):
        data = self.store.data
        return {k: data.get(k) for k, _p in keys}

    def get(self, key):
        return self.store.data.get(key)

    def estimate_count(self):
        return len(self.store.data)

    def items(self):
        parts = self.store._key_partition
        for k, v in list(self.store.data.items()):
            yield k, parts.get(k, 0), v

    def scan(self, partition, after, limit):
        parts = self.store._key_partition
        keys = sorted(
            k for k in self.store.data if parts.get(k, 0) == partition and (after is None or k > after)
        )
        return [(k, self.store.data[k]) for k in keys[:limit]]

    def write(self, values):
        data, parts = self.store.data, self.store._key_partition
        for k, (p, v) in values.items():
            if v is None:
                data.pop(k, None)
                parts.pop(k, None)
            else:
                data[k] = v
                parts[k] = p


def local_store(store) -> LocalStore:
    """The :class:`LocalStore` over one of Faust's table stores (``Table.data``)."""
    return RocksDBLocal(store) if hasattr(store, "_db_for_partition") else MemoryLocal(store)


class StateStore:
    r"""Batched access to a Faust table's local store plus its changelog.

    Writes never let the local store run ahead of what Kafka holds durably: under at-least-once the
    caller sends the changelog records and waits for the broker's acks before :meth:`write_local`;
    under exactly-once, writes are :meth:`stage`\ d in memory and applied by :meth:`on_commit` only
    once the source partition's transaction (which carries the changelog records) has committed, and
    dropped by :meth:`discard_staged` if it never will (a fenced commit, or its producer stopped on
    rebalance).
    A crash therefore leaves the local store at or behind the changelog, which recovery replays.
    """

    def __init__(self, table):
        self.table = table
        #: exactly-once: source partition -> {key: value or None}, not yet committed
        self._staged: dict[int, dict[bytes, bytes | None]] = {}
        #: exactly-once: changelog partition -> last offset written by the open transaction
        self._staged_offsets: dict[int, int] = {}
        #: TTL: partition -> the last key examined (the next slice starts after it)
        self._ttl_cursor: dict[int, bytes | None] = {}

    @property
    def _store(self):
        return self.table.data

    @property
    def local(self) -> LocalStore:
        # Faust creates Table.data lazily (and may replace it on rebalance): wrap it at each use
        return local_store(self.table.data)

    # -- reads ----------------------------------------------------------------------------------

    def read(self, keys: Sequence[tuple[bytes, int]]) -> dict[bytes, bytes | None]:
        """Stored values of ``(key, partition)`` pairs; one multi-get per partition on RocksDB.

        Values staged by this worker's open transaction win over the local store.
        """
        out = self.local.read(keys)
        if self._staged:
            for k, p in keys:
                staged = self._staged.get(p)
                if staged is not None and k in staged:
                    out[k] = staged[k]
        return out

    def get(self, key: bytes) -> bytes | None:
        """A key's value from whichever local partition holds it (web queries, tests)."""
        return self.local.get(key)

    def estimate_count(self) -> int:
        """Users in state on this worker, cheap enough for a gauge (RocksDB's key estimate)."""
        return self.local.estimate_count()

    def expired_slice(
        self, partition: int, before_ts: float, limit: int, keep: set[bytes] | frozenset = frozenset()
    ) -> dict[bytes, tuple[int, None]]:
        """The next ``limit`` states of ``partition`` in key order (a cursor per partition wraps around),
        as deletions of those whose last event is older than ``before_ts`` (event time).

        Keys in ``keep`` (users of the batch in hand) and keys staged by an open transaction are never
        expired; undecodable records are (they can never be used again). Returned in the shape of the
        engine's state writes, so they go through the batch protocol's acknowledged or transactional
        writes like any other state (docs/ARCHITECTURE.md §Protocol).
        """
        rows = self.local.scan(partition, self._ttl_cursor.get(partition), limit)
        self._ttl_cursor[partition] = rows[-1][0] if len(rows) == limit else None  # None: wrap around
        staged = self._staged.get(partition, {})
        return {
            k: (partition, None)
            for k, v in rows
            # users' states only: the table also holds each partition's partial demand aggregate (d:)
            if k.startswith(STATE_KEY_PREFIX) and k not in keep and k not in staged and _older(v, before_ts)
        }

    # -- writes ---------------------------------------------------------------------------------

    @property
    def changelog_topic(self) -> str:
        return self.table.changelog_topic.get_topic_name()

    def stage(
        self,
        values: Mapping[bytes, tuple[int, bytes | None]],
        changelog_offsets: Mapping[int, int] | None = None,
    ) -> None:
        """Exactly-once: hold writes until the transaction of their source partition commits.

        ``changelog_offsets`` are the offsets the transaction's changelog records got (a state of source
        partition ``p`` is written to changelog partition ``p``); they become the persisted offsets with
        the commit, so a restart replays the changelog only past them.
        """
        for k, (p, v) in values.items():
            self._staged.setdefault(p, {})[k] = v
        for p, off in (changelog_offsets or {}).items():
            self._staged_offsets[p] = max(off, self._staged_offsets.get(p, -1))

    def on_commit(self, partitions: set[int]) -> None:
        """Apply the staged writes of the committed source partitions to the local store, then their
        changelog offsets (never ahead of the writes they cover)."""
        offsets = {}
        for p in partitions:
            staged = self._staged.pop(p, None)
            if staged:
                self.write_local({k: (p, v) for k, v in staged.items()})
            if p in self._staged_offsets:
                offsets[p] = self._staged_offsets.pop(p)
        if offsets:
            self.set_persisted_offsets(offsets)

    def discard_staged(self, partitions: set[int]) -> int:
        """Forget the staged writes of these partitions (their transaction did not or will not commit);
        returns how many were dropped."""
        for p in partitions:
            self._staged_offsets.pop(p, None)
        return sum(len(self._staged.pop(p, None) or ()) for p in partitions)

    def set_persisted_offsets(self, offsets: Mapping[int, int]) -> None:
        """Record the last changelog offset applied locally per partition (recovery resumes after it)."""
        store = self._store
        if not hasattr(store, "set_persisted_offset"):
            return
        from faust.types import TP

        topic = self.changelog_topic
        for p, off in offsets.items():
            store.set_persisted_offset(TP(topic, p), off)

    def write_local(self, values: Mapping[bytes, tuple[int, bytes | None]]) -> None:
        """Write ``key -> (partition, value or None to delete)`` to the local store only."""
        if values:
            self.local.write(values)
