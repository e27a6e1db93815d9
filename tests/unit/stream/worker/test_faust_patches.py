"""The Faust patches do what they say, on stand-ins for the objects they patch.

The real behaviour (a rebalance under exactly-once with standby replicas) is covered by
tests/integration/test_faults_rebalance.py against a real broker.
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from types import SimpleNamespace

import faust
import orjson
import pytest

from demandstream.stream.worker import faust_patches
from demandstream.stream.worker.faust_patches import (
    UnsupportedFaustVersion,
    check_version,
    commit_transactions_together,
    fetch_only_active_partitions,
    fix_stale_transactional_producers,
    fix_transactional_highwaters,
    keep_changelog_queue_on_resume,
    on_transaction_abandoned,
    skip_existing_topics_when_refused,
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


class FakeTransactionalProducer:
    """One partition's transactional producer: each step a round trip of ``rtt`` seconds, logged."""

    def __init__(self, tid: str, log: list, rtt: float = 0.02, fail: BaseException | None = None):
        self.tid, self.log, self.rtt, self.fail = tid, log, rtt, fail

    async def _step(self, name: str) -> None:
        self.log.append((self.tid, name, "start"))
        await asyncio.sleep(self.rtt)
        if self.fail is not None and name == "commit":
            raise self.fail
        self.log.append((self.tid, name, "end"))

    async def send_offsets_to_transaction(self, offsets, group_id) -> None:
        await self._step("offsets")

    async def commit_transaction(self) -> None:
        await self._step("commit")

    async def begin_transaction(self) -> None:
        await self._step("begin")


def transactional(tids, fail: dict | None = None):
    log: list = []
    producers = {t: FakeTransactionalProducer(t, log, fail=(fail or {}).get(t)) for t in tids}
    producer = SimpleNamespace(
        _transaction_producers=producers, _trn_locks={t: asyncio.Lock() for t in [*tids, "app-1-9"]}
    )
    commit_transactions_together(producer)
    return producer, log


def test_the_partitions_transactions_are_committed_together_each_in_its_order():
    tids = [f"app-1-{p}" for p in range(4)]

    async def main():
        producer, log = transactional(tids)
        t0 = asyncio.get_running_loop().time()
        await producer.commit_transactions({t: {("in", int(t[-1])): 5} for t in tids}, "app")
        return log, asyncio.get_running_loop().time() - t0

    log, seconds = asyncio.run(main())
    for t in tids:  # every step of each transaction, in Faust's order
        assert [(n, e) for tid, n, e in log if tid == t] == [
            (n, e) for n in ("offsets", "commit", "begin") for e in ("start", "end")
        ]
    # together: every partition's first step starts before any partition's first step ends
    assert {tid for tid, _n, e in log[:4]} == set(tids) and all(e == "start" for *_x, e in log[:4])
    assert seconds < 2 * 3 * 0.02  # three round trips, not twelve


def test_a_fenced_transaction_is_raised_after_the_others_committed():
    tids = ["app-1-0", "app-1-1", "app-1-2"]

    class ProducerFenced(Exception):
        pass

    async def main():
        producer, log = transactional(tids, fail={"app-1-1": ProducerFenced("fenced")})
        with pytest.raises(ProducerFenced):
            await producer.commit_transactions({t: {} for t in tids}, "app", start_new_transaction=False)
        return log

    log = asyncio.run(main())
    committed = {tid for tid, n, e in log if n == "commit" and e == "end"}
    assert committed == {"app-1-0", "app-1-2"}
    assert not [x for x in log if x[1] == "begin"]  # start_new_transaction=False is obeyed


def test_a_commit_for_an_unknown_transaction_is_logged_and_the_others_committed(caplog):
    async def main():
        producer, log = transactional(["app-1-0"])
        await producer.commit_transactions({"app-1-9": {}, "app-1-0": {}}, "app")
        return log

    log = asyncio.run(main())
    assert ("app-1-0", "commit", "end") in log
    assert "unknown transaction app-1-9" in caplog.text


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


@pytest.mark.parametrize("exists", [True, False])
def test_a_topic_the_principal_may_not_create_is_used_when_it_exists(exists):
    """The broker checks CREATE before existence; Faust's creation of an existing changelog must not
    stop a worker that may not create topics (the real broker: tests/integration/test_security.py)."""
    from aiokafka.errors import TopicAuthorizationFailedError

    async def refused(owner, client, topic, partitions, replication, **kw):
        raise TopicAuthorizationFailedError(f"Cannot create topic: {topic} (29)")

    class Client:
        async def fetch_all_metadata(self):
            return SimpleNamespace(topics=lambda: {"app-user-state-changelog"} if exists else set())

    transport = SimpleNamespace(_really_create_topic=refused)
    skip_existing_topics_when_refused(transport)
    create = transport._really_create_topic(None, Client(), "app-user-state-changelog", 4, 1, config={})
    if exists:
        assert asyncio.run(create) is None
    else:
        with pytest.raises(TopicAuthorizationFailedError):
            asyncio.run(create)


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


def test_events_taken_from_the_queue_but_not_yet_counted_keep_the_recovery_open():
    recovery = FakeRecovery({"p0": 8}, {"p0": 9})
    slurp = faust_patches.ChunkedSlurp()
    slurp.in_hand = 2  # the chunked loop holds two events it has not counted yet
    tail = faust_patches.RecoveryTail(tail_app(recovery, {"p0": 10}), slurp)
    for _ in range(3):
        asyncio.run(tail.check())
    assert recovery.in_recovery and recovery.active_offsets == {"p0": 8}
    slurp.in_hand = 0
    asyncio.run(tail.check())
    assert recovery.in_recovery, "the first round without events in hand is never the confirmation"
    asyncio.run(tail.check())
    assert not recovery.in_recovery


# -- the chunked recovery loop against Faust's own, on the same stand-in -------------------------------


class DictTable:
    """A table whose store is a dict: puts and tombstones as Faust's stores apply a changelog batch."""

    def __init__(
        self,
        recovery_buffer_size: int = 3,
        standby_buffer_size: int = 2,
        fail_on: bytes = b"",
        on_event=None,
    ):
        self.recovery_buffer_size = recovery_buffer_size
        self.standby_buffer_size = standby_buffer_size
        self.fail_on = fail_on
        self.on_event = on_event  # an awaitable hook per event, as a table's on_changelog_event callback
        self.data: dict[bytes, bytes] = {}
        self.batches: list[list[int]] = []
        self.seen: list[int] = []

    async def on_changelog_event(self, event) -> None:
        self.seen.append(event.message.offset)
        if self.on_event is not None:
            await self.on_event(event)
        if event.message.key == self.fail_on:
            raise RuntimeError("a failing changelog callback")

    def apply_changelog_batch(self, batch) -> None:
        self.batches.append([e.message.offset for e in batch])
        for e in batch:
            if e.message.value is None:
                self.data.pop(e.message.key, None)
            else:
                self.data[e.message.key] = e.message.value


class SlurpRecovery:
    """The parts of Faust's ``Recovery`` its changelog loop reads and writes, over Faust's own queue."""

    def __init__(self, table: DictTable, active, standby, highwaters: dict):
        from collections import Counter, defaultdict, deque

        queue, flow_control = faust_changelog_queue()
        keep_changelog_queue_on_resume(queue, flow_control)
        flow_control.resume()
        self.tables = SimpleNamespace(
            changelog_queue=queue, standbys_ready=True, on_standbys_ready=lambda: None
        )
        self.app = SimpleNamespace(in_transaction=False, flow_control=flow_control, consumer_generation_id=1)
        self.tp_to_table = {tp: table for tp in (*active, *standby)}
        self.active_tps, self.standby_tps = set(active), set(standby)
        self.active_offsets: Counter = Counter({tp: -1 for tp in active})
        self.standby_offsets: Counter = Counter({tp: -1 for tp in standby})
        self.active_highwaters = dict(highwaters)
        self._active_events_received_at: dict = {}
        self._standby_events_received_at: dict = {}
        self.buffers = defaultdict(list)
        self.buffer_sizes: dict = {}
        self._processing_times: deque = deque()
        self.num_samples_required_for_estimate = 5
        self._last_active_event_processed_at = None
        self._last_flush_at = None
        self._actives_span = self._standbys_span = None
        self.signal_recovery_end = asyncio.Event()
        self.in_recovery = True
        self.ended = 0
        self.should_stop = False

    def need_recovery(self) -> bool:
        return any(hw > self.active_offsets[tp] for tp, hw in self.active_highwaters.items())

    def flush_buffers(self) -> None:
        for table, buffer in self.buffers.items():
            table.apply_changelog_batch(buffer)
            buffer.clear()

    def _set_recovery_ended(self) -> None:
        self.in_recovery = False
        self.ended += 1

    def standby_remaining_total(self) -> int:
        return 0


def changelog_events():
    """Two active partitions and a standby: overwrites, tombstones, a re-delivered old offset."""
    from faust.types import TP

    a0, a1, s2 = TP("cl", 0), TP("cl", 1), TP("cl", 2)
    records = [
        (a0, 0, b"u1", b"v1"),
        (a0, 1, b"u2", b"v1"),
        (a1, 0, b"u3", b"v1"),
        (a0, 2, b"u1", b"v2"),
        (s2, 0, b"u9", b"s1"),
        (a0, 3, b"u2", None),  # tombstone: u2 erased
        (a1, 1, b"u3", b"v2"),
        (a0, 1, b"u2", b"stale"),  # an offset already applied, delivered again: ignored
        (a1, 2, b"bad", b"v1"),
        (a0, 4, b"u4", b"v1"),
        (s2, 1, b"u9", None),
        (a1, 3, b"u5", b"v1"),
    ]
    events = [
        SimpleNamespace(message=SimpleNamespace(tp=tp, offset=o, key=k, value=v)) for tp, o, k, v in records
    ]
    return events, (a0, a1), (s2,), {a0: 4, a1: 3}


async def run_loop(loop_fn, events):
    _, active, standby, highwaters = changelog_events()
    table = DictTable(fail_on=b"bad")
    recovery = SlurpRecovery(table, active, standby, highwaters)
    for e in events:
        recovery.tables.changelog_queue.put_nowait(e)
    task = asyncio.ensure_future(loop_fn(recovery))
    await asyncio.wait_for(recovery.signal_recovery_end.wait(), 5)
    while recovery.tables.changelog_queue.qsize():
        await asyncio.sleep(0)  # Faust's loop goes on taking what was queued after the end
    for _ in range(10):
        await asyncio.sleep(0)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    recovery.flush_buffers()
    return table, recovery


@pytest.mark.parametrize("chunk_max", [1, 4, 1000])
def test_the_chunked_recovery_loop_restores_what_fausts_own_loop_restores(monkeypatch, chunk_max):
    from faust.tables.recovery import Recovery

    monkeypatch.setattr(faust_patches, "RECOVERY_CHUNK_MAX", chunk_max)
    events, *_ = changelog_events()
    theirs, their_recovery = asyncio.run(run_loop(Recovery._slurp_changelogs.fun, events))
    slurp = faust_patches.ChunkedSlurp()
    ours, our_recovery = asyncio.run(run_loop(slurp, events))

    # the last value of every key, tombstones deleting, the stale re-delivery ignored
    expected = {b"u1": b"v2", b"u3": b"v2", b"bad": b"v1", b"u4": b"v1", b"u5": b"v1"}
    assert theirs.data == ours.data == expected
    # a failing callback costs that event's buffer entry nothing and the other events nothing
    assert theirs.seen == ours.seen
    assert their_recovery.active_offsets == our_recovery.active_offsets
    assert their_recovery.standby_offsets == our_recovery.standby_offsets
    assert our_recovery.ended == their_recovery.ended == 1 and not our_recovery.in_recovery
    # the same batches reach the store: a full buffer (recovery_buffer_size 3) at once, the rest at the end
    assert ours.batches == theirs.batches
    assert ours.batches[0] == [0, 1, 0]
    assert slurp.in_hand == 0


def test_an_event_of_a_partition_not_assigned_here_is_skipped_not_applied_to_the_previous_ones_table():
    """Faust's loop logs "recovery unknown topic" and then applies the event with the previous event's
    table, offsets and buffer size; the chunked loop skips it."""
    from faust.types import TP

    events, *_ = changelog_events()
    stray = SimpleNamespace(message=SimpleNamespace(tp=TP("cl", 7), offset=50, key=b"x", value=b"stray"))
    table, recovery = asyncio.run(run_loop(faust_patches.ChunkedSlurp(), [*events[:3], stray, *events[3:]]))
    assert b"x" not in table.data and 50 not in table.seen
    assert TP("cl", 7) not in recovery.active_offsets and TP("cl", 7) not in recovery.standby_offsets
    assert table.data == {b"u1": b"v2", b"u3": b"v2", b"bad": b"v1", b"u4": b"v1", b"u5": b"v1"}


def test_a_rebalance_during_a_chunk_drops_its_rest_uncounted_as_fausts_clear_drops_the_queue():
    """A table whose changelog callback awaits lets a rebalance run in the middle of a chunk.

    The events of the chunk not yet applied must not be counted or applied: had they still been in the
    queue, ``App._on_partitions_revoked`` would have emptied it, and the next recovery seeks back to the
    offsets counted, so they are read again. No event is applied twice and none is skipped.
    """
    from faust.types import TP

    a0 = TP("cl", 0)
    recovery_box: list = []

    async def rebalance_after_offset_1(event):
        if event.message.offset == 1:
            await asyncio.sleep(0)
            recovery = recovery_box[0]
            # App._on_partitions_revoked: flush, stop the flow, suspend, clear the queues
            recovery.flush_buffers()
            recovery.app.flow_control.suspend()
            recovery.app.flow_control.clear()
            recovery.app.consumer_generation_id += 1

    table = DictTable(recovery_buffer_size=100, on_event=rebalance_after_offset_1)
    recovery = SlurpRecovery(table, (a0,), (), {a0: 5})
    recovery_box.append(recovery)
    slurp = faust_patches.ChunkedSlurp()
    events = [
        SimpleNamespace(message=SimpleNamespace(tp=a0, offset=o, key=f"u{o}".encode(), value=b"v"))
        for o in range(6)
    ]

    async def scenario():
        for e in events[:4]:
            recovery.tables.changelog_queue.put_nowait(e)
        task = asyncio.ensure_future(slurp(recovery))
        for _ in range(20):
            await asyncio.sleep(0)
        assert recovery.active_offsets[a0] == 1 and slurp.in_hand == 0
        assert table.seen == [0, 1] and table.batches == [[0, 1]]  # 2 and 3 dropped uncounted
        # the next recovery: flow resumed, the consumer seeks back to offset 1 and reads on
        recovery.app.flow_control.resume()
        for e in events[1:]:
            recovery.tables.changelog_queue.put_nowait(e)
        await asyncio.wait_for(recovery.signal_recovery_end.wait(), 5)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    asyncio.run(scenario())
    assert recovery.active_offsets[a0] == 5
    assert table.seen == [0, 1, 2, 3, 4, 5]  # offset 1 re-read and ignored, each event applied once
    assert [o for batch in table.batches for o in batch] == [0, 1, 2, 3, 4, 5]
    assert table.data == {f"u{o}".encode(): b"v" for o in range(6)}


def test_the_chunked_loop_replaces_the_recoverys_task_and_the_drain_hands_the_tail_its_slurp():
    recovery = SimpleNamespace()
    slurp = faust_patches.install_chunked_recovery(recovery)
    assert isinstance(slurp, faust_patches.ChunkedSlurp)
    assert recovery._slurp_changelogs.fun is slurp


def test_deliver_hands_every_record_to_the_callback_in_order():
    got = []

    async def callback(message):
        await asyncio.sleep(0)
        got.append(message)

    asyncio.run(faust_patches.deliver(callback, [3, 1, 2]))
    assert got == [3, 1, 2]


# -- the consumer thread's fetch and the live set of active partitions ---------------------------------


class FetchingConsumer:
    """Faust's consumer as far as ``_getmany`` goes: the thread's fetch filters its buffer as aiokafka's
    ``Fetcher.fetched_records`` does, reading the partition set after it has waited for data."""

    def __init__(self, buffered: dict):
        self.buffered = buffered
        self.while_waiting = lambda: None  # what the main thread does meanwhile (a recovery's pause)

    async def _getmany(self, active_partitions, timeout):
        self.while_waiting()
        await asyncio.sleep(0)
        partitions = active_partitions
        return {tp: r for tp, r in self.buffered.items() if not (partitions and tp not in partitions)}


def test_aiokafka_takes_an_empty_partition_set_for_all_partitions():
    """The premise of fetch_only_active_partitions, in the installed aiokafka's own code."""
    import inspect

    from aiokafka.consumer.fetcher import Fetcher

    assert "if partitions and tp not in partitions" in inspect.getsource(Fetcher.fetched_records)


def test_a_fetch_in_flight_when_the_recovery_pauses_the_last_active_partition_returns_nothing_paused():
    """A recovery ("Done reading from changelog topics") empties the active set while a fetch waits.

    Unpatched, the fetch returned every buffered record (input and standby partitions, all paused), and
    Faust's getmany dropped them with their positions already past them.
    """
    buffered = {"changelog-0": [5, 6], "clickstream-3": [771, 772], "changelog-2": [9]}
    active = {"changelog-2"}

    def recovery_done():  # Recovery._restart_recovery: consumer.pause_partitions(active_tps)
        active.discard("changelog-2")

    unpatched = FetchingConsumer(buffered)
    unpatched.while_waiting = recovery_done
    assert asyncio.run(unpatched._getmany(active_partitions=active, timeout=1.0)) == buffered  # the race

    active.add("changelog-2")
    consumer = FetchingConsumer(buffered)
    consumer.while_waiting = recovery_done
    fetch_only_active_partitions(consumer)
    assert asyncio.run(consumer._getmany(active_partitions=active, timeout=1.0)) == {}

    # the live set still decides: what is active when the fetch reads it is returned, nothing else
    active.add("clickstream-3")
    consumer.while_waiting = lambda: active.add("changelog-0")
    assert asyncio.run(consumer._getmany(active_partitions=active, timeout=1.0)) == {
        "changelog-0": [5, 6],
        "clickstream-3": [771, 772],
    }
    assert asyncio.run(consumer._getmany(active_partitions=None, timeout=1.0)) == buffered  # client-only


def test_the_workers_consumer_lets_the_broker_hold_an_empty_fetch_for_our_interval_not_fausts(tmp_path):
    """Faust builds the worker's consumer with fetch_max_wait_ms=1500; the app's builder sets ours."""
    from demandstream.stream.settings import Settings
    from demandstream.stream.worker.app import CONSUMER_FETCH_MAX_WAIT_MS, create_app

    settings = Settings(store="memory", data_dir=str(tmp_path / "data"), app_id=f"fetch-{tmp_path.name}")
    thread = create_app(settings).app.consumer._thread

    async def build():  # aiokafka's consumer wants a running loop, as in the consumer thread
        return thread._create_worker_consumer(thread.transport)

    consumer = asyncio.run(build())
    assert consumer._fetch_max_wait_ms == CONSUMER_FETCH_MAX_WAIT_MS < 1500
    assert consumer._max_partition_fetch_bytes > 0  # the rest of Faust's settings are kept
    # at-least-once too: aborted transactions of the shop's producers are never read (read_committed)
    assert settings.guarantee == "at_least_once" and consumer._isolation_level == "read_committed"


def test_aiokafka_hands_the_consumers_fetch_max_wait_to_its_fetcher():
    """The premise of tune_worker_consumer: start() builds the Fetcher from the attributes it sets."""
    import inspect

    from aiokafka import AIOKafkaConsumer

    assert "fetch_max_wait_ms=self._fetch_max_wait_ms" in inspect.getsource(AIOKafkaConsumer.start)
    assert "isolation_level=self._isolation_level" in inspect.getsource(AIOKafkaConsumer.start)
