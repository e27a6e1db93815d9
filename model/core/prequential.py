"""Prequential ("test-then-train") quality: each prediction scored by what the user does next.

Every user state holds the last prediction made from it (docs/ARCHITECTURE.md §State: the top-k
categories and the purchase propensity), and the next event of the user says how good it was. The
same pure functions and the same :class:`PurchaseResolver` score a live worker's stream
(stream/worker/quality.py) and a log offline (:mod:`demandstream.model.evaluation.prequential`, the
``prequential`` key of ``demandstream evaluate``), so both give equal figures on equal events
(docs/ARCHITECTURE.md §Metrics, "Live model quality").

Next category: a prediction made after event t is scored at the user's next event t+1 if that event
has a category: its rank among the stored top-k (1..k; 0 = not in the top-k). The state keeps only
the top-k, so the figures are hit@1, hit@5 and MRR@k with k the stored top size (``DEMANDSTREAM_TOP_K``).

Purchase: a prediction with propensity p made at event time t is labelled **positive** when a purchase
of the same user follows it within ``horizon_s`` (``T - t <= horizon_s``, as
``demandstream.model.data.labels.purchase_labels``), else negative, and it is **counted only once the
event-time watermark** (the newest event time seen on the partition) **has passed** ``t + horizon_s``,
whatever its label: still open at the end, it is never counted (censored). A window that a gap (more
than ``gap_s`` seconds of event time without any event on the partition) starts in is censored too,
even when a purchase came before the gap. This is the offline rule of docs/MODEL.md §2 ("Honest
labels"): a point counts only when the stream covers its whole window. Counting a positive as soon as
its purchase arrives would hold the last ``horizon_s`` of every counter's history (and the stretch
before every gap) to positives only, and bias the live purchase rate upward.

>>> top_rank(["shoes", "bags"], "bags"), top_rank(["shoes", "bags"], "hats"), top_rank(["shoes"], None)
(2, 0, None)
>>> cat = CategoryTally()
>>> for r in (1, 2, 0, 6):
...     cat.add(r)
>>> cat.points, cat.hits, round(cat.rr_sum, 4)
(4, [1, 2], 1.6667)
>>> pur = PurchaseTally()
>>> res = PurchaseResolver(horizon_s=100.0, gap_s=3600.0, tally=pur)
>>> res.event("u1", 0.0, False, 0.8)     # u1 predicted at t=0 with p=0.8
>>> res.event("u2", 10.0, False, 0.1)
>>> res.event("u1", 50.0, True, 0.5)     # u1 buys at 50: the t=0 prediction was right ...
>>> pur.points, res.pending                # ... and is counted once its window is over
(0, 3)
>>> res.event("u3", 200.0, False, None)  # the watermark passes 100, 110, 150: u1 (t=0) positive, u2, u1 (t=50) negative
>>> pur.points, pur.positives, res.pending
(3, 1, 0)
"""

from __future__ import annotations

import heapq
import math
from collections import Counter, deque
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

from demandstream.model.core.features import category_hash

#: Cut-offs of the hit rates reported (hit@1, hit@5); a cut-off above the stored top size counts the
#: whole stored top (with ``DEMANDSTREAM_TOP_K`` 3, "hit@5" is hit@3).
HIT_KS = (1, 5)
#: Equal-width propensity buckets of the calibration figures: the same ten bins as the offline
#: expected calibration error (demandstream.model.evaluation.metrics.ECE_BINS).
CALIBRATION_BUCKETS = 10
#: Propensities are clipped to [EPS, 1 - EPS] in the log loss, as offline
#: (demandstream.model.evaluation.metrics.LOGLOSS_EPS): one confident miss costs ~16, not infinity.
LOGLOSS_EPS = 1e-7
#: Why a purchase prediction was never scored: no room among the open ones (``capacity``), its window
#: crossed a gap of the event stream (``gap``), its partition left the worker (``revoked``).
UNRESOLVED_REASONS = ("capacity", "gap", "revoked")


def top_rank(top: Sequence[str], category: str | None) -> int | None:
    """1-based rank of ``category`` among the names of a stored top-k; 0 when absent; None when the
    event has no category (not a point).

    A category whose name the scorer did not know when it named the prediction is written ``#`` and
    its hash in 8 hex digits (:meth:`demandstream.model.core.scoring.Scorer.category_name`); that name
    matches the category too.

    >>> top_rank(["a", f"#{category_hash('zz'):08x}"], "zz")
    2
    """
    if category is None:
        return None
    if category in top:  # the list's own C search: this runs once per event in the worker
        return top.index(category) + 1
    for i, name in enumerate(top):
        if name.startswith("#") and name == _hash_name(category):
            return i + 1
    return 0


def _hash_name(category: str) -> str:
    return f"#{category_hash(category):08x}"


def bucket_of(p: float) -> int:
    """Calibration bucket of a propensity: ``floor(p * 10)``, 1.0 in the last.

    >>> bucket_of(0.0), bucket_of(0.099), bucket_of(0.1), bucket_of(1.0)
    (0, 0, 1, 9)
    """
    return min(CALIBRATION_BUCKETS - 1, max(0, int(p * CALIBRATION_BUCKETS)))


def bucket_label(b: int) -> str:
    """The lower edge of bucket ``b`` as the metrics' ``bucket`` label: ``"0.0"`` … ``"0.9"``."""
    return f"{b / CALIBRATION_BUCKETS:.1f}"


def logloss(p: float, y: int) -> float:
    """Log loss of one prediction, clipped as offline.

    >>> round(logloss(0.8, 1), 4), round(logloss(0.8, 0), 4), round(logloss(1.0, 0), 2)
    (0.2231, 1.6094, 16.12)
    """
    q = min(1.0 - LOGLOSS_EPS, max(LOGLOSS_EPS, p))
    return -math.log(q) if y else -math.log(1.0 - q)


@dataclass(slots=True)
class CategoryTally:
    """Next-category points: count, hits at each cut-off of :data:`HIT_KS`, sum of reciprocal ranks."""

    points: int = 0
    hits: list[int] = field(default_factory=lambda: [0] * len(HIT_KS))
    rr_sum: float = 0.0

    def add(self, rank: int) -> None:
        """One point whose target ranked ``rank`` in the stored top (0: not in it)."""
        self.points += 1
        if rank > 0:
            self.rr_sum += 1.0 / rank
            for j, k in enumerate(HIT_KS):
                if rank <= k:
                    self.hits[j] += 1

    def take(self) -> CategoryTally:
        """A copy of the counts so far, which start again from zero (a batch's increments)."""
        out = CategoryTally(self.points, list(self.hits), self.rr_sum)
        self.points, self.hits, self.rr_sum = 0, [0] * len(HIT_KS), 0.0
        return out


@dataclass(slots=True)
class PurchaseTally:
    """Resolved purchase points: counts, positives, log-loss sum, and per calibration bucket the
    points, the sum of predicted propensities and the positives; unresolved ones by reason."""

    points: int = 0
    positives: int = 0
    logloss_sum: float = 0.0
    counts: list[int] = field(default_factory=lambda: [0] * CALIBRATION_BUCKETS)
    predicted: list[float] = field(default_factory=lambda: [0.0] * CALIBRATION_BUCKETS)
    observed: list[int] = field(default_factory=lambda: [0] * CALIBRATION_BUCKETS)
    unresolved: Counter = field(default_factory=Counter)

    def add(self, p: float, y: int) -> None:
        """One resolved prediction: propensity ``p``, outcome ``y`` (1 = purchase within the horizon)."""
        # bucket_of and logloss written out: this runs once per resolved prediction in the worker
        b = int(p * CALIBRATION_BUCKETS) if p < 1.0 else CALIBRATION_BUCKETS - 1
        q = LOGLOSS_EPS if p < LOGLOSS_EPS else (1.0 - LOGLOSS_EPS if p > 1.0 - LOGLOSS_EPS else p)
        self.points += 1
        self.positives += y
        self.logloss_sum -= math.log(q) if y else math.log(1.0 - q)
        self.counts[b] += 1
        self.predicted[b] += p
        self.observed[b] += y

    def take(self) -> PurchaseTally:
        """A copy of the counts so far, which start again from zero (a batch's increments)."""
        out = PurchaseTally(
            self.points,
            self.positives,
            self.logloss_sum,
            list(self.counts),
            list(self.predicted),
            list(self.observed),
            Counter(self.unresolved),
        )
        self.points, self.positives, self.logloss_sum = 0, 0, 0.0
        self.counts = [0] * CALIBRATION_BUCKETS
        self.predicted = [0.0] * CALIBRATION_BUCKETS
        self.observed = [0] * CALIBRATION_BUCKETS
        self.unresolved = Counter()
        return out


class PurchaseResolver:
    """The open purchase predictions of one event stream (a partition, or a whole log offline).

    :meth:`event` takes the stream's events in order, each with the propensity predicted after it, and
    adds every prediction it resolves to ``tally``. At most ``max_pending`` predictions are kept open:
    a new one beyond that is not tracked (counted ``capacity``), which, unlike dropping the oldest,
    does not depend on how the open ones turn out.
    """

    def __init__(self, horizon_s: float, gap_s: float, tally: PurchaseTally, max_pending: int = 1 << 62):
        self.horizon_s = horizon_s
        self.gap_s = gap_s
        self.tally = tally
        self.max_pending = max_pending
        self.watermark = -math.inf
        # (t + horizon, seq, user) of every tracked prediction, each closed when the watermark passes it: in a
        # queue while deadlines come in order (the usual case, and cheaper), else in a heap
        self._queue: deque[tuple[float, int, Hashable]] = deque()
        self._heap: list[tuple[float, int, Hashable]] = []
        self._open: dict[Hashable, list[list]] = {}  # user -> [[seq, t, p, label so far]] in order
        self._gaps: list[float] = []  # start times of recent gaps (a window starting at t <= a < t + h)
        self._seq = 0
        self.pending = 0

    def event(self, user: Hashable, ts: float, purchase: bool, p: float | None) -> None:
        """One event of ``user`` at ``ts``: a purchase marks the user's open predictions whose window
        it falls in, the watermark moves and closes every window it has passed, then the prediction
        made after the event (``p``; None: none) opens."""
        h = self.horizon_s
        if purchase:
            for entry in self._open.get(user, ()):
                if ts - entry[1] <= h:  # within the window; one past it is closed by the watermark
                    entry[3] = 1
        w = self.watermark
        if ts > w:
            if ts - w > self.gap_s and w > -math.inf:
                self._gaps.append(w)
            self.watermark = w = ts
            queue, heap = self._queue, self._heap
            while queue and queue[0][0] < w:
                self._expire(*queue.popleft())
            while heap and heap[0][0] < w:
                self._expire(*heapq.heappop(heap))
            if self._gaps and self._gaps[0] < w - h:
                self._gaps = [a for a in self._gaps if a >= w - h]
        if p is not None:
            if len(self._queue) + len(self._heap) >= self.max_pending:
                self.tally.unresolved["capacity"] += 1
                return
            self._seq += 1
            entry = (ts + h, self._seq, user)
            if not self._queue or self._queue[-1][0] <= entry[0]:
                self._queue.append(entry)
            else:
                heapq.heappush(self._heap, entry)
            lst = self._open.get(user)
            if lst is None:
                self._open[user] = [[self._seq, ts, p, 0]]
            else:
                lst.append([self._seq, ts, p, 0])
            self.pending += 1

    def _expire(self, _deadline: float, seq: int, user: Hashable) -> None:
        """The watermark passed this prediction's horizon: counted with its label, unless a gap
        started inside its window."""
        lst = self._open[user]
        # A user's deadlines come in time order, so the one expiring is nearly always the first.
        i = 0 if lst[0][0] == seq else next((j for j, entry in enumerate(lst) if entry[0] == seq), -1)
        if i < 0:
            raise AssertionError(f"open prediction {seq} of its user is missing")  # a bug, not an input
        _s, t, q, y = lst.pop(i)
        self.pending -= 1
        if not lst:
            del self._open[user]
        self._close(t, q, y)

    def _close(self, t: float, p: float, y: int) -> None:
        h = self.horizon_s
        for a in self._gaps:
            if t <= a < t + h:
                self.tally.unresolved["gap"] += 1
                return
        self.tally.add(p, y)

    def discard(self) -> int:
        """Forget every open prediction (the partition left this worker); returns how many."""
        n = self.pending
        self._queue.clear()
        self._heap.clear()
        self._open.clear()
        self.pending = 0
        return n


def figures(cat: CategoryTally, pur: PurchaseTally, top_k: int) -> dict:
    """The report of a prequential run: raw counts and sums (what the live counters hold) and the
    ratios derived from them (NaN without points).

    >>> c = CategoryTally(); c.add(1); c.add(0)
    >>> f = figures(c, PurchaseTally(), top_k=5)
    >>> f["category_points"], f["hit@1"], f["mrr"], f["purchase_points"]
    (2, 0.5, 0.5, 0)
    """
    nan = float("nan")
    n, m = cat.points, pur.points
    out: dict = {"top_k": top_k, "category_points": n}
    for k, hits in zip(HIT_KS, cat.hits, strict=True):
        out[f"hits@{k}"] = hits
    out["reciprocal_rank_sum"] = cat.rr_sum
    for k, hits in zip(HIT_KS, cat.hits, strict=True):
        out[f"hit@{k}"] = hits / n if n else nan
    out["mrr"] = cat.rr_sum / n if n else nan  # MRR@top_k: the rank within the stored top
    out.update(
        purchase_points=m,
        purchase_positives=pur.positives,
        purchase_logloss_sum=pur.logloss_sum,
        purchase_logloss=pur.logloss_sum / m if m else nan,
        purchase_rate=pur.positives / m if m else nan,
        calibration=[
            {"bucket": bucket_label(b), "points": c, "predicted": s, "positives": o}
            for b, (c, s, o) in enumerate(zip(pur.counts, pur.predicted, pur.observed, strict=True))
        ],
        unresolved={r: int(pur.unresolved.get(r, 0)) for r in UNRESOLVED_REASONS},
    )
    return out
