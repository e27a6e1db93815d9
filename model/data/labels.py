"""Purchase labels with honest censoring (docs/ARCHITECTURE.md §Evaluation), shared by training and evaluation.

A label at time t says whether the user bought within ``(t, t + horizon]``. It is *observable* only when the
log covers that window: a window that runs past the end of the data or across a gap in the whole log (see
:data:`DEFAULT_GAP_S`) is censored, **whatever its label**. A purchase seen inside such a window does not
make it observable: keeping the windows that turned positive before the end while dropping those that
did not would select points on their outcome, and every censored stretch (the last horizon before the
end of a phase, before each gap) would then hold positives only (issue #12: "negatives dropped,
positives kept"). On a 30-minute validation window with a 30-minute horizon that left validation with
positives only. These functions live in
the data layer so that :mod:`demandstream.model.data.split` (training) and the baselines (evaluation)
take them from one place, imports pointing one way.
"""

from __future__ import annotations

import numpy as np

from demandstream.model.core.events import TYPE_INDEX

PURCHASE = TYPE_INDEX["purchase"]

#: Default largest silence of the whole log (no event of any user) that still counts as continuous
#: logging, in seconds. Real logs have outages and export holes (a day missing from a monthly dump):
#: a purchase window that spans one is not evidence of "no purchase", because the purchase may sit
#: in the hole. An hour without a single event of any user is far beyond the normal between-event
#: gap of a live shop (seconds), yet short enough to catch missing days and broken collection.
DEFAULT_GAP_S = 3600.0


def _user_end(user_start: np.ndarray) -> np.ndarray:
    """For every row, the end offset (exclusive) of its user's rows."""
    user_start = np.asarray(user_start, dtype=np.int64)
    return np.repeat(user_start[1:], np.diff(user_start))


def _next_flag_after(flag: np.ndarray) -> np.ndarray:
    """For each row i, the smallest j > i with ``flag[j]`` (``len(flag)`` when there is none)."""
    n = flag.shape[0]
    idx = np.where(flag, np.arange(n), n)
    at_or_after = np.minimum.accumulate(idx[::-1])[::-1]
    return np.r_[at_or_after[1:], n].astype(np.int64)


def log_gaps(ts: np.ndarray, gap_s: float | None = DEFAULT_GAP_S) -> np.ndarray:
    """Start times of the gaps of a log: distinct timestamps followed by more than ``gap_s`` seconds
    without any event (of any user). ``gap_s=None`` means no gap detection (empty result).

    ``ts`` is every timestamp of the log, in any order. A gap's start is the timestamp of the last
    event before it.

    >>> log_gaps(np.array([0.0, 10.0, 5000.0, 5001.0, 20000.0, 10.0]), gap_s=3600.0).tolist()
    [10.0, 5001.0]
    >>> log_gaps(np.array([0.0, 10.0, 5000.0]), gap_s=None).tolist()
    []
    """
    ts = np.asarray(ts, dtype=np.float64)
    if gap_s is None or ts.shape[0] < 2:
        return np.zeros(0, dtype=np.float64)
    u = np.unique(ts)
    return u[:-1][np.diff(u) > gap_s]


def window_covered(
    ts: np.ndarray, horizon_s: float, gap_s: float | None = DEFAULT_GAP_S, log_ts: np.ndarray | None = None
) -> np.ndarray:
    """Whether the window ``(t, t + horizon_s]`` of each ``t`` in ``ts`` crosses no gap of the log.

    A window is covered iff no gap (see :func:`log_gaps`, computed from ``log_ts``, by default
    ``ts`` itself) starts at ``a`` with ``t <= a < t + horizon_s``. The end of the data is not
    checked here: callers compare ``t + horizon_s`` with it.

    >>> window_covered(np.array([0.0, 10.0, 5000.0, 5001.0]), 100.0).tolist()   # gap after 10
    [False, False, True, True]
    >>> window_covered(np.array([0.0, 10.0, 5000.0, 5001.0]), 5.0).tolist()     # 0 + 5 < 10
    [True, False, True, True]
    """
    ts = np.asarray(ts, dtype=np.float64)
    gaps = log_gaps(ts if log_ts is None else log_ts, gap_s)
    if gaps.size == 0:
        return np.ones(ts.shape[0], dtype=bool)
    first = np.searchsorted(gaps, ts, side="left")  # first gap starting at or after t
    nxt = gaps[np.minimum(first, gaps.size - 1)]
    return ~((first < gaps.size) & (nxt < ts + horizon_s))


def purchase_labels(
    etypes: np.ndarray,
    ts: np.ndarray,
    user_start: np.ndarray,
    horizon_s: float,
    end_ts: float | None = None,
    *,
    gap_s: float | None = DEFAULT_GAP_S,
) -> tuple[np.ndarray, np.ndarray]:
    """Purchase-within-horizon labels for every row of a log sorted by user and time.

    ``label[i] = 1`` when the same user has a purchase at a later row j with
    ``ts[j] - ts[i] <= horizon_s``. A label 0 is only known when the log covers the whole window
    ``(ts[i], ts[i] + horizon_s]``: a row whose window runs past ``end_ts`` (the end of the observed
    data) or across a gap of the log (more than ``gap_s`` seconds without any event of any user,
    :func:`window_covered`) is censored: ``observable[i] = False``, even when a purchase was seen in
    the part of the window the log covers (its label is then 1 but not counted; the module's
    docstring says why). Vectorized: the first later purchase decides the label since timestamps are
    non-decreasing within a user.

    Parameters
    ----------
    etypes, ts : ndarray, shape [n]
        Event type index and unix time of each row, grouped by user and sorted by time within a user.
    user_start : ndarray, shape [n_users + 1]
        CSR offsets: user u owns rows ``user_start[u]:user_start[u+1]``.
    horizon_s : float
    end_ts : float, optional
        End of the observed data; defaults to the last timestamp.
    gap_s : float or None
        Longest silence of the whole log (``ts``) that is not a gap; None disables gap censoring.

    Returns
    -------
    labels : ndarray of int8, shape [n]
    observable : ndarray of bool, shape [n]

    Examples
    --------
    >>> et = np.array([0, 0, 5, 0, 0, 5])          # user 0: rows 0-2, user 1: rows 3-5
    >>> t = np.array([0.0, 50.0, 90.0, 0.0, 200.0, 210.0])
    >>> y, ok = purchase_labels(et, t, np.array([0, 3, 6]), horizon_s=100.0, end_ts=250.0)
    >>> y.tolist(), ok.tolist()                    # row 4 bought at 210, but its window ends at 300
    ([1, 1, 0, 0, 1, 0], [True, True, True, True, False, False])
    >>> y, ok = purchase_labels(et, t, np.array([0, 3, 6]), horizon_s=100.0, end_ts=250.0, gap_s=60.0)
    >>> ok.tolist()                # no event between 90 and 200: a gap every window reaches, or the end
    [False, False, False, False, False, False]
    """
    etypes = np.asarray(etypes)
    ts = np.asarray(ts, dtype=np.float64)
    n = ts.shape[0]
    if end_ts is None:
        end_ts = float(ts.max()) if n else 0.0
    nxt = _next_flag_after(etypes == PURCHASE)
    user_end = _user_end(user_start)
    in_user = nxt < user_end
    safe = np.minimum(nxt, max(n - 1, 0))
    labels = in_user & (ts[safe] - ts <= horizon_s)
    observable = (ts + horizon_s <= end_ts) & window_covered(ts, horizon_s, gap_s)
    return labels.astype(np.int8), observable


def masked_purchase_labels(
    etypes: np.ndarray,
    ts: np.ndarray,
    user_start: np.ndarray,
    mask: np.ndarray,
    horizon_s: float,
    *,
    gap_s: float | None = DEFAULT_GAP_S,
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`purchase_labels` that looks only at rows inside ``mask`` (no leakage from the rest).

    Only purchases in masked rows count. A masked row is observable only when its whole window lies
    inside the mask (it ends by the last masked timestamp, and no unmasked row of the same user falls
    inside it) and crosses no gap of the log (gaps are found on all of ``ts``, see
    :func:`window_covered`), whatever its label (the module's docstring says why). Unmasked rows are
    never observable.

    >>> et = np.array([0, 0, 5, 0])
    >>> t = np.array([0.0, 10.0, 20.0, 1000.0])
    >>> m = np.array([True, True, False, True])    # the purchase at row 2 is outside the mask
    >>> y, ok = masked_purchase_labels(et, t, np.array([0, 4]), m, horizon_s=100.0)
    >>> y.tolist(), ok.tolist()
    ([0, 0, 0, 0], [False, False, False, False])
    """
    mask = np.asarray(mask, dtype=bool)
    etypes = np.asarray(etypes)
    ts = np.asarray(ts, dtype=np.float64)
    n = ts.shape[0]
    if not mask.any():
        return np.zeros(n, np.int8), np.zeros(n, bool)
    end_ts = float(ts[mask].max())
    user_end = _user_end(user_start)
    last = max(n - 1, 0)

    nxt_buy = _next_flag_after(mask & (etypes == PURCHASE))
    labels = (nxt_buy < user_end) & (ts[np.minimum(nxt_buy, last)] - ts <= horizon_s) & mask
    nxt_out = _next_flag_after(~mask)
    gap_in_window = (nxt_out < user_end) & (ts[np.minimum(nxt_out, last)] - ts <= horizon_s)
    covered = (ts + horizon_s <= end_ts) & ~gap_in_window & window_covered(ts, horizon_s, gap_s)
    observable = mask & covered
    return labels.astype(np.int8), observable
