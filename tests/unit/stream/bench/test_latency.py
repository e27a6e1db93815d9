"""The latency measurement's pure pieces: the load generator's achieved rate and where each event's
latency went.
"""

from __future__ import annotations

import pytest

from demandstream.stream.bench import latency as bl


def test_achieved_load_flags_a_generator_below_95_percent():
    ok = bl.achieved_load(2_000.0, 19_000, 10.0)
    assert ok["achieved_events_per_s"] == 1_900.0 and not ok["below_target"] and "sent" not in ok
    short = bl.achieved_load(2_000.0, 18_990, 10.0, sent=19_000)
    assert short["below_target"] and short["sent"] == 19_000 and short["produced"] == 18_990


def test_latency_breakdown_splits_each_event_at_the_brokers_append_time():
    signals = [
        {"event_id": "a", "ts": 10.000, "emitted_at": 10.040},  # one micro-batch of three
        {"event_id": "b", "ts": 10.010, "emitted_at": 10.040},
        {"event_id": "c", "ts": 10.020, "emitted_at": 10.040},
        {"event_id": "d", "ts": 10.030, "emitted_at": 10.070},  # a batch of one, its append not read
    ]
    appended = {"a": 10.005, "b": 10.012, "c": 10.021}
    b = bl.latency_breakdown(signals, appended, seconds=2.0)
    assert b["batches_per_s"] == 1.0 and b["batch_events_median"] == 2.0  # sizes 3 and 1
    # legs of the three joined events: generator 5, 2, 1 ms; worker 35, 28, 19 ms (numpy's linear p99)
    assert b["produce_p50"] == pytest.approx(2.0) and b["worker_p50"] == pytest.approx(28.0)
    assert b["produce_p99"] == pytest.approx(4.94) and b["worker_p99"] == pytest.approx(34.86)
    only_batches = bl.latency_breakdown(signals, {}, seconds=2.0)
    assert set(only_batches) == {"batches_per_s", "batch_events_median"}
