"""PrometheusServer against a real Prometheus scraping an in-process prometheus_client exporter."""

from __future__ import annotations

import importlib.util
import shutil
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
from prometheus_client import CollectorRegistry, Counter, start_http_server

pytestmark = [
    pytest.mark.prometheus,
    pytest.mark.skipif(
        shutil.which("prometheus") is None,
        reason="prometheus not on PATH (Debian package `prometheus`; `make test` unpacks it)",
    ),
    pytest.mark.timeout(120),
]

#: Scrapes run every second; a few of them plus startup fit well inside this.
SCRAPE_WAIT_S = 30.0
VALID_EVENTS = 42


def _load_helper() -> ModuleType:
    # --import-mode=importlib does not put this folder on sys.path, so load the helper by file.
    path = Path(__file__).with_name("prometheus_server.py")
    spec = importlib.util.spec_from_file_location("prometheus_server", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


helper = _load_helper()


@pytest.fixture
def exporter() -> Iterator[str]:
    """A worker stand-in: demandstream_events_total{result="valid"} = 42 on a free loopback port."""
    registry = CollectorRegistry()
    events = Counter("demandstream_events", "Input records by result", ["result"], registry=registry)
    events.labels("valid").inc(VALID_EVENTS)
    port = helper.free_port()
    server, thread = start_http_server(port, addr="127.0.0.1", registry=registry)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def _values(result: list[dict]) -> list[float]:
    return [float(sample["value"][1]) for sample in result]


def test_counter_reads_back_through_the_http_api(exporter: str, tmp_path: Path) -> None:
    with helper.PrometheusServer([exporter], tmp_path, helper.free_port()) as prom:
        result = prom.wait_for(
            'demandstream_events_total{result="valid"}', lambda r: bool(r), timeout=SCRAPE_WAIT_S
        )
        assert _values(result) == [VALID_EVENTS]
        (sample,) = result
        assert sample["metric"]["job"] == "demandstream"
        assert sample["metric"]["instance"] == exporter
        assert _values(prom.query('up{job="demandstream"}')) == [1.0]
        # The alert rules of deploy/prometheus/alerts.yml are loaded too.
        groups = prom.api("rules")["groups"]
        assert {rule["name"] for group in groups for rule in group["rules"]} >= {"DemandstreamWorkerDown"}
        process = prom._process
    assert process is not None and process.poll() is not None, "the server must be stopped on exit"


def test_unreachable_target_is_reported_down(tmp_path: Path) -> None:
    closed = f"127.0.0.1:{helper.free_port()}"
    with helper.PrometheusServer([closed], tmp_path, helper.free_port()) as prom:
        result = prom.wait_for('up{job="demandstream"}', lambda r: bool(r), timeout=SCRAPE_WAIT_S)
        assert _values(result) == [0.0]


def test_bad_query_raises_and_wait_for_times_out(exporter: str, tmp_path: Path) -> None:
    with helper.PrometheusServer([exporter], tmp_path, helper.free_port()) as prom:
        with pytest.raises(helper.PrometheusError, match="bad_data"):
            prom.query("sum(")
        with pytest.raises(TimeoutError, match="no_such_metric"):
            prom.wait_for("no_such_metric", lambda r: bool(r), timeout=1.0)


def test_start_failure_is_reported_with_the_log(tmp_path: Path) -> None:
    with helper.PrometheusServer(["127.0.0.1:1"], tmp_path / "first", helper.free_port()) as first:
        # Same port again: the second server cannot listen and must fail fast, not hang.
        second = helper.PrometheusServer(["127.0.0.1:1"], tmp_path / "second", first.port)
        with pytest.raises(helper.PrometheusError, match="exited while starting"):
            second.start()
        assert second._process is None
