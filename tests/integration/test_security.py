"""Security on the real broker: Kafka over SASL_SSL, and the worker's HTTP API (token, routing, views).

Kafka: a worker, replay and admin over SASL_SSL (SCRAM-SHA-512 + TLS) and over mutual TLS (a client
certificate). The broker is the project's own, started with a SASL_SSL listener and a mutual-TLS
listener whose certificates are generated for this test (deploy/kafka/kafka.sh --sasl-ssl-port: a fresh
CA per cluster, the SCRAM users created at format time). The PLAINTEXT listener
stays for reading results back.

ACLs: the cluster runs Kafka's StandardAuthorizer; a second SCRAM user with no rights of its own is
granted, one step at a time, what docs/OPERATIONS.md §ACLs lists, and the worker names each right it
still lacks in one line, then runs without ever holding CREATE once `demandstream topics` has created
its topics as the administrator.

HTTP: two workers on the same port at two addresses (as two pods), each advertising its own URL, with a
bearer token: a request for a user is answered by either worker (the one that does not own the user forwards it
to the owner's advertised URL) with the token, 401 without it; Faust's /table and /router views are gone.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import orjson
import pytest
from kafka.admin import (
    ACL,
    ACLOperation,
    ACLPermissionType,
    ACLResourcePatternType,
    KafkaAdminClient,
    ResourcePattern,
    ResourceType,
)
from kafka.partitioner.default import murmur2

from demandstream.model.data.synth import generate, write_jsonl
from demandstream.stream.admin import KafkaUnavailable, ensure_topics
from demandstream.stream.settings import Settings
from demandstream.stream.tools.forget import forget
from demandstream.stream.tools.replay import replay
from demandstream.stream.tools.tail import tail
from tests.conftest import KAFKA_SH, free_port
from tests.helpers import read_topic, user_error_line

pytestmark = [pytest.mark.kafka, pytest.mark.timeout(400)]

PORT = int(os.environ.get("DEMANDSTREAM_TEST_SASL_KAFKA_PORT", "19792"))
SASL_PORT = PORT + 100
MTLS_PORT = SASL_PORT + 10  # kafka.sh's MTLS_PORT_OFFSET
ADMIN_USER, ADMIN_PASSWORD = "admin", "admin-secret"  # created by kafka.sh at format time, a super user
SHOP_USER, SHOP_PASSWORD = "shop", "shop-secret"  # created by kafka.sh too, with no rights of its own


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


def _secure(ca: Path, user: str, password: str, mechanism: str = "SCRAM-SHA-512") -> dict[str, str]:
    return {
        "DEMANDSTREAM_BROKER": f"kafka://127.0.0.1:{SASL_PORT}",
        "DEMANDSTREAM_SECURITY_PROTOCOL": "SASL_SSL",
        "DEMANDSTREAM_SASL_MECHANISM": mechanism,
        "DEMANDSTREAM_SASL_USERNAME": user,
        "DEMANDSTREAM_SASL_PASSWORD": password,
        "DEMANDSTREAM_SSL_CAFILE": str(ca),
    }


@pytest.mark.slow
@pytest.mark.parametrize("auth", ["SCRAM-SHA-512", "SCRAM-SHA-256", "PLAIN", "mutual_tls"])
def test_worker_and_tools_over_tls(auth, sasl_cluster, worker_factory, stream_env, tmp_path):
    """SASL_SSL with each mechanism the settings offer (SCRAM, and PLAIN as hosted Kafka services use
    it) and mutual TLS (the client's certificate is its identity): a worker, replay and the admin
    client authenticate; a wrong password or a missing client certificate is one clear error, no hang."""
    ca = sasl_cluster
    assert ca.is_file()
    sasl = auth != "mutual_tls"
    secure = _secure(ca, ADMIN_USER, ADMIN_PASSWORD, auth) if sasl else _mutual_tls(ca)
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

    # refused: one clear error, no hang (bounded by the client's timeout)
    bad = s.with_(sasl_password="wrong") if sasl else s.with_(ssl_certfile="", ssl_keyfile="")
    with pytest.raises(KafkaUnavailable, match="authenticate"):
        ensure_topics(bad)


def _mutual_tls(ca: Path) -> dict[str, str]:
    """The SSL listener that requires a client certificate: kafka.sh's, signed by the cluster's CA, whose
    subject is a super user."""
    return {
        "DEMANDSTREAM_BROKER": f"kafka://127.0.0.1:{MTLS_PORT}",
        "DEMANDSTREAM_SECURITY_PROTOCOL": "SSL",
        "DEMANDSTREAM_SSL_CAFILE": str(ca),
        "DEMANDSTREAM_SSL_CERTFILE": str(ca.parent / "client.pem"),
        "DEMANDSTREAM_SSL_KEYFILE": str(ca.parent / "client.key"),
    }


def _grant(prefix: str, resource: ResourceType, *operations: ACLOperation) -> None:
    """Allow the shop user ``operations`` on every ``resource`` named ``prefix``..., as an administrator
    (the PLAINTEXT listener's principal is a super user) would."""
    admin = KafkaAdminClient(bootstrap_servers=f"127.0.0.1:{PORT}")
    try:
        pattern = ResourcePattern(resource, prefix, ACLResourcePatternType.PREFIXED)
        acls = [ACL(f"User:{SHOP_USER}", "*", op, ACLPermissionType.ALLOW, pattern) for op in operations]
        assert not admin.create_acls(acls)["failed"]
    finally:
        admin.close()


@pytest.mark.slow
def test_a_worker_whose_acls_lack_a_right_names_it_and_runs_with_those_docs_list(
    sasl_cluster, worker_factory, stream_env, tmp_path
):
    """A shop's secured cluster: the worker's principal may not create topics, and is granted rights
    one at a time. Each missing right is one line and exit 2 (before the worker joins its group where
    the broker can be asked; a topic it may read but not write when the first signal is sent); with
    the rights of docs/OPERATIONS.md §ACLs an exactly-once worker runs, and Faust's creation of the
    changelog that exists does not stop it."""
    prefix = f"acl-{uuid.uuid4().hex[:8]}"  # every topic and the app id under one prefix, as the docs advise
    names = {
        "DEMANDSTREAM_APP_ID": prefix,
        "DEMANDSTREAM_TOPIC_INPUT": f"{prefix}-clicks",
        "DEMANDSTREAM_TOPIC_SIGNALS": f"{prefix}-signals",
        "DEMANDSTREAM_TOPIC_DLQ": f"{prefix}-dlq",
        "DEMANDSTREAM_TOPIC_CONTROL": f"{prefix}-control",
    }
    shop = dict(names, **_secure(sasl_cluster, SHOP_USER, SHOP_PASSWORD))

    last = user_error_line(worker_factory(**shop).start())
    assert (
        f"do not let user {SHOP_USER} create {prefix}-clicks" in last
        and f"{prefix}-user-state-changelog" in last
    )

    admin_env = dict(stream_env, **names, **_secure(sasl_cluster, ADMIN_USER, ADMIN_PASSWORD))
    made = subprocess.run(
        [sys.executable, "-m", "demandstream.stream", "topics"],
        env=admin_env,
        capture_output=True,
        timeout=120,
    )
    assert made.returncode == 0, made.stderr.decode()[-2000:]
    created = (
        f"{prefix}-clicks, {prefix}-control, {prefix}-signals, {prefix}-dlq, {prefix}-user-state-changelog"
    )
    assert made.stdout.decode().startswith(f"created: {created}\n")

    _grant(prefix, ResourceType.TOPIC, ACLOperation.READ, ACLOperation.DESCRIBE)
    last = user_error_line(worker_factory(**shop).start())
    assert f"do not let user {SHOP_USER} use consumer group {prefix}" in last

    _grant(prefix, ResourceType.GROUP, ACLOperation.READ)
    reader = worker_factory(**shop).start()
    reader.wait_ready()
    events = list(generate(20, 200, seed=5))
    first, rest = tmp_path / "acl-first.jsonl", tmp_path / "acl-rest.jsonl"
    write_jsonl(events[:100], first)
    write_jsonl(events[100:], rest)
    # sent by another principal: the shop user may not write yet
    assert replay(Settings.from_env(admin_env), [first], "jsonl", progress=False).sent == 100
    last = user_error_line(reader, timeout=120, crashed=True)
    assert f"refused user {SHOP_USER} an operation on topic {prefix}-" in last  # its signals or changelog

    _grant(prefix, ResourceType.TOPIC, ACLOperation.WRITE)
    last = user_error_line(worker_factory(DEMANDSTREAM_GUARANTEE="exactly_once", **shop).start())
    assert f"transactional ids prefixed {prefix}-" in last

    _grant(prefix, ResourceType.TRANSACTIONAL_ID, ACLOperation.WRITE)
    w = worker_factory(DEMANDSTREAM_GUARANTEE="exactly_once", **shop).start()
    w.wait_ready()
    # the rest by the shop user, with the worker's rights (replay's: WRITE and DESCRIBE on the input)
    assert replay(Settings.from_env(dict(stream_env, **shop)), [rest], "jsonl", progress=False).sent == 100
    signals = read_topic(
        f"127.0.0.1:{PORT}",
        names["DEMANDSTREAM_TOPIC_SIGNALS"],
        until=lambda r: len({orjson.loads(x.value)["event_id"] for x in r}) >= 200,
        timeout=180,
        isolation="read_committed",
    )
    assert {orjson.loads(r.value)["event_id"] for r in signals} == {e.event_id for e in events}
    # the tools with the same rights: tail reads the signals, forget writes an erasure the worker applies
    shop_settings = Settings.from_env(dict(stream_env, **shop))
    out = io.StringIO()
    assert tail(shop_settings, from_beginning=True, max_records=5, timeout_s=60, out=out, raw=True) == 5
    user = events[0].user_id
    partition = forget(shop_settings, user, wait_s=60)
    control = read_topic(
        f"127.0.0.1:{PORT}", shop_settings.topic_control, until=lambda r: len(r) >= 1, timeout=30
    )
    assert [(r.partition, r.key) for r in control] == [(partition, user.encode())]
    assert w.poll() is None, w.log_tail()


WEB_TOKEN = "test-token-0123456789abcdef"
N_USERS, N_EVENTS = 40, 600
ROUTED_WAIT_S = 120


def _get(w, path: str, token: str | None = None) -> tuple[int, bytes]:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    req = urllib.request.Request(w.url(path), headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def _partition(user_id: str, partitions: int) -> int:
    # the producer's default partitioner (murmur2, as Kafka's Java client): the table's partition of a user
    return (murmur2(user_id.encode()) & 0x7FFFFFFF) % partitions


@pytest.mark.timeout(300)
def test_two_workers_on_one_port_forward_to_the_owner_by_its_advertised_url_with_the_token(
    worker_factory, stream_env, kafka_bootstrap, tmp_path
):
    token_file = tmp_path / "web-token"
    token_file.write_text(WEB_TOKEN + "\n")
    s = Settings.from_env(stream_env)
    data = tmp_path / "events.jsonl"
    write_jsonl(generate(N_USERS, N_EVENTS, seed=5), data)

    port = free_port()

    def start(host: str):
        # Like two pods: the same port on two addresses (127.0.0.2 and .3; the whole 127/8 is this
        # machine), each worker advertising its own, so only the host tells them apart and a forwarded
        # request reaches the owner through the owner's advertised URL alone.
        w = worker_factory(
            DEMANDSTREAM_WEB_HOST=host,
            DEMANDSTREAM_WEB_PORT=str(port),
            DEMANDSTREAM_WEB_ADVERTISED_URL=f"http://{host}:{port}",
            DEMANDSTREAM_WEB_TOKEN_FILE=str(token_file),
        )
        w.url = lambda path: f"http://{host}:{port}{path}"
        return w.start()

    a = start("127.0.0.2")
    a.wait_ready()
    replay(s, [data], "jsonl", progress=False)
    signals = read_topic(kafka_bootstrap, s.topic_signals, until=lambda r: len(r) >= N_EVENTS, timeout=180)
    last = {}
    for r in signals:
        sig = orjson.loads(r.value)
        last[sig["user_id"]] = sig
    users = sorted(last)[:20]
    # the users asked for lie in every partition, so each worker owns some of them and forwards the rest
    assert {_partition(u, s.partitions) for u in users} == set(range(s.partitions))

    b = start("127.0.0.3")
    b.wait_ready()
    deadline = time.monotonic() + ROUTED_WAIT_S
    answers: dict = {}
    while time.monotonic() < deadline:  # until the rebalance has settled and both answer for everyone
        answers = {
            u: (_get(a, f"/users/{u}/demand", WEB_TOKEN), _get(b, f"/users/{u}/demand", WEB_TOKEN))
            for u in users
        }
        if all(x[0] == 200 and y[0] == 200 for x, y in answers.values()):
            break
        time.sleep(1)
    for u, ((sa, ba), (sb, bb)) in answers.items():
        assert sa == sb == 200, (u, sa, sb, ba, bb, a.log_tail(20), b.log_tail(20))
        da, db = orjson.loads(ba), orjson.loads(bb)
        assert da == db
        assert da["events_seen"] == last[u]["events_seen"]
        assert abs(da["purchase_propensity"] - last[u]["purchase_propensity"]) < 1e-6

    for w in (a, b):
        for u in users[:4]:  # owned or not: no token, a wrong one, another scheme -> 401, nothing forwarded
            assert _get(w, f"/users/{u}/demand")[0] == 401
            assert _get(w, f"/users/{u}/demand", "wrong-token-0123456789")[0] == 401
        status, body = _get(w, "/users/nobody-here/demand", WEB_TOKEN)
        assert status == 404 and b"unknown user" in body
        # probes and metrics stay open (kubelet, Prometheus)
        assert _get(w, "/healthz")[0] == 200 and _get(w, "/readyz")[0] in (200, 503)  # 503: rebalancing
        assert _get(w, "/metrics")[0] == 200
        # Faust's own views, which read any table key or map keys to workers, are not served
        for path in ("/table/", f"/table/{s.table}/", f"/table/{s.table}/u:{users[0]}/", "/router/"):
            assert _get(w, path, WEB_TOKEN)[0] == 404, path
        assert WEB_TOKEN not in w.log_path.read_text(errors="replace")


@pytest.mark.timeout(120)
def test_a_worker_on_every_interface_with_nothing_to_advertise_refuses_to_start(worker_factory):
    w = worker_factory(DEMANDSTREAM_WEB_HOST="0.0.0.0").start()
    assert w.proc.wait(90) != 0
    log = w.log_path.read_text(errors="replace")
    assert "DEMANDSTREAM_WEB_ADVERTISED_URL" in log and "Traceback" not in log
