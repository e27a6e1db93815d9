"""Monitoring and queries against real servers: Prometheus scraping a worker, the query API on two workers."""

from __future__ import annotations

import shutil
import time

import orjson
import pytest

from demandstream.model.data.synth import generate, write_jsonl
from demandstream.stream.settings import Settings
from demandstream.stream.tools.replay import replay
from tests.helpers import read_topic
from tests.integration.prometheus_server import PrometheusServer, free_port

pytestmark = [pytest.mark.kafka, pytest.mark.slow, pytest.mark.timeout(400)]

N_USERS, N_EVENTS, N_BAD = 150, 3000, 37
SCRAPE_WAIT_S = 60


def write_events(path, n_users, n_events, n_bad=0, seed=11):
    write_jsonl(generate(n_users, n_events, seed=seed), path)
    with open(path, "ab") as fh:
        for i in range(n_bad):
            fh.write(
                b"{broken json %d\n" % i
                if i % 2
                else b'{"event_id": "x", "user_id": "u1", "type": "teleport"}\n'
            )


@pytest.mark.prometheus
@pytest.mark.skipif(
    shutil.which("prometheus") is None, reason="Debian's prometheus is installed by `make test`"
)
def test_prometheus_reads_what_the_worker_did(worker_factory, stream_env, kafka_bootstrap, tmp_path):
    s = Settings.from_env(stream_env)
    data = tmp_path / "events.jsonl"
    write_events(data, N_USERS, N_EVENTS, N_BAD)
    w = worker_factory().start()
    w.wait_ready()
    with PrometheusServer([f"127.0.0.1:{w.port}"], tmp_path / "prom", free_port()) as prom:
        replay(s, [data], "jsonl", progress=False)
        read_topic(kafka_bootstrap, s.topic_signals, until=lambda r: len(r) >= N_EVENTS, timeout=180)

        def equals(n):
            return lambda r: bool(r) and float(r[0]["value"][1]) == n

        prom.wait_for("sum(demandstream_signals_total)", equals(N_EVENTS), SCRAPE_WAIT_S)
        prom.wait_for("sum(demandstream_dead_letters_total)", equals(N_BAD), SCRAPE_WAIT_S)
        prom.wait_for('sum(demandstream_events_total{result="valid"})', equals(N_EVENTS), SCRAPE_WAIT_S)
        reasons = prom.query("sum by (reason) (demandstream_dead_letters_total)")
        assert {r["metric"]["reason"] for r in reasons} == {"not_json", "missing_field"}
        # Latency is in seconds (not ms, cf. faust-streaming/faust#693): the replay took seconds, so
        # the median event->signal latency of this run is well under a minute and above zero.
        p50 = prom.query("histogram_quantile(0.5, sum by (le) (demandstream_event_to_signal_seconds_bucket))")
        assert 0.0 < float(p50[0]["value"][1]) < 60.0
        batches = prom.query("sum(demandstream_batch_size_count)")
        assert 0 < float(batches[0]["value"][1]) < N_EVENTS + N_BAD
        info = prom.query("demandstream_model_info")
        assert info and info[0]["metric"]["device"] == "cpu"
        prom.wait_for("up", lambda r: bool(r) and r[0]["value"][1] == "1", SCRAPE_WAIT_S)


def test_query_api_routes_to_the_owner_with_two_workers(
    worker_factory, stream_env, kafka_bootstrap, tmp_path
):
    s = Settings.from_env(stream_env)
    data = tmp_path / "events.jsonl"
    write_events(data, 60, 1200)
    a = worker_factory().start()
    a.wait_ready()
    replay(s, [data], "jsonl", progress=False)
    signals = read_topic(kafka_bootstrap, s.topic_signals, until=lambda r: len(r) >= 1200, timeout=180)
    last = {}
    for r in signals:
        sig = orjson.loads(r.value)
        last[sig["user_id"]] = sig
    b = worker_factory().start()
    b.wait_ready()
    # After the rebalance each worker owns some partitions; both answer for every user.
    deadline = time.monotonic() + 120
    answers = {}
    while time.monotonic() < deadline:
        answers = {u: (a.get(f"/users/{u}/demand"), b.get(f"/users/{u}/demand")) for u in list(last)[:20]}
        if all(x[0] == 200 and y[0] == 200 for x, y in answers.values()):
            break
        time.sleep(1)
    for u, ((sa, ba), (sb, bb)) in answers.items():
        assert sa == sb == 200, (u, sa, sb, a.log_tail(20), b.log_tail(20))
        da, db = orjson.loads(ba), orjson.loads(bb)
        assert da == db
        assert da["events_seen"] == last[u]["events_seen"]
        assert abs(da["purchase_propensity"] - last[u]["purchase_propensity"]) < 1e-6
        assert [c["category"] for c in da["top_categories"]] == [
            c["category"] for c in last[u]["top_categories"]
        ]
    assert a.get("/users/nobody-here/demand")[0] == 404
    # category demand is off by default: its view says so instead of a bare 404
    status, body = a.get("/categories/demand")
    assert status == 404 and "DEMANDSTREAM_DEMAND_WINDOW_S" in orjson.loads(body)["error"]
    assert a.get("/healthz")[0] == 200 and b.get("/readyz")[0] == 200
