"""The bench's broker and its topics: the broker it measures against, topic creation, end offsets and
committed records, and producing the generated events.

Everything here talks to one real broker, normally the bench's own, started with deploy/kafka/kafka.sh on
a dedicated port (docs/BENCHMARKS.md §Method).
"""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import orjson

from demandstream.stream.settings import Settings

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
#: Records per consumer fetch when the bench reads a topic back.
READ_MAX_RECORDS = 5000
#: How often readiness and topic end offsets are polled while a measurement is timed.
POLL_S = 0.05
#: Bound on waiting for a measured topic to receive what it is owed.
DRAIN_TIMEOUT_S = 900
#: Fetch sizes large enough that one fetch carries a whole batch of 5000 small events.
FETCH_MAX_BYTES = 16 * 1024 * 1024
#: Bounds on counting a topic's committed records (exactly-once drain): in all, and without a new record.
COUNT_TIMEOUT_S = 120.0
COUNT_IDLE_S = 2.0


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


def create_changelog(bootstrap: str, name: str, partitions: int = PARTITIONS) -> None:
    """A table changelog as the worker creates it: compacted (the worker refuses one that deletes states)."""
    from demandstream.stream.admin import changelog_topic_configs

    create_topics(bootstrap, [name], partitions, changelog_topic_configs(Settings()))


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
            polled = consumer.poll(timeout_ms=200, max_records=READ_MAX_RECORDS)
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
