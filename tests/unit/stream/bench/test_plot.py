"""The latency curve's PNG."""

from __future__ import annotations

import pytest

from demandstream.stream.bench import latency as bl
from demandstream.stream.bench import plot as bp


def test_the_latency_curve_is_a_png(tmp_path):
    latency = {
        "25%": {"p50": 11.0, "p95": 15.8, "p99": 22.9, "rate_events_per_s": 2_000.0,
                **bl.achieved_load(2_000.0, 16_000, 8.0)},
        "50%": {"p50": 12.6, "p95": 38.2, "p99": 130.0, "rate_events_per_s": 4_000.0,
                **bl.achieved_load(4_000.0, 29_000, 8.0)},
        "75%": None,
    }  # fmt: skip
    points = bp.curve_points(latency)
    assert [(p["level"], p["below_target"]) for p in points] == [("25%", False), ("50%", True)]
    path = bp.latency_curve_png(latency, tmp_path / "sub" / "bench-latency.png", max_rate=8_000.0)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="no latency level"):
        bp.latency_curve_png({"25%": None}, tmp_path / "none.png")
