"""``demandstream migrate``: a model upgrade that keeps every user's context (blue/green by app id).

A state made by one ``model_version`` is never fed to another model (docs/ARCHITECTURE.md §State), so a
worker started with a new checkpoint on the old table restarts every user. ``migrate`` builds the new
model's table beside the running one instead. The running ("blue") workers keep app id A; ``migrate
--model NEW.pt --to-app-id B`` replays the input topic's retained history through the new model and
writes the result as app id B's table, so "green" workers started with ``--app-id B`` and the new
model continue every user from where the history leaves it (docs/OPERATIONS.md §1, Upgrading the model):

1. **Checks**, each a one-line refusal (:class:`MigrateError`, exit 2): a model file that is not a
   checkpoint; B equal to A; B's changelog or consumer group already holding data (``--force``
   deletes both first); B's group with live members (green workers running: never overridden); an
   input partition whose retention deleted events while its control partition lost erasure requests
   that may have covered them (``--accept-lost-erasures``). Events deleted by the input topic's
   retention only shorten users' rebuilt context: a warning, and the report says from when the
   retained history runs.
2. **Passes.** Each pass reads the control topic up to its end, then the input topic up to the end it
   had when the pass began, and runs the records through
   :class:`~demandstream.stream.engine.inference.InferenceEngine` with an in-memory state reader
   (:class:`Rebuild`): the worker's own validation, pseudonymisation (same key), redelivery skip,
   erasures and batched step (step 1 of docs/ARCHITECTURE.md §Protocol); signals and dead letters are
   computed and dropped (blue wrote them). An erasure request is applied once its partition's events
   below the request's ``input_end`` (the offset ``demandstream forget`` waited for) are applied, so a
   forgotten user is never rebuilt from events it asked to erase (docs/ARCHITECTURE.md §Topics). A
   request without that field (written before it existed) is placed by time: before the first event
   of its partition whose Kafka timestamp is later than the request's.
3. **Writes** (not with ``--dry-run``): after each pass, the states changed in it (tombstones for
   users erased or expired since an earlier pass) go to B's changelog, created as the worker would
   create it (compacted, the input's partition count), acknowledged by every in-sync replica; then B's
   group offsets are set to exactly the positions applied, on the input and control topics. A green
   worker restores the table from the changelog and continues from those offsets: no event is skipped
   or applied twice, and no erasure is applied again.
4. **Follow**: passes repeat while the lag (input events past the last pass) exceeds ``max_lag``
   (at most :data:`MAX_PASSES`), then ``migrate`` prints the command that starts the green workers.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

import kafka.errors
import orjson
import torch
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.errors import KafkaError
from kafka.structs import OffsetAndMetadata

from demandstream.model.core.checkpoint import load
from demandstream.model.core.scoring import Scorer, resolve_device
from demandstream.model.core.state import StateFormatError, peek_last_ts
from demandstream.model.errors import UserError
from demandstream.stream.admin import (
    UNREACHABLE,
    KafkaUnavailable,
    TopicMismatch,
    admin_client,
    changelog_topic,
    create_changelog_topic,
    partition_counts,
    unreachable_message,
)
from demandstream.stream.engine.inference import CONTROL_FIELD, InferenceEngine, SourceRecord
from demandstream.stream.settings import Settings
from demandstream.stream.tools.forget import INPUT_END_FIELD

logger = logging.getLogger(__name__)

#: Default ``--max-lag``: follow passes stop once fewer input events than this arrived during the last
#: one. The green workers absorb that many in seconds, and it is the lag the ConsumerLagGrowing alert
#: tolerates (deploy/prometheus/alerts.yml).
MAX_LAG = 10_000
#: At most this many passes: input that arrives as fast as the replay runs would never let it catch up;
#: the green workers then start behind by the reported lag, which their consumer lag shows.
MAX_PASSES = 20
#: States sent to the changelog per acknowledged chunk: bounds the producer's pending futures.
WRITE_CHUNK = 10_000
#: A read that gets no record for this long while its partitions are short of the end they had fails
#: (an unreachable broker or missing ACLs would otherwise hang the command).
READ_STALL_S = 60.0
#: The progress line is rewritten this often on a terminal; in a log, one line per LOG_PROGRESS_S.
TTY_PROGRESS_S = 0.5
LOG_PROGRESS_S = 10.0
#: With a state TTL, a partition's states are swept for expiry each time its event time advanced by this
#: fraction of the TTL: expiry within a tenth of the TTL of when the workers' sweep would do it, at a
#: cost of ten passes over the states per TTL of replayed history.
TTL_SWEEP_FRACTION = 0.1
#: Waits for a deleted topic to be gone before it is created again (Kafka deletes asynchronously).
TOPIC_DELETE_TIMEOUT_S = 60.0
#: Torch intra-op threads while migrating, as in a worker (stream/worker/run.py): the micro-batch steps
#: are small, and more threads mostly spin against each other: on this project's 2-core machine, 2
#: threads replayed 1.1k events/s where 1 thread replayed 8k.
MIGRATE_TORCH_THREADS = 1
#: How long group requests are retried while the group coordinator is not available yet (a new cluster
#: creates ``__consumer_offsets`` on first use, and a coordinator moves when its broker restarts).
COORDINATOR_WAIT_S = 30.0
#: The errors that mean "the coordinator is not there yet", not "no such group".
_COORDINATOR_ERRORS = (
    kafka.errors.CoordinatorNotAvailableError,
    kafka.errors.NotCoordinatorError,
    kafka.errors.CoordinatorLoadInProgressError,
)


class MigrateError(UserError, ValueError):
    """A migration that cannot or must not run as asked (one line for the CLI)."""


# -- erasure order ---------------------------------------------------------------------------------


@dataclass(slots=True)
class Erasure:
    """An erasure request of the control topic and the input offset it applies at: after every event
    of its partition below ``at``, before the events from ``at`` on."""

    record: SourceRecord
    at: int


def request_input_end(value: bytes | None) -> int | None:
    """The ``input_end`` of an erasure request (``demandstream forget``), None when it has none.

    >>> request_input_end(b'{"demandstream_control": "forget", "user_id": "u1", "input_end": 41}')
    41
    >>> request_input_end(b'{"demandstream_control": "forget", "user_id": "u1"}') is None
    True
    >>> request_input_end(b"not json") is None
    True
    """
    try:
        obj = orjson.loads(value or b"")
    except orjson.JSONDecodeError:
        return None
    end = obj.get(INPUT_END_FIELD) if isinstance(obj, dict) and CONTROL_FIELD in obj else None
    return end if isinstance(end, int) and not isinstance(end, bool) and end >= 0 else None


def interleave(inputs: Iterable[SourceRecord], pending: deque[Erasure], position: int) -> list[SourceRecord]:
    """One partition's input records (in offset order) with the partition's due erasure requests
    before them: a request goes before the first event at or past its ``at``; requests stay in their
    own order, so one not yet due holds back the ones after it. Requests due once the partition is
    read up to ``position`` (the next offset to read) close the list; the rest stay in ``pending``.

    >>> ev = [SourceRecord(b"u", b"{}", 0, o) for o in (5, 6, 7)]
    >>> ctl = lambda o: SourceRecord(b"u", b"{}", 0, o, topic="ctl")
    >>> pending = deque([Erasure(ctl(0), 6), Erasure(ctl(1), 9)])
    >>> [(r.topic or "in", r.offset) for r in interleave(ev, pending, 8)]
    [('in', 5), ('ctl', 0), ('in', 6), ('in', 7)]
    >>> [e.at for e in pending]  # due once events up to offset 8 are applied
    [9]
    """
    out: list[SourceRecord] = []
    for rec in inputs:
        while pending and pending[0].at <= rec.offset:
            out.append(pending.popleft().record)
        out.append(rec)
    while pending and pending[0].at <= position:
        out.append(pending.popleft().record)
    return out


# -- the rebuild (Kafka-free) ----------------------------------------------------------------------


@dataclass
class RebuildCounts:
    """What a rebuild applied so far."""

    records: int = 0  # input records read
    applied: int = 0  # events applied to states
    dead_letters: int = 0  # invalid records (blue dead-lettered them; not written again)
    duplicates: int = 0
    erasures: int = 0  # erasure requests applied
    expired: int = 0  # states deleted by the TTL


class Rebuild:
    """Users' states rebuilt in memory by the worker's engine, and which of them changed.

    ``feed`` takes records in the order the worker would apply them (:func:`interleave`); states are
    kept per partition, packed as the table stores them (``(key, partition)`` addresses them, as in
    ``stream/worker/store.py``). ``take_changes`` hands over what changed since it was last called:
    states to write and, for keys handed over before, tombstones.
    """

    def __init__(self, engine: InferenceEngine, batch_max: int, ttl_s: float = 0.0):
        self.engine = engine
        self.batch_max = batch_max
        self.ttl_s = ttl_s
        self.states: dict[int, dict[bytes, bytes]] = {}
        self.counts = RebuildCounts()
        self._changed: dict[int, set[bytes]] = {}
        self._handed: dict[int, set[bytes]] = {}  # keys written to the changelog before
        self._watermark: dict[int, float] = {}  # newest event time per partition (TTL, as the worker)
        self._swept_at: dict[int, float] = {}

    @property
    def users(self) -> int:
        return sum(len(s) for s in self.states.values())

    @property
    def state_bytes(self) -> int:
        return sum(len(v) for s in self.states.values() for v in s.values())

    def read(self, keys: Sequence[tuple[bytes, int]]) -> dict[bytes, bytes | None]:
        """The engine's state reader."""
        return {k: self.states.get(p, {}).get(k) for k, p in keys}

    def feed(self, records: Sequence[SourceRecord]) -> None:
        """Apply records in micro-batches of at most ``batch_max`` (the worker's batch bound)."""
        for i in range(0, len(records), self.batch_max):
            self._batch(records[i : i + self.batch_max])

    def _batch(self, records: Sequence[SourceRecord]) -> None:
        res = self.engine.process(records, self.read)
        c = self.counts
        c.records += sum(1 for r in records if r.topic != self.engine.control_topic)
        c.applied += res.valid - res.duplicates
        c.duplicates += res.duplicates
        c.dead_letters += len(res.dead_letters)
        c.erasures += res.erasures
        for k, (p, v) in res.states.items():
            self._put(p, k, v)
            if v is not None and self.ttl_s > 0:
                self._watermark[p] = max(self._watermark.get(p, -math.inf), _last_ts(v))
        if self.ttl_s > 0:
            for p in {p for p, _v in res.states.values()}:
                self._expire(p)

    def _put(self, p: int, k: bytes, v: bytes | None) -> None:
        part = self.states.setdefault(p, {})
        if v is None:
            part.pop(k, None)
        else:
            part[k] = v
        self._changed.setdefault(p, set()).add(k)

    def _expire(self, p: int) -> None:
        """Delete the partition's states idle longer than the TTL in event time, as the workers' sweep
        does (docs/ARCHITECTURE.md §Protocol step 4), once event time moved on enough since the last."""
        wm = self._watermark.get(p)
        if wm is None or wm - self._swept_at.get(p, -math.inf) < self.ttl_s * TTL_SWEEP_FRACTION:
            return
        self._swept_at[p] = wm
        old = [k for k, v in self.states.get(p, {}).items() if _last_ts(v) < wm - self.ttl_s]
        for k in old:
            self._put(p, k, None)
        self.counts.expired += len(old)

    def take_changes(self) -> list[tuple[bytes, int, bytes | None]]:
        """``(key, partition, state or None)`` of every key changed since the last call; a deleted key
        is listed only if it was handed over before (the changelog then needs its tombstone)."""
        out = []
        for p, keys in self._changed.items():
            part, handed = self.states.get(p, {}), self._handed.setdefault(p, set())
            for k in sorted(keys):
                v = part.get(k)
                if v is not None:
                    handed.add(k)
                    out.append((k, p, v))
                elif k in handed:
                    handed.discard(k)
                    out.append((k, p, None))
        self._changed = {}
        return out


def _last_ts(packed: bytes) -> float:
    try:
        return peek_last_ts(packed)
    except StateFormatError:  # never: every state here was packed by this process
        return -math.inf


# -- the report ------------------------------------------------------------------------------------


@dataclass
class MigrationReport:
    """What a migration did (or, dry, would do); :func:`format_report` prints it."""

    source_app_id: str
    target_app_id: str
    model: str
    model_version: str
    changelog: str
    partitions: int
    dry_run: bool
    passes: int = 0
    records: int = 0
    applied: int = 0
    dead_letters: int = 0
    duplicates: int = 0
    erasures: int = 0
    expired: int = 0
    users: int = 0
    state_bytes: int = 0
    states_written: int = 0
    tombstones_written: int = 0
    lag: int = 0
    seconds: float = 0.0
    #: Kafka timestamp of the oldest retained input record (None: the input topic is empty)
    retained_from: float | None = None
    #: input partitions whose retention deleted records: partition -> first retained offset
    truncated: dict[int, int] = field(default_factory=dict)
    #: the offsets committed for the target group: "topic:partition" -> offset
    offsets: dict[str, int] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    @property
    def events_per_s(self) -> float:
        return self.records / self.seconds if self.seconds > 0 else 0.0

    def as_dict(self) -> dict:
        from dataclasses import asdict

        return {**asdict(self), "events_per_s": round(self.events_per_s, 1)}


def format_report(r: MigrationReport, data_dir: str = "var/data") -> str:
    """The summary ``demandstream migrate`` prints, ending with what to do next."""
    when = "would rebuild" if r.dry_run else "rebuilt"
    lines = [
        f"{when} {r.users:,} users' states ({r.state_bytes / 1e6:.1f} MB) with model {r.model_version} from "
        f"{r.records:,} events in {r.seconds:.1f} s ({r.events_per_s:,.0f} events/s, {r.passes} pass"
        f"{'es' if r.passes != 1 else ''}): {r.applied:,} applied, {r.dead_letters:,} invalid, "
        f"{r.erasures:,} erasure requests honoured, {r.expired:,} states expired by the TTL",
    ]
    if r.retained_from is None:
        lines.append("retained history: the input topic is empty")
    else:
        since = datetime.fromtimestamp(r.retained_from, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
        days = max(0.0, time.time() - r.retained_from) / 86400
        cut = (
            "every partition from offset 0 (nothing deleted yet)"
            if not r.truncated
            else "retention deleted older events of partitions "
            + ", ".join(f"{p} (before offset {o:,})" for p, o in sorted(r.truncated.items()))
            + ": those users' context starts at their oldest retained event"
        )
        lines.append(f"retained history: since {since} ({days:.1f} days); {cut}")
    lines += [f"warning: {w}" for w in r.warnings]
    if r.dry_run:
        lines.append(
            f"dry run: nothing written; a real run writes {r.users:,} states to {r.changelog} and commits "
            f"group {r.target_app_id} at the applied offsets"
        )
        return "\n".join(lines)
    lines.append(
        f"wrote {r.states_written:,} states and {r.tombstones_written:,} tombstones to {r.changelog}; "
        f"group {r.target_app_id} committed at the applied offsets; lag after the last pass: {r.lag:,} events"
    )
    green_dir = f"{data_dir.rstrip('/')}-{r.target_app_id}"
    lines += [
        "next: start the green workers (a data directory of their own), wait for /readyz, then stop the "
        "blue ones; in between both emit signals, told apart by model_version:",
        f"  demandstream worker --app-id {r.target_app_id} --model {r.model} --data-dir {green_dir}",
        f"rollback: stop the green workers and start the blue ones again (app id {r.source_app_id}, the "
        "old model): their table and offsets are untouched",
    ]
    return "\n".join(lines)


# -- progress --------------------------------------------------------------------------------------


class Progress:
    """One progress line: rewritten in place on a terminal, a line every :data:`LOG_PROGRESS_S` in a log."""

    def __init__(self, enabled: bool = True, stream=None, clock: Callable[[], float] = time.monotonic):
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = self.enabled and hasattr(self.stream, "isatty") and self.stream.isatty()
        self.clock = clock
        self._last = -math.inf

    def show(self, line: str, final: bool = False) -> None:
        if not self.enabled:
            return
        now = self.clock()
        if not final and now - self._last < (TTY_PROGRESS_S if self.tty else LOG_PROGRESS_S):
            return
        self._last = now
        if self.tty:
            self.stream.write("\r\x1b[2K" + line + ("\n" if final else ""))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()


# -- the migration (Kafka) -------------------------------------------------------------------------


class Migration:
    """One ``demandstream migrate`` run: checks, passes, writes; :meth:`run` returns its report."""

    def __init__(
        self,
        settings: Settings,
        model_path: str,
        target_app_id: str,
        dry_run: bool = False,
        force: bool = False,
        accept_lost_erasures: bool = False,
        max_lag: int = MAX_LAG,
        progress: Progress | None = None,
    ):
        self.s = settings
        self.target = target_app_id
        self.dry_run = dry_run
        self.force = force
        self.accept_lost_erasures = accept_lost_erasures
        self.max_lag = max_lag
        self.progress = progress or Progress(enabled=False)
        if not target_app_id:
            raise MigrateError("--to-app-id must name the green workers' app id")
        if target_app_id == settings.app_id:
            raise MigrateError(
                f"--to-app-id {target_app_id!r} is the running workers' app id (DEMANDSTREAM_APP_ID): the "
                f"new table must be a different one, e.g. {settings.app_id}-v2"
            )
        if max_lag < 0:
            raise MigrateError("--max-lag must not be negative")
        self.model_path = model_path
        device = resolve_device(settings.device)
        ckpt = load(model_path, device)  # a file that is no checkpoint: CheckpointError, one line
        scorer = Scorer(ckpt, device, top_k=settings.top_k, max_batch=settings.batch_max)
        engine = InferenceEngine.from_settings(scorer, settings)
        self.rebuild = Rebuild(engine, settings.batch_max, settings.state_ttl_s)
        self.changelog = changelog_topic(settings, target_app_id)
        self.report = MigrationReport(
            settings.app_id, target_app_id, model_path, ckpt.model_version, self.changelog, 0, dry_run
        )
        self.partitions = 0
        self.has_control = False
        #: next offset to read, per input and control partition
        self.in_pos: dict[int, int] = {}
        self.ctl_pos: dict[int, int] = {}
        self.pending: dict[int, deque[Erasure]] = {}
        #: answers offset queries only (each read has a consumer of its own); set by :meth:`run`
        self.consumer: KafkaConsumer | None = None

    # -- run ---------------------------------------------------------------------------------------

    def run(self) -> MigrationReport:
        t0 = time.perf_counter()
        consumer = self._consumer()
        try:
            self.consumer = consumer
            occupied = self.check()
            if not self.dry_run:
                self._prepare_target(occupied)
            producer = None if self.dry_run else self._producer()
            try:
                while True:
                    self.report.passes += 1
                    self._pass(t0)
                    if producer is not None:
                        self._write(producer)
                        self._commit()
                    lag = self._lag()
                    self._update_report(lag, t0)
                    self.progress.show(self._line(lag, t0), final=True)
                    if self.dry_run or lag <= self.max_lag:
                        break
                    if self.report.passes >= MAX_PASSES:
                        self.report.warnings.append(
                            f"still {lag:,} events behind the input after {MAX_PASSES} passes (input arrives "
                            "about as fast as the replay runs): the green workers start that far behind"
                        )
                        break
            finally:
                if producer is not None:
                    producer.close()
        finally:
            consumer.close()
        return self.report

    # -- checks ------------------------------------------------------------------------------------

    def check(self) -> list[str]:
        """Refuse what must not run; return what the target already holds (empty: a clean target)."""
        s = self.s
        admin = admin_client(s)
        try:
            topics = set(admin.list_topics())
            if s.topic_input not in topics:
                raise MigrateError(
                    f"input topic {s.topic_input} does not exist at {s.broker}: nothing to migrate "
                    "(check DEMANDSTREAM_TOPIC_INPUT and --broker)"
                )
            self.has_control = s.topic_control in topics
            names = [s.topic_input] + ([s.topic_control] if self.has_control else [])
            counts = partition_counts(admin, names)
            if len(set(counts.values())) != 1:
                raise TopicMismatch(f"topics must have equal partition counts, found {counts}")
            self.partitions = self.report.partitions = counts[s.topic_input]
            occupied = []
            if self.changelog in topics:
                n = partition_counts(admin, [self.changelog])[self.changelog]
                held = sum(self._ends(self.changelog, n).values())
                if held or n != self.partitions:
                    occupied.append(f"changelog {self.changelog} holds {held:,} records in {n} partitions")
            offsets = _retry(lambda: admin.list_group_offsets({self.target: None})).get(self.target) or {}
            if offsets:
                occupied.append(f"group {self.target} has committed offsets on {len(offsets)} partitions")
            group = _retry(lambda: admin.describe_groups([self.target])).get(self.target) or {}
            source = s.app_id
            blue = _retry(lambda: admin.list_group_offsets({source: None})).get(source) or {}
        finally:
            admin.close()
        if not blue:
            # The rebuild reads the input topic, not the blue group, so it still runs; but a mistyped
            # --app-id would print a rollback to workers that never existed.
            self.report.warnings.append(
                f"group {s.app_id} (--app-id / DEMANDSTREAM_APP_ID, the running workers') has no committed "
                "offsets: no worker of that app id has consumed anything, so the rollback line names no "
                "running table; check the app id"
            )
        if group.get("members"):
            raise MigrateError(
                f"group {self.target} has {len(group['members'])} live members: stop the workers with app id "
                f"{self.target} before migrating into it"
            )
        if occupied and not self.force:
            raise MigrateError(
                f"target app id {self.target} already has a table ({'; '.join(occupied)}): choose a new "
                "--to-app-id, or pass --force to delete it and rebuild"
            )
        if occupied:
            verb = "would delete" if self.dry_run else "deletes"
            self.report.warnings.append(
                f"--force {verb} the table of app id {self.target}: {'; '.join(occupied)}"
            )
        self._check_retention()
        return occupied

    def _check_retention(self) -> None:
        """Deleted input events shorten users' context (a warning); deleted erasure requests that may
        have covered retained events would resurrect those users (refused)."""
        s, n = self.s, self.partitions
        in_start = self._starts(s.topic_input, n)
        self.in_pos = dict(in_start)
        self.report.truncated = {p: o for p, o in in_start.items() if o > 0}
        first_in = self._first_timestamps(s.topic_input, in_start)
        self.report.retained_from = min(first_in.values()) if first_in else None
        if self.report.truncated:
            self.report.warnings.append(
                f"retention deleted the oldest events of {len(self.report.truncated)} of {n} partitions of "
                f"{s.topic_input}: their users' states are rebuilt from the retained events only (keep "
                "retention.ms at least as long as the user history the model should remember)"
            )
        if not self.has_control:
            self.ctl_pos = {p: 0 for p in range(n)}
            return
        ctl_start = self._starts(s.topic_control, n)
        self.ctl_pos = dict(ctl_start)
        lost = [p for p, o in ctl_start.items() if o > 0]
        first_ctl = self._first_timestamps(s.topic_control, {p: ctl_start[p] for p in lost})
        # An erasure request deleted by retention was written before the partition's first retained
        # one; a retained event older than that may be an event it erased.
        risky = [p for p in lost if p in first_in and first_in[p] < first_ctl.get(p, math.inf)]
        if risky and not self.accept_lost_erasures:
            raise MigrateError(
                f"retention deleted erasure requests of {s.topic_control} partitions {risky} while "
                f"{s.topic_input} still holds older events there: replaying them could bring erased users "
                "back; give the control topic a retention at least the input's (retention.ms=-1: it is "
                "tiny), resend `demandstream forget` for the users concerned, and pass "
                "--accept-lost-erasures"
            )
        if risky:
            self.report.warnings.append(
                f"erasure requests of partitions {risky} were deleted by retention "
                "(--accept-lost-erasures): users they erased may be rebuilt from older retained events"
            )

    # -- reading -----------------------------------------------------------------------------------

    def _consumer(self) -> KafkaConsumer:
        try:
            return KafkaConsumer(
                bootstrap_servers=self.s.bootstrap_servers,
                group_id=None,  # reads by assignment; the target group's offsets are set by the admin
                # (``self.consumer`` only answers offset queries; each read has a consumer of its own)
                enable_auto_commit=False,
                auto_offset_reset="earliest",
                isolation_level="read_committed",
                max_poll_records=self.s.batch_max,
                client_id="demandstream-migrate",
                **self.s.kafka_python_security(),
            )
        except UNREACHABLE:
            raise KafkaUnavailable(unreachable_message(self.s)) from None

    def _tps(self, topic: str, n: int) -> list[TopicPartition]:
        return [TopicPartition(topic, p) for p in range(n)]

    def _ends(self, topic: str, n: int) -> dict[int, int]:
        return {tp.partition: o for tp, o in self.consumer.end_offsets(self._tps(topic, n)).items()}

    def _starts(self, topic: str, n: int) -> dict[int, int]:
        return {tp.partition: o for tp, o in self.consumer.beginning_offsets(self._tps(topic, n)).items()}

    def _first_timestamps(self, topic: str, starts: dict[int, int]) -> dict[int, float]:
        """Kafka timestamp (seconds) of the first retained record of each partition that has one."""
        ends = self._ends(topic, self.partitions)
        want = {p: o for p, o in starts.items() if o < ends[p]}
        out: dict[int, float] = {}
        if not want:
            return out
        c = self._consumer()  # a reader of its own: reassigning one consumer can stall its fetches
        try:
            c.assign([TopicPartition(topic, p) for p in want])
            for p, o in want.items():
                c.seek(TopicPartition(topic, p), o)
            deadline = time.monotonic() + READ_STALL_S
            while len(out) < len(want) and time.monotonic() < deadline:
                for tp, recs in c.poll(timeout_ms=500, max_records=len(want) * 50).items():
                    if recs and tp.partition not in out:
                        out[tp.partition] = recs[0].timestamp / 1000.0
                        c.pause(tp)
        finally:
            c.close()
        return out

    def _read(
        self, topic: str, positions: dict[int, int], ends: dict[int, int], handle: Callable[[dict], None]
    ) -> None:
        """Read ``topic`` from ``positions`` until every partition reached ``ends``; ``handle`` gets each
        poll's records by partition, and ``positions`` is advanced to the consumer's position after it."""
        todo = {p for p in range(self.partitions) if positions[p] < ends[p]}
        if not todo:
            return
        c = self._consumer()  # one per read, as in _first_timestamps
        tps = {p: TopicPartition(topic, p) for p in todo}
        c.assign(list(tps.values()))
        for p, tp in tps.items():
            c.seek(tp, positions[p])
        last_new = time.monotonic()
        try:
            while todo:
                polled = c.poll(timeout_ms=1000)
                if polled:
                    last_new = time.monotonic()
                    handle({tp.partition: recs for tp, recs in polled.items()})
                elif time.monotonic() - last_new > READ_STALL_S:
                    raise MigrateError(
                        f"reading {topic} stalled for {READ_STALL_S:.0f} s short of its end "
                        f"(partitions {sorted(todo)}): is the broker reachable, may this principal read it?"
                    )
                for p in list(todo):
                    positions[p] = c.position(tps[p])
                    if positions[p] >= ends[p]:
                        todo.discard(p)
                        c.pause(tps[p])  # the rest is the next pass's
        finally:
            c.close()

    def _pass(self, t0: float) -> None:
        """Control topic to its end first, then the input to the end it had then (see interleave)."""
        s, n = self.s, self.partitions
        if self.has_control:
            ctl_ends = self._ends(s.topic_control, n)
            self._read(s.topic_control, self.ctl_pos, ctl_ends, self._collect_erasures)
        in_ends = self._ends(s.topic_input, n)

        def apply(polled: dict) -> None:
            batch: list[SourceRecord] = []
            for p, recs in polled.items():
                src = [_source(r, s.topic_input) for r in recs]
                batch += interleave(src, self.pending.setdefault(p, deque()), src[-1].offset + 1)
            self.rebuild.feed(batch)
            self.progress.show(self._line(sum(in_ends[q] - self.in_pos[q] for q in range(n)), t0))

        self._read(s.topic_input, self.in_pos, in_ends, apply)
        # requests due now that the input is read this far (partitions without new events included)
        due = [
            r for p in range(n) for r in interleave((), self.pending.setdefault(p, deque()), self.in_pos[p])
        ]
        self.rebuild.feed(due)

    def _collect_erasures(self, polled: dict) -> None:
        for p, recs in polled.items():
            q = self.pending.setdefault(p, deque())
            for r in recs:
                src = _source(r, self.s.topic_control)
                at = request_input_end(src.value)
                if at is None:  # a request older than input_end: placed by time
                    at = self._offset_after(p, r.timestamp)
                q.append(Erasure(src, at))

    def _offset_after(self, p: int, ts_ms: int) -> int:
        """The first offset of input partition ``p`` whose timestamp is later than ``ts_ms``, or its end."""
        tp = TopicPartition(self.s.topic_input, p)
        found = self.consumer.offsets_for_times({tp: ts_ms + 1}).get(tp)
        return found.offset if found is not None else self.consumer.end_offsets([tp])[tp]

    def _lag(self) -> int:
        ends = self._ends(self.s.topic_input, self.partitions)
        return sum(max(0, ends[p] - self.in_pos[p]) for p in range(self.partitions))

    # -- writing -----------------------------------------------------------------------------------

    def _prepare_target(self, occupied: list[str]) -> None:
        """``--force``: delete the target's changelog and group offsets; then create its changelog."""
        s = self.s
        admin = admin_client(s)
        try:
            if occupied:
                logger.warning(
                    "--force: deleting the table of app id %s (%s)", self.target, "; ".join(occupied)
                )
                if self.changelog in set(admin.list_topics()):
                    admin.delete_topics([self.changelog])
                    deadline = time.monotonic() + TOPIC_DELETE_TIMEOUT_S
                    while self.changelog in set(admin.list_topics()):
                        if time.monotonic() > deadline:
                            raise MigrateError(
                                f"topic {self.changelog} still exists after deleting it: retry"
                            )
                        time.sleep(0.5)
                _retry(lambda: admin.delete_groups([self.target]))
            exists = self.changelog in set(admin.list_topics())
        finally:
            admin.close()
        if not exists:
            create_changelog_topic(s, self.changelog, self.partitions)

    def _producer(self) -> KafkaProducer:
        try:
            return KafkaProducer(
                bootstrap_servers=self.s.bootstrap_servers,
                client_id="demandstream-migrate",
                acks="all",  # an acknowledged state survives a broker loss, as the worker's writes
                linger_ms=5,
                batch_size=256 * 1024,
                **self.s.kafka_python_security(),
            )
        except UNREACHABLE:
            raise KafkaUnavailable(unreachable_message(self.s)) from None

    def _write(self, producer: KafkaProducer) -> None:
        """The states changed in this pass, acknowledged, before any offset is committed for them."""
        changes = self.rebuild.take_changes()
        for i in range(0, len(changes), WRITE_CHUNK):
            futures = [
                producer.send(self.changelog, key=k, value=v, partition=p)
                for k, p, v in changes[i : i + WRITE_CHUNK]
            ]
            producer.flush()
            for f in futures:
                try:
                    f.get(timeout=0)
                except KafkaError as exc:
                    raise MigrateError(
                        f"writing {self.changelog} failed ({type(exc).__name__}: {exc}); nothing was committed "
                        "for the target group: rerun with --force"
                    ) from None
        self.report.states_written += sum(1 for _k, _p, v in changes if v is not None)
        self.report.tombstones_written += sum(1 for _k, _p, v in changes if v is None)

    def _commit(self) -> None:
        """Set the target group's offsets to exactly what was applied: the next input offset of each
        partition, and the control topic's first request not yet applied."""
        s = self.s
        offsets = {TopicPartition(s.topic_input, p): o for p, o in self.in_pos.items()}
        if self.has_control:
            for p in range(self.partitions):
                q = self.pending.get(p)
                offsets[TopicPartition(s.topic_control, p)] = q[0].record.offset if q else self.ctl_pos[p]
        admin = admin_client(s)
        try:
            commit = {tp: OffsetAndMetadata(o, "", -1) for tp, o in offsets.items()}
            result = _retry(lambda: admin.alter_group_offsets(self.target, commit))
        finally:
            admin.close()
        failed = {f"{tp.topic}:{tp.partition}": e.__name__ for tp, e in result.items() if e.errno != 0}
        if failed:
            raise MigrateError(f"committing the offsets of group {self.target} failed: {failed}")
        self.report.offsets = {f"{tp.topic}:{tp.partition}": o for tp, o in sorted(offsets.items())}

    # -- reporting ---------------------------------------------------------------------------------

    def _update_report(self, lag: int, t0: float) -> None:
        r, c = self.report, self.rebuild.counts
        r.records, r.applied, r.dead_letters = c.records, c.applied, c.dead_letters
        r.duplicates, r.erasures, r.expired = c.duplicates, c.erasures, c.expired
        r.users, r.state_bytes = self.rebuild.users, self.rebuild.state_bytes
        r.lag, r.seconds = lag, time.perf_counter() - t0

    def _line(self, lag: int, t0: float) -> str:
        c, dt = self.rebuild.counts, max(1e-9, time.perf_counter() - t0)
        return (
            f"migrate pass {self.report.passes}: {self.partitions} partitions, {c.records:,} events, "
            f"{c.erasures:,} erasures, {self.rebuild.users:,} users, "
            f"lag {lag:,}, {c.records / dt:,.0f} events/s"
        )


def _retry(call: Callable):
    """``call()``, retried while the group coordinator is not available (:data:`COORDINATOR_WAIT_S`)."""
    deadline = time.monotonic() + COORDINATOR_WAIT_S
    while True:
        try:
            return call()
        except _COORDINATOR_ERRORS:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def _source(r, topic: str) -> SourceRecord:
    """A kafka-python record as the engine's :class:`SourceRecord` (timestamps in seconds)."""
    return SourceRecord(r.key, r.value, r.partition, r.offset, (r.timestamp or 0) / 1000.0, topic)


def migrate(
    settings: Settings,
    model_path: str,
    target_app_id: str,
    dry_run: bool = False,
    force: bool = False,
    accept_lost_erasures: bool = False,
    max_lag: int = MAX_LAG,
    progress: bool = False,
) -> MigrationReport:
    """Rebuild app id ``target_app_id``'s table with the model at ``model_path`` (see the module)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(MIGRATE_TORCH_THREADS)
    try:
        return Migration(
            settings,
            model_path,
            target_app_id,
            dry_run=dry_run,
            force=force,
            accept_lost_erasures=accept_lost_erasures,
            max_lag=max_lag,
            progress=Progress(enabled=progress),
        ).run()
    finally:
        torch.set_num_threads(threads)  # the caller's setting (tests run in one process)
