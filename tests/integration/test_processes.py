"""`demandstream worker --processes 2` on the real broker: two group members on one machine, one command."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request

import orjson
import pytest

from demandstream.model.data.synth import generate, write_jsonl
from demandstream.stream.settings import Settings
from demandstream.stream.tools.replay import replay
from tests.conftest import REPO, free_port
from tests.helpers import read_topic

pytestmark = [pytest.mark.kafka, pytest.mark.timeout(420)]

N_EVENTS = 1500


def _metric(port: int, name: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        body = r.read().decode()
    return sum(s.value for fam in text_string_to_metric_families(body) for s in fam.samples if s.name == name)


def test_two_processes_share_the_partitions_and_signal_every_event(stream_env, kafka_bootstrap, tmp_path):
    env = dict(stream_env)
    base_port = free_port()
    while base_port + 1 > 65535 or not _port_free(base_port + 1):
        base_port = free_port()
    env.update({"DEMANDSTREAM_WEB_PORT": str(base_port), "DEMANDSTREAM_PROCESSES": "2"})
    log = open(tmp_path / "supervisor.log", "ab")
    proc = subprocess.Popen(
        [sys.executable, "-m", "demandstream.stream", "worker"],
        env=env,
        cwd=REPO,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        ports = (base_port, base_port + 1)
        _wait_ready(proc, ports, tmp_path / "supervisor.log")
        data = tmp_path / "events.jsonl"
        write_jsonl(generate(100, N_EVENTS, seed=5), data)
        settings = Settings.from_env(env)
        assert replay(settings, [data], "jsonl", progress=False).sent == N_EVENTS
        signals = read_topic(
            kafka_bootstrap, settings.topic_signals, until=lambda r: len(r) >= N_EVENTS, timeout=240, idle_s=2
        )
        assert len({orjson.loads(r.value)["event_id"] for r in signals}) == N_EVENTS
        n = N_EVENTS
        # both children did stream work: each consumed some of the events
        per_child = [_metric(p, "demandstream_signals_total") for p in ports]
        assert all(v > 0 for v in per_child) and sum(per_child) >= n, per_child
        assert (tmp_path / "data" / "worker-0").is_dir() and (tmp_path / "data" / "worker-1").is_dir()
        # SIGTERM to the supervisor stops the group cleanly
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(120) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)


def test_a_child_that_dies_takes_the_group_down_with_its_status(stream_env, tmp_path):
    env = dict(stream_env)
    env.update(
        {
            "DEMANDSTREAM_WEB_PORT": str(free_port()),
            "DEMANDSTREAM_PROCESSES": "2",
            "DEMANDSTREAM_MODEL": str(tmp_path / "missing.pt"),  # every child exits 2 at once
        }
    )
    r = subprocess.run(
        [sys.executable, "-m", "demandstream.stream", "worker"],
        env=env,
        cwd=REPO,
        capture_output=True,
        timeout=180,
    )
    assert r.returncode == 2, r.stderr.decode()[-2000:]


def _port_free(port: int) -> bool:
    import socket

    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _wait_ready(proc, ports, log_path, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    pending = set(ports)
    while pending and time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"supervisor exited {proc.returncode}:\n{log_path.read_text()[-3000:]}")
        for p in list(pending):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{p}/readyz", timeout=2) as r:
                    if r.status == 200:
                        pending.discard(p)
            except OSError:
                pass
        time.sleep(0.5)
    assert not pending, f"not ready: {pending}\n{log_path.read_text()[-3000:]}"
