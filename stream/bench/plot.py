"""The bench's latency-versus-load curve: event → signal latency p50 / p95 / p99 against the load the
generator achieved, one point per load level, as a PNG next to the bench's JSON.

matplotlib is the optional ``plots`` extra (as for ``demandstream evaluate --plots``,
model/evaluation/plots.py); it is imported only here, with the non-interactive Agg backend.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

#: Figure size in inches and resolution, as the evaluation plots (model/evaluation/plots.py).
FIGSIZE = (6.0, 4.5)
DPI = 110
#: The percentiles drawn, with their line styles.
PERCENTILES = (("p50", "-"), ("p95", "--"), ("p99", ":"))


def have_matplotlib() -> bool:
    """Whether the optional ``plots`` extra is installed."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def curve_points(latency: Mapping[str, Mapping[str, Any] | None]) -> list[dict]:
    """The measured levels as points sorted by achieved load: ``{"level", "x", "target", "p50", "p95",
    "p99", "below_target"}``; a level without figures is left out, one without an achieved rate (an
    older result) is placed at its target.

    >>> pts = curve_points({"50%": {"rate_events_per_s": 40.0, "achieved_events_per_s": 38.0, "p50": 2.0,
    ...     "p95": 3.0, "p99": 4.0, "below_target": False}, "25%": None,
    ...     "75%": {"rate_events_per_s": 60.0, "p50": 5.0, "p95": 6.0, "p99": 9.0}})
    >>> [(p["level"], p["x"], p["below_target"]) for p in pts]
    [('50%', 38.0, False), ('75%', 60.0, False)]
    """
    points = []
    for level, x in latency.items():
        if not x:
            continue
        target = x.get("target_events_per_s", x.get("rate_events_per_s"))
        points.append(
            {
                "level": level,
                "x": x.get("achieved_events_per_s", target),
                "target": target,
                **{p: x[p] for p, _ in PERCENTILES},
                "below_target": bool(x.get("below_target", False)),
            }
        )
    return sorted(points, key=lambda p: p["x"])


def latency_curve_png(
    latency: Mapping[str, Mapping[str, Any] | None], path: str | Path, max_rate: float | None = None
) -> Path:
    """Draw latency p50 / p95 / p99 (ms, log scale) versus achieved load (events/s) into ``path``.

    Each point is labelled with its level and target rate; a level whose generator fell short of its
    target is drawn hollow and marked in its label. ``max_rate`` (the pipeline's measured maximum) is
    drawn as a vertical line. Raises ``ValueError`` when no level has figures.
    """
    points = curve_points(latency)
    if not points:
        raise ValueError("no latency level was measured")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    path = Path(path)
    fig, ax = plt.subplots(figsize=FIGSIZE)
    try:
        xs = [p["x"] for p in points]
        for name, style in PERCENTILES:
            line = ax.plot(xs, [p[name] for p in points], style, marker="o", label=name)[0]
            short = [p for p in points if p["below_target"]]
            if short:
                ax.plot(
                    [p["x"] for p in short],
                    [p[name] for p in short],
                    "o",
                    markersize=11,
                    markerfacecolor="none",
                    markeredgecolor=line.get_color(),
                )
        for p in points:
            flag = ", below 95 % of target" if p["below_target"] else ""
            ax.annotate(
                f"{p['level']} (target {p['target']:,.0f}/s{flag})",
                (p["x"], p["p99"]),
                textcoords="offset points",
                xytext=(4, 6),
                fontsize=7,
            )
        if max_rate:
            ax.axvline(max_rate, color="grey", linewidth=1, linestyle="-.", label="pipeline max (median)")
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _pos: f"{v:g}"))
        ax.yaxis.set_minor_formatter(ticker.NullFormatter())
        ax.margins(x=0.1, y=0.3)  # room for the labels above the p99 points
        ax.set_xlim(left=0)
        ax.set_xlabel("achieved load (events/s, measured on the broker)")
        ax.set_ylabel("event → signal latency (ms)")
        ax.set_title("Latency versus load (warm worker, paced load)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(loc="lower right", fontsize=8)
        fig.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=DPI)
    finally:
        plt.close(fig)
    return path
