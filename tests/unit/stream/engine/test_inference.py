"""The micro-batch engine without a broker: order, redelivery, dead letters, erasure, model versions."""

from __future__ import annotations

import orjson
import pytest
import torch

from demandstream.model.core.checkpoint import Checkpoint
from demandstream.model.core.events import Event, event_to_json
from demandstream.model.core.features import Vocabulary
from demandstream.model.core.network import DemandLSTM, ModelConfig
from demandstream.model.core.scoring import Scorer
from demandstream.model.core.state import SUMMARY_FIELDS, unpack
from demandstream.stream.engine.inference import InferenceEngine, Pseudonymizer, SourceRecord
from demandstream.stream.engine.records import state_key
from demandstream.stream.tools.forget import forget_record

CATS = ["<unk>", "shoes", "bags", "hats"]
U1 = state_key("u1")


@pytest.fixture
def scorer():
    torch.manual_seed(0)
    return Scorer(
        Checkpoint(
            DemandLSTM(ModelConfig(n_categories=len(CATS), hidden=16)).eval(), Vocabulary(CATS), "0a1b2c3d"
        ),
        top_k=3,
    )


def ev(i: int, user: str, cat: str = "shoes", etype: str = "view") -> Event:
    return Event(f"e{i}", user, 1.73e9 + i, etype, f"i{i % 7}", cat, 10.0 + i)


def rec(e: Event, offset: int, partition: int = 0, key: bytes | None = None) -> SourceRecord:
    return SourceRecord(key if key is not None else e.user_id.encode(), event_to_json(e), partition, offset)


class MemoryStates:
    def __init__(self):
        self.data: dict[bytes, bytes | None] = {}

    def read(self, keys):
        return {k: self.data.get(k) for k, _p in keys}

    def apply(self, res):
        for k, (_p, v) in res.states.items():
            self.data[k] = v


def run(engine, store, records):
    res = engine.process(records, store.read)
    store.apply(res)
    return res


def test_events_of_one_user_in_one_batch_apply_in_order(scorer):
    """Batched (several events of a user per batch) equals one event per batch."""
    events = [ev(i, f"u{i % 3}", CATS[1 + i % 3]) for i in range(12)]
    records = [rec(e, i) for i, e in enumerate(events)]
    a, b = MemoryStates(), MemoryStates()
    batched = run(InferenceEngine(scorer), a, records)
    single = [run(InferenceEngine(scorer), b, [r]) for r in records]
    assert batched.rounds == 1  # one model call for the whole batch, 4 events per user
    sig_batched = {orjson.loads(o.value)["event_id"]: orjson.loads(o.value) for o in batched.signals}
    for res in single:
        s = orjson.loads(res.signals[0].value)
        t = sig_batched[s["event_id"]]
        assert s["events_seen"] == t["events_seen"]
        assert abs(s["purchase_propensity"] - t["purchase_propensity"]) < 1e-6
    # same state up to float rounding: BLAS sums in a different order for another batch size
    assert a.data.keys() == b.data.keys()
    for k in a.data:
        sa, sb = unpack(a.data[k]), unpack(b.data[k])
        for f in ("offset", *SUMMARY_FIELDS):
            assert getattr(sa, f) == getattr(sb, f), f
        assert abs(sa.h - sb.h).max() <= 1e-6 and abs(sa.c - sb.c).max() <= 1e-6
    # signals of a user come out in offset order
    u0 = [orjson.loads(o.value)["event_id"] for o in batched.signals if o.key == b"u0"]
    assert u0 == ["e0", "e3", "e6", "e9"]


def test_numeric_user_ids_are_keyed_by_their_decimal_string_and_a_java_long_key_is_named(scorer):
    raw = orjson.dumps({"event_id": 1, "user_id": 1234567, "ts": 1.73e9, "type": "view", "item_id": 7})
    records = [
        SourceRecord(b"1234567", raw, 0, 1),  # the user id's decimal string: applied
        SourceRecord((1234567).to_bytes(8, "big"), raw, 0, 2),  # Java's LongSerializer
    ]
    res = run(InferenceEngine(scorer), MemoryStates(), records)
    assert res.valid == 1 and len(res.signals) == 1
    (d,) = (orjson.loads(x.value) for x in res.dead_letters)
    assert d["reason"] == "key_mismatch" and "Java's LongSerializer" in d["detail"]


def test_redelivered_records_are_skipped(scorer):
    store = MemoryStates()
    records = [rec(ev(i, "u1"), i) for i in range(5)]
    first = run(InferenceEngine(scorer), store, records)
    snapshot = dict(store.data)
    again = run(InferenceEngine(scorer), store, records[2:] + [rec(ev(5, "u1"), 5)])
    assert first.valid == 5 and len(first.signals) == 5
    assert again.duplicates == 3 and len(again.signals) == 1
    s = unpack(store.data[U1])
    assert (s.events_seen, s.offset) == (6, 5)
    assert snapshot != store.data


def test_bad_records_become_dead_letters_with_reasons(scorer):
    good = ev(1, "u1")
    records = [
        SourceRecord(b"u1", b"{not json", 0, 1),
        SourceRecord(None, event_to_json(good), 0, 2),
        SourceRecord(b"u2", event_to_json(good), 0, 3),
        SourceRecord(b"u1", None, 0, 4),
        rec(good, 5),
    ]
    res = run(InferenceEngine(scorer), MemoryStates(), records)
    reasons = [orjson.loads(d.value)["reason"] for d in res.dead_letters]
    assert reasons == ["not_json", "missing_key", "key_mismatch", "missing_field"]
    assert len(res.signals) == 1 and res.valid == 1
    d = orjson.loads(res.dead_letters[0].value)
    assert (d["raw"], d["partition"], d["offset"]) == ("{not json", 0, 1)


CONTROL = "clickstream-control"


def control(user: str, offset: int, partition: int = 0, value: bytes | None = None) -> SourceRecord:
    """An erasure request of the control topic (``demandstream forget``)."""
    v = forget_record(user) if value is None else value
    return SourceRecord(user.encode(), v, partition, offset, topic=CONTROL)


def test_forget_deletes_state_in_order(scorer):
    store = MemoryStates()
    run(InferenceEngine(scorer), store, [rec(ev(i, "u1"), i) for i in range(3)])
    forget = control("u1", 0)
    res = run(InferenceEngine(scorer), store, [forget])
    assert res.erasures == 1 and res.states[U1][1] is None and store.data[U1] is None
    # an event after the erasure in the same batch starts a fresh state
    run(InferenceEngine(scorer), store, [rec(ev(9, "u1"), 9)])
    res = run(
        InferenceEngine(scorer),
        store,
        [rec(ev(10, "u1"), 10), control("u1", 1), rec(ev(12, "u1"), 12)],
    )
    assert unpack(store.data[U1]).events_seen == 1
    assert len(res.signals) == 2


def test_a_forget_record_on_the_input_topic_is_not_obeyed(scorer):
    """Anyone who may write events could forge it: it is a dead letter, the state stays."""
    store = MemoryStates()
    run(InferenceEngine(scorer), store, [rec(ev(i, "u1"), i) for i in range(3)])
    res = run(InferenceEngine(scorer), store, [SourceRecord(b"u1", forget_record("u1"), 0, 3)])
    assert res.erasures == 0 and [orjson.loads(d.value)["reason"] for d in res.dead_letters] == [
        "missing_field"
    ]
    assert unpack(store.data[U1]).events_seen == 3


def test_a_malformed_control_record_is_a_bad_control_dead_letter(scorer):
    store = MemoryStates()
    run(InferenceEngine(scorer), store, [rec(ev(i, "u1"), i) for i in range(2)])
    bad = [
        control("u1", 0, value=b"{oops"),
        control("u1", 1, value=forget_record("u2")),  # key and user differ
        control("u1", 2, value=b'{"demandstream_control": "remember", "user_id": "u1"}'),
        control("u1", 3, value=b"[1]"),
        SourceRecord(b"u1", None, 0, 4, topic=CONTROL),
    ]
    res = run(InferenceEngine(scorer), store, bad)
    assert res.erasures == 0 and res.reasons == {"bad_control": 5}
    assert all(orjson.loads(d.value)["topic"] == CONTROL for d in res.dead_letters)
    assert unpack(store.data[U1]).events_seen == 2


def test_forget_reaches_the_state_kept_under_the_previous_pseudonym_key(scorer):
    store = MemoryStates()
    old = InferenceEngine(scorer, pseudonym_key="old")
    run(old, store, [rec(ev(i, "u1"), i) for i in range(3)])
    new = InferenceEngine(scorer, pseudonym_key="new", previous_pseudonym_key="old")
    run(new, store, [rec(ev(3, "u1"), 3)])
    old_key, new_key = state_key(Pseudonymizer("old").user("u1")), state_key(Pseudonymizer("new").user("u1"))
    assert store.data[old_key] is not None and store.data[new_key] is not None
    res = run(new, store, [control("u1", 0)])
    assert res.erasures == 1 and store.data[old_key] is None and store.data[new_key] is None
    # without the previous key, the old state is orphaned (it stays until the TTL or a forget with it)
    store2 = MemoryStates()
    run(old, store2, [rec(ev(0, "u1"), 0)])
    run(InferenceEngine(scorer, pseudonym_key="new"), store2, [control("u1", 0)])
    assert store2.data[old_key] is not None


def test_pseudonymised_dead_letters_hold_no_raw_id_or_payload(scorer):
    raw = orjson.dumps(
        {"event_id": "e1", "user_id": "secret-id", "ts": 1.73e9, "type": "view", "item_id": "i"}
    )
    records = [
        SourceRecord(b"secret-id", raw[:20], 0, 1),  # not_json
        SourceRecord(b"other-secret-id", raw, 0, 2),  # key_mismatch: detail quotes the key
        SourceRecord(None, raw, 0, 3),  # missing_key
        SourceRecord(b"secret-id", None, 0, 4),  # tombstone
        SourceRecord(b"secret-id", b"{bad", 0, 5, topic=CONTROL),  # bad_control
    ]
    p = Pseudonymizer("k")
    res = InferenceEngine(scorer, pseudonym_key="k").process(records, MemoryStates().read)
    assert len(res.dead_letters) == 5
    for d in res.dead_letters:
        assert b"secret" not in (d.key or b"") + d.value
        v = orjson.loads(d.value)
        assert (v["raw"], v["raw_encoding"], v["detail"], v["key_sha256"]) == ("", "redacted", "", None)
    keys = [d.key for d in res.dead_letters]
    assert (
        keys
        == [p.user("secret-id").encode(), p.user("other-secret-id").encode(), None]
        + [p.user("secret-id").encode()] * 2
    )
    first = orjson.loads(res.dead_letters[0].value)
    assert first["raw_bytes"] == 20 and first["raw_hmac"] == p.digest(raw[:20])
    assert first["key_pseudonym"] == p.user("secret-id")
    # without a pseudonym key the dead letter keeps the key and the payload's start, as before
    plain = InferenceEngine(scorer).process(records[:1], MemoryStates().read).dead_letters[0]
    assert plain.key == b"secret-id" and orjson.loads(plain.value)["raw"] == raw[:20].decode()


def test_undecodable_states_are_counted_and_logged_once_per_partition(scorer, caplog):
    store = MemoryStates()
    for u in ("u1", "u2", "u3"):
        store.data[state_key(u)] = b"garbage"
    engine = InferenceEngine(scorer)
    with caplog.at_level("WARNING", logger="demandstream.stream.engine.inference"):
        res = run(engine, store, [rec(ev(0, "u1"), 0), rec(ev(1, "u2"), 1), rec(ev(2, "u3"), 0, partition=1)])
        res2 = run(engine, store, [rec(ev(3, "u4"), 2)])
    assert res.undecodable == 3 and res.new_users == 3 and len(res.signals) == 3
    assert res2.undecodable == 0
    warnings = [r for r in caplog.records if "undecodable" in r.getMessage()]
    assert sorted(r.args[0] for r in warnings) == [0, 1]  # one per partition
    assert unpack(store.data[U1]).events_seen == 1  # reset, then the event applied


def test_state_of_another_model_version_is_not_reused(scorer):
    store = MemoryStates()
    run(InferenceEngine(scorer), store, [rec(ev(i, "u1"), i) for i in range(3)])
    other = Scorer(Checkpoint(scorer.net, scorer.vocab, "ffffffff"), top_k=3)
    engine = InferenceEngine(other)
    run(engine, store, [rec(ev(3, "u1"), 3)])
    assert engine.version_resets == 1
    s = unpack(store.data[U1])
    assert (s.events_seen, s.model_version) == (1, "ffffffff")


def test_pseudonymized_ids_never_reach_state_or_signals(scorer):
    store = MemoryStates()
    res = run(InferenceEngine(scorer, pseudonym_key="secret"), store, [rec(ev(1, "alice@example.com"), 1)])
    sig = orjson.loads(res.signals[0].value)
    assert "alice" not in sig["user_id"] and len(sig["user_id"]) == 32
    assert all(b"alice" not in k for k in store.data)


def test_ttl_expiry_deletes_inactive_states(scorer):
    """StateStore.expired_slice on the memory store: old users become deletions, recent ones stay."""
    from demandstream.stream.worker.store import StateStore

    class Table:
        class data:  # noqa: N801 - stands in for Faust's memory Store
            data: dict = {}
            _key_partition: dict = {}

    store = StateStore(Table())
    engine = InferenceEngine(scorer)
    old, new = ev(1, "old"), Event("e2", "new", 1.73e9 + 10_000, "view", "i1", "shoes", 1.0)
    res = engine.process([rec(old, 1, partition=2), rec(new, 2, partition=3)], store.read)
    store.write_local(res.states)
    cutoff = 1.73e9 + 5_000
    assert store.expired_slice(2, cutoff, limit=10) == {state_key("old"): (2, None)}
    assert store.expired_slice(3, cutoff, limit=10) == {}
    # a user of the batch in hand, or one staged by an open transaction, is never expired
    assert store.expired_slice(2, cutoff, limit=10, keep={state_key("old")}) == {}
    store.stage({state_key("old"): (2, b"newer")})
    assert store.expired_slice(2, cutoff, limit=10) == {}


def test_the_engine_built_from_settings_uses_their_topics_and_pseudonym_keys(scorer):
    from demandstream.stream.settings import Settings

    s = Settings(
        topic_input="in-x",
        topic_control="ctl-x",
        pseudonym_key="k-now",
        pseudonym_key_previous="k-before",
    )
    engine = InferenceEngine.from_settings(scorer, s)
    assert (engine.input_topic, engine.control_topic) == ("in-x", "ctl-x")
    assert engine.pseudonymizer.user("u1") == Pseudonymizer("k-now").user("u1")
    assert engine.previous.user("u1") == Pseudonymizer("k-before").user("u1")
