"""Poison records through the engine: hostile ids never address Faust's keys, no output outgrows its topic.

The store here stands in for one RocksDB partition as Faust keeps it: the table's keys and Faust's own
changelog-offset key in one key space. ``tests/integration/test_faults_poison.py`` runs the same
records through a real worker and broker, with a crash between two phases.
"""

from __future__ import annotations

import orjson
from faust.stores.rocksdb import Store
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from demandstream.model.core.events import MAX_ID_CHARS, REASONS, Event, event_to_json
from demandstream.model.core.state import unpack
from demandstream.stream.engine import inference
from demandstream.stream.engine.inference import InferenceEngine, SourceRecord
from demandstream.stream.engine.records import DLQ_KEY_MAX, RECORD_MAX, STATE_KEY_PREFIX, state_key
from tests.unit.stream.engine.test_fuzz_parser import NOW, scorer

FAUST_OFFSET_KEY = Store.offset_key
#: What Faust keeps under its offset key: a changelog offset as decimal text.
PERSISTED_OFFSET = b"41"
#: Valid user ids that look like keys: Faust's own, namespaced-looking, control characters, the longest.
HOSTILE_IDS = [FAUST_OFFSET_KEY.decode(), "u:u1", "u1", "\x00", "\U0001f600" * MAX_ID_CHARS, "__faust"]


class FaustLikeStore:
    """A table partition's key space as Faust's RocksDB store has it: Faust's offset key among the states."""

    def __init__(self):
        self.data: dict[bytes, bytes | None] = {FAUST_OFFSET_KEY: PERSISTED_OFFSET}
        self.reads: list[bytes] = []

    def read(self, keys):
        self.reads.extend(k for k, _p in keys)
        return {k: self.data.get(k) for k, _p in keys}

    def apply(self, res):
        for k, (_p, v) in res.states.items():
            self.data[k] = v


def event(i: int, uid: str, category: str = "shoes") -> Event:
    return Event(f"e{i}", uid, NOW - 1000 + i, "view", "i1", category, 1.0)


#: Valid events of hostile users, with category names up to the 16 KiB an event may take as JSON.
hostile_events = st.builds(
    event,
    st.integers(0, 10_000),
    st.sampled_from(HOSTILE_IDS),
    st.sampled_from(["shoes", "\x01" * 2600, "é" * 7000, '"' * 5000]),
)
huge = st.sampled_from([1, 513, 4096, 1_040_000])
#: What one record (key + value) may weigh to enter a topic: the broker's default max.message.bytes
#: (1,048,588) less the record's own overhead. A larger record never reaches a worker.
RECORD_IN_MAX = 1_048_000
#: Invalid records (key, value): Faust's key as a record key, keys and values up to what a broker accepts.
poison = st.tuples(
    st.none() | st.sampled_from([FAUST_OFFSET_KEY, b"u:u1", b"\xff" * 2]) | huge.map(lambda n: b"k" * n),
    st.none() | st.sampled_from([b"{oops", b"\x01" * 4096, b"\xff\xfe"]) | huge.map(lambda n: b"\x01" * n),
).filter(lambda kv: len(kv[0] or b"") + len(kv[1] or b"") <= RECORD_IN_MAX)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)
@given(
    st.lists(
        hostile_events.map(lambda e: (e.user_id.encode(), event_to_json(e))) | poison, min_size=1, max_size=20
    )
)
def test_hostile_records_never_touch_faust_s_keys_and_every_output_fits(items):
    records = [SourceRecord(k, v, 0, i) for i, (k, v) in enumerate(items)]
    engine = InferenceEngine(scorer(), clock=lambda: NOW)
    store = FaustLikeStore()
    res = engine.process(records, store.read)
    store.apply(res)
    assert store.data[FAUST_OFFSET_KEY] == PERSISTED_OFFSET
    assert all(k.startswith(STATE_KEY_PREFIX) for k in [*store.reads, *res.states])
    assert len(records) == len(res.signals) + len(res.dead_letters)
    for out in res.signals + res.dead_letters:
        assert len(out.key or b"") + len(out.value) <= RECORD_MAX
    for d in res.dead_letters:
        assert len(d.key or b"") <= DLQ_KEY_MAX and orjson.loads(d.value)["reason"] in REASONS
    # every user's state counts exactly its events, whatever its id looked like
    for uid in {orjson.loads(s.value)["user_id"] for s in res.signals}:
        n = sum(1 for s in res.signals if orjson.loads(s.value)["user_id"] == uid)
        assert unpack(store.data[state_key(uid)]).events_seen == n


def test_the_user_whose_id_is_faust_s_offset_key_keeps_its_state_across_batches():
    uid = FAUST_OFFSET_KEY.decode()
    engine, store = InferenceEngine(scorer(), clock=lambda: NOW), FaustLikeStore()
    for i in range(3):
        store.apply(
            engine.process([SourceRecord(FAUST_OFFSET_KEY, event_to_json(event(i, uid)), 0, i)], store.read)
        )
        store.data[FAUST_OFFSET_KEY] = str(i).encode()  # Faust persists the changelog offset after a batch
    assert unpack(store.data[state_key(uid)]).events_seen == 3


def test_a_signal_that_would_not_fit_becomes_a_dead_letter(monkeypatch):
    """Only a very large top-k could make one; the event is still applied, its record still accounted for."""
    monkeypatch.setattr(inference, "RECORD_MAX", 100)
    store = FaustLikeStore()
    res = InferenceEngine(scorer(), clock=lambda: NOW).process(
        [SourceRecord(b"u1", event_to_json(event(1, "u1")), 2, 7)], store.read
    )
    store.apply(res)
    assert res.signals == [] and res.reasons == {"too_large": 1}
    d = orjson.loads(res.dead_letters[0].value)
    assert (d["reason"], d["partition"], d["offset"]) == ("too_large", 2, 7) and "signal" in d["detail"]
    assert res.dead_letters[0].partition == 2
    assert unpack(store.data[state_key("u1")]).events_seen == 1
