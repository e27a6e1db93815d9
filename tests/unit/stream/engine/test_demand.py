"""Category demand (stream/engine/demand.py): hand-computed numbers on a tiny log, the incremental
aggregator against the offline definition under any cut into batches and redeliveries, and the merge."""

from __future__ import annotations

import itertools
import math
import random
from dataclasses import dataclass

import orjson
import pytest

from demandstream.stream.engine.demand import (
    NO_CATEGORY,
    Applied,
    DemandAggregator,
    DemandBoard,
    PartitionAggregate,
    Prev,
    Rising,
    ScoredEvent,
    reference_rows,
)


@dataclass
class Ev:
    ts: float
    category: str | None
    type: str


@dataclass
class Pred:
    top_categories: list
    purchase_propensity: float


def scored(p, o, user, ts, cat, typ, top, prop) -> ScoredEvent:
    return ScoredEvent(p, o, user, ts, cat, typ == "purchase", top, prop)


# offset, user, ts, category, type, prediction after the event (top, propensity)
TINY = [
    (0, "a", 10.0, "x", "view", [("x", 0.6), ("y", 0.2)], 0.1),
    (1, "b", 20.0, "y", "view", [("y", 0.5)], 0.4),
    (2, "a", 50.0, "x", "add_to_cart", [("x", 0.8), ("y", 0.2)], 0.5),
    (3, "b", 120.0, "y", "purchase", [("z", 1.0)], 0.2),  # closes window [0, 100): watermark 120
    (4, "a", 90.0, "y", "view", [("y", 0.9)], 0.3),  # a's clock 90: window [0, 100), closed: late
]


class Users:
    """What the engine and the table do for the aggregator: each user's previous event, per partition."""

    def __init__(self):
        self.prev: dict[str, Prev] = {}

    def batch(self, p: int, rows) -> list[Applied]:
        by_user: dict[str, list] = {}
        for r in rows:
            by_user.setdefault(r.user, []).append(r)
        out = []
        for u, evs in by_user.items():
            out.append(
                Applied(
                    self.prev.get(u),
                    p,
                    [Ev(e.ts, e.category, "purchase" if e.purchase else "view") for e in evs],
                    [e.offset for e in evs],
                    [Pred(e.top, e.propensity) for e in evs],
                )
            )
            clock = max([e.ts for e in evs] + ([self.prev[u].clock] if u in self.prev else []))
            self.prev[u] = Prev(clock, evs[-1].top, evs[-1].propensity, evs[-1].offset)
        return out


def run_stream(events: list[ScoredEvent], cuts: list[int], window_s: int, lateness_s: float, redeliver=()):
    """Feed ``events`` (one partition, offset order) in batches ending at ``cuts``; a batch index in
    ``redeliver`` is processed, its aggregate kept, its user states lost, and then processed again."""
    aggs: dict[int, PartitionAggregate] = {}
    users = Users()
    agg_ = DemandAggregator(window_s, lateness_s)
    emitted: list[dict] = []
    lo = 0
    for i, hi in enumerate([*cuts, len(events)]):
        rows = events[lo:hi]
        if not rows:
            continue
        if i in redeliver:
            saved = dict(users.prev)
            emitted += [
                orjson.loads(v) for recs in agg_.update(aggs, users.batch(0, rows)).values() for _k, v in recs
            ]
            users.prev = saved  # the states were not written: the engine applies the batch again
            # the aggregate went through the changelog and back
            aggs = {p: PartitionAggregate.decode(a.encode()) for p, a in aggs.items()}
        for recs in agg_.update(aggs, users.batch(0, rows)).values():
            emitted += [orjson.loads(v) for _k, v in recs]
        lo = hi
    return aggs.get(0), emitted


def tiny_events() -> list[ScoredEvent]:
    return [scored(0, o, u, ts, c, t, top, pr) for o, u, ts, c, t, top, pr in TINY]


def by_category(emitted: list[dict], start: int) -> dict[str, tuple]:
    return {
        r["category"]: (r["expected"], r["propensity"], r["observed"], r["purchases"])
        for r in emitted
        if r["kind"] == "category" and r["window_start"] == start
    }


@pytest.mark.parametrize(
    "cuts", [[], [1, 2, 3, 4], [2], [3]], ids=["one batch", "one per batch", "2+3", "3+2"]
)
def test_tiny_log_by_hand(cuts):
    agg, emitted = run_stream(tiny_events(), cuts, window_s=100, lateness_s=0)
    # Window [0, 100): users a (latest: after offset 2) and b (after offset 1); a's event at 90 is late.
    # expected x = 0.8 (a); y = 0.2 (a) + 0.5 (b)
    # propensity: a's 0.5 spread 0.8:0.2 over x, y -> 0.4, 0.1; b's 0.4 all on y -> y 0.5
    assert by_category(emitted, 0) == {
        "x": (pytest.approx(0.8), pytest.approx(0.4), 2, 0),
        "y": (pytest.approx(0.7), pytest.approx(0.5), 1, 0),
    }
    (summary,) = [r for r in emitted if r["kind"] == "window"]
    assert (summary["window_start"], summary["users"], summary["events"]) == (0, 2, 3)
    (progress,) = [r for r in emitted if r["kind"] == "progress"][-1:]
    assert progress["closed_until"] == 100  # its late_events count the late events before it: none
    # window [100, 200) is still open: b's purchase, b's prediction z 1.0 with propensity 0.2
    (w,) = agg.windows.values()
    assert (w.users, w.events) == (1, 1)
    assert w.cats == {"y": [0.0, 0.0, 1, 1], "z": [1.0, 0.2, 0, 0]}
    assert agg.late_events == 1 and agg.offset == 4


def test_tiny_log_matches_the_reference():
    ref = reference_rows(tiny_events(), 100, 0)
    (w0, closed0), (w1, closed1) = ref[(0, 0)], ref[(0, 100)]
    assert closed0 and not closed1
    assert (w0.users, w0.events, w1.users, w1.events) == (2, 3, 1, 1)
    assert w0.cats["x"] == pytest.approx([0.8, 0.4, 2, 0])
    assert w0.cats["y"] == pytest.approx([0.7, 0.5, 1, 0])


def test_a_user_returning_to_its_window_replaces_its_prediction():
    # u's two runs in one window, with v's event between them: still one user, the latest prediction
    ev = [
        scored(0, 0, "u", 1.0, "x", "view", [("x", 0.5)], 0.1),
        scored(0, 1, "v", 2.0, None, "search", [("y", 0.5)], 0.1),
        scored(0, 2, "u", 3.0, "x", "view", [("x", 0.9)], 0.3),
    ]
    for cuts in ([], [1], [2], [1, 2]):
        agg, _ = run_stream(ev, cuts, 100, 0)
        w = agg.windows[0]
        assert (w.users, w.events) == (2, 3)
        assert w.cats["x"] == pytest.approx([0.9, 0.3, 2, 0])
        assert w.cats[NO_CATEGORY][2] == 1


def random_log(rng: random.Random, n: int, users: int) -> list[ScoredEvent]:
    cats = ["a", "b", "c", "d", None]
    out, t = [], 0.0
    for o in range(n):
        t += rng.expovariate(1 / 7)
        ts = t - (rng.random() * 60 if rng.random() < 0.1 else 0.0)  # some out of order, some late
        top = [(c, rng.random() / 3) for c in rng.sample(cats[:4], 3)]
        typ = rng.choice(["view", "view", "add_to_cart", "purchase"])
        out.append(scored(0, o, f"u{rng.randrange(users)}", ts, rng.choice(cats), typ, top, rng.random()))
    return out


@pytest.mark.parametrize("seed", range(6))
def test_any_cut_and_redelivery_equals_the_reference(seed):
    rng = random.Random(seed)
    events = random_log(rng, 400, 15)
    window_s, lateness_s = 50, rng.choice([0.0, 10.0, 30.0])
    cuts = sorted(rng.sample(range(1, len(events)), 25))
    redeliver = set(rng.sample(range(len(cuts)), 5))
    agg, emitted = run_stream(events, cuts, window_s, lateness_s, redeliver=redeliver)
    ref = reference_rows(events, window_s, lateness_s)
    closed = {s for (_p, s), (_w, c) in ref.items() if c}
    assert {r["window_start"] for r in emitted if r["kind"] == "window"} == closed
    for (_p, s), (w, is_closed) in ref.items():
        if is_closed:
            got = by_category(emitted, s)
            assert set(got) == set(w.cats), s
            for c, r in w.cats.items():
                assert got[c] == pytest.approx(tuple(r), abs=1e-5), (s, c)
            (summary,) = [r for r in emitted if r["kind"] == "window" and r["window_start"] == s][-1:]
            assert (summary["users"], summary["events"]) == (w.users, w.events)
        else:
            mine = agg.windows[s]
            assert (mine.users, mine.events) == (w.users, w.events)
            for c, r in w.cats.items():
                assert mine.cats[c] == pytest.approx(r, abs=1e-9), (s, c)
    late = sum(1 for _ in events) - sum(w.events for w, _c in ref.values())
    assert agg.late_events == late


def test_aggregate_record_round_trip_and_other_formats():
    agg, _ = run_stream(tiny_events(), [], 100, 0)
    again = PartitionAggregate.decode(agg.encode())
    assert again == agg
    assert PartitionAggregate.decode(b"\x00not json") is None
    assert PartitionAggregate.decode(orjson.dumps({"format": 99})) is None
    fresh = PartitionAggregate()
    assert PartitionAggregate.decode(fresh.encode()).watermark == -math.inf


def window_rows(p: int, start: int, cats: dict[str, float], users: int = 1) -> list[dict]:
    rows = [
        {
            "kind": "category",
            "window_start": start,
            "window_end": start + 100,
            "partition": p,
            "category": c,
            "expected": e,
            "propensity": e / 10,
            "observed": 1,
            "purchases": 0,
        }
        for c, e in cats.items()
    ]
    rows.append(
        {
            "kind": "window",
            "window_start": start,
            "window_end": start + 100,
            "partition": p,
            "users": users,
            "events": len(cats),
        }
    )
    return rows


def progress(p: int, closed_until: int) -> dict:
    return {
        "kind": "progress",
        "partition": p,
        "closed_until": closed_until,
        "watermark": closed_until,
        "late_events": 0,
    }


def test_board_merges_partitions_and_marks_rising():
    board = DemandBoard(2, Rising(ratio=1.5, windows=2, min_expected=1.0))
    for start, x, y in ((0, 1.0, 2.0), (100, 1.0, 2.0), (200, 4.0, 2.0)):
        for p in (0, 1):
            for r in window_rows(p, start, {"x": x / 2, "y": y / 2}):
                board.add(orjson.dumps(r))
                board.add(r)  # a duplicate (at-least-once redelivery) changes nothing
    board.add(progress(0, 300))
    v = board.view(top=20)
    assert v["window_start"] is None or not v["complete"]  # partition 1 has not closed anything yet
    board.add(progress(1, 300))
    v = board.view(top=20)
    assert (v["window_start"], v["complete"], v["users"], v["events"]) == (200, True, 2, 4)
    x, y = v["categories"]
    assert (x["category"], x["expected"], x["ratio"], x["rising"]) == ("x", 4.0, 4.0, True)
    assert (y["category"], y["expected"], y["ratio"], y["rising"]) == ("y", 2.0, 1.0, False)
    assert board.view(top=1)["categories"] == [x]
    first = board.view(start=0)
    assert all(not c["rising"] and c["ratio"] is None for c in first["categories"])  # no earlier window


def test_board_completeness_follows_the_slowest_partition():
    board = DemandBoard(2)
    for r in window_rows(0, 0, {"x": 1.0}) + window_rows(0, 100, {"x": 1.0}):
        board.add(r)
    board.add(progress(0, 200))
    board.add(progress(1, 100))  # partition 1 had no events in [0, 100) but has closed it
    assert board.complete(0) and not board.complete(100)
    assert board.view()["window_start"] == 0


def test_board_sums_do_not_depend_on_the_order_partitions_arrive_in():
    # Two workers read the same records in different partition orders; a plain running sum of
    # 0.1, 0.2, 0.3 is 0.6000000000000001 one way and 0.6 the other, which once showed as a
    # different 4th decimal between the two workers' /categories/demand answers.
    values = {0: 0.1, 1: 0.2, 2: 0.3}
    answers = set()
    for order in itertools.permutations(values):
        board = DemandBoard(3)
        for p in order:
            for r in window_rows(p, 0, {"x": values[p]}):
                board.add(r)
        for p in order:
            board.add(progress(p, 100))
        e, prop, obs, pur = board.merged(0)["x"]
        answers.add((e, prop, obs, pur, orjson.dumps(board.view(top=5))))
    assert len(answers) == 1
    assert next(iter(answers))[:2] == (0.6, 0.06)
