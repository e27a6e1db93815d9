"""Kafka-side benchmarks: broker, raw passthrough, worker drain, event-to-signal latency, restore, profile.

Everything here talks to one real broker (normally the bench's own, started with deploy/kafka/kafka.sh on
a dedicated port) and to ``python -m stream worker`` subprocesses, each with a fresh app id, topics, data
dir and web port, exactly as the integration tests run them (tests/conftest.py). The plain aiokafka
passthrough (PERF-ANCHORS' method and the fastest copy with the pipeline's acks, the faster of the two) is
the yardstick the worker is compared with (docs/BENCHMARKS.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import re
import resource
import socket
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import orjson
from prometheus_client.parser import text_string_to_metric_families

from demandstream.stream.settings import Settings
from demandstream.stream.worker.launcher import (
    HTTP_TIMEOUT_S,
    READY_PROBE_TIMEOUT_S,
    WorkerLauncher,
    free_port,
    metric_sum,
    worker_env,
)

logger = logging.getLogger(__name__)

#: Client port of the bench's own broker, away from the developer's 9092 and the tests' 19092.
DEFAULT_BENCH_KAFKA_PORT = 19592
#: A cold JVM on a busy 2-core machine takes 10-20 s; the first run also fetches the jars.
KAFKA_UP_TIMEOUT_S = 600
KAFKA_DOWN_TIMEOUT_S = 120
#: The product's default partitions per topic, the bench's on a machine of few cores.
DEFAULT_PARTITIONS = Settings.partitions


def bench_partitions(cores: int | None) -> int:
    """Partitions of every bench topic: the product's default, or one per core where the machine has
    more, so that ``worker --processes N`` (N = cores, the bench's all-cores drain) gives every process
    a partition; with fewer partitions than processes Kafka leaves the rest idle and "every core" would
    measure only as many processes as there are partitions.

    >>> bench_partitions(2), bench_partitions(16), bench_partitions(None)
    (4, 16, 4)
    """
    return max(DEFAULT_PARTITIONS, cores or 1)


#: Partitions of every bench topic on this machine (:func:`bench_partitions`).
PARTITIONS = bench_partitions(os.cpu_count())
#: Records per consumer fetch in the passthrough (PERF-ANCHORS' plain aiokafka figure).
PASSTHROUGH_MAX_RECORDS = 5000
#: Linger of the latency measurement's producer, as the worker's (stream/worker/app.py PRODUCER_LINGER_MS).
LINGER_MS = 5
#: How often readiness and topic end offsets are polled while a measurement is timed.
POLL_S = 0.05
#: Bounds on waiting for a worker to become ready and to emit what it owes.
WORKER_READY_TIMEOUT_S = 600
DRAIN_TIMEOUT_S = 900
#: Faust recovers a few thousand records per second on 2 cores: a million takes minutes.
RESTORE_TIMEOUT_S = 1800
#: The latency producer releases events in ticks of this length, at the target rate on average.
LATENCY_TICK_S = 0.01
#: The read_committed level's consumer polls at most this long, so a signal's arrival time is its own.
LATENCY_TICK_MS = round(1000 * LATENCY_TICK_S)
#: Topic configs of the bench's input topic: the broker stamps each record with its append time, which
#: splits every event's latency into the generator's leg (send -> append) and the worker's (append ->
#: signal), see :func:`latency_breakdown`. The worker itself does not read record timestamps for its
#: work (only for its latency metric, which then also counts from the append).
INPUT_TOPIC_CONFIGS = {"message.timestamp.type": "LogAppendTime"}
#: aiokafka's ``ConsumerRecord.timestamp_type`` of a broker-stamped record.
LOG_APPEND_TIME = 1
#: A latency level whose generator achieved less than this share of its target rate is flagged.
ACHIEVED_MIN_SHARE = 0.95
#: Fetch sizes large enough that one fetch carries a whole batch of 5000 small events.
FETCH_MAX_BYTES = 16 * 1024 * 1024
#: Bounds on counting a topic's committed records (exactly-once drain): in all, and without a new record.
COUNT_TIMEOUT_S = 120.0
COUNT_IDLE_S = 2.0
#: Seconds a just-ready worker is left before its resident memory is read (state-less / restored).
MEMORY_SETTLE_S = 1.0
#: Tries at finding ``worker --processes N``'s N consecutive free web ports.
PORT_TRIES = 50


# -- broker -----------------------------------------------------------------------------------------


class Broker:
    """The broker the bench measures against: its own on ``port`` unless ``bootstrap`` is given.

    ``start()`` launches ``kafka.sh up --fresh`` in the background (so data generation overlaps the JVM's
    start), ``wait()`` blocks until it serves, ``stop()`` takes down only a broker this object started.
    """

    def __init__(
        self, port: int = DEFAULT_BENCH_KAFKA_PORT, bootstrap: str | None = None, script: Path | None = None
    ):
        self.port = port
        self.script = script
        self.external = bootstrap is not None
        self.bootstrap = bootstrap or f"127.0.0.1:{port}"
        self.started = False
        self._proc: subprocess.Popen | None = None

    def _sh(self, *args: str, timeout: float) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(self.script), *args, "--port", str(self.port)],
            capture_output=True,
            timeout=timeout,
            text=True,
        )

    def start(self) -> Broker:
        if self.external:
            return self
        if self._sh("status", timeout=60).returncode == 0:
            logger.info("reusing the broker already up on port %d (it is left running)", self.port)
            return self
        logger.info("starting the bench broker on port %d", self.port)
        self._proc = subprocess.Popen(
            [str(self.script), "up", "--fresh", "--port", str(self.port)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.started = True
        return self

    def wait(self) -> Broker:
        """Block until the broker ``start`` launched serves (at once for one already up or external)."""
        if self._proc is None:
            return self
        try:
            out, _ = self._proc.communicate(timeout=KAFKA_UP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            raise RuntimeError(f"bench broker not up after {KAFKA_UP_TIMEOUT_S} s") from None
        if self._proc.returncode != 0:
            raise RuntimeError(f"kafka.sh up failed ({self._proc.returncode}):\n{out[-4000:]}")
        self._proc = None
        return self

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()
            self._proc = None
        if self.started:
            self._sh("down", timeout=KAFKA_DOWN_TIMEOUT_S)
            self.started = False


def create_topics(
    bootstrap: str, names: Sequence[str], partitions: int = PARTITIONS, configs: dict[str, str] | None = None
) -> None:
    """The bench's topics on its broker, through the product's one topic creator (replication 1)."""
    from demandstream.stream.admin import create_topics as admin_create_topics

    admin_create_topics(
        Settings(broker=f"kafka://{bootstrap}", partitions=partitions, replication=1), list(names), configs
    )


class OffsetWatch:
    """Sum of a topic's end offsets (records produced so far), polled cheaply with ListOffsets.

    With ``isolation="read_committed"`` the broker answers each partition's last stable offset: the end
    of what a read_committed consumer can see, which also counts the transactions' commit markers (see
    :func:`wait_committed`).
    """

    def __init__(
        self, bootstrap: str, topic: str, partitions: int = PARTITIONS, isolation: str = "read_uncommitted"
    ):
        from kafka import KafkaConsumer, TopicPartition

        self.bootstrap, self.topic = bootstrap, topic
        self.consumer = KafkaConsumer(
            bootstrap_servers=[bootstrap], group_id=None, enable_auto_commit=False, isolation_level=isolation
        )
        self.tps = [TopicPartition(topic, p) for p in range(partitions)]

    def ends(self) -> dict[int, int]:
        return {tp.partition: o for tp, o in self.consumer.end_offsets(self.tps).items()}

    def total(self) -> int:
        return sum(self.ends().values())

    def wait_for(self, target: int, timeout: float = DRAIN_TIMEOUT_S, proc=None) -> float:
        """Block until at least ``target`` records are in the topic; return the monotonic time seen."""
        deadline = time.monotonic() + timeout
        while True:
            n = self.total()
            now = time.monotonic()
            if n >= target:
                return now
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"worker exited with {proc.returncode} after {n} of {target} records")
            if now > deadline:
                raise TimeoutError(f"{n} of {target} records after {timeout} s")
            time.sleep(POLL_S)

    def close(self) -> None:
        self.consumer.close()


def count_committed(bootstrap: str, topic: str, start: dict[int, int], end: dict[int, int]) -> int:
    """Records a ``read_committed`` consumer reads in ``[start[p], end[p])`` of each partition ``p``:
    committed records only, without the transactions' markers and aborted records."""
    from kafka import KafkaConsumer, TopicPartition

    tps = {p: TopicPartition(topic, p) for p in end if end[p] > start.get(p, 0)}
    if not tps:
        return 0
    consumer = KafkaConsumer(
        bootstrap_servers=[bootstrap],
        group_id=None,
        enable_auto_commit=False,
        isolation_level="read_committed",
        fetch_max_bytes=FETCH_MAX_BYTES,
        max_partition_fetch_bytes=FETCH_MAX_BYTES,
    )
    try:
        consumer.assign(list(tps.values()))
        for p, tp in tps.items():
            consumer.seek(tp, start.get(p, 0))
        n, deadline, last_new = 0, time.monotonic() + COUNT_TIMEOUT_S, time.monotonic()
        while any(consumer.position(tp) < end[p] for p, tp in tps.items()):
            polled = consumer.poll(timeout_ms=200, max_records=PASSTHROUGH_MAX_RECORDS)
            got = sum(1 for tp, recs in polled.items() for r in recs if r.offset < end[tp.partition])
            n += got
            now = time.monotonic()
            last_new = now if got else last_new
            # A range that ends with a commit marker and nothing after it may leave the position short
            # of the end: once nothing new comes for a while, everything visible has been counted.
            if now - last_new > COUNT_IDLE_S:
                break
            if now > deadline:
                raise TimeoutError(f"counted {n} committed records of {topic} in {COUNT_TIMEOUT_S} s")
        return n
    finally:
        consumer.close()


def wait_committed(watch: OffsetWatch, target: int, timeout: float = DRAIN_TIMEOUT_S, proc=None) -> float:
    """Block until ``target`` committed records are visible in ``watch``'s topic (a ``read_committed``
    watch); return the monotonic time of the last-stable-offset poll that made them visible.

    Under exactly-once every transaction leaves a commit marker in each partition it wrote, which takes
    an offset, so the end offsets alone would be reached before the last records are committed. The
    watch polls the last stable offsets as cheaply as :meth:`OffsetWatch.wait_for`; once their sum
    reaches ``target`` (markers only add to it), the records up to them are counted, then only those of
    each later advance, until the count reaches ``target``.
    """
    deadline = time.monotonic() + timeout
    counted, upto = 0, dict.fromkeys(range(len(watch.tps)), 0)
    while True:
        ends = watch.ends()
        now = time.monotonic()
        if sum(ends.values()) >= target and ends != upto:
            counted += count_committed(watch.bootstrap, watch.topic, upto, ends)
            upto = ends
            if counted >= target:
                return now
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"worker exited with {proc.returncode} after {counted} of {target} records")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{counted} of {target} committed records after {timeout} s")
        time.sleep(POLL_S)


# -- memory -----------------------------------------------------------------------------------------


def status_kib(status: str, field: str = "VmRSS") -> int:
    """A memory ``field`` in KiB from the text of ``/proc/<pid>/status``: ``VmRSS``, the resident set,
    or ``RssAnon``, its anonymous part (the heap, the model and the states, which every worker process
    holds for itself). The rest of VmRSS is mostly file pages of the libraries (torch's alone are ~480
    MiB), which the page cache shares between processes, so a machine running N workers needs about
    N × RssAnon + the libraries once.

    >>> text = "Name:\\tpython\\nVmRSS:\\t  524288 kB\\nRssAnon:\\t  200000 kB\\nThreads:\\t9\\n"
    >>> status_kib(text), status_kib(text, "RssAnon")
    (524288, 200000)
    """
    m = re.search(rf"^{field}:\s*(\d+)\s*kB", status, re.M)
    if m is None:
        raise ValueError(f"no {field} line (the process has ended or is a zombie)")
    return int(m.group(1))


def rss_mib(pid: int, field: str = "VmRSS") -> float:
    """Resident memory of process ``pid`` in MiB (``field`` of ``/proc/<pid>/status``, :func:`status_kib`)."""
    return status_kib(Path(f"/proc/{pid}/status").read_text(), field) / 1024


def parent_pid(stat: str) -> int:
    """The parent's pid from the text of ``/proc/<pid>/stat`` (the command name may hold spaces).

    >>> parent_pid("4242 (python -m x) S 4200 4200 17 0 -1")
    4200
    """
    return int(_stat_fields(stat)[1])


def _stat_fields(stat: str) -> list[str]:
    """The fields of ``/proc/<pid>/stat`` after the command name (which may hold spaces and parentheses):
    the process state first."""
    return stat.rpartition(")")[2].split()


def child_pids(pid: int) -> list[int]:
    """The pids of the live children of ``pid``, ascending (``worker --processes N``'s workers)."""
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            if parent_pid((d / "stat").read_text()) == pid:
                out.append(int(d.name))
        except (OSError, ValueError, IndexError):  # ended meanwhile
            continue
    return sorted(out)


# -- CPU ------------------------------------------------------------------------------------------


def process_cpu_ticks(stat: str) -> int:
    """User + system CPU time of a process in clock ticks, from the text of ``/proc/<pid>/stat``.

    >>> process_cpu_ticks("4242 (python -m x) S 4200 4200 17 0 -1 0 0 0 0 0 350 50 0 0")
    400
    """
    fields = _stat_fields(stat)
    return int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of proc(5))


def machine_busy_ticks(stat: str) -> int:
    """CPU ticks every core of the machine spent busy (neither idle nor waiting on I/O), from the
    text of ``/proc/stat``: user, nice, system, irq, softirq and steal.

    >>> machine_busy_ticks("cpu  100 5 50 1000 20 3 2 7 0 0\\ncpu0 50 2 25 500 10 1 1 3 0 0")
    167
    """
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in stat.split()[1:9])
    return user + nice + system + irq + softirq + steal


class CpuUse:
    """CPU used between construction and :meth:`cores`, in cores (CPU seconds per wall second): by
    the worker's processes, by this process (the load generator, while it is the only thing this
    process runs) and by the whole machine, whose remainder is mostly the broker's. A latency level
    that keeps the machine near all its cores busy measured the machine's capacity, not the worker's
    latency (docs/BENCHMARKS.md, 2026-12-05 afternoon)."""

    def __init__(self, pids: Sequence[int]):
        self.pids = list(pids)
        self._tick = os.sysconf("SC_CLK_TCK")
        self._t0 = time.monotonic()
        self._start = self._read()

    def _read(self) -> tuple[int, float, int]:
        worker = sum(process_cpu_ticks(Path(f"/proc/{p}/stat").read_text()) for p in self.pids)
        own = resource.getrusage(resource.RUSAGE_SELF)
        return worker, own.ru_utime + own.ru_stime, machine_busy_ticks(Path("/proc/stat").read_text())

    def cores(self) -> dict[str, float]:
        """``{"worker", "generator", "machine", "of", "seconds"}``: cores used since the start, the
        machine's cores (``of``) and the wall seconds they were measured over."""
        wall = max(time.monotonic() - self._t0, 1e-9)
        (w0, g0, m0), (w1, g1, m1) = self._start, self._read()
        return {
            "worker": (w1 - w0) / self._tick / wall,
            "generator": (g1 - g0) / wall,
            "machine": (m1 - m0) / self._tick / wall,
            "of": float(os.cpu_count() or 1),
            "seconds": wall,
        }


# -- data -------------------------------------------------------------------------------------------


def encode_events(events) -> list[tuple[bytes, bytes]]:
    """(key, JSON value) of each event, as shops produce them to ``clickstream`` (docs/ARCHITECTURE.md
    §Events)."""
    return [(e.user_id.encode(), orjson.dumps(e.to_dict())) for e in events]


async def _produce(
    bootstrap: str, topic: str, records: Iterable[tuple[bytes, bytes]], partition_of=None
) -> None:
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap,
        linger_ms=20,
        max_batch_size=512 * 1024,
        acks=1,
        max_request_size=FETCH_MAX_BYTES,
    )
    await producer.start()
    try:
        futures = []
        for i, (k, v) in enumerate(records):
            p = None if partition_of is None else partition_of(i)
            futures.append(await producer.send(topic, v, key=k, partition=p))
            if len(futures) >= 10_000:
                await asyncio.gather(*futures)
                futures.clear()
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


def produce(bootstrap: str, topic: str, records: Iterable[tuple[bytes, bytes]], spread: bool = False) -> None:
    """Write records to ``topic`` (partition by key, or round-robin over partitions when ``spread``)."""
    asyncio.run(_produce(bootstrap, topic, records, (lambda i: i % PARTITIONS) if spread else None))


# -- passthrough ------------------------------------------------------------------------------------
#
# Two plain-client copies of the input topic to a sink topic, both measured in every round; the bench
# divides the pipeline by the faster of the two, so its ratio is never flattered by a slow yardstick.
# Both copy each record to its source partition (the partition its key hashes to: the input was produced
# keyed), which spares the client's pure-Python key hash without changing where a record lands.


#: PERF-ANCHORS' plain aiokafka copy: records per fetch (also the bench's fetch size when reading back).
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


async def _fastest_copy(
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


_COPIES = {"perf_anchors": _anchor_copy, "fastest_copy": _fastest_copy}


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


# -- worker -----------------------------------------------------------------------------------------


@dataclass
class BenchWorker:
    """A ``python -m stream worker`` subprocess with its own app id, topics, data dir and web port.

    Started through the shared launcher (stream/worker/launcher.py); its web port is picked at ``start``.
    With ``processes`` > 1 it is ``worker --processes N``: a supervisor whose N children (one consumer
    group) take the web ports ``port`` … ``port + N - 1`` and the data dirs ``…/worker-i``.
    """

    bootstrap: str
    model: Path
    tag: str
    workdir: Path
    input_topic: str
    device: str = "cpu"
    inference: str = "eager"
    extra_env: dict[str, str] = field(default_factory=dict)
    launcher: WorkerLauncher | None = None
    processes: int = 1
    guarantee: str = "at_least_once"
    ready_at: float = 0.0  #: monotonic time of the last ``wait_ready``'s answer (every process ready)

    @property
    def app_id(self) -> str:
        return f"ds-bench-{self.tag}"

    @property
    def signals_topic(self) -> str:
        return f"bench-signals-{self.tag}"

    @property
    def log_path(self) -> Path:
        return self.workdir / f"worker-{self.tag}.log"

    @property
    def proc(self) -> subprocess.Popen | None:
        """The worker's process once started (its pid is what ``profile`` samples)."""
        return None if self.launcher is None else self.launcher.proc

    @property
    def port(self) -> int | None:
        """The worker's web port once started."""
        return None if self.launcher is None else self.launcher.port

    @property
    def started_at(self) -> float:
        """Monotonic time of the process's start (0 before ``start``)."""
        return 0.0 if self.launcher is None else self.launcher.started_at

    def start(self) -> BenchWorker:
        """Start the worker on a web port free now (N consecutive ones for N processes), every other
        setting the bench's. A worker still running is an error: starting again would orphan it (its
        process would outlive the bench, which only kills the one it holds)."""
        if self.proc is not None and self.proc.poll() is None:
            raise RuntimeError(f"bench worker {self.tag} is already running (pid {self.proc.pid})")
        port = free_ports(self.processes)
        env = worker_env(
            {
                "DEMANDSTREAM_BROKER": f"kafka://{self.bootstrap}",
                "DEMANDSTREAM_MODEL": str(self.model),
                "DEMANDSTREAM_APP_ID": self.app_id,
                "DEMANDSTREAM_DATA_DIR": str(self.workdir / f"data-{self.tag}"),
                "DEMANDSTREAM_WEB_PORT": str(port),
                "DEMANDSTREAM_TOPIC_INPUT": self.input_topic,
                "DEMANDSTREAM_TOPIC_SIGNALS": self.signals_topic,
                "DEMANDSTREAM_TOPIC_DLQ": f"bench-dlq-{self.tag}",
                "DEMANDSTREAM_TOPIC_CONTROL": f"bench-control-{self.tag}",
                "DEMANDSTREAM_PARTITIONS": str(PARTITIONS),
                "DEMANDSTREAM_STANDBY_REPLICAS": "0",
                "DEMANDSTREAM_DEVICE": self.device,
                "DEMANDSTREAM_INFERENCE": self.inference,
                "DEMANDSTREAM_LOG_LEVEL": "warning",
                "DEMANDSTREAM_LAG_INTERVAL_S": "1",
                "DEMANDSTREAM_GUARANTEE": self.guarantee,
                "DEMANDSTREAM_PROCESSES": str(self.processes),
                **self.extra_env,
            }
        )
        # POLL_S, not the launcher's half second: the drain's start-up figure ends at the first 200.
        self.launcher = WorkerLauncher(
            env, self.log_path, ready_timeout_s=WORKER_READY_TIMEOUT_S, poll_s=POLL_S
        ).start()
        return self

    def _started(self) -> WorkerLauncher:
        if self.launcher is None:
            raise RuntimeError(f"bench worker {self.tag} not started")
        return self.launcher

    def wait_ready(self, timeout: float = WORKER_READY_TIMEOUT_S) -> float:
        """Block until /readyz answers 200; return the monotonic time it was first seen.

        With N processes: until every child's /readyz answers 200 in one sweep (a child that joins late
        sends the others back into a rebalance, where they answer 503); the time is that sweep's end.
        """
        launcher = self._started()
        self.ready_at = launcher.wait_ready(timeout)
        if self.processes == 1:
            return self.ready_at
        deadline = time.monotonic() + timeout
        while True:
            if all(self._child_ready(i) for i in range(self.processes)):
                self.ready_at = time.monotonic()
                return self.ready_at
            if launcher.poll() is not None:
                raise RuntimeError(f"worker exited with {launcher.returncode}:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"not every worker process ready after {timeout} s:\n{self.log_tail()}")
            time.sleep(POLL_S)

    def _child_ready(self, i: int) -> bool:
        launcher = self._started()
        try:
            with urllib.request.urlopen(
                f"http://127.0.0.1:{launcher.port + i}/readyz", timeout=READY_PROBE_TIMEOUT_S
            ) as r:
                return r.status == 200
        except OSError:  # an HTTP 503 (HTTPError), not listening yet, or too busy to answer
            return False

    def events_per_process(self) -> list[float]:
        """Events each process has taken in (``demandstream_events_total`` on its /metrics), in order:
        with N processes, proof that each got its share of the partitions."""
        launcher = self._started()
        out = []
        for i in range(self.processes):
            url = f"http://127.0.0.1:{launcher.port + i}/metrics"
            with urllib.request.urlopen(url, timeout=HTTP_TIMEOUT_S) as r:
                out.append(metric_sum(r.read().decode(), "demandstream_events_total"))
        return out

    def worker_pids(self) -> list[int]:
        """The pids of the processes doing the stream work: the worker's own, or for N processes its
        children's (not the supervisor's)."""
        proc = self._started().proc
        if self.processes == 1:
            return [proc.pid]
        pids = child_pids(proc.pid)
        if len(pids) != self.processes:
            raise RuntimeError(f"{len(pids)} worker processes under pid {proc.pid}, not {self.processes}")
        return pids

    def metric(self, name: str) -> float:
        """Sum of a metric's samples on /metrics (0 if absent)."""
        return self._started().metric(name)

    def metrics_text(self) -> str:
        """The worker's whole /metrics exposition (one process)."""
        return self._started().metrics_text()

    def stop(self) -> None:
        """Kill the worker's process group, if it runs."""
        # SIGKILL, not a graceful stop: the bench's app ids, topics and data dirs are thrown away, and a
        # graceful Faust shutdown would cost seconds of CPU the next measurement shares.
        if self.launcher is not None:
            self.launcher.kill()

    def log_tail(self, n: int = 40) -> str:
        """The last ``n`` lines of the worker's log."""
        if self.launcher is None:
            return "(no log)"
        return self.launcher.log_tail(n)


@dataclass
class DrainResult:
    events_per_s: float
    startup_s: float  # process start -> /readyz 200 (of every process)
    drain_s: float  # /readyz 200 (or the feed's first fetch) -> last signal in the topic
    rss_mib: list[float] = field(default_factory=list)  # each worker process's resident memory after
    supervisor_rss_mib: float | None = None  # worker --processes N: the supervisor's own
    signals_at_ready: int = 0  # signal offsets already in the topic when the clock started
    feed_s: float | None = None  # fed drain: seconds the copy into the worker's input topic took
    committed_s: float | None = None  # exactly-once: clock start -> n signals committed (visible)
    events_per_process: list[float] = field(default_factory=list)  # worker --processes N: each one's share
    anon_mib: list[float] = field(default_factory=list)  # each worker process's anonymous part (RssAnon)


def drain(worker: BenchWorker, n: int, feed_from: str | None = None) -> DrainResult:
    """Start ``worker`` on an input topic already holding ``n`` events; time ready -> n signals out.

    With ``feed_from``, the worker's own input topic starts empty: once every process is ready, the
    ``n`` events of ``feed_from`` are copied into it with the fastest passthrough copy, and the clock
    starts at the copy's first fetch. ``worker --processes N`` needs this: its children do not become
    ready together, and the first one ready would drain a pre-loaded topic alone before the others join.

    The end is when the signal topic's end offsets reach ``n``. Under exactly-once the transactions'
    commit markers take offsets too (a few per commit, so the clock stops at most that many records
    early); ``committed_s`` adds the time until ``n`` committed signals are visible to a
    read_committed consumer (:func:`wait_committed`), which includes the last transaction's commit.
    Each worker process's resident memory is read once all its signals are out.
    """
    topics = [worker.signals_topic, f"bench-dlq-{worker.tag}"]
    create_topics(worker.bootstrap, topics + ([worker.input_topic] if feed_from else []))
    eo = worker.guarantee == "exactly_once"
    watch = OffsetWatch(worker.bootstrap, worker.signals_topic)
    committed = (
        OffsetWatch(worker.bootstrap, worker.signals_topic, isolation="read_committed") if eo else None
    )
    feed_s = t_committed = None
    try:
        worker.start()
        t_start = worker.wait_ready()
        if feed_from:
            started: list[float] = []
            asyncio.run(_fastest_copy(worker.bootstrap, feed_from, worker.input_topic, n, started))
            t_start, feed_s = started[0], time.monotonic() - started[0]
        at_ready = watch.total()
        t_end = watch.wait_for(n, proc=worker.proc)
        if committed is not None:
            t_committed = wait_committed(committed, n, proc=worker.proc)
    finally:
        watch.close()
        if committed is not None:
            committed.close()
    pids = worker.worker_pids()
    rss, anon = [rss_mib(pid) for pid in pids], [rss_mib(pid, "RssAnon") for pid in pids]
    supervisor = rss_mib(worker.proc.pid) if worker.processes > 1 else None
    shares = worker.events_per_process() if worker.processes > 1 else []
    return DrainResult(
        n / (t_end - t_start),
        worker.ready_at - worker.started_at,
        t_end - t_start,
        rss,
        supervisor,
        at_ready,
        feed_s,
        None if t_committed is None else t_committed - t_start,
        shares,
        anon,
    )


def ready_rss_mib(worker: BenchWorker, settle_s: float = MEMORY_SETTLE_S, **ready) -> dict:
    """Start ``worker`` and wait for /readyz, then ``settle_s`` more; its start-up seconds and resident
    memory (MiB). The caller stops it."""
    worker.start()
    t_ready = worker.wait_ready(**ready)
    time.sleep(settle_s)
    return {"startup_seconds": t_ready - worker.started_at, "rss_mib": rss_mib(worker.proc.pid)}


def free_ports(n: int = 1) -> int:
    """The first of ``n`` consecutive TCP ports on 127.0.0.1 that nothing listens on now."""
    for _ in range(PORT_TRIES):
        base = free_port()
        if base + n - 1 > 65535:
            continue
        try:
            with contextlib.ExitStack() as stack:
                for port in range(base + 1, base + n):
                    sock = stack.enter_context(socket.socket())
                    sock.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
    raise RuntimeError(f"no {n} consecutive free ports found in {PORT_TRIES} tries")


# -- latency ----------------------------------------------------------------------------------------


async def _paced_send(
    bootstrap: str, topic: str, templates: Sequence[dict], rate: float, duration: float, tag: str
) -> tuple[int, float]:
    """Send at ``rate`` for ``duration`` s; (events sent, seconds from the first send to the last ack)."""
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=LINGER_MS, acks="all")
    await producer.start()
    try:
        sent, t0 = 0, time.monotonic()
        while (elapsed := time.monotonic() - t0) < duration:
            due = int(rate * elapsed)
            while sent < due:
                ev = dict(templates[sent % len(templates)])
                ev["ts"] = time.time()  # the moment the shop produces it: latency starts here
                ev["event_id"] = f"{tag}-{sent}"
                await producer.send(topic, orjson.dumps(ev), key=ev["user_id"].encode())
                sent += 1
            await asyncio.sleep(LATENCY_TICK_S)
        await producer.flush()
        return sent, time.monotonic() - t0
    finally:
        await producer.stop()


async def _append_times(
    bootstrap: str, topic: str, start: dict[int, int], end: dict[int, int]
) -> dict[str, float]:
    """Event id -> the broker's append time (s) of the input records in ``[start, end)``; empty when the
    topic keeps the producer's timestamps (an input topic the bench did not create)."""
    records = await _read_range(bootstrap, topic, start, end, records=True)
    return {
        orjson.loads(r.value)["event_id"]: r.timestamp / 1000.0
        for r in records
        if r.timestamp_type == LOG_APPEND_TIME
    }


async def _read_range(
    bootstrap: str, topic: str, start: dict[int, int], end: dict[int, int], records: bool = False
) -> list:
    """The values (the consumer records with ``records``) of ``topic`` in ``[start, end)`` per partition."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False, fetch_max_bytes=FETCH_MAX_BYTES
    )
    await consumer.start()
    try:
        tps = {p: TopicPartition(topic, p) for p in start if end[p] > start[p]}
        consumer.assign(list(tps.values()))
        for p, tp in tps.items():
            consumer.seek(tp, start[p])
        out: list = []
        left = sum(end[p] - start[p] for p in tps)
        while left > 0:
            batch = await consumer.getmany(timeout_ms=1000, max_records=PASSTHROUGH_MAX_RECORDS)
            for tp, msgs in batch.items():
                for m in msgs:
                    if m.offset < end[tp.partition]:
                        out.append(m if records else m.value)
                        left -= 1
        return out
    finally:
        await consumer.stop()


def achieved_load(target: float, produced: int, seconds: float, sent: int | None = None) -> dict:
    """The load generator's own figures: its target rate, the rate it achieved (events the broker holds
    from it / seconds from its first send to its last acknowledgement), and whether that fell below
    :data:`ACHIEVED_MIN_SHARE` of the target (a level whose load was not what it says).

    >>> achieved_load(1000.0, 7_400, 8.0)
    {'target_events_per_s': 1000.0, 'achieved_events_per_s': 925.0, 'achieved_share': 0.925, 'produced': 7400, 'send_seconds': 8.0, 'below_target': True}
    """
    achieved = produced / seconds
    out = {
        "target_events_per_s": target,
        "achieved_events_per_s": achieved,
        "achieved_share": achieved / target,
        "produced": produced,
        "send_seconds": seconds,
        "below_target": achieved < ACHIEVED_MIN_SHARE * target,
    }
    if sent is not None and sent != produced:
        out["sent"] = sent
    return out


def latency_summary(lat_ms: np.ndarray) -> dict[str, float]:
    """p50, p95, p99 and max of a level's latencies (ms), and how many there are.

    >>> latency_summary(np.arange(1.0, 101.0))
    {'p50': 50.5, 'p95': 95.05, 'p99': 99.01, 'max': 100.0, 'n': 100}
    """
    p50, p95, p99 = np.percentile(lat_ms, [50, 95, 99])
    return {
        "p50": float(p50),
        "p95": float(p95),
        "p99": float(p99),
        "max": float(lat_ms.max()),
        "n": int(lat_ms.size),
    }


def latency_ms(
    worker: BenchWorker, templates: Sequence[dict], rate: float, duration: float, tag: str
) -> dict[str, float]:
    """Event -> signal latency percentiles with events produced at ``rate`` for ``duration`` seconds.

    Each event's ``ts`` is the wall clock when it is handed to the producer and each signal carries the
    worker's ``emitted_at``, so the figure covers produce, broker, fetch, batching, the step and the
    signal's encoding (not the signal's own trip to a consumer). The load actually offered is verified
    on the broker: the input topic's end offsets before and after the send (:func:`achieved_load`).
    The CPU the worker, the generator and the machine used while it ran (:class:`CpuUse`) says whether
    the level was bound by the machine's cores.
    """
    watch = OffsetWatch(worker.bootstrap, worker.signals_topic)
    inputs = OffsetWatch(worker.bootstrap, worker.input_topic)
    try:
        start, in_start = watch.ends(), inputs.ends()
        before = _metrics_or_none(worker)
        cpu = CpuUse(worker.worker_pids())
        sent, seconds = asyncio.run(
            _paced_send(worker.bootstrap, worker.input_topic, templates, rate, duration, tag)
        )
        cpu_cores = cpu.cores()
        in_end = inputs.ends()
        produced = sum(in_end.values()) - sum(in_start.values())
        watch.wait_for(sum(start.values()) + sent, timeout=max(60.0, 3 * duration), proc=worker.proc)
        end = watch.ends()
        after = _metrics_or_none(worker)
    finally:
        watch.close()
        inputs.close()
    signals = [
        orjson.loads(v) for v in asyncio.run(_read_range(worker.bootstrap, worker.signals_topic, start, end))
    ]
    lat = np.array([(s["emitted_at"] - s["ts"]) * 1000.0 for s in signals])
    appended = asyncio.run(_append_times(worker.bootstrap, worker.input_topic, in_start, in_end))
    return {
        **latency_summary(lat),
        "rate_events_per_s": rate,
        **achieved_load(rate, produced, seconds, sent),
        **latency_breakdown(signals, appended, seconds),
        "phases": None if before is None or after is None else batch_phases(before, after),
        "cpu_cores": cpu_cores,
    }


#: After its last send, how long the read_committed level waits for the signals still owed (the
#: worker's commit interval and its last batches, with room for a slow machine).
VISIBLE_TAIL_S = 30.0


def visible_latency_ms(
    worker: BenchWorker, templates: Sequence[dict], rate: float, duration: float, tag: str
) -> dict:
    """Event -> signal latency as a downstream ``read_committed`` consumer sees it, events produced at
    ``rate`` for ``duration`` seconds into the worker's (empty) input topic.

    Under exactly-once a signal is visible only once the transaction holding it commits, which the
    worker's ``emitted_at`` cannot show: each signal's latency here is the wall clock when the consumer
    received it minus its event's ``ts`` (both clocks of this machine). ``unique`` counts the distinct
    events among the signals received (each exactly once when it equals ``n``); ``missing`` the events
    sent whose signal did not arrive within :data:`VISIBLE_TAIL_S` after the last send.
    """
    inputs = OffsetWatch(worker.bootstrap, worker.input_topic)
    try:
        in_start = inputs.ends()
        sent, seconds, seen = asyncio.run(
            _send_and_watch(
                worker.bootstrap, worker.input_topic, worker.signals_topic, templates, rate, duration, tag
            )
        )
        produced = sum(inputs.ends().values()) - sum(in_start.values())
    finally:
        inputs.close()
    if not seen:
        raise RuntimeError(f"no signal visible to a read_committed consumer within {VISIBLE_TAIL_S:.0f} s")
    signals = [(arrived, orjson.loads(value)) for arrived, value in seen]
    lat = np.array([(arrived - s["ts"]) * 1000.0 for arrived, s in signals])
    unique = len({s["event_id"] for _, s in signals})
    return {
        **latency_summary(lat),
        "rate_events_per_s": rate,
        **achieved_load(rate, produced, seconds, sent),
        "unique": unique,
        "missing": max(0, sent - unique),
        "isolation_level": "read_committed",
    }


async def _send_and_watch(
    bootstrap: str,
    input_topic: str,
    signals_topic: str,
    templates: Sequence[dict],
    rate: float,
    duration: float,
    tag: str,
) -> tuple[int, float, list[tuple[float, bytes]]]:
    """:func:`_paced_send` while a read_committed consumer reads ``signals_topic`` from its start:
    (events sent, send seconds, [(wall time received, signal value)]). The topic must hold this level's
    signals only (a fresh worker's)."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        group_id=None,
        enable_auto_commit=False,
        isolation_level="read_committed",
        auto_offset_reset="earliest",
        fetch_max_bytes=FETCH_MAX_BYTES,
    )
    await consumer.start()
    try:
        consumer.assign([TopicPartition(signals_topic, p) for p in range(PARTITIONS)])
        await consumer.seek_to_beginning()
        seen: list[tuple[float, bytes]] = []
        # until every event sent has its signal, or VISIBLE_TAIL_S after the last send
        until = {"signals": math.inf, "deadline": math.inf}

        async def watch() -> None:
            while len(seen) < until["signals"] and time.monotonic() < until["deadline"]:
                batch = await consumer.getmany(
                    timeout_ms=LATENCY_TICK_MS, max_records=PASSTHROUGH_MAX_RECORDS
                )
                now = time.time()
                seen.extend((now, m.value) for msgs in batch.values() for m in msgs)

        watcher = asyncio.ensure_future(watch())
        try:
            sent, seconds = await _paced_send(bootstrap, input_topic, templates, rate, duration, tag)
            until.update(signals=sent, deadline=time.monotonic() + VISIBLE_TAIL_S)
            await watcher
        finally:
            watcher.cancel()
        return sent, seconds, seen
    finally:
        await consumer.stop()


def _metrics_or_none(worker: BenchWorker) -> str | None:
    """The worker's /metrics, or None (logged) when it cannot be read: the phases are then not given,
    and the latency figures, which do not depend on them, still are."""
    try:
        return worker.metrics_text()
    except (OSError, RuntimeError) as exc:
        logger.warning("cannot read the worker's /metrics for the batch phases: %s", exc)
        return None


def batch_phases(before: str, after: str) -> dict[str, dict[str, float]]:
    """Per phase of ``demandstream_batch_phase_seconds``, the micro-batches between two scrapes of a
    worker's /metrics: their number and the mean, p50 and p99 duration in ms. Quantiles are estimated
    from the histogram's buckets as Prometheus' ``histogram_quantile`` does (linear inside the bucket).

    >>> def text(counts, seconds):
    ...     rows = [f'{_PHASES}_bucket{{le="{le}",phase="engine"}} {c}' for le, c in counts]
    ...     return chr(10).join([*rows, f'{_PHASES}_sum{{phase="engine"}} {seconds}'])
    >>> before = text([("0.01", 0), ("0.02", 0), ("+Inf", 0)], 0.0)
    >>> b = batch_phases(before, text([("0.01", 50), ("0.02", 100), ("+Inf", 100)], 1.2))
    >>> e = b["engine"]
    >>> e["batches"], round(e["mean_ms"], 1), round(e["p50_ms"], 1), round(e["p99_ms"], 1)
    (100, 12.0, 10.0, 19.8)
    """
    b, a = _phase_histograms(before), _phase_histograms(after)
    out = {}
    for phase, (buckets, total) in a.items():
        base, base_total = b.get(phase, ({}, 0.0))
        cum = sorted((le, c - base.get(le, 0.0)) for le, c in buckets.items())
        n = cum[-1][1] if cum else 0.0
        if n <= 0:
            continue
        out[phase] = {
            "batches": int(n),
            "mean_ms": 1000.0 * (total - base_total) / n,
            "p50_ms": 1000.0 * _bucket_quantile(0.5, cum),
            "p99_ms": 1000.0 * _bucket_quantile(0.99, cum),
        }
    return out


def _phase_histograms(text: str) -> dict[str, tuple[dict[float, float], float]]:
    """phase -> (cumulative count per upper bound, sum of seconds) of the phase histogram in ``text``."""
    out: dict[str, tuple[dict[float, float], float]] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name not in (_PHASES + "_bucket", _PHASES + "_sum"):
                continue
            phase = s.labels.get("phase")
            buckets, total = out.get(phase, ({}, 0.0))
            if s.name.endswith("_bucket"):
                buckets[float(s.labels["le"])] = s.value
            else:
                total = s.value
            out[phase] = (buckets, total)
    return out


_PHASES = "demandstream_batch_phase_seconds"


def _bucket_quantile(q: float, cum: list[tuple[float, float]]) -> float:
    """The q-quantile of cumulative bucket counts ``[(upper bound, count)]`` (sorted, +Inf last)."""
    rank = q * cum[-1][1]
    lower, below = 0.0, 0.0
    for le, count in cum:
        if count >= rank:
            if le == math.inf:  # above the last finite bound: that bound, as histogram_quantile
                return lower
            return lower + (le - lower) * ((rank - below) / (count - below) if count > below else 0.0)
        lower, below = le, count
    return lower


def latency_breakdown(signals: Sequence[dict], appended: dict[str, float], seconds: float) -> dict:
    """Where each event's latency went: the generator's leg (``ts`` -> the broker's append time) and the
    worker's (append -> ``emitted_at``: waiting for the fetch and the micro-batch before it, then its
    own batch's step), p50 and p99 of each in ms; and the worker's micro-batches (signals sharing one
    ``emitted_at`` were stepped together) per second and their median size. ``appended`` maps event
    ids to append times (s); without them (a topic that keeps the producer's timestamps) only the
    batch figures are given.

    >>> sig = [{"event_id": "a", "ts": 0.0, "emitted_at": 0.030}, {"event_id": "b", "ts": 0.010, "emitted_at": 0.030}]
    >>> b = latency_breakdown(sig, {"a": 0.005, "b": 0.012}, seconds=1.0)
    >>> round(b["produce_p50"], 1), round(b["worker_p99"], 1), b["batches_per_s"], b["batch_events_median"]
    (3.5, 24.9, 1.0, 2.0)
    """
    emitted = np.array([s["emitted_at"] for s in signals])
    _, sizes = np.unique(emitted, return_counts=True)
    out = {"batches_per_s": float(len(sizes) / seconds), "batch_events_median": float(np.median(sizes))}
    both = [(s["ts"], appended[s["event_id"]], s["emitted_at"]) for s in signals if s["event_id"] in appended]
    if both:
        ts, at, em = (np.array(c) for c in zip(*both, strict=True))
        for name, leg in (("produce", (at - ts) * 1000.0), ("worker", (em - at) * 1000.0)):
            out[f"{name}_p50"], out[f"{name}_p99"] = (float(v) for v in np.percentile(leg, [50, 99]))
    return out


# -- restore ----------------------------------------------------------------------------------------


def restore_seconds(worker: BenchWorker, record: bytes, n: int, baseline_startup_s: float) -> dict:
    """Pre-fill ``worker``'s changelog with ``n`` user states, start it on an empty data dir, time /readyz.

    The worker's start-up without a changelog (``baseline_startup_s``, from the drain runs: imports,
    model load, group join) is subtracted, leaving the time Faust's recovery spends on the records.
    """
    changelog = f"{worker.app_id}-user-state-changelog"
    create_topics(
        worker.bootstrap, [changelog, worker.input_topic, worker.signals_topic, f"bench-dlq-{worker.tag}"]
    )
    produce(worker.bootstrap, changelog, ((f"r{i:08d}".encode(), record) for i in range(n)), spread=True)
    ready = ready_rss_mib(worker, timeout=RESTORE_TIMEOUT_S)
    startup = ready["startup_seconds"]
    restore = max(startup - baseline_startup_s, 1e-9)
    return {
        "records": n,
        "startup_seconds": startup,
        "baseline_startup_seconds": baseline_startup_s,
        "restore_seconds": restore,
        "seconds_per_million_users": restore * 1e6 / n,
        "rss_mib": ready["rss_mib"],  # MEMORY_SETTLE_S after /readyz, all n states restored
    }


# -- profile ----------------------------------------------------------------------------------------


def profile(pid: int, seconds: float, raw_out: Path) -> None:
    """Record ``seconds`` of py-spy samples of ``pid`` (all threads, non-blocking) as collapsed stacks."""
    py_spy = Path(sys.executable).with_name("py-spy")
    cmd = [
        str(py_spy),
        "record",
        "--pid",
        str(pid),
        "--duration",
        str(int(seconds)),
        "--rate",
        "100",
        "--nonblocking",
        "--threads",
        "--format",
        "raw",
        "--output",
        str(raw_out),
    ]
    subprocess.run(cmd, check=True, capture_output=True, timeout=seconds + 60)


_LINE = re.compile(r":\d+\)$")


def summarize_profile(raw: str, top: int = 40) -> tuple[str, list[tuple[str, float, float]]]:
    """Top functions of py-spy's collapsed stacks: (text table, [(frame, self %, total %)]).

    >>> text, rows = summarize_profile("t;a (x.py:1);b (x.py:2) 2\\nt;a (x.py:1);b (x.py:3) 1\\nt;a (x.py:1) 1\\n")
    >>> rows[0]
    ('b (x.py)', 75.0, 75.0)
    """
    own: Counter[str] = Counter()
    total: Counter[str] = Counter()
    threads: Counter[str] = Counter()
    n = 0
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        c = int(count)
        # py-spy names frames "function (file:line)"; one function is one row, whichever line was running.
        frames = [_LINE.sub(")", f) for f in stack.split(";")]
        n += c
        threads[frames[0]] += c
        if len(frames) > 1:  # a bare thread frame is a sample outside any Python function
            own[frames[-1]] += c
        for f in set(frames[1:]):
            total[f] += c
    if n == 0:
        return "no samples\n", []
    rows = [(f, 100.0 * c / n, 100.0 * total[f] / n) for f, c in own.most_common(top)]
    lines = [f"{n} samples", "", "threads (share of samples):"]
    lines += [f"  {100.0 * c / n:6.1f} %  {t}" for t, c in threads.most_common()]
    lines += ["", f"top {top} functions by own time (self %, total %):"]
    lines += [f"  {s:6.1f}  {t:6.1f}  {f}" for f, s, t in rows]
    lines += ["", f"top {top} functions by total time (total %):"]
    lines += [f"  {100.0 * c / n:6.1f}  {f}" for f, c in total.most_common(top)]
    return "\n".join(lines) + "\n", rows
