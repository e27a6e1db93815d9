"""model/core/prequential.py: the outcome of each prediction, the purchase resolver and its censoring."""

from __future__ import annotations

import math

import pytest

from demandstream.model.core.features import category_hash
from demandstream.model.core.prequential import (
    LOGLOSS_EPS,
    CategoryTally,
    PurchaseResolver,
    PurchaseTally,
    bucket_of,
    figures,
    top_rank,
)
from demandstream.model.evaluation import metrics as offline_metrics

H = 100.0


def resolver(max_pending: int = 1000, gap_s: float = 1000.0) -> tuple[PurchaseResolver, PurchaseTally]:
    tally = PurchaseTally()
    return PurchaseResolver(H, gap_s, tally, max_pending), tally


def test_constants_match_the_offline_metrics():
    # core cannot import the evaluation layer: the shared constants are checked here instead
    assert LOGLOSS_EPS == offline_metrics.LOGLOSS_EPS
    assert bucket_of(0.95) == offline_metrics.ECE_BINS - 1


def test_rank_in_the_stored_top_and_the_hash_name_of_an_unknown_category():
    assert top_rank(["a", "b", "c"], "a") == 1
    assert top_rank(["a", "b", "c"], "c") == 3
    assert top_rank(["a", "b", "c"], "d") == 0
    assert top_rank(["a"], None) is None
    assert top_rank(["a", f"#{category_hash('z'):08x}"], "z") == 2


def test_category_tally_hits_and_reciprocal_ranks():
    t = CategoryTally()
    for r in (1, 3, 5, 0):
        t.add(r)
    assert (t.points, t.hits) == (4, [1, 3])
    assert t.rr_sum == pytest.approx(1 + 1 / 3 + 1 / 5)
    taken = t.take()
    assert taken.points == 4 and t.points == 0 and t.hits == [0, 0] and t.rr_sum == 0.0


def test_a_purchase_within_the_horizon_is_positive_even_at_its_edge():
    r, tally = resolver()
    r.event("u", 0.0, False, 0.9)
    r.event("u", 50.0, False, 0.8)
    r.event("u", 100.0, True, 0.1)  # 100 - 0 <= H: both earlier predictions are positive ...
    assert (tally.points, r.pending) == (0, 3)  # ... but none is counted while its window is open
    r.event("v", 100.5, False, None)  # the watermark passes 100: the t=0 window is over
    assert (tally.points, tally.positives, r.pending) == (1, 1, 2)
    r.event("v", 150.5, False, None)
    assert (tally.points, tally.positives, r.pending) == (2, 2, 1)
    assert tally.logloss_sum == pytest.approx(-math.log(0.9) - math.log(0.8))
    assert tally.counts[9] == 1 and tally.observed[8] == 1 and tally.predicted[8] == pytest.approx(0.8)


def test_counted_only_once_the_watermark_has_passed_the_horizon():
    r, tally = resolver()
    r.event("u", 0.0, False, 0.3)
    r.event("v", 100.0, False, None)  # watermark == t + H: a purchase at 100 could still come
    assert tally.points == 0
    r.event("u", 100.0, True, None)
    assert tally.points == 0
    r.event("w", 10.0, False, 0.2)  # late event: the watermark stays at 100
    r.event("v", 110.5, False, None)  # 0 + H and 10 + H < 110.5: u's positive, w's negative
    assert (tally.points, tally.positives, r.pending) == (2, 1, 0)
    assert tally.logloss_sum == pytest.approx(-math.log(0.3) - math.log(0.8))


def test_a_purchase_after_the_window_is_a_negative():
    r, tally = resolver()
    r.event("u", 0.0, False, 0.3)
    r.event("u", 100.5, True, None)  # 100.5 - 0 > H: the watermark closes the window first
    assert (tally.points, tally.positives, r.pending) == (1, 0, 0)


def test_another_users_purchase_resolves_nothing():
    r, tally = resolver()
    r.event("u", 0.0, False, 0.3)
    r.event("v", 5.0, True, None)
    r.event("v", 200.0, False, None)
    assert (tally.points, tally.positives, r.pending) == (1, 0, 0)


def test_a_gap_censors_the_windows_it_starts_in_whatever_their_label():
    r, tally = resolver(gap_s=50.0)
    r.event("u", 0.0, False, 0.3)
    r.event("v", 10.0, False, 0.4)
    r.event("w", 20.0, False, 0.5)
    r.event("w", 80.0, True, None)  # 80 - 20 > 50: a gap starting at 20; w buys within its horizon
    r.event("x", 500.0, False, None)  # every window is over, and each crossed the gap
    # w's window saw a purchase, but a gap is in it: counting it while the windows that saw none are
    # censored would keep positives only before every gap (docs/MODEL.md §2, "Honest labels")
    assert (tally.points, tally.positives) == (0, 0)
    assert tally.unresolved["gap"] == 3 and r.pending == 0


def test_a_window_closed_before_the_gap_is_counted():
    r, tally = resolver(gap_s=150.0)
    r.event("u", 0.0, False, 0.3)
    r.event("v", 0.0, False, 0.6)
    r.event("v", 50.0, True, None)  # v's window saw a purchase
    r.event("v", 100.0, False, None)  # the window of u ends at 100; the gap starts at 100
    r.event("v", 400.0, False, None)
    assert (tally.points, tally.positives, tally.unresolved["gap"]) == (2, 1, 0)


def test_the_open_windows_at_the_end_are_censored_whatever_their_label():
    r, tally = resolver()
    r.event("u", 0.0, False, 0.3)
    r.event("v", 1.0, False, 0.6)
    r.event("u", 20.0, True, None)
    assert (tally.points, r.pending) == (0, 2)


def test_capacity_leaves_new_predictions_untracked_and_counts_them():
    r, tally = resolver(max_pending=2)
    for i in range(4):
        r.event(f"u{i}", float(i), False, 0.5)
    assert r.pending == 2 and tally.unresolved["capacity"] == 2
    r.event("x", 500.0, False, None)
    assert tally.points == 2
    assert r.discard() == 0


def test_discard_returns_the_open_predictions():
    r, _tally = resolver()
    r.event("u", 0.0, False, 0.3)
    r.event("v", 1.0, False, 0.3)
    assert r.discard() == 2 and r.pending == 0


def test_figures_derive_ratios_from_the_counts():
    c, p = CategoryTally(), PurchaseTally()
    for rank in (1, 2, 0, 0):
        c.add(rank)
    p.add(0.25, 1)
    p.add(0.75, 0)
    f = figures(c, p, top_k=5)
    assert (f["hit@1"], f["hit@5"], f["mrr"]) == (0.25, 0.5, pytest.approx(1.5 / 4))
    assert f["purchase_points"] == 2 and f["purchase_rate"] == 0.5
    assert f["purchase_logloss"] == pytest.approx((-math.log(0.25) - math.log(0.25)) / 2)
    assert [b["points"] for b in f["calibration"]] == [0, 0, 1, 0, 0, 0, 0, 1, 0, 0]
    assert math.isnan(figures(CategoryTally(), PurchaseTally(), 5)["hit@1"])
