"""Prometheus metrics of a worker (docs/ARCHITECTURE.md §Metrics), all in base units (seconds, events).

Faust once exported latencies scaled by 1000 (faust-streaming/faust#693); ours are observed in seconds
straight from ``time.perf_counter()`` differences and event timestamps, and the buckets are in seconds.
Each worker owns a private registry so tests can build several workers in one process.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    gc_collector,
    generate_latest,
    platform_collector,
    process_collector,
)

#: Micro-batch sizes from single events to the largest batch we allow.
BATCH_BUCKETS = (1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2000, 4000, 8000)
#: One batched model step: tens of microseconds on a GPU to tens of milliseconds for big CPU batches.
INFERENCE_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
#: One phase of a micro-batch (stream/worker/agents.py): the engine's milliseconds, a broker round trip.
PHASE_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.015, 0.02, 0.03, 0.05, 0.1, 0.25, 1.0, 5.0)
#: Event time to signal: the product promises tens of milliseconds; the tail shows backlogs.
LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        r = self.registry = registry or CollectorRegistry()
        if registry is None:
            process_collector.ProcessCollector(registry=r)
            platform_collector.PlatformCollector(registry=r)
            gc_collector.GCCollector(registry=r)
        p = "demandstream_"
        self.events = Counter(
            p + "events", "Input records by result (valid, invalid, duplicate)", ["result"], registry=r
        )
        self.signals = Counter(p + "signals", "Demand signals produced", registry=r)
        self.dead_letters = Counter(
            p + "dead_letters", "Records sent to the dead-letter topic", ["reason"], registry=r
        )
        self.batch_size = Histogram(
            p + "batch_size", "Records per micro-batch", buckets=BATCH_BUCKETS, registry=r
        )
        self.inference_seconds = Histogram(
            p + "inference_seconds",
            "Duration of one batched model step",
            buckets=INFERENCE_BUCKETS,
            registry=r,
        )
        self.batch_phase_seconds = Histogram(
            p + "batch_phase_seconds",
            "Duration of each phase of a micro-batch: engine (validate, step, encode), then at-least-once "
            "signals and changelog (each awaits the broker's acks) and store (local write), or exactly-once "
            "transaction (outputs and changelog sent into the open transaction)",
            ["phase"],
            buckets=PHASE_BUCKETS,
            registry=r,
        )
        self.event_to_signal_seconds = Histogram(
            p + "event_to_signal_seconds",
            "Event timestamp to signal emitted",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.state_users = Gauge(
            p + "state_users", "Users with state on this worker's active partitions", registry=r
        )
        self.consumer_lag = Gauge(
            p + "consumer_lag", "Records behind the end of each input partition", ["partition"], registry=r
        )
        self.model_info = Gauge(
            p + "model_info",
            "The loaded model (value is always 1)",
            ["model_version", "device", "hidden", "categories"],
            registry=r,
        )
        self.expired_states = Counter(
            p + "expired_states", "User states deleted by the inactivity TTL", registry=r
        )
        self.misrouted_records = Counter(
            p + "misrouted_records",
            "Sampled input records on another partition than DEMANDSTREAM_PARTITIONER (murmur2 by default) "
            "gives their key: the producers partition otherwise, and forget and /users/{id}/demand miss such users",
            registry=r,
        )
        self.undecodable_states = Counter(
            p + "undecodable_states",
            "Stored user states that could not be decoded and were reset (the user starts fresh)",
            registry=r,
        )
        self._quality(r, p + "quality_")
        for result in ("valid", "invalid", "duplicate"):
            self.events.labels(result)  # export zeros from the start: rate() needs a first sample

    def _quality(self, r: CollectorRegistry, q: str) -> None:
        """Live model quality (stream/worker/quality.py, docs/OPERATIONS.md §8): prequential counts and
        sums per model version, from which PromQL derives hit@k, MRR, log loss and calibration."""
        v = ["model_version"]
        self.quality_category_points = Counter(
            q + "category_points", "Predictions scored by the user's next category", v, registry=r
        )
        self.quality_category_hits = Counter(
            q + "category_hits", "Next categories within the first k of the stored top", v + ["k"], registry=r
        )
        self.quality_category_reciprocal_rank = Counter(
            q + "category_reciprocal_rank",
            "Sum of 1/rank of the next category in the stored top (0 outside)",
            v,
            registry=r,
        )
        self.quality_purchase_points = Counter(
            q + "purchase_points", "Purchase propensities whose horizon was resolved", v, registry=r
        )
        self.quality_purchase_positives = Counter(
            q + "purchase_positives",
            "Resolved propensities followed by a purchase within the horizon",
            v,
            registry=r,
        )
        self.quality_purchase_logloss = Counter(
            q + "purchase_logloss", "Sum of the log loss of the resolved propensities", v, registry=r
        )
        vb = v + ["bucket"]
        self.quality_calibration_points = Counter(
            q + "calibration_points", "Resolved propensities per bucket (its lower edge)", vb, registry=r
        )
        self.quality_calibration_predicted = Counter(
            q + "calibration_predicted", "Sum of the resolved propensities per bucket", vb, registry=r
        )
        self.quality_calibration_positives = Counter(
            q + "calibration_positives",
            "Resolved propensities per bucket followed by a purchase",
            vb,
            registry=r,
        )
        self.quality_purchase_unresolved = Counter(
            q + "purchase_unresolved",
            "Propensities never scored, by reason (capacity, gap, revoked)",
            v + ["reason"],
            registry=r,
        )
        self.quality_purchase_pending = Gauge(
            q + "purchase_pending", "Propensities waiting for their horizon to pass", registry=r
        )
        self.quality_offline = Gauge(
            q + "offline",
            "The loaded model's offline prequential figure (DEMANDSTREAM_QUALITY_REPORT)",
            ["model_version", "metric"],
            registry=r,
        )
        self.quality_drift_margin = Gauge(
            q + "drift_margin",
            "Relative drop below the offline figure that the quality alert allows (DEMANDSTREAM_QUALITY_DRIFT_MARGIN)",
            registry=r,
        )

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


def observe_many(histogram: Histogram, values: Sequence[float] | np.ndarray) -> None:
    """``histogram.observe(v)`` for every ``v`` of ``values``, a batch at a time: the same bucket
    counts, the same count and (to float rounding) the same sum.

    The worker observes every signal's latency; one ``observe`` per value (a lock, a Python loop over
    the bounds) was about 1 µs of the ~50 µs a drained event costs (docs/BENCHMARKS.md). Here the
    values are bucketed by one ``searchsorted`` and each bucket and the sum take one increment. It
    reads prometheus_client's ``_upper_bounds``, ``_buckets`` and ``_sum``, the attributes ``observe``
    itself uses (tests/unit/stream/worker/test_metrics_batch.py holds the two paths equal on the
    installed release); without them it falls back to ``observe``. A labelled histogram is given as
    its child (``h.labels(...)``).

    >>> from prometheus_client import CollectorRegistry
    >>> h = Histogram("lat", "latency", buckets=(0.01, 0.1), registry=CollectorRegistry())
    >>> observe_many(h, [0.005, 0.01, 0.05, 3.0])
    >>> [s.value for s in h.collect()[0].samples if s.name == "lat_bucket"]
    [2.0, 3.0, 4.0]
    """
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        return
    bounds = getattr(histogram, "_upper_bounds", None)
    buckets = getattr(histogram, "_buckets", None)
    total = getattr(histogram, "_sum", None)
    if bounds is None or buckets is None or total is None or len(bounds) != len(buckets):
        for x in v.tolist():
            histogram.observe(x)
        return
    # observe() counts a value in the first bucket whose upper bound is >= it; +Inf is the last bound
    counts = np.bincount(np.searchsorted(bounds, v, side="left"), minlength=len(bounds))
    for child, n in zip(buckets, counts.tolist(), strict=False):
        if n:
            child.inc(n)
    total.inc(float(v.sum()))
