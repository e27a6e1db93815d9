"""Fuzzing the input boundary: any bytes become an Event or a BadEvent with a known reason, never a crash.

Two layers are fuzzed with hypothesis: :func:`demandstream.model.core.events.parse_event` (arbitrary bytes, arbitrary
JSON, mutated valid events) and :meth:`demandstream.stream.engine.inference.InferenceEngine.process` (random Kafka records,
None keys and values included), where every record in must come out as exactly one of: a signal, a
dead letter, a skipped duplicate or an erasure.
"""

from __future__ import annotations

import functools
import json
import math

import orjson
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from demandstream.model.core.checkpoint import Checkpoint
from demandstream.model.core.events import EVENT_TYPES, MAX_ID_CHARS, REASONS, BadEvent, Event, parse_event
from demandstream.model.core.features import Vocabulary
from demandstream.model.core.network import DemandLSTM, ModelConfig
from demandstream.model.core.scoring import Scorer
from demandstream.stream.engine.inference import InferenceEngine, SourceRecord
from tests.unit.stream.engine.test_inference import MemoryStates

#: A fixed "now" so ts validity does not depend on when the test runs (2024-11-22).
NOW = 1_732_300_000.0
#: Examples per property: enough to hit every reason code in a few seconds on a shared 2-core box.
EXAMPLES = 100
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])

VALID = {
    "event_id": "e1",
    "user_id": "u1",
    "ts": NOW - 60,
    "type": "view",
    "item_id": "i1",
    "category": "shoes",
    "price": 9.5,
    "query": None,
    "session_id": "s1",
}

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=40)
)
json_values = st.recursive(
    json_scalars,
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=10), kids, max_size=4),
    max_leaves=20,
)


def dumps(value: object) -> bytes:
    """JSON bytes of any generated value (stdlib json: unlike orjson it writes integers beyond 64 bits)."""
    return json.dumps(value).encode("utf-8")


def outcome(raw: bytes | str) -> Event | BadEvent:
    """What parse_event makes of ``raw``; any exception other than BadEvent fails the test."""
    try:
        return parse_event(raw, now=NOW)
    except BadEvent as bad:
        return bad


def assert_well_formed(result: Event | BadEvent) -> None:
    if isinstance(result, BadEvent):
        assert result.reason in REASONS, result.reason
        return
    assert 1 <= len(result.event_id) <= MAX_ID_CHARS and 1 <= len(result.user_id) <= MAX_ID_CHARS
    assert result.type in EVENT_TYPES
    assert math.isfinite(result.ts) and result.ts <= NOW + 86_400
    assert result.price is None or (math.isfinite(result.price) and result.price >= 0)
    assert result.type == "search" or result.item_id


@FUZZ
@given(st.binary(max_size=300))
def test_arbitrary_bytes(raw):
    assert_well_formed(outcome(raw))


@FUZZ
@given(st.text(max_size=300))
def test_arbitrary_text(raw):
    assert_well_formed(outcome(raw))


@FUZZ
@given(json_values)
def test_arbitrary_json(value):
    result = outcome(dumps(value))
    assert_well_formed(result)
    if not isinstance(value, dict):
        assert isinstance(result, BadEvent) and result.reason == "not_object"


@FUZZ
@given(
    st.dictionaries(st.sampled_from(sorted(VALID)), json_values, max_size=4),
    st.sets(st.sampled_from(sorted(VALID)), max_size=3),
)
def test_mutated_valid_event(replace, drop):
    obj = {k: v for k, v in (VALID | replace).items() if k not in drop}
    result = outcome(dumps(obj))
    assert_well_formed(result)
    if not replace and not drop:
        assert isinstance(result, Event)
    if drop & {"event_id", "user_id", "ts", "type"} and not replace:
        assert isinstance(result, BadEvent) and result.reason == "missing_field"


@FUZZ
@given(st.integers(0, 200), st.binary(min_size=1, max_size=8), st.sampled_from(["cut", "flip", "insert"]))
def test_byte_mutations_of_a_valid_event(pos, junk, how):
    raw = orjson.dumps(VALID)
    pos = min(pos, len(raw) - 1)
    if how == "cut":
        mutated = raw[:pos]
    elif how == "flip":
        mutated = raw[:pos] + bytes([raw[pos] ^ junk[0]]) + raw[pos + 1 :]
    else:
        mutated = raw[:pos] + junk + raw[pos:]
    assert_well_formed(outcome(mutated))


def test_hostile_payloads_get_their_reasons():
    deep = b'{"event_id": "e", "a": ' + b"[" * 5000 + b"]" * 5000 + b"}"
    cases = {
        b"\xff\xfe\x00garbage": "not_utf8",
        b'{"event_id": "e1", "user_id": "u1"': "not_json",
        b'{"event_id": "e1", "user_id": "u1", "ts": 1732300000, "type": "view", "item_id": "i", "price": NaN}': "not_json",
        deep: "too_deep",
        b"x" * 1_000_000: "too_large",
        b"": "not_json",
    }
    for raw, reason in cases.items():
        result = outcome(raw)
        assert isinstance(result, BadEvent) and result.reason == reason, (raw[:40], result)


# -- the engine -------------------------------------------------------------------------------------


@functools.cache
def scorer() -> Scorer:
    torch.manual_seed(0)
    cats = ["<unk>", "shoes", "bags"]
    return Scorer(
        Checkpoint(
            DemandLSTM(ModelConfig(n_categories=len(cats), hidden=8)).eval(), Vocabulary(cats), "0a1b2c3d"
        ),
        top_k=2,
    )


USERS = ["u1", "u2", "u3"]


def valid_value(i: int, user: str) -> bytes:
    return orjson.dumps(VALID | {"event_id": f"e{i}", "user_id": user, "ts": NOW - 1000 + i})


record_value = (
    st.builds(valid_value, st.integers(0, 10_000), st.sampled_from(USERS))
    | st.binary(max_size=64)
    | st.none()
    | json_values.map(dumps)
)
record_key = st.sampled_from(USERS).map(str.encode) | st.none() | st.binary(max_size=8)


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(record_key, record_value, st.integers(0, 2)), max_size=40), st.booleans())
def test_engine_accounts_for_every_record(items, with_valid_keys):
    """in = signals + dead letters + duplicates (+ erasures), also when the batch is delivered twice."""
    offsets = [0, 0, 0]
    records = []
    for key, value, part in items:
        if with_valid_keys and value is not None and key is not None:
            try:  # give well-formed events their own user as key half of the time
                key = parse_event(value, now=NOW).user_id.encode()
            except BadEvent:
                pass
        if key is not None and key.decode("utf-8", "replace") in USERS:
            part = USERS.index(key.decode())  # a keyed user's records share one partition, as in Kafka
        records.append(SourceRecord(key, value, part, offsets[part]))
        offsets[part] += 1
    engine = InferenceEngine(scorer(), clock=lambda: NOW)
    store = MemoryStates()
    first = engine.process(records, store.read)
    store.apply(first)
    assert len(records) == len(first.signals) + len(first.dead_letters) + first.duplicates + first.erasures
    assert all(r in REASONS for r in first.reasons)
    assert sum(first.reasons.values()) == len(first.dead_letters)
    # Redelivery of the same batch: every event already applied is skipped, nothing is signalled again.
    again = engine.process(records, store.read)
    assert len(again.signals) == 0
    assert again.duplicates == len(first.signals)
    assert len(again.dead_letters) == len(first.dead_letters)
