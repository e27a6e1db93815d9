"""Tests for model/evaluation/baselines.py: tiny hand-made sequences with known rankings and probabilities."""

from __future__ import annotations

import numpy as np
import pytest

from demandstream.model.core.events import TYPE_INDEX
from demandstream.model.evaluation.baselines import (
    DEFAULT_GAP_S,
    PURCHASE,
    USER_RATE_PRIOR_STRENGTH,
    Baseline,
    Cascade,
    CascadeMix,
    CascadeRecent,
    Funnel,
    FunnelCart,
    LastCategory,
    Markov,
    Popularity,
    UserHistory,
    floored_cart_counts,
    log_gaps,
    make_baselines,
    masked_purchase_labels,
    popularity_scores,
    purchase_labels,
    window_covered,
)

VIEW, CART = TYPE_INDEX["view"], TYPE_INDEX["add_to_cart"]
REMOVE = TYPE_INDEX["remove_from_cart"]
H = 100.0  # horizon of the hand-made sequences, in seconds


def log_arrays(users: list[list[tuple[int, int, float]]]):
    """(cats, etypes, ts, user_start) from per-user lists of (cat, etype, ts)."""
    rows = [r for u in users for r in u]
    cats = np.array([r[0] for r in rows], dtype=np.int32)
    etypes = np.array([r[1] for r in rows], dtype=np.int8)
    ts = np.array([r[2] for r in rows], dtype=np.float64)
    user_start = np.r_[0, np.cumsum([len(u) for u in users])].astype(np.int64)
    return cats, etypes, ts, user_start


def fitted(baseline: Baseline, users, n_categories: int, mask=None) -> Baseline:
    cats, etypes, ts, user_start = log_arrays(users)
    mask = np.ones(len(cats), bool) if mask is None else mask
    baseline.fit(cats, etypes, ts, user_start, mask, H, n_categories)
    return baseline


def ranking(scores: np.ndarray) -> list[int]:
    return np.argsort(-scores, kind="stable").tolist()


def is_strict(scores: np.ndarray) -> bool:
    return np.unique(scores).size == scores.size


# -- purchase_labels ----------------------------------------------------------------------------


def test_purchase_labels_horizon_censoring_and_user_boundary():
    _, etypes, ts, user_start = log_arrays(
        [
            [(0, VIEW, 0.0), (0, VIEW, 50.0), (0, PURCHASE, 100.0), (0, VIEW, 270.0)],
            # the next purchase row after row 3 is user 1's (ts 210, within 100 s): it must not count
            [(0, PURCHASE, 210.0), (0, VIEW, 300.0), (0, VIEW, 350.0), (0, PURCHASE, 360.0)],
        ]
    )
    labels, observable = purchase_labels(etypes, ts, user_start, H, end_ts=360.0)
    # row 0: purchase exactly at the horizon (100 - 0 <= 100) counts; row 2: the purchase itself
    # needs a later one; row 3: no purchase of its own user, window runs past the end -> censored.
    assert labels.tolist() == [1, 1, 0, 0, 0, 1, 1, 0]
    # rows 5 and 6 saw the purchase at 360, but their windows run past the end (360) too: censored
    # like row 3, or the end of the log would hold positives only (issue #12)
    assert observable.tolist() == [True, True, True, False, True, False, False, False]
    assert labels.dtype == np.int8 and observable.dtype == bool


def test_purchase_labels_match_bruteforce():
    rng = np.random.default_rng(3)
    lengths = rng.integers(1, 12, size=30)
    users = []
    for n in lengths:
        t = np.sort(rng.integers(0, 600, size=n)).astype(float)
        users.append([(0, PURCHASE if rng.random() < 0.2 else VIEW, x) for x in t])
    _, etypes, ts, user_start = log_arrays(users)
    labels, observable = purchase_labels(etypes, ts, user_start, H, end_ts=500.0)
    for u in range(len(users)):
        for i in range(user_start[u], user_start[u + 1]):
            want = any(etypes[j] == PURCHASE and ts[j] - ts[i] <= H for j in range(i + 1, user_start[u + 1]))
            assert labels[i] == want
            assert observable[i] == (ts[i] + H <= 500.0)


def test_masked_labels_censor_at_the_mask_edge():
    _, etypes, ts, user_start = log_arrays(
        [
            [(0, VIEW, 0.0), (0, CART, 10.0), (0, PURCHASE, 50.0), (0, VIEW, 300.0), (0, PURCHASE, 320.0)],
            [(0, VIEW, 0.0), (0, VIEW, 500.0)],
        ]
    )
    fit = ts < 305.0  # a temporal split: user 0's last purchase is outside, user 1's last view too
    labels, observable = masked_purchase_labels(etypes, ts, user_start, fit, H)
    assert labels.tolist() == [1, 1, 0, 0, 0, 0, 0]  # row 3 must not see the purchase at 320
    # row 3's window crosses the mask (and the fit end 300), row 4/6 are not fit rows
    assert observable.tolist() == [True, True, True, False, False, True, False]


# -- gaps in the log ----------------------------------------------------------------------------

GAP = 2 * DEFAULT_GAP_S  # a silence of every user longer than the default gap threshold


def test_log_gaps_and_window_cover_use_every_users_events():
    # user 0 is silent between 100 and 8000, but user 1's event at 3000 keeps the log alive until
    # 3000; the log's gap is only from 3000 to 8000 (5000 s > 3600 s).
    ts = np.array([0.0, 100.0, 8000.0, 3000.0])
    assert log_gaps(ts).tolist() == [3000.0]
    assert log_gaps(ts, gap_s=5000.0).tolist() == []
    assert log_gaps(ts, gap_s=None).tolist() == []
    # windows (t, t + 4500]: 0 and 100 reach past 3000, the start of the gap; 8000 does not
    assert window_covered(ts, 4500.0).tolist() == [False, False, True, False]
    assert window_covered(ts, 3000.0).tolist() == [True, False, True, False]
    assert window_covered(np.array([3000.0]), 100.0, log_ts=ts).tolist() == [False]  # the gap's start


def test_a_window_crossing_a_gap_or_the_end_is_never_a_negative():
    _, etypes, ts, user_start = log_arrays(
        [
            # rows 0-1 have windows across the gap after 50 (next event of anyone at 50 + GAP)
            [(0, VIEW, 0.0), (0, VIEW, 50.0), (0, VIEW, 50.0 + GAP), (0, VIEW, 60.0 + GAP)],
            # the purchase at 40 is before the gap: rows 4-5 are positives, but their windows cross
            # it, so they are censored like row 6's, which saw no purchase
            [(0, VIEW, 0.0), (0, CART, 30.0), (0, PURCHASE, 40.0), (0, PURCHASE, 55.0 + GAP)],
        ]
    )
    end = 60.0 + GAP
    labels, observable = purchase_labels(etypes, ts, user_start, H, end_ts=end)
    assert labels.tolist() == [0, 0, 0, 0, 1, 1, 0, 0]
    assert observable.tolist() == [False] * 8
    # rows 2, 3 and 7 run past the end; with the gap rule off only the end censors
    labels_off, observable_off = purchase_labels(etypes, ts, user_start, H, end_ts=end, gap_s=None)
    assert labels_off.tolist() == labels.tolist()
    assert observable_off.tolist() == [True, True, False, False, True, True, True, False]
    # the property in general: no observable window, negative or positive, crosses a gap or the end
    gaps = log_gaps(ts)
    for i in np.flatnonzero(observable):
        assert ts[i] + H <= end and not ((gaps >= ts[i]) & (gaps < ts[i] + H)).any()


def test_a_purchase_seen_across_a_gap_labels_the_point_but_does_not_make_it_observable():
    # The gap threshold is shorter than the horizon here: the purchase 700 s later is seen, but the
    # window (0, 1000] crosses the silences 0 -> 700 and 700 -> 5000.
    _, etypes, ts, user_start = log_arrays([[(0, VIEW, 0.0), (0, PURCHASE, 700.0), (0, VIEW, 5000.0)]])
    labels, observable = purchase_labels(etypes, ts, user_start, 1000.0, gap_s=600.0)
    assert labels.tolist() == [1, 0, 0]
    assert observable.tolist() == [False, False, False]  # row 2: the end
    _, observable_off = purchase_labels(etypes, ts, user_start, 1000.0, gap_s=None)
    assert observable_off.tolist() == [True, True, False]


def test_masked_labels_censor_across_gaps_too():
    _, etypes, ts, user_start = log_arrays(
        [
            [(0, VIEW, 0.0), (0, PURCHASE, 20.0), (0, VIEW, 30.0)],
            [(0, VIEW, 40.0 + GAP), (0, VIEW, 45.0 + GAP), (0, VIEW, 500.0 + GAP)],
        ]
    )
    fit = np.ones(len(ts), bool)
    labels, observable = masked_purchase_labels(etypes, ts, user_start, fit, H)
    assert labels.tolist() == [1, 0, 0, 0, 0, 0]
    # rows 0-2: window crosses the gap after 30 (row 0 although its purchase at 20 came first);
    # rows 3, 4: a full window inside; row 5: the end
    assert observable.tolist() == [False, False, False, True, True, False]
    _, observable_off = masked_purchase_labels(etypes, ts, user_start, fit, H, gap_s=None)
    assert observable_off.tolist() == [True, True, True, True, True, False]


def test_labels_with_gaps_match_bruteforce():
    rng = np.random.default_rng(11)
    users = []
    for _ in range(25):
        n = int(rng.integers(1, 10))
        # times on two islands with a silence of several hours between them
        t = np.sort(np.where(rng.random(n) < 0.5, rng.integers(0, 500, n), rng.integers(20_000, 20_500, n)))
        users.append([(0, PURCHASE if rng.random() < 0.25 else VIEW, float(x)) for x in t])
    _, etypes, ts, user_start = log_arrays(users)
    end = float(ts.max())
    h = 300.0
    labels, observable = purchase_labels(etypes, ts, user_start, h, end_ts=end)
    distinct = np.unique(ts)
    for u in range(len(users)):
        for i in range(user_start[u], user_start[u + 1]):
            buy = any(etypes[j] == PURCHASE and ts[j] - ts[i] <= h for j in range(i + 1, user_start[u + 1]))
            # the log covers (t, t + h] iff every consecutive pair of distinct times that starts in
            # [t, t + h) is at most DEFAULT_GAP_S apart
            inside = [k for k in range(len(distinct) - 1) if ts[i] <= distinct[k] < ts[i] + h]
            covered = all(distinct[k + 1] - distinct[k] <= DEFAULT_GAP_S for k in inside)
            assert labels[i] == buy
            assert observable[i] == (ts[i] + h <= end and covered)


def test_funnel_leaves_windows_across_gaps_out_of_its_fit():
    users = [
        [(0, CART, 0.0), (0, PURCHASE, 30.0)],
        [(0, CART, 200.0), (0, VIEW, 200.0 + GAP), (0, VIEW, 650.0 + GAP)],  # this cart is censored
    ]
    b = fitted(Funnel(), users, n_categories=1)
    b.start_user()
    b.observe(0, CART, 0.0)
    assert b.purchase_proba() == pytest.approx((1 + 1) / (1 + 2))
    cats, etypes, ts, user_start = log_arrays(users)
    b.fit(cats, etypes, ts, user_start, np.ones(len(ts), bool), H, 1, gap_s=None)
    b.start_user()
    b.observe(0, CART, 0.0)
    assert b.purchase_proba() == pytest.approx((1 + 1) / (2 + 2))  # the cart at 200 now a negative


# -- category baselines -------------------------------------------------------------------------

USERS = [
    [(1, VIEW, 0.0), (2, VIEW, 1.0), (1, VIEW, 2.0), (2, VIEW, 3.0), (1, VIEW, 4.0), (3, VIEW, 5.0)],
    [(2, VIEW, 0.0), (4, VIEW, 1.0)],
]  # counts: 1 x3, 2 x3, 3 x1, 4 x1; transitions from 1: ->2, ->2, ->3


def test_popularity_is_global_and_strict():
    b = fitted(Popularity(), USERS, n_categories=6)
    b.start_user()
    b.observe(4, VIEW, 0.0)
    s = b.category_scores()
    assert ranking(s) == [1, 2, 3, 4, 5, 0]  # 1 and 2 tie on count: lower index first
    assert s[0] == -np.inf and is_strict(s)
    assert b.purchase_proba() is None


def test_popularity_uses_only_fit_rows():
    mask = np.array([False] * 6 + [True, True])
    b = fitted(Popularity(), USERS, n_categories=6, mask=mask)
    assert ranking(b.category_scores())[:2] == [2, 4]


def test_last_category_skips_unknown_and_resets_per_user():
    b = fitted(LastCategory(), USERS, n_categories=6)
    b.start_user()
    assert ranking(b.category_scores())[0] == 1  # nothing seen yet: popularity
    b.observe(4, VIEW, 0.0)
    b.observe(0, VIEW, 1.0)  # unknown category keeps the last known one
    s = b.category_scores()
    assert ranking(s)[:3] == [4, 1, 2] and is_strict(s)
    b.start_user()
    assert ranking(b.category_scores())[0] == 1


def test_user_history_counts_then_recency_then_popularity():
    b = fitted(UserHistory(), USERS, n_categories=6)
    b.start_user()
    for c in (5, 3, 5, 3, 4):
        b.observe(c, VIEW, 0.0)
    s = b.category_scores()
    # 3 and 5 seen twice (3 more recently), then 4 once, then unseen by popularity: 1, 2
    assert ranking(s) == [3, 5, 4, 1, 2, 0]
    assert is_strict(s)
    b.start_user()
    b.observe(2, VIEW, 0.0)
    assert ranking(b.category_scores())[:3] == [2, 1, 3]  # previous user's counts are gone


def test_user_history_propensity_is_smoothed_past_rate():
    users = [[(1, VIEW, 0.0), (1, PURCHASE, 10.0), (1, VIEW, 500.0), (1, VIEW, 1000.0)]]
    b = fitted(UserHistory(), users, n_categories=3)
    # fit labels: row 0 -> 1; rows 1, 2 -> 0 (observable, end 1000); row 3 censored: rate 1/3
    assert b.global_rate == pytest.approx(1 / 3)
    a, g = USER_RATE_PRIOR_STRENGTH, 1 / 3
    b.start_user()
    assert b.purchase_proba() == pytest.approx(g)
    b.observe(1, VIEW, 0.0)
    b.observe(1, VIEW, 5.0)
    assert b.purchase_proba() == pytest.approx(g)  # both windows still open: nothing resolved
    b.observe(1, PURCHASE, 20.0)  # resolves the two open windows as positives
    assert b.purchase_proba() == pytest.approx((2 + a * g) / (2 + a))
    b.observe(1, VIEW, 500.0)  # the purchase's own window closed without another purchase
    assert b.purchase_proba() == pytest.approx((2 + a * g) / (3 + a))


def test_user_history_streaming_rate_matches_labels():
    """The resolved counts equal the labels of rows whose window closed before the current event."""
    rng = np.random.default_rng(7)
    t = np.cumsum(rng.integers(0, 80, size=300)).astype(float)
    et = np.where(rng.random(300) < 0.15, PURCHASE, VIEW)
    users = [[(1, int(e), float(x)) for e, x in zip(et, t, strict=True)]]
    b = fitted(UserHistory(), users, n_categories=3)
    labels, _ = purchase_labels(et, t, np.array([0, 300]), H)
    b.start_user()
    for k in range(300):
        b.observe(1, int(et[k]), float(t[k]))
        decided = [i for i in range(k) if labels[i] == 1 and _first_buy_after(et, i) <= k or t[k] - t[i] > H]
        assert b.resolved == len(decided)
        assert b.positives == int(sum(labels[i] for i in decided))


def _first_buy_after(et: np.ndarray, i: int) -> int:
    later = np.flatnonzero(et[i + 1 :] == PURCHASE)
    return i + 1 + int(later[0]) if later.size else len(et)


def test_markov_predicts_most_frequent_successor():
    b = fitted(Markov(), USERS, n_categories=6)
    b.start_user()
    b.observe(1, VIEW, 0.0)
    s = b.category_scores()
    assert ranking(s) == [2, 3, 1, 4, 5, 0]  # A->B twice, A->C once, then popularity
    assert is_strict(s)
    b.observe(0, VIEW, 1.0)  # unknown category: still conditioned on the last known (1)
    assert np.array_equal(b.category_scores(), s)
    finite = s[1:]
    assert finite.sum() == pytest.approx(1.0)  # a proper distribution over the real categories


def test_markov_backs_off_to_popularity():
    b = fitted(Markov(), USERS, n_categories=6)
    b.start_user()
    b.observe(5, VIEW, 0.0)  # never seen as a current category
    assert ranking(b.category_scores()) == [1, 2, 3, 4, 5, 0]


def test_markov_ignores_pairs_across_users_and_mask():
    users = [[(1, VIEW, 0.0), (2, VIEW, 1.0), (1, VIEW, 2.0)], [(3, VIEW, 0.0), (3, VIEW, 1.0)]]
    b = fitted(Markov(), users, n_categories=5, mask=np.array([True, True, False, True, True]))
    assert b.row_totals.tolist() == [0, 1, 0, 1, 0]  # 1->2 and 3->3; 2->1 (masked) and 1->3 (users)


# -- funnel -------------------------------------------------------------------------------------


def test_funnel_from_censored_counts():
    users = [
        [(0, VIEW, 0.0), (0, CART, 10.0), (0, PURCHASE, 60.0)],
        [(0, VIEW, 0.0), (0, CART, 10.0), (0, VIEW, 400.0)],
        [(0, CART, 390.0)],  # censored: its window runs past the end (400)
    ]
    b = fitted(Funnel(), users, n_categories=1)
    b.start_user()
    b.observe(0, CART, 0.0)
    assert b.purchase_proba() == pytest.approx((1 + 1) / (2 + 2))  # 1 of 2 observable carts
    b.observe(0, VIEW, 1.0)
    # views: row 0 positive, row 3 negative, row 5 censored
    assert b.purchase_proba() == pytest.approx((1 + 1) / (2 + 2))
    b.observe(0, PURCHASE, 2.0)
    assert b.purchase_proba() == pytest.approx((0 + 1) / (1 + 2))
    assert b.category_scores() is None


def test_make_baselines_names_and_capabilities():
    bs = make_baselines()
    assert [b.name for b in bs] == [
        "popularity",
        "last_category",
        "user_history",
        "markov",
        "funnel",
        "cascade",
        "cascade_recent",
        "cascade_mix",
        "funnel_cart",
    ]
    cats, etypes, ts, user_start = log_arrays(USERS)
    for b in bs:
        b.fit(cats, etypes, ts, user_start, np.ones(len(cats), bool), H, 6)
        b.start_user()
        b.observe(2, VIEW, 0.0)
    ranks_cats = [b.category_scores() is not None for b in bs]
    has_proba = [b.purchase_proba() is not None for b in bs]
    assert ranks_cats == [True, True, True, True, False, True, True, True, False]
    assert has_proba == [False, False, True, False, True, False, False, False, True]


def test_popularity_scores_stay_below_one_and_ordered():
    s = popularity_scores(np.array([3, 3, 3, 1]), 4)
    assert s[0] == -np.inf and (s[1:] < 1).all() and (s[1:] >= 0).all()
    assert ranking(s) == [3, 1, 2, 0]


# -- cascade ------------------------------------------------------------------------------------

# transitions from 1 on the fit rows: ->2 twice, ->3 once (see USERS); popularity 1, 2, 3, 4, 5


def test_cascade_tiers_last_cart_history_markov_popularity():
    b = fitted(Cascade(), USERS, n_categories=9)
    b.start_user()
    for cat, et in [
        (6, VIEW),
        (7, CART),  # in the cart, added first
        (6, VIEW),
        (8, CART),  # in the cart, added last
        (5, CART),
        (5, REMOVE),  # 5 leaves the cart again: a history category (seen twice)
        (6, VIEW),
        (1, VIEW),  # the last category
    ]:
        b.observe(cat, et, 0.0)
    s = b.category_scores()
    # last 1 | cart 8, 7 (most recent add first) | history 6 (x3), 5 (x2) | Markov from 1: 2, 3 |
    # popularity: 4, then never-seen categories by index
    assert ranking(s) == [1, 8, 7, 6, 5, 2, 3, 4, 0]
    assert s[0] == -np.inf and is_strict(s)
    assert b.purchase_proba() is None


def test_cascade_history_ties_go_to_the_most_recent_and_purchases_empty_the_cart():
    b = fitted(Cascade(), USERS, n_categories=9)
    b.start_user()
    for cat, et in [(7, CART), (7, PURCHASE), (6, VIEW), (5, VIEW), (0, VIEW), (4, VIEW)]:
        b.observe(cat, et, 0.0)
    # 7 was bought: history (x2) above 5 and 6 (x1, 5 more recent); unknown category ignored
    assert ranking(b.category_scores())[:4] == [4, 7, 5, 6]


def test_cascade_cart_count_is_floored_and_resets_per_user():
    b = fitted(Cascade(), USERS, n_categories=9)
    b.start_user()
    for cat, et in [(7, REMOVE), (7, CART), (6, VIEW), (6, VIEW), (1, VIEW)]:
        b.observe(cat, et, 0.0)
    # the removal before any add does not leave the cart at -1: the add puts 7 in it
    assert ranking(b.category_scores())[:3] == [1, 7, 6]
    b.start_user()
    assert ranking(b.category_scores()) == ranking(b.pop)  # nothing seen: popularity
    b.observe(3, VIEW, 0.0)
    assert ranking(b.category_scores())[:2] == [3, 1]  # no Markov successors of 3: popularity


def test_cascade_with_an_unknown_first_event_scores_popularity():
    b = fitted(Cascade(), USERS, n_categories=6)
    b.start_user()
    b.observe(0, CART, 0.0)
    assert ranking(b.category_scores()) == [1, 2, 3, 4, 5, 0]


# -- cascade_recent -----------------------------------------------------------------------------


def test_cascade_recent_drops_categories_beyond_its_window_to_the_markov_tier():
    events = [(6, VIEW), (6, VIEW), (6, VIEW), (7, CART), (5, VIEW), (4, VIEW), (1, VIEW)]
    full = fitted(Cascade(), USERS, n_categories=9)
    windowed = fitted(CascadeRecent(window=3), USERS, n_categories=9)
    unbounded = fitted(CascadeRecent(window=None), USERS, n_categories=9)
    for b in (full, windowed, unbounded):
        b.start_user()
        for cat, et in events:
            b.observe(cat, et, 0.0)
    # the cascade: last 1 | cart 7 | history 6 (x3), 4, 5 | Markov from 1: 2, 3 | the rest
    assert ranking(full.category_scores())[:7] == [1, 7, 6, 4, 5, 2, 3]
    # a window of 3 keeps 1, 4, 5: the cart's 7 and the thrice-seen 6 fall below the Markov successors
    s = windowed.category_scores()
    assert ranking(s)[:5] == [1, 4, 5, 2, 3] and is_strict(s)
    assert ranking(unbounded.category_scores()) == ranking(full.category_scores())


def _choice_log(comes_back: bool):
    """Users fitted before T1 = 100 teach the transition 5 -> 8; validation users (100 <= ts < 200) count
    category 1 often, then touch 2, 3, 4, 5 once each, then go on to 8 (Markov's pick), or back to 1."""
    fit_users = [[(5, VIEW, 10.0 + i), (8, VIEW, 11.0 + i)] for i in range(5)]
    last = 1 if comes_back else 8
    seq = [1, 1, 1, 1, 1, 2, 3, 4, 5, last]
    valid_users = [[(c, VIEW, 120.0 + i) for i, c in enumerate(seq)] for _ in range(3)]
    return log_arrays(fit_users + valid_users)


@pytest.mark.parametrize(("comes_back", "window"), [(False, 4), (True, None)])
def test_cascade_recent_chooses_its_window_on_validation_points(comes_back, window):
    cats, etypes, ts, user_start = _choice_log(comes_back)
    b = CascadeRecent()
    b.fit(cats, etypes, ts, user_start, ts < 200.0, H, 10, valid_start=100.0)
    assert b.window == window
    chosen = b.settings()
    assert chosen["chosen_on"] == "validation" and chosen["validation_points"] == 3 * 9
    mrr = chosen["validation_mrr@20"]
    # 8 ranks fifth with a window of 4 (5, 4, 3, 2, then Markov's 8), sixth with 1 still in the history
    assert mrr["4"] > mrr["8"] == mrr["all"] if window == 4 else mrr["all"] > mrr["4"]


def test_cascade_recent_never_chooses_on_rows_at_or_after_the_test_start():
    cats, etypes, ts, user_start = _choice_log(comes_back=False)
    b = CascadeRecent()
    # with T2 = 125 the validation users' sequences are cut after their 5th event: no point has more
    # than one distinct category, so every window scores alike and the largest, the cascade, is kept
    b.fit(cats, etypes, ts, user_start, ts < 125.0, H, 10, valid_start=100.0)
    assert b.window is None and b.settings()["validation_points"] == 3 * 4


def test_cascade_recent_without_validation_points_is_the_cascade():
    b = fitted(CascadeRecent(), USERS, n_categories=9)
    assert b.window is None and b.settings()["chosen_on"].startswith("nothing")
    b.fit(*log_arrays(USERS), np.ones(sum(map(len, USERS)), bool), H, 9, valid_start=1e9)
    assert b.window is None and b.settings()["chosen_on"].startswith("nothing")


def test_cascade_mix_ranks_the_successors_of_the_recent_categories_together():
    # fit rows: 1 -> 2 (twice) and -> 3 once; 4 -> 3 (twice); 5 -> 6 (three times)
    users = [
        [(1, VIEW, 0.0), (2, VIEW, 1.0), (1, VIEW, 2.0), (2, VIEW, 3.0), (1, VIEW, 4.0), (3, VIEW, 5.0)],
        [(4, VIEW, 0.0), (3, VIEW, 1.0), (4, VIEW, 2.0), (3, VIEW, 3.0)],
        [(5, VIEW, 0.0), (6, VIEW, 1.0), (5, VIEW, 2.0), (6, VIEW, 3.0), (5, VIEW, 4.0), (6, VIEW, 5.0)],
    ]
    plain = fitted(CascadeRecent(window=None), users, n_categories=8)
    mixed = fitted(CascadeMix(window=None), users, n_categories=8)
    for b in (plain, mixed):
        b.start_user()
        for cat in (5, 4, 1):  # 1 now, 4 before it, 5 longest ago
            b.observe(cat, VIEW, 0.0)
    # the plain cascade ranks 1's successors only: 2, then 3 (once); 6 falls to popularity
    assert ranking(plain.category_scores())[:6] == [1, 4, 5, 2, 3, 6]
    # the mixture: 3 is a successor of both 1 and 4 (1 * 1/4 + 0.5 * 2/3 > 1 * 2/4), then 2, then 5's 6
    s = mixed.category_scores()
    assert ranking(s)[:6] == [1, 4, 5, 3, 2, 6] and is_strict(s)
    # a window of one category keeps only 1's row in the mixture
    one = fitted(CascadeMix(window=1), users, n_categories=8)
    one.start_user()
    for cat in (5, 4, 1):
        one.observe(cat, VIEW, 0.0)
    assert ranking(one.category_scores())[:3] == [1, 2, 3]


def test_cascade_mix_of_a_user_who_touched_every_category_is_the_cascade():
    # a small catalog: the history tier holds every category, so nothing is left for the mixture's
    # tier (this used to raise on an empty max, and with it every `train` whose start was chosen on
    # such a user: found by `demandstream bench`'s training part)
    users = [[(1, VIEW, 0.0), (2, VIEW, 1.0), (3, VIEW, 2.0)], [(2, VIEW, 0.0), (1, VIEW, 1.0)]]
    mixed = fitted(CascadeMix(window=None), users, n_categories=4)
    plain = fitted(CascadeRecent(window=None), users, n_categories=4)
    for b in (mixed, plain):
        b.start_user()
        for cat in (3, 1, 2):
            b.observe(cat, VIEW, 0.0)
    s = mixed.category_scores()
    assert ranking(s)[:3] == [2, 1, 3] and np.array_equal(s, plain.category_scores())


# -- funnel_cart --------------------------------------------------------------------------------


def test_floored_cart_counts_match_a_loop():
    rng = np.random.default_rng(5)
    etypes = rng.choice([VIEW, CART, REMOVE, PURCHASE], size=400).astype(np.int8)
    user_start = np.r_[0, np.sort(rng.choice(np.arange(1, 400), 30, replace=False)), 400]
    mask = rng.random(400) < 0.8
    got = floored_cart_counts(etypes, user_start, mask)
    for u in range(len(user_start) - 1):
        cart = 0
        for i in range(user_start[u], user_start[u + 1]):
            if mask[i]:
                cart = max(0, cart + {CART: 1, REMOVE: -1, PURCHASE: -1}.get(int(etypes[i]), 0))
            assert got[i] == cart


def test_funnel_cart_separates_views_with_and_without_a_cart():
    users = [
        [(0, VIEW, 0.0), (0, CART, 10.0), (0, VIEW, 20.0), (0, PURCHASE, 30.0), (0, VIEW, 40.0)],
        [(0, VIEW, 0.0), (0, CART, 10.0), (0, REMOVE, 15.0), (0, VIEW, 20.0), (0, VIEW, 400.0)],
        [(0, VIEW, 0.0), (0, CART, 10.0), (0, VIEW, 20.0), (0, VIEW, 400.0)],
    ]  # end of data: 400; windows of 100 s
    b = fitted(FunnelCart(), users, n_categories=1)
    # views with a non-empty cart: row 2 (bought) and user 2's view at 20 (not): 1 of 2.
    # views with an empty cart: rows 0 (bought), 4 (after the purchase: no), user 1's at 0 and 20
    # (no), user 2's at 0 (no); the views at 400 are censored: 1 of 5.
    b.start_user()
    assert b.purchase_proba() == pytest.approx(b.prior)
    b.observe(0, VIEW, 0.0)
    assert b.purchase_proba() == pytest.approx((1 + 1) / (5 + 2))
    b.observe(0, CART, 1.0)
    assert b.purchase_proba() == pytest.approx((1 + 1) / (3 + 2))  # carts: 1 of 3 bought
    b.observe(0, VIEW, 2.0)
    assert b.purchase_proba() == pytest.approx((1 + 1) / (2 + 2))
    b.observe(0, REMOVE, 3.0)
    b.observe(0, VIEW, 4.0)
    assert b.purchase_proba() == pytest.approx((1 + 1) / (5 + 2))  # the cart is empty again
    b.start_user()
    b.observe(0, VIEW, 0.0)
    assert b.purchase_proba() == pytest.approx((1 + 1) / (5 + 2))
    assert b.category_scores() is None


def test_funnel_cart_fit_counts_only_fit_rows_and_observable_labels():
    users = [[(0, CART, 0.0), (0, VIEW, 10.0), (0, PURCHASE, 20.0), (0, VIEW, 300.0)]]
    fit = np.array([False, True, True, True])  # the add is outside: the view at 10 has no cart
    b = fitted(FunnelCart(), users, n_categories=1, mask=fit)
    assert b.cell_proba[VIEW, 0] == pytest.approx((1 + 1) / (1 + 2))
    assert b.cell_proba[VIEW, 1] == pytest.approx(0.5)  # no observations: (0 + 1) / (0 + 2)
