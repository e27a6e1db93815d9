"""The bench's Markdown rendered from its JSON report (stream/bench/report.py)."""

from demandstream.stream.bench import latency as bl
from demandstream.stream.bench.report import render_markdown
from demandstream.stream.bench.runner import BENCH_KEYS, SCALING_KEYS


def test_render_markdown_with_several_failed_parts_writes_failed_in_place_of_figures():
    r = dict.fromkeys(BENCH_KEYS)
    r |= {
        "failed": [
            {"part": "broker start", "error": "RuntimeError: kafka.sh up failed (1): port | in use"},
            {"part": "step cpu", "error": "ValueError: bad batch"},
            {"part": "train", "error": "MemoryError"},
            {"part": "machine", "error": "OSError: no /proc"},
        ],
        "skipped": [
            {"part": "round 1", "reason": "broker start failed: RuntimeError: kafka.sh up failed"},
            {"part": "latency 25%", "reason": "broker start failed"},
            {"part": "restore", "reason": "broker start failed: port | in use"},
        ],
        "step_events_per_s": {"cpu": None},
        "detail": {},
        "date": "2026-12-01T00:00:00+00:00",
        "command": "demandstream bench --quick",
        "bench_seconds": 12.0,
        "broker": "own, port 49592",
        "quick": True,
    }
    text = render_markdown(r)
    assert "### Failed parts" in text
    assert "- `broker start` failed: RuntimeError" in text and "- `restore` not measured" in text
    assert "| passthrough for the ratio" in text and "not measured: broker start failed" in text
    assert "Ratio pipeline / passthrough: not measured" in text
    assert "| 25% of pipeline max | not measured: broker start failed |" in text
    assert "cpu: failed: ValueError: bad batch" in text
    assert "Training: failed: MemoryError." in text
    assert "machine: failed: OSError" in text
    # A pipe in a reason does not break the table it stands in.
    assert "| changelog restore | not measured: broker start failed: port \\| in use |" in text


def test_render_markdown_of_the_new_tables_with_missing_figures():
    r = dict.fromkeys(BENCH_KEYS + SCALING_KEYS)
    r |= {
        "failed": [{"part": "processes round 1", "error": "TimeoutError: not every worker process ready"}],
        "skipped": [{"part": "latency plot", "reason": "matplotlib is not installed"}],
        "ratio": {"median": 0.08, "min": 0.07, "max": 0.09, "runs": [0.07, 0.08, 0.09]},
        "pipeline_events_per_s": {"median": 8_000.0, "min": 7_000.0, "max": 9_000.0, "runs": [8_000.0]},
        "exactly_once_events_per_s": {"median": 7_800.0, "min": 7_800.0, "max": 7_800.0, "runs": [7_800.0]},
        "exactly_once_cost": 0.025,
        "latency_ms": {
            "25%": {
                "p50": 11.0,
                "p95": 15.8,
                "p99": 22.9,
                "rate_events_per_s": 2_000.0,
                **bl.achieved_load(2_000.0, 15_920, 8.0),
                "n": 15_920,
                "produce_p50": 3.1,
                "produce_p99": 9.4,
                "worker_p50": 7.9,
                "worker_p99": 13.5,
                "batches_per_s": 61.25,
                "batch_events_median": 32.0,
                "cpu_cores": {"worker": 0.61, "generator": 0.2, "machine": 1.1, "of": 2.0},
            },
            "50%": None,
            "75%": None,
        },
        "memory_mib": {
            "pipeline_per_process": {"median": 512.25, "min": 512.25, "max": 512.25, "runs": [512.25]},
            "processes_per_process": None,
            "exactly_once_per_process": None,
            "no_state": 480.0,
            "restored": 492.5,
            "restored_users": 25_000,
            "per_100k_users": 50.0,
        },
        "detail": {"processes": 2, "restore": {"records": 25_000}},
        "date": "2026-12-01T00:00:00+00:00",
        "command": "demandstream bench --quick",
        "bench_seconds": 12.0,
        "broker": "own, port 49592",
    }
    text = render_markdown(r)
    assert (
        "| pipeline, all cores: `demandstream worker --processes 2` drain, /readyz of every process → last "
        "signal | failed: TimeoutError: not every worker process ready |" in text
    )
    assert (
        "pair by pair: all 2 cores: failed: TimeoutError: not every worker process ready; 0.080 with 1 process "
        "(min 0.070, max 0.090)." in text
    )
    assert "exactly-once costs 2.5 % of at-least-once throughput (1 − 7,800 / 8,000 events/s" in text
    assert "target ≤ 10 %: met" in text
    assert (
        "| 25% of pipeline max | 2,000 | 1,990 (100 % of target) | 11.00 | 15.80 | 22.90 | 15,920 |" in text
    )
    assert "fell below" not in text
    # where the time goes, and the CPU it took
    assert "| 25% | 3.10 / 9.40 | 7.90 / 13.50 | 61.25 | 32.00 | 0.61 / 0.20 / 1.10 (of 2) |" in text
    assert "| 50% |" not in text  # a level not measured has no breakdown row
    assert "Latency versus achieved load: not measured: matplotlib is not installed." in text
    assert "| pipeline worker after its drain (1 process, 2,000 users) | 512.2 (512.2) |" in text
    assert "| `--processes 2`: each worker process after the drain" in text
    assert "| worker with no state (ready on empty topics) | 480.0 |" in text
    assert "| restore worker after restoring 25,000 states | 492.5 |" in text
    assert (
        "| per 100,000 users | 50.0 MiB per 100,000 users ((restored − no state) / 25,000 × 100,000) |"
        in text
    )
