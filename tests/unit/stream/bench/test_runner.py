"""``demandstream bench`` never dies half-way (#14 item 2) and divides by the faster anchor (#14 item 1).

No broker here: the broker, the Kafka measurements and the model figures are replaced by fakes, so
these tests check the bench's bookkeeping (which part ran, failed or was skipped, what reached the JSON,
the Markdown and the exit status), not speed. tests/integration/test_bench_smoke.py runs the real thing.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from demandstream.stream import cli
from demandstream.stream.bench import latency as bl
from demandstream.stream.bench import model as bm
from demandstream.stream.bench import passthrough as bc
from demandstream.stream.bench import runner
from demandstream.stream.bench import topics as bt
from demandstream.stream.bench import worker as bw
from demandstream.stream.bench.plan import BenchPlan
from demandstream.stream.bench.report import BEGIN_MARK, END_MARK, exactly_once_line
from demandstream.stream.bench.runner import (
    BENCH_KEYS,
    SCALING_KEYS,
    Parts,
    exactly_once_cost,
    memory,
    per_users_mib,
    run_bench,
    scaling,
    summary,
    throughput,
)
from demandstream.stream.settings import Settings

TINY = BenchPlan(
    events=10,
    rounds=3,
    latency_s=0.1,
    restore_users=10,
    disk_users=10,
    train_events=10,
    step_min_s=0.0,
    profile_s=0.0,
)

# -- Parts ----------------------------------------------------------------------------------------


def test_a_failing_part_is_recorded_and_the_next_one_runs():
    parts, ran = Parts(), []

    def broken():
        raise RuntimeError("kafka.sh up failed (1):\n  port 49592 in use")

    assert parts.run("broker start", broken) is None
    assert parts.run("data", lambda: ran.append("data") or 7) == 7
    assert ran == ["data"]
    assert parts.failed == [
        {"part": "broker start", "error": "RuntimeError: kafka.sh up failed (1): port 49592 in use"}
    ]
    assert parts.reason("broker start").startswith("broker start failed: RuntimeError")


def test_a_long_error_is_cut_to_one_short_line():
    parts = Parts()
    parts.run("round 1", lambda: (_ for _ in ()).throw(TimeoutError("x" * 5000)))
    error = parts.failed[0]["error"]
    assert len(error) == runner.ERROR_CHARS and "\n" not in error and error.endswith("…")


@pytest.mark.parametrize("exc", [KeyboardInterrupt, SystemExit])
def test_ctrl_c_and_exit_are_not_swallowed(exc):
    parts = Parts()

    def interrupted():
        raise exc()

    with pytest.raises(exc):
        parts.run("round 1", interrupted)
    assert parts.failed == []


# -- ratio ----------------------------------------------------------------------------------------


def test_the_ratio_divides_by_the_faster_anchor_of_each_round():
    rounds = [
        {"perf_anchors": 60_000.0, "fastest_copy": 80_000.0, "pipeline": 8_000.0},
        {"perf_anchors": 50_000.0, "fastest_copy": 40_000.0, "pipeline": 10_000.0},
        {"perf_anchors": 30_000.0, "fastest_copy": 20_000.0, "pipeline": 6_000.0},
    ]
    t = throughput(rounds)
    assert t["ratio"]["runs"] == pytest.approx([0.1, 0.2, 0.2])
    assert t["ratio"]["median"] == pytest.approx(0.2)
    assert t["passthrough_events_per_s"]["runs"] == [80_000.0, 50_000.0, 30_000.0]
    assert t["passthrough"]["faster"] == ["fastest_copy", "perf_anchors", "perf_anchors"]
    methods = t["passthrough"]["methods"]
    assert set(methods) == set(bc.PASSTHROUGH_METHODS)
    assert methods["perf_anchors"]["events_per_s"]["runs"] == [60_000.0, 50_000.0, 30_000.0]
    assert methods["fastest_copy"]["settings"]["acks"] == "all"


def test_no_round_gives_no_throughput_figures():
    assert all(v is None for v in throughput([]).values())


# -- run_bench with fakes -------------------------------------------------------------------------


class FakeEvent:
    user_id = "u1"

    def to_dict(self) -> dict:
        return {"user_id": self.user_id}


class FakeBroker:
    fail_wait: Exception | None = None
    instances: list[FakeBroker] = []

    def __init__(self, port=None, bootstrap=None, script=None):
        self.port, self.external, self.bootstrap = (
            port,
            bootstrap is not None,
            bootstrap or f"127.0.0.1:{port}",
        )
        self.stopped = False
        FakeBroker.instances.append(self)

    def start(self):
        return self

    def wait(self):
        if FakeBroker.fail_wait is not None:
            raise FakeBroker.fail_wait
        return self

    def stop(self):
        self.stopped = True


class FakeWorker:
    started: list[FakeWorker] = []

    def __init__(
        self,
        bootstrap,
        model,
        tag,
        workdir,
        input_topic,
        device="cpu",
        inference="eager",
        processes=1,
        guarantee="at_least_once",
    ):
        self.tag, self.stopped, self.input_topic = tag, False, input_topic
        self.processes, self.guarantee, self.inference = processes, guarantee, inference
        self.signals_topic = f"bench-signals-{tag}"
        FakeWorker.started.append(self)

    def start(self):
        return self

    def wait_ready(self):
        return 0.0

    def stop(self):
        self.stopped = True


@pytest.fixture
def fakes(monkeypatch):
    """Every measurement replaced; ``fakes.fail`` names the parts that raise."""

    class Fakes:
        fail: dict[str, BaseException] = {}
        latency_on: list[str] = []
        visible_on: list[tuple] = []
        achieved_share = 1.0
        fed: dict[str, tuple] = {}

    FakeBroker.fail_wait, FakeBroker.instances, FakeWorker.started = None, [], []

    def maybe_fail(name: str):
        if name in Fakes.fail:
            raise Fakes.fail[name]

    def prepare(plan, settings, work):
        maybe_fail("data")
        return runner._Data([FakeEvent() for _ in range(plan.events)], object(), work / "m.pt", b"s" * 100)

    def passthrough(method, bootstrap, src, sink, n):
        return {"perf_anchors": 60_000.0, "fastest_copy": 80_000.0}[method]

    def drain(worker, n, feed_from=None):
        # tags: "<run>-<i>" (the round), "<run>-procs2-<i>" (--processes 2), "<run>-eo-<i>" (exactly-once)
        kind = worker.tag.split("-", 1)[1]
        maybe_fail(f"drain {kind}")
        Fakes.fed[kind] = (worker.input_topic, feed_from)
        i = int(kind.rsplit("-", 1)[-1])
        if worker.processes > 1:
            return bw.DrainResult(15_000.0 * (i + 1), 6.0, 1.0, [250.0, 270.0], 40.0, feed_s=0.1)
        if worker.guarantee == "exactly_once":
            return bw.DrainResult(7_200.0 * (i + 1), 5.5, 1.0, [310.0], committed_s=n / (6_000.0 * (i + 1)))
        return bw.DrainResult(events_per_s=8_000.0 * (i + 1), startup_s=5.0 + i, drain_s=1.0, rss_mib=[300.0])

    def latency(worker, templates, rate, duration, tag):
        maybe_fail("latency")
        Fakes.latency_on.append(worker.tag)
        share = Fakes.achieved_share
        return {
            "p50": 5.0,
            "p95": 9.0,
            "p99": 12.0,
            "rate_events_per_s": rate,
            **bl.achieved_load(rate, round(rate * share * 8.0), 8.0),
            "n": 100,
        }

    def visible(worker, templates, rate, duration, tag):
        maybe_fail("visible")
        Fakes.visible_on.append((worker.tag, worker.guarantee, worker.input_topic, rate))
        return {
            "p50": 80.0,
            "p95": 120.0,
            "p99": 150.0,
            "max": 200.0,
            "rate_events_per_s": rate,
            **bl.achieved_load(rate, round(rate * 8.0), 8.0),
            "n": 100,
            "unique": 100,
            "missing": 0,
            "isolation_level": "read_committed",
        }

    def no_state(worker, **ready):
        maybe_fail("no state")
        return {"startup_seconds": 4.0, "rss_mib": 200.0}

    def restore(worker, record, n, baseline):
        return {
            "records": n,
            "startup_seconds": baseline + 2.0,
            "baseline_startup_seconds": baseline,
            "restore_seconds": 2.0,
            "seconds_per_million_users": 2.0e6 / n,
            "rss_mib": 200.0 + 0.004,  # 10 states: 40 MiB per 100k users
        }

    large = SimpleNamespace(vocab=range(4321))  # the large-catalog model: only its size is read

    def step(ckpt, events, device, min_s, inference="eager"):
        maybe_fail(
            "step large catalog" if ckpt is large else "step" if inference == "eager" else f"step {inference}"
        )
        return {"1": 100.0, "4096": 50_000.0}

    monkeypatch.setattr(bt, "Broker", FakeBroker)
    monkeypatch.setattr(bw, "BenchWorker", FakeWorker)
    monkeypatch.setattr(bt, "create_topics", lambda *a, **k: None)
    monkeypatch.setattr(bt, "produce", lambda *a, **k: None)
    monkeypatch.setattr(bt, "encode_events", lambda events: [])
    monkeypatch.setattr(bc, "passthrough_events_per_s", passthrough)
    monkeypatch.setattr(bw, "drain", drain)
    monkeypatch.setattr(bl, "latency_ms", latency)
    monkeypatch.setattr(bl, "visible_latency_ms", visible)
    monkeypatch.setattr(bw, "restore_seconds", restore)
    monkeypatch.setattr(bw, "ready_rss_mib", no_state)
    monkeypatch.setattr(runner, "_cores", lambda: 2)
    monkeypatch.setattr(runner, "_prepare", prepare)
    monkeypatch.setattr(runner, "_cuda", lambda: False)
    monkeypatch.setattr(
        bm, "rocksdb_bytes_per_user", lambda ckpt, n, d: {"users": n, "bytes_per_user": 300.0}
    )
    monkeypatch.setattr(bm, "step_events_per_s", step)
    monkeypatch.setattr(bm, "large_catalog", lambda: (large, []))
    monkeypatch.setattr(
        bm,
        "incremental_speedup",
        lambda ckpt, events, min_s: {"10": {"step_us": 10.0, "recompute_us": 100.0, "ratio": 10.0}},
    )
    monkeypatch.setattr(
        bm,
        "train_events_per_s",
        lambda events: {"events_per_s": 1000.0, "n_train_events": 8, "threads": 1, "device": "cpu"},
    )
    return Fakes


def bench(tmp_path: Path, plan: BenchPlan = TINY, settings: Settings | None = None) -> tuple[dict, dict, str]:
    out, md = tmp_path / "bench.json", tmp_path / "BENCHMARKS.md"
    md.write_text(f"# Benchmarks\n\nkept\n\n{BEGIN_MARK}\nold\n{END_MARK}\n")
    returned = run_bench(settings or Settings(), out=out, markdown=md, plan=plan, kafka_port=49592)
    return returned, json.loads(out.read_text()), md.read_text()


def test_a_clean_run_records_no_failure(fakes, tmp_path):
    _, r, text = bench(tmp_path)
    assert r["failed"] == [] and r["skipped"] == []
    assert list(r)[: len(BENCH_KEYS)] == list(BENCH_KEYS)
    assert r["ratio"]["runs"] == pytest.approx([0.1, 0.2, 0.3])  # pipeline / the faster copy, 80k
    assert r["detail"]["passthrough"]["faster"] == ["fastest_copy"] * 3
    assert fakes.latency_on == ["{}-2".format(FakeWorker.started[3].tag.rsplit("-", 1)[0])] * 3
    assert all(w.stopped for w in FakeWorker.started) and FakeBroker.instances[0].stopped
    assert "Failed parts" not in text and "failed:" not in text and "kept" in text


def test_exactly_once_latency_is_what_a_read_committed_consumer_sees_at_a_quarter_load(fakes, tmp_path):
    _, r, text = bench(tmp_path)
    # one fresh exactly-once worker on an input topic of its own, after the rounds, at 25 % of the
    # pipeline's median maximum (rounds of 8k, 16k, 24k events/s), and stopped
    [(tag, guarantee, topic, rate)] = fakes.visible_on
    assert tag.endswith("-eo-latency") and guarantee == "exactly_once" and topic == f"bench-input-{tag}"
    assert rate == pytest.approx(0.25 * 16_000.0)
    assert [w for w in FakeWorker.started if w.tag == tag][0].stopped
    x = r["detail"]["exactly_once_latency"]
    assert x["load"] == 0.25 and x["p99"] == 150.0 and x["isolation_level"] == "read_committed"
    assert "| 25% of pipeline max | 4,000 | 4,000 (100 % of target) | 80.00 | 120 | 150 | 100 |" in text
    assert "Every event's signal arrived, each once." in text


def test_a_failed_exactly_once_latency_is_recorded_and_the_rest_measured(fakes, tmp_path):
    fakes.fail = {"visible": TimeoutError("worker not ready after 600 s")}
    _, r, text = bench(tmp_path)
    assert r["failed"] == [
        {"part": "exactly_once latency 25%", "error": "TimeoutError: worker not ready after 600 s"}
    ]
    assert r["detail"]["exactly_once_latency"] is None and r["restore_seconds_per_million_users"]
    assert all(w.stopped for w in FakeWorker.started)
    assert "| 25% of pipeline max | failed: TimeoutError: worker not ready after 600 s |" in text


def test_every_worker_runs_the_settings_inference_and_the_step_is_measured_both_ways(fakes, tmp_path):
    _, r, text = bench(tmp_path, settings=Settings(inference="compiled"))
    assert FakeWorker.started and all(w.inference == "compiled" for w in FakeWorker.started)
    assert r["detail"]["worker_inference"] == "compiled" and "inference compiled" in text
    assert set(r["step_events_per_s"]) == {"cpu", "cpu compiled", "cpu large catalog"}
    assert "| batch | cpu | cpu compiled | cpu large catalog |" in text
    assert r["detail"]["step_large_catalog_categories"] == 4321 and "a model of 4,321 categories" in text


def test_a_failed_large_catalog_step_is_recorded_and_the_other_columns_kept(fakes, tmp_path):
    fakes.fail = {"step large catalog": MemoryError()}
    _, r, text = bench(tmp_path)
    assert [f["part"] for f in r["failed"]] == ["step cpu large catalog"]
    assert r["step_events_per_s"]["cpu large catalog"] is None and r["step_events_per_s"]["cpu"]
    assert "cpu large catalog: failed: MemoryError" in text and "a model of" not in text


def test_an_uncounted_exactly_once_drain_warms_the_broker_up_first(fakes, tmp_path):
    _, r, _ = bench(tmp_path)
    first = FakeWorker.started[0]
    assert first.tag.endswith("-warmup-0") and first.guarantee == "exactly_once" and first.stopped
    assert fakes.fed["warmup-0"] == (FakeWorker.started[3].input_topic, None)  # the rounds' input
    assert r["detail"]["warm_up"] == {"guarantee": "exactly_once", "events_per_s": 7_200.0}
    # its figure is in no median: exactly-once drains are the three rounds' own
    assert r["exactly_once_events_per_s"]["runs"] == [7_200.0, 14_400.0, 21_600.0]


def test_a_failed_warm_up_is_recorded_and_every_round_still_measured(fakes, tmp_path):
    fakes.fail = {"drain warmup-0": RuntimeError("worker exited with 1 after 0 of 10 records")}
    _, r, text = bench(tmp_path)
    assert r["failed"] == [
        {"part": "warm-up", "error": "RuntimeError: worker exited with 1 after 0 of 10 records"}
    ]
    assert r["skipped"] == [] and r["detail"]["warm_up"] is None
    assert len(r["pipeline_events_per_s"]["runs"]) == 3 and FakeWorker.started[0].stopped
    assert "`warm-up` failed: RuntimeError" in text


def test_a_failed_broker_skips_the_kafka_parts_but_not_the_model(fakes, tmp_path):
    FakeBroker.fail_wait = RuntimeError("bench broker not up after 600 s")
    returned, r, text = bench(tmp_path)

    assert (
        returned["failed"]
        == r["failed"]
        == [{"part": "broker start", "error": "RuntimeError: bench broker not up after 600 s"}]
    )
    assert [s["part"] for s in r["skipped"]] == [
        "warm-up",
        *(f"{kind}round {i}" for i in (1, 2, 3) for kind in ("processes ", "exactly_once ", "")),
        "latency 25%",
        "latency 50%",
        "latency 75%",
        "exactly_once latency 25%",
        "memory no state",
        "restore",
        "latency plot",
    ]
    assert all("broker start failed" in s["reason"] for s in r["skipped"][:-1])
    assert r["skipped"][-1]["reason"] == "no latency level was measured"
    assert r["pipeline_processes_events_per_s"] is None and r["exactly_once_cost"] is None
    assert r["memory_mib"] is None and r["latency_plot"] is None
    assert set(BENCH_KEYS) <= set(r)
    assert r["passthrough_events_per_s"] is None and r["ratio"] is None
    assert r["step_events_per_s"]["cpu"]["4096"] == 50_000.0 and r["train_events_per_s"] == 1000.0
    assert FakeBroker.instances[0].stopped
    assert "failed: RuntimeError: bench broker not up" in text
    assert "not measured: broker start failed" in text
    assert "### Failed parts" in text and "50,000" in text


def test_a_failed_round_is_left_out_of_the_medians(fakes, tmp_path):
    fakes.fail = {"drain 1": TimeoutError("9 of 10 records after 900 s")}
    _, r, text = bench(tmp_path)

    assert r["failed"] == [{"part": "round 2", "error": "TimeoutError: 9 of 10 records after 900 s"}]
    assert r["skipped"] == []
    assert r["pipeline_events_per_s"]["runs"] == [8_000.0, 24_000.0]
    assert [x["round"] for x in r["detail"]["rounds"]] == [1, 3]
    assert r["detail"]["restore"]["baseline_startup_seconds"] == 6.0  # median of rounds 1 and 3
    assert all(w.stopped for w in FakeWorker.started)  # the failed round's worker too
    assert "`round 2` failed: TimeoutError" in text


def test_latency_needs_the_last_round_s_worker(fakes, tmp_path):
    fakes.fail = {"drain 2": RuntimeError("worker exited with 1 after 0 of 10 records")}
    _, r, text = bench(tmp_path)

    assert [f["part"] for f in r["failed"]] == ["round 3"]
    assert [s["part"] for s in r["skipped"]] == ["latency 25%", "latency 50%", "latency 75%", "latency plot"]
    assert "round 3 failed" in r["skipped"][0]["reason"]
    assert r["latency_ms"] == {"25%": None, "50%": None, "75%": None}
    assert r["restore_seconds_per_million_users"] is not None
    assert "not measured: needs the last round's warm worker" in text


def test_every_failed_model_part_and_a_failed_latency_still_write_both_files(fakes, tmp_path):
    fakes.fail = {"latency": OSError("connection reset"), "step": ValueError("bad batch")}
    _, r, text = bench(tmp_path)

    assert [f["part"] for f in r["failed"]] == ["latency 25%", "latency 50%", "latency 75%", "step cpu"]
    assert [s["part"] for s in r["skipped"]] == ["latency plot"]
    # the compiled column is a part of its own: measured although the eager one failed
    assert r["step_events_per_s"] == {
        "cpu": None,
        "cpu compiled": {"1": 100.0, "4096": 50_000.0},
        "cpu large catalog": {"1": 100.0, "4096": 50_000.0},
    }
    assert "cpu: failed: ValueError: bad batch" in text
    assert text.count("failed: OSError: connection reset") >= 3


def test_ctrl_c_in_a_round_stops_the_bench_and_its_broker(fakes, tmp_path):
    fakes.fail = {"drain 0": KeyboardInterrupt()}
    with pytest.raises(KeyboardInterrupt):
        bench(tmp_path)
    assert FakeBroker.instances[0].stopped and FakeWorker.started[0].stopped
    assert not (tmp_path / "bench.json").exists()


def test_no_data_skips_everything_that_needs_it(fakes, tmp_path):
    fakes.fail = {"data": MemoryError()}
    _, r, text = bench(tmp_path)

    assert [f["part"] for f in r["failed"]] == ["data"]
    assert {s["part"] for s in r["skipped"]} >= {"state on disk", "round 1", "restore", "step", "train"}
    assert r["state_bytes_per_user"] is None and r["machine"]["cores"] > 0
    assert "not measured: data failed: MemoryError" in text


# -- Markdown -------------------------------------------------------------------------------------


# -- command line ---------------------------------------------------------------------------------


@pytest.mark.parametrize("failed", [[], [{"part": "round 2", "error": "TimeoutError: slow"}]])
def test_the_bench_command_exits_1_with_one_line_per_failed_part(monkeypatch, capsys, tmp_path, failed):
    seen = {}

    def fake_run_bench(settings, out, quick, markdown):
        seen.update(out=out, quick=quick)
        return {"failed": failed}

    monkeypatch.setattr(runner, "run_bench", fake_run_bench)
    rc = cli.main(["bench", "--quick", "--out", str(tmp_path / "b.json")])
    assert seen == {"out": str(tmp_path / "b.json"), "quick": True}
    err = capsys.readouterr().err
    if failed:
        assert rc == runner.EXIT_PARTS_FAILED == 1
        assert err == "demandstream bench: round 2 failed: TimeoutError: slow\n"
    else:
        assert rc == 0 and err == ""


# -- issue #14: all cores, exactly-once, memory, latency curve ------------------------------------


def test_a_clean_run_measures_all_cores_exactly_once_memory_and_the_curve(fakes, tmp_path):
    _, r, text = bench(tmp_path)

    keys = list(r)
    assert keys[: len(BENCH_KEYS)] == list(BENCH_KEYS)
    assert keys[len(BENCH_KEYS) : len(BENCH_KEYS) + len(SCALING_KEYS)] == list(SCALING_KEYS)
    # --processes 2 (the fake machine's cores), paired with the same round's faster copy (80k)
    assert r["pipeline_processes_events_per_s"]["runs"] == [15_000.0, 30_000.0, 45_000.0]
    assert r["ratio_processes"]["runs"] == pytest.approx([0.1875, 0.375, 0.5625])
    assert r["detail"]["processes"] == 2
    assert r["detail"]["processes_speedup"]["median"] == pytest.approx(1.875)
    # after the warm-up (started[0]), each round: --processes 2, exactly-once, the round's own worker
    assert [w.processes for w in FakeWorker.started[1:4]] == [2, 1, 1]
    assert [w.guarantee for w in FakeWorker.started[1:4]] == [
        "at_least_once",
        "exactly_once",
        "at_least_once",
    ]
    # --processes gets an input topic of its own, fed from the round's once every process is ready
    src = FakeWorker.started[3].input_topic
    assert fakes.fed["procs2-0"] == (f"bench-feed-{FakeWorker.started[1].tag}", src)
    assert fakes.fed["eo-0"] == fakes.fed["0"] == (src, None)
    # exactly-once: 1 - median(eo) / median(alo) = 1 - 14,400 / 16,000; to the last committed: 12,000
    assert r["exactly_once_cost"] == pytest.approx(0.1)
    assert r["detail"]["exactly_once_committed_cost"] == pytest.approx(0.25)
    m = r["memory_mib"]
    assert m["pipeline_per_process"]["runs"] == [300.0] * 3
    assert m["processes_per_process"]["runs"] == [260.0] * 3  # the children's mean, not the supervisor
    assert r["detail"]["processes_rounds"][0]["supervisor_rss_mib"] == 40.0
    assert m["no_state"] == 200.0 and m["restored_users"] == 10
    assert m["per_100k_users"] == pytest.approx(40.0)
    # the latency curve next to the JSON, named in the Markdown
    png = tmp_path / "bench-latency.png"
    assert r["latency_plot"] == str(png) and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "`bench-latency.png`" in text
    assert "**0.375** with all 2 cores (`--processes 2`" in text and "0.200 with 1 process" in text
    assert "exactly-once costs 10.0 % of at-least-once throughput" in text
    assert (
        "read_committed consumer (the last transaction's commit included): 12,000 events/s, a cost of 25.0 %"
        in text
    )
    assert "| per 100,000 users | 40.0 MiB per 100,000 users" in text
    assert all(w.stopped for w in FakeWorker.started)


def test_a_failed_all_cores_drain_is_recorded_and_the_rest_still_measured(fakes, tmp_path):
    fakes.fail = {"drain procs2-1": RuntimeError("worker exited with 1 after 3 of 10 records")}
    _, r, text = bench(tmp_path)

    assert r["failed"] == [
        {"part": "processes round 2", "error": "RuntimeError: worker exited with 1 after 3 of 10 records"}
    ]
    assert r["pipeline_processes_events_per_s"]["runs"] == [15_000.0, 45_000.0]
    assert r["ratio_processes"]["runs"] == pytest.approx([0.1875, 0.5625])
    assert r["pipeline_events_per_s"]["runs"] == [8_000.0, 16_000.0, 24_000.0]  # its round still ran
    assert r["exactly_once_cost"] == pytest.approx(0.1)
    assert "`processes round 2` failed: RuntimeError" in text
    assert all(w.stopped for w in FakeWorker.started)


def test_failed_exactly_once_drains_and_memory_baseline_read_failed_in_place(fakes, tmp_path):
    fakes.fail = {f"drain eo-{i}": TimeoutError("9 of 10 committed records") for i in range(3)}
    fakes.fail["no state"] = OSError("no /proc")
    _, r, text = bench(tmp_path)

    assert [f["part"] for f in r["failed"]] == [
        "exactly_once round 1",
        "exactly_once round 2",
        "exactly_once round 3",
        "memory no state",
    ]
    assert r["exactly_once_events_per_s"] is None and r["exactly_once_cost"] is None
    assert r["memory_mib"]["per_100k_users"] is None and r["memory_mib"]["restored"] is not None
    assert "exactly-once's cost against at-least-once: failed: TimeoutError: 9 of 10 committed" in text
    assert "| worker with no state (ready on empty topics) | failed: OSError: no /proc |" in text
    assert "| per 100,000 users | failed: OSError: no /proc |" in text


def test_one_core_skips_the_all_cores_drain_with_its_reason(fakes, tmp_path, monkeypatch):
    monkeypatch.setattr(runner, "_cores", lambda: 1)
    _, r, text = bench(tmp_path)

    assert r["failed"] == []
    assert [s["part"] for s in r["skipped"]] == [
        "processes round 1",
        "processes round 2",
        "processes round 3",
    ]
    assert "os.cpu_count() is 1" in r["skipped"][0]["reason"]
    assert r["pipeline_processes_events_per_s"] is None and r["ratio_processes"] is None
    assert all(w.processes == 1 for w in FakeWorker.started)
    assert "all 1 cores: not measured: os.cpu_count() is 1" in text and "0.200 with 1 process" in text


def test_a_level_below_95_percent_of_its_target_is_flagged(fakes, tmp_path):
    fakes.achieved_share = 0.9
    _, r, text = bench(tmp_path)

    level = r["latency_ms"]["50%"]
    assert level["below_target"] and level["achieved_share"] == pytest.approx(0.9)
    assert level["target_events_per_s"] == level["rate_events_per_s"] == 8_000.0
    assert "| 50% of pipeline max | 8,000 | 7,200 (90 % of target; below 95 %) |" in text
    assert "fell below 95 % of its target at 25%, 50%, 75%" in text


def test_scaling_pairs_each_drain_with_its_own_round():
    rounds = [
        {"round": 1, "perf_anchors": 60.0, "fastest_copy": 100.0, "pipeline": 10.0},
        {"round": 3, "perf_anchors": 80.0, "fastest_copy": 50.0, "pipeline": 20.0},
    ]
    procs = [
        {"round": 1, "events_per_s": 19.0},
        {"round": 2, "events_per_s": 30.0},  # its round failed: no passthrough to divide by
        {"round": 3, "events_per_s": 36.0},
    ]
    eo = [{"round": 1, "events_per_s": 9.0}, {"round": 2, "events_per_s": 12.0}]
    s = scaling(rounds, procs, eo)
    assert s["pipeline_processes_events_per_s"]["runs"] == [19.0, 30.0, 36.0]
    assert s["ratio_processes"]["runs"] == pytest.approx([0.19, 0.45])
    assert s["processes_speedup"]["runs"] == pytest.approx([1.9, 1.8])
    # medians: eo 10.5, at-least-once 15
    assert s["exactly_once_cost"] == pytest.approx(0.3)
    # round by round: only round 1 has both drains (1 - 9 / 10); round 2's pipeline failed
    assert s["exactly_once_cost_pairs"]["runs"] == pytest.approx([0.1])
    assert exactly_once_cost(11_000.0, 10_000.0) == pytest.approx(-0.1)  # faster: a negative cost


def test_exactly_once_cost_round_by_round_is_reported_beside_the_medians_and_says_when_they_disagree():
    """A slow at-least-once round pulls the medians' pairing apart (the 16:19 run: 16.5 % by the medians,
    9.1 % by the rounds); the Markdown gives both readings and says when their verdicts differ."""
    rounds = [
        {"round": i, "perf_anchors": 50.0, "fastest_copy": 100.0, "pipeline": alo}
        for i, alo in ((1, 18_693.0), (2, 18_623.0), (3, 14_861.0))
    ]
    eo = [{"round": i, "events_per_s": v} for i, v in ((1, 15_548.0), (2, 16_936.0), (3, 15_235.0))]
    s = scaling(rounds, [], eo)
    assert s["exactly_once_cost"] == pytest.approx(1 - 15_548.0 / 18_623.0)
    assert s["exactly_once_cost_pairs"]["median"] == pytest.approx(1 - 16_936.0 / 18_623.0)
    assert s["exactly_once_cost_pairs"]["min"] < 0  # round 3's exactly-once drain was the faster one
    r = {
        "exactly_once_cost": s["exactly_once_cost"],
        "exactly_once_events_per_s": s["exactly_once_events_per_s"],
        "pipeline_events_per_s": {"median": 18_623.0},
        "detail": {"exactly_once_cost_pairs": s["exactly_once_cost_pairs"]},
    }
    line = exactly_once_line(r)
    assert "medians, 1 process; target ≤ 10 %: missed)." in line
    assert "16.8 · 9.1 · -2.5 %, median 9.1 %, target met: the two readings disagree" in line
    r["detail"]["exactly_once_cost_pairs"] = summary([0.2, 0.17, 0.15])
    assert "target missed, as by the medians." in exactly_once_line(r)


def test_scaling_without_drains_or_rounds_is_none():
    assert all(v is None for v in scaling([], [], []).values())
    only_eo = scaling([], [], [{"round": 1, "events_per_s": 9.0}])
    assert only_eo["exactly_once_events_per_s"]["median"] == 9.0 and only_eo["exactly_once_cost"] is None


def test_memory_arithmetic():
    assert per_users_mib(400.0 + 12.5, 400.0, 25_000) == pytest.approx(50.0)
    assert per_users_mib(600.0, 400.0, 1_000_000, per=1_000_000) == pytest.approx(200.0)
    m = memory(
        [{"rss_mib": [300.0]}, {"rss_mib": [320.0]}, {"rss_mib": []}],
        [{"rss_mib": [200.0, 240.0]}],
        [],
        None,
        {"rss_mib": 450.0, "records": 1000},
    )
    assert m["pipeline_per_process"]["runs"] == [300.0, 320.0]
    assert m["processes_per_process"]["median"] == 220.0
    assert m["exactly_once_per_process"] is None
    assert m["restored"] == 450.0 and m["no_state"] is None and m["per_100k_users"] is None


def test_the_latency_plot_goes_next_to_the_json():
    assert runner.latency_plot_path(Path("out/b.json"), None) == Path("out/b-latency.png")
    assert runner.latency_plot_path(None, Path("docs/BENCHMARKS.md")) == Path("docs/bench-latency.png")
    assert runner.latency_plot_path(None, None) is None
