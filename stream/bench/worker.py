"""The worker under measurement: a ``python -m stream worker`` subprocess with its own app id, topics, data
dir and web port (as the integration tests run them), its drain (throughput and memory) and its restore.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import subprocess
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from demandstream.stream.bench.host import child_pids, rss_mib
from demandstream.stream.bench.passthrough import fastest_copy
from demandstream.stream.bench.topics import (
    PARTITIONS,
    POLL_S,
    OffsetWatch,
    create_changelog,
    create_topics,
    produce,
    wait_committed,
)
from demandstream.stream.worker.launcher import (
    HTTP_TIMEOUT_S,
    READY_PROBE_TIMEOUT_S,
    WorkerLauncher,
    free_port,
    metric_sum,
    worker_env,
)

#: Bound on waiting for a worker to become ready (a cold start on a busy machine included).
WORKER_READY_TIMEOUT_S = 600
#: Faust recovers a few thousand records per second on 2 cores: a million takes minutes.
RESTORE_TIMEOUT_S = 1800
#: Seconds a just-ready worker is left before its resident memory is read (state-less / restored).
MEMORY_SETTLE_S = 1.0
#: Tries at finding ``worker --processes N``'s N consecutive free web ports.
PORT_TRIES = 50


@dataclass
class BenchWorker:
    """A ``python -m stream worker`` subprocess with its own app id, topics, data dir and web port.

    Started through the shared launcher (stream/worker/launcher.py); its web port is picked at ``start``.
    With ``processes`` > 1 it is ``worker --processes N``: a supervisor whose N children (one consumer
    group) take the web ports ``port`` … ``port + N - 1`` and the data dirs ``…/worker-i``.
    """

    bootstrap: str
    model: Path
    tag: str
    workdir: Path
    input_topic: str
    device: str = "cpu"
    inference: str = "eager"
    extra_env: dict[str, str] = field(default_factory=dict)
    launcher: WorkerLauncher | None = None
    processes: int = 1
    guarantee: str = "at_least_once"
    ready_at: float = 0.0  #: monotonic time of the last ``wait_ready``'s answer (every process ready)

    @property
    def app_id(self) -> str:
        return f"ds-bench-{self.tag}"

    @property
    def signals_topic(self) -> str:
        return f"bench-signals-{self.tag}"

    @property
    def log_path(self) -> Path:
        return self.workdir / f"worker-{self.tag}.log"

    @property
    def proc(self) -> subprocess.Popen | None:
        """The worker's process once started (its pid is what ``profile`` samples)."""
        return None if self.launcher is None else self.launcher.proc

    @property
    def port(self) -> int | None:
        """The worker's web port once started."""
        return None if self.launcher is None else self.launcher.port

    @property
    def started_at(self) -> float:
        """Monotonic time of the process's start (0 before ``start``)."""
        return 0.0 if self.launcher is None else self.launcher.started_at

    def start(self) -> BenchWorker:
        """Start the worker on a web port free now (N consecutive ones for N processes), every other
        setting the bench's. A worker still running is an error: starting again would orphan it (its
        process would outlive the bench, which only kills the one it holds)."""
        if self.proc is not None and self.proc.poll() is None:
            raise RuntimeError(f"bench worker {self.tag} is already running (pid {self.proc.pid})")
        port = free_ports(self.processes)
        env = worker_env(
            {
                "DEMANDSTREAM_BROKER": f"kafka://{self.bootstrap}",
                "DEMANDSTREAM_MODEL": str(self.model),
                "DEMANDSTREAM_APP_ID": self.app_id,
                "DEMANDSTREAM_DATA_DIR": str(self.workdir / f"data-{self.tag}"),
                "DEMANDSTREAM_WEB_PORT": str(port),
                "DEMANDSTREAM_TOPIC_INPUT": self.input_topic,
                "DEMANDSTREAM_TOPIC_SIGNALS": self.signals_topic,
                "DEMANDSTREAM_TOPIC_DLQ": f"bench-dlq-{self.tag}",
                "DEMANDSTREAM_TOPIC_CONTROL": f"bench-control-{self.tag}",
                "DEMANDSTREAM_PARTITIONS": str(PARTITIONS),
                "DEMANDSTREAM_STANDBY_REPLICAS": "0",
                "DEMANDSTREAM_DEVICE": self.device,
                "DEMANDSTREAM_INFERENCE": self.inference,
                "DEMANDSTREAM_LOG_LEVEL": "warning",
                "DEMANDSTREAM_LAG_INTERVAL_S": "1",
                "DEMANDSTREAM_GUARANTEE": self.guarantee,
                "DEMANDSTREAM_PROCESSES": str(self.processes),
                **self.extra_env,
            }
        )
        # POLL_S, not the launcher's half second: the drain's start-up figure ends at the first 200.
        self.launcher = WorkerLauncher(
            env, self.log_path, ready_timeout_s=WORKER_READY_TIMEOUT_S, poll_s=POLL_S
        ).start()
        return self

    def _started(self) -> WorkerLauncher:
        if self.launcher is None:
            raise RuntimeError(f"bench worker {self.tag} not started")
        return self.launcher

    def wait_ready(self, timeout: float = WORKER_READY_TIMEOUT_S) -> float:
        """Block until /readyz answers 200; return the monotonic time it was first seen.

        With N processes: until every child's /readyz answers 200 in one sweep (a child that joins late
        sends the others back into a rebalance, where they answer 503); the time is that sweep's end.
        """
        launcher = self._started()
        self.ready_at = launcher.wait_ready(timeout)
        if self.processes == 1:
            return self.ready_at
        deadline = time.monotonic() + timeout
        while True:
            if all(self._child_ready(i) for i in range(self.processes)):
                self.ready_at = time.monotonic()
                return self.ready_at
            if launcher.poll() is not None:
                raise RuntimeError(f"worker exited with {launcher.returncode}:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"not every worker process ready after {timeout} s:\n{self.log_tail()}")
            time.sleep(POLL_S)

    def _child_ready(self, i: int) -> bool:
        launcher = self._started()
        try:
            with urllib.request.urlopen(
                f"http://127.0.0.1:{launcher.port + i}/readyz", timeout=READY_PROBE_TIMEOUT_S
            ) as r:
                return r.status == 200
        except OSError:  # an HTTP 503 (HTTPError), not listening yet, or too busy to answer
            return False

    def events_per_process(self) -> list[float]:
        """Events each process has taken in (``demandstream_events_total`` on its /metrics), in order:
        with N processes, proof that each got its share of the partitions."""
        launcher = self._started()
        out = []
        for i in range(self.processes):
            url = f"http://127.0.0.1:{launcher.port + i}/metrics"
            with urllib.request.urlopen(url, timeout=HTTP_TIMEOUT_S) as r:
                out.append(metric_sum(r.read().decode(), "demandstream_events_total"))
        return out

    def worker_pids(self) -> list[int]:
        """The pids of the processes doing the stream work: the worker's own, or for N processes its
        children's (not the supervisor's)."""
        proc = self._started().proc
        if self.processes == 1:
            return [proc.pid]
        pids = child_pids(proc.pid)
        if len(pids) != self.processes:
            raise RuntimeError(f"{len(pids)} worker processes under pid {proc.pid}, not {self.processes}")
        return pids

    def metric(self, name: str) -> float:
        """Sum of a metric's samples on /metrics (0 if absent)."""
        return self._started().metric(name)

    def metrics_text(self) -> str:
        """The worker's whole /metrics exposition (one process)."""
        return self._started().metrics_text()

    def stop(self) -> None:
        """Kill the worker's process group, if it runs."""
        # SIGKILL, not a graceful stop: the bench's app ids, topics and data dirs are thrown away, and a
        # graceful Faust shutdown would cost seconds of CPU the next measurement shares.
        if self.launcher is not None:
            self.launcher.kill()

    def log_tail(self, n: int = 40) -> str:
        """The last ``n`` lines of the worker's log."""
        if self.launcher is None:
            return "(no log)"
        return self.launcher.log_tail(n)


@dataclass
class DrainResult:
    events_per_s: float
    startup_s: float  # process start -> /readyz 200 (of every process)
    drain_s: float  # /readyz 200 (or the feed's first fetch) -> last signal in the topic
    rss_mib: list[float] = field(default_factory=list)  # each worker process's resident memory after
    supervisor_rss_mib: float | None = None  # worker --processes N: the supervisor's own
    signals_at_ready: int = 0  # signal offsets already in the topic when the clock started
    feed_s: float | None = None  # fed drain: seconds the copy into the worker's input topic took
    committed_s: float | None = None  # exactly-once: clock start -> n signals committed (visible)
    events_per_process: list[float] = field(default_factory=list)  # worker --processes N: each one's share
    anon_mib: list[float] = field(default_factory=list)  # each worker process's anonymous part (RssAnon)


def drain(worker: BenchWorker, n: int, feed_from: str | None = None) -> DrainResult:
    """Start ``worker`` on an input topic already holding ``n`` events; time ready -> n signals out.

    With ``feed_from``, the worker's own input topic starts empty: once every process is ready, the
    ``n`` events of ``feed_from`` are copied into it with the fastest passthrough copy, and the clock
    starts at the copy's first fetch. ``worker --processes N`` needs this: its children do not become
    ready together, and the first one ready would drain a pre-loaded topic alone before the others join.

    The end is when the signal topic's end offsets reach ``n``. Under exactly-once the transactions'
    commit markers take offsets too (a few per commit, so the clock stops at most that many records
    early); ``committed_s`` adds the time until ``n`` committed signals are visible to a
    read_committed consumer (:func:`wait_committed`), which includes the last transaction's commit.
    Each worker process's resident memory is read once all its signals are out.
    """
    topics = [worker.signals_topic, f"bench-dlq-{worker.tag}"]
    create_topics(worker.bootstrap, topics + ([worker.input_topic] if feed_from else []))
    eo = worker.guarantee == "exactly_once"
    watch = OffsetWatch(worker.bootstrap, worker.signals_topic)
    committed = (
        OffsetWatch(worker.bootstrap, worker.signals_topic, isolation="read_committed") if eo else None
    )
    feed_s = t_committed = None
    try:
        worker.start()
        t_start = worker.wait_ready()
        if feed_from:
            started: list[float] = []
            asyncio.run(fastest_copy(worker.bootstrap, feed_from, worker.input_topic, n, started))
            t_start, feed_s = started[0], time.monotonic() - started[0]
        at_ready = watch.total()
        t_end = watch.wait_for(n, proc=worker.proc)
        if committed is not None:
            t_committed = wait_committed(committed, n, proc=worker.proc)
    finally:
        watch.close()
        if committed is not None:
            committed.close()
    pids = worker.worker_pids()
    rss, anon = [rss_mib(pid) for pid in pids], [rss_mib(pid, "RssAnon") for pid in pids]
    supervisor = rss_mib(worker.proc.pid) if worker.processes > 1 else None
    shares = worker.events_per_process() if worker.processes > 1 else []
    return DrainResult(
        n / (t_end - t_start),
        worker.ready_at - worker.started_at,
        t_end - t_start,
        rss,
        supervisor,
        at_ready,
        feed_s,
        None if t_committed is None else t_committed - t_start,
        shares,
        anon,
    )


def ready_rss_mib(worker: BenchWorker, settle_s: float = MEMORY_SETTLE_S, **ready) -> dict:
    """Start ``worker`` and wait for /readyz, then ``settle_s`` more; its start-up seconds and resident
    memory (MiB). The caller stops it."""
    worker.start()
    t_ready = worker.wait_ready(**ready)
    time.sleep(settle_s)
    return {"startup_seconds": t_ready - worker.started_at, "rss_mib": rss_mib(worker.proc.pid)}


def free_ports(n: int = 1) -> int:
    """The first of ``n`` consecutive TCP ports on 127.0.0.1 that nothing listens on now."""
    for _ in range(PORT_TRIES):
        base = free_port()
        if base + n - 1 > 65535:
            continue
        try:
            with contextlib.ExitStack() as stack:
                for port in range(base + 1, base + n):
                    sock = stack.enter_context(socket.socket())
                    sock.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
    raise RuntimeError(f"no {n} consecutive free ports found in {PORT_TRIES} tries")


def restore_seconds(worker: BenchWorker, record: bytes, n: int, baseline_startup_s: float) -> dict:
    """Pre-fill ``worker``'s changelog with ``n`` user states, start it on an empty data dir, time /readyz.

    The worker's start-up without a changelog (``baseline_startup_s``, from the drain runs: imports,
    model load, group join) is subtracted, leaving the time Faust's recovery spends on the records.
    """
    changelog = f"{worker.app_id}-user-state-changelog"
    create_changelog(worker.bootstrap, changelog)
    create_topics(worker.bootstrap, [worker.input_topic, worker.signals_topic, f"bench-dlq-{worker.tag}"])
    produce(worker.bootstrap, changelog, ((f"r{i:08d}".encode(), record) for i in range(n)), spread=True)
    ready = ready_rss_mib(worker, timeout=RESTORE_TIMEOUT_S)
    startup = ready["startup_seconds"]
    restore = max(startup - baseline_startup_s, 1e-9)
    return {
        "records": n,
        "startup_seconds": startup,
        "baseline_startup_seconds": baseline_startup_s,
        "restore_seconds": restore,
        "seconds_per_million_users": restore * 1e6 / n,
        "rss_mib": ready["rss_mib"],  # MEMORY_SETTLE_S after /readyz, all n states restored
    }
