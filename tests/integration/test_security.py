"""Kafka security from settings: a worker, replay and admin over SASL_SSL (SCRAM-SHA-512 + TLS).

The broker is the project's own, started with a SASL_SSL listener whose certificate is generated for
this test (deploy/kafka/kafka.sh --sasl-ssl-port: a fresh CA per cluster, the SCRAM user created at
format time). The PLAINTEXT listener stays for reading results back.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import orjson
import pytest

from demandstream.model.data.synth import generate, write_jsonl
from demandstream.stream.admin import KafkaUnavailable, ensure_topics
from demandstream.stream.settings import Settings
from demandstream.stream.tools.replay import replay
from tests.conftest import KAFKA_SH
from tests.helpers import read_topic

pytestmark = [pytest.mark.kafka, pytest.mark.slow, pytest.mark.timeout(400)]

PORT = int(os.environ.get("DEMANDSTREAM_TEST_SASL_KAFKA_PORT", "19792"))
SASL_PORT = PORT + 100
ADMIN_USER, ADMIN_PASSWORD = "admin", "admin-secret"  # created by kafka.sh at format time


@pytest.fixture(scope="module")
def sasl_cluster(tmp_path_factory):
    run = tmp_path_factory.mktemp("kafka-sasl")
    env = dict(os.environ, DEMANDSTREAM_KAFKA_RUN=str(run), DEMANDSTREAM_KAFKA_START_TIMEOUT="150")
    subprocess.run(
        [str(KAFKA_SH), "up", "--fresh", "--port", str(PORT), "--sasl-ssl-port", str(SASL_PORT)],
        check=True,
        timeout=300,
        env=env,
    )
    try:
        yield Path(run) / f"kafka-{PORT}" / "ca.pem"
    finally:
        subprocess.run([str(KAFKA_SH), "down", "--port", str(PORT)], timeout=120, env=env)


def test_worker_and_tools_over_sasl_ssl(sasl_cluster, worker_factory, stream_env, tmp_path):
    ca = sasl_cluster
    assert ca.is_file()
    secure = {
        "DEMANDSTREAM_BROKER": f"kafka://127.0.0.1:{SASL_PORT}",
        "DEMANDSTREAM_SECURITY_PROTOCOL": "SASL_SSL",
        "DEMANDSTREAM_SASL_MECHANISM": "SCRAM-SHA-512",
        "DEMANDSTREAM_SASL_USERNAME": ADMIN_USER,
        "DEMANDSTREAM_SASL_PASSWORD": ADMIN_PASSWORD,
        "DEMANDSTREAM_SSL_CAFILE": str(ca),
    }
    env = dict(stream_env, **secure)
    s = Settings.from_env(env)
    ensure_topics(s)  # the admin client authenticates too
    data = tmp_path / "events.jsonl"
    write_jsonl(generate(50, 800, seed=3), data)

    w = worker_factory(**secure).start()
    w.wait_ready()
    assert replay(s, [data], "jsonl", progress=False).sent == 800
    signals = read_topic(f"127.0.0.1:{PORT}", s.topic_signals, until=lambda r: len(r) >= 800, timeout=180)
    assert len({orjson.loads(r.value)["event_id"] for r in signals}) == 800

    # a wrong password is refused: one clear error, no hang (bounded by the client's timeout)
    bad = s.with_(sasl_password="wrong")
    with pytest.raises(KafkaUnavailable, match="authenticate"):
        ensure_topics(bad)
