"""The bench's worker handle: its web ports and its refusal to start twice (no broker, no worker)."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest

from demandstream.stream.bench import worker as bw


def test_free_ports_are_consecutive_and_free():
    base = bw.free_ports(3)
    for port in range(base, base + 3):
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))


def test_a_running_bench_worker_is_not_started_twice(tmp_path):
    """Starting a BenchWorker that still runs would replace the process it holds and orphan the first
    (drain starts its worker itself; a script that started it before left one running each time)."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        w = bw.BenchWorker("127.0.0.1:49592", tmp_path / "m.pt", "twice", tmp_path, "in")
        w.launcher = type("Held", (), {"proc": child})()
        with pytest.raises(RuntimeError, match="already running"):
            w.start()
    finally:
        child.kill()
        child.wait()
