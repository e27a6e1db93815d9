"""The Faust patches do what they say, on stand-ins for the objects they patch.

The real behaviour (a rebalance under exactly-once with standby replicas) is covered by
tests/integration/test_faults_rebalance.py against a real broker.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import SimpleNamespace

import faust
import orjson
import pytest

from demandstream.stream.worker import faust_patches
from demandstream.stream.worker.faust_patches import (
    UnsupportedFaustVersion,
    check_version,
    fix_stale_transactional_producers,
    fix_transactional_highwaters,
    keep_changelog_queue_on_resume,
    on_transaction_abandoned,
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


def test_an_abandoned_transaction_is_reported_before_its_producer_stops():
    producer = FakeProducer({"app-1-0": txn(True), "app-1-1": txn(True)})
    transactions = FakeTransactions(producer)
    fix_stale_transactional_producers(transactions, producer)
    on_transaction_abandoned(producer, lambda tid: producer.calls.append(("abandoned", tid)))

    asyncio.run(transactions.on_rebalance({0}, set(), set()))
    assert producer.calls == [("abandoned", "app-1-1"), ("stop", "app-1-1")]


def test_a_partition_that_comes_back_before_a_micro_batch_reprocesses_its_abandoned_transaction():
    """Exactly-once rebalance bug: events skipped as already applied, their signals in an aborted transaction.

    This worker processed a micro-batch of partitions 0 and 1 into their open transactions (states
    staged, nothing committed). A rebalance moves partition 0 away: Faust forgets the uncommitted acks
    and stops its producer, so the next owner aborts that transaction and starts again from the
    committed offset. Partition 0 comes back before this worker runs another micro-batch (the other
    owner had not committed anything yet) and its events are delivered again. They must be applied
    again: the states staged for the abandoned transaction used to be read instead, and the events
    were skipped as duplicates, so their signals existed nowhere and the users' states only in this
    worker's local store (the rebalance fault test: lost signals, users missing from the changelog).
    Partition 1 stayed here with its transaction open, so its redelivered events are duplicates.
    """
    import torch
    from faust.types import TP

    from demandstream.model.core.checkpoint import Checkpoint
    from demandstream.model.core.events import Event, event_to_json
    from demandstream.model.core.features import Vocabulary
    from demandstream.model.core.network import DemandLSTM, ModelConfig
    from demandstream.model.core.scoring import Scorer
    from demandstream.stream.engine.inference import InferenceEngine, SourceRecord
    from demandstream.stream.engine.records import state_key
    from demandstream.stream.worker.agents import Pipeline
    from demandstream.stream.worker.store import StateStore

    torch.manual_seed(0)
    cats = ["<unk>", "shoes", "bags"]
    net = DemandLSTM(ModelConfig(n_categories=len(cats), hidden=16)).eval()
    engine = InferenceEngine(Scorer(Checkpoint(net, Vocabulary(cats), "0a1b2c3d"), top_k=2), "clickstream")
    store = StateStore(SimpleNamespace(data=SimpleNamespace(data={}, _key_partition={})))
    pipeline = object.__new__(Pipeline)
    pipeline.exactly_once = True
    pipeline.store = store
    pipeline.settings = SimpleNamespace(topic_input="clickstream", topic_control="clickstream-control")
    pipeline.c = SimpleNamespace(
        app=SimpleNamespace(
            crashed=False,
            conf=SimpleNamespace(id="app"),
            assignor=SimpleNamespace(group_for_topic=lambda t: 1),
        )
    )
    producer = FakeProducer({"app-0-0": txn(True), "app-1-0": txn(True), "app-1-1": txn(True)})
    transactions = FakeTransactions(producer)
    fix_stale_transactional_producers(transactions, producer)
    on_transaction_abandoned(producer, pipeline.on_transaction_abandoned)

    def record(i: int, user: str, partition: int, offset: int) -> SourceRecord:
        e = Event(f"e{i}", user, 1.73e9 + i, "view", f"i{i}", cats[1 + i % 2], 10.0)
        return SourceRecord(user.encode(), event_to_json(e), partition, offset)

    records = [record(i, "u0", 0, i) for i in range(5)] + [record(5 + i, "u1", 1, i) for i in range(3)]
    first = engine.process(records, store.read)
    store.stage(first.states)  # what produce_transactional does once the outputs are in the transactions
    assert len(first.signals) == 8

    asyncio.run(transactions.on_rebalance({1}, set(), set()))  # partition 0 moves away
    assert ("stop", "app-1-0") in producer.calls
    asyncio.run(transactions.on_rebalance({0, 1}, set(), {0}))  # and comes back

    again = engine.process(records, store.read)  # both redelivered from their committed offsets
    assert [orjson.loads(s.value)["events_seen"] for s in again.signals] == [1, 2, 3, 4, 5]
    assert {orjson.loads(s.value)["event_id"] for s in again.signals} == {f"e{i}" for i in range(5)}
    assert again.duplicates == 3  # partition 1's signals are still in its open transaction
    store.stage(again.states)
    pipeline.on_commit({TP("clickstream", 0): 5, TP("clickstream", 1): 3})
    local = store._store.data
    u0, u1 = state_key("u0"), state_key("u1")  # table keys live in their own namespace (§State keys)
    assert local[u0] == again.states[u0][1]
    assert local[u1] == first.states[u1][1]


class FakeRecovery:
    """The parts of Faust's ``Recovery`` that :class:`RecoveryTail` reads and ends."""

    def __init__(self, offsets: dict, highwaters: dict):
        self.in_recovery = True
        self.active_offsets = dict(offsets)
        self.active_highwaters = dict(highwaters)
        self.flushed = 0
        self.signal_recovery_end = asyncio.Event()
        self.signal_recovery_start = asyncio.Event()  # set by Faust's on_rebalance: a new recovery is due
        self._recovery_started_at = 1.0  # monotonic() of the recovery's last _set_recovery_started

    def need_recovery(self) -> bool:
        return any(hw - self.active_offsets[tp] > 0 for tp, hw in self.active_highwaters.items())

    def flush_buffers(self) -> None:
        self.flushed += 1

    def _set_recovery_ended(self) -> None:
        self.in_recovery = False


def tail_app(recovery: FakeRecovery, positions: dict, *, queued: int = 0, in_transaction: bool = True):
    async def position(tp):
        return positions[tp]

    queue: asyncio.Queue = asyncio.Queue()
    for _ in range(queued):
        queue.put_nowait(object())
    return SimpleNamespace(
        in_transaction=in_transaction,
        tables=SimpleNamespace(recovery=recovery, changelog_queue=queue),
        consumer=SimpleNamespace(position=position, flow_active=True),
    )


def test_recovery_ends_on_the_second_round_past_the_changelogs_end_marker():
    # partition 0: last data record 8, marker at 9 (end offset 10, Faust's target 9); the consumer is at 10
    recovery = FakeRecovery({"p0": 8, "p1": 4}, {"p0": 9, "p1": 4})
    tail = faust_patches.RecoveryTail(tail_app(recovery, {"p0": 10, "p1": 5}))
    asyncio.run(tail.check())
    assert recovery.in_recovery, "one round is not enough: a record may still be on its way"
    asyncio.run(tail.check())
    assert not recovery.in_recovery and recovery.signal_recovery_end.is_set()
    assert recovery.active_offsets == {"p0": 9, "p1": 4} and recovery.flushed == 1


@pytest.mark.parametrize(
    "positions, queued, in_transaction",
    [
        ({"p0": 9}, 0, True),  # at the marker's offset: the record at 9 may be data not yet fetched
        ({"p0": None}, 0, True),  # no position yet
        ({"p0": 10}, 1, True),  # fetched, but the recovery has not counted everything it was given
        ({"p0": 10}, 0, False),  # at-least-once: no markers, Faust's own end is exact
    ],
)
def test_recovery_is_left_to_faust_unless_everything_below_the_end_was_fetched_and_counted(
    positions, queued, in_transaction
):
    recovery = FakeRecovery({"p0": 8}, {"p0": 9})
    tail = faust_patches.RecoveryTail(
        tail_app(recovery, positions, queued=queued, in_transaction=in_transaction)
    )
    for _ in range(3):
        asyncio.run(tail.check())
    assert recovery.in_recovery and recovery.active_offsets == {"p0": 8} and recovery.flushed == 0


def test_a_record_counted_between_two_rounds_restarts_the_confirmation():
    recovery = FakeRecovery({"p0": 7}, {"p0": 9})
    tail = faust_patches.RecoveryTail(tail_app(recovery, {"p0": 10}))
    asyncio.run(tail.check())
    recovery.active_offsets["p0"] = 8  # the recovery applied one more record meanwhile
    asyncio.run(tail.check())
    assert recovery.in_recovery
    asyncio.run(tail.check())
    assert not recovery.in_recovery and recovery.active_offsets == {"p0": 9}


def test_a_confirmation_begun_before_a_rebalance_never_ends_the_recovery_during_it():
    """The race: one round at the end, then a rebalance; the next round used to end the recovery.

    Round 1 sees the recovery at the end of its changelogs and waits for confirmation. A rebalance
    starts: Faust stops the flow and empties the changelog queue but leaves ``in_recovery`` set, and
    the drain loop's round that was waiting for records still runs its check, with the offsets,
    highwaters and positions unchanged. It used to confirm and end the recovery there, leaving
    ``signal_recovery_end`` set: the next recovery (the partitions assigned by this rebalance) then
    returned from its wait at once and restored nothing. Nor may a verdict of one recovery count for
    the next: it starts again (``_set_recovery_started``) before it resumes the flow.
    """
    recovery = FakeRecovery({"p0": 8}, {"p0": 9})
    app = tail_app(recovery, {"p0": 10})
    tail = faust_patches.RecoveryTail(app)
    asyncio.run(tail.check())  # at the end: the first of two rounds

    app.consumer.flow_active = False  # a rebalance: App._on_partitions_revoked -> Consumer.stop_flow
    asyncio.run(tail.check())  # the round that was in flight
    recovery.signal_recovery_start.set()  # Recovery.on_rebalance: the next recovery is due
    asyncio.run(tail.check())
    assert recovery.in_recovery and not recovery.signal_recovery_end.is_set()
    assert recovery.active_offsets == {"p0": 8} and recovery.flushed == 0

    # the next recovery starts, finds the same offsets (nothing new for p0) and resumes the flow
    recovery.signal_recovery_start.clear()
    recovery._recovery_started_at = 2.0
    app.consumer.flow_active = True
    asyncio.run(tail.check())
    assert recovery.in_recovery, "the first round of a recovery is never its confirmation"
    asyncio.run(tail.check())
    assert not recovery.in_recovery and recovery.signal_recovery_end.is_set()


def test_a_rebalance_between_the_rounds_of_one_recovery_restarts_the_confirmation():
    recovery = FakeRecovery({"p0": 8}, {"p0": 9})
    app = tail_app(recovery, {"p0": 10})
    tail = faust_patches.RecoveryTail(app)
    asyncio.run(tail.check())
    recovery.signal_recovery_start.set()  # assigned, flow not stopped yet (RebalanceAgain is coming)
    asyncio.run(tail.check())
    recovery.signal_recovery_start.clear()
    asyncio.run(tail.check())
    assert recovery.in_recovery
    asyncio.run(tail.check())
    assert not recovery.in_recovery


def changelog_event(partition: int, offset: int):
    return SimpleNamespace(message=SimpleNamespace(tp=("changelog", partition), offset=offset))


def faust_changelog_queue():
    """The changelog queue as Faust builds it (``TableManager.changelog_queue``) and the app's flow control."""
    from mode.utils.queues import FlowControlEvent, ThrowableQueue

    flow_control = FlowControlEvent()  # initially suspended, as the app's
    queue = ThrowableQueue(maxsize=8000, flow_control=flow_control, clear_on_resume=True)
    return queue, flow_control


def test_faust_drops_standby_records_queued_when_the_recovery_resumes_the_flow():
    """The race, on Faust's own queue: what the standby phase of a recovery delivered is thrown away.

    faust-streaming 0.15 ``Recovery._restart_recovery`` resumes the standby partitions (and the flow),
    then ``on_recovery_completed`` seeks the stream partitions and calls ``flow_control.resume()``
    again, which empties the changelog queue. The consumer has already delivered (and moved past) the
    standby records in it, so the standby replica never applies them.
    """
    queue, flow_control = faust_changelog_queue()
    flow_control.resume()  # "Resume standby partitions"
    for offset in (911, 912):
        queue.put_nowait(changelog_event(2, offset))  # the drain loop delivers two standby records
    flow_control.resume()  # on_recovery_completed, before the recovery took them
    assert queue.qsize() == 0  # lost: the next records are applied past them and the gap is never read


def test_changelog_records_delivered_while_the_flow_runs_survive_a_resume():
    queue, flow_control = faust_changelog_queue()
    keep_changelog_queue_on_resume(queue, flow_control)
    flow_control.resume()
    events = [changelog_event(2, offset) for offset in (911, 912)]
    for e in events:
        queue.put_nowait(e)
    flow_control.resume()  # on_recovery_completed
    assert [queue.get_nowait() for _ in range(queue.qsize())] == events


def test_a_rebalance_still_empties_the_changelog_queue():
    """App._on_partitions_revoked: suspend, then clear. The next recovery seeks back to what it counted."""
    queue, flow_control = faust_changelog_queue()
    keep_changelog_queue_on_resume(queue, flow_control)
    flow_control.resume()
    queue.put_nowait(changelog_event(0, 5))
    flow_control.suspend()
    flow_control.clear()
    assert queue.empty()
    flow_control.resume()  # the next recovery starts reading on an empty queue
    assert queue.empty()
