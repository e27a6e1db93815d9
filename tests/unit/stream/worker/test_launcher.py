"""The worker launcher (stream/worker/launcher.py) on a stand-in worker: a small HTTP server that answers
/readyz and /metrics on the launcher's web port and starts a child of its own, so that stopping and
killing can be checked on the whole process group. No Faust, no Kafka; each test is well under a second.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from demandstream.stream.worker.launcher import WorkerLauncher, free_port, metric_sum, worker_env

pytestmark = pytest.mark.timeout(30)

METRICS = """\
# TYPE demandstream_events_total counter
demandstream_events_total{result="valid"} 7.0
demandstream_events_total{result="invalid"} 2.0
demandstream_events_total{result="duplicate"} 1.0
# TYPE demandstream_consumer_lag gauge
demandstream_consumer_lag{partition="0"} 3.0
demandstream_consumer_lag{partition="1"} 4.0
# TYPE demandstream_signals_total counter
demandstream_signals_total 7.0
"""

#: FAKE_MODE: "" serves and exits 0 on SIGTERM; "deaf" ignores SIGTERM (its child too: SIG_IGN is
#: inherited); "never" answers /readyz 503; "exit" fails at start-up, as a worker without its model.
FAKE_WORKER = r"""
import http.server, os, signal, subprocess, sys

mode = os.environ.get("FAKE_MODE", "")
if mode == "exit":
    print("boom: no model here", flush=True)
    sys.exit(3)
signal.signal(signal.SIGTERM, signal.SIG_IGN if mode == "deaf" else (lambda *_: sys.exit(0)))
child = subprocess.Popen(["sleep", "60"])
with open(os.environ["FAKE_CHILD_PID"], "w") as f:
    f.write(str(child.pid))
metrics = os.environ["FAKE_METRICS"].encode()


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        if self.path == "/readyz":
            code, body = (503, b"not yet") if mode == "never" else (200, b"ready")
        elif self.path == "/metrics":
            code, body = 200, metrics
        else:
            code, body = 404, b"no such page"
        self.send_response(code)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


http.server.HTTPServer(("127.0.0.1", int(os.environ["DEMANDSTREAM_WEB_PORT"])), Handler).serve_forever()
"""


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs; a zombie (dead, not yet reaped by whoever inherited it) counts as gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _gone_soon(pid: int, within_s: float = 5.0) -> bool:
    # a grandchild is reaped by init, not by us: give it a moment after its signal
    deadline = time.monotonic() + within_s
    while _alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


@pytest.fixture
def fake(tmp_path):
    """Make launchers of the stand-in worker; any still running at teardown is killed."""
    made: list[WorkerLauncher] = []

    def make(mode: str = "") -> WorkerLauncher:
        env = worker_env(
            {
                "DEMANDSTREAM_WEB_PORT": str(free_port()),
                "FAKE_MODE": mode,
                "FAKE_CHILD_PID": str(tmp_path / f"child{len(made)}.pid"),
                "FAKE_METRICS": METRICS,
            }
        )
        w = WorkerLauncher(
            env,
            tmp_path / f"fake{len(made)}.log",
            command=[sys.executable, "-c", FAKE_WORKER],
            ready_timeout_s=10,
            poll_s=0.02,
        )
        made.append(w)
        return w

    yield make
    for w in made:
        w.kill()


def _child_pid(w: WorkerLauncher) -> int:
    return int(Path(w.env["FAKE_CHILD_PID"]).read_text())


# -- pure helpers ------------------------------------------------------------------------------------


def test_worker_env_drops_every_inherited_setting_and_applies_the_overrides():
    parent = {"PATH": "/bin", "HOME": "/h", "DEMANDSTREAM_MODEL": "mine.pt", "DEMANDSTREAM_BROKER": "x"}
    env = worker_env({"DEMANDSTREAM_BROKER": "kafka://b:1", "EXTRA": "1"}, parent)
    assert env == {"PATH": "/bin", "HOME": "/h", "DEMANDSTREAM_BROKER": "kafka://b:1", "EXTRA": "1"}
    assert parent["DEMANDSTREAM_MODEL"] == "mine.pt"  # the parent's mapping is not touched


def test_worker_env_reads_the_process_environment_by_default(monkeypatch):
    monkeypatch.setenv("DEMANDSTREAM_APP_ID", "a-developers-own")
    monkeypatch.setenv("LAUNCHER_TEST_KEPT", "yes")
    env = worker_env({})
    assert "DEMANDSTREAM_APP_ID" not in env and env["LAUNCHER_TEST_KEPT"] == "yes"


@pytest.mark.parametrize(
    ("name", "labels", "expected"),
    [
        ("demandstream_events_total", {}, 10.0),  # no labels: every sample of the name
        ("demandstream_events_total", {"result": "duplicate"}, 1.0),  # one sample
        ("demandstream_events_total", {"result": "nonesuch"}, 0.0),
        ("demandstream_consumer_lag", {}, 7.0),
        ("demandstream_consumer_lag", {"partition": "1"}, 4.0),
        ("demandstream_signals_total", {}, 7.0),
        ("demandstream_signals_total", {"result": "valid"}, 0.0),  # a label the sample lacks
        ("demandstream_not_there_total", {}, 0.0),
    ],
)
def test_metric_sum_adds_the_samples_whose_labels_match(name, labels, expected):
    assert metric_sum(METRICS, name, **labels) == expected


def test_the_port_comes_from_the_environment_unless_given(tmp_path):
    assert WorkerLauncher({"DEMANDSTREAM_WEB_PORT": "8123"}, tmp_path / "l").port == 8123
    assert WorkerLauncher({}, tmp_path / "l", port=8124).port == 8124
    with pytest.raises(ValueError, match="DEMANDSTREAM_WEB_PORT"):
        WorkerLauncher({}, tmp_path / "l")


# -- a process ---------------------------------------------------------------------------------------


def test_ready_metrics_and_a_graceful_stop_of_the_group(fake):
    w = fake().start()
    t_ready = w.wait_ready()
    assert w.started_at <= t_ready <= time.monotonic()
    assert w.get("/readyz") == (200, b"ready")
    assert w.get("/nowhere") == (404, b"no such page")  # an HTTP error is returned, not raised
    assert w.metric("demandstream_events_total") == 10.0
    assert w.metric("demandstream_events_total", result="valid") == 7.0
    child = _child_pid(w)
    assert _alive(child)
    w.stop(timeout=10)
    assert w.returncode == 0 and w.poll() == 0  # its SIGTERM handler ran: a graceful stop
    assert _gone_soon(child), "SIGTERM did not reach the worker's own child"
    w.stop()  # stopping a stopped worker is a no-op
    w.kill()


def test_stop_kills_a_worker_that_ignores_sigterm(fake):
    w = fake("deaf").start()
    w.wait_ready()
    child = _child_pid(w)
    t0 = time.monotonic()
    w.stop(timeout=0.3)
    assert w.returncode == -signal.SIGKILL
    assert time.monotonic() - t0 < 5
    assert _gone_soon(child), "the SIGKILL after the timeout did not reach the worker's own child"


def test_kill_takes_the_whole_group_down_at_once(fake):
    w = fake().start()
    w.wait_ready()
    child = _child_pid(w)
    w.kill()
    assert w.returncode == -signal.SIGKILL
    assert _gone_soon(child)


def test_a_worker_that_exits_before_ready_is_an_error_with_its_log(fake):
    w = fake("exit").start()
    with pytest.raises(RuntimeError, match=r"worker exited with 3:\n.*boom: no model here"):
        w.wait_ready()


def test_a_worker_never_ready_times_out_with_its_log(fake):
    w = fake("never").start()
    w.log_path.write_text("still loading\n")  # appended to by the stand-in, which writes nothing
    with pytest.raises(TimeoutError, match=r"not ready after 0.5 s:\n.*still loading"):
        w.wait_ready(timeout=0.5)
    assert w.poll() is None  # a timeout leaves the worker running: stopping it is the caller's call


def test_a_failed_scrape_is_an_error_not_a_zero(fake):
    w = fake()  # never started: nothing listens on its port
    with pytest.raises(OSError):
        w.metric("demandstream_signals_total")
    with pytest.raises(RuntimeError, match="not started"):
        w.wait_ready()


def test_start_refuses_a_second_process_while_one_runs(fake):
    w = fake().start()
    with pytest.raises(RuntimeError, match="already running"):
        w.start()


def test_the_launcher_loads_without_faust():
    # The bench and the demo import it; a Faust import would cost them seconds and patch the world.
    code = (
        "import sys, demandstream.stream.worker.launcher\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('faust', 'mode', 'aiokafka', 'torch')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=20, check=True)
    assert out.stdout.strip() == "[]"
