"""Every place demandstream replaces a method of Faust's objects, in one module.

Faust gives no public hook for what these do, so each one replaces one method on one of the app's own
objects (never Faust's classes) and its docstring names the Faust behaviour or bug it works around:

- :func:`install_batch_delivery`: the consumer's drain loop hands each fetch's input records to the
  pipeline as one list (``Consumer._drain_messages``), instead of one Faust event per record.
- :func:`guard_commits`: exactly-once offset commits wait for the micro-batch in flight
  (``Consumer.commit``).
- :func:`commit_transactions_together`: exactly-once commits the partitions' transactions concurrently
  instead of in turn (``Producer.commit_transactions``).
- :func:`on_transaction_abandoned`: the pipeline hears when a partition's transactional producer is
  stopped on rebalance, abandoning its open transaction (``Producer.stop_transaction``).
- :func:`chain_table_commit`: the pipeline hears of every offset commit (``TableManager.on_commit``).
- :func:`install` = :func:`fix_transactional_highwaters` (``_highwaters`` of the consumer thread,
  faust-streaming/faust#158) + :func:`fix_stale_transactional_producers`
  (``TransactionManager.on_rebalance``, ``Producer.maybe_begin_transaction``) +
  :func:`keep_changelog_queue_on_resume` (``clear`` of the table manager's changelog queue) +
  :func:`fetch_only_active_partitions` (``Consumer._getmany``) +
  :func:`skip_existing_topics_when_refused` (``Transport._really_create_topic``).
- :func:`tune_worker_consumer`: the worker's consumer lets the broker hold an empty fetch for our
  interval instead of Faust's fixed 1,500 ms, and reads only committed records under at-least-once too,
  where Faust reads aborted transactions' records (``AIOKafkaConsumerThread._create_worker_consumer``).
- :class:`RecoveryTail`: exactly-once recovery ends as soon as the consumer has read past a changelog's
  last offset, instead of after Faust's two idle 5-second polls (``Recovery._slurp_changelogs``).
- :class:`ChunkedSlurp` (:func:`install_chunked_recovery`): the recovery takes the changelog events
  already queued in chunks, not one ``wait_for`` each (``Recovery._slurp_changelogs``); with
  :func:`deliver`, the drain loop hands a fetch round's changelog records to Faust's consumer callback
  under one ``wait_first`` instead of one per record (``Consumer._drain_messages``).

They copy or wrap private code of one Faust release, so this module refuses, at import, a Faust outside
the range they were tested on (:data:`TESTED_FROM` ≤ version < :data:`TESTED_BELOW`, the same range
pyproject.toml pins). Before widening it, run the fault tests (``pytest tests/integration -m slow``)
in both guarantee modes: they found these bugs and keep the patches honest.
"""

from __future__ import annotations

import asyncio
import logging
import re
import types
from collections.abc import Awaitable, Callable
from time import monotonic

import faust
from aiokafka.errors import TopicAuthorizationFailedError
from faust.transport.consumer import CONSUMER_FETCHING
from faust.utils.tracing import finish_span
from mode.services import ServiceTask

from demandstream.model.errors import UserError

logger = logging.getLogger(__name__)

#: The faust-streaming releases the patches below were tested on: ``TESTED_FROM <= v < TESTED_BELOW``.
TESTED_FROM = (0, 15, 3)
TESTED_BELOW = (0, 16)


class UnsupportedFaustVersion(UserError, RuntimeError):
    """The installed faust-streaming is outside the range this module's patches were tested on."""


def _release(version: str) -> tuple[int, ...]:
    """``"0.15.3"`` -> ``(0, 15, 3)``; pre-release and local suffixes are ignored.

    >>> _release("0.15.3"), _release("0.16.0rc1"), _release("1.0")
    ((0, 15, 3), (0, 16, 0), (1, 0))
    """
    return tuple(int(n) for n in re.findall(r"\d+", version.split("+")[0])[:3]) or (0,)


def check_version(version: str) -> None:
    """Raise :class:`UnsupportedFaustVersion` (one line) unless ``version`` is in the tested range.

    >>> check_version("0.15.3")
    >>> check_version("0.11.0")
    Traceback (most recent call last):
    ...
    demandstream.stream.worker.faust_patches.UnsupportedFaustVersion: faust-streaming 0.11.0 is installed, but demandstream's Faust patches (stream/worker/faust_patches.py) were tested on >=0.15.3,<0.16 only: install faust-streaming>=0.15.3,<0.16
    """
    if not TESTED_FROM <= _release(version) < TESTED_BELOW:
        tested = f">={'.'.join(map(str, TESTED_FROM))},<{'.'.join(map(str, TESTED_BELOW))}"
        raise UnsupportedFaustVersion(
            f"faust-streaming {version} is installed, but demandstream's Faust patches "
            f"(stream/worker/faust_patches.py) were tested on {tested} only: install faust-streaming{tested}"
        )


check_version(faust.__version__)


# -- fixes of Faust bugs that would corrupt or lose table state ------------------------------------


def install(app) -> None:
    """Apply every bug fix below to ``app`` (call once its consumer exists)."""
    fix_transactional_highwaters(app.consumer._thread)
    fix_stale_transactional_producers(app.consumer.transactions, app.producer)
    keep_changelog_queue_on_resume(app.tables.changelog_queue, app.flow_control)
    fetch_only_active_partitions(app.consumer)
    skip_existing_topics_when_refused(app.producer.transport)


def fix_transactional_highwaters(thread) -> None:
    """Ask the broker for a changelog's end under exactly-once, instead of the fetcher's cached LSO.

    Under exactly-once, faust-streaming 0.15 takes a changelog partition's highwater from
    ``AIOKafkaConsumer.last_stable_offset(tp)``, which aiokafka only knows after it has fetched that
    partition in the current assignment; before, it is ``None`` and Faust's recovery uses -1 ("empty").
    A live worker that is given a partition in a rebalance then either crashes with
    ``ConsistencyError: persisted offset ... is higher than ... highwater (N > -1)`` (its standby copy
    has a persisted offset; faust-streaming/faust#158) or, with no local offset, skips recovery and
    applies new events to stale state. Found by the rebalance fault test under exactly-once.

    ``end_offsets`` sends ListOffsets with the consumer's isolation level, so under ``read_committed``
    the broker answers with the last stable offset: the same number, never missing.
    """

    async def _highwaters(self, partitions):
        return await self._ensure_consumer().end_offsets(partitions)

    thread._highwaters = types.MethodType(_highwaters, thread)


def fix_stale_transactional_producers(transactions, producer) -> None:
    """On every rebalance, stop the transactional producers of partitions this worker no longer owns.

    Faust (faust-streaming 0.15, ``TransactionManager.on_rebalance``) stops the producers of revoked
    partitions only if the partition is not a *standby* of this worker, and with standby replicas a
    partition that moves away usually stays here as a standby. Its producer is kept, the new owner's
    producer fences it, and when the partition comes back Faust reuses the fenced one ("Invalid state
    transition IN_TRANSACTION -> IN_TRANSACTION" in the log): the first send raises ProducerFenced and
    the worker crashes. Found by the rebalance fault test under exactly-once.

    Before Faust starts the producers of the new assignment, every producer whose transactional id
    is not one of the assignment's active partitions is stopped, so a partition that comes back gets
    a fresh producer (whose initialisation fences and aborts whatever the last owner left open).
    """
    on_rebalance = transactions.on_rebalance

    async def stop_stale_then_rebalance(assigned, revoked, newly_assigned):
        active = transactions._tps_to_transactional_ids(assigned)
        stale = sorted(set(producer._transaction_producers) - active)
        if stale:
            logger.info(
                "stopping %d transactional producers of partitions no longer active here: %s",
                len(stale),
                ", ".join(stale),
            )
            for tid in stale:
                await producer.stop_transaction(tid)
        await on_rebalance(assigned, revoked, newly_assigned)

    transactions.on_rebalance = stop_stale_then_rebalance

    # Faust's "maybe" begin calls begin_transaction on producers that are already in one (those of the
    # partitions this worker keeps) and logs the refusal as a WARNING on every rebalance; skip them.
    maybe_begin = producer.maybe_begin_transaction

    async def begin_unless_open(transactional_id: str) -> None:
        txn = getattr(producer._transaction_producers.get(transactional_id), "_txn_manager", None)
        if txn is not None and txn.is_in_transaction():
            return
        await maybe_begin(transactional_id)

    producer.maybe_begin_transaction = begin_unless_open


def keep_changelog_queue_on_resume(queue, flow_control) -> None:
    """Empty the changelog queue when the flow is suspended (rebalance, stop), never when it resumes.

    Faust's changelog queue (``TableManager.changelog_queue``) is a ``FlowControlQueue`` made with
    ``clear_on_resume=True``, so every ``app.flow_control.resume()`` throws away what it holds. The
    recovery resumes the flow after it has resumed the standby partitions (faust-streaming 0.15,
    ``Recovery._restart_recovery``: "Starting standby partitions...", then ``on_recovery_completed``
    seeks the stream partitions and calls ``flow_control.resume()``). Standby changelog records the
    consumer delivered in between and the recovery had not taken yet are dropped, though the
    consumer's position is past them; the standby then applies the records after them, its persisted
    offset passes the gap, and no later recovery reads it again. When that standby is promoted (its
    active worker dies), a user whose last record was dropped gets an older state back: signals with
    the wrong ``events_seen``. Seen in the rebalance fault test under exactly-once, on the worker
    that is promoted after the SIGKILL (the logged queue held one standby record when the recovery
    that followed its rejoin resumed the flow); the drop does not depend on the guarantee.

    Faust also empties the queue with ``flow_control.clear()`` after suspending the flow, on every
    rebalance and on stop (``App._on_partitions_revoked``, ``App._stop_consumer``). That stays: the
    next recovery seeks every changelog partition back to the offsets it has counted, so whatever is
    dropped there is read again, and records of partitions that moved away must not be applied. A
    clear while the flow runs (the one ``resume`` does) is skipped: the queue was emptied when the
    flow was suspended, and nothing is delivered into it until the flow resumes.
    """
    clear = queue.clear

    def clear_unless_flowing() -> None:
        if not flow_control.is_active():
            clear()

    queue.clear = clear_unless_flowing


class ActivePartitions:
    """The consumer's live set of active partitions as aiokafka's fetch reads it: never false.

    aiokafka (``Fetcher.fetched_records``) skips a buffered partition only ``if partitions and tp not
    in partitions``: an empty set means "every partition". Membership is the live set's, so a
    partition paused while the fetch waits is still left out.
    """

    __slots__ = ("live",)

    def __init__(self, live) -> None:
        self.live = live

    def __contains__(self, tp) -> bool:
        return tp in self.live

    def __bool__(self) -> bool:
        return True

    def __iter__(self):
        return iter(list(self.live))

    def __len__(self) -> int:
        return len(self.live)


def fetch_only_active_partitions(consumer) -> None:
    """Never hand Faust's getmany records of partitions that are paused, even when none is active.

    Faust (faust-streaming 0.15, ``Consumer._wait_next_records``) passes the consumer thread its
    *live* set of active partitions, and aiokafka's ``Fetcher.fetched_records`` reads it on every pass
    of its wait (up to the 1-s timeout) but takes an *empty* set to mean "all partitions". A recovery
    empties the set for a moment: "Done reading from changelog topics" pauses the active changelog
    partitions, and the standby ones are resumed only after their seek and highwaters, the input
    partitions even later. A fetch begun before and woken in between returned every record aiokafka
    had buffered, of paused input and standby changelog partitions too; Faust's getmany drops records
    of partitions not active, and their positions had moved past them. Input records were then
    fetched from the later position once the input partitions resumed, before the seek to the
    committed offsets took effect, and read again after it: a user's newer events were applied first,
    its older ones skipped as already applied, with no signal (the rebalance fault test under
    exactly-once: lost events and wrong ``events_seen``); standby records dropped after the standby
    seek would leave a gap in the standby copy. Found with the chunked recovery loop, which ends a
    recovery while the drain loop's next fetch is in flight (3 failures in 4 runs of that test); the
    race is Faust's and was logged without the chunked loop too, harmless there only while the seek
    came first. Here the thread gets :class:`ActivePartitions`, the same live set but never false:
    records of paused partitions stay buffered in aiokafka, at their position, until their partition
    is active again.
    """
    getmany = consumer._getmany

    async def getmany_of_active_partitions(active_partitions, timeout):
        if active_partitions is not None:
            active_partitions = ActivePartitions(active_partitions)
        return await getmany(active_partitions=active_partitions, timeout=timeout)

    consumer._getmany = getmany_of_active_partitions


def skip_existing_topics_when_refused(transport) -> None:
    """A topic that exists is not an error when the broker refuses to create it for lack of rights.

    Faust creates its internal topics (the table's changelog) at every start and relies on the broker
    answering ``TOPIC_ALREADY_EXISTS`` for one that exists (``Transport._really_create_topic``; it
    skips the request only when its producer's metadata happens to list the topic). On a cluster with
    ACLs whose operators created the topics and did not grant the worker's principal ``CREATE``, the
    broker checks the right first and answers ``TOPIC_AUTHORIZATION_FAILED`` for an existing topic
    too, and the worker stopped at start with a traceback (tests/integration/test_security.py). On that
    error this asks the broker whether the topic exists (the principal may describe it) and, if so,
    goes on as Faust does for an existing topic; a topic that is missing keeps the error.
    """
    create = transport._really_create_topic

    async def really_create_topic(owner, client, topic, *args, **kwargs):
        try:
            return await create(owner, client, topic, *args, **kwargs)
        except TopicAuthorizationFailedError:
            metadata = await client.fetch_all_metadata()
            if topic not in metadata.topics():
                raise
            logger.info(
                "topic %s exists; this principal may not create topics, so it is used as it is", topic
            )

    transport._really_create_topic = really_create_topic


# -- latency ----------------------------------------------------------------------------------------


def tune_worker_consumer(thread, fetch_max_wait_ms: int) -> None:
    """The worker's consumer holds an empty fetch ``fetch_max_wait_ms``, not 1,500, and reads only
    committed records whatever the guarantee. faust-streaming 0.15 builds the worker's
    ``AIOKafkaConsumer`` with neither as a setting.

    *The fetch wait.* Faust passes ``fetch_max_wait_ms=1500``. aiokafka sends one fetch per broker at a
    time, for the assigned partitions that have no buffered records. Under load the input partitions'
    records are buffered while the pipeline steps them, so that fetch asks for the (empty) control
    topic alone and the broker holds it for the whole wait; the input partitions, emptied meanwhile,
    are fetched only after it returns. The worker then cycles at the wait's period, each fetch bringing
    1.5 s of input, and an event waits about that long even with a core to spare (docs/BENCHMARKS.md,
    2026-12-05 afternoon).

    *The isolation level.* Faust reads ``read_uncommitted`` unless the app runs exactly-once. A shop's
    clickstream written by a transactional producer (a Flink or Kafka Streams job with exactly-once
    sinks) then has the records of its aborted transactions applied as events: a Flink job aborts what
    it wrote since its last checkpoint on every restart and writes it again, so those events would be
    applied twice (tests/integration/test_transactional_input.py). On a topic no transactional producer
    writes, the last stable offset is the high watermark and nothing changes; the at-least-once
    changelog is such a topic.

    The consumer is built when the consumer thread starts, so this wraps the builder and sets the two
    values aiokafka hands its fetcher in ``start()``.
    """
    create = thread._create_worker_consumer

    def create_worker_consumer(transport):
        consumer = create(transport)
        for attr in ("_fetch_max_wait_ms", "_isolation_level"):
            if not hasattr(consumer, attr):  # an aiokafka this was not written for
                raise RuntimeError(f"aiokafka's AIOKafkaConsumer has no {attr}: review tune_worker_consumer")
        consumer._fetch_max_wait_ms = fetch_max_wait_ms
        consumer._isolation_level = "read_committed"
        return consumer

    thread._create_worker_consumer = create_worker_consumer


# -- the batch commit protocol's hooks into Faust ---------------------------------------------------


def guard_commits(consumer, lock: asyncio.Lock) -> None:
    """Exactly-once: let an offset commit happen only between two micro-batches, never inside one.

    Faust commits a partition's transaction from a timer (and on rebalance and shutdown) while the
    agent may be half-way through a batch: the transaction would then carry some of the batch's
    signals or changelog records but not its offsets, and after a crash the batch is processed again
    on top of them, which read_committed consumers see as duplicate signals. Faust's own per-producer
    lock covers one send, not a batch. So every commit (``Consumer.commit``) takes the lock that
    :meth:`demandstream.stream.worker.agents.Pipeline.handle_messages` holds from the first output of a chunk to its last
    ack; the staged states applied by :meth:`demandstream.stream.worker.agents.Pipeline.on_commit` are then exactly those
    of the committed transaction.
    """
    commit = consumer.commit

    async def guarded_commit(*args, **kwargs):
        async with lock:
            return await commit(*args, **kwargs)

    consumer.commit = guarded_commit


def commit_transactions_together(producer) -> None:
    """Exactly-once: commit the source partitions' transactions concurrently, not one after another.

    Faust (faust-streaming 0.15, ``Producer.commit_transactions`` of its aiokafka driver) commits each
    owned partition's transaction in turn: the offsets into it (AddOffsetsToTxn, TxnOffsetCommit), then
    EndTxn, each a round trip to the transaction coordinator, so a worker owning N partitions waits
    about 3·N round trips per commit, while :func:`guard_commits` holds the micro-batch lock and every
    signal of those transactions waits to become visible. The transactions belong to independent
    producers (one transactional id per partition), so they are committed together; each one's steps
    keep their order and Faust's per-id lock. A failure (a fenced producer) is raised once every other
    transaction has finished its commit, as the first error after the others; Faust's caller handles it
    as before (``Consumer.commit`` crashes the app on ``ProducerFenced``).
    """

    async def commit_one(transactional_id, offsets, group_id, start_new_transaction):
        # Faust's loop body for one transactional id (drivers/aiokafka.py), less its debug logs
        async with producer._trn_locks[transactional_id]:
            transaction_producer = producer._transaction_producers.get(transactional_id)
            if transaction_producer is None:
                logger.warning("Commit invoked for unknown transaction %s", transactional_id)
                return
            await transaction_producer.send_offsets_to_transaction(offsets, group_id)
            await transaction_producer.commit_transaction()
            if start_new_transaction:
                await transaction_producer.begin_transaction()

    async def commit_transactions(tid_to_offset_map, group_id, start_new_transaction=True):
        results = await asyncio.gather(
            *(
                commit_one(tid, offsets, group_id, start_new_transaction)
                for tid, offsets in tid_to_offset_map.items()
            ),
            return_exceptions=True,
        )
        errors = [r for r in results if isinstance(r, BaseException)]
        for other in errors[1:]:  # one is raised; the others are not lost
            logger.warning("another transaction failed to commit in the same round: %r", other)
        if errors:
            raise errors[0]

    producer.commit_transactions = commit_transactions


def on_transaction_abandoned(producer, callback: Callable[[str], None]) -> None:
    """Call ``callback(transactional_id)`` whenever a partition's transactional producer is stopped.

    On a rebalance Faust forgets the acked but uncommitted offsets of every partition (the eager
    protocol revokes them all, ``Consumer.on_partitions_revoked``), and the producer of a partition
    that is no longer active here is stopped (``Producer.stop_transaction``, called by
    ``TransactionManager.on_rebalance`` and by :func:`fix_stale_transactional_producers`). The
    transaction it had open is abandoned: it is never committed here, and the next owner's producer
    aborts it and processes its events again from the last committed offset. Whatever this worker
    kept on account of that transaction (the pipeline's staged states) must go at the same moment,
    or the partition, if it comes back before anything else clears it, is read against states that
    Kafka never committed. ``callback`` runs before the producer is stopped.
    """
    stop_transaction = producer.stop_transaction

    async def tell_then_stop(transactional_id: str) -> None:
        callback(transactional_id)
        await stop_transaction(transactional_id)

    producer.stop_transaction = tell_then_stop


def chain_table_commit(app, callback: Callable[[object], None]) -> None:
    """Call ``callback(offsets)`` after Faust's own ``app.tables.on_commit`` on every offset commit.

    Faust tells its tables, and nobody else, that offsets (and, exactly-once, their transactions) were
    committed; the pipeline needs the same news to move its staged states into the local store.
    """
    tables_on_commit = app.tables.on_commit

    def on_commit(offsets) -> None:
        tables_on_commit(offsets)
        callback(offsets)

    app.tables.on_commit = on_commit


# -- batch delivery: the input path of the worker ----------------------------------------------------

BatchHandler = Callable[[list], Awaitable[None]]


class RecoveryTail:
    """Exactly-once: end a table recovery once the consumer is past every changelog's end.

    Under exactly-once a changelog partition ends with a transaction marker, which a ``read_committed``
    consumer never delivers, so the recovery's last applied offset stays below its target (the end
    offset minus one) for good. Faust (faust-streaming 0.15, ``Recovery._slurp_changelogs``) notices
    only after two consecutive 5-second waits on an empty changelog queue, then compares the
    consumer's position with the target: every restart and every rebalance of an exactly-once worker
    idles about 10 s before it processes an event (issue #14 item 6).

    This check runs in the consumer's drain loop after each fetch round (at least once a second,
    ``getmany(timeout=1.0)``). By then every record of the round has been handed to the recovery's
    queue, because the drain loop awaits each changelog record's delivery. A partition is at its end
    when the consumer's position is *past* the target, so every offset below the end offset, data or
    marker, was fetched (Faust's own test, ``position >= target``, would also pass one record short),
    and the queue is empty, so the recovery has counted every record it was given. Only when that
    holds on two consecutive rounds, with nothing new counted in between, are the partitions marked
    recovered and the recovery ended, exactly as Faust's idle path does. Anything short of that
    leaves Faust's own path in charge, so the worst case is today's 10 s.

    Both rounds must see the same recovery reading: the flow running and no rebalance pending
    (``Consumer.flow_active``, ``Recovery.signal_recovery_start``), and the same start
    (``Recovery._recovery_started_at``, set again by each recovery just before it resumes the flow).
    ``in_recovery`` alone does not say that: a rebalance stops the flow without ending the recovery,
    and the next one sets it before it has built its highwaters and offsets. A confirmation begun
    before a rebalance and completed during it ended a recovery that was already abandoned, and left
    ``signal_recovery_end`` set, so the next recovery returned from its wait at once and read none of
    its changelog (partitions that moved here kept their standby's lag).

    With the chunked recovery loop (:class:`ChunkedSlurp`), events it has taken from the queue but not
    yet counted (``slurp.in_hand``) count as queued.
    """

    def __init__(self, app, slurp: ChunkedSlurp | None = None) -> None:
        self.app = app
        self.slurp = slurp
        # (recovery start, offsets) at the previous round's "at the end" verdict
        self._seen: tuple | None = None

    def _queue_empty(self) -> bool:
        # events the recovery has taken from its queue but not yet counted are still queued here
        in_hand = self.slurp.in_hand if self.slurp is not None else 0
        return self.app.tables.changelog_queue.empty() and not in_hand

    async def check(self) -> None:
        """One drain round's check; a no-op unless an exactly-once recovery is in progress."""
        app = self.app
        recovery = app.tables.recovery
        if not (app.in_transaction and recovery.in_recovery and self._reading()):
            self._seen = None
            return
        offsets, highwaters = recovery.active_offsets, recovery.active_highwaters
        behind = {
            tp: hw
            for tp, hw in highwaters.items()
            if hw is not None and offsets.get(tp) is not None and offsets[tp] < hw
        }
        at_end = bool(behind) and self._queue_empty()
        for tp, hw in behind.items() if at_end else ():
            position = await app.consumer.position(tp)
            if position is None or position <= hw:
                at_end = False
                break
        if not at_end:
            self._seen = None
            return
        snapshot = (recovery._recovery_started_at, {tp: offsets[tp] for tp in behind})
        if self._seen != snapshot:
            self._seen = snapshot  # first round at the end: confirm on the next one
            return
        if not (recovery.in_recovery and self._reading() and self._queue_empty()):
            self._seen = None
            return
        logger.info("changelog recovery at the end of %d partitions (transaction markers last)", len(behind))
        for tp, hw in behind.items():
            offsets[tp] = hw
        if not recovery.need_recovery():
            # what Faust's _maybe_signal_recovery_end does once nothing remains
            recovery.flush_buffers()
            recovery._set_recovery_ended()
            recovery.signal_recovery_end.set()
        self._seen = None

    def _reading(self) -> bool:
        """The recovery is reading its changelogs: flow resumed, no rebalance waiting to restart it."""
        return self.app.consumer.flow_active and not self.app.tables.recovery.signal_recovery_start.is_set()


def install_batch_delivery(app, input_topics, handler: BatchHandler) -> None:
    """Make ``app``'s consumer deliver the records of ``input_topics`` (a name or several: the input and
    control topics) to ``handler`` in fetch-sized lists, in the order the fetch returned them.

    This is how every input record reaches the pipeline. Faust hands every record to its streams one by
    one: its drain loop awaits ``wait_first(callback(message), suspend_flow.wait())`` per record (two
    tasks and an ``asyncio.wait`` each), then the conductor builds an Event, queues it, and the stream
    dequeues it. That path tops out around 2-3k records/s, an order of magnitude below the Kafka client
    (docs/BENCHMARKS.md). Our work is batched anyway, so the consumer's drain loop
    (``Consumer._drain_messages``) is replaced by a copy of Faust's that collects each fetch's records
    of the *input topic* and gives them to ``handler`` as one list. Everything else is Faust's as
    before: records of other topics (table changelogs during recovery and standby) go to Faust's
    consumer callback one by one, in fetch order, though under one ``wait_first`` per fetch round
    rather than one per record (:func:`deliver`: a rebalance or stop interrupts the round's rest, as
    it makes Faust's drop each remaining record), and the recovery takes them from its queue in
    chunks (:func:`install_chunked_recovery`). Input records are tracked and acked exactly as a Faust
    stream does (``_unacked_messages``, ``Consumer.ack``), so offset commits, ``wait_empty`` on
    rebalance and graceful shutdown keep working. No input record reaches a Faust stream or agent body.
    """
    consumer = app.consumer
    topics = frozenset([input_topics] if isinstance(input_topics, str) else input_topics)
    slurp = install_chunked_recovery(app.tables.recovery)
    tail = RecoveryTail(app, slurp)
    consumer._drain_messages = types.MethodType(_make_drain(topics, handler, tail), consumer)


async def deliver(callback, messages: list) -> None:
    """Hand ``messages`` to Faust's consumer callback one after the other, in order.

    One task for a fetch round's changelog records instead of Faust's four per record
    (``Service.wait_first``, plus an ``asyncio.wait``): those were about a sixth of a worker's restore
    time (docs/OPERATIONS.md §4 "How long recovery takes"). The caller runs it under
    ``wait_first(..., suspend_flow.wait())`` as Faust does each record: a rebalance or stop cancels it,
    and the records not yet queued are dropped, as Faust's ``flow_control.clear()`` drops those queued
    (the next recovery seeks every changelog partition back to what it has counted).
    """
    for message in messages:
        await callback(message)


#: Most changelog events the recovery takes from its queue per wake-up. A chunk is applied without a
#: pause (some 15 µs an event on the 2-core reference machine), so this bounds how long it holds the
#: event loop to tens of ms; it equals Faust's default ``recovery_buffer_size``.
RECOVERY_CHUNK_MAX = 1000


class ChunkedSlurp:
    """The recovery's changelog loop (``Recovery._slurp_changelogs``), taking what is queued in chunks.

    Faust (faust-streaming 0.15) takes each changelog event with its own
    ``asyncio.wait_for(queue.get(), 5.0)`` (a task, a future and a timer per event) and after each one
    recomputes every partition's remaining records to see whether the recovery has ended. That loop
    was close to a third of a worker's restore time (docs/OPERATIONS.md §4 "How long recovery takes").
    This copy waits for the first event exactly as Faust does, then also takes every event already
    queued, up to :data:`RECOVERY_CHUNK_MAX`, applies each one exactly as Faust's loop body does (same
    offsets, buffers, flushes at ``recovery_buffer_size``, same per-event error handling), and checks
    for the end once per chunk. Events, their order and what reaches the store are unchanged; only
    the end check comes after the chunk instead of after its every event.

    Two departures from Faust's body, both for events Faust itself could not place:

    - an event of a partition that is neither active nor standby here is skipped (Faust logs it and
      then applies it to the table, offsets and buffer size of the *previous* event);
    - if the flow is suspended or the consumer's generation changes while a chunk is being applied
      (a rebalance or a stop; only possible if a table's ``on_changelog_event`` really awaits, which
      no demandstream table does), the rest of the chunk is dropped uncounted: had those events still
      been queued, ``flow_control.clear()`` would have dropped them, and the next recovery seeks every
      changelog partition back to the offsets counted.

    ``in_hand`` counts events taken from the queue and not yet counted in the recovery's offsets:
    :class:`RecoveryTail` treats them as still queued.
    """

    def __init__(self) -> None:
        self.in_hand = 0

    async def __call__(self, recovery) -> None:
        await _slurp_changelogs_chunked(recovery, self)


async def _slurp_changelogs_chunked(self, chunked: ChunkedSlurp) -> None:  # self: Faust's Recovery
    # Mirrors faust.tables.recovery.Recovery._slurp_changelogs (faust-streaming 0.15.3) except for the
    # chunk, the two departures of ChunkedSlurp's docstring and the per-event debug logs; keep the two
    # in step when upgrading Faust.
    changelog_queue = self.tables.changelog_queue
    tp_to_table = self.tp_to_table
    app = self.app
    flow_is_active = app.flow_control.is_active

    active_tps = self.active_tps
    standby_tps = self.standby_tps
    active_offsets = self.active_offsets
    standby_offsets = self.standby_offsets
    active_events_received_at = self._active_events_received_at
    standby_events_received_at = self._standby_events_received_at

    buffers = self.buffers
    buffer_sizes = self.buffer_sizes
    processing_times = self._processing_times

    async def _maybe_signal_recovery_end(timeout: bool = False, timeout_count: int = 0) -> None:
        # Faust waits for two consecutive idle polls before it looks for aborted transactions
        if timeout and app.in_transaction and timeout_count > 1:
            await detect_aborted_tx()
        if self.in_recovery and not self.need_recovery():
            self.flush_buffers()
            self._set_recovery_ended()
            if self._actives_span is not None:
                self._actives_span.set_tag("Actives-Ready", True)
            logger.debug("Setting recovery end")
            self.signal_recovery_end.set()

    async def detect_aborted_tx() -> None:
        highwaters = self.active_highwaters
        offsets = self.active_offsets
        for tp, highwater in highwaters.items():
            if highwater is not None and offsets[tp] is not None and offsets[tp] < highwater:
                # a position of None raises TypeError, logged below, exactly as in Faust
                if await app.consumer.position(tp) >= highwater:
                    logger.info(f"Aborted tx until highwater for {tp}")
                    offsets[tp] = highwater

    timeout_count = 0
    while not self.should_stop:
        try:
            self.signal_recovery_end.clear()
            try:
                event = await asyncio.wait_for(changelog_queue.get(), timeout=5.0)
            except TimeoutError:
                timeout_count += 1
                if self.should_stop:
                    return
                await _maybe_signal_recovery_end(timeout=True, timeout_count=timeout_count)
                continue
            timeout_count = 0
            generation = app.consumer_generation_id
            chunk = [event]
            error = None
            while len(chunk) < RECOVERY_CHUNK_MAX and changelog_queue.qsize():
                try:
                    chunk.append(changelog_queue.get_nowait())
                except Exception as exc:  # an error thrown into the queue: Faust's get raises it
                    error = exc
                    break
            chunked.in_hand = len(chunk)
            for event in chunk:
                if not flow_is_active() or app.consumer_generation_id != generation:
                    logger.info(
                        "rebalance or stop during a changelog chunk: %d events dropped uncounted",
                        chunked.in_hand,
                    )
                    break
                chunked.in_hand -= 1
                try:
                    now = monotonic()
                    message = event.message
                    tp = message.tp
                    offset = message.offset
                    bufsize = buffer_sizes.get(tp)
                    is_active = False
                    if tp in active_tps:
                        is_active = True
                        table = tp_to_table[tp]
                        offsets = active_offsets
                        if bufsize is None:
                            bufsize = buffer_sizes[tp] = table.recovery_buffer_size
                        active_events_received_at[tp] = now
                    elif tp in standby_tps:
                        table = tp_to_table[tp]
                        offsets = standby_offsets
                        if bufsize is None:
                            bufsize = buffer_sizes[tp] = table.standby_buffer_size
                            standby_events_received_at[tp] = now
                    else:
                        logger.warning(f"recovery unknown topic {tp} offset {offset}: skipped")
                        continue
                    seen_offset = offsets.get(tp, None)
                    if seen_offset is None or offset > seen_offset:
                        offsets[tp] = offset
                        buf = buffers[table]
                        buf.append(event)
                        await table.on_changelog_event(event)
                        if len(buf) >= bufsize:
                            table.apply_changelog_batch(buf)
                            buf.clear()
                            self._last_flush_at = now
                        now_after = monotonic()
                        if is_active:
                            last_processed_at = self._last_active_event_processed_at
                            if last_processed_at is not None:
                                processing_times.append(now_after - last_processed_at)
                                if len(processing_times) > self.num_samples_required_for_estimate:
                                    processing_times.popleft()
                            self._last_active_event_processed_at = now_after
                except Exception as ex:
                    logger.warning(f"Error in recovery {ex}")
            chunked.in_hand = 0

            await _maybe_signal_recovery_end()

            standby_ready = self._standbys_span is None and self.tables.standbys_ready
            if not standby_ready and not self.standby_remaining_total():
                logger.debug("Completed standby partition fetch")
                if self._standbys_span:
                    finish_span(self._standbys_span)
                    self._standbys_span = None
                self.tables.on_standbys_ready()
            if error is not None:
                raise error
        except Exception as ex:
            logger.warning(f"Error in recovery {ex}")


def install_chunked_recovery(recovery) -> ChunkedSlurp:
    """Run ``recovery``'s changelog loop as :class:`ChunkedSlurp` (call before the recovery starts)."""
    slurp = ChunkedSlurp()
    # Service tasks are looked up by attribute name when the service starts (mode's
    # Service._get_tasks): an instance attribute of the same name replaces the class's task.
    recovery._slurp_changelogs = ServiceTask(slurp)
    return slurp


def _make_drain(input_topics: frozenset[str], handler: BatchHandler, recovery_tail: RecoveryTail):
    async def _drain_messages(self, fetcher) -> None:  # bound to faust's Consumer
        # Mirrors faust.transport.consumer.Consumer._drain_messages (faust-streaming 0.15) except
        # for the batch path; keep the two in step when upgrading Faust.
        callback = self.callback
        getmany = self.getmany
        consumer_should_stop = self._stopped.is_set
        fetcher_should_stop = fetcher._stopped.is_set
        get_read_offset = self._read_offset.__getitem__
        set_read_offset = self._read_offset.__setitem__
        app = self.app
        add_unacked = self._unacked_messages.add
        on_message_in = self._on_message_in
        acks_enabled_for = app.topics.acks_enabled_for
        commit_every = self._commit_every
        try:
            while not (consumer_should_stop() or fetcher_should_stop()):
                self.diag.set_flag(CONSUMER_FETCHING)
                ait = getmany(timeout=1.0)
                await asyncio.sleep(0)
                batch = []
                others = []  # records of other topics: changelogs (recovery, standbys)
                if not self.should_stop:
                    async for tp, message in ait:
                        offset = message.offset
                        r_offset = get_read_offset(tp)
                        if r_offset is not None and offset < r_offset:
                            continue  # already delivered (a seek back re-fetched it)
                        if r_offset and offset - r_offset > 1 and acks_enabled_for(message.topic):
                            # offsets skipped by the log (transaction markers, compaction) must
                            # count as acked, or the committed offset could never pass them
                            await self._add_gap(tp, r_offset + 1, offset)
                        if commit_every is not None and self._n_acked >= commit_every:
                            self._n_acked = 0
                            await self.commit()
                        if tp.topic in input_topics:
                            batch.append(message)
                        else:
                            others.append(message)
                        set_read_offset(tp, offset)
                self.diag.unset_flag(CONSUMER_FETCHING)
                if others:
                    await self.wait_first(deliver(callback, others), self.suspend_flow.wait())
                await recovery_tail.check()
                if batch:
                    # A rebalance while these were in flight makes them stale: their partitions may
                    # be someone else's now. Dropping them untracked is what Faust's streams do.
                    generation = app.consumer_generation_id
                    batch = [m for m in batch if m.generation_id == generation]
                    for m in batch:
                        m.tracked = True
                        add_unacked(m)
                        on_message_in(m.tp, m.offset, m)
                    if batch:
                        await handler(batch)
        except self.consumer_stopped_errors:
            if app.should_stop:
                logger.info("broker stopped consumer, shutting down")
                return
            raise
        except asyncio.CancelledError:
            if app.should_stop:
                return
            raise
        except Exception as exc:
            logger.exception("batch delivery crashed: %r", exc)
            raise

    return _drain_messages
