"""Tests of model/data/cleaning.py on logs built in memory."""

from __future__ import annotations

import numpy as np

from demandstream.model.core.events import Event
from demandstream.model.data.cleaning import BURST_MAX_EVENTS, SUSTAINED_MIN_EVENTS, CleaningConfig, clean_log
from demandstream.model.data.eventlog import EventLog
from demandstream.model.data.loadstats import LoadStats

T0 = 1_700_000_000.0
NO_BOT_RULES = CleaningConfig(burst_max_events=None, sustained_max_rate=None)


def ev(eid, user, ts, etype="view", item="i1", category="c", price=None, query=None):
    return Event(eid, user, T0 + ts, etype, item, category, price, query)


def kept_users(log: EventLog) -> list[str]:
    return sorted(log.users[u] for u in np.unique(log.user))


def test_exact_duplicates_are_dropped_keeping_the_first():
    log = EventLog.from_events(
        [
            ev("a", "u1", 0, price=1.5),
            ev("b", "u1", 0, price=1.5),  # duplicate of a
            ev("c", "u1", 0, price=2.5),  # other price
            ev("d", "u1", 0),  # no price
            ev("e", "u1", 0),  # duplicate of d: NaN equals NaN here
            ev("f", "u1", 0, etype="add_to_cart"),  # other type
            ev("g", "u2", 0, price=1.5),  # other user
            ev("h", "u1", 0, "search", None, None, query="x"),
            ev("i", "u1", 0, "search", None, None, query="y"),
        ]
    )
    stats = LoadStats()
    out = clean_log(log, CleaningConfig(), stats)
    assert stats.duplicates_dropped == 2
    assert sorted(out.event_ids) == ["a", "c", "d", "f", "g", "h", "i"]
    assert stats.rows_kept == 7


def test_duplicates_are_kept_when_disabled():
    log = EventLog.from_events([ev("a", "u1", 0), ev("b", "u1", 0)])
    assert len(clean_log(log, CleaningConfig(drop_duplicates=False))) == 2


def test_burst_bound_is_strictly_more_than_n_in_the_window():
    n = BURST_MAX_EVENTS
    # n + 1 views inside 59 s is a bot; n views in the same span, or n + 1 spread over 60 s, are not.
    bot = [ev(f"b{i}", "bot", i * 59 / n, item=f"i{i}") for i in range(n + 1)]
    busy = [ev(f"h{i}", "busy", i * 59 / (n - 1), item=f"i{i}") for i in range(n)]
    spread = [ev(f"s{i}", "spread", i * 60 / n, item=f"i{i}") for i in range(n + 1)]
    stats = LoadStats()
    out = clean_log(EventLog.from_events(bot + busy + spread), CleaningConfig(), stats)
    assert kept_users(out) == ["busy", "spread"]
    assert (stats.users_dropped_rate, stats.events_dropped_rate) == (1, n + 1)


def test_a_big_checkout_logged_per_item_is_one_action():
    items = 3 * BURST_MAX_EVENTS
    shopper = [ev(f"c{i}", "shopper", 10, "add_to_cart", f"i{i}") for i in range(items)]
    shopper += [ev(f"p{i}", "shopper", 20, "purchase", f"i{i}") for i in range(items)]
    # The same count of views in one second is a crawler: views are never logged in bulk.
    crawler = [ev(f"v{i}", "crawler", 10, "view", f"i{i}") for i in range(items)]
    out = clean_log(EventLog.from_events(shopper + crawler), CleaningConfig())
    assert kept_users(out) == ["shopper"]


def test_sustained_rate_over_many_events():
    n = SUSTAINED_MIN_EVENTS
    # 0.55 events/s over n events stays under the burst bound (about 33 a minute) but is machine-like.
    fast = [ev(f"f{i}", "steady_bot", i / 0.55, item=f"i{i}") for i in range(n)]
    slow = [ev(f"s{i}", "collector", i / 0.45, item=f"i{i}") for i in range(n)]
    short = [ev(f"x{i}", "short", i / 0.9, item=f"i{i}") for i in range(n - 1)]
    stats = LoadStats()
    out = clean_log(EventLog.from_events(fast + slow + short), CleaningConfig(), stats)
    assert kept_users(out) == ["collector", "short"]
    assert stats.events_dropped_rate == n
    off = clean_log(EventLog.from_events(fast), CleaningConfig(sustained_max_rate=None))
    assert len(off) == n


def test_output_is_sorted_by_user_then_time_with_ties_in_file_order():
    log = EventLog.from_events(
        [
            ev("a3", "a", 30),
            ev("b1", "b", 5),
            ev("a1", "a", 10),
            ev("a2x", "a", 20, item="x"),
            ev("a2y", "a", 20, item="y"),
            ev("b2", "b", 6),
        ]
    )
    stats = LoadStats()
    out = clean_log(log, NO_BOT_RULES, stats)
    assert [e.event_id for e in out.user_events(0)] == ["a1", "a2x", "a2y", "a3"]
    assert [e.event_id for e in out.user_events(1)] == ["b1", "b2"]
    assert out.user_start.tolist() == [0, 4, 6]
    assert stats.out_of_order_fixed == 1  # a only; b was already in time order


def test_missing_category_counts_kept_events_only():
    log = EventLog.from_events(
        [
            ev("a", "u1", 0, category=None),
            ev("b", "u1", 0, category=None),
            ev("c", "u1", 1),
            ev("d", "u2", 2, category=None),
        ]
    )
    stats = LoadStats()
    out = clean_log(log, CleaningConfig(), stats)
    assert stats.missing_category == 2 and len(out) == 3


def test_dropped_users_keep_their_index_and_have_no_rows():
    bot = [ev(f"b{i}", "bot", i / 10, item=f"i{i}") for i in range(BURST_MAX_EVENTS + 1)]
    out = clean_log(EventLog.from_events(bot + [ev("h", "human", 0)]), CleaningConfig())
    assert out.users == ["bot", "human"]
    assert out.user_rows(0) == slice(0, 0) and [e.event_id for e in out.user_events(1)] == ["h"]


def test_empty_log():
    out = clean_log(EventLog.from_events([]), CleaningConfig(), LoadStats())
    assert len(out) == 0 and out.user_start.tolist() == [0]
