"""The user's own Markov transitions, left out of their training rows' features (docs/MODEL.md §2).

The Markov table is counted on the training rows, so a training row's Markov features would otherwise
include the very transition it is asked to predict (and the rest of its user's). ``markov_leave_out``
``"user"`` subtracts each user's own transitions from every row the history mixture reads:
:class:`PairCounts` keeps each user's counts aligned with the table's stored successors, so one search
answers a row's slots.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from demandstream.model.data.eventlog import EventLog


def markov_pairs(
    log: EventLog, cats: np.ndarray, rows: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(current, next) vocabulary-index pairs of consecutive ``rows`` of one user, the row index of each
    pair, and every row's current category (0 = none yet). The current category of an event without
    one is the user's last known category, as the network's history slots have it."""
    n = len(cats)
    user_first = np.repeat(log.user_start[:-1], np.diff(log.user_start))
    known = rows & (cats > 0)
    last_known = np.maximum.accumulate(np.where(known, np.arange(n), -1))
    current = np.where(last_known >= user_first, cats[np.maximum(last_known, 0)], 0)
    nxt = np.r_[cats[1:], 0]
    same_user = np.r_[user_first[1:], -1] == user_first
    ok = same_user & rows & np.r_[rows[1:], False] & (current > 0) & (nxt > 0)
    return np.stack([current[ok], nxt[ok]], axis=1), np.flatnonzero(ok), current.astype(np.int64)


class PairCounts(NamedTuple):
    """Each user's transitions, keyed ``user * C + a``: how many leave ``a`` (``total``) and how many go
    to each stored successor of ``a`` (``to_next``, aligned with the Markov table's row ``a``).

    One lookup answers both questions for any array of keys; a key with no transition (``a = 0``
    included) answers zeros.

    >>> pc = PairCounts.of(np.array([0, 0, 1]), np.array([[1, 2], [1, 3], [1, 2]]), np.array([[0, 0], [2, 3]]), 2)
    >>> [x.tolist() for x in pc.lookup(np.array([0 * 2 + 1, 1 * 2 + 1, 1 * 2 + 0]))]
    [[[1.0, 1.0], [1.0, 0.0], [0.0, 0.0]], [2.0, 1.0, 0.0]]
    """

    keys: np.ndarray  #: int64, sorted and unique
    total: np.ndarray  #: float32 [keys]
    to_next: np.ndarray  #: float32 [keys, K]

    @classmethod
    def of(cls, pair_user: np.ndarray, pairs: np.ndarray, table_next: np.ndarray, c: int) -> PairCounts:
        key = pair_user.astype(np.int64) * c + pairs[:, 0]
        order = np.argsort(key, kind="stable")
        key, a, b = key[order], pairs[order, 0], pairs[order, 1]
        keys, first, total = np.unique(key, return_index=True, return_counts=True)
        # Markov rows hold distinct successors (0 pads them and is never a pair's successor)
        hits = (table_next[a] == b[:, None]).astype(np.float32)
        to_next = np.add.reduceat(hits, first, axis=0) if len(key) else hits
        return cls(keys, total.astype(np.float32), to_next)

    def lookup(self, key: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(to_next [..., K], total [...])`` of each key of ``key`` (any shape), float32."""
        if not len(self.keys):
            return np.zeros((*np.shape(key), self.to_next.shape[1]), np.float32), np.zeros(
                np.shape(key), np.float32
            )
        i = np.searchsorted(self.keys, key).clip(max=len(self.keys) - 1)
        hit = self.keys[i] == key
        return self.to_next[i] * hit[..., None], self.total[i] * hit


class OwnCounts(NamedTuple):
    """Per row, the Markov transitions its own training contributed (see :meth:`DemandLSTM.markov_row`),
    for the row's current category and for every category in its history
    (:meth:`DemandLSTM.markov_history`), looked up per batch.

    Why per batch, from per-user tables: stored per row, the current category's counts were 128 bytes
    per event of the log and their computation held about 1.2 KB per event of temporaries (a million-
    event log's preparation peaked 1.2 GB above its features); and looking the per-slot counts up as
    three binary searches per (row, slot, successor) cost 50 ms of every 1,024-event training step.
    """

    current: np.ndarray  #: int64 [n]: the row's current category
    table_next: np.ndarray  #: int64 [C, K]: the stored successors of each category
    #: the row's user [n] (``"user"`` and ``"past"`` modes)
    user: np.ndarray | None = None
    #: ``"user"`` mode: every transition of the row's user is left out, whenever it happened
    pair_counts: PairCounts | None = None
    #: ``"past"`` mode: the counts of (user, a) and (user, a, b) pairs at or after a row
    past: tuple[CountsFrom, CountsFrom] | None = None
    #: ``"row"`` mode: each row's own transition, (float32 [n, K] to each stored successor, float32 [n])
    by_row: tuple[np.ndarray, np.ndarray] | None = None

    def current_counts(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Own transitions of rows ``idx`` (any shape) to each stored successor of the row's current
        category (float32 [..., K]) and out of it in all (float32 [...])."""
        if self.by_row is not None:
            count, total = self.by_row
            return count[idx], total[idx]
        cur = self.current[idx]
        key = self.user[idx] * int(self.table_next.shape[0]) + cur
        if self.pair_counts is not None:
            return self.pair_counts.lookup(key)
        return self._past_counts(key, cur, idx)

    def attach(self, f: dict, idx: np.ndarray, device: torch.device, cells: np.ndarray | None = None) -> None:
        """Add the row's own counts to the features ``f`` of the log rows ``idx`` ([B, T] or [n]).

        With ``cells`` (a bool mask of ``idx``'s shape), the per-slot counts are computed only there and
        are zero elsewhere: only the heads read them, and a pass that runs the heads at a sample of
        points (the cascade-scale fit) would otherwise look up every slot of every cell of the log
        (about 2 minutes of a million-event log's preparation)."""
        count, total = self.current_counts(idx)
        f["markov_own_count"] = torch.from_numpy(count).to(device)
        f["markov_own_total"] = torch.from_numpy(total).to(device)
        hv = f["hist_vocab"].cpu().numpy()  # [..., slots]
        if cells is None:
            slot_total, slot_count = self._slot_counts(hv, idx)
        else:
            k = int(self.table_next.shape[1])
            slot_total = np.zeros(hv.shape, np.float32)
            slot_count = np.zeros((*hv.shape, k), np.float32)
            slot_total[cells], slot_count[cells] = self._slot_counts(hv[cells], idx[cells])
        f["markov_own_slot_count"] = torch.from_numpy(slot_count).to(device)
        f["markov_own_slot_total"] = torch.from_numpy(slot_total).to(device)

    def _past_counts(self, key: np.ndarray, a: np.ndarray, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``"past"`` mode: transitions of keys ``user * C + a`` at or after rows ``idx`` (same shape)."""
        ua, uab = self.past
        c = int(self.table_next.shape[0])
        total = ua.at_or_after(key, idx)
        count = uab.at_or_after(key[..., None] * c + self.table_next[a], idx[..., None])
        known = a > 0
        return count * known[..., None], total * known

    def _slot_counts(self, hv: np.ndarray, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Own transitions out of each history slot's category ([..., slots]) and to each of its stored
        successors ([..., slots, K]), for rows ``idx`` whose slots hold the vocabulary indices ``hv``."""
        if self.by_row is not None:
            count, total = self.by_row
            is_current = (hv == self.current[idx][..., None]) & (hv > 0)
            slot_total = np.where(is_current, total[idx][..., None], 0.0).astype(np.float32)
            slot_count = np.where(is_current[..., None], count[idx][..., None, :], 0.0).astype(np.float32)
            return slot_total, slot_count
        key = self.user[idx][..., None] * int(self.table_next.shape[0]) + hv
        if self.pair_counts is not None:
            slot_count, slot_total = self.pair_counts.lookup(key)
        else:
            slot_count, slot_total = self._past_counts(key, hv, np.broadcast_to(idx[..., None], hv.shape))
        return slot_total, slot_count


class CountsFrom(NamedTuple):
    """How often each key occurs at or after a given row: ``keys`` sorted and unique, ``comp`` the
    sorted ``rank of the key * stride + row`` of every occurrence.

    >>> cf = CountsFrom.of(np.array([7, 3, 7, 7]), np.array([0, 1, 2, 5]), n_rows=6)
    >>> cf.at_or_after(np.array([7, 7, 7, 3, 4]), np.array([0, 2, 3, 0, 0])).tolist()
    [3.0, 2.0, 1.0, 1.0, 0.0]
    """

    keys: np.ndarray
    comp: np.ndarray
    stride: int

    @classmethod
    def of(cls, keys: np.ndarray, rows: np.ndarray, n_rows: int) -> CountsFrom:
        uniq, rank = np.unique(keys, return_inverse=True)
        stride = n_rows + 1
        return cls(uniq, np.sort(rank.astype(np.int64) * stride + rows), stride)

    def at_or_after(self, q: np.ndarray, row: np.ndarray | int = 0) -> np.ndarray:
        """Occurrences of each key of ``q`` at a row ``>= row`` (broadcast; 0 = all of them), float32."""
        if not len(self.keys):
            return np.zeros(np.shape(q), np.float32)
        i = np.searchsorted(self.keys, q).clip(max=len(self.keys) - 1)
        lo = np.searchsorted(self.comp, i * self.stride + row)
        hi = np.searchsorted(self.comp, (i + 1) * self.stride)
        return np.where(self.keys[i] == q, hi - lo, 0).astype(np.float32)


def own_markov_counts(
    log: EventLog,
    pairs: np.ndarray,
    pair_rows: np.ndarray,
    current: np.ndarray,
    table_next: np.ndarray,
    mode: str,
) -> OwnCounts | None:
    """What each training row must not see of the Markov table: its own transition (``mode="row"``),
    every transition of its own user (``"user"``: a user's later transitions are the future, and even
    the earlier ones make the training feature stronger than it is for a user the table never saw), or
    its user's transitions from this row on (``"past"``: the table then holds what it holds for a
    returning user at test time, the user's earlier transitions). ``"none"`` (ablation only) leaves
    the table as it is.

    >>> from demandstream.model.core.events import Event
    >>> log = EventLog.from_events([Event(f"e{i}", "u", float(i), "view", "i") for i in range(3)]).sorted_by_user_time()
    >>> pairs, rows = np.array([[1, 2], [2, 1]]), np.array([0, 1])
    >>> oc = own_markov_counts(log, pairs, rows, np.array([1, 2, 1]), np.array([[0, 0], [0, 2], [0, 1]]), "user")
    >>> [a.tolist() for a in oc.current_counts(np.arange(3))]
    [[[0.0, 1.0], [0.0, 1.0], [0.0, 1.0]], [1.0, 1.0, 1.0]]
    >>> oc = own_markov_counts(log, pairs, rows, np.array([1, 2, 1]), np.array([[0, 0], [0, 2], [0, 1]]), "past")
    >>> [a.tolist() for a in oc.current_counts(np.arange(3))]
    [[[0.0, 1.0], [0.0, 1.0], [0.0, 0.0]], [1.0, 1.0, 0.0]]
    """
    n, k = len(current), table_next.shape[1]
    if mode == "none":
        return None
    if mode == "row":
        count = np.zeros((n, k), np.float32)
        total = np.zeros(n, np.float32)
        total[pair_rows] = 1.0
        count[pair_rows] = table_next[pairs[:, 0]] == pairs[:, 1:2]
        return OwnCounts(current, table_next, by_row=(count, total))
    if mode not in ("user", "past"):
        raise ValueError(f"unknown markov_leave_out {mode!r}: expected user, past, row or none")
    c = int(table_next.shape[0])
    user = np.repeat(np.arange(log.n_users, dtype=np.int64), np.diff(log.user_start))
    pu = user[pair_rows]
    if mode == "user":
        return OwnCounts(current, table_next, user, pair_counts=PairCounts.of(pu, pairs, table_next, c))
    ua = CountsFrom.of(pu * c + pairs[:, 0], pair_rows, n)
    uab = CountsFrom.of((pu * c + pairs[:, 0]) * c + pairs[:, 1], pair_rows, n)
    return OwnCounts(current, table_next, user, past=(ua, uab))
