"""Category demand end to end: two workers on the real broker, a known log replayed, and the
``category-demand`` topic, ``GET /categories/demand`` on each worker and ``demandstream tail`` checked
against the same aggregates computed offline (docs/ARCHITECTURE.md §Category demand).

Each worker aggregates the partitions it owns; every worker's view merges all of them, so both
workers must answer the same numbers, equal to the offline sum over partitions.
"""

from __future__ import annotations

import subprocess
import sys
import urllib.error
import urllib.request

import orjson
import pytest

from demandstream.model.core.checkpoint import load
from demandstream.model.core.events import Event, parse_event
from demandstream.model.core.scoring import Scorer
from demandstream.model.data.synth import generate, write_jsonl
from demandstream.stream.engine.demand import ScoredEvent, reference_rows
from demandstream.stream.settings import Settings
from demandstream.stream.tools.replay import replay
from tests.conftest import REPO
from tests.integration.faults import TopicReader, wait_until

pytestmark = [pytest.mark.kafka, pytest.mark.slow, pytest.mark.timeout(300)]

N_USERS, N_EVENTS, SEED = 150, 2500, 21
#: The generator spreads its events over 30 days: three-day windows give about ten of them.
WINDOW_S, LATENESS_S = 3 * 86400, 86400
#: Events far past the log, one per flush user, so every partition's watermark closes every window of it.
N_FLUSH_USERS = 24
TOKEN = "category-demand-test-token-0123"
#: Float sums of predictions made in batches online and one at a time offline (|Δp| ≤ 1e-4 each).
TOL = 2e-3


def scored_log(model_path, records: list) -> list[ScoredEvent]:
    """Every input record with the prediction after it, computed offline user by user."""
    scorer = Scorer(load(model_path), "cpu")
    by_user: dict[str, list[tuple[Event, object]]] = {}
    for r in records:
        e = parse_event(r.value)
        by_user.setdefault(e.user_id, []).append((e, r))
    out = []
    for evs in by_user.values():
        evs.sort(key=lambda er: er[1].offset)
        state = scorer.new_state()
        for e, r in evs:
            (pred,) = scorer.step([e], [state])
            out.append(
                ScoredEvent(
                    r.partition,
                    r.offset,
                    e.user_id,
                    e.ts,
                    e.category,
                    e.type == "purchase",
                    pred.top_categories,
                    pred.purchase_propensity,
                )
            )
    return out


def get_json(port: int, path: str, token: str | None) -> tuple[int, dict]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status, orjson.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, orjson.loads(e.read() or b"{}")


def test_two_workers_aggregate_category_demand(
    worker_factory, stream_env, kafka_bootstrap, small_model, tmp_path
):
    env = {
        "DEMANDSTREAM_DEMAND_WINDOW_S": str(WINDOW_S),
        "DEMANDSTREAM_DEMAND_LATENESS_S": str(LATENESS_S),
        "DEMANDSTREAM_WEB_TOKEN": TOKEN,
        "DEMANDSTREAM_BATCH_MAX": "200",  # several batches per partition: windows close mid-stream
    }
    s = Settings.from_env(stream_env | env)
    events = list(generate(N_USERS, N_EVENTS, seed=SEED))
    end = max(e.ts for e in events) + 4 * WINDOW_S
    flush = [
        Event(f"flush-{i}", f"flush-user-{i}", end, "view", f"i{i}", "flush.category", 1.0)
        for i in range(N_FLUSH_USERS)
    ]
    data = tmp_path / "events.jsonl"
    write_jsonl(events + flush, data)

    workers = [worker_factory(**env).start() for _ in range(2)]
    for w in workers:
        w.wait_ready()
    replay(s, [data], "jsonl", progress=False)

    inputs = TopicReader(kafka_bootstrap, s.topic_input, isolation="read_uncommitted")
    try:
        records = inputs.read_until(lambda r: len(r) >= len(events) + len(flush), 60, idle_s=1)
    finally:
        inputs.close()
    assert len(records) == len(events) + len(flush)
    flush_parts = {r.partition for r in records if r.key.startswith(b"flush-user-")}
    assert flush_parts == set(range(s.partitions)), "a partition got no flush event: pick more flush users"

    ref = reference_rows(scored_log(small_model, records), WINDOW_S, LATENESS_S)
    closed = {(p, w): agg for (p, w), (agg, is_closed) in ref.items() if is_closed}
    windows = sorted({w for _p, w in closed})
    assert len(windows) >= 8 and all(w + WINDOW_S <= end - LATENESS_S for w in windows)

    # The topic: one record per partition, window and category, as computed offline.
    reader = TopicReader(kafka_bootstrap, s.topic_demand)

    def all_progress(recs) -> bool:
        prog = {}
        for r in recs:
            v = orjson.loads(r.value)
            if v["kind"] == "progress":
                prog[v["partition"]] = v["closed_until"]
        return len(prog) == s.partitions and min(prog.values()) >= windows[-1] + WINDOW_S

    try:
        recs = reader.read_until(all_progress, 120, idle_s=1)
    finally:
        reader.close()
    assert all_progress(recs), [w.log_tail() for w in workers]
    topic: dict[tuple, dict] = {}
    for r in recs:
        v = orjson.loads(r.value)
        if v["kind"] == "category":
            topic[(v["partition"], v["window_start"], v["category"])] = v
        elif v["kind"] == "window":
            topic[(v["partition"], v["window_start"], None)] = v
    expected_keys = {(p, w, c) for (p, w), agg in closed.items() for c in [*agg.cats, None]}
    assert set(topic) == expected_keys
    for (p, w), agg in closed.items():
        assert (topic[(p, w, None)]["users"], topic[(p, w, None)]["events"]) == (agg.users, agg.events)
        for c, (e, prop, obs, pur) in agg.cats.items():
            got = topic[(p, w, c)]
            assert (got["observed"], got["purchases"]) == (obs, pur), (p, w, c)
            assert got["expected"] == pytest.approx(e, abs=TOL) and got["propensity"] == pytest.approx(
                prop, abs=TOL
            )

    # The merged view, the same on both workers: the sum over partitions of the offline windows.
    assert get_json(workers[0].port, "/categories/demand", None)[0] == 401
    newest = windows[-1]
    for w in workers:
        wait_until(
            lambda w=w: get_json(w.port, "/categories/demand", TOKEN)[1].get("window_start") == newest,
            30,
            "the worker's view to reach the newest closed window",
        )
    for start in (windows[0], windows[len(windows) // 2], newest):
        merged: dict[str, list[float]] = {}
        for (_p, w), agg in closed.items():
            if w == start:
                for c, row in agg.cats.items():
                    m = merged.setdefault(c, [0.0, 0.0, 0, 0])
                    for i in range(4):
                        m[i] += row[i]
        users = sum(agg.users for (_p, w), agg in closed.items() if w == start)
        views = [get_json(w.port, f"/categories/demand?top=1000&window={start}", TOKEN) for w in workers]
        for status, v in views:
            assert status == 200, v
            assert (v["complete"], v["partitions_reported"], v["users"]) == (True, s.partitions, users)
            got = {c["category"]: c for c in v["categories"]}
            assert set(got) == set(merged)
            for c, (e, prop, obs, pur) in merged.items():
                assert (got[c]["observed"], got[c]["purchases"]) == (obs, pur)
                assert got[c]["expected"] == pytest.approx(e, abs=TOL)
                assert got[c]["propensity"] == pytest.approx(prop, abs=TOL)
            assert [c["expected"] for c in v["categories"]] == sorted(
                (c["expected"] for c in v["categories"]), reverse=True
            )
        assert views[0][1]["categories"] == views[1][1]["categories"]
        views_newest = views[0][1]
    status, top3 = get_json(workers[1].port, "/categories/demand?top=3", TOKEN)
    assert status == 200 and len(top3["categories"]) == 3 and top3["window_start"] == newest
    assert get_json(workers[1].port, "/categories/demand?top=x", TOKEN)[0] == 400
    # hostile queries: out of range, empty, control characters, an absurd window; never a 500
    for query in ("top=0", "top=-3", "top=100000", "top=", "window=%00", "window=1e9", "top=3%00"):
        assert get_json(workers[1].port, f"/categories/demand?{query}", TOKEN)[0] == 400, query
    assert get_json(workers[1].port, "/categories/demand?window=99999999999999999999", TOKEN)[0] == 400
    status, unknown = get_json(workers[1].port, "/categories/demand?window=1", TOKEN)  # no such window
    assert status == 200 and unknown["categories"] == []

    # `demandstream tail --topic category-demand` prints one table per closed window.
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "demandstream.stream",
            "tail",
            "--topic",
            s.topic_demand,
            "--from-beginning",
            "--timeout",
            "8",
        ],
        env=stream_env | env,
        cwd=REPO,
        capture_output=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr.decode()
    out = proc.stdout.decode()
    complete_headers = [ln for ln in out.splitlines() if ln.startswith("window ") and "incomplete" not in ln]
    assert len(complete_headers) == len(windows), out[-2000:]
    assert f"{s.partitions}/{s.partitions} partitions" in complete_headers[-1]
    first = views_newest["categories"][0]["category"]
    assert out.split(complete_headers[-1])[1].splitlines()[2].startswith(first[:35])
    for w in workers:
        assert w.proc.poll() is None, w.log_tail()
        # each worker aggregated partitions of its own: the views merged two workers' records
        assert w.metric("demandstream_events_total", result="valid") > 0
