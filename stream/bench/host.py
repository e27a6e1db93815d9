"""What the bench reads of the machine and its processes from /proc: resident memory, children, CPU used."""

from __future__ import annotations

import os
import re
import resource
import time
from collections.abc import Sequence
from pathlib import Path


def status_kib(status: str, field: str = "VmRSS") -> int:
    """A memory ``field`` in KiB from the text of ``/proc/<pid>/status``: ``VmRSS``, the resident set,
    or ``RssAnon``, its anonymous part (the heap, the model and the states, which every worker process
    holds for itself). The rest of VmRSS is mostly file pages of the libraries (torch's alone are ~480
    MiB), which the page cache shares between processes, so a machine running N workers needs about
    N × RssAnon + the libraries once.

    >>> text = "Name:\\tpython\\nVmRSS:\\t  524288 kB\\nRssAnon:\\t  200000 kB\\nThreads:\\t9\\n"
    >>> status_kib(text), status_kib(text, "RssAnon")
    (524288, 200000)
    """
    m = re.search(rf"^{field}:\s*(\d+)\s*kB", status, re.M)
    if m is None:
        raise ValueError(f"no {field} line (the process has ended or is a zombie)")
    return int(m.group(1))


def rss_mib(pid: int, field: str = "VmRSS") -> float:
    """Resident memory of process ``pid`` in MiB (``field`` of ``/proc/<pid>/status``, :func:`status_kib`)."""
    return status_kib(Path(f"/proc/{pid}/status").read_text(), field) / 1024


def parent_pid(stat: str) -> int:
    """The parent's pid from the text of ``/proc/<pid>/stat`` (the command name may hold spaces).

    >>> parent_pid("4242 (python -m x) S 4200 4200 17 0 -1")
    4200
    """
    return int(_stat_fields(stat)[1])


def _stat_fields(stat: str) -> list[str]:
    """The fields of ``/proc/<pid>/stat`` after the command name (which may hold spaces and parentheses):
    the process state first."""
    return stat.rpartition(")")[2].split()


def child_pids(pid: int) -> list[int]:
    """The pids of the live children of ``pid``, ascending (``worker --processes N``'s workers)."""
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            if parent_pid((d / "stat").read_text()) == pid:
                out.append(int(d.name))
        except (OSError, ValueError, IndexError):  # ended meanwhile
            continue
    return sorted(out)


def process_cpu_ticks(stat: str) -> int:
    """User + system CPU time of a process in clock ticks, from the text of ``/proc/<pid>/stat``.

    >>> process_cpu_ticks("4242 (python -m x) S 4200 4200 17 0 -1 0 0 0 0 0 350 50 0 0")
    400
    """
    fields = _stat_fields(stat)
    return int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of proc(5))


def machine_busy_ticks(stat: str) -> int:
    """CPU ticks every core of the machine spent busy (neither idle nor waiting on I/O), from the
    text of ``/proc/stat``: user, nice, system, irq, softirq and steal.

    >>> machine_busy_ticks("cpu  100 5 50 1000 20 3 2 7 0 0\\ncpu0 50 2 25 500 10 1 1 3 0 0")
    167
    """
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in stat.split()[1:9])
    return user + nice + system + irq + softirq + steal


class CpuUse:
    """CPU used between construction and :meth:`cores`, in cores (CPU seconds per wall second): by
    the worker's processes, by this process (the load generator, while it is the only thing this
    process runs) and by the whole machine, whose remainder is mostly the broker's. A latency level
    that keeps the machine near all its cores busy measured the machine's capacity, not the worker's
    latency (docs/BENCHMARKS.md, 2026-12-05 afternoon)."""

    def __init__(self, pids: Sequence[int]):
        self.pids = list(pids)
        self._tick = os.sysconf("SC_CLK_TCK")
        self._t0 = time.monotonic()
        self._start = self._read()

    def _read(self) -> tuple[int, float, int]:
        worker = sum(process_cpu_ticks(Path(f"/proc/{p}/stat").read_text()) for p in self.pids)
        own = resource.getrusage(resource.RUSAGE_SELF)
        return worker, own.ru_utime + own.ru_stime, machine_busy_ticks(Path("/proc/stat").read_text())

    def cores(self) -> dict[str, float]:
        """``{"worker", "generator", "machine", "of", "seconds"}``: cores used since the start, the
        machine's cores (``of``) and the wall seconds they were measured over."""
        wall = max(time.monotonic() - self._t0, 1e-9)
        (w0, g0, m0), (w1, g1, m1) = self._start, self._read()
        return {
            "worker": (w1 - w0) / self._tick / wall,
            "generator": (g1 - g0) / wall,
            "machine": (m1 - m0) / self._tick / wall,
            "of": float(os.cpu_count() or 1),
            "seconds": wall,
        }
