"""observe_many: a batch's observations give the samples a loop of Histogram.observe gives."""

from __future__ import annotations

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, Histogram

from demandstream.stream.worker.metrics import LATENCY_BUCKETS, observe_many


def samples(h: Histogram) -> dict:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for s in h.collect()[0].samples
        if "created" not in s.name
    }


def pair(labelled: bool):
    out = []
    for _ in range(2):
        h = Histogram(
            "lat", "x", ["w"] if labelled else [], buckets=LATENCY_BUCKETS, registry=CollectorRegistry()
        )
        out.append((h, h.labels("a") if labelled else h))
    return out


@pytest.mark.parametrize("labelled", [False, True])
@pytest.mark.parametrize("seed", range(5))
def test_the_same_buckets_count_and_sum_as_one_observe_per_value(seed, labelled):
    rng = np.random.default_rng(seed)
    values = np.concatenate(
        [
            rng.exponential(0.05, 500),  # the usual milliseconds
            rng.exponential(20.0, 50),  # backlogs, some past the last finite bound
            np.array(LATENCY_BUCKETS),  # exactly on a bound: counted in that bucket (observe's <=)
            np.zeros(3),
        ]
    )
    rng.shuffle(values)
    (h_loop, c_loop), (h_many, c_many) = pair(labelled)
    for v in values.tolist():
        c_loop.observe(v)
    for part in np.array_split(values, 7):  # several batches, one of them possibly empty
        observe_many(c_many, part)
    observe_many(c_many, [])
    a, b = samples(h_loop), samples(h_many)
    assert a.keys() == b.keys()
    for key in a:
        if key[0].endswith("_sum"):
            assert b[key] == pytest.approx(a[key], rel=1e-12)
        else:
            assert b[key] == a[key], key


def test_falls_back_to_observe_without_the_internals_it_reads():
    class Plain:
        def __init__(self):
            self.seen = []

        def observe(self, v):
            self.seen.append(v)

    h = Plain()
    observe_many(h, [0.5, 1.5])
    assert h.seen == [0.5, 1.5]
