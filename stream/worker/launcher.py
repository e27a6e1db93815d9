"""One way to run a ``demandstream worker`` subprocess from outside: start it, wait for /readyz, read its
/metrics, stop it.

The integration tests (``WorkerProcess`` in tests/conftest.py), the bench (``BenchWorker`` in
stream/bench/worker.py) and the demo (stream/tools/demo.py) all drive their workers through
``WorkerLauncher``. The module imports only the standard library and prometheus_client, so the bench and
the demo load it without Faust; tests/unit/test_layers.py holds it to that.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Self

from prometheus_client.parser import text_string_to_metric_families

#: Every setting of the worker is an environment variable with this prefix (stream/settings.py).
ENV_PREFIX = "DEMANDSTREAM_"
#: The worker as its operators start it, from the interpreter running the caller.
WORKER_COMMAND = (sys.executable, "-m", "demandstream.stream", "worker")
#: Bound on one HTTP request to the worker's web port.
HTTP_TIMEOUT_S = 5.0
#: Bound on one /readyz probe: a worker still loading its model may not answer, the next probe will.
READY_PROBE_TIMEOUT_S = 2.0
#: How long a SIGKILLed process group is given to be reaped.
KILL_WAIT_S = 30.0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (the kernel's pick), for a worker's web port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_env(overrides: Mapping[str, str], parent: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of a worker: ``parent`` (default ``os.environ``) without any ``DEMANDSTREAM_*``
    variable, then ``overrides``.

    A developer's own ``DEMANDSTREAM_*`` settings must not leak into a worker whose every setting the
    caller chose, or a test or a benchmark would measure something else than it says.

    >>> worker_env({"DEMANDSTREAM_APP_ID": "a"}, {"PATH": "/bin", "DEMANDSTREAM_MODEL": "mine.pt"})
    {'PATH': '/bin', 'DEMANDSTREAM_APP_ID': 'a'}
    """
    source = os.environ if parent is None else parent
    env = {k: v for k, v in source.items() if not k.startswith(ENV_PREFIX)}
    env.update(overrides)
    return env


def metric_sum(text: str, name: str, /, **labels: str) -> float:
    """Sum of the samples called ``name`` in Prometheus text ``text`` whose labels include ``labels``.

    No labels sum every sample of the name (all partitions, all results); labels that identify one
    sample give that sample. A name with no matching sample is 0, as a counter not yet incremented.

    >>> text = 'x_total{result="valid"} 3.0\\nx_total{result="invalid"} 2.0\\ny 7.0\\n'
    >>> metric_sum(text, "x_total"), metric_sum(text, "x_total", result="valid"), metric_sum(text, "z")
    (5.0, 3.0, 0.0)
    """
    return sum(
        (
            s.value
            for fam in text_string_to_metric_families(text)
            for s in fam.samples
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
        ),
        0.0,
    )


class WorkerLauncher:
    """A worker subprocess with a given environment, its stdout and stderr appended to ``log_path``.

    ``port`` is the worker's web port (default: ``DEMANDSTREAM_WEB_PORT`` of ``env``); ``command``
    replaces the worker's command line (a stand-in in tests); ``ready_timeout_s`` and ``poll_s`` bound
    and pace ``wait_ready``. The worker runs in a session and process group of its own, so ``stop`` and
    ``kill`` reach everything it started (``worker --processes N`` children) and nothing else.
    """

    def __init__(
        self,
        env: Mapping[str, str],
        log_path: Path,
        *,
        port: int | None = None,
        cwd: Path | None = None,
        command: Sequence[str] = WORKER_COMMAND,
        ready_timeout_s: float = 120.0,
        poll_s: float = 0.5,
    ):
        self.env = dict(env)
        self.log_path = Path(log_path)
        if port is None:
            if ENV_PREFIX + "WEB_PORT" not in self.env:
                raise ValueError(f"no port given and no {ENV_PREFIX}WEB_PORT in the worker's environment")
            port = int(self.env[ENV_PREFIX + "WEB_PORT"])
        self.port = port
        self.cwd = cwd
        self.command = list(command)
        self.ready_timeout_s = ready_timeout_s
        self.poll_s = poll_s
        self.proc: subprocess.Popen | None = None
        self.started_at = 0.0

    def start(self) -> Self:
        """Start the process (monotonic start time in ``started_at``); an error if it is already running."""
        if self.proc is not None and self.proc.poll() is None:
            raise RuntimeError(f"worker already running (pid {self.proc.pid})")
        with open(self.log_path, "ab") as log:  # the child holds its own copy of the descriptor
            self.started_at = time.monotonic()
            self.proc = subprocess.Popen(
                self.command,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                cwd=self.cwd,
            )
        return self

    def poll(self) -> int | None:
        """The exit status if the process has ended, else None (also None before ``start``)."""
        return None if self.proc is None else self.proc.poll()

    @property
    def returncode(self) -> int | None:
        """The exit status once the process has ended and been polled or waited for; negative: a signal."""
        return None if self.proc is None else self.proc.returncode

    def url(self, path: str) -> str:
        """The address of ``path`` on the worker's web port."""
        return f"http://127.0.0.1:{self.port}{path}"

    def get(self, path: str, timeout: float = HTTP_TIMEOUT_S) -> tuple[int, bytes]:
        """GET ``path``: (status, body). An HTTP error status is returned; no answer raises ``OSError``."""
        try:
            with urllib.request.urlopen(self.url(path), timeout=timeout) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def wait_ready(self, timeout: float | None = None) -> float:
        """Block until /readyz answers 200 and return the monotonic time it was first seen.

        Raises ``RuntimeError`` with the log's tail if the process ends first, ``TimeoutError`` (also
        with the tail) after ``timeout`` seconds (default ``ready_timeout_s``).
        """
        if self.proc is None:
            raise RuntimeError("worker not started")
        timeout = self.ready_timeout_s if timeout is None else timeout
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if self.get("/readyz", timeout=READY_PROBE_TIMEOUT_S)[0] == 200:
                    return time.monotonic()
            except OSError:  # not listening yet, or too busy to answer in time
                pass
            time.sleep(self.poll_s)
        raise TimeoutError(f"worker not ready after {timeout} s:\n{self.log_tail()}")

    def metric(self, name: str, /, **labels: str) -> float:
        """Sum of the /metrics samples called ``name`` whose labels include ``labels`` (see ``metric_sum``).

        Raises ``OSError`` if the worker does not answer and ``RuntimeError`` if /metrics answers other
        than 200, so that a failed scrape is never read as a count of 0.
        """
        return metric_sum(self.metrics_text(), name, **labels)

    def metrics_text(self) -> str:
        """The worker's /metrics exposition; ``OSError`` or ``RuntimeError`` as :meth:`metric`."""
        status, body = self.get("/metrics")
        if status != 200:
            raise RuntimeError(f"{self.url('/metrics')} answered {status}: {body[:200]!r}")
        return body.decode()

    def stop(self, timeout: float = 60.0) -> None:
        """Stop gracefully: SIGTERM to the process group, SIGKILL if the process still runs after
        ``timeout`` seconds. Nothing to do if it was never started or has already ended."""
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()

    def kill(self) -> None:
        """SIGKILL to the process group, so no shutdown code runs (a crash, to the worker), and reap it."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(KILL_WAIT_S)

    def log_tail(self, n: int = 60) -> str:
        """The last ``n`` lines of the worker's log, or ``(no log)`` if it cannot be read."""
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"
