"""Temporal split, next-category targets and purchase labels, with no leakage across the split.

docs/ARCHITECTURE.md §Evaluation fixes a global temporal split: train ``ts < T1`` ≤ validation ``< T2`` ≤
test. Each phase has its *points* (rows whose predictions are scored or trained on) and labels that may only
look as far as the phase allows:

- train: points ``ts < T1``; the next-category target must itself be ``< T1``; purchase labels count
  only purchases ``< T1`` and a window that reaches ``T1`` without one is censored;
- validation: points ``T1 ≤ ts < T2``; labels only from rows ``< T2``, censored at ``T2``;
- test: points ``ts ≥ T2``; labels from anything, censored at the end of the data.

In every phase a purchase window that crosses a gap of the log (more than ``gap_s`` seconds,
:data:`DEFAULT_GAP_S` by default, without any event of any user) and has no purchase in it is
censored too: a hole in the data is no evidence that the user did not buy.

>>> parse_time("2019-10-01"), parse_time("1569888000"), parse_time(1569888000.5)
(1569888000.0, 1569888000.0, 1569888000.5)
>>> next_category_targets(np.array([3, 4, 5, 6]), np.array([0, 3, 4])).tolist()
[4, 5, -1, -1]
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from datetime import UTC, datetime

import numpy as np

from demandstream.model.core.events import iso_seconds
from demandstream.model.data.eventlog import EventLog
from demandstream.model.data.labels import DEFAULT_GAP_S, PURCHASE, purchase_labels, window_covered
from demandstream.model.errors import DataError, OptionError

logger = logging.getLogger(__name__)

# DEFAULT_GAP_S (imported above, defined with the labels in demandstream.model.data.labels) is the longest
# silence of the whole log (no event of any user) that still counts as continuous logging: a purchase window
# crossing a longer one is censored, since the purchase may be in the hole (an outage, a missing
# export day). ``from demandstream.model.data.split import DEFAULT_GAP_S`` works too.

#: Default split of the time span: the first 80 % trains, the next 10 % validates, the rest tests.
DEFAULT_TRAIN_FRACTION = 0.8
DEFAULT_VALID_FRACTION = 0.9

#: A shop logs continuously, so a week without a single event of any user separates a log's main body
#: from rows that are not part of it: clock errors (a client whose clock is a year off still passes
#: validation) or a separate export appended to the file. The default split measures its fractions on
#: the main body only (:func:`main_span`); the rows outside it stay in the log (before the body: train
#: context; after it: test).
OUTLIER_GAP_S = 7 * 86400.0

#: The three phases of the split, in time order.
PHASES = ("train", "valid", "test")


def parse_time(value: str | float) -> float:
    """Unix seconds from unix seconds (number or numeric string) or an ISO-8601 date/datetime.

    A date or datetime without a time zone is taken as UTC.

    >>> parse_time("2019-10-01T00:00:00+02:00")
    1569880800.0
    >>> parse_time("2019-10-01 00:00:00 UTC")
    1569888000.0
    >>> parse_time("yesterday")
    Traceback (most recent call last):
    ...
    demandstream.model.errors.OptionError: cannot parse time 'yesterday': expected unix seconds or an ISO-8601 date/datetime
    """
    if isinstance(value, bool):
        raise OptionError(f"cannot parse time {value!r}: expected unix seconds or an ISO-8601 date/datetime")
    if isinstance(value, int | float):
        t = float(value)
    else:
        s = str(value).strip()
        try:
            t = float(s)
        except ValueError:
            try:
                t = iso_seconds(s.replace("Z", "+00:00"), utc_word=True)
            except ValueError:
                raise OptionError(
                    f"cannot parse time {value!r}: expected unix seconds or an ISO-8601 date/datetime"
                ) from None
    if not math.isfinite(t):
        raise OptionError(f"cannot parse time {value!r}: not a finite number")
    return t


@dataclass(frozen=True)
class Split:
    """The global temporal split: train ``< train_end`` ≤ valid ``< valid_end`` ≤ test ≤ ``end_ts``."""

    train_end: float
    valid_end: float
    end_ts: float

    def to_dict(self) -> dict:
        return asdict(self)


def main_span(ts: np.ndarray, outlier_gap_s: float = OUTLIER_GAP_S) -> tuple[float, float, int]:
    """``(start, end, n_outside)``: the time span of the log's main body and the rows outside it.

    The main body is the run of the sorted timestamps without a silence longer than ``outlier_gap_s``
    that holds the most rows (the earliest such run on ties).

    >>> main_span(np.array([0.0, 1e9, 1e9 + 60, 1e9 + 120, 4e9]))  # 1970 and 2096 are not the body
    (1000000000.0, 1000000120.0, 2)
    >>> main_span(np.array([5.0, 1.0, 3.0]))
    (1.0, 5.0, 0)
    """
    t = np.sort(np.asarray(ts, dtype=np.float64))
    cuts = np.flatnonzero(np.diff(t) > outlier_gap_s) + 1
    bounds = np.r_[0, cuts, t.shape[0]]
    k = int(np.argmax(np.diff(bounds)))
    lo, hi = int(bounds[k]), int(bounds[k + 1])
    return float(t[lo]), float(t[hi - 1]), t.shape[0] - (hi - lo)


def temporal_split(
    log: EventLog, train_end: str | float | None = None, valid_end: str | float | None = None
) -> Split:
    """The split of docs/ARCHITECTURE.md §Evaluation; without bounds 80 % / 10 % / 10 % of the time span.

    The fractions are of the log's main body (:func:`main_span`): rows separated from it by a silence
    of more than :data:`OUTLIER_GAP_S` do not stretch the span (one row stamped a few years early would
    otherwise put every real event in the test window). ``end_ts`` is still the last row of the whole log.

    >>> from demandstream.model.core.events import Event
    >>> log = EventLog.from_events([Event(f"e{i}", "u", 1000.0 + i, "view", "i") for i in range(11)])
    >>> temporal_split(log)
    Split(train_end=1008.0, valid_end=1009.0, end_ts=1010.0)
    >>> temporal_split(log, train_end=1009, valid_end=1005)
    Traceback (most recent call last):
    ...
    demandstream.model.errors.OptionError: train end (1970-01-01T00:16:49Z) must be before valid end (1970-01-01T00:16:45Z)
    """
    if len(log) == 0:
        raise DataError("cannot split an empty log")
    start, end, outside = main_span(log.ts)
    if outside and (train_end is None or valid_end is None):
        logger.warning(
            "%d events lie more than %.0f days away from the rest of the log (%s to %s): "
            "the default split measures its fractions without them",
            outside,
            OUTLIER_GAP_S / 86400,
            utc_text(start),
            utc_text(end),
        )
    span = end - start
    t1 = parse_time(train_end) if train_end is not None else start + DEFAULT_TRAIN_FRACTION * span
    if valid_end is not None:
        t2 = parse_time(valid_end)
    elif train_end is not None:
        # An explicit T1 alone: validation takes half of what is left after it (of the main body when
        # T1 falls inside it, else of the rest of the log).
        last = end if end > t1 else float(log.ts.max())
        t2 = t1 + 0.5 * (last - t1)
    else:
        t2 = start + DEFAULT_VALID_FRACTION * span
    if not t1 < t2:
        last = float(log.ts.max())
        if valid_end is None and t1 >= last:
            raise OptionError(
                f"train end {utc_text(t1)} is at or after the log's last event ({utc_text(last)}): "
                "nothing is left to validate and test; pass an earlier --train-end"
            )
        raise OptionError(f"train end ({utc_text(t1)}) must be before valid end ({utc_text(t2)})")
    if train_end is None and valid_end is None:
        _warn_if_uneven(log.ts, t1, t2)
    return Split(t1, t2, float(log.ts.max()))


def _warn_if_uneven(ts: np.ndarray, t1: float, t2: float) -> None:
    """Warn when the default split's training phase holds under half of the events: a log whose rate
    ramps (a night before a morning, an export that starts thin) then trains on a sliver and refits on
    many times more data for the epochs that sliver chose. The warning gives the bounds that split the
    events themselves 80 / 10 / 10, to pass as ``--train-end/--valid-end``."""
    n = ts.shape[0]
    n_train = int((ts < t1).sum())
    if 2 * n_train >= n:
        return
    n_valid = int(((ts >= t1) & (ts < t2)).sum())
    q1, q2 = np.quantile(ts, [DEFAULT_TRAIN_FRACTION, DEFAULT_VALID_FRACTION])
    logger.warning(
        "the default split (80/10/10 of the time span) puts %.0f %% of the events in training, %.0f %% "
        "in validation and %.0f %% in test: the log's rate is uneven; to split the events 80/10/10 "
        "instead, pass --train-end %s --valid-end %s",
        100 * n_train / n,
        100 * n_valid / n,
        100 * (n - n_train - n_valid) / n,
        utc_text(float(q1)),
        utc_text(float(q2)),
    )


def utc_text(ts: float) -> str:
    """A timestamp as ISO-8601 UTC text for messages (``repr`` when it is no date).

    >>> utc_text(1572580800.0)
    '2019-11-01T04:00:00Z'
    """
    try:
        return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    except (OverflowError, OSError, ValueError):
        return repr(ts)


def next_category_targets(cat_index: np.ndarray, user_start: np.ndarray) -> np.ndarray:
    """For every row, ``cat_index`` of the same user's next row; -1 for a user's last row.

    Works on any per-row integer column: vocabulary indices (0 = unknown) or the log's raw interned
    categories (-1 = none, so -1 then also means "next event has no category").
    """
    cat_index = np.asarray(cat_index)
    n = cat_index.shape[0]
    out = np.full(n, -1, dtype=np.int64)
    if n > 1:
        out[:-1] = cat_index[1:]
    ends = np.asarray(user_start, dtype=np.int64)[1:]
    out[ends[ends > 0] - 1] = -1
    return out


def next_ts(ts: np.ndarray, user_start: np.ndarray) -> np.ndarray:
    """For every row, the time of the same user's next row; +inf for a user's last row."""
    ts = np.asarray(ts, dtype=np.float64)
    out = np.full(ts.shape[0], np.inf)
    if ts.shape[0] > 1:
        out[:-1] = ts[1:]
    ends = np.asarray(user_start, dtype=np.int64)[1:]
    out[ends[ends > 0] - 1] = np.inf
    return out


@dataclass
class Points:
    """The points of one phase and their labels, one entry per row of the log.

    Attributes
    ----------
    mask : bool [n]
        Rows that are points of the phase (predictions made after these events).
    cat_target : int64 [n]
        Vocabulary index of the next category at category points (0 = outside the vocabulary, a miss),
        -1 where the row is not a category point (not in the phase, last event, next event without a
        category, or next event beyond the phase's label horizon).
    purchase : int8 [n]
        1 when the user purchases within the horizon (counting only purchases the phase may see).
    observable : bool [n]
        Purchase points: rows of the phase whose label is known (not censored).
    """

    mask: np.ndarray
    cat_target: np.ndarray
    purchase: np.ndarray
    observable: np.ndarray

    @property
    def category_points(self) -> np.ndarray:
        return self.cat_target >= 0


def phase_points(
    log: EventLog,
    split: Split,
    phase: str,
    cat_index: np.ndarray,
    horizon_s: float,
    *,
    gap_s: float | None = DEFAULT_GAP_S,
) -> Points:
    """Points and labels of ``phase`` ('train', 'valid' or 'test') for a log sorted by user and time.

    ``cat_index`` is the vocabulary index of every row (see :func:`demandstream.model.core.encoding.category_index`).
    Train and validation labels never use a row at or after their phase's end (``T1``, ``T2``): a
    next event beyond it is no target, a purchase beyond it does not count, and a purchase window
    that reaches it is censored. Test labels use the whole log, censored at its end. In every phase a
    window that crosses a gap of the log (more than ``gap_s`` seconds without any event, see
    :func:`demandstream.model.data.labels.window_covered`) is censored; ``gap_s=None`` turns that off.
    Censored means not observable whatever the label: a purchase seen in the covered part of such a
    window labels the point 1 but does not make it count (docs/MODEL.md §2, "Honest labels").
    """
    if log.user_start is None:
        raise ValueError("phase_points needs a log sorted_by_user_time()")
    ts = log.ts
    if phase == "train":
        mask, cutoff = ts < split.train_end, split.train_end
    elif phase == "valid":
        mask, cutoff = (ts >= split.train_end) & (ts < split.valid_end), split.valid_end
    elif phase == "test":
        mask, cutoff = ts >= split.valid_end, math.inf
    else:
        raise ValueError(f"unknown phase {phase!r}: expected one of {', '.join(PHASES)}")
    has_next_cat = next_category_targets(log.category, log.user_start) >= 0
    cat_ok = mask & has_next_cat & (next_ts(ts, log.user_start) < cutoff)
    cat_target = np.where(cat_ok, next_category_targets(cat_index, log.user_start), -1)
    if math.isinf(cutoff):
        labels, observable = purchase_labels(
            log.etype, ts, log.user_start, horizon_s, split.end_ts, gap_s=gap_s
        )
    else:
        # Purchases at or after the cutoff are invisible to this phase: drop them, then censor every
        # window that reaches the cutoff (or crosses a gap), whatever it saw before.
        etypes = np.where((log.etype == PURCHASE) & (ts >= cutoff), -1, log.etype)
        labels, _ = purchase_labels(etypes, ts, log.user_start, horizon_s, split.end_ts, gap_s=None)
        observable = (ts + horizon_s < cutoff) & window_covered(ts, horizon_s, gap_s)
    labels = np.where(mask, labels, 0).astype(np.int8)
    return Points(mask, cat_target.astype(np.int64), labels, mask & observable)
