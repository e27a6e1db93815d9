"""``demandstream bench``: every throughput, latency and size figure of docs/ARCHITECTURE.md §Benchmark in one
run, on one broker.

The order matters on a 2-core machine: the Kafka measurements run first, on the bench's own broker,
with passthrough and pipeline rounds alternating so that both see the same load drift and the ratio is
taken pair by pair; the broker is then stopped and the in-process model measurements run on a quiet
machine. The measurements themselves live in :mod:`demandstream.stream.bench.kafka` and :mod:`demandstream.stream.bench.model`;
this module plans them, gathers the machine description and writes the JSON and docs/BENCHMARKS.md.

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
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path

import orjson

from demandstream.stream.bench import kafka as bk
from demandstream.stream.bench import model as bm
from demandstream.stream.settings import Settings

logger = logging.getLogger(__name__)

#: Fractions of the measured pipeline max rate at which latency is measured (docs/ARCHITECTURE.md §Benchmark).
LOAD_LEVELS = (0.25, 0.50, 0.75)
#: Apache Kafka version deploy/kafka/kafka.sh runs (reported; an external broker may differ).
KAFKA_VERSION = "4.1.1"
#: The part of docs/BENCHMARKS.md this command owns; everything outside the markers is kept.
BEGIN_MARK = "<!-- bench:begin -->"
END_MARK = "<!-- bench:end -->"
#: Load for the profile: enough pre-loaded events to keep the warm worker busy this much longer than
#: the profile lasts, so every sample is taken under full load.
PROFILE_SLACK_S = 10.0


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
        The JSON written: the docs/ARCHITECTURE.md §Benchmark keys plus ``detail``, ``plan``, ``date`` and
        ``command``.
    """
    plan = plan or (QUICK if quick else FULL)
    t_start = time.monotonic()
    if settings.broker != Settings().broker:
        broker = bk.Broker(bootstrap=settings.bootstrap_servers[0])
    else:
        port = kafka_port or int(os.environ.get("DEMANDSTREAM_BENCH_KAFKA_PORT", bk.DEFAULT_BENCH_KAFKA_PORT))
        broker = bk.Broker(port=port, script=settings.kafka_script_path())
    markdown = Path(markdown) if markdown else None
    result: dict = {}
    with tempfile.TemporaryDirectory(prefix="ds-bench-") as tmp:
        work = Path(tmp)
        broker.start()
        try:
            # While the broker's JVM starts: data, model and the (untimed-headline) RocksDB size.
            events = bm.bench_events(max(plan.events, max(bm.HISTORY_LENGTHS), max(bm.STEP_BATCH_SIZES)))
            ckpt = bm.make_checkpoint(events)
            model = Path(settings.model) if settings.model else bm.save_model(work / "model.pt", events)
            record = bm.filled_record(ckpt)[0]
            disk = bm.rocksdb_bytes_per_user(ckpt, plan.disk_users, work)
            broker.wait()
            kafka = _kafka_measurements(
                broker.bootstrap, settings, plan, events[: plan.events], model, record, work, markdown
            )
        finally:
            broker.stop()
        result = _model_measurements(plan, events, ckpt)
    detail = {**kafka.pop("detail"), **result.pop("detail")}
    result.update(kafka)
    result["detail"] = detail
    result["state_bytes_per_user"] = len(record)
    result["detail"]["state_on_disk"] = disk
    result["detail"]["state_on_disk"]["record_bytes"] = len(record)
    result["machine"] = machine()
    result["plan"] = asdict(plan)
    result["quick"] = plan is QUICK or quick
    result["date"] = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    result["command"] = "demandstream bench" + (" --quick" if quick else "")
    result["broker"] = "external " + broker.bootstrap if broker.external else f"own, port {broker.port}"
    result["bench_seconds"] = time.monotonic() - t_start
    ordered = {k: result[k] for k in BENCH_KEYS} | {k: v for k, v in result.items() if k not in BENCH_KEYS}
    if out:
        Path(out).write_bytes(orjson.dumps(ordered, option=orjson.OPT_INDENT_2))
    if markdown:
        write_markdown(markdown, ordered)
    logger.info("bench finished in %.0f s", ordered["bench_seconds"])
    return ordered


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


def _kafka_measurements(
    bootstrap: str,
    settings: Settings,
    plan: BenchPlan,
    events,
    model: Path,
    record: bytes,
    work: Path,
    markdown: Path | None,
) -> dict:
    run = uuid.uuid4().hex[:6]
    src = f"bench-input-{run}"
    bk.create_topics(bootstrap, [src])
    bk.produce(bootstrap, src, bk.encode_events(events))
    n = len(events)
    device = "cpu" if settings.device == "auto" and not _cuda() else settings.device
    passthrough, pipeline, ratios, drains = [], [], [], []
    worker = None
    try:
        for i in range(plan.rounds):
            passthrough.append(bk.passthrough_events_per_s(bootstrap, src, f"bench-sink-{run}-{i}", n))
            if worker is not None:
                worker.stop()
            worker = bk.BenchWorker(bootstrap, model, f"{run}-{i}", work, src, device=device)
            d = bk.drain(worker, n)
            drains.append(d)
            pipeline.append(d.events_per_s)
            ratios.append(d.events_per_s / passthrough[-1])
            logger.info(
                "round %d: passthrough %.0f ev/s, pipeline %.0f ev/s", i + 1, passthrough[-1], pipeline[-1]
            )
        # Latency on the last round's worker: warm, every user's state already in its store.
        max_rate = statistics.median(pipeline)
        templates = [e.to_dict() for e in events[: min(n, 20_000)]]
        latency = {}
        for level in LOAD_LEVELS:
            key = f"{round(level * 100)}%"
            latency[key] = bk.latency_ms(
                worker, templates, level * max_rate, plan.latency_s, f"lat{run}{key[:-1]}"
            )
            logger.info("latency at %s load: %s", key, latency[key])
        prof = None
        if plan.profile_s > 0 and markdown is not None:
            prof = _profile(
                worker, bootstrap, src, events, max_rate, plan, markdown.parent / "profile-pipeline.txt"
            )
        worker.stop()
        baseline = statistics.median(d.startup_s for d in drains)
        rw = bk.BenchWorker(
            bootstrap, model, f"{run}-restore", work, f"bench-restore-input-{run}", device=device
        )
        try:
            restore = bk.restore_seconds(rw, record, plan.restore_users, baseline)
        finally:
            rw.stop()
    finally:
        if worker is not None:
            worker.stop()
    return {
        "passthrough_events_per_s": summary(passthrough),
        "pipeline_events_per_s": summary(pipeline),
        "ratio": summary(ratios),
        "latency_ms": latency,
        "restore_seconds_per_million_users": restore["seconds_per_million_users"],
        "detail": {
            "events_per_round": n,
            "worker_device": device,
            "pipeline_startup_seconds": [d.startup_s for d in drains],
            "pipeline_drain_seconds": [d.drain_s for d in drains],
            "restore": restore,
            "profile": prof,
        },
    }


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


def _model_measurements(plan: BenchPlan, events, ckpt) -> dict:
    import torch

    threads = torch.get_num_threads()
    # One intra-op thread, as in the worker (stream/worker/run.py), so the step figures match what it gets.
    torch.set_num_threads(1)
    try:
        step = {"cpu": bm.step_events_per_s(ckpt, events, "cpu", min_s=plan.step_min_s)}
        if _cuda():
            step["cuda"] = bm.step_events_per_s(ckpt, events, "cuda", min_s=plan.step_min_s)
        incremental = bm.incremental_speedup(ckpt, events, min_s=plan.step_min_s)
    finally:
        torch.set_num_threads(threads)
    train_events = events if len(events) >= plan.train_events else bm.bench_events(plan.train_events)
    train = bm.train_events_per_s(train_events[: plan.train_events])
    return {
        "step_events_per_s": step,
        "incremental_speedup": incremental,
        "train_events_per_s": train["events_per_s"],
        "detail": {"step_torch_threads": 1, "train": train},
    }


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


def render_markdown(r: dict) -> str:
    """The results block: machine, date and command, then one table per measured section."""
    m = r["machine"]
    d = r["detail"]
    lines = [
        "## Latest results" + (" (quick run: reduced sizes, indicative only)" if r.get("quick") else ""),
        "",
        f"- date: {r['date']}; command: `{r['command']}`; took {r['bench_seconds']:.0f} s; broker: {r['broker']}",
        f"- machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB"
        + (f", GPU {m['gpu']}" if m.get("gpu") else ", no GPU"),
        f"- software: Python {m['python']}, torch {m['torch']}, faust-streaming {m['faust']}, aiokafka "
        f"{m['aiokafka']}, kafka-python {m['kafka_python']}, Apache Kafka {m['kafka_broker']}",
        f"- data: {d['events_per_round']:,} generated events (demandstream.model.data.synth, {bm.BENCH_USERS:,} users), "
        f"{bk.PARTITIONS} partitions; worker device {d['worker_device']}",
        "",
        "### Throughput (median, runs in brackets)",
        "",
        "| measure | events/s |",
        "|---|---|",
        f"| passthrough: plain aiokafka consumer → producer, no work | {_mmm(r['passthrough_events_per_s'])} |",
        f"| pipeline: `demandstream worker` drain, /readyz → last signal | {_mmm(r['pipeline_events_per_s'])} |",
        "",
        f"Ratio pipeline / passthrough, pair by pair: median {r['ratio']['median']:.3f} "
        f"(min {r['ratio']['min']:.3f}, max {r['ratio']['max']:.3f}).",
        "",
        "### Event → signal latency (warm worker, paced load)",
        "",
        "| load | events/s | p50 ms | p95 ms | p99 ms | signals |",
        "|---|---|---|---|---|---|",
    ]
    for level, x in r["latency_ms"].items():
        lines.append(
            f"| {level} of pipeline max | {_n(x['rate_events_per_s'])} | {_n(x['p50'])} | {_n(x['p95'])} "
            f"| {_n(x['p99'])} | {x['n']:,} |"
        )
    lines += ["", "### Scorer.step throughput (events/s, one intra-op thread)", ""]
    devices = list(r["step_events_per_s"])
    lines += ["| batch | " + " | ".join(devices) + " |", "|---" * (len(devices) + 1) + "|"]
    for b in r["step_events_per_s"][devices[0]]:
        lines.append(f"| {b} | " + " | ".join(_n(r["step_events_per_s"][dv][b]) for dv in devices) + " |")
    lines += [
        "",
        "### Incremental step vs recomputing the history (CPU, per new event, batches of users)",
        "",
        "Both sides advance a batch of users by one new event each. The step includes encoding the event"
        " and updating the state; recomputing includes encoding the raw history (a stateless service must)"
        " and, in the last columns, the network forward alone.",
        "",
        "| history length | one step µs | recompute µs | speedup | network-only µs | speedup |",
        "|---|---|---|---|---|---|",
    ]
    for L, x in r["incremental_speedup"].items():
        lines.append(
            f"| {L} | {_n(x['step_us'])} | {_n(x['recompute_us'])} | {x['ratio']:.1f}× | "
            f"{_n(x.get('recompute_network_only_us', x['recompute_us']))} | "
            f"{x.get('ratio_network_only', x['ratio']):.1f}× |"
        )
    disk, rs, tr = d["state_on_disk"], d["restore"], d["train"]
    lines += [
        "",
        "### State and recovery",
        "",
        "| measure | value |",
        "|---|---|",
        f"| packed state record (default model) | {r['state_bytes_per_user']} bytes |",
        f"| RocksDB on disk, {disk['users']:,} users, compacted | {disk['bytes_per_user']:.0f} bytes/user |",
        f"| changelog restore, {rs['records']:,} users (start-up {rs['startup_seconds']:.1f} s minus "
        f"{rs['baseline_startup_seconds']:.1f} s without changelog) | "
        f"{r['restore_seconds_per_million_users']:.1f} s per million users |",
        "",
        "### Training",
        "",
        f"One epoch on {tr['n_train_events']:,} training events ({tr['threads']} threads, {tr['device']}): "
        f"{_n(r['train_events_per_s'])} events/s.",
        "",
    ]
    prof = d.get("profile")
    if prof:
        lines += [
            f"Profile of the worker under load: `{Path(prof['file']).name}` ({prof['seconds']:.0f} s, "
            "py-spy); top frames by own time:",
            "",
            "| self % | total % | frame |",
            "|---|---|---|",
        ]
        lines += [f"| {t['self_pct']:.1f} | {t['total_pct']:.1f} | `{t['frame']}` |" for t in prof["top"]]
        lines.append("")
    return "\n".join(lines)
