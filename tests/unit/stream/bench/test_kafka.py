"""The pure pieces of the bench's Kafka side (issue #14): when an exactly-once drain is done, the
workers' resident memory, the load generator's achieved rate, and the latency curve's PNG.

No broker: the end-offset watch and the committed-record count are fakes; the memory readers run on
this test's own processes.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest

from demandstream.stream.bench import kafka as bk
from demandstream.stream.bench import plot as bp


class FakeWatch:
    """Last stable offsets that advance one poll at a time; ``tps`` as OffsetWatch's (4 partitions)."""

    bootstrap, topic = "127.0.0.1:49592", "bench-signals-x"

    def __init__(self, polls: list[dict[int, int]]):
        self.polls, self.tps = list(polls), [0, 1, 2, 3]

    def ends(self) -> dict[int, int]:
        return self.polls.pop(0) if len(self.polls) > 1 else self.polls[0]


def test_exactly_once_drain_waits_for_committed_records_not_markers(monkeypatch):
    # 10 events; each commit leaves a marker in each partition it wrote. After the first commit the
    # offsets already sum to 10 (8 records + 2 markers): not done until the count says so.
    polls = [
        {0: 0, 1: 0, 2: 0, 3: 0},
        {0: 5, 1: 5, 2: 0, 3: 0},  # 8 records + 2 markers
        {0: 5, 1: 5, 2: 0, 3: 0},  # unchanged: not counted again
        {0: 5, 1: 5, 2: 2, 3: 2},  # 2 more records + 2 markers
    ]
    committed = {(0, 5): 4, (1, 5): 4, (2, 2): 1, (3, 2): 1}  # records per partition up to that offset
    counted: list[tuple[dict, dict]] = []

    def count(bootstrap, topic, start, end):
        counted.append((dict(start), dict(end)))
        return sum(committed.get((p, e), 0) - committed.get((p, start[p]), 0) for p, e in end.items())

    monkeypatch.setattr(bk, "count_committed", count)
    monkeypatch.setattr(bk, "POLL_S", 0.0)
    bk.wait_committed(FakeWatch(polls), 10, timeout=5.0)
    assert counted == [
        ({0: 0, 1: 0, 2: 0, 3: 0}, {0: 5, 1: 5, 2: 0, 3: 0}),
        ({0: 5, 1: 5, 2: 0, 3: 0}, {0: 5, 1: 5, 2: 2, 3: 2}),
    ]


def test_exactly_once_drain_gives_up_when_the_worker_exits(monkeypatch):
    class Exited:
        returncode = 3

        def poll(self):
            return 3

    monkeypatch.setattr(bk, "count_committed", lambda *a: 0)
    with pytest.raises(RuntimeError, match="worker exited with 3 after 0 of 10"):
        bk.wait_committed(FakeWatch([{0: 1, 1: 0, 2: 0, 3: 0}]), 10, timeout=5.0, proc=Exited())


def test_resident_memory_of_this_process_and_of_a_child():
    assert 1.0 < bk.rss_mib(os.getpid()) < 100_000
    assert 0.0 < bk.rss_mib(os.getpid(), "RssAnon") < bk.rss_mib(os.getpid())
    child = subprocess.Popen(
        [sys.executable, "-c", "import time; print('up', flush=True); time.sleep(30)"], stdout=subprocess.PIPE
    )
    try:
        # read its memory once it runs Python: just after fork/exec its resident set is a fraction of a MiB
        assert child.stdout.readline() == b"up\n"
        assert child.pid in bk.child_pids(os.getpid())
        assert bk.rss_mib(child.pid) > 1.0
    finally:
        child.kill()
        child.wait()
        child.stdout.close()
    assert child.pid not in bk.child_pids(os.getpid())
    with pytest.raises(ValueError, match="VmRSS"):
        bk.status_kib("Name:\tzombie\nState:\tZ (zombie)\n")


def test_free_ports_are_consecutive_and_free():
    base = bk.free_ports(3)
    for port in range(base, base + 3):
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))


def test_achieved_load_flags_a_generator_below_95_percent():
    ok = bk.achieved_load(2_000.0, 19_000, 10.0)
    assert ok["achieved_events_per_s"] == 1_900.0 and not ok["below_target"] and "sent" not in ok
    short = bk.achieved_load(2_000.0, 18_990, 10.0, sent=19_000)
    assert short["below_target"] and short["sent"] == 19_000 and short["produced"] == 18_990


def test_latency_breakdown_splits_each_event_at_the_brokers_append_time():
    signals = [
        {"event_id": "a", "ts": 10.000, "emitted_at": 10.040},  # one micro-batch of three
        {"event_id": "b", "ts": 10.010, "emitted_at": 10.040},
        {"event_id": "c", "ts": 10.020, "emitted_at": 10.040},
        {"event_id": "d", "ts": 10.030, "emitted_at": 10.070},  # a batch of one, its append not read
    ]
    appended = {"a": 10.005, "b": 10.012, "c": 10.021}
    b = bk.latency_breakdown(signals, appended, seconds=2.0)
    assert b["batches_per_s"] == 1.0 and b["batch_events_median"] == 2.0  # sizes 3 and 1
    # legs of the three joined events: generator 5, 2, 1 ms; worker 35, 28, 19 ms (numpy's linear p99)
    assert b["produce_p50"] == pytest.approx(2.0) and b["worker_p50"] == pytest.approx(28.0)
    assert b["produce_p99"] == pytest.approx(4.94) and b["worker_p99"] == pytest.approx(34.86)
    only_batches = bk.latency_breakdown(signals, {}, seconds=2.0)
    assert set(only_batches) == {"batches_per_s", "batch_events_median"}


def test_the_latency_curve_is_a_png(tmp_path):
    latency = {
        "25%": {"p50": 11.0, "p95": 15.8, "p99": 22.9, "rate_events_per_s": 2_000.0,
                **bk.achieved_load(2_000.0, 16_000, 8.0)},
        "50%": {"p50": 12.6, "p95": 38.2, "p99": 130.0, "rate_events_per_s": 4_000.0,
                **bk.achieved_load(4_000.0, 29_000, 8.0)},
        "75%": None,
    }  # fmt: skip
    points = bp.curve_points(latency)
    assert [(p["level"], p["below_target"]) for p in points] == [("25%", False), ("50%", True)]
    path = bp.latency_curve_png(latency, tmp_path / "sub" / "bench-latency.png", max_rate=8_000.0)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="no latency level"):
        bp.latency_curve_png({"25%": None}, tmp_path / "none.png")


def test_cpu_use_counts_this_process_as_worker_and_generator_alike():
    cpu = bk.CpuUse([os.getpid()])
    end = time.process_time() + 0.3
    while time.process_time() < end:  # 0.3 s of CPU in this process
        pass
    c = cpu.cores()
    assert c["of"] == os.cpu_count()
    # in CPU seconds, which preemption by other processes does not shrink (clock ticks of 10 ms)
    worker, generator, machine = (c[k] * c["seconds"] for k in ("worker", "generator", "machine"))
    assert worker >= 0.28
    assert abs(worker - generator) <= 0.05  # the same process, read two ways
    assert machine >= worker - 0.05  # the machine's busy time includes this process's


def test_a_running_bench_worker_is_not_started_twice(tmp_path):
    """Starting a BenchWorker that still runs would replace the process it holds and orphan the first
    (drain starts its worker itself; a script that started it before left one running each time)."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        w = bk.BenchWorker("127.0.0.1:49592", tmp_path / "m.pt", "twice", tmp_path, "in")
        w.launcher = type("Held", (), {"proc": child})()
        with pytest.raises(RuntimeError, match="already running"):
            w.start()
    finally:
        child.kill()
        child.wait()
