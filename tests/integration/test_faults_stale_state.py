"""A data directory kept across a wiped broker: the worker refuses its stale state in one line.

A developer recreates the broker (``kafka.sh up --fresh``) or points the worker at another cluster and
keeps ``DEMANDSTREAM_DATA_DIR``: its RocksDB then holds states whose changelog offsets the new topic
never had. Faust's recovery refuses them (a ``ConsistencyError``, its traceback logged); the worker
must end with the user's remedy in one line and exit status 2, not only with a crash.
"""

from __future__ import annotations

import time

import pytest
from kafka.admin import KafkaAdminClient

from demandstream.model.core.events import Event
from demandstream.stream.settings import Settings
from tests.helpers import read_topic, send_events
from tests.integration.faults import changelog_topic

pytestmark = [pytest.mark.kafka, pytest.mark.slow, pytest.mark.timeout(300)]

#: Bound for the deleted topic to leave the broker's metadata, and for the second worker to end.
GONE_TIMEOUT_S = 60
EXIT_TIMEOUT_S = 120
USERS = [f"u{i}" for i in range(32)]  # enough for every partition
EVENTS_PER_USER = 4


def _delete_topic(bootstrap: str, topic: str) -> None:
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        admin.delete_topics([topic])
        deadline = time.monotonic() + GONE_TIMEOUT_S
        while topic in admin.list_topics():
            assert time.monotonic() < deadline, f"{topic} still listed {GONE_TIMEOUT_S} s after its deletion"
            time.sleep(0.5)
    finally:
        admin.close()


def test_a_worker_whose_changelog_was_deleted_refuses_its_local_state_in_one_line(
    worker_factory, stream_env, kafka_bootstrap
):
    settings = Settings.from_env(stream_env)
    first = worker_factory().start()
    first.wait_ready()
    events = [
        Event(f"e-{u}-{i}", u, 1.75e9 + i, "view", f"i{i}", "shoes", 5.0)
        for i in range(EVENTS_PER_USER)
        for u in USERS
    ]
    send_events(settings.bootstrap_servers, settings.topic_input, events)
    signals = read_topic(kafka_bootstrap, settings.topic_signals, until=lambda r: len(r) >= len(events))
    assert len(signals) >= len(events)
    first.stop(timeout=30)  # graceful: the local store keeps its states and their changelog offsets

    _delete_topic(kafka_bootstrap, changelog_topic(settings))
    second = worker_factory(DEMANDSTREAM_DATA_DIR=stream_env["DEMANDSTREAM_DATA_DIR"]).start()
    deadline = time.monotonic() + EXIT_TIMEOUT_S
    while second.poll() is None:
        assert time.monotonic() < deadline, f"the worker still runs:\n{second.log_tail()}"
        time.sleep(0.5)
    assert second.returncode == 2, second.log_tail()
    last = second.log_tail(1)
    assert last.startswith("demandstream worker: error: the local state in "), last
    assert "is ahead of its changelog topic" in last and "delete" in last, last
