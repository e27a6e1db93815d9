"""The micro-batch engine: Kafka records in, signals, dead letters and new user states out.

Plain synchronous code, no Faust: the agent (stream/worker/agents.py) hands it a batch of records and a
function that reads stored states; it returns everything the agent must write. That keeps the
business logic testable without a broker and keeps the agent short.

Per batch (step 1 of docs/ARCHITECTURE.md §Protocol, in this order):
1. *validate* every record (bad ones become dead letters with a reason code);
2. *group* valid events by user, keeping partition-offset order inside each user;
3. *read* the users' stored states in one call and decode them together into one
   :class:`~demandstream.model.core.state_batch.StateBatch`; a state of another model_version is not reused;
4. *skip* events at or below the offset already applied to a user's state (redelivery after a crash);
5. *step*: one batched model call advances every user by all of its events in order
   (:meth:`~demandstream.model.core.scoring.Scorer.step_rows`), so several events of one user in a batch apply in order;
6. *emit* one signal per applied event and the new state of every touched user (encoded together).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import orjson

from demandstream.model.core.events import BadEvent, Event, parse_event
from demandstream.model.core.scoring import Scorer
from demandstream.model.core.state_batch import StateBatch
from demandstream.stream.engine.records import (
    RECORD_MAX,
    dead_letter_key,
    encode_dead_letter,
    encode_redacted_dead_letter,
    encode_signal,
    state_key,
)
from demandstream.stream.engine.why import LatestWhy

logger = logging.getLogger(__name__)

#: An erasure request (``demandstream forget``) is a record of the control topic, keyed by the user and
#: in the partition number of the user's events, whose value has this field. Only the control topic is
#: obeyed (docs/ARCHITECTURE.md §Topics): a record like it on the input topic, which every shop may
#: write, is not an event and becomes a dead letter.
CONTROL_FIELD = "demandstream_control"


_DECIMAL = re.compile(r"-?[0-9]{1,20}")


def _key_hint(key: bytes, user_id: str) -> str:
    """What a mismatched key looks like, where it is the user id in a Java serializer's binary form.

    >>> _key_hint((1234567).to_bytes(8, "big"), "1234567")
    ": it is the user id as a 8-byte big-endian integer (Java's LongSerializer); key events by the user_id's UTF-8 string"
    >>> _key_hint(b"u2", "u1"), _key_hint(bytes([0, 0, 0, 2]), "²"), _key_hint(bytes([0, 0, 0, 5]), "--5")
    ('', '', '')
    """
    # ASCII digits only: str.isdigit() also takes "²", which int() refuses, and a dead letter's detail
    # must never raise
    if len(key) in (4, 8) and _DECIMAL.fullmatch(user_id):
        if int.from_bytes(key, "big", signed=True) == int(user_id):
            java = "LongSerializer" if len(key) == 8 else "IntegerSerializer"
            return (
                f": it is the user id as a {len(key)}-byte big-endian integer (Java's {java}); key events by "
                "the user_id's UTF-8 string"
            )
    return ""


@dataclass(slots=True)
class SourceRecord:
    """One consumed Kafka record (what the engine needs of it)."""

    key: bytes | None
    value: bytes | None
    partition: int
    offset: int
    timestamp: float = 0.0  # broker/producer timestamp, seconds
    topic: str = ""  # the input topic unless it names the engine's control topic


@dataclass
class Output:
    """A record to produce: ``partition`` is the source partition (co-partitioned topics)."""

    key: bytes | None
    value: bytes
    partition: int


@dataclass
class BatchResult:
    signals: list[Output] = field(default_factory=list)
    dead_letters: list[Output] = field(default_factory=list)
    reasons: Counter = field(default_factory=Counter)
    #: table key (:func:`~demandstream.stream.engine.records.state_key`) -> (partition, packed state or
    #: None to delete), for every user whose state changed
    states: dict[bytes, tuple[int, bytes | None]] = field(default_factory=dict)
    #: produce time (Kafka record timestamp, else event ts) of each signal, for the latency histogram
    signal_ts: list[float] = field(default_factory=list)
    valid: int = 0
    duplicates: int = 0
    erasures: int = 0  # erasure requests (control records) obeyed
    undecodable: int = 0  # stored states that could not be decoded and were reset
    rounds: int = 0  # model calls for the batch: 1, plus one per erasure that splits a user's events
    new_users: int = 0
    inference_s: list[float] = field(default_factory=list)
    #: per model round, per user: (the state's previous event as ``(last_ts, last_top, last_propensity,
    #: partition, offset)``, None for a fresh state; the events; their records; their predictions), for
    #: category demand (stream/engine/demand.py)
    applied: list[tuple] = field(default_factory=list)


StateReader = Callable[[Sequence[tuple[bytes, int]]], dict[bytes, bytes | None]]


class Pseudonymizer:
    """Keyed HMAC-SHA256 of user ids, so raw ids never reach state or output when a key is set.

    >>> Pseudonymizer("k").user("u42") == Pseudonymizer("k").user("u42") != Pseudonymizer("k2").user("u42")
    True
    """

    def __init__(self, key: str):
        self._key = key.encode("utf-8")

    def user(self, user_id: str) -> str:
        return self.raw(user_id.encode("utf-8"))

    def raw(self, data: bytes) -> str:
        """The pseudonym of any bytes (a record key that is no valid id): ``user(u) == raw(u.encode())``."""
        return self.digest(data)[:32]

    def digest(self, data: bytes) -> str:
        """The whole keyed hash in hex (a dead letter's ``raw_hmac``)."""
        return hmac.new(self._key, data, hashlib.sha256).hexdigest()


class InferenceEngine:
    def __init__(
        self,
        scorer: Scorer,
        input_topic: str = "clickstream",
        pseudonym_key: str = "",
        clock: Callable[[], float] = time.time,
        control_topic: str = "clickstream-control",
        previous_pseudonym_key: str = "",
    ):
        self.scorer = scorer
        self.input_topic = input_topic
        self.control_topic = control_topic
        self.pseudonymizer = Pseudonymizer(pseudonym_key) if pseudonym_key else None
        #: the key before a rotation: an erasure also deletes the state kept under the old pseudonym
        self.previous = (
            Pseudonymizer(previous_pseudonym_key)
            if pseudonym_key and previous_pseudonym_key and previous_pseudonym_key != pseudonym_key
            else None
        )
        self.clock = clock
        self.version_resets = 0
        #: partitions whose undecodable states were already logged (then only counted)
        self.undecodable_logged: set[int] = set()
        #: the ``why`` of each recently active user's latest signal, for the query API (``why_top`` > 0)
        self.latest_why = LatestWhy()

    @classmethod
    def from_settings(cls, scorer: Scorer, settings) -> InferenceEngine:
        """The engine a worker runs for ``settings`` (a :class:`demandstream.stream.settings.Settings`; not
        imported: the engine layer stays free of the application's settings): its topics and pseudonym
        keys. ``demandstream migrate`` builds its engine here too, so a rebuilt state is what the worker
        would have made."""
        return cls(
            scorer,
            settings.topic_input,
            settings.pseudonym_key,
            control_topic=settings.topic_control,
            previous_pseudonym_key=settings.pseudonym_key_previous,
        )

    # -- step 1 ---------------------------------------------------------------------------------

    def validate(self, rec: SourceRecord, now: float) -> Event:
        """The record's event, or raise BadEvent (also for transport problems: key missing/mismatched)."""
        if rec.value is None:
            raise BadEvent("missing_field", "record has no value (tombstone)")
        event = parse_event(rec.value, now=now)
        if rec.key is None:
            raise BadEvent("missing_key", "records must be keyed by user_id so a user's events stay in order")
        if rec.key != event.user_id.encode("utf-8"):
            raise BadEvent(
                "key_mismatch",
                f"record key {rec.key[:64]!r} differs from user_id{_key_hint(rec.key, event.user_id)}",
            )
        return event

    # -- the batch ------------------------------------------------------------------------------

    def process(self, records: Iterable[SourceRecord], read_states: StateReader) -> BatchResult:
        now = self.clock()
        res = BatchResult()
        # Per user id (or pseudonym); a None event is an erasure request at that position in its sequence.
        by_user: dict[str, list[tuple[Event | None, SourceRecord]]] = {}
        for rec in records:
            if rec.topic == self.control_topic:
                uids = self._control_users(rec)
                if not uids:
                    self._dead_letter(
                        res, rec, "bad_control", "not an erasure request of its key's user", now
                    )
                    continue
                for uid in uids:
                    by_user.setdefault(uid, []).append((None, rec))
                res.erasures += 1
                continue
            try:
                event = self.validate(rec, now)
            except BadEvent as bad:
                self._dead_letter(res, rec, bad.reason, bad.detail, now)
                continue
            res.valid += 1
            uid = self.pseudonymizer.user(event.user_id) if self.pseudonymizer else event.user_id
            by_user.setdefault(uid, []).append((event, rec))
        if not by_user:
            return res

        # Users' states are stored under their own namespace of keys, never under one of Faust's.
        keys = {uid: state_key(uid) for uid in by_user}
        stored = read_states([(keys[uid], evs[0][1].partition) for uid, evs in by_user.items()])
        # Every user's state as one row of arrays, decoded from the records at once (state_batch.py).
        row = {uid: i for i, uid in enumerate(by_user)}
        batch = self._load_batch([stored.get(keys[uid]) for uid in by_user], by_user, res)
        partition_of, offset_of = batch.partition, batch.offset
        pending: dict[str, list[tuple[Event, SourceRecord]]] = {}
        for uid, evs in by_user.items():
            r = row[uid]
            p, o = partition_of[r], offset_of[r]
            # a redelivered record: same partition, offset at or below the last one applied
            todo = [(e, rec) for e, rec in evs if e is None or not (rec.partition == p and rec.offset <= o)]
            res.duplicates += len(evs) - len(todo)
            if todo:
                pending[uid] = todo
        touched = list(pending)

        version = self.scorer.model_version
        forgotten: set[str] = set()
        rnd = 0
        while pending:
            # One model call for every user's events up to its next erasure request (usually all).
            users, seqs, recs = [], [], []
            for k, lst in list(pending.items()):
                i = 0
                while i < len(lst) and lst[i][0] is None:  # erasure: drop everything applied so far
                    batch.reset(row[k])
                    forgotten.add(k)
                    i += 1
                j = i
                while j < len(lst) and lst[j][0] is not None:
                    j += 1
                if j > i:
                    users.append(k)
                    seqs.append([e for e, _r in lst[i:j]])
                    recs.append([r for _e, r in lst[i:j]])
                if j < len(lst):
                    pending[k] = lst[j:]
                else:
                    del pending[k]
            if not users:
                continue
            rows = [row[k] for k in users]
            prev = [
                (batch.last_ts(r), batch.last_top[r], batch.last_propensity[r], partition_of[r], offset_of[r])
                if batch.events_seen(r)
                else None
                for r in rows
            ]
            t0 = time.perf_counter()
            preds = self.scorer.step_rows(seqs, batch, rows)
            res.inference_s.append(time.perf_counter() - t0)
            res.applied.extend(zip(prev, seqs, recs, preds, strict=True))
            rnd += 1
            emitted = self.clock()
            for uid, r, evs, rs, ps in zip(users, rows, seqs, recs, preds, strict=True):
                partition_of[r], offset_of[r] = rs[-1].partition, rs[-1].offset
                out_key = uid.encode("utf-8")
                for e, rec, p in zip(evs, rs, ps, strict=True):
                    value = encode_signal(uid, e.event_id, e.ts, version, p, emitted)
                    if len(out_key) + len(value) > RECORD_MAX:  # only with a very large top-k
                        detail = f"its signal would take {len(out_key) + len(value)} bytes > {RECORD_MAX}"
                        self._dead_letter(res, rec, "too_large", detail, now)
                        continue
                    res.signals.append(Output(out_key, value, rec.partition))
                    # Latency is measured from the record's Kafka timestamp (when the shop produced
                    # it), not the event's own ts, so replays of old logs do not read as days late.
                    res.signal_ts.append(rec.timestamp or e.ts)
                if ps[-1].why is not None:
                    self.latest_why.put(uid, ps[-1].events_seen, version, ps[-1].why)
        res.rounds = rnd
        gone = {uid for uid in forgotten if batch.events_seen(row[uid]) == 0}  # no event since the erasure
        for uid in gone:
            self.latest_why.forget(uid)
        kept = [uid for uid in touched if uid not in gone]
        records = dict(zip(kept, batch.encode([row[uid] for uid in kept], version), strict=True))
        for uid in touched:
            if uid in gone:
                res.states[keys[uid]] = (by_user[uid][0][1].partition, None)  # tombstone in the changelog
            else:
                res.states[keys[uid]] = (partition_of[row[uid]], records[uid])
        return res

    def _dead_letter(self, res: BatchResult, rec: SourceRecord, reason: str, detail: str, now: float) -> None:
        """Add the dead letter of ``rec``: it fits the DLQ topic whatever the record held (records.py)."""
        res.reasons[reason] += 1
        topic = rec.topic or self.input_topic
        p = self.pseudonymizer
        if p is None:
            value = encode_dead_letter(
                reason, detail, rec.key, rec.value, topic, rec.partition, rec.offset, now
            )
            res.dead_letters.append(Output(dead_letter_key(rec.key), value, rec.partition))
            return
        # Pseudonymised: no raw id and no raw payload in the dead-letter topic (it is not the shop's).
        pseudonym = None if rec.key is None else p.raw(rec.key)
        raw_hmac = None if rec.value is None else p.digest(rec.value)
        value = encode_redacted_dead_letter(
            reason, pseudonym, rec.value, raw_hmac, topic, rec.partition, rec.offset, now
        )
        res.dead_letters.append(
            Output(None if pseudonym is None else pseudonym.encode(), value, rec.partition)
        )

    def _control_users(self, rec: SourceRecord) -> list[str]:
        """The users (ids or pseudonyms, the previous key's included) whose states an erasure request of
        the control topic deletes; empty if the record is not a well-formed request of its key's user."""
        if rec.value is None:
            return []
        try:
            obj = orjson.loads(rec.value)
        except orjson.JSONDecodeError:
            return []
        if not isinstance(obj, dict):
            return []
        uid = obj.get(CONTROL_FIELD) == "forget" and obj.get("user_id")
        if not isinstance(uid, str) or not uid or rec.key != uid.encode("utf-8"):
            return []
        if self.pseudonymizer is None:
            return [uid]
        return [self.pseudonymizer.user(uid)] + ([self.previous.user(uid)] if self.previous else [])

    def _load_batch(self, raws: list[bytes | None], by_user: dict, res: BatchResult) -> StateBatch:
        """The users' stored states as one :class:`StateBatch`, in the order of ``by_user``; a user
        without a usable state (none stored, undecodable, made by another model) starts fresh."""
        cfg, version = self.scorer.cfg, self.scorer.model_version
        batch, status = StateBatch.decode(raws, cfg.layers, cfg.hidden, cfg.history_slots, version)
        for st, evs in zip(status, by_user.values(), strict=True):
            if st == "ok":
                continue
            res.new_users += 1
            if st == "other_version":
                # docs/ARCHITECTURE.md §State: state made by another model is never fed to a different model.
                self.version_resets += 1
            elif st != "absent":
                # The user starts fresh. Counted (demandstream_undecodable_states_total), logged once per
                # partition: a table written by an incompatible release would otherwise log every user.
                res.undecodable += 1
                partition = evs[0][1].partition
                if partition not in self.undecodable_logged:
                    self.undecodable_logged.add(partition)
                    logger.warning(
                        "partition %d: discarding an undecodable user state (%s); the user starts fresh. "
                        "Further ones on this partition are only counted (demandstream_undecodable_states_total)",
                        partition,
                        st.removeprefix("undecodable: "),
                    )
        return batch
