"""A real Prometheus server on loopback for tests.

The server runs Debian's ``prometheus`` (the package's binary, unpacked by ``make``) with a config derived from
``deploy/prometheus/prometheus.yml`` (same job and alert rules) whose demandstream job scrapes the
given targets every second. Queries go through Prometheus's HTTP API with urllib, so tests need no
client library.

Examples
--------
>>> port = free_port()
>>> 1024 < port < 65536
True

A test uses it as a context manager (needs the prometheus binary)::

    with PrometheusServer(["127.0.0.1:6066"], tmp_path, free_port()) as prom:
        prom.wait_for('up{job="demandstream"}', lambda result: bool(result), timeout=30)
"""

from __future__ import annotations

import json
import logging
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any

import yaml

logger = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
DEPLOY_CONFIG = REPO / "deploy" / "prometheus" / "prometheus.yml"
#: Debian's prometheus: on PATH (`make` puts its unpacked copy there), else where the package installs it.
PROMETHEUS_BINARY = shutil.which("prometheus") or "/usr/bin/prometheus"
#: Job in prometheus.yml whose targets are replaced; alerts.yml selects up{job="demandstream"}.
JOB_NAME = "demandstream"
#: Tests want samples quickly; 1 s is the smallest interval Prometheus handles without complaint.
SCRAPE_INTERVAL = "1s"
#: Starting takes about a second; a slow, shared CI machine gets ample room before the test fails.
READY_TIMEOUT_S = 30.0
#: A stopped Prometheus flushes its head block; after this it is killed.
STOP_TIMEOUT_S = 10.0
#: Bound on one HTTP request to the server.
HTTP_TIMEOUT_S = 5.0
#: Pause between polls of /-/ready and of wait_for's query.
POLL_INTERVAL_S = 0.2
#: Lines of the server log shown when it fails.
LOG_TAIL_LINES = 30


class PrometheusError(RuntimeError):
    """The server failed to start, stopped, or answered a query with an error."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (another process may still take it later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def scrape_config(targets: list[str], source: Path = DEPLOY_CONFIG) -> dict[str, Any]:
    """The deploy config with ``targets`` for the demandstream job, 1 s intervals, absolute rule files.

    >>> config = scrape_config(["127.0.0.1:9999"])
    >>> config["scrape_configs"][0]["static_configs"], config["global"]["scrape_interval"]
    ([{'targets': ['127.0.0.1:9999']}], '1s')
    >>> all(Path(rule_file).is_absolute() for rule_file in config["rule_files"])
    True
    """
    config = yaml.safe_load(source.read_text(encoding="utf-8"))
    config["global"].update(
        scrape_interval=SCRAPE_INTERVAL, scrape_timeout=SCRAPE_INTERVAL, evaluation_interval=SCRAPE_INTERVAL
    )
    # The config is written elsewhere, so rule files relative to deploy/prometheus/ must be made absolute.
    config["rule_files"] = [str((source.parent / name).resolve()) for name in config.get("rule_files", [])]
    jobs = [job for job in config["scrape_configs"] if job["job_name"] == JOB_NAME]
    if len(jobs) != 1:
        raise PrometheusError(f"{source}: expected one scrape job named {JOB_NAME!r}, found {len(jobs)}")
    jobs[0]["static_configs"] = [{"targets": list(targets)}]
    return config


class PrometheusServer:
    """Context manager running a Prometheus server on ``127.0.0.1:port`` that scrapes ``targets``.

    Parameters
    ----------
    targets:
        ``host:port`` of the exporters to scrape as job ``demandstream``.
    workdir:
        Folder for the config, the TSDB and the server's log (``prometheus.log``).
    port:
        Port of the web and API listener (see :func:`free_port`).
    binary:
        The prometheus executable.
    """

    def __init__(self, targets: list[str], workdir: Path, port: int, binary: str = PROMETHEUS_BINARY):
        self.targets = list(targets)
        self.workdir = Path(workdir)
        self.port = port
        self.binary = binary
        self.url = f"http://127.0.0.1:{port}"
        self.config_path = self.workdir / "prometheus.yml"
        self.log_path = self.workdir / "prometheus.log"
        self._process: subprocess.Popen[bytes] | None = None

    # -- lifecycle -------------------------------------------------------------------------------

    def __enter__(self) -> PrometheusServer:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def start(self) -> None:
        """Write the config, start the server and wait until it reports ready."""
        if shutil.which(self.binary) is None:
            raise PrometheusError(f"{self.binary} not found (Debian package `prometheus`)")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(yaml.safe_dump(scrape_config(self.targets)), encoding="utf-8")
        command = [
            self.binary,
            f"--config.file={self.config_path}",
            f"--storage.tsdb.path={self.workdir / 'data'}",
            f"--web.listen-address=127.0.0.1:{self.port}",
        ]
        logger.info("starting %s", " ".join(command))
        with self.log_path.open("wb") as log:
            self._process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Stop the server (terminate, then kill after a bound). Safe to call more than once."""
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            logger.warning("prometheus did not stop within %.0f s; killing it", STOP_TIMEOUT_S)
            process.kill()
            process.wait(timeout=STOP_TIMEOUT_S)

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._process is None or self._process.poll() is not None:
                raise PrometheusError(f"prometheus exited while starting:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=HTTP_TIMEOUT_S) as response:
                    # Another server may hold the port; ours would then exit with a bind error.
                    if response.status == 200 and self._answering_server_is_ours():
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass  # not listening yet
            time.sleep(POLL_INTERVAL_S)
        raise PrometheusError(f"prometheus not ready after {READY_TIMEOUT_S:.0f} s:\n{self.log_tail()}")

    def _answering_server_is_ours(self) -> bool:
        flags = self.api("status/flags")
        return flags.get("storage.tsdb.path") == str(self.workdir / "data")

    def log_tail(self) -> str:
        """The last lines of the server's log, for error messages."""
        if not self.log_path.exists():
            return "(no log)"
        lines = self.log_path.read_text(encoding="utf-8", errors="replace").splitlines()
        return "\n".join(lines[-LOG_TAIL_LINES:])

    # -- API -------------------------------------------------------------------------------------

    def api(self, path: str, **params: str) -> Any:
        """GET ``/api/v1/<path>`` and return its ``data``; raise PrometheusError unless it succeeded."""
        url = f"{self.url}/api/v1/{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        try:
            with urllib.request.urlopen(url, timeout=HTTP_TIMEOUT_S) as response:
                body = json.load(response)
        except urllib.error.HTTPError as exc:
            # Prometheus answers bad queries with 400 and a JSON error body.
            body = json.loads(exc.read() or b"{}")
        if body.get("status") != "success":
            raise PrometheusError(f"{path} {params}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """Evaluate an instant query now; the ``result`` list (``metric`` labels and ``value``)."""
        return self.api("query", query=expr)["result"]

    def wait_for(
        self, expr: str, predicate: Callable[[list[dict[str, Any]]], bool], timeout: float
    ) -> list[dict[str, Any]]:
        """Poll ``query(expr)`` until ``predicate(result)`` holds; return that result.

        Raises
        ------
        TimeoutError
            After ``timeout`` seconds, with the last result in the message.
        """
        deadline = time.monotonic() + timeout
        while True:
            result = self.query(expr)
            if predicate(result):
                return result
            if time.monotonic() >= deadline:
                raise TimeoutError(f"{expr!r}: condition not met within {timeout} s; last result {result}")
            time.sleep(POLL_INTERVAL_S)
