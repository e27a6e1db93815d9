"""The yardstick: plain-client copies of the input topic to a sink topic, no work between.

Two copies are measured in every round (PERF-ANCHORS' method and the fastest copy with the pipeline's
acks); the bench divides the pipeline by the faster of the two, so its ratio is never flattered by a
slow yardstick (docs/BENCHMARKS.md §Method).
"""

from __future__ import annotations

import asyncio
import contextlib
import time

from demandstream.stream.bench.topics import FETCH_MAX_BYTES, PARTITIONS, create_topics

# Both copies write each record to its source partition (the partition its key hashes to: the input was
# produced keyed), which spares the client's pure-Python key hash without changing where a record lands.


#: PERF-ANCHORS' plain aiokafka copy: records per fetch.
PASSTHROUGH_MAX_RECORDS = 5000
# The fastest copy with the pipeline's guarantee, chosen by measurement (docs/BENCHMARKS.md §Method):
# on this 2-core box, 100k events, building each partition's batch with create_batch/send_batch instead of
# one send per record copied 140-155k events/s against 33-67k for every per-record send tried (acks=all,
# linger 0-20 ms, batches 16 KiB-1 MB); among batch variants, 5k-50k records per fetch, 256 KiB-1 MB
# batches and 1 to unbounded fetches awaiting acks were within the noise at 100k events, while at the
# quick run's 20k, 1 MB batches and 20k-record fetches were about twice as fast as 256 KiB and 5k.
# (Clock then started at the first records; counting the first fetch, as now: perf_anchors 44k, this 111k.)
#: Fastest copy: records per fetch.
COPY_MAX_RECORDS = 20_000
#: Fastest copy: bytes per producer batch, about one batch per partition per fetch. Under the broker's
#: default ``message.max.bytes`` (1 MiB + 12) so a full batch is never refused.
COPY_BATCH_BYTES = 1_000_000
#: Fastest copy: no linger. Each batch is closed before it is submitted, so the client ships it at once;
#: linger would only delay the last, partial batch of each fetch.
COPY_LINGER_MS = 0
#: How long one fetch waits for records before the copy loop asks again.
FETCH_TIMEOUT_MS = 1000

#: The two copies as the bench reports them: what each does and its client settings.
PASSTHROUGH_METHODS: dict[str, dict] = {
    "perf_anchors": {
        "description": "PERF-ANCHORS' plain aiokafka copy as written: getmany, one send per record, no "
        "wait per fetch, one flush at the end; the producer keeps aiokafka's defaults",
        "settings": {
            "max_records": PASSTHROUGH_MAX_RECORDS,
            "send": "producer.send per record, fire-and-forget",
            "acks": 1,  # aiokafka's default without idempotence
            "linger_ms": 0,
            "max_batch_size": 16_384,
            "compression": None,
            "acknowledged": "one producer.flush() at the end",
        },
    },
    "fastest_copy": {
        "description": "the fastest copy measured with the pipeline's delivery guarantee: getmany, one "
        "closed create_batch/send_batch per partition per fetch, acks=all, each fetch's copies "
        "acknowledged before the next fetch",
        "settings": {
            "max_records": COPY_MAX_RECORDS,
            "send": "create_batch + send_batch per partition per fetch",
            "acks": "all",
            "linger_ms": COPY_LINGER_MS,
            "max_batch_size": COPY_BATCH_BYTES,
            "compression": None,
            "acknowledged": "per fetch, as the pipeline's micro-batch",
        },
    },
}


async def _source(bootstrap: str, src: str):
    """A started consumer on every partition of ``src``, from the beginning (no group, no commits).

    It starts fetching at once: a copy starts its clock right after, with its producer already up, so
    the time counts fetching the first records (a fetch can carry the whole topic of a quick run).
    """
    from aiokafka import AIOKafkaConsumer, TopicPartition

    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        fetch_max_bytes=FETCH_MAX_BYTES,
        max_partition_fetch_bytes=FETCH_MAX_BYTES,
    )
    await consumer.start()
    try:
        consumer.assign([TopicPartition(src, p) for p in range(PARTITIONS)])
        await consumer.seek_to_beginning()
    except BaseException:
        await consumer.stop()
        raise
    return consumer


@contextlib.asynccontextmanager
async def _copy_clients(bootstrap: str, src: str, **producer_options):
    """A started producer (``producer_options`` as given) and a consumer of ``src`` from the beginning;
    both stopped on exit, the consumer first."""
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, **producer_options)
    await producer.start()
    consumer = None
    try:
        consumer = await _source(bootstrap, src)
        yield producer, consumer
    finally:
        if consumer is not None:
            await consumer.stop()
        await producer.stop()


async def _anchor_copy(bootstrap: str, src: str, sink: str, n: int) -> float:
    # Nothing set: PERF-ANCHORS measured aiokafka's defaults (acks=1, linger 0, 16 KiB batches).
    async with _copy_clients(bootstrap, src) as (producer, consumer):
        # The clock starts once both clients are connected, as the pipeline's starts at /readyz: neither
        # figure includes connecting and joining, both include fetching.
        copied, t0 = 0, time.perf_counter()
        while copied < n:
            batch = await consumer.getmany(timeout_ms=FETCH_TIMEOUT_MS, max_records=PASSTHROUGH_MAX_RECORDS)
            for tp, msgs in batch.items():
                for m in msgs:
                    await producer.send(sink, m.value, key=m.key, partition=tp.partition)
                copied += len(msgs)
        await producer.flush()
        return n / (time.perf_counter() - t0)


async def _ship(producer, batch, topic: str, partition: int):
    """Submit a batch closed first: an open one lingers in the client waiting for more records."""
    batch.close()
    return await producer.send_batch(batch, topic, partition=partition)


async def fastest_copy(
    bootstrap: str, src: str, sink: str, n: int, started: list[float] | None = None
) -> float:
    options = {
        "acks": "all",
        "linger_ms": COPY_LINGER_MS,
        "max_batch_size": COPY_BATCH_BYTES,
        "max_request_size": FETCH_MAX_BYTES,
        "compression_type": None,
    }
    async with _copy_clients(bootstrap, src, **options) as (producer, consumer):
        copied, t0 = 0, time.perf_counter()
        if started is not None:  # the monotonic time of the first fetch, for a drain fed by this copy
            started.append(time.monotonic())
        while copied < n:
            batch = await consumer.getmany(timeout_ms=FETCH_TIMEOUT_MS, max_records=COPY_MAX_RECORDS)
            futures = []
            for tp, msgs in batch.items():
                b = producer.create_batch()
                for m in msgs:
                    if b.append(key=m.key, value=m.value, timestamp=None) is None:  # full: ship it
                        futures.append(await _ship(producer, b, sink, tp.partition))
                        b = producer.create_batch()
                        if b.append(key=m.key, value=m.value, timestamp=None) is None:
                            raise ValueError(f"a record of {len(m.value or b'')} bytes exceeds a whole batch")
                futures.append(await _ship(producer, b, sink, tp.partition))
                copied += len(msgs)
            # Acknowledged before the next fetch, as the pipeline acks a micro-batch before committing
            # it; letting up to four fetches or all of them wait bought nothing measurable.
            await asyncio.gather(*futures)
        return n / (time.perf_counter() - t0)


_COPIES = {"perf_anchors": _anchor_copy, "fastest_copy": fastest_copy}


def passthrough_events_per_s(method: str, bootstrap: str, src: str, sink: str, n: int) -> float:
    """Copy ``n`` records of ``src`` to ``sink`` with a plain aiokafka client, no work between; events/s.

    ``method`` is a key of :data:`PASSTHROUGH_METHODS`: ``"perf_anchors"``, the method PERF-ANCHORS
    measured (``getmany(max_records=5000)``, one ``send`` per record, fire-and-forget, one ``flush`` at
    the end, aiokafka's default producer: acks=1, linger 0, 16 KiB batches); or ``"fastest_copy"``, the
    fastest copy we measured that keeps the pipeline's guarantee (acks=all, every copy acknowledged):
    ``getmany(max_records=COPY_MAX_RECORDS)``, per partition one ``create_batch`` of up to
    ``COPY_BATCH_BYTES``, closed and submitted with ``send_batch``, no linger, no compression, every
    fetch's copies acknowledged before the next fetch. Timed from the first fetch, both clients connected,
    to the last acknowledged copy.
    """
    create_topics(bootstrap, [sink])
    return asyncio.run(_COPIES[method](bootstrap, src, sink, n))
