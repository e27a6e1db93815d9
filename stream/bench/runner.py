"""``demandstream bench``: every throughput, latency and size figure of docs/ARCHITECTURE.md §Benchmark in one
run, on one broker.

The order matters on a 2-core machine: the Kafka measurements run first, on the bench's own broker,
with passthrough and pipeline rounds alternating so that both see the same load drift and the ratio is
taken pair by pair; the broker is then stopped and the in-process model measurements run on a quiet
machine. The measurements themselves live in their modules (:mod:`~demandstream.stream.bench.passthrough`,
:mod:`~demandstream.stream.bench.worker`: drain and restore, :mod:`~demandstream.stream.bench.latency`,
:mod:`~demandstream.stream.bench.profiling`, :mod:`~demandstream.stream.bench.model`, in process),
the plans' sizes in :mod:`demandstream.stream.bench.plan`; this module runs them, gathers the machine
description, writes the JSON, and has :mod:`demandstream.stream.bench.report` write docs/BENCHMARKS.md.

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

from demandstream.stream.bench import latency as bl
from demandstream.stream.bench import model as bm
from demandstream.stream.bench import passthrough as bc
from demandstream.stream.bench import plot as bp
from demandstream.stream.bench import profiling as bs
from demandstream.stream.bench import topics as bt
from demandstream.stream.bench import worker as bw
from demandstream.stream.bench.plan import (
    FULL,
    LOAD_LEVELS,
    MEMORY_PER_USERS,
    QUICK,
    VISIBLE_LOAD,
    VISIBLE_PART,
    BenchPlan,
    latency_key,
)
from demandstream.stream.bench.report import write_markdown
from demandstream.stream.settings import Settings

logger = logging.getLogger(__name__)
T = TypeVar("T")

#: Apache Kafka version deploy/kafka/kafka.sh runs (reported; an external broker may differ).
KAFKA_VERSION = "4.1.1"
#: Load for the profile: enough pre-loaded events to keep the warm worker busy this much longer than
#: the profile lasts, so every sample is taken under full load.
PROFILE_SLACK_S = 10.0
#: Distinct events the latency load cycles through (re-stamped on each send): enough that a user's
#: events are not one template repeated.
LATENCY_TEMPLATES = 20_000
#: A failed part's error in the JSON and the Markdown is one line of at most this many characters (the
#: log has the whole traceback).
ERROR_CHARS = 300
#: Exit status of ``demandstream bench`` when a part failed (its JSON and Markdown are still written);
#: not 2, which the CLI keeps for a user's mistake.
EXIT_PARTS_FAILED = 1


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
        broker = bt.Broker(bootstrap=settings.bootstrap_servers[0])
    else:
        port = kafka_port or int(os.environ.get("DEMANDSTREAM_BENCH_KAFKA_PORT", bt.DEFAULT_BENCH_KAFKA_PORT))
        broker = bt.Broker(port=port, script=settings.kafka_script_path())
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


def _cores() -> int:
    """The machine's cores, the N of ``worker --processes N``."""
    return os.cpu_count() or 1


def _kafka_part_names(plan: BenchPlan, markdown: Path | None, cores: int = 1) -> list[str]:
    """The Kafka parts this plan runs, in order (what a failed broker leaves unmeasured)."""
    names = ["warm-up"]
    for i in range(plan.rounds):
        names += [f"processes round {i + 1}"] if cores > 1 else []
        names += [f"exactly_once round {i + 1}", f"round {i + 1}"]
    names += [f"latency {latency_key(level)}" for level in LOAD_LEVELS]
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

    Each round's passthrough is the faster of its :data:`~demandstream.stream.bench.passthrough.PASSTHROUGH_METHODS`,
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
    faster = [max(bc.PASSTHROUGH_METHODS, key=lambda m, r=r: r[m]) for r in rounds]
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
                for m, spec in bc.PASSTHROUGH_METHODS.items()
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
    anchors = {r["round"]: max(r[m] for m in bc.PASSTHROUGH_METHODS) for r in rounds}
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
    is ready (:func:`~demandstream.stream.bench.worker.drain`); the exactly-once worker drains ``src``
    pre-loaded, as the round's.
    """
    kind = "eo" if guarantee == "exactly_once" else f"procs{processes}"
    tag = f"{run}-{kind}-{i}"
    fed = processes > 1
    worker = bw.BenchWorker(
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
        d = bw.drain(worker, n, feed_from=src) if fed else bw.drain(worker, n)
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
) -> tuple[dict, bw.BenchWorker]:
    """One round: both passthrough copies, then a fresh worker's drain; returns its figures and the worker.

    The two copies swap order from one round to the next, so neither always runs on the colder broker.
    """
    methods = list(bc.PASSTHROUGH_METHODS)
    if i % 2:
        methods.reverse()
    figures: dict = {"round": i + 1}
    for m in methods:
        figures[m] = bc.passthrough_events_per_s(m, bootstrap, src, f"bench-sink-{run}-{i}-{m}", n)
    worker = bw.BenchWorker(bootstrap, data.model, f"{run}-{i}", work, src, **serve)
    try:
        d = bw.drain(worker, n)
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
        ", ".join(f"{m} {figures[m]:.0f} ev/s" for m in bc.PASSTHROUGH_METHODS),
        d.events_per_s,
    )
    return figures, worker


def _load_input(bootstrap: str, src: str, events) -> bool:
    bt.create_topics(bootstrap, [src], configs=bl.INPUT_TOPIC_CONFIGS)
    bt.produce(bootstrap, src, bt.encode_events(events))
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
    levels = [latency_key(level) for level in LOAD_LEVELS]
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
                    bl.latency_ms,
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
            "partitions": bt.PARTITIONS,
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
    worker = bw.BenchWorker(
        bootstrap,
        data.model,
        f"{run}-warmup-0",
        work,
        src,
        **serve,
        guarantee="exactly_once",
    )
    try:
        d = bw.drain(worker, n)
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
    (:func:`~demandstream.stream.bench.latency.visible_latency_ms`), at ``rate`` for ``seconds``.

    A fresh worker on an input topic of its own, empty until the level starts: the at-least-once
    levels' ``emitted_at`` cannot show the wait for a transaction's commit, which is what a downstream
    consumer of exactly-once signals waits for (the commit interval, 0.1 s by default under
    exactly-once, docs/OPERATIONS.md).
    """
    tag = f"{run}-eo-latency"
    topic = f"bench-input-{tag}"
    bt.create_topics(bootstrap, [topic], configs=bl.INPUT_TOPIC_CONFIGS)
    worker = bw.BenchWorker(bootstrap, data.model, tag, work, topic, **serve, guarantee="exactly_once")
    try:
        worker.start()
        worker.wait_ready()
        out = bl.visible_latency_ms(worker, templates, rate, seconds, f"eolat{run}")
    finally:
        worker.stop()
    logger.info("exactly-once latency, read_committed, at %.0f ev/s: %s", rate, out)
    return {**out, "load": VISIBLE_LOAD}


def _no_state(bootstrap: str, data: _Data, run: str, work: Path, serve: Mapping[str, str]) -> dict:
    """A fresh worker on empty topics: its resident memory once ready, with no user state."""
    w = bw.BenchWorker(
        bootstrap,
        data.model,
        f"{run}-empty",
        work,
        f"bench-empty-input-{run}",
        **serve,
    )
    bt.create_topics(bootstrap, [w.input_topic, w.signals_topic, f"bench-dlq-{w.tag}"])
    try:
        return bw.ready_rss_mib(w)
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
    rw = bw.BenchWorker(
        bootstrap,
        data.model,
        f"{run}-restore",
        work,
        f"bench-restore-input-{run}",
        **serve,
    )
    try:
        return bw.restore_seconds(rw, data.record, plan.restore_users, baseline)
    finally:
        rw.stop()


def _profile(
    worker: bw.BenchWorker, bootstrap: str, src: str, events, rate: float, plan: BenchPlan, out: Path
) -> dict:
    """Load the warm worker at full speed and record py-spy samples; write the top-functions summary."""
    n = int(rate * (plan.profile_s + PROFILE_SLACK_S))
    records = bt.encode_events(events[i % len(events)] for i in range(n))
    bt.produce(bootstrap, src, records)
    raw = out.with_suffix(".collapsed.tmp")
    try:
        bs.profile(worker.proc.pid, plan.profile_s, raw)
        text, rows = bs.summarize_profile(raw.read_text())
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
