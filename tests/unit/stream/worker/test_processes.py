"""stream/worker/processes.py: the supervisor of `worker --processes N` (the real processes on a real broker
are tests/integration/test_processes.py)."""

from __future__ import annotations

import logging

import pytest

from demandstream.stream.settings import Settings
from demandstream.stream.worker import processes


class _EndedChild:
    """A child that has already ended with status 3, so the supervisor stops at its first look."""

    started: list[dict] = []

    def __init__(self, argv, env):
        self.pid, self.returncode = 4242 + len(self.started), 3
        self.started.append(env)

    def poll(self):
        return self.returncode

    def send_signal(self, _sig):
        raise AssertionError("an ended child gets no signal")

    def wait(self, _timeout=None):
        return self.returncode


@pytest.mark.parametrize(("n", "partitions", "idle"), [(5, 4, 1), (4, 4, 0), (2, 4, 0)])
def test_more_processes_than_partitions_are_said_to_idle(monkeypatch, caplog, n, partitions, idle):
    monkeypatch.setattr(processes.subprocess, "Popen", _EndedChild)
    _EndedChild.started = []
    with caplog.at_level(logging.WARNING, logger=processes.__name__):
        status = processes.run_processes(Settings(processes=n, partitions=partitions, web_port=7000))
    assert status == 3 and len(_EndedChild.started) == n  # a child's status is the command's
    said = [r.getMessage() for r in caplog.records if "partitions" in r.getMessage()]
    if idle:
        assert said == [
            f"{n} worker processes for {partitions} partitions (DEMANDSTREAM_PARTITIONS): Kafka gives each "
            f"partition to one member, so {idle} of them will process nothing; topics with at least {n} "
            "partitions use them all"
        ]
    else:
        assert said == []
