"""``demandstream replay``: a log file -> the input topic, keyed by user, optionally rate-limited.

JSONL lines are sent byte for byte (a malformed line reaches the worker as it is and becomes a dead
letter there, which is how a shop's broken producer would look); REES46 and RetailRocket rows are
converted to our schema first.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import orjson
from kafka import KafkaProducer

from demandstream.model.core.events import event_to_json
from demandstream.model.data.loaders import open_binary
from demandstream.stream.admin import UNREACHABLE, KafkaUnavailable, ensure_topics, unreachable_message
from demandstream.stream.partitioner import key_partition
from demandstream.stream.settings import Settings

logger = logging.getLogger(__name__)


@dataclass
class ReplayStats:
    sent: int = 0
    seconds: float = 0.0

    @property
    def rate(self) -> float:
        return self.sent / self.seconds if self.seconds > 0 else 0.0


def user_key(line: bytes) -> bytes | None:
    """The user_id of a JSON line as the record key, or None when the line has none."""
    try:
        obj = orjson.loads(line)
    except orjson.JSONDecodeError:
        return None
    uid = obj.get("user_id") if isinstance(obj, dict) else None
    return uid.encode("utf-8") if isinstance(uid, str) else None


def records(paths: Sequence[Path], fmt: str) -> Iterator[tuple[bytes | None, bytes]]:
    """(key, value) pairs to send, in file order."""
    if fmt == "auto":
        from demandstream.model.data.loaders import detect_format

        fmt = detect_format(list(paths))
    if fmt == "jsonl":
        for p in paths:
            with open_binary(p) as fh:  # gzip told by content, as training reads it
                for line in fh:
                    line = line.rstrip(b"\r\n")
                    if line:
                        yield user_key(line), line
        return
    from demandstream.model.data.loaders import load_log

    log = load_log(list(paths), fmt)
    import numpy as np

    for i in np.argsort(log.ts, kind="stable"):
        e = log.event(int(i))
        yield e.user_id.encode("utf-8"), event_to_json(e)


def make_producer(settings: Settings) -> KafkaProducer:
    try:
        return KafkaProducer(
            bootstrap_servers=settings.bootstrap_servers,
            client_id="demandstream-replay",
            acks="all",
            linger_ms=5,
            batch_size=256 * 1024,
            **settings.kafka_python_security(),
        )
    except UNREACHABLE:
        raise KafkaUnavailable(unreachable_message(settings)) from None


def replay(
    settings: Settings,
    paths: Sequence[Path],
    fmt: str = "jsonl",
    rate: float | None = None,
    topic: str | None = None,
    progress: bool = True,
    limit: int | None = None,
) -> ReplayStats:
    """Send every record of the files to ``topic`` (default: the input topic); block until acknowledged."""
    topic = topic or settings.topic_input
    if topic == settings.topic_input:
        ensure_topics(settings)  # never let a first replay auto-create (or fail on) a 1-partition topic
    producer = make_producer(settings)
    # Keyed records go where the shop's producers would put them (DEMANDSTREAM_PARTITIONER), so that
    # forget and the view find the user; murmur2 is the client's own default
    n_partitions = None
    if settings.partitioner != "murmur2":
        n_partitions = len(producer.partitions_for(topic))
    stats = ReplayStats()
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(unit="ev", desc=f"replay -> {topic}", smoothing=0.1)
    t0 = time.perf_counter()
    try:
        for key, value in records(paths, fmt):
            if limit is not None and stats.sent >= limit:
                break
            partition = None
            if n_partitions is not None and key:
                partition = key_partition(key, n_partitions, settings.partitioner)
            producer.send(topic, key=key, value=value, partition=partition)
            stats.sent += 1
            if bar is not None and stats.sent % 256 == 0:
                bar.update(256)
            if rate:
                ahead = stats.sent / rate - (time.perf_counter() - t0)
                if ahead > 0:
                    time.sleep(ahead)
        producer.flush()
    finally:
        producer.close()
        if bar is not None:
            bar.update(stats.sent % 256)
            bar.close()
    stats.seconds = time.perf_counter() - t0
    return stats
