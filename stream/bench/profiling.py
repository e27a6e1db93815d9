"""The worker's profile under load: py-spy's samples and their summary (docs/profile-pipeline.txt)."""

from __future__ import annotations

import re
import subprocess
import sys
from collections import Counter
from pathlib import Path


def profile(pid: int, seconds: float, raw_out: Path) -> None:
    """Record ``seconds`` of py-spy samples of ``pid`` (all threads, non-blocking) as collapsed stacks."""
    py_spy = Path(sys.executable).with_name("py-spy")
    cmd = [
        str(py_spy),
        "record",
        "--pid",
        str(pid),
        "--duration",
        str(int(seconds)),
        "--rate",
        "100",
        "--nonblocking",
        "--threads",
        "--format",
        "raw",
        "--output",
        str(raw_out),
    ]
    subprocess.run(cmd, check=True, capture_output=True, timeout=seconds + 60)


_LINE = re.compile(r":\d+\)$")


def summarize_profile(raw: str, top: int = 40) -> tuple[str, list[tuple[str, float, float]]]:
    """Top functions of py-spy's collapsed stacks: (text table, [(frame, self %, total %)]).

    >>> text, rows = summarize_profile("t;a (x.py:1);b (x.py:2) 2\\nt;a (x.py:1);b (x.py:3) 1\\nt;a (x.py:1) 1\\n")
    >>> rows[0]
    ('b (x.py)', 75.0, 75.0)
    """
    own: Counter[str] = Counter()
    total: Counter[str] = Counter()
    threads: Counter[str] = Counter()
    n = 0
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        c = int(count)
        # py-spy names frames "function (file:line)"; one function is one row, whichever line was running.
        frames = [_LINE.sub(")", f) for f in stack.split(";")]
        n += c
        threads[frames[0]] += c
        if len(frames) > 1:  # a bare thread frame is a sample outside any Python function
            own[frames[-1]] += c
        for f in set(frames[1:]):
            total[f] += c
    if n == 0:
        return "no samples\n", []
    rows = [(f, 100.0 * c / n, 100.0 * total[f] / n) for f, c in own.most_common(top)]
    lines = [f"{n} samples", "", "threads (share of samples):"]
    lines += [f"  {100.0 * c / n:6.1f} %  {t}" for t, c in threads.most_common()]
    lines += ["", f"top {top} functions by own time (self %, total %):"]
    lines += [f"  {s:6.1f}  {t:6.1f}  {f}" for f, s, t in rows]
    lines += ["", f"top {top} functions by total time (total %):"]
    lines += [f"  {100.0 * c / n:6.1f}  {f}" for f, c in total.most_common(top)]
    return "\n".join(lines) + "\n", rows
