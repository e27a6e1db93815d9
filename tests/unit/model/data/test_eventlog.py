"""model/data/eventlog.py: the builder's columns and string tables, regrouping by user with CSR offsets,
and rows back to events."""

from __future__ import annotations

import math

import numpy as np
import pytest

from demandstream.model.core.events import TYPE_INDEX, Event
from demandstream.model.data import eventlog
from demandstream.model.data.eventlog import NONE, EventLog, EventLogBuilder, Interner

T0 = 1_700_000_000.0

EVENTS = [
    Event("e1", "alice", T0 + 30, "view", "i1", "shoes", 19.5, session_id="s1"),
    Event("e2", "bob", T0 + 10, "search", None, None, None, "red shoes"),
    Event("e3", "alice", T0 + 10, "add_to_cart", "i2", "bags", 5.25, session_id="s1"),
    Event("e4", "carol", T0 + 5, "purchase", "i1", "shoes", 19.5),
    Event("e5", "alice", T0 + 10, "view", "i1", "shoes", 19.5, session_id="s2"),  # same time as e3
    Event("e6", "bob", T0 + 0, "view", "i3", "hats", 0.0),
]


def test_builder_interns_strings_and_fills_typed_columns():
    log = EventLog.from_events(EVENTS)
    assert len(log) == 6 and log.n_users == 3
    assert log.users == ["alice", "bob", "carol"]  # first-seen order
    assert log.items == ["i1", "i2", "i3"] and log.categories == ["shoes", "bags", "hats"]
    assert log.queries == ["red shoes"]
    assert log.user.tolist() == [0, 1, 0, 2, 0, 1]
    assert log.ts.tolist() == [e.ts for e in EVENTS]
    assert log.etype.tolist() == [TYPE_INDEX[e.type] for e in EVENTS]
    assert log.item.tolist() == [0, NONE, 1, 0, 0, 2]
    assert log.category.tolist() == [0, NONE, 1, 0, 0, 2]
    assert log.query.tolist() == [NONE, 0, NONE, NONE, NONE, NONE]
    assert math.isnan(log.price[1]) and log.price[[0, 2, 5]].tolist() == [19.5, 5.25, 0.0]
    assert log.event_ids == [e.event_id for e in EVENTS]
    assert log.session_ids == ["s1", None, "s1", None, "s2", None]
    assert log.user_start is None  # only a regrouped log has offsets
    dtypes = {c: getattr(log, c).dtype for c in ("user", "ts", "etype", "item", "category", "price", "query")}
    assert dtypes == {c: np.dtype(t) for c, t in eventlog._DTYPES.items()}


def test_without_ids_the_columns_are_the_same():
    a, b = EventLog.from_events(EVENTS), EventLog.from_events(EVENTS, keep_ids=False)
    assert b.event_ids is None and b.session_ids is None
    for c in ("user", "ts", "etype", "item", "category", "query"):
        assert np.array_equal(getattr(a, c), getattr(b, c)), c
    assert np.array_equal(a.price, b.price, equal_nan=True)


def test_rows_span_several_chunks(monkeypatch):
    monkeypatch.setattr(EventLogBuilder, "_CHUNK", 4)
    many = [Event(f"e{i}", f"u{i % 3}", T0 + i, "view", f"i{i % 5}") for i in range(11)]
    b = EventLogBuilder()
    for k, e in enumerate(many):
        assert b.rows == k
        b.append(e)
    log = b.build()
    assert b.rows == len(log) == 11
    assert log.ts.tolist() == [e.ts for e in many] and log.event_ids == [e.event_id for e in many]
    assert log.user.tolist() == [i % 3 for i in range(11)]


def test_append_fields_without_an_event_id_gets_a_row_id():
    b = EventLogBuilder()
    b.append_fields("u", T0, TYPE_INDEX["view"], "i", None, None, None)
    b.append_fields("u", T0 + 1, TYPE_INDEX["view"], "i", None, None, None, event_id="x")
    b.append_fields("u", T0 + 2, TYPE_INDEX["view"], "i", None, None, None)
    assert b.build().event_ids == ["row-0", "x", "row-2"]


def test_an_empty_builder_gives_an_empty_log():
    log = EventLogBuilder().build()
    assert len(log) == 0 and log.n_users == 0 and log.ts.dtype == np.float64
    s = log.sorted_by_user_time()
    assert s.user_start.tolist() == [0]


def test_sorted_by_user_time_groups_users_with_csr_offsets():
    log = EventLog.from_events(EVENTS).sorted_by_user_time()
    assert log.user_start.tolist() == [0, 3, 5, 6] and log.user_start.dtype == np.int64
    # alice: e3 and e5 share a time and keep their file order; then e1
    assert [e.event_id for e in log.user_events(0)] == ["e3", "e5", "e1"]
    assert [e.event_id for e in log.user_events(1)] == ["e6", "e2"]
    assert [e.event_id for e in log.user_events(2)] == ["e4"]
    for u in range(log.n_users):
        rows = log.user_rows(u)
        assert (log.user[rows] == u).all()
        assert (np.diff(log.ts[rows]) >= 0).all()
    assert log.users == ["alice", "bob", "carol"] and log.categories == ["shoes", "bags", "hats"]


def test_sorted_by_user_arrival_keeps_file_order_within_a_user():
    log = EventLog.from_events(EVENTS).sorted_by_user_arrival()
    assert log.user_start.tolist() == [0, 3, 5, 6]
    assert [e.event_id for e in log.user_events(0)] == ["e1", "e3", "e5"]
    assert [e.event_id for e in log.user_events(1)] == ["e2", "e6"]


def test_a_user_without_rows_has_an_empty_range():
    log = EventLog.from_events(EVENTS)
    only_alice_and_carol = log.take(np.flatnonzero(log.user != 1)).sorted_by_user_time()
    assert only_alice_and_carol.user_start.tolist() == [0, 3, 3, 4]
    assert only_alice_and_carol.user_events(1) == []


def test_user_rows_needs_a_grouped_log():
    with pytest.raises(ValueError, match="sorted_by_user_time"):
        EventLog.from_events(EVENTS).user_rows(0)


def test_take_selects_rows_and_shares_the_string_tables():
    log = EventLog.from_events(EVENTS).sorted_by_user_time()
    sub = log.take(np.array([4, 0]))
    assert sub.event_ids == [log.event_ids[4], log.event_ids[0]]
    assert sub.ts.tolist() == [log.ts[4], log.ts[0]]
    assert sub.users is log.users and sub.categories is log.categories
    assert sub.user_start is None  # an arbitrary selection is no longer grouped


def test_rows_become_the_events_they_came_from():
    log = EventLog.from_events(EVENTS)
    assert [log.event(i) for i in range(len(log))] == EVENTS
    bare = EventLog.from_events(EVENTS, keep_ids=False)
    e = bare.event(3)
    assert e.event_id == "row-3" and e.session_id is None and e.user_id == "carol" and e.price == 19.5


def test_interner():
    it = Interner(["a", "b"])
    assert [it.add(v) for v in ("b", "c", None, "a", "c")] == [1, 2, NONE, 0, 2]
    assert it.values == ["a", "b", "c"] and len(it) == 3
