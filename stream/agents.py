"""The clickstream agent: micro-batches in, signals out, state written, in a crash-safe order.

The agent body is a loop over batches; the work is :meth:`Pipeline.handle`, whose steps are the
batch commit protocol (DESIGN §6):

Step 1. Compute: validate, group, read states, step the model (:class:`~stream.inference.InferenceEngine`).
Step 2. Produce signals and dead letters to their topics, in the source partition.
Step 3. ``at_least_once``: wait until the broker acknowledged every one of them (the batch futures).
        ``exactly_once``: nothing to wait for; they commit atomically with the state and offsets.
Step 4. Write the new user states (local store + changelog), each carrying the offset of the last
        event it applied.
Step 5. Return: Faust acks the batch's events; the consumer commits their offsets later, after
        flushing the producer again (so the changelog of step 4 is durable before the commit).

Crash between 3 and 4: events are redelivered, the old state re-applies them (duplicate signals,
allowed by at-least-once). Crash after 4 but before 5: redelivered events are at or below the stored
offset and are skipped. Either way every event is applied to its user's state exactly once.
"""

from __future__ import annotations

import asyncio
import logging
import time

from model.scoring import Scorer
from stream import delivery
from stream.app import Components
from stream.inference import InferenceEngine
from stream.state import StateStore

logger = logging.getLogger(__name__)


class Pipeline:
    def __init__(self, c: Components, scorer: Scorer):
        self.c = c
        self.settings = c.settings
        self.engine = InferenceEngine(scorer, c.settings.topic_input, c.settings.pseudonym_key)
        self.store = StateStore(c.table)
        self.metrics = c.metrics
        self.exactly_once = c.settings.guarantee == "exactly_once"
        self.last_offset: dict[int, int] = {}  # partition -> last consumed offset, for lag
        self.batches = 0

    async def handle(self, events) -> None:
        """Faust stream path (``take_events``): used only if batch delivery is not installed."""
        await self.process([ev.message for ev in events])

    async def handle_messages(self, messages: list) -> None:
        """Batch delivery path (stream/delivery.py): process in chunks, then ack every record."""
        ack = self.c.app.consumer.ack
        step = self.settings.batch_max
        for i in range(0, len(messages), step):
            chunk = messages[i: i + step]
            await self.process(chunk)
            for m in chunk:  # Step 5
                ack(m)

    async def process(self, records: list) -> None:
        """Steps 1-4 for one micro-batch of Faust messages (key, value, partition, offset, timestamp)."""
        m = self.metrics
        for r in records:
            self.last_offset[r.partition] = r.offset
        # Step 1
        res = self.engine.process(records, self.store.read)
        # Steps 2 and 3
        if self.exactly_once:
            # Faust's producer path puts each record in the source partition's open transaction;
            # it commits atomically with the state and the offsets, so nothing to wait for here.
            send_signal, send_dlq = self.c.signals_topic.send_soon, self.c.dlq_topic.send_soon
            for o in res.signals:
                send_signal(key=o.key, value=o.value, partition=o.partition)
            for o in res.dead_letters:
                send_dlq(key=o.key, value=o.value, partition=o.partition)
        elif res.signals or res.dead_letters:
            await self.produce_acked(res)
        # Step 4
        self.store.write(res.states)
        # metrics after the fact: they count what was made durable
        now = time.time()
        m.batch_size.observe(len(records))
        m.events.labels("valid").inc(res.valid - res.duplicates)
        m.events.labels("duplicate").inc(res.duplicates)
        m.events.labels("invalid").inc(len(res.dead_letters))
        m.signals.inc(len(res.signals))
        for reason, n in res.reasons.items():
            m.dead_letters.labels(reason).inc(n)
        for s in res.inference_s:
            m.inference_seconds.observe(s)
        lat = m.event_to_signal_seconds
        for ts in res.signal_ts:
            lat.observe(max(0.0, now - ts))  # seconds, never ms (cf. faust-streaming/faust#693)
        self.batches += 1

    async def produce_acked(self, res) -> None:
        """Produce signals and dead letters in per-partition batches; return once the broker acked all.

        Uses the Kafka client's batch API (one append per record, one request per partition batch)
        instead of Faust's per-message futures and buffer; the returned futures resolve on the
        broker's acknowledgement (acks=all), which is exactly what Step 3 waits for.
        """
        producer = self.c.app.producer._ensure_producer()
        pending = []
        for topic, outputs in ((self.settings.topic_signals, res.signals), (self.settings.topic_dlq, res.dead_letters)):
            batches: dict[int, object] = {}
            for o in outputs:
                b = batches.get(o.partition)
                if b is None:
                    b = batches[o.partition] = producer.create_batch()
                if b.append(key=o.key, value=o.value, timestamp=None) is None:  # batch full: ship it
                    pending.append(await producer.send_batch(b, topic, partition=o.partition))
                    b = batches[o.partition] = producer.create_batch()
                    if b.append(key=o.key, value=o.value, timestamp=None) is None:
                        raise ValueError(f"record of {len(o.value)} bytes exceeds the producer's batch size")
            for p, b in batches.items():
                if b.record_count():
                    pending.append(await producer.send_batch(b, topic, partition=p))
        if pending:
            await asyncio.gather(*pending)

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

    def expire_states(self, now: float | None = None) -> int:
        """Right to be forgotten by default: drop states whose last event is older than the TTL."""
        now = time.time() if now is None else now
        n = self.store.expire(now - self.settings.state_ttl_s)
        self.metrics.expired_states.inc(n)
        return n


def attach(c: Components, scorer: Scorer) -> Pipeline:
    """Declare the agent and timers on the app; returns the pipeline they drive."""
    pipeline = Pipeline(c, scorer)
    s = c.settings
    within = s.batch_within_ms / 1000.0

    # The agent subscribes the input topic (and co-partitions it with the table); with batch
    # delivery installed its records reach pipeline.handle_messages instead of this stream.
    @c.app.agent(c.input_topic, name="demandstream.process")
    async def process(stream):
        async for events in stream.take_events(s.batch_max, within=within):
            await pipeline.handle(events)

    delivery.install(c.app, s.topic_input, pipeline.handle_messages)

    @c.app.timer(interval=s.lag_interval_s)
    async def gauges():
        try:
            pipeline.update_gauges()
        except Exception:  # a gauge must never take the worker down; but say so
            logger.exception("updating gauges failed")

    if s.state_ttl_s > 0:
        # Scan often enough that a state outlives its TTL by at most ~10 %, but at most once a minute:
        # a scan reads every local state.
        @c.app.timer(interval=max(60.0, s.state_ttl_s / 10))
        async def expire_states():
            n = pipeline.expire_states()
            if n:
                logger.info("expired %d user states inactive for more than %.0f s", n, s.state_ttl_s)

    return pipeline
