"""model/core/encoding.py: one event's features are the same whether encoded streaming or over a log,
and FeatureBuffer lays them out as the network reads them."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from demandstream.model.core.encoding import (
    COLUMNS,
    DERIVED_COLUMNS,
    NEVER_S,
    EncodedEvent,
    FeatureBuffer,
    category_hashes,
    category_index,
    encode_event,
    encode_events,
    encode_log,
)
from demandstream.model.core.events import EVENT_TYPES, TYPE_INDEX, Event
from demandstream.model.core.features import Vocabulary, category_hash, hash_bucket
from demandstream.model.core.network import ModelConfig
from demandstream.model.core.state import EMPTY, UserState, new_state
from demandstream.model.data.eventlog import EventLog

T0 = 1.7e9
CFG = ModelConfig(n_categories=4, hidden=8, history_slots=4, query_tokens=4)
VOCAB = Vocabulary(["<unk>", "shoes", "bags", "hats"])


def mixed_events(seed: int = 0, n_users: int = 5, max_len: int = 25) -> list[Event]:
    """Several users, every event type, categories in and outside the vocabulary, queries, no prices,
    ties and out-of-order times."""
    rng = np.random.default_rng(seed)
    cats = ["shoes", "bags", "hats", "gnomes", "kites", None]
    out = []
    for u in range(n_users):
        ts = T0 + 1000.0 * u
        for k in range(int(rng.integers(1, max_len))):
            ts += float(rng.choice([0.0, 5.0, 400.0, 4000.0, -20.0]))
            etype = EVENT_TYPES[int(rng.integers(len(EVENT_TYPES)))]
            out.append(
                Event(
                    f"e{u}-{k}",
                    f"u{u}",
                    ts,
                    etype,
                    None if etype == "search" else f"i{int(rng.integers(50))}",
                    cats[int(rng.integers(len(cats)))],
                    None if rng.random() < 0.3 else float(rng.integers(1, 400)) / 4,
                    "Red running-shoes size 42 wide" if etype == "search" else None,
                )
            )
    rng.shuffle(out)  # the log sorts; the stream below goes user by user in time order
    return out


def test_streaming_rows_equal_the_rows_of_the_log():
    """encode_event one event at a time (the stream) writes exactly the row encode_log writes."""
    events = mixed_events()
    log = EventLog.from_events(events).sorted_by_user_time()
    offline = encode_log(log, CFG, VOCAB)
    streamed = FeatureBuffer(CFG, len(log), VOCAB)
    for u in range(log.n_users):
        s = new_state(CFG.layers, CFG.hidden, CFG.history_slots)
        rows = log.user_rows(u)
        for i, e in zip(range(rows.start, rows.stop), log.user_events(u), strict=True):
            streamed.put_rows(i, [encode_event(CFG, VOCAB, s, e)])
    for name in COLUMNS:
        assert np.array_equal(offline.cols[name], streamed.cols[name]), name
    # the comparison is not vacuous: every kind of value occurs
    assert (offline.hist_cats == EMPTY).any() and (offline.hist_vocab == 0).any()
    assert (offline.query > 0).any() and (offline.price == 0).any() and (offline.add_secs == NEVER_S).any()


def test_encode_events_writes_one_round_of_distinct_users():
    events = [Event(f"e{u}", f"u{u}", T0 + u, "view", "i1", c, 10.0) for u, c in enumerate(["bags", "kites"])]
    states = [new_state(CFG.layers, CFG.hidden, CFG.history_slots) for _ in events]
    buf = FeatureBuffer(CFG, 4, VOCAB)
    encode_events(buf, events, states)
    assert buf.cat[:2].tolist() == [2, 0] and buf.hist_vocab[:2, 0].tolist() == [2, 0]
    assert buf.hist_cats[:2, 0].tolist() == [category_hash("bags"), category_hash("kites")]
    assert [s.events_seen for s in states] == [1, 1]
    with pytest.raises(ValueError):
        encode_events(buf, events, states[:1])  # one state per event


def test_feature_buffer_columns_shapes_and_dtypes():
    buf = FeatureBuffer(CFG, 3, VOCAB)
    k, q = CFG.history_slots, CFG.query_tokens
    for name, (dtype, _) in COLUMNS.items():
        shape = (3, k) if name.startswith("hist_") else (3, q) if name == "query" else (3,)
        assert buf.cols[name].shape == shape and buf.cols[name].dtype == dtype, name
        assert getattr(buf, name) is buf.cols[name]
    with pytest.raises(AttributeError):
        _ = buf.no_such_column


def test_every_stored_column_is_a_field_of_an_encoded_event():
    assert set(DERIVED_COLUMNS) <= set(COLUMNS)
    assert set(COLUMNS) - set(DERIVED_COLUMNS) <= set(EncodedEvent._fields)


def test_every_field_of_an_encoded_event_holds_what_its_name_says():
    """event_features builds its row by position (for speed): a field must not hold its neighbour's value."""
    s = new_state(CFG.layers, CFG.hidden, CFG.history_slots)
    early = [("view", "shoes")]  # an earlier session: slot counts and session counts differ
    later = [
        ("add_to_cart", "shoes"),
        ("add_to_cart", "shoes"),
        ("add_to_cart", "bags"),
        ("purchase", "shoes"),
    ]
    later += [("view", "hats")] * 4
    for k, (etype, cat) in enumerate(early + later):
        ts = T0 + 10.0 * k + (7200.0 if k >= len(early) else 0.0)
        encode_event(CFG, VOCAB, s, Event(f"e{k}", "u", ts, etype, f"i{k}", cat, 1.0))
    ts += 40.0
    r = encode_event(CFG, VOCAB, s, Event("last", "u", ts, "search", "i9", "hats", 7.0, "red shoes"))
    from_state = [n for n in EncodedEvent._fields if n in UserState.__slots__]
    assert len(from_state) == 12
    values = [repr(getattr(s, n)) for n in from_state]
    assert len(set(values)) == len(values)  # all different, so a swap of two fields would show
    for name in from_state:
        assert getattr(r, name) == getattr(s, name), name
    assert r.now == ts == s.last_ts
    own = {
        "etype": TYPE_INDEX["search"],
        "item": hash_bucket("i9", CFG.item_buckets),
        "cat": 3,
        "price": 4,  # 1 + floor(log2(1 + 7))
        "gap": 5,  # 40 s: over the 30 s edge, within 60 s
        "add_secs": ts - s.last_add_ts,
    }
    assert len(set(own.values())) == len(own)
    assert {n: getattr(r, n) for n in own} == own
    assert list(r.query) == [hash_bucket(w, CFG.query_buckets) for w in ("red", "shoes")]


def test_tensors_follow_the_shape_of_the_row_selection():
    events = mixed_events(1, n_users=2, max_len=6)
    log = EventLog.from_events(events).sorted_by_user_time()
    buf = encode_log(log, CFG, VOCAB)
    flat = buf.tensors(slice(1, 3))
    grid = buf.tensors(np.array([[0, 1], [2, 2]]))
    for name, (_, tdtype) in COLUMNS.items():
        assert flat[name].dtype == grid[name].dtype == tdtype, name
        assert flat[name].shape[0] == 2 and grid[name].shape[:2] == (2, 2), name
        assert torch.equal(grid[name][1, 0], torch.as_tensor(buf.cols[name][2]).to(tdtype)), name


def test_history_columns_after_a_short_sequence():
    """Slots keep category hashes; vocabulary index, ages and seconds-since derive per row."""
    s = new_state(CFG.layers, CFG.hidden, CFG.history_slots)
    seq = [(0.0, "shoes", "view"), (30.0, "gnomes", "add_to_cart"), (90.0, "shoes", "view")]
    rows = [
        encode_event(CFG, VOCAB, s, Event(f"e{k}", "u", T0 + t, et, "i", c))
        for k, (t, c, et) in enumerate(seq)
    ]
    buf = FeatureBuffer(CFG, 3, VOCAB)
    buf.put_rows(0, rows)
    last = 2
    assert buf.hist_cats[last].tolist() == [category_hash("shoes"), category_hash("gnomes"), EMPTY, EMPTY]
    assert buf.hist_vocab[last].tolist() == [1, 0, 0, 0]  # gnomes is outside the vocabulary
    assert buf.hist_counts[last].tolist() == [2, 1, 0, 0]
    assert buf.hist_ages[last, :2].tolist() == [0, 1]  # shoes is this event, gnomes one event ago
    assert buf.hist_secs[last].tolist() == [0.0, 60.0, NEVER_S, NEVER_S]
    assert buf.hist_cart[last].tolist() == [0, 1, 0, 0]
    assert buf.hist_etype[last, :2].tolist() == [TYPE_INDEX["view"], TYPE_INDEX["add_to_cart"]]
    assert buf.cat.tolist() == [1, 0, 1] and buf.streak.tolist() == [1, 1, 1]
    assert buf.gap[0] == 0 and buf.gap[1] > buf.gap[0]  # the first event has the first-event bucket
    # seconds since the last add-to-cart: never before it, then counting
    assert buf.add_secs.tolist() == [NEVER_S, 0.0, 60.0]
    assert buf.cart.tolist() == [0, 1, 1] and buf.events_seen.tolist() == [1, 2, 3]


def test_scalar_features_of_one_event():
    s = new_state(CFG.layers, CFG.hidden, CFG.history_slots)
    e = Event("e1", "u", T0, "search", None, "hats", 7.0, "Red  Shoes")
    r = encode_event(CFG, VOCAB, s, e)
    assert isinstance(r, EncodedEvent)
    assert (r.etype, r.item, r.cat) == (TYPE_INDEX["search"], 0, 3)
    assert list(r.query) == [hash_bucket(w, CFG.query_buckets) for w in ("red", "shoes")]
    assert r.now == T0 and r.events_seen == 1
    r2 = encode_event(CFG, VOCAB, s, Event("e2", "u", T0 + 1, "view", "i7"))
    assert r2.item == hash_bucket("i7", CFG.item_buckets) and r2.cat == 0 and r2.price == 0


def test_a_reused_row_loses_the_query_tokens_of_its_previous_event():
    s = new_state(CFG.layers, CFG.hidden, CFG.history_slots)
    buf = FeatureBuffer(CFG, 1, VOCAB)
    buf.put_rows(0, [encode_event(CFG, VOCAB, s, Event("e1", "u", T0, "search", query="a b c d e"))])
    assert (buf.query[0] > 0).all()  # four tokens of five: the row is full
    buf.put_rows(0, [encode_event(CFG, VOCAB, s, Event("e2", "u", T0 + 1, "search", query="z"))])
    assert buf.query[0].tolist() == [hash_bucket("z", CFG.query_buckets), 0, 0, 0]
    buf.put_rows(0, [])  # nothing to write is a no-op
    assert buf.query[0, 0] > 0


def test_encode_log_needs_a_sorted_log():
    log = EventLog.from_events(mixed_events(2, n_users=2, max_len=4))
    with pytest.raises(ValueError, match="sorted_by_user_time"):
        encode_log(log, CFG, VOCAB)


def test_category_index_and_hashes_of_every_row():
    cats = ["bags", None, "kites", "shoes"]
    log = EventLog.from_events([Event(f"e{k}", "u", T0 + k, "view", "i", c) for k, c in enumerate(cats)])
    assert category_index(log, VOCAB).tolist() == [2, 0, 0, 1]
    assert category_hashes(log).tolist() == [category_hash(c) for c in cats]
    assert category_hashes(log)[1] == 0  # no category
