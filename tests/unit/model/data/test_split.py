"""model/data/split.py: time parsing, the temporal split, targets and leakage-free phase labels."""

import numpy as np
import pytest

from demandstream.model.core.encoding import category_index
from demandstream.model.core.events import Event
from demandstream.model.core.features import PURCHASE_HORIZON_S, Vocabulary
from demandstream.model.data.eventlog import EventLog
from demandstream.model.data.labels import log_gaps
from demandstream.model.data.split import (
    OUTLIER_GAP_S,
    Split,
    main_span,
    next_category_targets,
    parse_time,
    phase_points,
    temporal_split,
    utc_text,
)

T1, T2 = 10_000.0, 20_000.0
HORIZON = PURCHASE_HORIZON_S  # (test_train imports it from here)


@pytest.mark.parametrize(
    "value, expected",
    [
        (1569888000, 1569888000.0),
        (1569888000.25, 1569888000.25),
        ("1569888000", 1569888000.0),
        ("2019-10-01", 1569888000.0),
        ("2019-10-01T00:00:00", 1569888000.0),
        ("2019-10-01T02:00:00+02:00", 1569888000.0),
        ("2019-10-01T00:00:00Z", 1569888000.0),
        ("2019-10-01 00:00:00 UTC", 1569888000.0),
    ],
)
def test_parse_time_variants(value, expected):
    assert parse_time(value) == expected


@pytest.mark.parametrize("bad", ["", "soon", "2019-13-45", "nan", True])
def test_parse_time_rejects_garbage(bad):
    with pytest.raises(ValueError, match="cannot parse time"):
        parse_time(bad)


def test_default_split_is_80_10_10_and_bounds_are_validated():
    log = EventLog.from_events([Event(f"e{i}", "u", 100.0 * i, "view", "i") for i in range(11)])
    assert temporal_split(log) == Split(800.0, 900.0, 1000.0)
    assert temporal_split(log, "500", 700) == Split(500.0, 700.0, 1000.0)
    with pytest.raises(ValueError, match="before valid end"):
        temporal_split(log, 700, 700)
    # a train end past the log's last event, alone: the message says so, in dates (it used to show
    # two unix times, the second one derived from the first)
    with pytest.raises(
        ValueError,
        match=r"train end 1970-01-01T00:16:40Z is at or after the log's last event \(1970-01-01T00:16:40Z\)",
    ):
        temporal_split(log, 1000)


DAY = 86400.0
BODY0 = 1_511_568_000.0  # 2017-11-25, Taobao UserBehavior's first day


def _log(times):
    return EventLog.from_events([Event(f"e{i}", f"u{i % 3}", t, "view", "i") for i, t in enumerate(times)])


def test_rows_stamped_far_from_the_log_do_not_stretch_the_default_split(caplog):
    """A few rows stamped years away from a nine-day log: without the main-body rule they stretch the
    span, and every real event lands on one side of T1 (an empty training set or an empty test)."""
    body = [BODY0 + DAY * 9 * k / 99 for k in range(100)]
    log = _log([0.0, -3e8, *body, 2_147_483_647.0])
    with caplog.at_level("WARNING"):
        split = temporal_split(log)
    assert split.train_end == pytest.approx(BODY0 + 0.8 * 9 * DAY)
    assert split.valid_end == pytest.approx(BODY0 + 0.9 * 9 * DAY)
    assert split.end_ts == 2_147_483_647.0  # labels are still censored at the log's real end
    assert "3 events lie more than 7 days away" in caplog.text
    # explicit bounds are taken as given, and say nothing
    caplog.clear()
    assert temporal_split(log, BODY0 + DAY, BODY0 + 2 * DAY) == Split(
        BODY0 + DAY, BODY0 + 2 * DAY, 2_147_483_647.0
    )
    assert caplog.text == ""
    # an explicit T1 alone: validation is half of the body after it
    assert temporal_split(log, BODY0 + DAY).valid_end == pytest.approx(BODY0 + 5 * DAY)


def test_a_default_split_that_trains_on_a_sliver_warns_and_names_the_event_quantiles(caplog):
    """A log whose rate ramps up (the shared multi-category sample: 7 % of its events before the default
    T1): the split stays the documented one, and a warning gives the bounds that split the events."""
    times = [BODY0 + 3600.0 * k / 10 for k in range(10)] + [BODY0 + 3600.0 + k for k in range(90)]
    log = _log(times)
    with caplog.at_level("WARNING"):
        split = temporal_split(log)
    assert split.train_end == pytest.approx(BODY0 + 0.8 * 3690.0)  # unchanged: 80 % of the time span
    assert "puts 9 % of the events in training, 1 % in validation and 90 % in test" in caplog.text
    t1, t2 = np.quantile(log.ts, [0.8, 0.9])
    assert f"--train-end {utc_text(t1)} --valid-end {utc_text(t2)}" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        temporal_split(_log([BODY0 + k for k in range(100)]))  # an even log says nothing
    assert caplog.text == ""


def test_main_span_keeps_the_busiest_run_and_ignores_silences_up_to_the_bound():
    week = OUTLIER_GAP_S
    # two runs: 3 rows, a silence longer than the bound, 4 rows: the second is the body
    assert main_span(np.array([0.0, 1.0, 2.0, 2.0 + week + 1, 3.0 + week, 4.0 + week, 5.0 + week])) == (
        2.0 + week + 1,
        5.0 + week,
        3,
    )
    # a silence of exactly the bound does not split the log
    assert main_span(np.array([0.0, week, 2 * week])) == (0.0, 2 * week, 0)
    # a log without outliers: the default split is unchanged (80 / 10 / 10 of the whole span)
    assert main_span(np.array([5.0])) == (5.0, 5.0, 0)


def test_next_category_targets_stop_at_user_boundaries():
    user_start = np.array([0, 2, 2, 5])  # user 1 has no rows
    got = next_category_targets(np.array([1, 2, 3, 0, 4]), user_start)
    assert got.tolist() == [2, -1, 0, 4, -1]


def leaky_log():
    """Users whose events straddle T1 and T2; every event at or after T1 carries a unique category
    ("late-*") and the only purchases are at or after T1, so any leakage shows up in the labels."""
    events = []
    for u in range(6):
        ts = T1 - 3000.0 + 100.0 * u
        for k in range(40):
            late = ts >= T1
            etype = "purchase" if late and k % 5 == 0 else ("add_to_cart" if k % 3 == 0 else "view")
            cat = f"late-{u}-{k}" if late else f"early-{k % 4}"
            events.append(Event(f"e{u}-{k}", f"u{u}", ts, etype, f"i{k}", cat, 5.0))
            ts += 400.0
    return EventLog.from_events(events).sorted_by_user_time()


def test_training_points_never_see_events_at_or_after_t1():
    log = leaky_log()
    split = Split(T1, T2, float(log.ts.max()))
    # A vocabulary over *all* categories, so a leaked late category would show up as a target.
    vocab = Vocabulary.build(log.categories)
    cats = category_index(log, vocab)
    pts = phase_points(log, split, "train", cats, HORIZON)
    late = np.array([n.startswith("late") for n in vocab.names])
    assert pts.mask.any() and (pts.cat_target > 0).any()
    # inputs: every training point is itself before T1
    assert (log.ts[pts.mask] < T1).all()
    # next-category targets: never a category first seen at or after T1
    assert not late[pts.cat_target[pts.cat_target > 0]].any()
    # purchase labels: the only purchases are after T1, so no positive label may exist ...
    assert pts.purchase.sum() == 0
    # ... and windows reaching T1 are censored, not negatives
    assert not (pts.observable & (log.ts + HORIZON >= T1)).any()
    assert pts.observable.any()


def test_validation_labels_stop_at_t2_and_test_labels_are_censored_at_the_end():
    log = leaky_log()
    split = Split(T1, T2, float(log.ts.max()))
    vocab = Vocabulary.build(log.categories)
    cats = category_index(log, vocab)
    va = phase_points(log, split, "valid", cats, HORIZON)
    assert ((log.ts[va.mask] >= T1) & (log.ts[va.mask] < T2)).all()
    nxt_ts = np.r_[log.ts[1:], np.inf]
    assert (nxt_ts[va.cat_target >= 0] < T2).all()
    assert not (va.observable & (va.purchase == 0) & (log.ts + HORIZON >= T2)).any()
    assert va.purchase.sum() > 0  # purchases between T1 and T2 do count for validation
    te = phase_points(log, split, "test", cats, HORIZON)
    assert (log.ts[te.mask] >= T2).all()
    assert not (te.observable & (te.purchase == 0) & (log.ts + HORIZON > split.end_ts)).any()
    with pytest.raises(ValueError, match="unknown phase"):
        phase_points(log, split, "holdout", cats, HORIZON)


def test_phase_points_censor_windows_across_a_gap_in_every_phase():
    """Two hours without any event in each phase: a window crossing them is not observable."""
    gap = 7200.0
    events = []
    for phase_start in (0.0, T1, T2):
        for u in range(3):
            # a view at the start, one just before the silence, then the log resumes after it
            for k, dt in enumerate((0.0, 500.0, 500.0 + gap, 600.0 + gap, 3000.0 + gap)):
                etype = "purchase" if (u == 0 and k == 1) else "view"
                events.append(
                    Event(f"e{phase_start}-{u}-{k}", f"u{u}", phase_start + dt + u, etype, "i", "c")
                )
    log = EventLog.from_events(events).sorted_by_user_time()
    split = Split(T1, T2, float(log.ts.max()))
    cats = category_index(log, Vocabulary.build(log.categories))
    gaps = log_gaps(log.ts)  # the last event before each silence
    assert gaps.tolist() == [502.0, T1 + 502.0, T2 + 502.0]
    for phase in ("train", "valid", "test"):
        pts = phase_points(log, split, phase, cats, HORIZON)
        negative = pts.observable & (pts.purchase == 0)
        crosses = np.array([((gaps >= t) & (gaps < t + HORIZON)).any() for t in log.ts])
        assert not (negative & crosses).any(), phase
        # user 0's view at the start sees its purchase 500 s later, before the gap: labelled 1, and
        # censored all the same (no window across a gap counts, whatever its label)
        assert ((pts.purchase == 1) & crosses).any(), phase
        assert not (pts.observable & crosses).any(), phase
        off = phase_points(log, split, phase, cats, HORIZON, gap_s=None)
        assert (off.observable & (off.purchase == 0) & crosses).any(), phase  # were negatives before
        assert (off.observable >= pts.observable).all() and (off.purchase == pts.purchase).all()
