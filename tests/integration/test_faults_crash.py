"""Worker crash: SIGKILL the only worker three times mid-stream; nothing is lost or applied twice.

A steady replay runs in the background; at three seeded random moments the worker's process group is
SIGKILLed and a new worker starts on the same data dir (its RocksDB survives, as on a real node).
Under ``at_least_once`` an event may be signalled twice but is applied to its user's state once; under
``exactly_once`` a ``read_committed`` consumer sees exactly one signal per event.
"""

from __future__ import annotations

import random
import time

import pytest

from demandstream.model.data.synth import write_jsonl
from demandstream.stream.settings import Settings
from tests.integration.faults import (
    FAULT_ENV,
    FaultReport,
    Replayer,
    check_invariants,
    reference_states,
    synth_events,
)

pytestmark = [pytest.mark.kafka, pytest.mark.slow, pytest.mark.timeout(900)]

#: The issue's floor: at least 50,000 events for at least 2,000 users.
N_USERS, N_EVENTS, SEED = 2000, 50_000, 11
#: Replay rate (events/s) by guarantee: the stream (50 s, 83 s) must outlast three kills and their recoveries, so
#: that every recovery is measured before the next kill (about 10 s each at-least-once, 25 s
#: exactly-once, where Faust waits two 5-s idle polls to see the changelog's last transaction marker),
#: and be slow enough that one worker on 2 shared cores catches up between kills.
RATE = {"at_least_once": 1000, "exactly_once": 600}
#: Kill i falls at KILL_AT[i] ± KILL_JITTER of the replay's duration (seeded): each one interrupts live
#: traffic, and they are far enough apart that the worker recovers (and its recovery is measured)
#: before the next one.
KILL_AT, KILL_JITTER = (0.15, 0.45, 0.75), 0.05
#: ... and never sooner than this after the restarted worker reported ready (recovery done): time for
#: it to seek, fetch and emit on every partition, so one recovery is measured before the next kill.
SETTLE_S = 6.0


@pytest.mark.parametrize("guarantee", ["at_least_once", "exactly_once"])
def test_worker_crash(guarantee, worker_factory, stream_env, kafka_bootstrap, small_model, tmp_path):
    started = time.time()
    env = {"DEMANDSTREAM_GUARANTEE": guarantee, **FAULT_ENV}
    s = Settings.from_env(stream_env | env)
    events = synth_events(N_USERS, N_EVENTS, SEED)
    data = tmp_path / "events.jsonl"
    write_jsonl(events, data)
    reference_states(small_model, events)  # computed before the worker competes for the cores

    same_node = {
        "DEMANDSTREAM_WEB_PORT": stream_env["DEMANDSTREAM_WEB_PORT"],
        "DEMANDSTREAM_DATA_DIR": stream_env["DEMANDSTREAM_DATA_DIR"],
    }
    worker = worker_factory(**env, **same_node).start()
    worker.wait_ready()
    rep = Replayer(s, data, RATE[guarantee])
    rep.start()
    duration = N_EVENTS / RATE[guarantee]
    rng = random.Random(f"{SEED}-{guarantee}")
    moments = [(f + rng.uniform(-KILL_JITTER, KILL_JITTER)) * duration for f in KILL_AT]
    kills, faults = [], []
    t0 = ready = time.time()
    for m in moments:
        time.sleep(max(0.0, t0 + m - time.time(), ready + SETTLE_S - time.time()))
        assert worker.proc.poll() is None, f"the worker died before its SIGKILL:\n{worker.log_tail()}"
        kills.append(time.time())
        worker.kill()
        faults.append(f"SIGKILL at {kills[-1] - t0:.1f} s")
        worker = worker_factory(**env, **same_node).start()
        worker.wait_ready()
        ready = time.time()
    sent = rep.finish(timeout=300)
    assert sent == N_EVENTS

    report = FaultReport("worker crash", guarantee, N_EVENTS, N_USERS, faults=faults)
    check_invariants(
        report,
        bootstrap=kafka_bootstrap,
        settings=s,
        model_path=small_model,
        events=events,
        records_in=sent,
        kill_times=kills,
        started=started,
        served=worker.get,
    )
    assert all(t < 120 for t in report.recovery_s), report.recovery_s
    assert worker.proc.poll() is None, f"the last worker died:\n{worker.log_tail()}"
