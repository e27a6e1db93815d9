"""Cleaning of a loaded :class:`~demandstream.model.data.eventlog.EventLog`: duplicates, bots, per-user time order.

Public clickstream dumps carry artefacts that distort both training and evaluation: the same row
logged twice (REES46 has thousands), crawlers and load tests that emit hundreds of events a minute,
and users whose rows are not in time order in the file. :func:`clean_log` removes the first two,
counts what it did into a :class:`~demandstream.model.data.loadstats.LoadStats`, and returns the log grouped by user in
time order. Every step is vectorized over whole columns; there is no per-row Python loop.

>>> from demandstream.model.core.events import Event
>>> log = EventLog.from_events([
...     Event("e1", "u1", 20.0, "view", "i1", "a"),
...     Event("e2", "u1", 10.0, "view", "i2", "a"),
...     Event("e3", "u1", 10.0, "view", "i2", "a"),   # exact duplicate of e2 (ids are not compared)
... ])
>>> out = clean_log(log, CleaningConfig())
>>> [e.event_id for e in out.user_events(0)]
['e2', 'e1']
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from demandstream.model.core.events import TYPE_INDEX
from demandstream.model.data.eventlog import EventLog, csr_offsets

if TYPE_CHECKING:
    from demandstream.model.data.loadstats import LoadStats

logger = logging.getLogger(__name__)

#: Width of the burst window. A minute is long enough that a human's fastest stretch of clicking
#: (a few events a second for a few seconds) averages out, and short enough to catch scripted bursts.
BURST_WINDOW_S = 60.0

#: More than this many actions inside one :data:`BURST_WINDOW_S` marks a user as a bot. An action is
#: one row, except that shops log a checkout or a cart change as one row per item with the same
#: timestamp (one cosmetics user bought 148 items in one second): such a run of same-time,
#: same-type basket rows counts once (see :data:`BASKET_TYPES`). In the REES46 samples the busiest
#: real minute has 53 actions (a cart emptied item by item); a person paging through a category
#: manages about one event a second, so 120 (two a second for a whole minute) leaves room for both.
BURST_MAX_EVENTS = 120

#: A sustained rate is judged only over at least this many consecutive events of one user, so short
#: busy sessions never trip it; crawlers produce thousands.
SUSTAINED_MIN_EVENTS = 500

#: Highest plausible average rate (events per second) over :data:`SUSTAINED_MIN_EVENTS` consecutive
#: events: 500 events in under 1000 s means one event every 2 s for more than a quarter of an hour
#: without a pause, which is machine behaviour; a heavy human shopper reads pages and pauses.
SUSTAINED_MAX_RATE = 0.5

#: Event types that shops log once per item for one click (add several, empty the cart, check out).
BASKET_TYPES: tuple[str, ...] = ("add_to_cart", "remove_from_cart", "purchase")


@dataclass(frozen=True, slots=True)
class CleaningConfig:
    """What :func:`clean_log` does; the defaults are the module constants, each justified there.

    Parameters
    ----------
    drop_duplicates
        Drop rows equal to an earlier row in user, ts, type, item, category, price and query
        (event and session ids are not compared: REES46 duplicates differ only in position).
    burst_window_s, burst_max_events
        Drop users with more than ``burst_max_events`` actions within any ``burst_window_s``
        seconds (an action is a row, but same-time basket rows of one type count once).
        ``burst_max_events=None`` disables the rule.
    sustained_min_events, sustained_max_rate
        Drop users whose ``sustained_min_events`` consecutive actions span less than
        ``sustained_min_events / sustained_max_rate`` seconds. ``sustained_max_rate=None``
        disables the rule.
    """

    drop_duplicates: bool = True
    burst_window_s: float = BURST_WINDOW_S
    burst_max_events: int | None = BURST_MAX_EVENTS
    sustained_min_events: int = SUSTAINED_MIN_EVENTS
    sustained_max_rate: float | None = SUSTAINED_MAX_RATE


def clean_log(log: EventLog, cfg: CleaningConfig, stats: LoadStats | None = None) -> EventLog:
    """Drop duplicates and bot users, count gaps, and return the log sorted by user and time.

    Parameters
    ----------
    log
        A log in file order (as :class:`~demandstream.model.data.eventlog.EventLogBuilder` produces it).
    cfg
        Which steps to run, with their bounds.
    stats
        When given, its ``duplicates_dropped``, ``users_dropped_rate``, ``events_dropped_rate``,
        ``missing_category`` (events of the returned log with no category) and
        ``out_of_order_fixed`` (kept users whose rows were not in time order in the file) are
        increased, and ``rows_kept`` is set to the length of the result.

    Returns
    -------
    EventLog
        The cleaned log after :meth:`~demandstream.model.data.eventlog.EventLog.sorted_by_user_time` (string tables
        are shared with ``log``, so dropped users keep their index and have no rows).

    Examples
    --------
    A user with 200 events in 50 seconds is dropped as a bot; the other is kept.

    >>> import numpy as np
    >>> from demandstream.model.core.events import Event
    >>> bot = [Event(f"b{i}", "bot", 1e9 + i / 4, "view", "i1") for i in range(200)]
    >>> log = EventLog.from_events(bot + [Event("h1", "human", 1e9, "view", "i1")])
    >>> out = clean_log(log, CleaningConfig())
    >>> [log.users[u] for u in np.unique(out.user)]
    ['human']
    """
    keep = np.ones(len(log), dtype=bool)
    if cfg.drop_duplicates:
        dup = _duplicate_rows(log)
        keep &= ~dup
        n_dup = int(dup.sum())
    else:
        n_dup = 0

    # Per-user time order of the surviving rows; rows with equal times stay in file order.
    rows = np.flatnonzero(keep)
    order = rows[np.lexsort((rows, log.ts[rows], log.user[rows]))]
    user_s, ts_s = log.user[order], log.ts[order]

    bots = np.zeros(log.n_users, dtype=bool)
    if cfg.burst_max_events is not None or cfg.sustained_max_rate is not None:
        act = _action_rows(user_s, ts_s, log.etype[order])
        user_a, ts_a = user_s[act], ts_s[act]
        if cfg.burst_max_events is not None:
            k = cfg.burst_max_events + 1
            bots |= _users_with_dense_run(user_a, ts_a, k, cfg.burst_window_s, log.n_users)
        if cfg.sustained_max_rate is not None:
            span = cfg.sustained_min_events / cfg.sustained_max_rate
            bots |= _users_with_dense_run(user_a, ts_a, cfg.sustained_min_events, span, log.n_users)
    bot_rows = bots[user_s]
    kept_order = order[~bot_rows]

    out_of_order = _users_out_of_file_order(log.user[kept_order], kept_order, log.n_users)
    out = log.take(kept_order)
    out.user_start = csr_offsets(out.user, log.n_users)

    if stats is not None:
        stats.duplicates_dropped += n_dup
        stats.users_dropped_rate += int(bots.sum())
        stats.events_dropped_rate += int(bot_rows.sum())
        stats.missing_category += int((out.category < 0).sum())
        stats.out_of_order_fixed += out_of_order
        stats.rows_kept = len(out)
    if bots.any():
        logger.info("dropped %d users (%d events) for implausible event rates", bots.sum(), bot_rows.sum())
    return out


def _duplicate_rows(log: EventLog) -> np.ndarray:
    """Mask of rows equal to an earlier row in every compared column (the first one is kept)."""
    n = len(log)
    if n == 0:
        return np.zeros(0, dtype=bool)
    # Compare prices by bit pattern so that NaN ("no price") equals NaN.
    price_bits = np.ascontiguousarray(log.price, dtype=np.float32).view(np.int32)
    cols = (log.query, price_bits, log.category, log.item, log.etype, log.ts, log.user)
    row = np.arange(n)
    order = np.lexsort((row, *cols))  # last key is primary; row index keeps the first occurrence first
    same = np.ones(n - 1, dtype=bool)
    for c in cols:
        cs = c[order]
        same &= cs[1:] == cs[:-1]
    dup = np.zeros(n, dtype=bool)
    dup[order[1:][same]] = True
    return dup


def _action_rows(user_s: np.ndarray, ts_s: np.ndarray, etype_s: np.ndarray) -> np.ndarray:
    """Mask of rows that start a user action (rows sorted by user, time).

    A basket row with the same user, time and type as the row before it is the same click
    logged for another item, so it does not start an action.
    """
    basket = np.isin(etype_s, [TYPE_INDEX[t] for t in BASKET_TYPES])
    starts = np.ones(len(ts_s), dtype=bool)
    starts[1:] = ~(
        basket[1:] & (user_s[1:] == user_s[:-1]) & (ts_s[1:] == ts_s[:-1]) & (etype_s[1:] == etype_s[:-1])
    )
    return starts


def _users_with_dense_run(
    user_s: np.ndarray, ts_s: np.ndarray, k: int, span_s: float, n_users: int
) -> np.ndarray:
    """Users having ``k`` consecutive events (rows sorted by user, time) within less than ``span_s``.

    Event ``i`` and event ``i + k - 1`` of the same user bound a run of ``k`` events; checking
    every such pair with shifted arrays covers every window without a loop.
    """
    bots = np.zeros(n_users, dtype=bool)
    gap = k - 1
    if k < 2 or len(ts_s) <= gap:
        return bots
    same_user = user_s[gap:] == user_s[:-gap]
    dense = same_user & (ts_s[gap:] - ts_s[:-gap] < span_s)
    bots[user_s[gap:][dense]] = True
    return bots


def _users_out_of_file_order(user_s: np.ndarray, rows_s: np.ndarray, n_users: int) -> int:
    """Number of users whose rows, once in time order (``rows_s``), are not in file order."""
    if len(rows_s) < 2:
        return 0
    moved = (user_s[1:] == user_s[:-1]) & (rows_s[1:] < rows_s[:-1])
    return int(np.unique(user_s[1:][moved]).size)
