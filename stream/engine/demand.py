"""Category demand: per source partition and tumbling event-time window, the expected demand of the
active users next to the observed events (docs/ARCHITECTURE.md §Category demand).

Plain code, no Kafka and no Faust: the worker (stream/worker/demand.py) feeds it what each micro-batch
applied and writes what it returns; the HTTP view and ``demandstream tail`` merge the records it emits
with :class:`DemandBoard`; the tests compute the same numbers offline with :func:`reference_rows`.

Definitions, for one source partition (the worker that owns a partition aggregates it alone):

* A user's *clock* is the largest event time of the user's events so far (the state's ``last_ts``); an
  event belongs to the window ``[start, start + window_s)`` that holds its user's clock after it. With
  a user's events in time order (the normal case) that is the event's own ``ts``; an event older than
  its user's previous one is counted in the user's current window (a user's clock never goes back).
* *Expected demand* of a category in a window: the sum over the window's active users of ``p`` of the
  category in the user's latest prediction in the window (the one after the user's last event there).
  A user counts once per *run*: consecutive events of the user (in offset order) in one window.
* *Propensity*: each such latest prediction's purchase propensity spread over its top-k categories in
  proportion to their ``p`` (so the column sums to the expected number of buyers among active users).
* *Observed*: the window's events per category (``(none)`` for events without one) and the purchases.
* The partition's *watermark* is the largest event time applied. A window closes once the watermark
  reaches its end plus ``lateness_s``; an event (in offset order) whose window has closed is *late*: it
  updates its user's state and signal as always, but not the aggregate (counted in ``late_events``).

Every number so depends only on the partition's events in offset order and the users' states: a
redelivered batch, cut differently, gives the same aggregate, and :func:`reference_rows` recomputes
it from the events and their predictions alone.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import orjson

from demandstream.stream.engine.records import _category  # the name signals carry (bounded)

#: The event type counted in the ``purchases`` column (model/core/events.py's canonical name).
PURCHASE = "purchase"
#: The category of an event that has none (searches, mostly) in the observed columns.
NO_CATEGORY = "(none)"
#: Categories a partition keeps per open window; more (a flood of distinct names) fold into
#: OTHER_CATEGORY, so the partial aggregate, one changelog record, stays below Kafka's 1 MB record limit:
#: a name takes at most 256 bytes (records.CATEGORY_NAME_MAX) and its numbers about 40, so a window takes
#: at most about 300 KB (typical names: 70 KB), and with a lateness below the window two are open at once.
MAX_CATEGORIES_PER_WINDOW = 1024
OTHER_CATEGORY = "(other)"
#: Table keys of the partial aggregates, one per source partition: ``d:`` and the partition number, in a
#: namespace of their own beside the users' ``u:`` (docs/ARCHITECTURE.md §State keys).
AGGREGATE_KEY_PREFIX = b"d:"
#: Below this a sum of predictions is a rounding residue of additions and subtractions: zero.
ZERO = 1e-9
#: Version of the partial aggregate record; another version is discarded (the partition starts afresh).
AGGREGATE_FORMAT = 1


def aggregate_key(partition: int) -> bytes:
    """The table key of a partition's partial aggregate.

    >>> aggregate_key(3)
    b'd:3'
    """
    return AGGREGATE_KEY_PREFIX + str(partition).encode()


def window_start(ts: float, window_s: int) -> int:
    """Start of the tumbling window holding ``ts`` (unix seconds; windows aligned on the epoch).

    >>> window_start(1732300199.5, 300), window_start(1732300200.0, 300)
    (1732299900, 1732300200)
    """
    return int(math.floor(ts / window_s)) * window_s


@dataclass(slots=True)
class Prev:
    """What a user's state says of the user's previous event: its clock (``last_ts``), its prediction
    (top-k as (name, p), propensity) and the offset of the event."""

    clock: float
    top: list[tuple[str, float]]
    propensity: float
    offset: int


@dataclass(slots=True)
class Applied:
    """One user's events applied by one model round, in offset order: the user's previous event (None
    for a fresh state), the events (``ts``, ``category``, ``type``), their source offsets and the
    predictions after them (``top_categories`` as (name, p), ``purchase_propensity``)."""

    prev: Prev | None
    partition: int
    events: Sequence
    offsets: Sequence[int]
    preds: Sequence


@dataclass
class WindowAgg:
    """One window of one partition: active users (runs), events, and per category
    ``[expected, propensity, observed, purchases]``."""

    users: int = 0
    events: int = 0
    cats: dict[str, list[float]] = field(default_factory=dict)

    def row(self, name: str) -> list[float]:
        r = self.cats.get(name)
        if r is None:
            if len(self.cats) >= MAX_CATEGORIES_PER_WINDOW:
                name = OTHER_CATEGORY
                r = self.cats.get(name)
            if r is None:
                r = self.cats[name] = [0.0, 0.0, 0, 0]
        return r

    def add_prediction(self, top: list[tuple[str, float]], propensity: float, sign: float) -> None:
        mass = sum(p for _c, p in top)
        share = sign * propensity / mass if mass > 0 else 0.0
        for c, p in top:
            r = self.row(c)
            r[0] += sign * p
            r[1] += share * p


@dataclass
class PartitionAggregate:
    """The partial aggregate of one source partition: stored in the table (key :func:`aggregate_key`),
    so it moves, recovers and commits with the partition's user states."""

    since: int = -1  # first source offset this aggregate included
    offset: int = -1  # last source offset included: redelivered events at or below it are skipped
    watermark: float = -math.inf
    closed_until: int | None = None  # every window ending at or before this has been emitted
    late_events: int = 0
    windows: dict[int, WindowAgg] = field(default_factory=dict)

    def encode(self) -> bytes:
        return orjson.dumps(
            {
                "format": AGGREGATE_FORMAT,
                "since": self.since,
                "offset": self.offset,
                "watermark": None if self.watermark == -math.inf else self.watermark,
                "closed_until": self.closed_until,
                "late_events": self.late_events,
                "windows": {
                    str(s): {"users": w.users, "events": w.events, "cats": w.cats}
                    for s, w in self.windows.items()
                },
            }
        )

    @classmethod
    def decode(cls, raw: bytes) -> PartitionAggregate | None:
        """The aggregate of a stored record; None for a record of another format."""
        try:
            d = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return None
        if not isinstance(d, dict) or d.get("format") != AGGREGATE_FORMAT:
            return None
        return cls(
            since=d["since"],
            offset=d["offset"],
            watermark=-math.inf if d["watermark"] is None else d["watermark"],
            closed_until=d["closed_until"],
            late_events=d["late_events"],
            windows={
                int(s): WindowAgg(w["users"], w["events"], {c: list(r) for c, r in w["cats"].items()})
                for s, w in d["windows"].items()
            },
        )


@dataclass
class Closed:
    """What closing windows produced: topic records (key, value) for one partition."""

    records: list[tuple[bytes, bytes]] = field(default_factory=list)


class DemandAggregator:
    """Advances partition aggregates by what micro-batches applied; emits the windows that close."""

    def __init__(self, window_s: int, lateness_s: float):
        if window_s < 1:
            raise ValueError("window_s must be at least 1 second")
        self.window_s = window_s
        self.lateness_s = lateness_s

    def update(
        self, aggs: dict[int, PartitionAggregate], applied: Iterable[Applied]
    ) -> dict[int, list[tuple[bytes, bytes]]]:
        """Add ``applied`` (one micro-batch's model rounds, in round order) to ``aggs`` (partition ->
        aggregate, created when missing and changed in place); return, per partition, the topic records
        of the windows that closed.
        """
        by_part: dict[int, list[Applied]] = {}
        for a in applied:
            by_part.setdefault(a.partition, []).append(a)
        out: dict[int, list[tuple[bytes, bytes]]] = {}
        for p, items in by_part.items():
            agg = aggs.get(p)
            if agg is None:
                agg = aggs[p] = PartitionAggregate()
            if agg.since < 0:
                agg.since = min(a.offsets[0] for a in items)
            # Lateness is decided in offset order: the watermark before each event.
            order = sorted(
                (o, e.ts) for a in items for o, e in zip(a.offsets, a.events, strict=True) if o > agg.offset
            )
            wm = agg.watermark
            late_before: dict[int, float] = {}  # offset -> the watermark before it
            for o, ts in order:
                late_before[o] = wm
                if ts > wm:
                    wm = ts
            for a in items:
                self._apply_user(agg, a, late_before)
            if order:
                agg.offset = max(agg.offset, order[-1][0])
                agg.watermark = wm
            recs = self._close(agg, p)
            if recs:
                out[p] = recs
        return out

    def _apply_user(self, agg: PartitionAggregate, a: Applied, late_before: dict[int, float]) -> None:
        w_s, late_s = self.window_s, self.lateness_s
        prev = a.prev
        clock = -math.inf if prev is None or math.isnan(prev.clock) else prev.clock
        # The user's run in progress: its window; whether an earlier batch already counted it, with
        # which prediction (``base``); its latest prediction; whether this batch changed it.
        run_w: int | None = None
        counted, base, cur, changed = False, None, None, False
        if prev is not None and clock > -math.inf and prev.offset >= agg.since:
            run_w, counted = window_start(clock, w_s), True
            base = cur = (prev.top, prev.propensity)
        for e, o, p in zip(a.events, a.offsets, a.preds, strict=True):
            if e.ts > clock:
                clock = e.ts
            w = window_start(clock, w_s)
            pred = (p.top_categories, p.purchase_propensity)
            if o <= agg.offset:  # aggregated by an earlier batch (a redelivery): the run moves on
                if changed:
                    self._flush(agg, run_w, cur, base, counted)
                run_w, counted, base, cur, changed = w, True, pred, pred, False
                continue
            if w + w_s + late_s <= late_before[o]:
                agg.late_events += 1
                continue
            if w != run_w:
                if changed:
                    self._flush(agg, run_w, cur, base, counted)
                run_w, counted, base = w, False, None
            win = agg.windows.get(w)
            if win is None:
                win = agg.windows[w] = WindowAgg()
            win.events += 1
            r = win.row(NO_CATEGORY if e.category is None else _category(e.category))
            r[2] += 1
            if e.type == PURCHASE:
                r[3] += 1
            cur, changed = pred, True
        if changed:
            self._flush(agg, run_w, cur, base, counted)

    @staticmethod
    def _flush(agg: PartitionAggregate, w, cur, base, counted: bool) -> None:
        """A run's latest prediction replaces the one it had in window ``w`` (or counts a new user)."""
        win = agg.windows[w]  # a run changed here has a non-late event in w: its window is open
        if counted:
            if base is not None:
                win.add_prediction(base[0], base[1], -1.0)
        else:
            win.users += 1
        win.add_prediction(cur[0], cur[1], 1.0)

    def _close(self, agg: PartitionAggregate, p: int) -> list[tuple[bytes, bytes]]:
        """Emit and drop the windows the watermark has closed; a progress record when the bound moved."""
        if agg.watermark == -math.inf:
            return []
        bound = window_start(agg.watermark - self.lateness_s, self.window_s)
        if agg.closed_until is not None and bound <= agg.closed_until:
            return []
        recs: list[tuple[bytes, bytes]] = []
        for s in sorted(w for w in agg.windows if w + self.window_s <= bound):
            recs.extend(window_records(p, s, self.window_s, agg.windows.pop(s)))
        agg.closed_until = bound
        recs.append(progress_record(p, bound, agg.watermark, agg.late_events))
        return recs


# -- topic records ----------------------------------------------------------------------------------


def window_records(p: int, start: int, window_s: int, w: WindowAgg) -> list[tuple[bytes, bytes]]:
    """The ``category-demand`` records of one closed window of partition ``p``: one per category, then
    the window's summary (docs/ARCHITECTURE.md §Category demand)."""
    end = start + window_s
    recs = []
    for c, (e, prop, obs, pur) in sorted(w.cats.items()):
        if not obs and abs(e) < ZERO and abs(prop) < ZERO:
            continue  # only in a prediction that a later one of its user replaced: nothing left
        recs.append(
            (
                orjson.dumps([start, p, c]),
                orjson.dumps(
                    {
                        "kind": "category",
                        "window_start": start,
                        "window_end": end,
                        "partition": p,
                        "category": c,
                        "expected": round(e, 6),
                        "propensity": round(prop, 6),
                        "observed": int(obs),
                        "purchases": int(pur),
                    }
                ),
            )
        )
    recs.append(
        (
            orjson.dumps([start, p, None]),
            orjson.dumps(
                {
                    "kind": "window",
                    "window_start": start,
                    "window_end": end,
                    "partition": p,
                    "users": w.users,
                    "events": w.events,
                }
            ),
        )
    )
    return recs


def progress_record(p: int, closed_until: int, watermark: float, late_events: int) -> tuple[bytes, bytes]:
    """Partition ``p`` has emitted every window ending at or before ``closed_until``.

    >>> progress_record(2, 600, 915.0, 0)
    (b'["progress",2]', b'{"kind":"progress","partition":2,"closed_until":600,"watermark":915.0,"late_events":0}')
    """
    return (
        orjson.dumps(["progress", p]),
        orjson.dumps(
            {
                "kind": "progress",
                "partition": p,
                "closed_until": closed_until,
                "watermark": watermark,
                "late_events": late_events,
            }
        ),
    )


# -- merging: the HTTP view and `tail` ---------------------------------------------------------------


@dataclass(frozen=True)
class Rising:
    """When a category is marked rising: its expected demand is at least ``ratio`` times its mean over
    the ``windows`` windows before, and at least ``min_expected`` (a few users are no trend)."""

    ratio: float = 1.5
    windows: int = 3
    min_expected: float = 1.0


class DemandBoard:
    """The merged view of the ``category-demand`` records of every partition (last record per key wins,
    so the duplicates an at-least-once redelivery writes change nothing). Keeps the newest
    ``keep_windows`` windows."""

    def __init__(self, partitions: int, rising: Rising = Rising(), keep_windows: int = 48):
        self.partitions = partitions
        self.rising = rising
        self.keep_windows = keep_windows
        #: window start -> partition -> category -> row
        self.cats: dict[int, dict[int, dict[str, dict]]] = {}
        #: window start -> partition -> summary
        self.summary: dict[int, dict[int, dict]] = {}
        self.progress: dict[int, dict] = {}
        self.window_s: int | None = None

    def add(self, value: bytes | dict) -> None:
        r = orjson.loads(value) if isinstance(value, bytes | bytearray) else value
        kind = r.get("kind")
        if kind == "progress":
            self.progress[r["partition"]] = r
            return
        if kind not in ("category", "window"):
            return
        s = r["window_start"]
        self.window_s = r["window_end"] - s
        if kind == "category":
            self.cats.setdefault(s, {}).setdefault(r["partition"], {})[r["category"]] = r
        else:
            self.summary.setdefault(s, {})[r["partition"]] = r
        if len(self.cats) > self.keep_windows or len(self.summary) > self.keep_windows:
            for old in sorted(set(self.cats) | set(self.summary))[: -self.keep_windows]:
                self.cats.pop(old, None)
                self.summary.pop(old, None)

    def windows(self) -> list[int]:
        return sorted(set(self.cats) | set(self.summary))

    def complete(self, start: int) -> bool:
        """Every partition has closed the window (its progress record is past the window's end)."""
        if self.window_s is None or len(self.progress) < self.partitions:
            return False
        end = start + self.window_s
        return all(pr["closed_until"] >= end for pr in self.progress.values())

    def merged(self, start: int) -> dict[str, list[float]]:
        """category -> [expected, propensity, observed, purchases] summed over partitions.

        The float sums are exactly rounded (``math.fsum``), so the answer does not depend on the
        order in which partitions' records reached this worker: two workers that hold the same
        records answer the same digits (a plain ``+=`` in arrival order once differed in the 4th
        decimal between workers)."""
        parts: dict[str, list[list[float]]] = {}
        for rows in self.cats.get(start, {}).values():
            for c, r in rows.items():
                parts.setdefault(c, []).append(
                    [r["expected"], r["propensity"], r["observed"], r["purchases"]]
                )
        return {
            c: [
                math.fsum(x[0] for x in xs),
                math.fsum(x[1] for x in xs),
                sum(x[2] for x in xs),
                sum(x[3] for x in xs),
            ]
            for c, xs in parts.items()
        }

    def view(self, top: int = 20, start: int | None = None) -> dict:
        """The answer of ``GET /categories/demand``: the newest complete window by default (else the
        newest reported), its ``top`` categories by expected demand, rising ones marked."""
        wins = self.windows()
        if start is None:
            done = [w for w in wins if self.complete(w)]
            start = done[-1] if done else (wins[-1] if wins else None)
        if start is None or self.window_s is None:
            return {"window_start": None, "categories": [], "windows": [], "partitions": self.partitions}
        w_s = self.window_s
        merged = self.merged(start)
        earlier = [start - i * w_s for i in range(1, self.rising.windows + 1)]
        earlier = [w for w in earlier if wins and w >= wins[0]]
        before = [self.merged(w) for w in earlier]
        rows = []
        for c, (e, prop, obs, pur) in merged.items():
            base = sum(b.get(c, (0.0,))[0] for b in before) / len(before) if before else None
            ratio = None if not base else e / base
            rising = (
                bool(before)
                and e >= self.rising.min_expected
                and (ratio is None or ratio >= self.rising.ratio)
            )
            rows.append(
                {
                    "category": c,
                    "expected": round(e, 4),
                    "propensity": round(prop, 4),
                    "observed": int(obs),
                    "purchases": int(pur),
                    "ratio": None if ratio is None else round(ratio, 3),
                    "rising": rising,
                }
            )
        rows.sort(key=lambda r: (-r["expected"], r["category"]))
        summ = self.summary.get(start, {})
        return {
            "window_start": start,
            "window_end": start + w_s,
            "window_s": w_s,
            "complete": self.complete(start),
            "partitions": self.partitions,
            "partitions_reported": len(
                [p for p, pr in self.progress.items() if pr["closed_until"] >= start + w_s]
            ),
            "users": sum(s["users"] for s in summ.values()),
            "events": sum(s["events"] for s in summ.values()),
            "late_events": sum(pr["late_events"] for pr in self.progress.values()),
            "rising_rule": {
                "ratio": self.rising.ratio,
                "windows": self.rising.windows,
                "min_expected": self.rising.min_expected,
            },
            "categories": rows[:top],
            "windows": wins,
        }


# -- the offline reference ---------------------------------------------------------------------------


@dataclass(slots=True)
class ScoredEvent:
    """An event with where it was and the prediction after it (offline: from ``demandstream score``)."""

    partition: int
    offset: int
    user: str
    ts: float
    category: str | None
    purchase: bool
    top: list[tuple[str, float]]
    propensity: float


def reference_rows(
    events: Sequence[ScoredEvent], window_s: int, lateness_s: float
) -> dict[tuple[int, int], tuple[WindowAgg, bool]]:
    """The windows of every partition computed from the definitions, not incrementally: per
    ``(partition, window start)``, the aggregate and whether the partition has closed it.

    Independent of :class:`DemandAggregator` (the tests compare the two): each user's events in offset
    order, lateness from the watermark before each event, runs of consecutive events per window.

    >>> ev = [ScoredEvent(0, i, "u", 10.0 * i, "a", False, [("a", 0.5)], 0.2) for i in range(3)]
    >>> (w, closed), = reference_rows(ev, 100, 0).values()
    >>> w.users, w.events, w.cats
    (1, 3, {'a': [0.5, 0.2, 3, 0]})
    """
    by_part: dict[int, list[ScoredEvent]] = {}
    for e in events:
        by_part.setdefault(e.partition, []).append(e)
    out: dict[tuple[int, int], tuple[WindowAgg, bool]] = {}
    for p, evs in by_part.items():
        evs = sorted(evs, key=lambda e: e.offset)
        wm = -math.inf
        clocks: dict[str, float] = {}
        runs: dict[str, list] = {}  # user -> [window, latest event] of the user's current run
        finished: list[tuple[int, ScoredEvent]] = []
        wins: dict[int, WindowAgg] = {}
        for e in evs:
            clock = max(clocks.get(e.user, -math.inf), e.ts)
            clocks[e.user] = clock
            w = window_start(clock, window_s)
            late = w + window_s + lateness_s <= wm
            wm = max(wm, e.ts)
            if late:
                continue
            win = wins.setdefault(w, WindowAgg())
            win.events += 1
            r = win.row(_category(e.category) if e.category is not None else NO_CATEGORY)
            r[2] += 1
            r[3] += int(e.purchase)
            run = runs.get(e.user)
            if run is not None and run[0] == w:
                run[1] = e
            else:
                if run is not None:
                    finished.append((run[0], run[1]))
                runs[e.user] = [w, e]
        finished.extend((w, e) for w, e in runs.values())
        for w, e in finished:
            wins[w].users += 1
            wins[w].add_prediction(e.top, e.propensity, 1.0)
        bound = window_start(wm - lateness_s, window_s) if wm > -math.inf else None
        for w, agg in wins.items():
            out[(p, w)] = (agg, bound is not None and w + window_s <= bound)
    return out
