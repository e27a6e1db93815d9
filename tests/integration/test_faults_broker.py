"""Broker loss: one of three brokers is SIGKILLed mid-stream and restarted later; nothing is lost.

Under both guarantees: under exactly_once the dead broker may also lead the transaction coordinator's
partitions, so the worker's open transactions must survive a coordinator move.

A separate 3-broker KRaft cluster (its own port, started and stopped by this module) holds every topic
with replication factor 3 (min.insync.replicas 2, acks=all), so losing one broker costs leader
elections and retries, never an acknowledged record.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator

import pytest

from demandstream.model.data.synth import write_jsonl
from demandstream.stream.admin import changelog_topic, topic_replication
from demandstream.stream.settings import Settings
from tests.conftest import KAFKA_SH
from tests.integration.faults import (
    FAULT_ENV,
    FaultReport,
    Replayer,
    check_invariants,
    reference_states,
    synth_events,
)

pytestmark = [pytest.mark.kafka, pytest.mark.slow, pytest.mark.timeout(900)]

#: Client port of node 0 of the fault cluster (nodes use 19692..19694); away from the session broker.
CLUSTER_PORT = int(os.environ.get("DEMANDSTREAM_TEST_KAFKA3_PORT", "19692"))
#: Three cold JVMs on 2 shared cores take much longer than one to start.
CLUSTER_START_TIMEOUT_S = 150
N_USERS, N_EVENTS, SEED = 1000, 15_000, 13
RATE = 250
#: The broker that dies (0-based) and when, as fractions of the replay's duration.
VICTIM, DOWN, UP = 1, 0.3, 0.65


def kafka_sh(*args: str, timeout: float) -> None:
    env = os.environ | {"DEMANDSTREAM_KAFKA_START_TIMEOUT": str(CLUSTER_START_TIMEOUT_S)}
    subprocess.run([str(KAFKA_SH), *args, "--port", str(CLUSTER_PORT)], check=True, timeout=timeout, env=env)


@pytest.fixture(scope="module")
def cluster3() -> Iterator[list[str]]:
    kafka_sh("up", "--brokers", "3", "--fresh", timeout=4 * CLUSTER_START_TIMEOUT_S)
    try:
        yield [f"127.0.0.1:{CLUSTER_PORT + i}" for i in range(3)]
    finally:
        kafka_sh("down", timeout=180)


@pytest.mark.parametrize("guarantee", ["at_least_once", "exactly_once"])
def test_broker_loss(guarantee, cluster3, worker_factory, stream_env, small_model, tmp_path):
    started = time.time()
    env = {
        "DEMANDSTREAM_GUARANTEE": guarantee,
        "DEMANDSTREAM_BROKER": "kafka://" + ",".join(cluster3),
        # DEMANDSTREAM_REPLICATION unset: the topics take the cluster's default.replication.factor (3)
        **FAULT_ENV,
    }
    s = Settings.from_env(stream_env | env)
    events = synth_events(N_USERS, N_EVENTS, SEED)
    data = tmp_path / "events.jsonl"
    write_jsonl(events, data)
    reference_states(small_model, events)

    w = worker_factory(**env).start()
    w.wait_ready()
    rep = Replayer(s, data, RATE)
    rep.start()
    t0, duration = time.time(), N_EVENTS / RATE
    time.sleep(max(0.0, t0 + DOWN * duration - time.time()))
    kill_t = time.time()
    kafka_sh("stop-broker", str(VICTIM), timeout=60)
    faults = [f"broker {VICTIM} SIGKILL at {kill_t - t0:.1f} s"]
    time.sleep(max(0.0, t0 + UP * duration - time.time()))
    kafka_sh("start-broker", str(VICTIM), timeout=2 * CLUSTER_START_TIMEOUT_S)
    faults.append(f"broker {VICTIM} restarted at {time.time() - t0:.1f} s")
    sent = rep.finish(timeout=300)
    assert sent == N_EVENTS

    report = FaultReport("broker loss (1 of 3)", s.guarantee, N_EVENTS, N_USERS, faults=faults)
    check_invariants(
        report,
        bootstrap=cluster3,
        settings=s,
        model_path=small_model,
        events=events,
        records_in=sent,
        kill_times=[kill_t],
        started=started,
        served=w.get,
    )
    assert w.proc.poll() is None, "the worker died with the broker"
    # every topic the worker and Faust created is replicated as the cluster's default says
    for topic in (s.topic_input, s.topic_signals, s.topic_dlq, s.topic_control, changelog_topic(s)):
        assert topic_replication(s, topic) == 3, topic
