"""The metric contract that deploy/ is checked against matches what stream/worker/metrics.py really exports."""

from __future__ import annotations

import pytest
from deploy_spec import METRIC_FAMILIES


def test_worker_exports_exactly_the_contract_metrics() -> None:
    metrics_module = pytest.importorskip(
        "demandstream.stream.worker.metrics", reason="stream/worker/metrics.py is not written yet"
    )
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

    # A private registry leaves out the process_* and python_* collectors, which are not ours.
    worker = metrics_module.Metrics(registry=CollectorRegistry())
    exported = {}
    for collector in vars(worker).values():
        if isinstance(collector, Counter | Gauge | Histogram):
            # The family name: Counter("x") is exposed as x_total.
            name = collector._name + ("_total" if collector._type == "counter" else "")
            exported[name] = (collector._type, frozenset(collector._labelnames))
    assert exported == METRIC_FAMILIES
