"""The compiled per-batch encoder: every event of a micro-batch (or a chunk of a log) advances its
user's history summary and writes its feature row, in one machine-code loop.

This is :func:`~demandstream.model.core.state.observe` followed by
:func:`~demandstream.model.core.encoding.event_features` and
:meth:`~demandstream.model.core.encoding.FeatureBuffer.put_rows`, compiled by numba. Those Python
functions stay the executable specification: tests/unit/model/core/test_encoding_kernel.py checks on a
hypothesis-generated corpus that both write the same rows and leave the same states. In Python they
cost ~12 µs an event and led the worker's profile (docs/BENCHMARKS.md, issue #14 item 3); here about
0.5 µs, the vocabulary lookup of the slots included.

Nothing is read from another module's globals inside the kernel: numba freezes globals into the
compiled code and its on-disk cache is keyed on this file only, so a limit changed elsewhere would
silently keep its old value. Every constant arrives as an argument (the limits in the order of
:data:`LIMIT_NAMES`, built by model/core/encoding.py).
"""

from __future__ import annotations

import logging
import math

import numpy as np
from numba import njit

logger = logging.getLogger(__name__)

#: Rows of the ``hist`` array [users, len(SLOT_ROWS), slots]: the history-slot fields in the order of
#: :data:`demandstream.model.core.state.SLOT_FIELDS` (a unit test ties the two).
SLOT_ROWS = ("hist_cats", "hist_counts", "hist_last", "hist_ts", "hist_cart", "hist_etype", "hist_session")
#: Columns of the ``ints`` array [users, 5]: the integer counters of the summary.
INT_FIELDS = ("events_seen", "cart", "purchases", "session_adds", "streak")
#: Columns of the ``floats`` array [users, 2]: the summary's event times (NaN = never).
FLOAT_FIELDS = ("last_ts", "last_add_ts")
#: Order of the integer limits in :func:`advance`'s ``limits`` array.
LIMIT_NAMES = ("count_max", "slot_cart_max", "ts_max", "age_max", "add", "remove", "purchase")


def _compiled(fn):
    """``fn`` compiled on first call, its machine code cached on disk beside this file (or in the
    user's cache) so that later processes load it in ~0.2 s instead of compiling for ~1 s."""
    try:
        return njit(cache=True, nogil=True)(fn)
    except RuntimeError as exc:  # numba found no writable cache location (read-only install and home)
        logger.warning(
            "%s; compiling the encoder in this process instead (about 1 s). "
            "Set NUMBA_CACHE_DIR to a writable directory to keep it between starts.",
            exc,
        )
        return njit(nogil=True)(fn)


_CATS, _COUNTS, _LAST, _TS, _CART, _ETYPE, _SESSION = range(7)
_SEEN, _ICART, _PURCHASES, _SADDS, _STREAK = range(5)
_LAST_TS, _LAST_ADD = range(2)
_COUNT_MAX, _SLOT_CART_MAX, _TS_MAX, _AGE_MAX, _ADD, _REMOVE, _PURCHASE = range(7)


@_compiled
def advance(
    user,
    cat_hash,
    etype,
    ts,
    hist,
    ints,
    floats,
    limits,
    session_gap,
    never_s,
    gap_edges,
    out_gap,
    out_hist_cats,
    out_hist_counts,
    out_hist_ages,
    out_hist_secs,
    out_hist_cart,
    out_hist_etype,
    out_hist_session,
    out_cart,
    out_purchases,
    out_events_seen,
    out_session_adds,
    out_add_secs,
    out_streak,
):
    """Apply events ``0..n-1`` in order to the states of users ``user[i]`` and write row ``i``.

    ``hist``/``ints``/``floats`` are the users' summaries (layouts above), updated in place; ``out_*``
    are the FeatureBuffer columns of the same names, rows 0..n-1 (``out_gap`` holds the gap bucket).
    Python's ``max(a, b)`` (``b if b > a else a``) is spelled out wherever observe() uses it, so NaN and
    ties resolve exactly as there.
    """
    count_max, slot_cart_max, ts_max, age_max = (
        limits[_COUNT_MAX],
        limits[_SLOT_CART_MAX],
        limits[_TS_MAX],
        limits[_AGE_MAX],
    )
    add, remove, purchase = limits[_ADD], limits[_REMOVE], limits[_PURCHASE]
    k_slots = hist.shape[2]
    for i in range(user.shape[0]):
        b = user[i]
        ch = cat_hash[i]
        et = etype[i]
        t = ts[i]
        seen = ints[b, _SEEN]
        first = seen == 0
        gap = 0.0
        if first:
            out_gap[i] = 0
        else:
            d = t - floats[b, _LAST_TS]
            gap = d if d > 0.0 else 0.0
            out_gap[i] = 1 + np.searchsorted(gap_edges, gap)
        seen += 1
        ints[b, _SEEN] = seen
        if first or not floats[b, _LAST_TS] > t:
            floats[b, _LAST_TS] = t
        if first or gap > session_gap:
            ints[b, _SADDS] = 0
            for k in range(k_slots):
                hist[b, _SESSION, k] = 0
        j = -1
        if ch > 0:
            for k in range(k_slots):
                if hist[b, _CATS, k] == ch:
                    j = k
                    break
            if j >= 0:
                hist[b, _COUNTS, j] = min(count_max, hist[b, _COUNTS, j] + 1)
                if hist[b, _LAST, j] == seen - 1:
                    ints[b, _STREAK] = min(count_max, ints[b, _STREAK] + 1)
                else:
                    ints[b, _STREAK] = 1
            else:
                # evict the least recently seen slot, the first of equals (empty slots are 0)
                j = 0
                for k in range(1, k_slots):
                    if hist[b, _LAST, k] < hist[b, _LAST, j]:
                        j = k
                hist[b, _CATS, j] = ch
                hist[b, _COUNTS, j] = 1
                hist[b, _CART, j] = 0
                hist[b, _SESSION, j] = 0
                ints[b, _STREAK] = 1
            hist[b, _SESSION, j] = min(count_max, hist[b, _SESSION, j] + 1)
            hist[b, _LAST, j] = seen
            second = math.floor(floats[b, _LAST_TS])
            hist[b, _TS, j] = 0 if second < 0 else (ts_max if second > ts_max else second)
            hist[b, _ETYPE, j] = et
        if et == add:
            ints[b, _ICART] = min(count_max, ints[b, _ICART] + 1)
            ints[b, _SADDS] = min(count_max, ints[b, _SADDS] + 1)
            floats[b, _LAST_ADD] = t
            if j >= 0:
                hist[b, _CART, j] = min(slot_cart_max, hist[b, _CART, j] + 1)
        elif et == remove or et == purchase:
            ints[b, _ICART] = max(0, ints[b, _ICART] - 1)
            if j >= 0:
                hist[b, _CART, j] = max(0, hist[b, _CART, j] - 1)
            if et == purchase:
                ints[b, _PURCHASES] = min(count_max, ints[b, _PURCHASES] + 1)
        now = floats[b, _LAST_TS]
        for k in range(k_slots):
            slot_cat = hist[b, _CATS, k]
            out_hist_cats[i, k] = slot_cat
            out_hist_counts[i, k] = hist[b, _COUNTS, k]
            out_hist_ages[i, k] = min(seen - hist[b, _LAST, k], age_max)
            if slot_cat >= 0:
                d = now - hist[b, _TS, k]
                out_hist_secs[i, k] = d if d > 0.0 or d != d else 0.0  # np.maximum keeps NaN
            else:
                out_hist_secs[i, k] = never_s
            out_hist_cart[i, k] = hist[b, _CART, k]
            out_hist_etype[i, k] = hist[b, _ETYPE, k]
            out_hist_session[i, k] = hist[b, _SESSION, k]
        out_cart[i] = ints[b, _ICART]
        out_purchases[i] = ints[b, _PURCHASES]
        out_events_seen[i] = seen
        out_session_adds[i] = ints[b, _SADDS]
        last_add = floats[b, _LAST_ADD]
        if math.isnan(last_add):
            out_add_secs[i] = never_s
        else:
            d = now - last_add
            out_add_secs[i] = d if d > 0.0 else 0.0
        out_streak[i] = ints[b, _STREAK]
