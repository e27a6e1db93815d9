"""Shared fixtures: one real Apache Kafka broker per test session, worker processes, a small model.

The broker is the project's own (deploy/kafka/kafka.sh) on a test port, so a developer's broker on
9092 is never touched. If a broker already answers on that port it is reused and left running.
"""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from demandstream.stream.worker.launcher import WorkerLauncher, free_port, worker_env

REPO = Path(__file__).resolve().parents[1]
KAFKA_SH = REPO / "deploy" / "kafka" / "kafka.sh"
#: pytest-xdist runs ``make test`` in several processes (gw0, gw1, ...); each starts its own session broker,
#: XDIST_PORT_STRIDE ports above the previous one (a node uses its port and port + 1000), clear of the
#: fixed ports of the cluster, SASL and bench tests (19392 and up) for up to six processes.
XDIST_PORT_STRIDE = 50
XDIST_WORKER = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw") or 0)
TEST_KAFKA_PORT = (
    int(os.environ.get("DEMANDSTREAM_TEST_KAFKA_PORT", "19092")) + XDIST_PORT_STRIDE * XDIST_WORKER
)
#: Bounds for everything that waits on a broker or worker; generous because CI shares 2 cores.
KAFKA_UP_TIMEOUT_S = 300
WORKER_READY_TIMEOUT_S = 120


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


class WorkerProcess(WorkerLauncher):
    """A ``demandstream worker`` subprocess with its own app id, topics, data dir and web port.

    The shared launcher (stream/worker/launcher.py) with the tests' bounds, run from the checkout.
    """

    def __init__(self, env: dict[str, str], log_path: Path):
        super().__init__(env, log_path, cwd=REPO, ready_timeout_s=WORKER_READY_TIMEOUT_S)


@pytest.fixture
def stream_env(kafka_bootstrap, small_model, tmp_path) -> dict[str, str]:
    """Environment for one isolated pipeline: unique app id and topic names on the session broker."""
    tag = uuid.uuid4().hex[:8]
    return worker_env(
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
