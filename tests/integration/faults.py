"""Shared harness of the fault tests (GitHub issue #5): inject a fault, then check the invariants.

Every fault test ends in :func:`check_invariants`, which reads what the pipeline left in Kafka and
compares it with an uninterrupted reference computed offline:

- *no loss*: every valid event has at least one signal (``at_least_once``), exactly one visible to a
  ``read_committed`` consumer (``exactly_once``);
- *applied once, in order*: every signal of an event carries the event's position in its user's
  sequence as ``events_seen``, and the final state of every user (the latest record per key of the
  table's changelog, decoded with :func:`demandstream.model.core.state.unpack`) equals the state that
  :meth:`demandstream.model.core.scoring.Scorer.step` reaches over the same events from :meth:`~demandstream.model.core.scoring.Scorer.new_state`;
- *accounted for*: records in = events with a signal + distinct dead letters.

The figures of each run (events, faults, lost, duplicates, max state difference, recovery time) are
printed and appended as one JSON line to ``$DEMANDSTREAM_FAULT_FIGURES`` (default
``var/fault-figures.jsonl``), from which docs/GUARANTEES.md's table is written.
"""

from __future__ import annotations

import collections
import functools
import json
import math
import os
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import orjson
from kafka import KafkaConsumer, TopicPartition

from demandstream.model.core.checkpoint import load
from demandstream.model.core.events import REASONS, Event
from demandstream.model.core.scoring import Scorer
from demandstream.model.core.state import SUMMARY_FIELDS, UserState, unpack
from demandstream.model.data.synth import generate
from demandstream.stream.engine.records import user_of_state_key
from demandstream.stream.settings import Settings
from demandstream.stream.tools.replay import replay

REPO = Path(__file__).resolve().parents[2]

#: Faust's consumer-group timeouts for the fault tests. Faust's default session timeout is 60 s: after a
#: SIGKILL the group waits that long for the dead member before reassigning its partitions, so recovery
#: time would be the timeout, not the product. 10 s stays above the broker's floor
#: (group.min.session.timeout.ms = 6 s) and keeps three kills inside a few minutes. Faust reads these
#: variables itself (faust/types/settings/settings.py, ``env_name``); they are test settings, not product
#: defaults.
FAULT_ENV: dict[str, str] = {
    "BROKER_SESSION_TIMEOUT": "10",
    "BROKER_HEARTBEAT_INTERVAL": "1",
    "BROKER_REBALANCE_TIMEOUT": "20",
}
#: Largest |Δ| allowed between streamed and reference h/c: batched and unbatched float32 sums differ in
#: the last bits (the issue's bound).
STATE_TOL = 1e-5
#: Users whose served view (``/users/{id}/demand``) is compared with their final signal, per fault run.
SERVED_SAMPLE = 200
#: Largest |Δp| between the served view and the final signal (both come from the same prediction; the
#: state stores it with less precision than the signal's JSON).
SERVED_TOL = 1e-4
#: A reader stops once nothing new arrived for this long after its condition holds (to see late extras).
IDLE_S = 3.0
#: ... and gives up when nothing new arrived for this long while its condition does not hold: longer than
#: a worker's restart plus a session timeout, so a recovering pipeline is never cut short.
STALL_S = 60.0


def changelog_topic(s: Settings) -> str:
    """The Faust table's changelog topic (``<app_id>-<table>-changelog``)."""
    return f"{s.app_id}-{s.table}-changelog"


# -- data ---------------------------------------------------------------------------------------


@functools.cache
def synth_events(n_users: int, n_events: int, seed: int) -> tuple[Event, ...]:
    """The generator's events, cached: several tests (and both guarantees) share one data set."""
    return tuple(generate(n_users, n_events, seed=seed))


def user_sequences(events: Iterable[Event]) -> dict[str, list[Event]]:
    """Each user's events in arrival order (what the stream applies, docs/ARCHITECTURE.md §Semantics)."""
    out: dict[str, list[Event]] = collections.defaultdict(list)
    for e in events:
        out[e.user_id].append(e)
    return dict(out)


@functools.cache
def _reference(model_path: str, events: tuple[Event, ...]) -> dict[str, UserState]:
    scorer = Scorer(load(model_path), "cpu")
    seqs = user_sequences(events)
    states = {u: scorer.new_state() for u in seqs}
    # Users are independent, so round r steps the r-th event of every user that has one; each user
    # still sees its own events one at a time, in order, from new_state(). That costs one model call
    # per round (the longest user's length) instead of one per event.
    users = sorted(seqs, key=lambda u: -len(seqs[u]))
    for r in range(len(seqs[users[0]]) if users else 0):
        live = [u for u in users if len(seqs[u]) > r]
        scorer.step([seqs[u][r] for u in live], [states[u] for u in live])
    return states


def reference_states(model_path: str | Path, events: Sequence[Event]) -> dict[str, UserState]:
    """Final state of every user after an uninterrupted run over ``events`` (computed offline, cached)."""
    return _reference(str(model_path), tuple(events))


# -- producing ----------------------------------------------------------------------------------


class Replayer(threading.Thread):
    """``demandstream.stream.tools.replay.replay`` of a file at a steady rate, in the background; errors are kept, not lost."""

    def __init__(self, settings: Settings, path: Path, rate: float):
        super().__init__(daemon=True, name="fault-replay")
        self.settings, self.path, self.rate = settings, path, rate
        self.error: BaseException | None = None
        self.sent = 0
        self.started_at = 0.0

    def run(self) -> None:
        self.started_at = time.time()
        try:
            self.sent = replay(self.settings, [self.path], "jsonl", rate=self.rate, progress=False).sent
        except BaseException as exc:  # re-raised by finish() in the test thread
            self.error = exc

    def finish(self, timeout: float) -> int:
        self.join(timeout)
        if self.is_alive():
            raise TimeoutError(f"replay still running after {timeout} s")
        if self.error is not None:
            raise self.error
        return self.sent


def wait_until(pred: Callable[[], bool], timeout: float, what: str, every: float = 0.5) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(every)


# -- reading ------------------------------------------------------------------------------------


class TopicReader:
    """Reads a whole topic from the beginning and keeps following it (one consumer, no group)."""

    def __init__(
        self,
        bootstrap: str | list[str],
        topic: str,
        isolation: str = "read_committed",
        timeout: float = 60.0,
        **security,
    ):
        self.topic = topic
        self.records: list = []
        self.c = KafkaConsumer(
            bootstrap_servers=bootstrap,
            group_id=None,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            isolation_level=isolation,
            **security,
        )
        parts = None
        deadline = time.monotonic() + timeout
        while not parts and time.monotonic() < deadline:
            parts = self.c.partitions_for_topic(topic)
            if not parts:
                time.sleep(0.5)
        if not parts:
            self.c.close()
            raise TimeoutError(f"topic {topic} does not exist after {timeout} s")
        self.c.assign([TopicPartition(topic, p) for p in sorted(parts)])
        self.c.seek_to_beginning()

    def poll(self) -> int:
        got = 0
        for recs in self.c.poll(timeout_ms=500, max_records=10000).values():
            self.records.extend(recs)
            got += len(recs)
        return got

    def read_until(
        self, done: Callable[[list], bool], timeout: float, idle_s: float = IDLE_S, stall_s: float = STALL_S
    ) -> list:
        """Records so far once ``done(records)`` holds and nothing new came for ``idle_s``.

        Gives up at ``timeout``, or when nothing new came for ``stall_s`` although ``done`` does not hold
        (what never arrives is lost; waiting longer only makes a failing run slow).
        """
        deadline = time.monotonic() + timeout
        last_new = time.monotonic()
        while time.monotonic() < deadline:
            if self.poll():
                last_new = time.monotonic()
                continue
            quiet = time.monotonic() - last_new
            if quiet > stall_s or (quiet > idle_s and done(self.records)):
                break
        return self.records

    def close(self) -> None:
        self.c.close()


def latest_states(records: Iterable) -> dict[str, bytes | None]:
    """Compacted view of a changelog: the last value per user (None = tombstone)."""
    return {user_of_state_key(r.key): r.value for r in records}


# -- checking -----------------------------------------------------------------------------------


@dataclass
class FaultReport:
    """The figures of one fault run, as reported in docs/GUARANTEES.md."""

    test: str
    guarantee: str
    events: int
    users: int
    garbage: int = 0
    faults: list[str] = field(default_factory=list)
    signals: int = 0
    lost: int = 0
    duplicates: int = 0
    dead_letters: int = 0
    duplicate_dead_letters: int = 0
    max_state_diff: float = 0.0
    recovery_s: list[float] = field(default_factory=list)
    runtime_s: float = 0.0
    served_users: int = 0  # users whose /users/{id}/demand was compared with their final signal
    problems: list[str] = field(default_factory=list)

    def save(self) -> None:
        line = json.dumps(asdict(self) | {"at": time.strftime("%Y-%m-%dT%H:%M:%S")})
        print(f"\nFAULT FIGURES {line}")
        path = Path(os.environ.get("DEMANDSTREAM_FAULT_FIGURES", REPO / "var" / "fault-figures.jsonl"))
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as fh:
            fh.write(line + "\n")


#: State fields an exactly-once run must reproduce exactly (h and c are compared within a tolerance).
EXACT_STATE_FIELDS = SUMMARY_FIELDS


def _same_time(a: float, b: float) -> bool:
    """Equal event times, NaN (never happened) equal to NaN."""
    return a == b or (math.isnan(a) and math.isnan(b))


def served_view_problems(
    get: Callable[[str], tuple[int, bytes]], signals: Sequence[dict], seqs: dict, timeout: float = 60.0
) -> tuple[int, list[str]]:
    """Compare ``/users/{id}/demand`` of a sample of users with each one's final signal.

    Returns (users compared, problems found).

    The final signal (``events_seen`` = the user's number of events) is what the offline reference
    was checked against; the served view is read from the worker's local store, which is a separate
    path (the store after restore, rebalance and commit, and Faust's routing to the owning worker),
    so a worker that signals right but serves a stale or lost state fails here. A view is polled
    until it shows the final event count (states reach the store at commit), then compared.
    """
    final = {}
    for sig in signals:
        if sig["events_seen"] == len(seqs.get(sig["user_id"], ())):
            final[sig["user_id"]] = sig
    users = sorted(final)[:: max(1, len(final) // SERVED_SAMPLE)]
    problems, pending = [], list(users)
    deadline = time.monotonic() + timeout
    while pending and time.monotonic() < deadline:
        waiting = []
        for u in pending:
            try:
                status, body = get(f"/users/{urllib.parse.quote(u, safe='')}/demand")
            except OSError:
                status, body = 0, b""
            view = orjson.loads(body) if status == 200 else None
            if view is None or view["events_seen"] < final[u]["events_seen"]:
                waiting.append(u)
                continue
            problems.extend(f"served view of {u}: {p}" for p in _view_differences(view, final[u]))
        pending = waiting
        if pending:
            time.sleep(0.5)
    if pending:
        problems.append(
            f"{len(pending)} of {len(users)} sampled users not served with their final state within "
            f"{timeout:.0f} s, e.g. {pending[:3]}"
        )
    if not users:
        problems.append("no user has a final signal to compare the served view with")
    return len(users), problems


def _view_differences(view: dict, sig: dict) -> list[str]:
    out = []
    if view["events_seen"] != sig["events_seen"]:
        out.append(f"events_seen {view['events_seen']} != {sig['events_seen']}")
    names = [t["category"] for t in view["top_categories"]]
    if names != [t["category"] for t in sig["top_categories"]]:
        out.append(f"top categories {names} != {[t['category'] for t in sig['top_categories']]}")
    elif any(
        abs(a["p"] - b["p"]) > SERVED_TOL
        for a, b in zip(view["top_categories"], sig["top_categories"], strict=True)
    ):
        out.append("top category probabilities differ from the final signal's")
    if abs(view["purchase_propensity"] - sig["purchase_propensity"]) > SERVED_TOL:
        out.append(f"propensity {view['purchase_propensity']} != {sig['purchase_propensity']}")
    return out


def state_difference(actual: UserState, ref: UserState) -> tuple[float, list[str]]:
    """(max |Δ| over h and c, names of the exactly-compared fields that differ)."""
    bad = [f for f in EXACT_STATE_FIELDS if getattr(actual, f) != getattr(ref, f)]
    bad += [f for f in ("last_ts", "last_add_ts") if not _same_time(getattr(actual, f), getattr(ref, f))]
    if actual.h.shape != ref.h.shape:
        return float("inf"), [*bad, "shape"]
    d = max(float(np.max(np.abs(actual.h - ref.h))), float(np.max(np.abs(actual.c - ref.c))))
    return d, bad


def recovery_times(signals: Sequence[dict], kill_times: Sequence[float]) -> list[float]:
    """Seconds from each kill until every partition emitted a signal again (inf if one never did).

    Per partition rather than overall: in a group, the survivors keep emitting for their own partitions,
    so the first signal after a kill says nothing about the partitions that had to move.
    """
    by_part: dict[int, list[float]] = collections.defaultdict(list)
    for sig in signals:
        by_part[sig["_partition"]].append(sig["emitted_at"])
    emitted = [np.sort(np.array(v, dtype=float)) for v in by_part.values()]
    out = []
    for t in kill_times:
        worst = 0.0
        for em in emitted:
            if em[-1] <= t:
                continue  # nothing flowed on this partition after the fault: nothing to recover
            worst = max(worst, float(em[int(np.searchsorted(em, t, side="right"))] - t))
        out.append(worst)
    return out


def check_invariants(
    report: FaultReport,
    *,
    bootstrap: str | list[str],
    settings: Settings,
    model_path: Path,
    events: Sequence[Event],
    records_in: int,
    kill_times: Sequence[float] = (),
    expected_reasons: collections.Counter | None = None,
    timeout: float = 240.0,
    started: float | None = None,
    check_dead: Callable[[list[dict]], list[str]] | None = None,
    served: Callable[[str], tuple[int, bytes]] | None = None,
) -> FaultReport:
    """Read signals, dead letters and the changelog; fill ``report``; assert every invariant.

    ``records_in`` is the number of records produced to the input topic (valid + garbage);
    ``check_dead``, given the dead letters read, returns a list of problems found in them;
    ``served``, a live worker's HTTP GET (path -> status, body), adds the check that the worker's
    query API serves every sampled user's final state (:func:`served_view_problems`).
    """
    exactly_once = settings.guarantee == "exactly_once"
    isolation = "read_committed" if exactly_once else "read_uncommitted"
    seqs = user_sequences(events)
    position = {e.event_id: i + 1 for evs in seqs.values() for i, e in enumerate(evs)}
    ref = reference_states(model_path, events)
    n_bad = records_in - len(events)
    security = settings.kafka_python_security()

    sig_reader = TopicReader(bootstrap, settings.topic_signals, isolation, **security)
    try:

        def all_signalled(recs: list) -> bool:
            return len(recs) >= len(events) and len({orjson.loads(r.value)["event_id"] for r in recs}) >= len(
                position
            )

        raw_signals = sig_reader.read_until(all_signalled, timeout)
    finally:
        sig_reader.close()
    signals = [orjson.loads(r.value) | {"_partition": r.partition} for r in raw_signals]

    dead: list[dict] = []
    if n_bad:
        dlq = TopicReader(bootstrap, settings.topic_dlq, isolation, **security)
        try:

            def all_dead(recs: list) -> bool:
                return (
                    len({(orjson.loads(r.value)["partition"], orjson.loads(r.value)["offset"]) for r in recs})
                    >= n_bad
                )

            dead = [orjson.loads(r.value) for r in dlq.read_until(all_dead, 60)]
        finally:
            dlq.close()

    # The changelog is written after the signals (commit protocol step 4): wait until every user's
    # latest state has seen all of the user's events.
    clog = TopicReader(bootstrap, changelog_topic(settings), "read_committed", **security)
    try:

        def complete(recs: list) -> bool:
            latest = latest_states(recs)
            return all(
                latest.get(u) is not None and unpack(latest[u]).events_seen >= len(evs)
                for u, evs in seqs.items()
            )

        states = latest_states(clog.read_until(complete, 90))
    finally:
        clog.close()

    problems = report.problems
    by_event = collections.Counter(s["event_id"] for s in signals)
    report.signals = len(signals)
    report.lost = sum(1 for e in position if e not in by_event)
    report.duplicates = sum(n - 1 for n in by_event.values())
    unknown = [e for e in by_event if e not in position]
    misordered = [s["event_id"] for s in signals if position.get(s["event_id"]) != s["events_seen"]]
    dead_keys = collections.Counter((d["partition"], d["offset"]) for d in dead)
    report.dead_letters = len(dead_keys)
    report.duplicate_dead_letters = sum(n - 1 for n in dead_keys.values())
    report.recovery_s = [round(t, 2) for t in recovery_times(signals, kill_times)]

    diffs, mismatched, missing = [], [], []
    for u, r in ref.items():
        raw = states.get(u)
        if raw is None:
            missing.append(u)
            continue
        d, bad = state_difference(unpack(raw), r)
        diffs.append(d)
        if bad or d > STATE_TOL:
            mismatched.append(f"{u}: {bad} max|Δh,c|={d:.2e} seen={unpack(raw).events_seen}/{r.events_seen}")
    report.max_state_diff = max(diffs, default=0.0)
    if started is not None:
        report.runtime_s = round(time.time() - started, 1)

    if report.lost:
        problems.append(f"{report.lost} valid events have no signal")
    if exactly_once and report.duplicates:
        problems.append(f"{report.duplicates} duplicate signals visible to read_committed under exactly_once")
    if exactly_once and report.duplicate_dead_letters:
        problems.append(f"{report.duplicate_dead_letters} duplicate dead letters under exactly_once")
    if unknown:
        problems.append(f"{len(unknown)} signals for unknown event ids, e.g. {unknown[:3]}")
    if misordered:
        problems.append(
            f"{len(misordered)} signals with events_seen != position in the user's sequence "
            f"(applied twice or out of order), e.g. {misordered[:3]}"
        )
    if missing:
        problems.append(f"{len(missing)} users have no state in the changelog, e.g. {missing[:3]}")
    if mismatched:
        problems.append(
            f"{len(mismatched)} users' final state differs from the reference, e.g. {mismatched[:3]}"
        )
    if len(by_event) + report.dead_letters != records_in:
        problems.append(
            f"records in {records_in} != events signalled {len(by_event)} + dead letters "
            f"{report.dead_letters}"
        )
    bad_reasons = [d for d in dead if d.get("reason") not in REASONS or not d.get("detail")]
    if bad_reasons:
        problems.append(
            f"{len(bad_reasons)} dead letters without a known reason and detail, e.g. {bad_reasons[:1]}"
        )
    if expected_reasons is not None:
        got = collections.Counter()
        seen: set = set()
        for d in dead:
            if (d["partition"], d["offset"]) not in seen:
                seen.add((d["partition"], d["offset"]))
                got[d["reason"]] += 1
        if got != expected_reasons:
            problems.append(f"dead-letter reasons {dict(got)} != expected {dict(expected_reasons)}")
    if check_dead is not None:
        problems.extend(check_dead(dead))
    if served is not None:
        report.served_users, served_problems = served_view_problems(served, signals, seqs)
        problems.extend(served_problems)
    report.save()
    assert not problems, "invariants violated:\n- " + "\n- ".join(problems)
    assert report.max_state_diff <= STATE_TOL
    return report
