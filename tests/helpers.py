"""Helpers for tests that talk to the real broker (kafka-python, bounded waits)."""

from __future__ import annotations

import time
from collections.abc import Callable

from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from demandstream.model.core.events import Event, event_to_json


def read_topic(
    bootstrap: str,
    topic: str,
    until: Callable[[list], bool] | None = None,
    timeout: float = 120.0,
    isolation: str = "read_uncommitted",
    idle_s: float | None = None,
) -> list:
    """All records of ``topic`` from the beginning, until ``until(records)`` is true or ``timeout``.

    With ``idle_s``, also stop once nothing new arrived for that long (to catch extra records after
    the expected count was reached).
    """
    c = KafkaConsumer(
        bootstrap_servers=[bootstrap],
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        isolation_level=isolation,
        consumer_timeout_ms=1000,
    )
    deadline = time.monotonic() + timeout
    while True:
        parts = c.partitions_for_topic(topic)
        if parts or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    c.assign([TopicPartition(topic, p) for p in sorted(parts or [])])
    c.seek_to_beginning()
    out: list = []
    last_new = time.monotonic()
    reached = False
    try:
        while time.monotonic() < deadline:
            polled = c.poll(timeout_ms=500, max_records=5000)
            got = sum(len(v) for v in polled.values())
            for recs in polled.values():
                out.extend(recs)
            if got:
                last_new = time.monotonic()
            if not reached and until is not None and until(out):
                reached = True
                if idle_s is None:
                    break
            if reached and idle_s is not None and time.monotonic() - last_new > idle_s:
                break
            if until is None and idle_s is not None and time.monotonic() - last_new > idle_s:
                break
    finally:
        c.close()
    return out


def latest_by_key(records: list) -> dict:
    """Compacted view: the last value per key (None = tombstone)."""
    out = {}
    for r in records:
        out[r.key] = r.value
    return out


def commit_offsets(bootstrap: str, group: str, topic: str, offsets: dict[int, int]) -> None:
    """Rewind (or advance) a consumer group's committed offsets; the group must have no live member."""
    from kafka.structs import OffsetAndMetadata

    c = KafkaConsumer(bootstrap_servers=[bootstrap], group_id=group, enable_auto_commit=False)
    try:
        tps = {TopicPartition(topic, p): OffsetAndMetadata(o, "", -1) for p, o in offsets.items()}
        c.assign(list(tps))
        c.commit(tps)
    finally:
        c.close()


def send_events(bootstrap_servers, topic: str, events: list[Event]) -> None:
    """Produce ``events`` to ``topic`` keyed by user, as a shop does, and wait until all are sent."""
    p = KafkaProducer(bootstrap_servers=bootstrap_servers)
    for e in events:
        p.send(topic, key=e.user_id.encode(), value=event_to_json(e))
    p.flush(30)
    p.close()


def user_error_line(worker, timeout: float = 60.0, crashed: bool = False) -> str:
    """Wait for ``worker`` (a :class:`~demandstream.stream.worker.launcher.WorkerLauncher`) to end, and
    return the one line it ended with; it must have exited with status 2, and with no traceback in its
    log unless it ``crashed`` once running (Faust logs the crash of a service before the worker stops
    and names the user's mistake)."""
    deadline = time.monotonic() + timeout
    while worker.poll() is None:
        assert time.monotonic() < deadline, f"the worker still runs:\n{worker.log_tail()}"
        time.sleep(0.5)
    assert worker.returncode == 2, worker.log_tail()
    assert crashed or "Traceback" not in worker.log_tail(), worker.log_tail()
    return worker.log_tail(1)
