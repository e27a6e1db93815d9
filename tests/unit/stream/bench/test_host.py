"""The bench's readings of the machine: resident memory and CPU, on this test's own processes."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from demandstream.stream.bench import host as bh


def test_resident_memory_of_this_process_and_of_a_child():
    assert 1.0 < bh.rss_mib(os.getpid()) < 100_000
    assert 0.0 < bh.rss_mib(os.getpid(), "RssAnon") < bh.rss_mib(os.getpid())
    child = subprocess.Popen(
        [sys.executable, "-c", "import time; print('up', flush=True); time.sleep(30)"], stdout=subprocess.PIPE
    )
    try:
        # read its memory once it runs Python: just after fork/exec its resident set is a fraction of a MiB
        assert child.stdout.readline() == b"up\n"
        assert child.pid in bh.child_pids(os.getpid())
        assert bh.rss_mib(child.pid) > 1.0
    finally:
        child.kill()
        child.wait()
        child.stdout.close()
    assert child.pid not in bh.child_pids(os.getpid())
    with pytest.raises(ValueError, match="VmRSS"):
        bh.status_kib("Name:\tzombie\nState:\tZ (zombie)\n")


def test_cpu_use_counts_this_process_as_worker_and_generator_alike():
    cpu = bh.CpuUse([os.getpid()])
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
