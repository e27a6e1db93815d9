"""Smoke test of ``demandstream bench --quick``: it runs end to end and writes every docs/ARCHITECTURE.md
§Benchmark key.

It never asserts speed (the machine is shared); only that each figure was measured (a finite number > 0),
that no part failed, and that both passthrough anchors ran with the ratio taken on the faster.
The bench starts its own broker on a port of its own, so the session broker of the other tests is not used.
"""

from __future__ import annotations

import json
import math

import pytest

from demandstream.stream.bench.passthrough import PASSTHROUGH_METHODS
from demandstream.stream.bench.plan import BenchPlan
from demandstream.stream.bench.report import BEGIN_MARK, END_MARK
from demandstream.stream.bench.runner import BENCH_KEYS, SCALING_KEYS, run_bench
from demandstream.stream.settings import Settings

pytestmark = [pytest.mark.kafka, pytest.mark.slow]


def numbers(x) -> list[float]:
    if isinstance(x, bool) or x is None:
        return []
    if isinstance(x, int | float):
        return [float(x)]
    if isinstance(x, dict):
        return [v for value in x.values() for v in numbers(value)]
    if isinstance(x, list):
        return [v for value in x for v in numbers(value)]
    return []


#: The smallest run that still exercises every measurement: the test checks the harness, not speed.
SMOKE = BenchPlan(
    events=3_000,
    rounds=1,
    latency_s=3.0,
    restore_users=2_000,
    disk_users=5_000,
    train_events=3_000,
    step_min_s=0.02,
    profile_s=0.0,
)


@pytest.mark.timeout(900)
def test_quick_bench_writes_every_design_key(tmp_path):
    out, md = tmp_path / "bench.json", tmp_path / "docs" / "BENCHMARKS.md"
    md.parent.mkdir()
    md.write_text(
        f"# Benchmarks\n\n## What each optimization bought\n\nkept\n\n{BEGIN_MARK}\nold\n{END_MARK}\n"
    )

    run_bench(Settings(), out=out, quick=True, markdown=md, plan=SMOKE)

    r = json.loads(out.read_text())
    one_core = r["machine"]["cores"] < 2  # then, and only then, the all-cores drain has nothing to add
    allowed = {s["part"] for s in r["skipped"] if one_core and s["part"].startswith("processes round")}
    assert r["failed"] == [] and {s["part"] for s in r["skipped"]} == allowed, (r["failed"], r["skipped"])
    assert set(BENCH_KEYS) <= set(r) and set(SCALING_KEYS) <= set(r)
    measured = BENCH_KEYS[:-1] + ("exactly_once_events_per_s", "exactly_once_cost")
    if not one_core:
        measured += ("pipeline_processes_events_per_s", "ratio_processes")
    for key in measured:  # every measured figure; machine is a description
        values = numbers(r[key])
        assert values, key
        assert all(math.isfinite(v) for v in values), (key, r[key])
        # exactly-once may even be faster on a noisy quick run: its cost is the one figure allowed <= 0
        assert key == "exactly_once_cost" or all(v > 0 for v in values), (key, r[key])
    mem = r["memory_mib"]
    for key in ("pipeline_per_process", "exactly_once_per_process", "no_state", "restored"):
        assert all(math.isfinite(v) and v > 0 for v in numbers(mem[key])) and numbers(mem[key]), (key, mem)
    # 2,000 restored users move a process's memory by less than its noise: any finite figure will do
    assert math.isfinite(mem["per_100k_users"]), mem
    assert set(r["latency_ms"]) == {"25%", "50%", "75%"}
    assert all({"p50", "p95", "p99"} <= set(v) for v in r["latency_ms"].values())
    # exactly-once as a read_committed consumer sees it: every event's signal, once, with the commit's wait
    eo = r["detail"]["exactly_once_latency"]
    assert eo["isolation_level"] == "read_committed" and eo["n"] == eo["unique"] > 0 and eo["missing"] == 0, (
        eo
    )
    assert 0 < eo["p50"] <= eo["p99"] and math.isfinite(eo["p99"]), eo
    assert {"1", "4096"} <= set(r["step_events_per_s"]["cpu"])
    assert set(r["incremental_speedup"]) == {"10", "100", "1000"}
    assert r["machine"]["cores"] > 0 and r["machine"]["python"]

    # Both anchors were measured in the round, and the ratio divides by the faster (#14 item 1).
    anchors = r["detail"]["passthrough"]["methods"]
    assert set(anchors) == set(PASSTHROUGH_METHODS)
    for spec in anchors.values():
        assert spec["settings"] and spec["events_per_s"]["runs"][0] > 0
    (faster,) = r["detail"]["passthrough"]["faster"]
    assert r["passthrough_events_per_s"]["runs"] == anchors[faster]["events_per_s"]["runs"]
    assert faster == max(anchors, key=lambda m: anchors[m]["events_per_s"]["runs"][0])
    (pipeline,), (ratio,) = r["pipeline_events_per_s"]["runs"], r["ratio"]["runs"]
    assert ratio == pytest.approx(pipeline / anchors[faster]["events_per_s"]["runs"][0])

    text = md.read_text()
    assert "kept" in text and "old" not in text
    assert text.count(BEGIN_MARK) == 1 and "Throughput" in text
    assert all(f"passthrough `{m}`" in text for m in PASSTHROUGH_METHODS)
    assert "failed:" not in text and "Failed parts" not in text
