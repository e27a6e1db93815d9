"""``demandstream bench``: every throughput, latency and size figure of docs/ARCHITECTURE.md §Benchmark in one
run, on one broker.

The order matters on a 2-core machine: the Kafka measurements run first, on the bench's own broker,
with passthrough and pipeline rounds alternating so that both see the same load drift and the ratio is
taken pair by pair; the broker is then stopped and the in-process model measurements run on a quiet
machine. The measurements themselves live in :mod:`demandstream.stream.bench.kafka` and :mod:`demandstream.stream.bench.model`;
this module plans them, gathers the machine description and writes the JSON and docs/BENCHMARKS.md.

Each round measures two plain-client passthrough copies (PERF-ANCHORS' method and the fastest copy with
the pipeline's acks) and the pipeline; the ratio divides the pipeline by the faster copy of its round.
Each round also drains the same topic with ``worker --processes N`` (N = the machine's cores) and with
one exactly-once worker, so the all-cores ratio and exactly-once's cost are taken on the same rounds; the
drained workers' resident memory is read before they are stopped (issue #14).
Every part runs through :class:`Parts`, so one that fails (the broker, a round, the profile) is recorded
in the JSON's ``failed`` list and the Markdown while the rest is still measured and written.

>>> summary([3.0, 1.0, 2.0])
{'median': 2.0, 'min': 1.0, 'max': 3.0, 'runs': [3.0, 1.0, 2.0]}
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import platform
import re
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import TypeVar

import orjson

from demandstream.stream.bench import kafka as bk
from demandstream.stream.bench import model as bm
from demandstream.stream.bench import plot as bp
from demandstream.stream.settings import Settings

logger = logging.getLogger(__name__)
T = TypeVar("T")

#: Fractions of the measured pipeline max rate at which latency is measured (docs/ARCHITECTURE.md §Benchmark).
LOAD_LEVELS = (0.25, 0.50, 0.75)
#: The exactly-once worker's latency as a read_committed consumer sees it is measured at this share of
#: the (at-least-once) pipeline's maximum, the lowest of :data:`LOAD_LEVELS`: a load it keeps up with.
VISIBLE_LOAD = LOAD_LEVELS[0]
VISIBLE_PART = f"exactly_once latency {round(VISIBLE_LOAD * 100)}%"
#: Apache Kafka version deploy/kafka/kafka.sh runs (reported; an external broker may differ).
KAFKA_VERSION = "4.1.1"
#: The part of docs/BENCHMARKS.md this command owns; everything outside the markers is kept.
BEGIN_MARK = "<!-- bench:begin -->"
END_MARK = "<!-- bench:end -->"
#: Load for the profile: enough pre-loaded events to keep the warm worker busy this much longer than
#: the profile lasts, so every sample is taken under full load.
PROFILE_SLACK_S = 10.0
#: Distinct events the latency load cycles through (re-stamped on each send): enough that a user's
#: events are not one template repeated.
LATENCY_TEMPLATES = 20_000
#: A failed part's error in the JSON and the Markdown is one line of at most this many characters (the
#: log has the whole traceback).
ERROR_CHARS = 300
#: Issue #14's target for exactly-once's cost against at-least-once throughput (reported beside it).
EXACTLY_ONCE_COST_TARGET = 0.10
#: Users the memory figure is given per: MiB per this many users' restored states.
MEMORY_PER_USERS = 100_000
#: Exit status of ``demandstream bench`` when a part failed (its JSON and Markdown are still written);
#: not 2, which the CLI keeps for a user's mistake.
EXIT_PARTS_FAILED = 1


@dataclass(frozen=True)
class BenchPlan:
    """Sizes of one bench run."""

    events: int  #: events pre-loaded and drained per passthrough / pipeline round
    rounds: int  #: passthrough + pipeline pairs
    latency_s: float  #: seconds of paced load per latency level
    restore_users: int  #: state records in the changelog the restore worker recovers
    disk_users: int  #: states written to RocksDB for the on-disk size
    train_events: int  #: generated events the training measurement runs on (one epoch)
    step_min_s: float  #: minimum timed seconds per step / recompute figure
    profile_s: float  #: py-spy seconds on the loaded worker (0 = no profile)


FULL = BenchPlan(
    events=100_000,
    rounds=3,
    latency_s=20.0,
    restore_users=1_000_000,
    disk_users=1_000_000,
    train_events=200_000,
    step_min_s=0.3,
    profile_s=15.0,
)
# Quick trains on 10k events, not 50k, and restores 25k states, not 100k: one epoch of 50k takes ~45 s
# and Faust recovers ~3,000 records/s on a shared 2-core box, either of which alone would break the
# two-minute budget of `bench --quick`.
QUICK = BenchPlan(
    events=20_000,
    rounds=1,
    latency_s=8.0,
    restore_users=25_000,
    disk_users=100_000,
    train_events=10_000,
    step_min_s=0.05,
    profile_s=0.0,
)


def summary(values: list[float]) -> dict:
    """Median, min, max and the runs in order."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": list(values)}


def error_line(exc: BaseException) -> str:
    """``"ExceptionType: message"`` on one line, cut to :data:`ERROR_CHARS`.

    >>> error_line(RuntimeError("kafka.sh up failed (1):\\n  port in use"))
    'RuntimeError: kafka.sh up failed (1): port in use'
    """
    text = f"{type(exc).__name__}: {' '.join(str(exc).split())}".rstrip(": ")
    return text if len(text) <= ERROR_CHARS else text[: ERROR_CHARS - 1] + "…"


class Parts:
    """Runs the bench's parts; a part that raises is logged, recorded as failed, and the bench goes on.

    Only :class:`Exception` is caught: Ctrl-C (``KeyboardInterrupt``) and ``SystemExit`` still stop the
    bench. A part that cannot run because one it needs failed is recorded with :meth:`skip`.

    >>> parts = Parts()
    >>> parts.run("sizes", lambda: 2)
    2
    >>> parts.run("broken", lambda: 1 / 0) is None
    True
    >>> parts.failed
    [{'part': 'broken', 'error': 'ZeroDivisionError: division by zero'}]
    """

    def __init__(self) -> None:
        self.failed: list[dict] = []  #: ``{"part", "error"}`` of each part that raised
        self.skipped: list[dict] = []  #: ``{"part", "reason"}`` of each part not run

    def run(self, name: str, fn: Callable[..., T], *args, **kwargs) -> T | None:
        """``fn(*args, **kwargs)``, or ``None`` (recorded under ``name``) when it raises an Exception."""
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            logger.exception("bench part %r failed; going on with the others", name)
            self.failed.append({"part": name, "error": error_line(exc)})
            return None

    def skip(self, name: str, reason: str) -> None:
        """Record that ``name`` was not measured, and why."""
        logger.warning("bench part %r not measured: %s", name, reason)
        self.skipped.append({"part": name, "reason": reason})

    def reason(self, name: str) -> str:
        """``"<name> failed: <error>"``: the reason given for the parts that needed ``name``."""
        for f in self.failed:
            if f["part"] == name:
                return f"{name} failed: {f['error']}"
        return f"{name} failed"


@dataclass
class _Data:
    """What every measurement shares: generated events, the model, one packed state record."""

    events: list
    ckpt: object
    model: Path
    record: bytes


def run_bench(
    settings: Settings,
    out: str | Path | None = "bench.json",
    quick: bool = False,
    markdown: str | Path | None = None,
    *,
    kafka_port: int | None = None,
    plan: BenchPlan | None = None,
) -> dict:
    """Run every measurement, write the JSON to ``out`` and the results block of ``markdown``.

    Each part (broker start, data, each round, each latency level, profile, restore, each model figure)
    runs through :class:`Parts`: one that fails is recorded in the JSON's ``failed`` list and the
    Markdown, the figures it would have given are ``None``, and the rest is still measured and written.
    A failed broker skips the Kafka parts but not the in-process model parts; a failed round is left out
    of the medians; latency and the profile need the last round's warm worker, restore a round's
    start-up time, and each is recorded in ``skipped`` with the reason when that is missing.

    Parameters
    ----------
    settings
        ``settings.broker`` is used only when it differs from the default; otherwise the bench starts its
        own broker on ``kafka_port`` (default ``$DEMANDSTREAM_BENCH_KAFKA_PORT`` or 19592) and stops it at
        the end. ``settings.model`` is the worker's model when set, else an untrained default-config model
        over the generated categories (speed does not depend on training). ``settings.device`` is the
        worker's device.
    quick
        The reduced plan (:data:`QUICK`), under two minutes on 2 cores once the Kafka jars are cached.
    plan
        Explicit sizes, overriding ``quick``.

    Returns
    -------
    dict
        The JSON written: the docs/ARCHITECTURE.md §Benchmark keys (``None`` where not measured), then
        ``failed``, ``skipped``, ``detail``, ``plan``, ``date`` and ``command``.
    """
    plan = plan or (QUICK if quick else FULL)
    t_start = time.monotonic()
    if settings.broker != Settings().broker:
        broker = bk.Broker(bootstrap=settings.bootstrap_servers[0])
    else:
        port = kafka_port or int(os.environ.get("DEMANDSTREAM_BENCH_KAFKA_PORT", bk.DEFAULT_BENCH_KAFKA_PORT))
        broker = bk.Broker(port=port, script=settings.kafka_script_path())
    markdown = Path(markdown) if markdown else None
    parts = Parts()
    result: dict = dict.fromkeys(BENCH_KEYS + SCALING_KEYS)
    detail: dict = {}
    cores = _cores()
    if cores < 2:
        for i in range(plan.rounds):
            parts.skip(
                f"processes round {i + 1}", f"os.cpu_count() is {cores}: no second core to spread over"
            )
    with tempfile.TemporaryDirectory(prefix="ds-bench-") as tmp:
        work = Path(tmp)
        try:
            starting = parts.run("broker start", broker.start) is not None
            # While the broker's JVM starts: data, model and the (untimed-headline) RocksDB size.
            data = parts.run("data", _prepare, plan, settings, work)
            if data is None:
                parts.skip("state on disk", parts.reason("data"))
            else:
                detail["state_on_disk"] = parts.run(
                    "state on disk", bm.rocksdb_bytes_per_user, data.ckpt, plan.disk_users, work
                )
            up = starting and parts.run("broker start", broker.wait) is not None
            kafka_parts = _kafka_part_names(plan, markdown, cores)
            if not up:
                for name in kafka_parts:
                    parts.skip(name, parts.reason("broker start"))
            elif data is None:
                for name in kafka_parts:
                    parts.skip(name, parts.reason("data"))
            else:
                kafka = _kafka_measurements(
                    parts, broker.bootstrap, settings, plan, data, work, markdown, cores
                )
                detail.update(kafka.pop("detail"))
                result.update(kafka)
        finally:
            parts.run("broker stop", broker.stop)
        result["latency_plot"] = _latency_plot(parts, result, out, markdown)
        if data is None:
            for name in ("step", "incremental", "train"):
                parts.skip(name, parts.reason("data"))
        else:
            model = _model_measurements(parts, plan, data)
            detail.update(model.pop("detail"))
            result.update(model)
    if data is not None:
        result["state_bytes_per_user"] = len(data.record)
        if detail.get("state_on_disk"):
            detail["state_on_disk"]["record_bytes"] = len(data.record)
    result["machine"] = parts.run("machine", machine)
    result["failed"] = parts.failed
    result["skipped"] = parts.skipped
    result["detail"] = detail
    result["plan"] = asdict(plan)
    result["quick"] = plan is QUICK or quick
    result["date"] = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    result["command"] = "demandstream bench" + (" --quick" if quick else "")
    result["broker"] = "external " + broker.bootstrap if broker.external else f"own, port {broker.port}"
    result["bench_seconds"] = time.monotonic() - t_start
    if out:
        Path(out).write_bytes(orjson.dumps(result, option=orjson.OPT_INDENT_2))
    if markdown:
        write_markdown(markdown, result)
    if parts.failed:
        logger.warning(
            "bench finished in %.0f s; failed: %s",
            result["bench_seconds"],
            ", ".join(f["part"] for f in parts.failed),
        )
    else:
        logger.info("bench finished in %.0f s", result["bench_seconds"])
    return result


#: The top-level keys docs/ARCHITECTURE.md §Benchmark promises, in its order.
BENCH_KEYS = (
    "passthrough_events_per_s",
    "pipeline_events_per_s",
    "ratio",
    "latency_ms",
    "step_events_per_s",
    "incremental_speedup",
    "state_bytes_per_user",
    "restore_seconds_per_million_users",
    "train_events_per_s",
    "machine",
)


#: Issue #14's figures beyond BENCH_KEYS, after them in the JSON: the pipeline with ``worker
#: --processes N`` (N = cores) and its ratio, exactly-once's throughput and cost, the workers' resident
#: memory and the latency curve's PNG.
SCALING_KEYS = (
    "pipeline_processes_events_per_s",
    "ratio_processes",
    "exactly_once_events_per_s",
    "exactly_once_cost",
    "memory_mib",
    "latency_plot",
)


def _prepare(plan: BenchPlan, settings: Settings, work: Path) -> _Data:
    events = bm.bench_events(max(plan.events, max(bm.HISTORY_LENGTHS), max(bm.STEP_BATCH_SIZES)))
    ckpt = bm.make_checkpoint(events)
    model = Path(settings.model) if settings.model else bm.save_model(work / "model.pt", events)
    return _Data(events, ckpt, model, bm.filled_record(ckpt)[0])


def _latency_key(level: float) -> str:
    return f"{round(level * 100)}%"


def _cores() -> int:
    """The machine's cores, the N of ``worker --processes N``."""
    return os.cpu_count() or 1


def _kafka_part_names(plan: BenchPlan, markdown: Path | None, cores: int = 1) -> list[str]:
    """The Kafka parts this plan runs, in order (what a failed broker leaves unmeasured)."""
    names = ["warm-up"]
    for i in range(plan.rounds):
        names += [f"processes round {i + 1}"] if cores > 1 else []
        names += [f"exactly_once round {i + 1}", f"round {i + 1}"]
    names += [f"latency {_latency_key(level)}" for level in LOAD_LEVELS]
    if plan.profile_s > 0 and markdown is not None:
        names.append("profile")
    return [*names, VISIBLE_PART, "memory no state", "restore"]


def latency_plot_path(out: str | Path | None, markdown: Path | None) -> Path | None:
    """Where the latency curve goes: next to the JSON (``bench.json`` → ``bench-latency.png``), else
    next to the Markdown, else nowhere.

    >>> latency_plot_path("/tmp/b/bench.json", None), latency_plot_path(None, Path("docs/BENCHMARKS.md"))
    (PosixPath('/tmp/b/bench-latency.png'), PosixPath('docs/bench-latency.png'))
    """
    if out:
        return Path(out).with_name(Path(out).stem + "-latency.png")
    return markdown.parent / "bench-latency.png" if markdown else None


def _latency_plot(parts: Parts, result: dict, out, markdown: Path | None) -> str | None:
    path = latency_plot_path(out, markdown)
    latency = result.get("latency_ms") or {}
    if path is None:
        parts.skip("latency plot", "neither --out nor --markdown: nowhere to write it")
    elif not any(latency.values()):
        parts.skip("latency plot", "no latency level was measured")
    elif not bp.have_matplotlib():
        parts.skip("latency plot", "matplotlib is not installed (pip install 'demandstream[plots]')")
    else:
        pipeline = result.get("pipeline_events_per_s") or {}
        done = parts.run("latency plot", bp.latency_curve_png, latency, path, pipeline.get("median"))
        return str(done) if done else None
    return None


def throughput(rounds: list[dict]) -> dict:
    """Passthrough, pipeline and ratio over the rounds that worked, the ratio taken pair by pair.

    Each round's passthrough is the faster of its :data:`~demandstream.stream.bench.kafka.PASSTHROUGH_METHODS`,
    so the ratio (pipeline / passthrough of the same round) is never flattered by the slower yardstick.
    Every figure is ``None`` when no round worked.

    >>> t = throughput([
    ...     {"perf_anchors": 60.0, "fastest_copy": 80.0, "pipeline": 20.0},
    ...     {"perf_anchors": 50.0, "fastest_copy": 40.0, "pipeline": 10.0},
    ... ])
    >>> t["passthrough_events_per_s"]["runs"], t["ratio"]["runs"], t["passthrough"]["faster"]
    ([80.0, 50.0], [0.25, 0.2], ['fastest_copy', 'perf_anchors'])
    """
    if not rounds:
        return {
            "passthrough_events_per_s": None,
            "pipeline_events_per_s": None,
            "ratio": None,
            "passthrough": None,
        }
    faster = [max(bk.PASSTHROUGH_METHODS, key=lambda m, r=r: r[m]) for r in rounds]
    anchors = [r[m] for r, m in zip(rounds, faster, strict=True)]
    pipeline = [r["pipeline"] for r in rounds]
    return {
        "passthrough_events_per_s": summary(anchors),
        "pipeline_events_per_s": summary(pipeline),
        "ratio": summary([p / a for p, a in zip(pipeline, anchors, strict=True)]),
        "passthrough": {
            "faster": faster,
            "methods": {
                m: {**spec, "events_per_s": summary([r[m] for r in rounds])}
                for m, spec in bk.PASSTHROUGH_METHODS.items()
            },
        },
    }


def scaling(rounds: list[dict], procs: list[dict], eo: list[dict]) -> dict:
    """All-cores and exactly-once figures beside the 1-process pipeline of the same rounds.

    ``rounds`` are the 1-process rounds (as :func:`throughput`), ``procs`` the ``worker --processes N``
    drains and ``eo`` the exactly-once drains, each ``{"round", "events_per_s", …}``; a drain is paired
    with the passthrough and the 1-process pipeline of its own round, and a figure whose inputs are
    missing is ``None``. exactly-once's cost is ``1 − median(eo) / median(at_least_once)``; beside it,
    ``exactly_once_cost_pairs`` takes it round by round, each exactly-once drain against the
    at-least-once drain of its own round (as the ratio is taken), which this VM's drift between rounds
    does not move as much.

    >>> s = scaling([{"round": 1, "perf_anchors": 50.0, "fastest_copy": 100.0, "pipeline": 10.0}],
    ...             [{"round": 1, "events_per_s": 18.0}], [{"round": 1, "events_per_s": 9.5}])
    >>> s["ratio_processes"]["median"], s["processes_speedup"]["median"], round(s["exactly_once_cost"], 3)
    (0.18, 1.8, 0.05)
    >>> round(s["exactly_once_cost_pairs"]["median"], 3)
    0.05
    """
    anchors = {r["round"]: max(r[m] for m in bk.PASSTHROUGH_METHODS) for r in rounds}
    pipeline = {r["round"]: r["pipeline"] for r in rounds}
    out: dict = dict.fromkeys(
        (
            "pipeline_processes_events_per_s",
            "ratio_processes",
            "processes_speedup",
            "exactly_once_events_per_s",
            "exactly_once_cost",
            "exactly_once_cost_pairs",
            "exactly_once_committed_events_per_s",
            "exactly_once_committed_cost",
        )
    )
    if procs:
        out["pipeline_processes_events_per_s"] = summary([p["events_per_s"] for p in procs])
        paired = [p for p in procs if p["round"] in anchors]
        if paired:
            out["ratio_processes"] = summary([p["events_per_s"] / anchors[p["round"]] for p in paired])
            out["processes_speedup"] = summary([p["events_per_s"] / pipeline[p["round"]] for p in paired])
    if eo:
        out["exactly_once_events_per_s"] = summary([e["events_per_s"] for e in eo])
        committed = [e["committed_events_per_s"] for e in eo if e.get("committed_events_per_s")]
        out["exactly_once_committed_events_per_s"] = summary(committed) if committed else None
        if pipeline:
            alo = statistics.median(pipeline.values())
            out["exactly_once_cost"] = exactly_once_cost(out["exactly_once_events_per_s"]["median"], alo)
            pairs = [
                exactly_once_cost(e["events_per_s"], pipeline[e["round"]])
                for e in eo
                if e["round"] in pipeline
            ]
            out["exactly_once_cost_pairs"] = summary(pairs) if pairs else None
            if committed:
                out["exactly_once_committed_cost"] = exactly_once_cost(statistics.median(committed), alo)
    return out


def exactly_once_cost(eo_events_per_s: float, alo_events_per_s: float) -> float:
    """Throughput exactly-once gives up against at-least-once: ``1 − eo / alo`` (negative if faster).

    >>> exactly_once_cost(9_000.0, 10_000.0)
    0.09999999999999998
    """
    return 1.0 - eo_events_per_s / alo_events_per_s


def per_users_mib(restored_mib: float, empty_mib: float, users: int, per: int = MEMORY_PER_USERS) -> float:
    """Resident memory per ``per`` users: ``(RSS after restoring users − RSS with no state) / users × per``.

    >>> per_users_mib(420.0, 400.0, 25_000)
    80.0
    """
    return (restored_mib - empty_mib) / users * per


def memory(
    rounds: list[dict], procs: list[dict], eo: list[dict], no_state: dict | None, restore: dict | None
) -> dict:
    """The workers' resident memory (MiB): each drain's worker after its drain (``worker --processes N``:
    the mean of its children, the supervisor not counted), the state-less and the restored worker, and
    what ``MEMORY_PER_USERS`` restored states add. ``None`` where a figure's part did not run.

    The ``*_anon_per_process`` figures are the anonymous part of the same resident sets (RssAnon):
    what each further process on the machine adds, the libraries' file pages being shared.

    >>> m = memory([{"rss_mib": [300.0], "anon_mib": [120.0]}], [{"rss_mib": [250.0, 270.0]}], [],
    ...            {"rss_mib": 200.0}, {"rss_mib": 220.0, "records": 25_000})
    >>> m["pipeline_per_process"]["median"], m["processes_per_process"]["median"], m["per_100k_users"]
    (300.0, 260.0, 80.0)
    >>> m["pipeline_anon_per_process"]["median"], m["processes_anon_per_process"]
    (120.0, None)
    """

    def per_process(drains: list[dict], key: str = "rss_mib") -> dict | None:
        values = [statistics.fmean(d[key]) for d in drains if d.get(key)]
        return summary(values) if values else None

    empty = no_state["rss_mib"] if no_state else None
    restored = restore.get("rss_mib") if restore else None
    users = restore["records"] if restore else None
    return {
        "pipeline_per_process": per_process(rounds),
        "processes_per_process": per_process(procs),
        "exactly_once_per_process": per_process(eo),
        "pipeline_anon_per_process": per_process(rounds, "anon_mib"),
        "processes_anon_per_process": per_process(procs, "anon_mib"),
        "no_state": empty,
        "restored": restored,
        "restored_users": users,
        "per_100k_users": (
            per_users_mib(restored, empty, users) if None not in (restored, empty) and users else None
        ),
    }


def _drain(
    i: int,
    bootstrap: str,
    src: str,
    run: str,
    n: int,
    data: _Data,
    work: Path,
    serve: Mapping[str, str],
    *,
    processes: int = 1,
    guarantee: str = "at_least_once",
) -> dict:
    """One extra drain of round ``i`` (``worker --processes N`` or exactly-once), stopped once measured.

    ``worker --processes N`` gets an empty input topic of its own, fed from ``src`` once every process
    is ready (:func:`~demandstream.stream.bench.kafka.drain`); the exactly-once worker drains ``src``
    pre-loaded, as the round's.
    """
    kind = "eo" if guarantee == "exactly_once" else f"procs{processes}"
    tag = f"{run}-{kind}-{i}"
    fed = processes > 1
    worker = bk.BenchWorker(
        bootstrap,
        data.model,
        tag,
        work,
        f"bench-feed-{tag}" if fed else src,
        **serve,
        processes=processes,
        guarantee=guarantee,
    )
    try:
        d = bk.drain(worker, n, feed_from=src) if fed else bk.drain(worker, n)
    finally:
        worker.stop()
    logger.info(
        "round %d: %s drain %.0f ev/s, %s MiB", i + 1, kind, d.events_per_s, [f"{x:.0f}" for x in d.rss_mib]
    )
    return {
        "round": i + 1,
        "processes": processes,
        "guarantee": guarantee,
        "events_per_s": d.events_per_s,
        "startup_s": d.startup_s,
        "drain_s": d.drain_s,
        "rss_mib": d.rss_mib,
        "anon_mib": d.anon_mib,
        "supervisor_rss_mib": d.supervisor_rss_mib,
        "signals_at_ready": d.signals_at_ready,
        "feed_s": d.feed_s,
        "events_per_process": d.events_per_process,
        "committed_events_per_s": n / d.committed_s if d.committed_s else None,
    }


def _round(
    i: int, bootstrap: str, src: str, run: str, n: int, data: _Data, work: Path, serve: Mapping[str, str]
) -> tuple[dict, bk.BenchWorker]:
    """One round: both passthrough copies, then a fresh worker's drain; returns its figures and the worker.

    The two copies swap order from one round to the next, so neither always runs on the colder broker.
    """
    methods = list(bk.PASSTHROUGH_METHODS)
    if i % 2:
        methods.reverse()
    figures: dict = {"round": i + 1}
    for m in methods:
        figures[m] = bk.passthrough_events_per_s(m, bootstrap, src, f"bench-sink-{run}-{i}-{m}", n)
    worker = bk.BenchWorker(bootstrap, data.model, f"{run}-{i}", work, src, **serve)
    try:
        d = bk.drain(worker, n)
    except BaseException:
        worker.stop()
        raise
    figures.update(
        pipeline=d.events_per_s,
        startup_s=d.startup_s,
        drain_s=d.drain_s,
        rss_mib=d.rss_mib,
        anon_mib=d.anon_mib,
        signals_at_ready=d.signals_at_ready,
    )
    logger.info(
        "round %d: passthrough %s, pipeline %.0f ev/s",
        i + 1,
        ", ".join(f"{m} {figures[m]:.0f} ev/s" for m in bk.PASSTHROUGH_METHODS),
        d.events_per_s,
    )
    return figures, worker


def _load_input(bootstrap: str, src: str, events) -> bool:
    bk.create_topics(bootstrap, [src], configs=bk.INPUT_TOPIC_CONFIGS)
    bk.produce(bootstrap, src, bk.encode_events(events))
    return True


def _kafka_measurements(
    parts: Parts,
    bootstrap: str,
    settings: Settings,
    plan: BenchPlan,
    data: _Data,
    work: Path,
    markdown: Path | None,
    cores: int = 1,
) -> dict:
    run = uuid.uuid4().hex[:6]
    src = f"bench-input-{run}"
    events = data.events[: plan.events]
    n = len(events)
    device = "cpu" if settings.device == "auto" and not _cuda() else settings.device
    # how every bench worker runs the model: BenchWorker's keyword arguments, the settings' values
    serve = {"device": device, "inference": settings.inference}
    levels = [_latency_key(level) for level in LOAD_LEVELS]
    profiled = plan.profile_s > 0 and markdown is not None
    latency: dict = dict.fromkeys(levels)
    prof = restore = no_state = visible = None
    rounds: list[dict] = []
    procs: list[dict] = []
    eo: list[dict] = []
    worker = None
    loaded = parts.run("input topic", _load_input, bootstrap, src, events) is not None
    if not loaded:
        for name in _kafka_part_names(plan, markdown, cores):
            parts.skip(name, parts.reason("input topic"))
    warm_up = parts.run("warm-up", _warm_up, bootstrap, src, run, n, data, work, serve) if loaded else None
    try:
        for i in range(plan.rounds if loaded else 0):
            # The previous round's worker goes first: the copies get the machine to themselves.
            if worker is not None:
                worker.stop()
                worker = None
            # The extra drains go before the round, each stopped once measured, so the round's own
            # worker (the last round's serves latency and the profile) is the one left running.
            args = (i, bootstrap, src, run, n, data, work, serve)
            if cores > 1:
                drained = parts.run(f"processes round {i + 1}", _drain, *args, processes=cores)
                procs += [drained] if drained else []
            drained = parts.run(f"exactly_once round {i + 1}", _drain, *args, guarantee="exactly_once")
            eo += [drained] if drained else []
            done = parts.run(f"round {i + 1}", _round, *args)
            if done is not None:
                figures, worker = done
                rounds.append(figures)
        t = throughput(rounds)
        # the paced generator's events, for the latency levels and the exactly-once one
        templates = [e.to_dict() for e in events[:LATENCY_TEMPLATES]] if rounds else []
        # Latency and the profile run on the last round's worker: warm, every user's state in its store.
        if loaded and worker is None:
            why = "needs the last round's warm worker: " + parts.reason(f"round {plan.rounds}")
            for key in levels:
                parts.skip(f"latency {key}", why)
            if profiled:
                parts.skip("profile", why)
        elif worker is not None:
            max_rate = t["pipeline_events_per_s"]["median"]
            for level, key in zip(LOAD_LEVELS, levels, strict=True):
                latency[key] = parts.run(
                    f"latency {key}",
                    bk.latency_ms,
                    worker,
                    templates,
                    level * max_rate,
                    plan.latency_s,
                    f"lat{run}{key[:-1]}",
                )
                logger.info("latency at %s load: %s", key, latency[key])
            if profiled:
                out = markdown.parent / "profile-pipeline.txt"
                prof = parts.run("profile", _profile, worker, bootstrap, src, events, max_rate, plan, out)
            worker.stop()
            worker = None
        if rounds:
            rate = VISIBLE_LOAD * t["pipeline_events_per_s"]["median"]
            visible = parts.run(
                VISIBLE_PART,
                _visible_latency,
                bootstrap,
                data,
                run,
                work,
                serve,
                templates,
                rate,
                plan.latency_s,
            )
        elif loaded:
            parts.skip(VISIBLE_PART, "needs the pipeline's maximum rate, and no round worked")
        if loaded:
            no_state = parts.run("memory no state", _no_state, bootstrap, data, run, work, serve)
        if rounds:
            baseline = statistics.median(r["startup_s"] for r in rounds)
            restore = parts.run("restore", _restore, bootstrap, data, plan, run, work, serve, baseline)
        elif loaded:
            parts.skip("restore", "needs a worker's start-up time without changelog, and no round worked")
    finally:
        if worker is not None:
            worker.stop()
    sc = scaling(rounds, procs, eo)
    return {
        "passthrough_events_per_s": t["passthrough_events_per_s"],
        "pipeline_events_per_s": t["pipeline_events_per_s"],
        "ratio": t["ratio"],
        "latency_ms": latency,
        "restore_seconds_per_million_users": restore["seconds_per_million_users"] if restore else None,
        "pipeline_processes_events_per_s": sc["pipeline_processes_events_per_s"],
        "ratio_processes": sc["ratio_processes"],
        "exactly_once_events_per_s": sc["exactly_once_events_per_s"],
        "exactly_once_cost": sc["exactly_once_cost"],
        "memory_mib": memory(rounds, procs, eo, no_state, restore),
        "detail": {
            "events_per_round": n,
            "partitions": bk.PARTITIONS,
            "worker_device": device,
            "worker_inference": settings.inference,
            "passthrough": t["passthrough"],
            "rounds": rounds,
            "pipeline_startup_seconds": [r["startup_s"] for r in rounds],
            "pipeline_drain_seconds": [r["drain_s"] for r in rounds],
            "processes": cores,
            "processes_speedup": sc["processes_speedup"],
            "exactly_once_committed_events_per_s": sc["exactly_once_committed_events_per_s"],
            "exactly_once_committed_cost": sc["exactly_once_committed_cost"],
            "exactly_once_cost_pairs": sc["exactly_once_cost_pairs"],
            "exactly_once_latency": visible,
            "processes_rounds": procs,
            "exactly_once_rounds": eo,
            "memory_no_state": no_state,
            "restore": restore,
            "profile": prof,
            "warm_up": warm_up,
        },
    }


def _warm_up(
    bootstrap: str, src: str, run: str, n: int, data: _Data, work: Path, serve: Mapping[str, str]
) -> dict:
    """One exactly-once drain of the input before the first round, not counted anywhere.

    A freshly started broker spends several times more CPU per drain than a warm one (the JVM compiles
    its hot paths; measured on 2026-12-02: 9.3 then 8.7, 8.3, 4.7, 4.1, 3.4, 3.5 s of broker CPU for
    seven successive 100k-event drains), and on two cores that CPU comes out of the worker's. Whatever
    ran first was measured slower: the all-cores and exactly-once drains, which open every round. An
    exactly-once drain takes the broker through everything the measured parts use (acknowledged
    produce, fetches, group coordination) and through its transaction coordinator too.
    """
    worker = bk.BenchWorker(
        bootstrap,
        data.model,
        f"{run}-warmup-0",
        work,
        src,
        **serve,
        guarantee="exactly_once",
    )
    try:
        d = bk.drain(worker, n)
    finally:
        worker.stop()
    logger.info("warm-up: an exactly-once drain at %.0f ev/s (not counted)", d.events_per_s)
    return {"guarantee": "exactly_once", "events_per_s": d.events_per_s}


def _visible_latency(
    bootstrap: str,
    data: _Data,
    run: str,
    work: Path,
    serve: Mapping[str, str],
    templates: list[dict],
    rate: float,
    seconds: float,
) -> dict:
    """Event -> signal latency of an exactly-once worker as a read_committed consumer sees it
    (:func:`~demandstream.stream.bench.kafka.visible_latency_ms`), at ``rate`` for ``seconds``.

    A fresh worker on an input topic of its own, empty until the level starts: the at-least-once
    levels' ``emitted_at`` cannot show the wait for a transaction's commit, which is what a downstream
    consumer of exactly-once signals waits for (the commit interval, 0.1 s by default under
    exactly-once, docs/OPERATIONS.md).
    """
    tag = f"{run}-eo-latency"
    topic = f"bench-input-{tag}"
    bk.create_topics(bootstrap, [topic], configs=bk.INPUT_TOPIC_CONFIGS)
    worker = bk.BenchWorker(bootstrap, data.model, tag, work, topic, **serve, guarantee="exactly_once")
    try:
        worker.start()
        worker.wait_ready()
        out = bk.visible_latency_ms(worker, templates, rate, seconds, f"eolat{run}")
    finally:
        worker.stop()
    logger.info("exactly-once latency, read_committed, at %.0f ev/s: %s", rate, out)
    return {**out, "load": VISIBLE_LOAD}


def _no_state(bootstrap: str, data: _Data, run: str, work: Path, serve: Mapping[str, str]) -> dict:
    """A fresh worker on empty topics: its resident memory once ready, with no user state."""
    w = bk.BenchWorker(
        bootstrap,
        data.model,
        f"{run}-empty",
        work,
        f"bench-empty-input-{run}",
        **serve,
    )
    bk.create_topics(bootstrap, [w.input_topic, w.signals_topic, f"bench-dlq-{w.tag}"])
    try:
        return bk.ready_rss_mib(w)
    finally:
        w.stop()


def _restore(
    bootstrap: str,
    data: _Data,
    plan: BenchPlan,
    run: str,
    work: Path,
    serve: Mapping[str, str],
    baseline: float,
) -> dict:
    rw = bk.BenchWorker(
        bootstrap,
        data.model,
        f"{run}-restore",
        work,
        f"bench-restore-input-{run}",
        **serve,
    )
    try:
        return bk.restore_seconds(rw, data.record, plan.restore_users, baseline)
    finally:
        rw.stop()


def _profile(
    worker: bk.BenchWorker, bootstrap: str, src: str, events, rate: float, plan: BenchPlan, out: Path
) -> dict:
    """Load the warm worker at full speed and record py-spy samples; write the top-functions summary."""
    n = int(rate * (plan.profile_s + PROFILE_SLACK_S))
    records = bk.encode_events(events[i % len(events)] for i in range(n))
    bk.produce(bootstrap, src, records)
    raw = out.with_suffix(".collapsed.tmp")
    try:
        bk.profile(worker.proc.pid, plan.profile_s, raw)
        text, rows = bk.summarize_profile(raw.read_text())
    finally:
        raw.unlink(missing_ok=True)
    header = (
        f"py-spy record --rate 100 --nonblocking --threads, {plan.profile_s:.0f} s of a warm "
        f"`demandstream worker` draining {n} pre-loaded events as fast as it can\n"
        f"({dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC, written by `demandstream bench`; "
        f"frames are 'function (file)', lines merged)\n\n"
    )
    out.write_text(header + text)
    return {
        "file": str(out),
        "seconds": plan.profile_s,
        "events": n,
        "top": [{"frame": f, "self_pct": s, "total_pct": t} for f, s, t in rows[:15]],
    }


def _model_measurements(parts: Parts, plan: BenchPlan, data: _Data) -> dict:
    import torch

    from demandstream.stream.worker.run import worker_gc

    events, ckpt = data.events, data.ckpt
    threads = torch.get_num_threads()
    # One intra-op thread and the worker's collector settings (stream/worker/run.py), so the step
    # figures are what the worker gets: under the default thresholds, batches of 1,024 and more
    # allocate enough to set off collections inside the timed call (measured 2026-12-03: 26k events/s
    # at 1,024 with them, 38k under the worker's settings).
    torch.set_num_threads(1)
    large = None
    try:
        with worker_gc():
            step = {
                "cpu": parts.run("step cpu", bm.step_events_per_s, ckpt, events, "cpu", min_s=plan.step_min_s)
            }
            # the heads compiled (DEMANDSTREAM_INFERENCE=compiled), beside the default eager column
            step["cpu compiled"] = parts.run(
                "step cpu compiled",
                bm.step_events_per_s,
                ckpt,
                events,
                "cpu",
                min_s=plan.step_min_s,
                inference="compiled",
            )
            # the same eager step at a catalog of thousands of categories (its [rows, C] passes)
            large = parts.run("large catalog", bm.large_catalog)
            if large is not None:
                step["cpu large catalog"] = parts.run(
                    "step cpu large catalog",
                    bm.step_events_per_s,
                    large[0],
                    large[1],
                    "cpu",
                    min_s=plan.step_min_s,
                )
            if _cuda():
                step["cuda"] = parts.run(
                    "step cuda", bm.step_events_per_s, ckpt, events, "cuda", min_s=plan.step_min_s
                )
            incremental = parts.run(
                "incremental", bm.incremental_speedup, ckpt, events, min_s=plan.step_min_s
            )
    finally:
        torch.set_num_threads(threads)
    train = parts.run("train", _train, plan, events)
    return {
        "step_events_per_s": step,
        "incremental_speedup": incremental,
        "train_events_per_s": train["events_per_s"] if train else None,
        "detail": {
            "step_torch_threads": 1,
            "step_gc": "worker",
            "step_large_catalog_categories": None if large is None else len(large[0].vocab),
            "train": train,
        },
    }


def _train(plan: BenchPlan, events) -> dict:
    train_events = events if len(events) >= plan.train_events else bm.bench_events(plan.train_events)
    return bm.train_events_per_s(train_events[: plan.train_events])


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def machine() -> dict:
    """CPU model, cores, memory, GPU and the versions that matter for these figures."""
    import torch

    cpu = platform.processor() or platform.machine()
    mem_gib = None
    try:
        text = Path("/proc/cpuinfo").read_text()
        m = re.search(r"^model name\s*:\s*(.+)$", text, re.M)
        cpu = m.group(1).strip() if m else cpu
        m = re.search(r"^MemTotal:\s*(\d+) kB", Path("/proc/meminfo").read_text(), re.M)
        mem_gib = round(int(m.group(1)) / 2**20, 1) if m else None
    except OSError:
        pass

    def version(dist: str) -> str:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return "not installed"

    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": mem_gib,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "os": platform.platform(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "faust": version("faust-streaming"),
        "aiokafka": version("aiokafka"),
        "kafka_python": version("kafka-python"),
        "rocksdict": version("rocksdict"),
        "kafka_broker": KAFKA_VERSION,
    }


# -- Markdown -------------------------------------------------------------------------------------------


_PREAMBLE = """# Benchmarks

`demandstream bench` measures the product on one machine with its own Kafka broker and rewrites the block
between the bench markers below; everything outside the markers is kept. Method: docs in
`stream/bench/runner.py`; anchors for this kind of machine: PERF-ANCHORS (plain aiokafka vs plain Faust).

## What each optimization bought

(The lead fills this: one row per change, with the pipeline events/s and ratio before and after.)

| change | pipeline events/s before → after | ratio before → after |
|---|---|---|

"""


def write_markdown(path: Path, r: dict) -> None:
    """Replace the bench block of ``path`` (creating the file with a preamble if needed)."""
    block = f"{BEGIN_MARK}\n{render_markdown(r)}{END_MARK}\n"
    text = path.read_text() if path.exists() else _PREAMBLE
    if BEGIN_MARK in text and END_MARK in text:
        head, rest = text.split(BEGIN_MARK, 1)
        tail = rest.split(END_MARK, 1)[1].lstrip("\n")
        text = head + block + tail
    else:
        text = text.rstrip("\n") + "\n\n" + block
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def _n(x: float) -> str:
    return f"{x:,.0f}" if abs(x) >= 100 else f"{x:,.2f}" if abs(x) >= 1 else f"{x:.3g}"


def _mmm(s: dict) -> str:
    return f"{_n(s['median'])} ({' · '.join(_n(v) for v in s['runs'])})"


def _cell(text: str) -> str:
    """Text safe inside a Markdown table cell."""
    return text.replace("|", "\\|")


def _why(r: dict, *names: str) -> str:
    """What stands in for a missing figure: ``failed: <error>`` or ``not measured: <reason>`` of the first
    of ``names`` the run recorded (a name also covers its numbered parts: ``round`` covers ``round 2``).

    >>> _why({"failed": [{"part": "round 2", "error": "TimeoutError: 10 of 20"}], "skipped": []}, "round")
    'failed: TimeoutError: 10 of 20'
    >>> _why({"failed": [], "skipped": [{"part": "restore", "reason": "no round worked"}]}, "restore")
    'not measured: no round worked'
    """

    for name in names:
        for f in r.get("failed") or []:
            if f["part"] == name or f["part"].startswith(name + " "):
                return f"failed: {f['error']}"
        for sk in r.get("skipped") or []:
            if sk["part"] == name or sk["part"].startswith(name + " "):
                return f"not measured: {sk['reason']}"
    return "not measured"


def _settings_text(settings: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in settings.items() if not isinstance(v, str) or k == "acks")


def render_markdown(r: dict) -> str:
    """The results block: machine, date and command, failed parts, then one table per measured section.

    A figure that is missing (its part failed or could not run) reads ``failed: <error>`` or
    ``not measured: <reason>``; the block is always written.
    """
    m = r.get("machine")
    d = r.get("detail") or {}
    lines = [
        "## Latest results" + (" (quick run: reduced sizes, indicative only)" if r.get("quick") else ""),
        "",
        f"- date: {r['date']}; command: `{r['command']}`; took {r['bench_seconds']:.0f} s; broker: {r['broker']}",
    ]
    if m:
        lines += [
            f"- machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB"
            + (f", GPU {m['gpu']}" if m.get("gpu") else ", no GPU"),
            f"- software: Python {m['python']}, torch {m['torch']}, faust-streaming {m['faust']}, aiokafka "
            f"{m['aiokafka']}, kafka-python {m['kafka_python']}, Apache Kafka {m['kafka_broker']}",
        ]
    else:
        lines.append(f"- machine: {_why(r, 'machine')}")
    if "events_per_round" in d:
        lines.append(
            f"- data: {d['events_per_round']:,} generated events (demandstream.model.data.synth, "
            f"{bm.BENCH_USERS:,} users), {d.get('partitions', bk.DEFAULT_PARTITIONS)} partitions; worker device {d['worker_device']}, "
            f"inference {d.get('worker_inference', 'eager')}"
        )
    lines += _failed_lines(r)
    lines += _throughput_lines(r, d)
    lines += _latency_lines(r)
    lines += _memory_lines(r, d)
    lines += _step_lines(r)
    lines += _state_lines(r, d)
    lines += _profile_lines(d)
    return "\n".join(lines)


def _failed_lines(r: dict) -> list[str]:
    failed, skipped = r.get("failed") or [], r.get("skipped") or []
    if not failed and not skipped:
        return []
    lines = ["", "### Failed parts", ""]
    lines += [f"- `{f['part']}` failed: {f['error']}" for f in failed]
    lines += [f"- `{sk['part']}` not measured: {sk['reason']}" for sk in skipped]
    return lines


def _throughput_lines(r: dict, d: dict) -> list[str]:
    lines = ["", "### Throughput (median, runs in brackets)", "", "| measure | events/s |", "|---|---|"]
    methods = (d.get("passthrough") or {}).get("methods") or {}
    for name, spec in bk.PASSTHROUGH_METHODS.items():
        x = methods.get(name, spec)
        value = _mmm(x["events_per_s"]) if x.get("events_per_s") else _why(r, "round")
        lines.append(
            f"| passthrough `{name}`: {x['description']} ({_settings_text(x['settings'])}) | {_cell(value)} |"
        )
    p, pl = r.get("passthrough_events_per_s"), r.get("pipeline_events_per_s")
    faster = (d.get("passthrough") or {}).get("faster")
    procs, eo = r.get("pipeline_processes_events_per_s"), r.get("exactly_once_events_per_s")
    n = d.get("processes") or (r.get("machine") or {}).get("cores") or "N"
    lines += [
        "| passthrough for the ratio: the faster of the two in each round"
        + (f" ({', '.join(faster)})" if faster else "")
        + f" | {_cell(_mmm(p) if p else _why(r, 'round'))} |",
        f"| pipeline: `demandstream worker` drain, /readyz → last signal | {_cell(_mmm(pl) if pl else _why(r, 'round'))} |",
        f"| pipeline, all cores: `demandstream worker --processes {n}` drain, /readyz of every process → last "
        f"signal | {_cell(_mmm(procs) if procs else _why(r, 'processes'))} |",
        "| pipeline, exactly-once: `demandstream worker --guarantee exactly_once` drain (1 process), /readyz → "
        f"last signal | {_cell(_mmm(eo) if eo else _why(r, 'exactly_once'))} |",
        "",
    ]
    lines += [ratio_line(r, n), "", exactly_once_line(r)]
    return lines


def ratio_line(r: dict, n: object = "N") -> str:
    """The headline ratio (pipeline with all cores / the faster passthrough of its round) and the
    1-process ratio beside it; a missing one reads ``failed: …`` or ``not measured: …``.

    >>> ratio_line({"ratio_processes": {"median": 0.15, "min": 0.14, "max": 0.16},
    ...             "ratio": {"median": 0.08, "min": 0.07, "max": 0.09}}, 2)
    'Ratio pipeline / the faster passthrough of the same round, pair by pair: **0.150** with all 2 cores (`--processes 2`; min 0.140, max 0.160); 0.080 with 1 process (min 0.070, max 0.090).'
    """
    rp, r1 = r.get("ratio_processes"), r.get("ratio")
    all_cores = (
        f"**{rp['median']:.3f}** with all {n} cores (`--processes {n}`; min {rp['min']:.3f}, max {rp['max']:.3f})"
        if rp
        else f"all {n} cores: {_why(r, 'processes', 'round')}"
    )
    one = (
        f"{r1['median']:.3f} with 1 process (min {r1['min']:.3f}, max {r1['max']:.3f})"
        if r1
        else f"1 process: {_why(r, 'round')}"
    )
    if not rp and not r1:
        return f"Ratio pipeline / passthrough: {_why(r, 'round')}."
    return f"Ratio pipeline / the faster passthrough of the same round, pair by pair: {all_cores}; {one}."


def exactly_once_line(r: dict) -> str:
    """exactly-once's cost against at-least-once, with the issue's target beside it.

    >>> exactly_once_line({"exactly_once_cost": 0.123, "exactly_once_events_per_s": {"median": 7017.0},
    ...                    "pipeline_events_per_s": {"median": 8000.0}})
    'exactly-once costs 12.3 % of at-least-once throughput (1 − 7,017 / 8,000 events/s, medians, 1 process; target ≤ 10 %: missed).'
    """
    cost = r.get("exactly_once_cost")
    if cost is None:
        return f"exactly-once's cost against at-least-once: {_why(r, 'exactly_once', 'round')}."
    eo, alo = r["exactly_once_events_per_s"]["median"], r["pipeline_events_per_s"]["median"]
    verdict = "met" if cost <= EXACTLY_ONCE_COST_TARGET else "missed"
    d = r.get("detail") or {}
    committed, committed_cost = (
        d.get("exactly_once_committed_events_per_s"),
        d.get("exactly_once_committed_cost"),
    )
    visible = (
        f" Counted to the last signal visible to a read_committed consumer (the last transaction's commit "
        f"included): {_n(committed['median'])} events/s, a cost of {100 * committed_cost:.1f} %."
        if committed and committed_cost is not None
        else ""
    )
    return (
        f"exactly-once costs {100 * cost:.1f} % of at-least-once throughput (1 − {_n(eo)} / {_n(alo)} "
        f"events/s, medians, 1 process; target ≤ {100 * EXACTLY_ONCE_COST_TARGET:.0f} %: {verdict})."
        + _pairs_sentence(d.get("exactly_once_cost_pairs"), verdict)
        + visible
    )


def _pairs_sentence(pairs: dict | None, verdict: str) -> str:
    """exactly-once's cost round by round (:func:`scaling`), and whether it agrees with the medians' verdict.

    >>> _pairs_sentence({"median": 0.091, "runs": [0.168, 0.091, -0.025]}, "missed")
    ' Round by round (each exactly-once drain against the at-least-once drain of its round): 16.8 · 9.1 · -2.5 %, median 9.1 %, target met: the two readings disagree, so this run cannot tell whether the target is met.'
    """
    if not pairs:
        return ""
    by_pairs = "met" if pairs["median"] <= EXACTLY_ONCE_COST_TARGET else "missed"
    runs = " · ".join(f"{100 * c:.1f}" for c in pairs["runs"])
    tail = (
        ", as by the medians"
        if by_pairs == verdict
        else ": the two readings disagree, so this run cannot tell whether the target is met"
    )
    return (
        " Round by round (each exactly-once drain against the at-least-once drain of its round): "
        f"{runs} %, median {100 * pairs['median']:.1f} %, target {by_pairs}{tail}."
    )


def achieved_cell(x: dict) -> str:
    """The generator's achieved rate and its share of the target, flagged below 95 %.

    >>> achieved_cell({"achieved_events_per_s": 1890.0, "achieved_share": 0.9})
    '1,890 (90 % of target; below 95 %)'
    >>> achieved_cell({"rate_events_per_s": 2000.0})
    'not measured'
    """
    if x.get("achieved_events_per_s") is None:
        return "not measured"
    share = x.get("achieved_share")
    if share is None:
        return _n(x["achieved_events_per_s"])
    flag = f"; below {100 * bk.ACHIEVED_MIN_SHARE:.0f} %" if share < bk.ACHIEVED_MIN_SHARE else ""
    return f"{_n(x['achieved_events_per_s'])} ({100 * share:.0f} % of target{flag})"


def _latency_lines(r: dict) -> list[str]:
    lines = [
        "",
        "### Event → signal latency (warm worker, paced load)",
        "",
        *_LATENCY_TABLE_HEAD,
    ]
    latency = r.get("latency_ms") or {_latency_key(level): None for level in LOAD_LEVELS}
    for level, x in latency.items():
        lines.append(_latency_row(level, x, lambda level=level: _why(r, f"latency {level}", "round")))
    lines += _visible_lines(r)
    lines += _latency_legs_lines(latency)
    lines += _batch_phase_lines(latency)
    short = [level for level, x in latency.items() if x and x.get("below_target")]
    if short:
        lines += [
            "",
            f"The load generator fell below {100 * bk.ACHIEVED_MIN_SHARE:.0f} % of its target at "
            f"{', '.join(short)}: those rows measure a lighter load than they name.",
        ]
    plot = r.get("latency_plot")
    lines += [
        "",
        f"Latency versus achieved load (p50, p95, p99): `{Path(plot).name}`, next to the JSON."
        if plot
        else f"Latency versus achieved load: {_why(r, 'latency plot')}.",
    ]
    return lines


_LATENCY_TABLE_HEAD = (
    "| load | target events/s | achieved events/s | p50 ms | p95 ms | p99 ms | signals |",
    "|---|---|---|---|---|---|---|",
)


def _latency_row(level: str, x: dict | None, why: Callable[[], str]) -> str:
    """One row of a latency table: a measured level ``x`` (latency_ms's or the exactly-once one), or
    ``why()`` it is missing.

    >>> _latency_row("25%", None, lambda: "not measured: no round worked")
    '| 25% of pipeline max | not measured: no round worked | | | | | |'
    """
    if not x:
        return f"| {level} of pipeline max | {_cell(why())} | | | | | |"
    return (
        f"| {level} of pipeline max | {_n(x['rate_events_per_s'])} | {achieved_cell(x)} | {_n(x['p50'])} "
        f"| {_n(x['p95'])} | {_n(x['p99'])} | {x['n']:,} |"
    )


def _visible_lines(r: dict) -> list[str]:
    """The exactly-once worker's latency as a read_committed consumer sees it (:func:`_visible_latency`).

    >>> r = {"detail": {"exactly_once_latency": {"load": 0.25, "rate_events_per_s": 4000.0, "p50": 80.0,
    ...      "p95": 120.0, "p99": 150.0, "n": 80_000, "unique": 80_000, "missing": 0,
    ...      "achieved_events_per_s": 3990.0, "achieved_share": 0.9975}}}
    >>> print(_visible_lines(r)[-1])
    Every event's signal arrived, each once.
    """
    x = (r.get("detail") or {}).get("exactly_once_latency")
    head = [
        "",
        "Exactly-once, as a downstream `read_committed` consumer sees it (a fresh exactly-once worker; latency ="
        " the consumer's receipt of the signal − the event's `ts`, so the transaction's commit is included,"
        " which `emitted_at` above is not):",
        "",
        *_LATENCY_TABLE_HEAD,
    ]
    row = _latency_row(_latency_key(VISIBLE_LOAD), x, lambda: _why(r, VISIBLE_PART))
    if not x:
        return [*head, row]
    dup = x["n"] - x["unique"]
    tail = (
        "Every event's signal arrived, each once."
        if not x["missing"] and not dup
        else f"{x['missing']:,} events without a visible signal, {dup:,} signals seen more than once."
    )
    return [*head, row, "", tail]


def _latency_legs_lines(latency: dict) -> list[str]:
    """Where the latency went at each measured level (:func:`bk.latency_breakdown`); nothing when no
    level has the broker's append times."""
    legs = {level: x for level, x in latency.items() if x and "worker_p50" in x}
    if not legs:
        return []
    lines = [
        "",
        "Where it goes: the generator's leg (`ts` → the broker's append time; the input topic is",
        "`LogAppendTime`) and the worker's (append → `emitted_at`: the wait for the fetch and the",
        "micro-batch in progress, then the event's own batch); micro-batches are signals sharing one",
        "`emitted_at`.",
        "",
        "CPU: cores used while the generator sent (CPU seconds per second) by the worker, by the",
        "generator and by the whole machine (the rest is mostly the broker's). A level that keeps the",
        "machine near all its cores measured the machine's capacity, not the worker's latency.",
        "",
        "| load | generator p50 / p99 ms | worker p50 / p99 ms | micro-batches/s | events per batch (median) "
        "| CPU cores: worker / generator / machine (of N) |",
        "|---|---|---|---|---|---|",
    ]
    for level, x in legs.items():
        lines.append(
            f"| {level} | {_n(x['produce_p50'])} / {_n(x['produce_p99'])} | {_n(x['worker_p50'])} / "
            f"{_n(x['worker_p99'])} | {_n(x['batches_per_s'])} | {_n(x['batch_events_median'])} "
            f"| {cpu_cell(x.get('cpu_cores'))} |"
        )
    return lines


def cpu_cell(cpu: dict | None) -> str:
    """A latency level's CPU (:class:`bk.CpuUse`) as one table cell.

    >>> cpu_cell({"worker": 0.834, "generator": 0.14, "machine": 1.62, "of": 2.0})
    '0.83 / 0.14 / 1.62 (of 2)'
    >>> cpu_cell(None)
    'not measured'
    """
    if not cpu:
        return "not measured"
    return f"{cpu['worker']:.2f} / {cpu['generator']:.2f} / {cpu['machine']:.2f} (of {cpu['of']:.0f})"


#: The worker's micro-batch phases, in the order a batch goes through them (at-least-once).
PHASE_ORDER = ("engine", "signals", "changelog", "store")


def _batch_phase_lines(latency: dict) -> list[str]:
    """Each level's micro-batch phases from the worker's ``demandstream_batch_phase_seconds`` (the
    batches of that level only: the histogram read before and after it); nothing without them.

    >>> ph = {p: {"batches": 80, "mean_ms": 2.0, "p50_ms": 1.5, "p99_ms": 9.0} for p in PHASE_ORDER}
    >>> _batch_phase_lines({"25%": {"phases": ph}, "50%": None})[-1]
    '| 25% | 80 | 1.50 / 9.00 | 1.50 / 9.00 | 1.50 / 9.00 | 1.50 / 9.00 |'
    """
    levels = {level: x["phases"] for level, x in latency.items() if x and x.get("phases")}
    if not levels:
        return []
    head = " | ".join(f"{p} p50 / p99 ms" for p in PHASE_ORDER)
    lines = [
        "",
        "The worker's own account of the same batches (`demandstream_batch_phase_seconds`, read before and",
        "after each level; quantiles estimated from its buckets as Prometheus' `histogram_quantile` does):",
        "the engine (validate, step, encode), the two acknowledged round trips (signals, then the changelog)",
        "and the local write.",
        "",
        f"| load | micro-batches | {head} |",
        "|---|---|" + "---|" * len(PHASE_ORDER),
    ]
    for level, ph in levels.items():
        cells = [f"{_n(ph[p]['p50_ms'])} / {_n(ph[p]['p99_ms'])}" if p in ph else "–" for p in PHASE_ORDER]
        batches = max(int(x["batches"]) for x in ph.values())
        lines.append(f"| {level} | {batches} | " + " | ".join(cells) + " |")
    return lines


def _memory_lines(r: dict, d: dict) -> list[str]:
    """The workers' resident memory table; a missing figure reads ``failed: …`` or ``not measured: …``."""
    m = r.get("memory_mib") or {}
    n = d.get("processes") or "N"
    rs = d.get("restore") or {}
    users = m.get("restored_users") or rs.get("records")

    def mib(key: str, *why: str) -> str:
        x = m.get(key)
        if x is None:
            return _cell(_why(r, *why))
        if isinstance(x, dict):
            return f"{x['median']:,.1f} ({' · '.join(f'{v:,.1f}' for v in x['runs'])})"
        return f"{x:,.1f}"

    per = m.get("per_100k_users")
    per_text = (
        f"{per:,.1f} MiB per {MEMORY_PER_USERS:,} users ((restored − no state) / {users:,} × {MEMORY_PER_USERS:,})"
        if per is not None
        else _cell(_why(r, "memory no state", "restore"))
    )
    return [
        "",
        "### Worker memory (resident set, VmRSS, MiB per process)",
        "",
        "| measure | MiB |",
        "|---|---|",
        f"| pipeline worker after its drain (1 process, {bm.BENCH_USERS:,} users) | {mib('pipeline_per_process', 'round')} |",
        f"| `--processes {n}`: each worker process after the drain (mean of the children; supervisor not counted) "
        f"| {mib('processes_per_process', 'processes')} |",
        f"| exactly-once worker after its drain (1 process) | {mib('exactly_once_per_process', 'exactly_once')} |",
        "| of which anonymous (RssAnon: heap, model, states; what each further process adds, the libraries' "
        f"file pages being shared): pipeline worker | {mib('pipeline_anon_per_process', 'round')} |",
        f"| the same, each `--processes {n}` worker process | {mib('processes_anon_per_process', 'processes')} |",
        f"| worker with no state (ready on empty topics) | {mib('no_state', 'memory no state')} |",
        f"| restore worker after restoring {users:,} states | {mib('restored', 'restore')} |"
        if users
        else f"| restore worker after restoring its states | {mib('restored', 'restore')} |",
        f"| per {MEMORY_PER_USERS:,} users | {per_text} |",
    ]


def _step_lines(r: dict) -> list[str]:
    lines = [
        "",
        "### Model step throughput (`Scorer.step_rows`, the worker's step; events/s, one intra-op thread,"
        " the worker's GC settings)",
        "",
    ]
    steps = r.get("step_events_per_s") or {}
    devices = [dv for dv, x in steps.items() if x]
    if devices:
        lines += ["| batch | " + " | ".join(devices) + " |", "|---" * (len(devices) + 1) + "|"]
        for b in steps[devices[0]]:
            lines.append(f"| {b} | " + " | ".join(_n(steps[dv][b]) for dv in devices) + " |")
    for dv in [dv for dv, x in steps.items() if not x] or ([] if steps else ["cpu"]):
        lines += ["", f"{dv}: {_why(r, f'step {dv}', 'step')}."]
    n_large = (r.get("detail") or {}).get("step_large_catalog_categories")
    if steps.get("cpu large catalog") and n_large:
        lines += [
            "",
            f"`cpu large catalog`: the `cpu` step with a model of {n_large:,} categories (a generated shop of"
            f" {bm.LARGE_CATALOG_DEPARTMENTS} departments × {bm.LARGE_CATALOG_LEAVES} leaves; the other"
            " columns' model has the bench data's categories). The step's [rows, categories] passes grow"
            " with the catalog.",
        ]
    lines += [
        "",
        "### Incremental step vs recomputing the history (CPU, per new event, batches of users)",
        "",
        "Both sides advance a batch of users by one new event each. The step includes encoding the event"
        " and updating the state; recomputing includes encoding the raw history (a stateless service must)"
        " and, in the last columns, the network forward alone.",
        "",
    ]
    if not r.get("incremental_speedup"):
        return [*lines, f"Incremental speedup: {_why(r, 'incremental')}."]
    lines += [
        "| history length | one step µs | recompute µs | speedup | network-only µs | speedup |",
        "|---|---|---|---|---|---|",
    ]
    for L, x in r["incremental_speedup"].items():
        lines.append(
            f"| {L} | {_n(x['step_us'])} | {_n(x['recompute_us'])} | {x['ratio']:.1f}× | "
            f"{_n(x.get('recompute_network_only_us', x['recompute_us']))} | "
            f"{x.get('ratio_network_only', x['ratio']):.1f}× |"
        )
    return lines


def _state_lines(r: dict, d: dict) -> list[str]:
    disk, rs, tr = d.get("state_on_disk"), d.get("restore"), d.get("train")
    record = r.get("state_bytes_per_user")
    lines = [
        "",
        "### State and recovery",
        "",
        "| measure | value |",
        "|---|---|",
        "| packed state record (default model) | "
        + (f"{record} bytes" if record else _cell(_why(r, "data")))
        + " |",
    ]
    if disk:
        lines.append(
            f"| RocksDB on disk, {disk['users']:,} users, compacted | {disk['bytes_per_user']:.0f} bytes/user |"
        )
    else:
        lines.append(f"| RocksDB on disk, compacted | {_cell(_why(r, 'state on disk'))} |")
    if rs and r.get("restore_seconds_per_million_users") is not None:
        lines.append(
            f"| changelog restore, {rs['records']:,} users (start-up {rs['startup_seconds']:.1f} s minus "
            f"{rs['baseline_startup_seconds']:.1f} s without changelog) | "
            f"{r['restore_seconds_per_million_users']:.1f} s per million users |"
        )
    else:
        lines.append(f"| changelog restore | {_cell(_why(r, 'restore'))} |")
    lines += ["", "### Training", ""]
    if tr and r.get("train_events_per_s") is not None:
        lines.append(
            f"One epoch on {tr['n_train_events']:,} training events ({tr['threads']} threads, {tr['device']}): "
            f"{_n(r['train_events_per_s'])} events/s."
        )
    else:
        lines.append(f"Training: {_why(r, 'train')}.")
    lines.append("")
    return lines


def _profile_lines(d: dict) -> list[str]:
    prof = d.get("profile")
    if not prof:
        return []
    lines = [
        f"Profile of the worker under load: `{Path(prof['file']).name}` ({prof['seconds']:.0f} s, "
        "py-spy); top frames by own time:",
        "",
        "| self % | total % | frame |",
        "|---|---|---|",
    ]
    lines += [f"| {t['self_pct']:.1f} | {t['total_pct']:.1f} | `{t['frame']}` |" for t in prof["top"]]
    lines.append("")
    return lines
