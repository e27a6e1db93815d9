"""Redelivery: the same records consumed twice leave every user's state as if consumed once.

The worker processes a stream, stops; the consumer group is rewound to offset 0 (what a crash before
the offset commit looks like to the next worker); the worker starts again on its own RocksDB and
re-reads everything. Each user's state records the last offset applied, so nothing is applied twice:
the changelog (the durable state) is byte-identical and no new signal appears.
"""

from __future__ import annotations

import time

import pytest

from demandstream.model.core.state import unpack
from demandstream.model.data.synth import generate, write_jsonl
from demandstream.stream.engine.records import STATE_KEY_PREFIX
from demandstream.stream.settings import Settings
from demandstream.stream.tools.replay import replay
from tests.helpers import commit_offsets, latest_by_key, read_topic

pytestmark = [pytest.mark.kafka, pytest.mark.slow, pytest.mark.timeout(400)]

N_USERS, N_EVENTS = 100, 3000


def changelog_topic(s: Settings) -> str:
    return f"{s.app_id}-{s.table}-changelog"


def test_redelivered_events_are_not_applied_twice(worker_factory, stream_env, kafka_bootstrap, tmp_path):
    s = Settings.from_env(stream_env)
    data = tmp_path / "events.jsonl"
    write_jsonl(generate(N_USERS, N_EVENTS, seed=5), data)

    w = worker_factory().start()
    w.wait_ready()
    replay(s, [data], "jsonl", progress=False)
    signals = read_topic(kafka_bootstrap, s.topic_signals, until=lambda r: len(r) >= N_EVENTS, timeout=180)
    assert len(signals) == N_EVENTS
    w.stop()
    assert w.proc.returncode is not None

    before = latest_by_key(read_topic(kafka_bootstrap, changelog_topic(s), idle_s=3, timeout=60))
    users = {k: v for k, v in before.items() if k.startswith(STATE_KEY_PREFIX)}  # not the d: aggregates
    assert len(users) == N_USERS
    assert sum(unpack(v).events_seen for v in users.values()) == N_EVENTS

    # Rewind the group: the next worker receives every record again.
    commit_offsets(kafka_bootstrap, s.app_id, s.topic_input, dict.fromkeys(range(s.partitions), 0))
    w2 = worker_factory(
        DEMANDSTREAM_WEB_PORT=stream_env["DEMANDSTREAM_WEB_PORT"],
        DEMANDSTREAM_DATA_DIR=stream_env["DEMANDSTREAM_DATA_DIR"],
    ).start()
    w2.wait_ready()
    deadline = time.monotonic() + 120
    while (
        time.monotonic() < deadline and w2.metric("demandstream_events_total", result="duplicate") < N_EVENTS
    ):
        time.sleep(0.5)
    assert w2.metric("demandstream_events_total", result="duplicate") == N_EVENTS
    assert w2.metric("demandstream_events_total", result="valid") == 0
    w2.stop()

    after = latest_by_key(read_topic(kafka_bootstrap, changelog_topic(s), idle_s=3, timeout=60))
    assert after == before
    again = read_topic(kafka_bootstrap, s.topic_signals, idle_s=3, timeout=60)
    assert len(again) == N_EVENTS  # no signal for an event already applied
