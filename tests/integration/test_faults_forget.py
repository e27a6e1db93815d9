"""``demandstream forget USER`` end to end: a tombstone in the changelog and a 404 from the worker.

The erasure request travels through the input topic behind the user's events; afterwards the user's
latest changelog record is a tombstone (so compaction removes the state from Kafka), the worker answers
404 for the user, and every other user keeps its state.
"""

from __future__ import annotations

import collections
import subprocess
import sys
import time

import pytest

from demandstream.model.core.state import unpack
from demandstream.model.data.synth import generate, write_jsonl
from demandstream.stream.settings import Settings
from demandstream.stream.tools.replay import replay
from tests.conftest import REPO
from tests.integration.faults import TopicReader, changelog_topic, latest_states, wait_until

pytestmark = [pytest.mark.kafka, pytest.mark.slow, pytest.mark.timeout(300)]

N_USERS, N_EVENTS = 50, 1000


def test_forget_user_end_to_end(worker_factory, stream_env, kafka_bootstrap, tmp_path):
    s = Settings.from_env(stream_env)
    events = list(generate(N_USERS, N_EVENTS, seed=3))
    data = tmp_path / "events.jsonl"
    write_jsonl(events, data)
    counts = collections.Counter(e.user_id for e in events)
    victim = counts.most_common(1)[0][0]

    w = worker_factory().start()
    w.wait_ready()
    replay(s, [data], "jsonl", progress=False)
    reader = TopicReader(kafka_bootstrap, changelog_topic(s))
    try:

        def all_applied(recs: list) -> bool:
            latest = latest_states(recs)
            return all(latest.get(u) and unpack(latest[u]).events_seen == n for u, n in counts.items())

        reader.read_until(all_applied, 120, idle_s=1)
        assert all_applied(reader.records)
        status, body = w.get(f"/users/{victim}/demand")
        assert status == 200, body

        t0 = time.time()
        proc = subprocess.run(
            [sys.executable, "-m", "demandstream.stream", "forget", victim],
            env=stream_env,
            cwd=REPO,
            capture_output=True,
            timeout=60,
        )
        assert proc.returncode == 0, proc.stderr.decode()

        reader.read_until(lambda recs: latest_states(recs).get(victim, b"") is None, 60, idle_s=1)
        latest = latest_states(reader.records)
    finally:
        reader.close()
    assert victim in latest and latest[victim] is None, (
        "the user's latest changelog record is not a tombstone"
    )
    wait_until(lambda: w.get(f"/users/{victim}/demand")[0] == 404, 30, "404 for the forgotten user")
    erased_s = time.time() - t0
    others = [u for u in counts if u != victim]
    assert all(latest[u] is not None and unpack(latest[u]).events_seen == counts[u] for u in others)
    assert w.get(f"/users/{others[0]}/demand")[0] == 200
    print(
        f"\nFAULT FIGURES forget: {counts[victim]} events of the user erased, tombstone + 404 in {erased_s:.1f} s"
    )
