"""The Faust patches do what they say, on stand-ins for the objects they patch.

The real behaviour (a rebalance under exactly-once with standby replicas) is covered by
tests/integration/test_faults_rebalance.py against a real broker.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import SimpleNamespace

import faust
import pytest

from demandstream.stream.worker import faust_patches
from demandstream.stream.worker.faust_patches import (
    UnsupportedFaustVersion,
    check_version,
    fix_stale_transactional_producers,
    fix_transactional_highwaters,
)


class FakeProducer:
    def __init__(self, producers: dict):
        self._transaction_producers = producers
        self.calls: list[tuple[str, str]] = []

    async def stop_transaction(self, tid: str) -> None:
        self.calls.append(("stop", tid))
        self._transaction_producers.pop(tid, None)

    async def maybe_begin_transaction(self, tid: str) -> None:
        self.calls.append(("begin", tid))


def txn(open_: bool):
    return SimpleNamespace(_txn_manager=SimpleNamespace(is_in_transaction=lambda: open_))


class FakeTransactions:
    def __init__(self, producer: FakeProducer):
        self.producer = producer

    def _tps_to_transactional_ids(self, tps) -> set[str]:
        return {f"app-1-{p}" for p in tps}

    async def on_rebalance(self, assigned, revoked, newly_assigned) -> None:
        for tid in sorted(self._tps_to_transactional_ids(assigned)):
            await self.producer.maybe_begin_transaction(tid)


def test_producers_of_partitions_that_moved_away_are_stopped_before_faust_starts_the_new_ones():
    producer = FakeProducer({"app-1-0": txn(True), "app-1-1": txn(True), "app-1-2": txn(True)})
    transactions = FakeTransactions(producer)
    fix_stale_transactional_producers(transactions, producer)

    # partition 1 went to another worker (it may stay here as a standby: Faust kept its producer)
    asyncio.run(transactions.on_rebalance({0, 2}, set(), set()))
    assert producer.calls == [("stop", "app-1-1")]  # the kept ones are already in a transaction

    # partition 1 comes back: it gets a fresh producer, never the fenced one
    producer.calls.clear()
    asyncio.run(transactions.on_rebalance({0, 1, 2}, set(), {1}))
    assert producer.calls == [("begin", "app-1-1")]


def test_a_closed_transaction_is_begun_again():
    producer = FakeProducer({"app-1-0": txn(False)})
    transactions = FakeTransactions(producer)
    fix_stale_transactional_producers(transactions, producer)
    asyncio.run(transactions.on_rebalance({0}, set(), set()))
    assert producer.calls == [("begin", "app-1-0")]


def test_highwaters_come_from_the_broker_not_the_fetchers_cache():
    asked = []

    class Consumer:
        async def end_offsets(self, partitions):
            asked.append(list(partitions))
            return {tp: 42 for tp in partitions}

        def last_stable_offset(self, tp):  # what Faust used: None before the first fetch
            return None

    thread = SimpleNamespace(_ensure_consumer=lambda: Consumer())
    fix_transactional_highwaters(thread)
    assert asyncio.run(thread._highwaters(["tp0", "tp1"])) == {"tp0": 42, "tp1": 42}
    assert asked == [["tp0", "tp1"]]


def test_the_installed_faust_is_in_the_tested_range_and_pyproject_pins_the_same_range():
    check_version(faust.__version__)
    pyproject = (Path(__file__).parents[4] / "pyproject.toml").read_text()
    low = ".".join(map(str, faust_patches.TESTED_FROM))
    high = ".".join(map(str, faust_patches.TESTED_BELOW))
    assert f'"faust-streaming>={low},<{high}"' in pyproject


@pytest.mark.parametrize("version", ["0.11.0", "0.15.2", "0.16.0", "0.16.0rc1", "1.0"])
def test_a_faust_outside_the_tested_range_is_refused_in_one_line(version):
    with pytest.raises(UnsupportedFaustVersion) as e:
        check_version(version)
    assert "\n" not in str(e.value) and version in str(e.value)
