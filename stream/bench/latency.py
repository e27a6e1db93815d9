"""Event -> signal latency under paced load: the load generator, the signals' percentiles, where the time
went (the generator's leg, the worker's, its batch phases) and what a read_committed consumer sees.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Sequence

import numpy as np
import orjson
from prometheus_client.parser import text_string_to_metric_families

from demandstream.stream.bench.host import CpuUse
from demandstream.stream.bench.topics import FETCH_MAX_BYTES, PARTITIONS, READ_MAX_RECORDS, OffsetWatch
from demandstream.stream.bench.worker import BenchWorker

logger = logging.getLogger(__name__)

#: Linger of the latency measurement's producer, as the worker's (stream/worker/app.py PRODUCER_LINGER_MS).
LINGER_MS = 5
#: The latency producer releases events in ticks of this length, at the target rate on average.
LATENCY_TICK_S = 0.01
#: The read_committed level's consumer polls at most this long, so a signal's arrival time is its own.
LATENCY_TICK_MS = round(1000 * LATENCY_TICK_S)
#: Topic configs of the bench's input topic: the broker stamps each record with its append time, which
#: splits every event's latency into the generator's leg (send -> append) and the worker's (append ->
#: signal), see :func:`latency_breakdown`. The worker itself does not read record timestamps for its
#: work (only for its latency metric, which then also counts from the append).
INPUT_TOPIC_CONFIGS = {"message.timestamp.type": "LogAppendTime"}
#: aiokafka's ``ConsumerRecord.timestamp_type`` of a broker-stamped record.
LOG_APPEND_TIME = 1
#: A latency level whose generator achieved less than this share of its target rate is flagged.
ACHIEVED_MIN_SHARE = 0.95
#: After its last send, how long the read_committed level waits for the signals still owed (the
#: worker's commit interval and its last batches, with room for a slow machine).
VISIBLE_TAIL_S = 30.0


async def _paced_send(
    bootstrap: str, topic: str, templates: Sequence[dict], rate: float, duration: float, tag: str
) -> tuple[int, float]:
    """Send at ``rate`` for ``duration`` s; (events sent, seconds from the first send to the last ack)."""
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=LINGER_MS, acks="all")
    await producer.start()
    try:
        sent, t0 = 0, time.monotonic()
        while (elapsed := time.monotonic() - t0) < duration:
            due = int(rate * elapsed)
            while sent < due:
                ev = dict(templates[sent % len(templates)])
                ev["ts"] = time.time()  # the moment the shop produces it: latency starts here
                ev["event_id"] = f"{tag}-{sent}"
                await producer.send(topic, orjson.dumps(ev), key=ev["user_id"].encode())
                sent += 1
            await asyncio.sleep(LATENCY_TICK_S)
        await producer.flush()
        return sent, time.monotonic() - t0
    finally:
        await producer.stop()


async def _append_times(
    bootstrap: str, topic: str, start: dict[int, int], end: dict[int, int]
) -> dict[str, float]:
    """Event id -> the broker's append time (s) of the input records in ``[start, end)``; empty when the
    topic keeps the producer's timestamps (an input topic the bench did not create)."""
    records = await _read_range(bootstrap, topic, start, end, records=True)
    return {
        orjson.loads(r.value)["event_id"]: r.timestamp / 1000.0
        for r in records
        if r.timestamp_type == LOG_APPEND_TIME
    }


async def _read_range(
    bootstrap: str, topic: str, start: dict[int, int], end: dict[int, int], records: bool = False
) -> list:
    """The values (the consumer records with ``records``) of ``topic`` in ``[start, end)`` per partition."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False, fetch_max_bytes=FETCH_MAX_BYTES
    )
    await consumer.start()
    try:
        tps = {p: TopicPartition(topic, p) for p in start if end[p] > start[p]}
        consumer.assign(list(tps.values()))
        for p, tp in tps.items():
            consumer.seek(tp, start[p])
        out: list = []
        left = sum(end[p] - start[p] for p in tps)
        while left > 0:
            batch = await consumer.getmany(timeout_ms=1000, max_records=READ_MAX_RECORDS)
            for tp, msgs in batch.items():
                for m in msgs:
                    if m.offset < end[tp.partition]:
                        out.append(m if records else m.value)
                        left -= 1
        return out
    finally:
        await consumer.stop()


def achieved_load(target: float, produced: int, seconds: float, sent: int | None = None) -> dict:
    """The load generator's own figures: its target rate, the rate it achieved (events the broker holds
    from it / seconds from its first send to its last acknowledgement), and whether that fell below
    :data:`ACHIEVED_MIN_SHARE` of the target (a level whose load was not what it says).

    >>> achieved_load(1000.0, 7_400, 8.0)
    {'target_events_per_s': 1000.0, 'achieved_events_per_s': 925.0, 'achieved_share': 0.925, 'produced': 7400, 'send_seconds': 8.0, 'below_target': True}
    """
    achieved = produced / seconds
    out = {
        "target_events_per_s": target,
        "achieved_events_per_s": achieved,
        "achieved_share": achieved / target,
        "produced": produced,
        "send_seconds": seconds,
        "below_target": achieved < ACHIEVED_MIN_SHARE * target,
    }
    if sent is not None and sent != produced:
        out["sent"] = sent
    return out


def latency_summary(lat_ms: np.ndarray) -> dict[str, float]:
    """p50, p95, p99 and max of a level's latencies (ms), and how many there are.

    >>> latency_summary(np.arange(1.0, 101.0))
    {'p50': 50.5, 'p95': 95.05, 'p99': 99.01, 'max': 100.0, 'n': 100}
    """
    p50, p95, p99 = np.percentile(lat_ms, [50, 95, 99])
    return {
        "p50": float(p50),
        "p95": float(p95),
        "p99": float(p99),
        "max": float(lat_ms.max()),
        "n": int(lat_ms.size),
    }


def latency_ms(
    worker: BenchWorker, templates: Sequence[dict], rate: float, duration: float, tag: str
) -> dict[str, float]:
    """Event -> signal latency percentiles with events produced at ``rate`` for ``duration`` seconds.

    Each event's ``ts`` is the wall clock when it is handed to the producer and each signal carries the
    worker's ``emitted_at``, so the figure covers produce, broker, fetch, batching, the step and the
    signal's encoding (not the signal's own trip to a consumer). The load actually offered is verified
    on the broker: the input topic's end offsets before and after the send (:func:`achieved_load`).
    The CPU the worker, the generator and the machine used while it ran (:class:`CpuUse`) says whether
    the level was bound by the machine's cores.
    """
    watch = OffsetWatch(worker.bootstrap, worker.signals_topic)
    inputs = OffsetWatch(worker.bootstrap, worker.input_topic)
    try:
        start, in_start = watch.ends(), inputs.ends()
        before = _metrics_or_none(worker)
        cpu = CpuUse(worker.worker_pids())
        sent, seconds = asyncio.run(
            _paced_send(worker.bootstrap, worker.input_topic, templates, rate, duration, tag)
        )
        cpu_cores = cpu.cores()
        in_end = inputs.ends()
        produced = sum(in_end.values()) - sum(in_start.values())
        watch.wait_for(sum(start.values()) + sent, timeout=max(60.0, 3 * duration), proc=worker.proc)
        end = watch.ends()
        after = _metrics_or_none(worker)
    finally:
        watch.close()
        inputs.close()
    signals = [
        orjson.loads(v) for v in asyncio.run(_read_range(worker.bootstrap, worker.signals_topic, start, end))
    ]
    lat = np.array([(s["emitted_at"] - s["ts"]) * 1000.0 for s in signals])
    appended = asyncio.run(_append_times(worker.bootstrap, worker.input_topic, in_start, in_end))
    return {
        **latency_summary(lat),
        "rate_events_per_s": rate,
        **achieved_load(rate, produced, seconds, sent),
        **latency_breakdown(signals, appended, seconds),
        "phases": None if before is None or after is None else batch_phases(before, after),
        "cpu_cores": cpu_cores,
    }


def visible_latency_ms(
    worker: BenchWorker, templates: Sequence[dict], rate: float, duration: float, tag: str
) -> dict:
    """Event -> signal latency as a downstream ``read_committed`` consumer sees it, events produced at
    ``rate`` for ``duration`` seconds into the worker's (empty) input topic.

    Under exactly-once a signal is visible only once the transaction holding it commits, which the
    worker's ``emitted_at`` cannot show: each signal's latency here is the wall clock when the consumer
    received it minus its event's ``ts`` (both clocks of this machine). ``unique`` counts the distinct
    events among the signals received (each exactly once when it equals ``n``); ``missing`` the events
    sent whose signal did not arrive within :data:`VISIBLE_TAIL_S` after the last send.
    """
    inputs = OffsetWatch(worker.bootstrap, worker.input_topic)
    try:
        in_start = inputs.ends()
        sent, seconds, seen = asyncio.run(
            _send_and_watch(
                worker.bootstrap, worker.input_topic, worker.signals_topic, templates, rate, duration, tag
            )
        )
        produced = sum(inputs.ends().values()) - sum(in_start.values())
    finally:
        inputs.close()
    if not seen:
        raise RuntimeError(f"no signal visible to a read_committed consumer within {VISIBLE_TAIL_S:.0f} s")
    signals = [(arrived, orjson.loads(value)) for arrived, value in seen]
    lat = np.array([(arrived - s["ts"]) * 1000.0 for arrived, s in signals])
    unique = len({s["event_id"] for _, s in signals})
    return {
        **latency_summary(lat),
        "rate_events_per_s": rate,
        **achieved_load(rate, produced, seconds, sent),
        "unique": unique,
        "missing": max(0, sent - unique),
        "isolation_level": "read_committed",
    }


async def _send_and_watch(
    bootstrap: str,
    input_topic: str,
    signals_topic: str,
    templates: Sequence[dict],
    rate: float,
    duration: float,
    tag: str,
) -> tuple[int, float, list[tuple[float, bytes]]]:
    """:func:`_paced_send` while a read_committed consumer reads ``signals_topic`` from its start:
    (events sent, send seconds, [(wall time received, signal value)]). The topic must hold this level's
    signals only (a fresh worker's)."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        group_id=None,
        enable_auto_commit=False,
        isolation_level="read_committed",
        auto_offset_reset="earliest",
        fetch_max_bytes=FETCH_MAX_BYTES,
    )
    await consumer.start()
    try:
        consumer.assign([TopicPartition(signals_topic, p) for p in range(PARTITIONS)])
        await consumer.seek_to_beginning()
        seen: list[tuple[float, bytes]] = []
        # until every event sent has its signal, or VISIBLE_TAIL_S after the last send
        until = {"signals": math.inf, "deadline": math.inf}

        async def watch() -> None:
            while len(seen) < until["signals"] and time.monotonic() < until["deadline"]:
                batch = await consumer.getmany(timeout_ms=LATENCY_TICK_MS, max_records=READ_MAX_RECORDS)
                now = time.time()
                seen.extend((now, m.value) for msgs in batch.values() for m in msgs)

        watcher = asyncio.ensure_future(watch())
        try:
            sent, seconds = await _paced_send(bootstrap, input_topic, templates, rate, duration, tag)
            until.update(signals=sent, deadline=time.monotonic() + VISIBLE_TAIL_S)
            await watcher
        finally:
            watcher.cancel()
        return sent, seconds, seen
    finally:
        await consumer.stop()


def _metrics_or_none(worker: BenchWorker) -> str | None:
    """The worker's /metrics, or None (logged) when it cannot be read: the phases are then not given,
    and the latency figures, which do not depend on them, still are."""
    try:
        return worker.metrics_text()
    except (OSError, RuntimeError) as exc:
        logger.warning("cannot read the worker's /metrics for the batch phases: %s", exc)
        return None


def batch_phases(before: str, after: str) -> dict[str, dict[str, float]]:
    """Per phase of ``demandstream_batch_phase_seconds``, the micro-batches between two scrapes of a
    worker's /metrics: their number and the mean, p50 and p99 duration in ms. Quantiles are estimated
    from the histogram's buckets as Prometheus' ``histogram_quantile`` does (linear inside the bucket).

    >>> def text(counts, seconds):
    ...     rows = [f'{_PHASES}_bucket{{le="{le}",phase="engine"}} {c}' for le, c in counts]
    ...     return chr(10).join([*rows, f'{_PHASES}_sum{{phase="engine"}} {seconds}'])
    >>> before = text([("0.01", 0), ("0.02", 0), ("+Inf", 0)], 0.0)
    >>> b = batch_phases(before, text([("0.01", 50), ("0.02", 100), ("+Inf", 100)], 1.2))
    >>> e = b["engine"]
    >>> e["batches"], round(e["mean_ms"], 1), round(e["p50_ms"], 1), round(e["p99_ms"], 1)
    (100, 12.0, 10.0, 19.8)
    """
    b, a = _phase_histograms(before), _phase_histograms(after)
    out = {}
    for phase, (buckets, total) in a.items():
        base, base_total = b.get(phase, ({}, 0.0))
        cum = sorted((le, c - base.get(le, 0.0)) for le, c in buckets.items())
        n = cum[-1][1] if cum else 0.0
        if n <= 0:
            continue
        out[phase] = {
            "batches": int(n),
            "mean_ms": 1000.0 * (total - base_total) / n,
            "p50_ms": 1000.0 * _bucket_quantile(0.5, cum),
            "p99_ms": 1000.0 * _bucket_quantile(0.99, cum),
        }
    return out


def _phase_histograms(text: str) -> dict[str, tuple[dict[float, float], float]]:
    """phase -> (cumulative count per upper bound, sum of seconds) of the phase histogram in ``text``."""
    out: dict[str, tuple[dict[float, float], float]] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name not in (_PHASES + "_bucket", _PHASES + "_sum"):
                continue
            phase = s.labels.get("phase")
            buckets, total = out.get(phase, ({}, 0.0))
            if s.name.endswith("_bucket"):
                buckets[float(s.labels["le"])] = s.value
            else:
                total = s.value
            out[phase] = (buckets, total)
    return out


_PHASES = "demandstream_batch_phase_seconds"


def _bucket_quantile(q: float, cum: list[tuple[float, float]]) -> float:
    """The q-quantile of cumulative bucket counts ``[(upper bound, count)]`` (sorted, +Inf last)."""
    rank = q * cum[-1][1]
    lower, below = 0.0, 0.0
    for le, count in cum:
        if count >= rank:
            if le == math.inf:  # above the last finite bound: that bound, as histogram_quantile
                return lower
            return lower + (le - lower) * ((rank - below) / (count - below) if count > below else 0.0)
        lower, below = le, count
    return lower


def latency_breakdown(signals: Sequence[dict], appended: dict[str, float], seconds: float) -> dict:
    """Where each event's latency went: the generator's leg (``ts`` -> the broker's append time) and the
    worker's (append -> ``emitted_at``: waiting for the fetch and the micro-batch before it, then its
    own batch's step), p50 and p99 of each in ms; and the worker's micro-batches (signals sharing one
    ``emitted_at`` were stepped together) per second and their median size. ``appended`` maps event
    ids to append times (s); without them (a topic that keeps the producer's timestamps) only the
    batch figures are given.

    >>> sig = [{"event_id": "a", "ts": 0.0, "emitted_at": 0.030}, {"event_id": "b", "ts": 0.010, "emitted_at": 0.030}]
    >>> b = latency_breakdown(sig, {"a": 0.005, "b": 0.012}, seconds=1.0)
    >>> round(b["produce_p50"], 1), round(b["worker_p99"], 1), b["batches_per_s"], b["batch_events_median"]
    (3.5, 24.9, 1.0, 2.0)
    """
    emitted = np.array([s["emitted_at"] for s in signals])
    _, sizes = np.unique(emitted, return_counts=True)
    out = {"batches_per_s": float(len(sizes) / seconds), "batch_events_median": float(np.median(sizes))}
    both = [(s["ts"], appended[s["event_id"]], s["emitted_at"]) for s in signals if s["event_id"] in appended]
    if both:
        ts, at, em = (np.array(c) for c in zip(*both, strict=True))
        for name, leg in (("produce", (at - ts) * 1000.0), ("worker", (em - at) * 1000.0)):
            out[f"{name}_p50"], out[f"{name}_p99"] = (float(v) for v in np.percentile(leg, [50, 99]))
    return out
