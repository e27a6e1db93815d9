"""The Markdown of ``demandstream bench``: the results block of docs/BENCHMARKS.md, rendered from the
JSON report that :mod:`demandstream.stream.bench.runner` measures (pure functions of that dict), and the
block written between its markers."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from demandstream.stream.bench import latency as bl
from demandstream.stream.bench import model as bm
from demandstream.stream.bench import passthrough as bc
from demandstream.stream.bench import topics as bt
from demandstream.stream.bench.plan import (
    LOAD_LEVELS,
    MEMORY_PER_USERS,
    VISIBLE_LOAD,
    VISIBLE_PART,
    latency_key,
)

#: The part of docs/BENCHMARKS.md this command owns; everything outside the markers is kept.
BEGIN_MARK = "<!-- bench:begin -->"
END_MARK = "<!-- bench:end -->"

#: Issue #14's target for exactly-once's cost against at-least-once throughput (reported beside it).
EXACTLY_ONCE_COST_TARGET = 0.10


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
            f"{bm.BENCH_USERS:,} users), {d.get('partitions', bt.DEFAULT_PARTITIONS)} partitions; worker device {d['worker_device']}, "
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
    for name, spec in bc.PASSTHROUGH_METHODS.items():
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
    flag = f"; below {100 * bl.ACHIEVED_MIN_SHARE:.0f} %" if share < bl.ACHIEVED_MIN_SHARE else ""
    return f"{_n(x['achieved_events_per_s'])} ({100 * share:.0f} % of target{flag})"


def _latency_lines(r: dict) -> list[str]:
    lines = [
        "",
        "### Event → signal latency (warm worker, paced load)",
        "",
        *_LATENCY_TABLE_HEAD,
    ]
    latency = r.get("latency_ms") or {latency_key(level): None for level in LOAD_LEVELS}
    for level, x in latency.items():
        lines.append(_latency_row(level, x, lambda level=level: _why(r, f"latency {level}", "round")))
    lines += _visible_lines(r)
    lines += _latency_legs_lines(latency)
    lines += _batch_phase_lines(latency)
    short = [level for level, x in latency.items() if x and x.get("below_target")]
    if short:
        lines += [
            "",
            f"The load generator fell below {100 * bl.ACHIEVED_MIN_SHARE:.0f} % of its target at "
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
    row = _latency_row(latency_key(VISIBLE_LOAD), x, lambda: _why(r, VISIBLE_PART))
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
    """Where the latency went at each measured level (:func:`bl.latency_breakdown`); nothing when no
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
    """A latency level's CPU (:class:`bh.CpuUse`) as one table cell.

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
