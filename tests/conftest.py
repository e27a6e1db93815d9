"""Shared fixtures: one real Apache Kafka broker per test session, worker processes, a small model.

The broker is the project's own (deploy/kafka/kafka.sh) on a test port, so a developer's broker on
9092 is never touched. If a broker already answers on that port it is reused and left running.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
KAFKA_SH = REPO / "deploy" / "kafka" / "kafka.sh"
TEST_KAFKA_PORT = int(os.environ.get("DEMANDSTREAM_TEST_KAFKA_PORT", "19092"))
#: Bounds for everything that waits on a broker or worker; generous because CI shares 2 cores.
KAFKA_UP_TIMEOUT_S = 300
WORKER_READY_TIMEOUT_S = 120


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def kafka_bootstrap() -> Iterator[str]:
    """``host:port`` of a running single-node Kafka 4 broker (KRaft) for this session."""
    port = str(TEST_KAFKA_PORT)
    running = subprocess.run([str(KAFKA_SH), "status", "--port", port], capture_output=True).returncode == 0
    if not running:
        subprocess.run(
            [str(KAFKA_SH), "up", "--fresh", "--port", port], check=True, timeout=KAFKA_UP_TIMEOUT_S
        )
    yield f"127.0.0.1:{port}"
    if not running and not os.environ.get("DEMANDSTREAM_TEST_KEEP_KAFKA"):
        subprocess.run([str(KAFKA_SH), "down", "--port", port], timeout=120)


@pytest.fixture(scope="session")
def small_model(tmp_path_factory) -> Path:
    """An untrained but deterministic checkpoint whose vocabulary covers the generator's categories.

    Stream tests check counts, order and parity, not accuracy, so training would only cost time. The
    network still ranks with every term live, so parity covers the whole head: Markov tables from the
    generated events, the cascade's feature weights, and small random context weights (zero at
    initialisation otherwise) so the LSTM moves the ranking too.
    """
    import numpy as np
    import torch

    from demandstream.model.core.checkpoint import save
    from demandstream.model.core.features import Vocabulary
    from demandstream.model.core.network import DemandLSTM, ModelConfig, init_like_cascade, markov_tables
    from demandstream.model.data.synth import generate

    events = list(generate(300, 20000, seed=123))
    vocab = Vocabulary.build(e.category for e in events)
    torch.manual_seed(7)
    net = DemandLSTM(ModelConfig(n_categories=len(vocab)))
    by_user: dict[str, list[int]] = {}
    for e in events:
        by_user.setdefault(e.user_id, []).append(vocab.index(e.category))
    pairs = np.array(
        [p for cats in by_user.values() for p in zip(cats[:-1], cats[1:], strict=True)], np.int64
    ).reshape(-1, 2)
    cats = np.array([c for seq in by_user.values() for c in seq], np.int64)
    net.set_tables(markov_tables(cats, pairs, len(vocab), net.cfg.markov_top_k))
    init_like_cascade(net)
    with torch.no_grad():
        for layer in (net.slot_ctx, net.vocab_ctx, net.explore, net.repeat_query):
            layer.weight.normal_(0.0, 0.05)
    path = tmp_path_factory.mktemp("model") / "model.pt"
    save(path, net, vocab)
    return path


class WorkerProcess:
    """A ``demandstream worker`` subprocess with its own app id, topics, data dir and web port."""

    def __init__(self, env: dict[str, str], log_path: Path):
        self.env = env
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None
        self.port = int(env["DEMANDSTREAM_WEB_PORT"])

    def start(self) -> WorkerProcess:
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "demandstream.stream", "worker"],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd=REPO,
        )
        return self

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def get(self, path: str, timeout: float = 5.0) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(self.url(path), timeout=timeout) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def wait_ready(self, timeout: float = WORKER_READY_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if self.get("/readyz", timeout=2)[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"worker not ready after {timeout} s:\n{self.log_tail()}")

    def metric(self, name: str, **labels) -> float:
        """Current value of one sample from /metrics (0 if absent)."""
        from prometheus_client.parser import text_string_to_metric_families

        _, body = self.get("/metrics")
        for fam in text_string_to_metric_families(body.decode()):
            for s in fam.samples:
                if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                    return s.value
        return 0.0

    def stop(self, timeout: float = 60) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)

    def log_tail(self, n: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"


@pytest.fixture
def stream_env(kafka_bootstrap, small_model, tmp_path) -> dict[str, str]:
    """Environment for one isolated pipeline: unique app id and topic names on the session broker."""
    tag = uuid.uuid4().hex[:8]
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEMANDSTREAM_")}
    env.update(
        {
            "DEMANDSTREAM_BROKER": f"kafka://{kafka_bootstrap}",
            "DEMANDSTREAM_MODEL": str(small_model),
            "DEMANDSTREAM_APP_ID": f"ds-test-{tag}",
            "DEMANDSTREAM_DATA_DIR": str(tmp_path / "data"),
            "DEMANDSTREAM_WEB_PORT": str(free_port()),
            "DEMANDSTREAM_TOPIC_INPUT": f"clickstream-{tag}",
            "DEMANDSTREAM_TOPIC_SIGNALS": f"demand-signals-{tag}",
            "DEMANDSTREAM_TOPIC_DLQ": f"clickstream-dlq-{tag}",
            "DEMANDSTREAM_TOPIC_CONTROL": f"clickstream-control-{tag}",
            "DEMANDSTREAM_PARTITIONS": "4",
            "DEMANDSTREAM_STANDBY_REPLICAS": "0",
            "DEMANDSTREAM_DEVICE": "cpu",
            # TEST_WORKER_LOG_LEVEL=info shows the workers' timelines in their logs under tmp_path
            "DEMANDSTREAM_LOG_LEVEL": os.environ.get("TEST_WORKER_LOG_LEVEL", "warning"),
            "DEMANDSTREAM_LAG_INTERVAL_S": "1",
        }
    )
    return env


@pytest.fixture
def worker_factory(stream_env, tmp_path) -> Iterator:
    """Start workers for the test's pipeline; every worker started is stopped at teardown."""
    workers: list[WorkerProcess] = []

    def make(**overrides: str) -> WorkerProcess:
        env = dict(stream_env)
        if workers:  # a second worker of the same app needs its own web port and data dir
            env["DEMANDSTREAM_WEB_PORT"] = str(free_port())
            env["DEMANDSTREAM_DATA_DIR"] = str(tmp_path / f"data{len(workers)}")
        env.update(overrides)
        w = WorkerProcess(env, tmp_path / f"worker{len(workers)}.log")
        workers.append(w)
        return w

    yield make
    for w in workers:
        w.stop(timeout=30)
