"""The clickstream pipeline: micro-batches in, signals out, state written, in a crash-safe order.

How records arrive: the worker's consumer hands each fetch's input records, as one list, to
:meth:`Pipeline.handle_messages` (batch delivery, :func:`demandstream.stream.worker.faust_patches.install_batch_delivery`,
which replaces Faust's per-record drain loop). The Faust agent declared in :func:`attach` only
subscribes the input topic and co-partitions it with the table; no record reaches its stream.
:meth:`Pipeline.handle_messages` cuts the list into chunks of at most ``batch_max`` records and runs
the batch commit protocol (docs/ARCHITECTURE.md §Protocol) on each, under :attr:`Pipeline.batch_lock`:

Step 1. Compute: validate, group, read states, step the model (:class:`~demandstream.stream.engine.inference.InferenceEngine`).
Step 2. Produce signals and dead letters to their topics, in the source partition.
Step 3. ``at_least_once``: wait until the broker acknowledged every one of them (the batch futures).
        ``exactly_once``: they join the source partition's open transaction instead.
Step 4. Write the new user states, each carrying the offset of the last event it applied:
        ``at_least_once``: to the changelog, wait for its acks, then to the local store (which so
        never runs ahead of Kafka); ``exactly_once``: to the changelog inside the transaction, and to
        the local store once Faust has committed that transaction.
Step 5. Ack the batch's records; Faust commits their offsets later (exactly-once: with the
        transaction, never while a batch is between steps 2 and 5, see
        :func:`demandstream.stream.worker.faust_patches.guard_commits`; a shutdown lets a started batch finish first),
        which also applies the staged states of step 4.

Crash between 3 and 4: events are redelivered, the old state re-applies them (duplicate signals,
allowed by at-least-once). Crash after the changelog acks but before the local write: recovery
replays the changelog past the persisted offset, then redelivered events are skipped. Crash after 4:
redelivered events are at or below the stored offset and are skipped. Exactly-once: a crash aborts
the open transactions; nothing of them is visible or local, and the events are processed again.
Either way every event is applied to its user's state exactly once.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import time
from typing import Any

import numpy as np
from faust.exceptions import ProducerSendError

from demandstream.model.core.scoring import Scorer
from demandstream.model.core.state import StateFormatError, peek_last_ts
from demandstream.stream.admin import changelog_topic
from demandstream.stream.engine.inference import InferenceEngine, Output
from demandstream.stream.engine.records import STATE_KEY_PREFIX
from demandstream.stream.worker import faust_patches
from demandstream.stream.worker.app import Components
from demandstream.stream.worker.demand import DemandStage
from demandstream.stream.worker.metrics import observe_many
from demandstream.stream.worker.partitioning import PartitionerCheck, refuse_new_partitions
from demandstream.stream.worker.quality import LiveQuality
from demandstream.stream.worker.store import StateStore

#: TTL expiry examines at most this many stored states of each partition per micro-batch: a full pass
#: over a partition of N users takes N / 2000 batches, and a batch never waits on a long scan.
TTL_SCAN_PER_BATCH = 2000
#: Exit status of a worker ended by a failpoint (:meth:`Pipeline.failpoint`), distinct from a crash's.
FAULT_EXIT_STATUS = 70

logger = logging.getLogger(__name__)


class Pipeline:
    #: live model quality (stream/worker/quality.py); set by ``build_worker``, which knows the model
    quality: LiveQuality | None = None

    def __init__(self, c: Components, scorer: Scorer):
        self.c = c
        self.settings = c.settings
        s = c.settings
        self.engine = InferenceEngine.from_settings(scorer, s)
        self.store = StateStore(c.table)
        #: category demand (docs/ARCHITECTURE.md §Category demand): partial aggregates ride the protocol
        self.demand = DemandStage(s, scorer.category_name) if s.demand_window_s else None
        self.metrics = c.metrics
        #: producers that partition keys otherwise than DEMANDSTREAM_PARTITIONER says (stream/worker/partitioning.py)
        self.partitioner = PartitionerCheck(s.topic_input, s.partitions, s.partitioner)
        self.exactly_once = c.settings.guarantee == "exactly_once"
        self.last_offset: dict[int, int] = {}  # partition -> last consumed offset, for lag
        self.watermark: dict[int, float] = {}  # partition -> newest event time seen (TTL expiry)
        self.batches = 0
        #: Held while a chunk is processed and acked, and (exactly-once) by every offset commit: see
        #: :func:`demandstream.stream.worker.faust_patches.guard_commits`.
        self.batch_lock = asyncio.Lock()

    async def handle_messages(self, messages: list) -> None:
        """Every input record arrives here, a fetch at a time (batch delivery): process it in chunks of
        ``batch_max`` (steps 1-4), then ack each chunk's records (step 5).

        A chunk, once started, runs to its last ack even if this task is cancelled: a graceful
        shutdown stops the fetcher (cancelling this task) and then commits what was acked, and under
        exactly-once that commit takes the source partitions' transactions with it. Cancelled half-way
        through producing, a chunk left some of its signals (and states) in the transaction without
        its offsets, so the next owner processed those events again and read_committed consumers saw
        their signals twice (found by the rebalance fault test: 254 duplicates after the SIGTERM).
        The cancellation takes effect after the chunk; the chunks after it are not started.
        """
        step = self.settings.batch_max
        for i in range(0, len(messages), step):
            await run_to_end(self._chunk(messages[i : i + step]))

    async def _chunk(self, chunk: list) -> None:
        ack = self.c.app.consumer.ack
        async with self.batch_lock:
            await self.process(chunk)
            for m in chunk:  # Step 5
                ack(m)

    async def process(self, records: list) -> None:
        """Steps 1-4 for one micro-batch of Faust messages (key, value, partition, offset, timestamp)."""
        m = self.metrics
        input_topic = self.settings.topic_input
        last: dict[int, Any] = {}  # partition -> its last input record in the batch
        for r in records:
            if r.topic == input_topic:  # lag is measured on the input topic only
                last[r.partition] = r
        for partition, r in last.items():
            self.last_offset[partition] = r.offset
        # Each phase's duration, observed once the batch is durable: the p99 of event_to_signal_seconds is
        # made of batches where one of them ran long (docs/BENCHMARKS.md, "what sets the latency p99").
        phases = []
        t0 = time.perf_counter()
        # Step 1
        res = self.engine.process(records, self.store.read)
        # closed demand windows for their topic; the partial aggregates join res.states, ahead of the users
        demand = self.demand.process(res, self.store.read) if self.demand else []
        expired = self.expire_slice(res) if self.settings.state_ttl_s > 0 else {}
        res.states.update(expired)  # deletions ride on the batch's own acknowledged/transactional writes
        t1 = time.perf_counter()
        phases.append(("engine", t1 - t0))
        if self.exactly_once:
            await self.produce_transactional(res, demand)
            phases.append(("transaction", time.perf_counter() - t1))
        else:
            # Step 2 and 3: signals and dead letters acknowledged by the broker
            outputs = [
                (self.settings.topic_signals, res.signals),
                (self.settings.topic_dlq, res.dead_letters),
                (self.settings.topic_demand, demand),  # acked before the aggregate that drops their windows
            ]
            await self.produce_acked(outputs)
            t2 = time.perf_counter()
            self.failpoint("after_signals")
            # Step 4: the new states, durable in the changelog first, then in the local store
            changelog = [Output(k, v, p) for k, (p, v) in res.states.items()]
            offsets = await self.produce_acked([(self.store.changelog_topic, changelog)])
            t3 = time.perf_counter()
            self.store.write_local(res.states)
            self.store.set_persisted_offsets(offsets)
            phases += [("signals", t2 - t1), ("changelog", t3 - t2), ("store", time.perf_counter() - t3)]
            self.failpoint("after_state")
        # metrics after the fact: they count what was made durable
        now = time.time()
        for phase, seconds in phases:
            m.batch_phase_seconds.labels(phase).observe(seconds)
        m.batch_size.observe(len(records))
        m.events.labels("valid").inc(res.valid - res.duplicates)
        m.events.labels("duplicate").inc(res.duplicates)
        m.events.labels("invalid").inc(len(res.dead_letters))
        m.signals.inc(len(res.signals))
        if expired:
            m.expired_states.inc(len(expired))
        if res.undecodable:
            m.undecodable_states.inc(res.undecodable)
        misrouted = self.partitioner.check(last.values())  # one record per partition, not a second pass
        if misrouted:
            m.misrouted_records.inc(misrouted)
        for reason, n in res.reasons.items():
            m.dead_letters.labels(reason).inc(n)
        for s in res.inference_s:
            m.inference_seconds.observe(s)
        # seconds, never ms (cf. faust-streaming/faust#693)
        observe_many(m.event_to_signal_seconds, np.maximum(0.0, now - np.asarray(res.signal_ts, np.float64)))
        if self.quality is not None:  # live model quality (stream/worker/quality.py), once durable too
            self.quality.observe(res.applied)
        self.batches += 1

    async def produce_acked(self, outputs: list[tuple[str, list[Output]]]) -> dict[int, int]:
        """Produce records in per-partition batches; return once the broker acked all of them.

        Uses the Kafka client's batch API (one append per record, one request per partition batch)
        instead of Faust's per-message futures; the futures resolve on the broker's acknowledgement
        (acks=all). Returns, for the last topic given, the last offset written per partition.
        """
        producer = self.c.app.producer._ensure_producer()
        pending = []
        for topic, records in outputs:
            for p, outs in _by_partition(records).items():
                pending += await _send_batches(producer, topic, p, outs)
        metas = await asyncio.gather(*(f for _t, _n, f in pending)) if pending else []
        return _last_offsets(pending, metas, outputs[-1][0]) if outputs else {}

    async def produce_transactional(self, res, demand: list[Output] = ()) -> None:
        """Exactly-once: every output of a source partition joins that partition's open transaction.

        Faust keeps one transactional producer per assigned source partition and commits its
        transaction together with the consumed offsets. Its own topic routing would pick the
        producer by the *destination* topic's partition group, which the signal and dead-letter
        topics are not part of, so we name the source partition's transactional id ourselves. The
        new states are staged and reach the local store only when that transaction commits
        (:meth:`StateStore.on_commit`), so a crash never leaves uncommitted state behind.
        """
        prefix = self._transactional_prefix()
        changelog = [Output(k, v, p) for k, (p, v) in res.states.items()]
        pending = []
        for topic, records in (
            (self.settings.topic_signals, res.signals),
            (self.settings.topic_dlq, res.dead_letters),
            (self.settings.topic_demand, demand),
            (self.store.changelog_topic, changelog),
        ):
            pending += await self._send_in_transactions(prefix, topic, records)
            if topic == self.settings.topic_signals:
                self.failpoint("mid_transaction")  # signals in the open transaction, states not yet
        # surface send errors now (visibility waits for the commit); the changelog records, sent last,
        # tell the offsets that become the persisted changelog offsets once the transaction commits
        metas = await asyncio.gather(*(f for _t, _n, f in pending)) if pending else []
        offsets = _last_offsets(pending, metas, self.store.changelog_topic)
        self.store.stage(res.states, offsets)
        self.failpoint("after_state")  # everything in the open transaction, nothing committed

    async def _send_in_transactions(self, prefix: str, topic: str, records: list[Output]) -> list:
        """Send ``records`` to ``topic``, those of source partition ``p`` through ``p``'s transactional
        producer in closed batches (the batch API, as :meth:`produce_acked`): Faust's ``send`` takes
        that producer's lock and awaits the client once per record, which cost exactly-once a third
        of the worker's throughput (docs/BENCHMARKS.md). Returns ``(topic, records, future)`` per batch.
        """
        transport = self.c.app.producer
        pending = []
        for p, outs in _by_partition(records).items():
            tid = f"{prefix}-{p}"
            producer = transport._transaction_producers.get(tid)
            if producer is None:  # as Faust's own send: the partition is no longer ours
                raise ProducerSendError(f"No transaction producer found for : {tid}")
            async with transport._trn_locks[tid]:
                pending += await _send_batches(producer, topic, p, outs)
        return pending

    def failpoint(self, step: str) -> None:
        """Fault tests only: end the process at ``step`` of the batch protocol, as a SIGKILL there would
        (``DEMANDSTREAM_FAULT_AT``, once ``DEMANDSTREAM_FAULT_AFTER_BATCHES`` batches have completed)."""
        s = self.settings
        if s.fault_at == step and self.batches >= s.fault_after_batches:
            logger.error("fault injection: exiting at %s of batch %d", step, self.batches + 1)
            logging.shutdown()
            os._exit(FAULT_EXIT_STATUS)

    def _transactional_prefix(self) -> str:
        """Faust's transactional id of source partition ``p`` is this prefix, ``-``, ``p``."""
        app = self.c.app
        return f"{app.conf.id}-{app.assignor.group_for_topic(self.settings.topic_input)}"

    def on_transaction_abandoned(self, transactional_id: str) -> None:
        """Exactly-once: the transactional producer of a source partition is being stopped (rebalance).

        Its open transaction will never commit here: the partition's next owner aborts it and
        processes its events again from the last committed offset. The states staged for it are
        forgotten now. Kept, they would outlive the transaction: a partition that comes back to this
        worker before anything else cleared them was read against them, so its redelivered events
        were skipped as already applied (no signal anywhere, the state only in this worker's local
        store) or its next events were applied on a state older than the one the other worker
        committed. Found by the rebalance fault test under exactly-once (intermittent: it takes a
        partition that leaves and comes back with no micro-batch run here in between).
        """
        prefix, _, partition = transactional_id.rpartition("-")
        if prefix != self._transactional_prefix() or not partition.isdigit():
            return  # another topic group's producer (Faust's leader topic): nothing staged for it
        n = self.store.discard_staged({int(partition)})
        if n:
            logger.info(
                "transaction of partition %s abandoned on rebalance: dropping its %d staged states",
                partition,
                n,
            )

    def on_commit(self, offsets) -> None:
        """Faust committed these source offsets (and, exactly-once, their transactions)."""
        if not self.exactly_once:
            return
        sources = (self.settings.topic_input, self.settings.topic_control)
        partitions = {tp.partition for tp in offsets if tp.topic in sources}
        if self.c.app.crashed:
            # Faust reports a commit that failed on a fenced producer as done (and crashes the app):
            # that transaction was aborted, so its states must not reach the local store.
            logger.warning(
                "transaction of partitions %s not committed (app crashed): dropping its states",
                sorted(partitions),
            )
            self.store.discard_staged(partitions)
            return
        self.store.on_commit(partitions)

    def update_gauges(self) -> None:
        """Consumer lag per partition and users in state (called by a timer)."""
        app = self.c.app
        consumer = app.consumer
        topic = self.settings.topic_input
        for tp in consumer.assignment():
            if tp.topic != topic:
                continue
            hw = consumer.highwater(tp)
            if hw is None:
                continue
            last = self.last_offset.get(tp.partition)
            lag = hw if last is None else max(0, hw - last - 1)
            self.metrics.consumer_lag.labels(str(tp.partition)).set(lag)
        self.metrics.state_users.set(self.store.estimate_count())

    def on_partitions_revoked(self, revoked) -> None:
        """Drop the lag gauge of every revoked input partition: it is another worker's to report now
        (kept, the last value stayed exported for good, and sums over workers counted it twice). A
        partition that stays here is set again by the next :meth:`update_gauges`."""
        topic = self.settings.topic_input
        for tp in revoked:
            if tp.topic != topic:
                continue
            try:
                self.metrics.consumer_lag.remove(str(tp.partition))
            except KeyError:
                pass  # never set here
        if self.quality is not None:
            self.quality.revoke(tp.partition for tp in revoked if tp.topic == topic)

    def expire_slice(self, res) -> dict[bytes, tuple[int, None]]:
        """Deletions of states idle longer than the TTL, a bounded slice per partition of this batch.

        Expiry is part of the batch protocol (docs/ARCHITECTURE.md §Protocol): its tombstones are written
        with the batch's states (acknowledged, or in the source partition's transaction), never while
        another batch is in flight, and never for a user of this batch or one staged by an open
        transaction. Idle is measured in **event time**: against the newest event seen on the partition
        (its watermark), not the wall clock, so replaying old data does not wipe it as it arrives. Each
        batch examines at most :data:`TTL_SCAN_PER_BATCH` states of each of its partitions, continuing
        where the previous one stopped, so the scan never stalls the event loop.
        """
        ttl = self.settings.state_ttl_s
        for k, (p, v) in res.states.items():
            if v is not None and k.startswith(STATE_KEY_PREFIX):  # not a partial demand aggregate
                try:
                    ts = peek_last_ts(v)
                except StateFormatError:
                    continue
                if ts > self.watermark.get(p, -math.inf):
                    self.watermark[p] = ts
        out: dict[bytes, tuple[int, None]] = {}
        keep = set(res.states)
        for p in sorted({p for _k, (p, _v) in res.states.items()}):  # partitions of this batch: owned now
            out.update(self.store.expired_slice(p, self.watermark[p] - ttl, TTL_SCAN_PER_BATCH, keep))
        if out:
            logger.info("expiring %d user states idle for more than %.0f s of event time", len(out), ttl)
        return out


async def run_to_end(aw) -> None:
    """Await ``aw`` in a task of its own that cancelling the caller does not interrupt: the caller
    waits for it to finish, then raises the cancellation. Its own exception, if any, propagates."""
    task = asyncio.ensure_future(aw)
    cancelled = False
    while True:
        try:
            await asyncio.shield(task)
            break
        except asyncio.CancelledError:
            if task.done():
                raise
            cancelled = True
    if cancelled:
        raise asyncio.CancelledError


async def _ship(producer, batch, topic: str, partition: int):
    """Submit a finished batch. Closing it first matters: the client lets an open batch linger for
    ``linger_ms`` waiting for more records, and each micro-batch waits on two produce round trips."""
    batch.close()
    return await producer.send_batch(batch, topic, partition=partition)


def _by_partition(records: list[Output]) -> dict[int, list[Output]]:
    """``records`` grouped by their partition, each group in the given order."""
    groups: dict[int, list[Output]] = {}
    for o in records:
        groups.setdefault(o.partition, []).append(o)
    return groups


async def _send_batches(producer, topic: str, partition: int, records: list[Output]) -> list:
    """Submit ``records`` to one partition in as few closed batches as fit; ``(topic, records, future)``
    per batch, the future resolving to the batch's metadata (its first record's offset)."""
    pending = []
    batch = producer.create_batch()
    for o in records:
        if batch.append(key=o.key, value=o.value, timestamp=None) is None:  # batch full: ship it
            pending.append((topic, batch.record_count(), await _ship(producer, batch, topic, partition)))
            batch = producer.create_batch()
            if batch.append(key=o.key, value=o.value, timestamp=None) is None:
                raise ValueError(f"record of {len(o.value or b'')} bytes exceeds the producer's batch size")
    if batch.record_count():
        pending.append((topic, batch.record_count(), await _ship(producer, batch, topic, partition)))
    return pending


def _last_offsets(pending: list, metas: list, topic: str) -> dict[int, int]:
    """The last offset written per partition of ``topic``, from :func:`_send_batches`' batches and
    their metadata."""
    last: dict[int, int] = {}
    for (t, n, _f), meta in zip(pending, metas, strict=True):
        if t == topic:
            last[meta.partition] = max(last.get(meta.partition, -1), meta.offset + n - 1)
    return last


def attach(c: Components, scorer: Scorer) -> Pipeline:
    """Declare the agent and timers on the app; returns the pipeline they drive."""
    pipeline = Pipeline(c, scorer)
    s = c.settings

    # The agent subscribes the input and control topics (and co-partitions them with the table). Their
    # records never reach this stream: batch delivery gives them to pipeline.handle_messages, a fetch
    # at a time, in one list (docs/ARCHITECTURE.md §Topics: how an erasure is ordered with events).
    @c.app.agent(c.source_topics or c.input_topic, name="demandstream.process")
    async def process(stream):
        async for _event in stream:
            raise RuntimeError("an input record reached the Faust stream: batch delivery is not installed")

    faust_patches.install_batch_delivery(c.app, (s.topic_input, s.topic_control), pipeline.handle_messages)
    if pipeline.exactly_once:
        faust_patches.guard_commits(c.app.consumer, pipeline.batch_lock)
        faust_patches.commit_transactions_together(c.app.producer)
        # Staged states live exactly as long as the transaction they were written into.
        faust_patches.on_transaction_abandoned(c.app.producer, pipeline.on_transaction_abandoned)
    # Exactly-once: staged states are applied once their source partition's transaction commits.
    faust_patches.chain_table_commit(c.app, pipeline.on_commit)

    @c.app.on_partitions_revoked.connect
    async def clear_revoked_gauges(app, revoked, **kwargs):
        pipeline.on_partitions_revoked(revoked)

    @c.app.on_partitions_assigned.connect
    async def refuse_added_partitions(app, assigned, **kwargs):
        # raised here, Faust crashes the app with it before any record of the new partitions is delivered
        refuse_new_partitions(assigned, (s.topic_input, s.topic_control), s.partitions, changelog_topic(s))

    @c.app.timer(interval=s.lag_interval_s)
    async def gauges():
        try:
            pipeline.update_gauges()
        except Exception:  # a gauge must never take the worker down; but say so
            logger.exception("updating gauges failed")

    return pipeline
