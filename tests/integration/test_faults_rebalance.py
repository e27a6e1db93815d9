"""Rebalance: a second worker joins mid-stream, leaves gracefully, rejoins, then the first is SIGKILLed.

Partitions move between workers three times while traffic flows; each move restores the new owner's
state from the changelog (and standby replicas, DEMANDSTREAM_STANDBY_REPLICAS=1). The final state of
every user must still equal an uninterrupted run, and no event may lose its signal (exactly one
visible to read_committed under exactly-once). Both guarantees: under exactly-once this test found
Faust recovering a re-assigned partition against a highwater of -1 (stream/worker/faust_patches.py).
"""

from __future__ import annotations

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

pytestmark = [pytest.mark.kafka, pytest.mark.slow, pytest.mark.timeout(600)]

#: Smaller than the crash test: two workers, the broker and the replay share 2 cores here.
N_USERS, N_EVENTS, SEED = 1000, 15_000, 12
RATE = 250
#: When each step happens, as a fraction of the replay's duration.
JOIN, LEAVE, REJOIN, KILL = 0.15, 0.4, 0.55, 0.7


@pytest.mark.parametrize("guarantee", ["at_least_once", "exactly_once"])
def test_rebalance(guarantee, worker_factory, stream_env, kafka_bootstrap, small_model, tmp_path):
    started = time.time()
    env = {"DEMANDSTREAM_GUARANTEE": guarantee, "DEMANDSTREAM_STANDBY_REPLICAS": "1", **FAULT_ENV}
    s = Settings.from_env(stream_env | env)
    events = synth_events(N_USERS, N_EVENTS, SEED)
    data = tmp_path / "events.jsonl"
    write_jsonl(events, data)
    reference_states(small_model, events)

    a = worker_factory(**env).start()
    a.wait_ready()
    rep = Replayer(s, data, RATE)
    rep.start()
    t0, duration = time.time(), N_EVENTS / RATE
    faults = []

    def at(fraction: float, what: str) -> None:
        time.sleep(max(0.0, t0 + fraction * duration - time.time()))
        faults.append(f"{what} at {time.time() - t0:.1f} s")

    at(JOIN, "second worker joins")
    b = worker_factory(**env).start()
    b.wait_ready()
    at(LEAVE, "second worker stops (SIGTERM)")
    b.stop()
    assert b.proc.returncode is not None
    at(REJOIN, "second worker rejoins")
    b2 = worker_factory(
        **env,
        DEMANDSTREAM_WEB_PORT=b.env["DEMANDSTREAM_WEB_PORT"],
        DEMANDSTREAM_DATA_DIR=b.env["DEMANDSTREAM_DATA_DIR"],
    ).start()
    b2.wait_ready()
    at(KILL, "first worker SIGKILL")
    # a worker that died by itself on a partition move would be a bug this SIGKILL must not hide
    assert a.proc.poll() is None, f"the first worker died before its SIGKILL:\n{a.log_tail()}"
    kill_t = time.time()
    a.kill()
    sent = rep.finish(timeout=300)
    assert sent == N_EVENTS

    report = FaultReport("rebalance", s.guarantee, N_EVENTS, N_USERS, faults=faults)
    check_invariants(
        report,
        bootstrap=kafka_bootstrap,
        settings=s,
        model_path=small_model,
        events=events,
        records_in=sent,
        kill_times=[kill_t],
        started=started,
        served=b2.get,
    )
    assert b2.proc.poll() is None, f"the surviving worker died:\n{b2.log_tail()}"
