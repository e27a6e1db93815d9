"""The local-store interface over Faust's real RocksDB and memory stores (no broker needed)."""

from __future__ import annotations

import faust
import pytest
from faust.types import TP

from demandstream.stream.worker.store import MemoryLocal, RocksDBLocal, StateStore, local_store


@pytest.fixture(params=["rocksdb", "memory"])
def table(request, tmp_path, monkeypatch):
    app = faust.App(
        f"t-{request.param}", store=f"{request.param}://", datadir=str(tmp_path), broker="kafka://127.0.0.1:1"
    )
    t = app.Table("state", partitions=2, key_type=bytes, value_type=bytes)
    # both partitions actively owned by this worker (normally the assignor's answer after a rebalance)
    topic = t.changelog_topic_name
    monkeypatch.setattr(app.assignor, "assigned_actives", lambda: {TP(topic, 0), TP(topic, 1)})
    return t


def test_the_implementation_matches_the_store(table):
    expected = RocksDBLocal if table.app.conf.store.scheme == "rocksdb" else MemoryLocal
    assert isinstance(local_store(table.data), expected)


def test_writes_reads_deletes_and_partitions(table):
    s = StateStore(table)
    s.write_local({b"u:a": (0, b"A"), b"u:b": (1, b"B"), b"u:c": (1, b"C")})
    assert s.read([(b"u:a", 0), (b"u:b", 1), (b"u:zz", 0)]) == {b"u:a": b"A", b"u:b": b"B", b"u:zz": None}
    assert s.get(b"u:c") == b"C" and s.get(b"u:nobody") is None
    assert sorted((k, p) for k, p, _v in s.local.items()) == [(b"u:a", 0), (b"u:b", 1), (b"u:c", 1)]
    s.write_local({b"u:b": (1, None)})
    assert s.read([(b"u:b", 1)]) == {b"u:b": None}
    assert s.estimate_count() >= 2  # RocksDB's figure is an estimate; the memory store's exact


def test_staged_values_win_until_their_partition_commits(table):
    s = StateStore(table)
    s.write_local({b"u:a": (0, b"old")})
    s.stage({b"u:a": (0, b"new")})
    assert s.read([(b"u:a", 0)]) == {b"u:a": b"new"} and s.get(b"u:a") == b"old"
    s.on_commit({0})
    assert s.get(b"u:a") == b"new"


def test_undecodable_records_count_as_expired(table):
    s = StateStore(table)
    s.write_local({b"u:junk": (1, b"not a state")})
    assert s.expired_slice(1, before_ts=0.0, limit=10) == {b"u:junk": (1, None)}


def test_expiry_scans_a_partition_in_bounded_slices_and_wraps_around(table):
    s = StateStore(table)
    keys = [f"u:{i:02d}".encode() for i in range(7)]
    s.write_local({k: (0, b"junk") for k in keys})  # undecodable: all expire
    s.write_local({b"u:other": (1, b"junk")})
    seen = []
    for _ in range(4):
        got = s.expired_slice(0, before_ts=0.0, limit=3)
        assert len(got) <= 3 and all(p == 0 for p, _v in got.values())
        seen.extend(got)
    assert seen == keys + keys[:3]  # slices of 3, 3 and 1, then the cursor starts over


def test_a_committed_transaction_moves_the_persisted_changelog_offset(table):
    # exactly_once used to leave it where the last recovery put it: every restart replayed the whole
    # changelog written since (issue #13 item 4)
    s = StateStore(table)
    tp = lambda p: TP(table.changelog_topic_name, p)  # noqa: E731
    s.stage({b"u:a": (0, b"A")}, {0: 41})
    s.stage({b"u:a": (0, b"A2"), b"u:b": (1, b"B")}, {0: 57, 1: 9})
    before = table.data.persisted_offset(tp(0))
    s.on_commit({0})
    assert s.get(b"u:a") == b"A2"
    if table.app.conf.store.scheme == "rocksdb":  # Faust's memory store keeps no offsets
        assert table.data.persisted_offset(tp(0)) == 57
        assert table.data.persisted_offset(tp(1)) is None  # partition 1 has not committed
    else:
        assert before is None
    assert s.discard_staged({1}) == 1 and s._staged_offsets == {}
