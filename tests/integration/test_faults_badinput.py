"""Bad input under load: garbage mixed into valid traffic never stops the worker or disturbs any state.

Records are produced with kafka-python directly (replay derives keys from the payload, a broken
producer does not): invalid UTF-8, truncated JSON, 1,000,000-byte blobs (just under the broker's
default max.message.bytes), null keys, keys that disagree with user_id, NaN, deep nesting and
tombstones, together ≥ 5 % of the records. Every garbage record becomes exactly one dead letter with
the reason the parser gives it offline, at its own partition and offset, carrying (a prefix of) its payload.
"""

from __future__ import annotations

import base64
import collections
import itertools
import random
import time

import orjson
import pytest
from kafka import KafkaProducer

from demandstream.model.core.events import BadEvent, event_to_json, parse_event
from demandstream.model.data.synth import write_jsonl
from demandstream.stream.engine.records import DLQ_RAW_MAX
from demandstream.stream.settings import Settings
from tests.integration.faults import FaultReport, check_invariants, reference_states, synth_events

pytestmark = [pytest.mark.kafka, pytest.mark.slow, pytest.mark.timeout(600)]

N_USERS, N_EVENTS, SEED = 500, 10_000, 21
#: Garbage records per valid record: 6 %, above the issue's 5 % floor.
GARBAGE_FRACTION = 0.06
#: 1 MiB blobs are expensive for a 2-core broker; a handful proves the point (too_large, 4 KiB in the DLQ).
N_BLOBS = 5
BLOB_BYTES = 1_000_000
#: Produce at this many records per second, so the garbage arrives interleaved with live traffic.
RATE = 1000
#: A fixed past ts for garbage that is otherwise a well-formed event.
GARBAGE_TS = 1_700_000_000


def garbage_kinds(rng: random.Random, users: list[str]):
    """Endless (kind, key, value) garbage records, one of each kind in turn."""
    for i in itertools.count():
        user = rng.choice(users)
        good = {"event_id": f"g{i}", "user_id": user, "ts": GARBAGE_TS, "type": "view", "item_id": "i1"}
        raw = orjson.dumps(good)
        kinds = [
            ("not_utf8", user.encode(), b"\xff\xfe" + raw),
            ("truncated", user.encode(), raw[: len(raw) // 2]),
            ("null_key", None, raw),
            ("key_mismatch", f"not-{user}".encode(), raw),
            ("nan", user.encode(), raw[:-1] + b', "price": NaN}'),
            ("deep", user.encode(), raw[:-1] + b', "x": ' + b"[" * 40 + b"]" * 40 + b"}"),
            ("tombstone", user.encode(), None),
        ]
        yield kinds[i % len(kinds)]


def expected_reason(key: bytes | None, value: bytes | None) -> str:
    """The reason the worker must give (same order as InferenceEngine.validate: payload, then key)."""
    if value is None:
        return "missing_field"
    try:
        event = parse_event(value)
    except BadEvent as bad:
        return bad.reason
    if key is None:
        return "missing_key"
    assert key != event.user_id.encode(), "garbage generator made a valid record"
    return "key_mismatch"


def test_garbage_under_load(worker_factory, stream_env, kafka_bootstrap, small_model, tmp_path):
    started = time.time()
    s = Settings.from_env(stream_env)
    events = synth_events(N_USERS, N_EVENTS, SEED)
    write_jsonl(events, tmp_path / "events.jsonl")
    reference_states(small_model, events)
    rng = random.Random(SEED)
    users = sorted({e.user_id for e in events})
    n_garbage = int(N_EVENTS * GARBAGE_FRACTION)
    garbage = garbage_kinds(rng, users)
    slots = set(rng.sample(range(N_EVENTS + n_garbage), n_garbage))
    blob_slots = set(rng.sample(sorted(slots), N_BLOBS))

    w = worker_factory().start()
    w.wait_ready()
    producer = KafkaProducer(
        bootstrap_servers=[kafka_bootstrap], acks="all", linger_ms=5, max_request_size=BLOB_BYTES + 64 * 1024
    )
    sent_bad: list[tuple] = []  # (future, reason, value, kind)
    kinds = collections.Counter()
    valid = iter(events)
    t0 = time.perf_counter()
    try:
        for i in range(N_EVENTS + n_garbage):
            if i in blob_slots:
                kind, key, value = (
                    "blob",
                    rng.choice(users).encode(),
                    bytes(rng.getrandbits(8) for _ in range(64)) * (BLOB_BYTES // 64),
                )
            elif i in slots:
                kind, key, value = next(garbage)
            else:
                e = next(valid)
                producer.send(s.topic_input, key=e.user_id.encode(), value=event_to_json(e))
                continue
            kinds[kind] += 1
            sent_bad.append(
                (producer.send(s.topic_input, key=key, value=value), expected_reason(key, value), value, kind)
            )
            ahead = i / RATE - (time.perf_counter() - t0)
            if ahead > 0:
                time.sleep(ahead)
        producer.flush(timeout=120)
    finally:
        producer.close()
    assert next(valid, None) is None
    by_offset = {}
    for fut, reason, value, kind in sent_bad:
        md = fut.get(timeout=30)
        by_offset[(md.partition, md.offset)] = (reason, value, kind)
    expected = collections.Counter(r for r, _v, _k in by_offset.values())

    def check_dead(dead: list[dict]) -> list[str]:
        problems = []
        for d in dead:
            want = by_offset.get((d["partition"], d["offset"]))
            if want is None:
                problems.append(
                    f"dead letter for a valid record at {d['partition']}/{d['offset']}: {d['reason']}"
                )
                continue
            reason, value, kind = want
            raw = base64.b64decode(d["raw"]) if d.get("raw_encoding") == "base64" else d["raw"].encode()
            payload = value or b""
            written = len(orjson.dumps(d["raw"])) - 2  # the cap counts the JSON written (escapes, base64)
            if d["reason"] != reason or d["topic"] != s.topic_input:
                problems.append(f"{kind} at {d['offset']}: reason {d['reason']}, expected {reason}")
            # the whole payload, or its longest prefix that fits: one more character (<= 6 bytes) would not
            if not (payload.startswith(raw) and (raw == payload or DLQ_RAW_MAX - 6 < written <= DLQ_RAW_MAX)):
                problems.append(
                    f"{kind} at {d['offset']}: raw is not the payload's first {DLQ_RAW_MAX} bytes as written"
                )
            if d.get("raw_truncated") != (len(raw) < len(payload)):
                problems.append(f"{kind} at {d['offset']}: raw_truncated={d.get('raw_truncated')}")
        return problems

    report = FaultReport(
        "bad input under load",
        s.guarantee,
        N_EVENTS,
        N_USERS,
        garbage=n_garbage,
        faults=[f"{n} {k}" for k, n in sorted(kinds.items())],
    )
    check_invariants(
        report,
        bootstrap=kafka_bootstrap,
        settings=s,
        model_path=small_model,
        events=events,
        records_in=N_EVENTS + n_garbage,
        expected_reasons=expected,
        started=started,
        check_dead=check_dead,
        served=w.get,
    )
    assert report.duplicates == 0 and report.duplicate_dead_letters == 0  # no fault, so no redelivery
    assert w.proc.poll() is None, "the worker died"
    assert w.metric("demandstream_events_total", result="invalid") == n_garbage
    assert sum(w.metric("demandstream_dead_letters_total", reason=r) for r in expected) == n_garbage
