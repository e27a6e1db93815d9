"""When an exactly-once drain is done (issue #14): committed records, not the transactions' markers.

No broker: the end-offset watch and the committed-record count are fakes.
"""

from __future__ import annotations

import pytest

from demandstream.stream.bench import topics as bt


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

    monkeypatch.setattr(bt, "count_committed", count)
    monkeypatch.setattr(bt, "POLL_S", 0.0)
    bt.wait_committed(FakeWatch(polls), 10, timeout=5.0)
    assert counted == [
        ({0: 0, 1: 0, 2: 0, 3: 0}, {0: 5, 1: 5, 2: 0, 3: 0}),
        ({0: 5, 1: 5, 2: 0, 3: 0}, {0: 5, 1: 5, 2: 2, 3: 2}),
    ]


def test_exactly_once_drain_gives_up_when_the_worker_exits(monkeypatch):
    class Exited:
        returncode = 3

        def poll(self):
            return 3

    monkeypatch.setattr(bt, "count_committed", lambda *a: 0)
    with pytest.raises(RuntimeError, match="worker exited with 3 after 0 of 10"):
        bt.wait_committed(FakeWatch([{0: 1, 1: 0, 2: 0, 3: 0}]), 10, timeout=5.0, proc=Exited())
