"""``demandstream bench`` never dies half-way (#14 item 2) and divides by the faster anchor (#14 item 1).

No broker here: the broker, the Kafka measurements and the model figures are replaced by fakes, so
these tests check the bench's bookkeeping (which part ran, failed or was skipped, what reached the JSON,
the Markdown and the exit status), not speed. tests/integration/test_bench_smoke.py runs the real thing.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from demandstream.stream import cli
from demandstream.stream.bench import kafka as bk
from demandstream.stream.bench import model as bm
from demandstream.stream.bench import runner
from demandstream.stream.bench.runner import (
    BEGIN_MARK,
    BENCH_KEYS,
    END_MARK,
    BenchPlan,
    Parts,
    render_markdown,
    run_bench,
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
    assert set(methods) == set(bk.PASSTHROUGH_METHODS)
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

    def __init__(self, bootstrap, model, tag, workdir, input_topic, device="cpu"):
        self.tag, self.stopped = tag, False
        FakeWorker.started.append(self)

    def stop(self):
        self.stopped = True


@pytest.fixture
def fakes(monkeypatch):
    """Every measurement replaced; ``fakes.fail`` names the parts that raise."""

    class Fakes:
        fail: dict[str, BaseException] = {}
        latency_on: list[str] = []

    FakeBroker.fail_wait, FakeBroker.instances, FakeWorker.started = None, [], []

    def maybe_fail(name: str):
        if name in Fakes.fail:
            raise Fakes.fail[name]

    def prepare(plan, settings, work):
        maybe_fail("data")
        return runner._Data([FakeEvent() for _ in range(plan.events)], object(), work / "m.pt", b"s" * 100)

    def passthrough(method, bootstrap, src, sink, n):
        return {"perf_anchors": 60_000.0, "fastest_copy": 80_000.0}[method]

    def drain(worker, n):
        maybe_fail(f"drain {worker.tag.rsplit('-', 1)[1]}")
        i = int(worker.tag.rsplit("-", 1)[1])
        return bk.DrainResult(events_per_s=8_000.0 * (i + 1), startup_s=5.0 + i, drain_s=1.0)

    def latency(worker, templates, rate, duration, tag):
        maybe_fail("latency")
        Fakes.latency_on.append(worker.tag)
        return {"p50": 5.0, "p95": 9.0, "p99": 12.0, "rate_events_per_s": rate, "n": 100}

    def restore(worker, record, n, baseline):
        return {
            "records": n,
            "startup_seconds": baseline + 2.0,
            "baseline_startup_seconds": baseline,
            "restore_seconds": 2.0,
            "seconds_per_million_users": 2.0e6 / n,
        }

    def step(ckpt, events, device, min_s):
        maybe_fail("step")
        return {"1": 100.0, "4096": 50_000.0}

    monkeypatch.setattr(bk, "Broker", FakeBroker)
    monkeypatch.setattr(bk, "BenchWorker", FakeWorker)
    monkeypatch.setattr(bk, "create_topics", lambda *a, **k: None)
    monkeypatch.setattr(bk, "produce", lambda *a, **k: None)
    monkeypatch.setattr(bk, "encode_events", lambda events: [])
    monkeypatch.setattr(bk, "passthrough_events_per_s", passthrough)
    monkeypatch.setattr(bk, "drain", drain)
    monkeypatch.setattr(bk, "latency_ms", latency)
    monkeypatch.setattr(bk, "restore_seconds", restore)
    monkeypatch.setattr(runner, "_prepare", prepare)
    monkeypatch.setattr(runner, "_cuda", lambda: False)
    monkeypatch.setattr(
        bm, "rocksdb_bytes_per_user", lambda ckpt, n, d: {"users": n, "bytes_per_user": 300.0}
    )
    monkeypatch.setattr(bm, "step_events_per_s", step)
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


def bench(tmp_path: Path, plan: BenchPlan = TINY) -> tuple[dict, dict, str]:
    out, md = tmp_path / "bench.json", tmp_path / "BENCHMARKS.md"
    md.write_text(f"# Benchmarks\n\nkept\n\n{BEGIN_MARK}\nold\n{END_MARK}\n")
    returned = run_bench(Settings(), out=out, markdown=md, plan=plan, kafka_port=49592)
    return returned, json.loads(out.read_text()), md.read_text()


def test_a_clean_run_records_no_failure(fakes, tmp_path):
    _, r, text = bench(tmp_path)
    assert r["failed"] == [] and r["skipped"] == []
    assert list(r)[: len(BENCH_KEYS)] == list(BENCH_KEYS)
    assert r["ratio"]["runs"] == pytest.approx([0.1, 0.2, 0.3])  # pipeline / the faster copy, 80k
    assert r["detail"]["passthrough"]["faster"] == ["fastest_copy"] * 3
    assert fakes.latency_on == ["{}-2".format(FakeWorker.started[2].tag.rsplit("-", 1)[0])] * 3
    assert all(w.stopped for w in FakeWorker.started) and FakeBroker.instances[0].stopped
    assert "Failed parts" not in text and "failed:" not in text and "kept" in text


def test_a_failed_broker_skips_the_kafka_parts_but_not_the_model(fakes, tmp_path):
    FakeBroker.fail_wait = RuntimeError("bench broker not up after 600 s")
    returned, r, text = bench(tmp_path)

    assert (
        returned["failed"]
        == r["failed"]
        == [{"part": "broker start", "error": "RuntimeError: bench broker not up after 600 s"}]
    )
    assert [s["part"] for s in r["skipped"]] == [
        "round 1",
        "round 2",
        "round 3",
        "latency 25%",
        "latency 50%",
        "latency 75%",
        "restore",
    ]
    assert all("broker start failed" in s["reason"] for s in r["skipped"])
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
    assert [s["part"] for s in r["skipped"]] == ["latency 25%", "latency 50%", "latency 75%"]
    assert "round 3 failed" in r["skipped"][0]["reason"]
    assert r["latency_ms"] == {"25%": None, "50%": None, "75%": None}
    assert r["restore_seconds_per_million_users"] is not None
    assert "not measured: needs the last round's warm worker" in text


def test_every_failed_model_part_and_a_failed_latency_still_write_both_files(fakes, tmp_path):
    fakes.fail = {"latency": OSError("connection reset"), "step": ValueError("bad batch")}
    _, r, text = bench(tmp_path)

    assert [f["part"] for f in r["failed"]] == ["latency 25%", "latency 50%", "latency 75%", "step cpu"]
    assert r["step_events_per_s"] == {"cpu": None}
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
