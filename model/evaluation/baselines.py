"""Streaming baselines (docs/ARCHITECTURE.md §Evaluation), scored on exactly the same test points as the model.

Every baseline has the interface of :class:`Baseline`: ``fit`` once on the training rows of an
:class:`~demandstream.model.data.eventlog.EventLog` (as plain arrays), then for each user ``start_user`` and, event by
event, ``observe`` followed by ``category_scores`` (ranking of the next event's category) and
``purchase_proba`` (P(purchase within the horizon)). A baseline that cannot score a task returns None.

Category scores are for ranking only (higher is better; index 0, the unknown category, is ``-inf``).
Every baseline breaks ties deliberately, by global popularity and then by vocabulary index, so that its
ranking is a strict order: with :func:`demandstream.model.evaluation.metrics.target_rank` counting ties against the target,
an unbroken tie would penalise a baseline for indecision rather than for being wrong.

>>> import numpy as np
>>> cats = np.array([1, 2, 1, 2, 3], dtype=np.int32)
>>> etypes = np.zeros(5, dtype=np.int8)
>>> ts = np.arange(5, dtype=np.float64)
>>> b = LastCategory()
>>> b.fit(cats, etypes, ts, np.array([0, 5]), np.ones(5, bool), 1800.0, 4)
>>> b.start_user(); b.observe(3, 0, 10.0)
>>> np.argsort(-b.category_scores())[:3].tolist()  # last category, then by popularity
[3, 1, 2]
"""

from __future__ import annotations

import logging

import numpy as np

from demandstream.model.core.events import TYPE_INDEX
from demandstream.model.core.network import MIX_DECAY_INIT
from demandstream.model.data.eventlog import csr_offsets
from demandstream.model.data.labels import (  # noqa: F401  (re-exported: evaluation reads labels here)
    DEFAULT_GAP_S,
    PURCHASE,
    log_gaps,
    masked_purchase_labels,
    purchase_labels,
    window_covered,
)
from demandstream.model.data.split import next_category_targets
from demandstream.model.evaluation.metrics import RANK_CUTOFF, target_rank

logger = logging.getLogger(__name__)

N_EVENT_TYPES = len(TYPE_INDEX)

#: Pseudo-events with which a user's own purchase rate is shrunk toward the global rate: a user
#: with 10 resolved events weighs their own history and the population equally.
USER_RATE_PRIOR_STRENGTH = 10.0

#: Additive (Dirichlet) smoothing of the Markov transitions: pseudo-counts spread over the next
#: categories in proportion to popularity, so a rarely seen current category backs off to popularity.
MARKOV_ALPHA = 1.0


#: Ties among equal popularity counts are broken by vocabulary index with an offset below this value;
#: it must stay below 1 (one count) so that the tie-break never overrides a real count difference.
INDEX_TIEBREAK = 0.5


# -- shared pieces ------------------------------------------------------------------------------


def popularity_scores(cats: np.ndarray, n_categories: int) -> np.ndarray:
    """Strictly ordered popularity scores in [0, 1): count first, lower vocabulary index on ties.

    Index 0 (unknown) is ``-inf``.

    >>> s = popularity_scores(np.array([2, 2, 1, 3, 0]), 5)  # counts [-, 1, 2, 1, 0]
    >>> s.round(3).tolist()
    [-inf, 0.467, 0.767, 0.4, 0.033]
    >>> np.argsort(-s).tolist()  # 1 and 3 tie on count: the lower index goes first
    [2, 1, 3, 4, 0]
    """
    cats = np.asarray(cats, dtype=np.int64)
    counts = np.bincount(cats[cats > 0], minlength=n_categories)[:n_categories].astype(np.float64)
    tiebreak = INDEX_TIEBREAK * (n_categories - np.arange(n_categories)) / n_categories
    scores = (counts + tiebreak) / (counts.max() + 1.0)
    scores[0] = -np.inf
    return scores


class Baseline:
    """A streaming predictor fitted on training rows and stepped one event at a time.

    Subclasses override what they can score; the defaults score nothing (None).

    Attributes
    ----------
    name : str
        Key of the method in the evaluation report (docs/ARCHITECTURE.md §Evaluation).
    """

    name: str = "baseline"
    #: True for a baseline that chooses a setting of its own on the validation window: its ``fit``
    #: then takes ``valid_start`` (T1), and :meth:`settings` says what it chose.
    chooses_on_validation: bool = False

    def settings(self) -> dict | None:
        """What this baseline chose on validation (for the report), or None when it chooses nothing."""
        return None

    def fit(
        self,
        cats: np.ndarray,
        etypes: np.ndarray,
        ts: np.ndarray,
        user_start: np.ndarray,
        fit_mask: np.ndarray,
        horizon_s: float,
        n_categories: int,
        *,
        gap_s: float | None = DEFAULT_GAP_S,
    ) -> None:
        """Learn from the rows in ``fit_mask`` of a log sorted by user and time.

        Parameters
        ----------
        cats : ndarray of int32, shape [n]
            Category vocabulary index, 0 = unknown.
        etypes : ndarray of int8, shape [n]
        ts : ndarray of float64, shape [n]
        user_start : ndarray, shape [n_users + 1]
            CSR offsets of each user's rows.
        fit_mask : ndarray of bool, shape [n]
            Rows allowed for fitting; purchase labels are censored at the mask's edge.
        horizon_s : float
            Purchase horizon in seconds of event time.
        n_categories : int
            Vocabulary size C.
        gap_s : float or None
            Gap threshold of the purchase labels (:func:`purchase_labels`); None: no gap censoring.
        """
        self.n_categories = n_categories
        self.horizon_s = float(horizon_s)
        self.gap_s = gap_s

    def start_user(self) -> None:
        """A new user's sequence begins: forget the previous user's state."""

    def observe(self, cat: int, etype: int, ts: float) -> None:
        """The current user's next event."""

    def category_scores(self) -> np.ndarray | None:
        """Scores [C] for the next event's category, or None when this baseline does not rank."""
        return None

    def purchase_proba(self) -> float | None:
        """P(purchase within the horizon after the last observed event), or None."""
        return None


class Popularity(Baseline):
    """Global category frequency on the fit rows, the same for every user and step."""

    name = "popularity"

    def fit(self, cats, etypes, ts, user_start, fit_mask, horizon_s, n_categories, *, gap_s=DEFAULT_GAP_S):
        super().fit(cats, etypes, ts, user_start, fit_mask, horizon_s, n_categories, gap_s=gap_s)
        self.pop = popularity_scores(np.asarray(cats)[np.asarray(fit_mask, bool)], n_categories)

    def category_scores(self) -> np.ndarray:
        return self.pop.copy()


class LastCategory(Popularity):
    """The user's last known category first, the rest by popularity."""

    name = "last_category"
    last = 0

    def start_user(self) -> None:
        self.last = 0

    def observe(self, cat: int, etype: int, ts: float) -> None:
        if cat > 0:
            self.last = cat

    def category_scores(self) -> np.ndarray:
        scores = self.pop.copy()
        if self.last > 0:
            # Popularity scores are < 1, so 1 puts the last category strictly first.
            scores[self.last] = 1.0
        return scores


class UserHistory(Popularity):
    """The user's own category counts so far (recency breaks ties), backed off to popularity.

    Purchase propensity is the user's past purchase rate: the fraction of the user's earlier events
    whose horizon has closed (or been hit) that were followed by a purchase within the horizon. It
    is the same quantity as the label, so it can be shrunk toward the global rate of that label on
    the fit rows with :data:`USER_RATE_PRIOR_STRENGTH` pseudo-events.

    Examples
    --------
    >>> b = UserHistory()
    >>> cats = np.array([1, 1, 2], dtype=np.int32)
    >>> b.fit(cats, np.zeros(3, np.int8), np.arange(3.0), np.array([0, 3]), np.ones(3, bool), 10.0, 4)
    >>> b.start_user()
    >>> for c in (3, 2, 3, 2, 1):
    ...     b.observe(c, 0, 0.0)
    >>> np.argsort(-b.category_scores())[:3].tolist()  # 2 and 3 seen twice, 2 more recently
    [2, 3, 1]
    """

    name = "user_history"

    def fit(self, cats, etypes, ts, user_start, fit_mask, horizon_s, n_categories, *, gap_s=DEFAULT_GAP_S):
        super().fit(cats, etypes, ts, user_start, fit_mask, horizon_s, n_categories, gap_s=gap_s)
        labels, observable = masked_purchase_labels(etypes, ts, user_start, fit_mask, horizon_s, gap_s=gap_s)
        n_obs = int(observable.sum())
        self.global_rate = float(labels[observable].mean()) if n_obs else 0.0
        self.counts = np.zeros(n_categories, dtype=np.float64)
        self.last_step = np.zeros(n_categories, dtype=np.float64)
        self._touched: list[int] = []
        logger.debug("user_history: global purchase rate %.4f on %d labels", self.global_rate, n_obs)
        self.start_user()

    def start_user(self) -> None:
        # Reset only what the previous user touched, so a new user costs O(its own history), not O(C).
        idx = self._touched
        self.counts[idx] = 0.0
        self.last_step[idx] = 0.0
        self._touched = []
        self.step = 0
        self._pending: list[float] = []  # ts of events whose horizon is still open, oldest first
        self._pending_head = 0
        self.resolved = 0
        self.positives = 0

    def observe(self, cat: int, etype: int, ts: float) -> None:
        self.step += 1
        if cat > 0:
            if self.counts[cat] == 0.0:
                self._touched.append(cat)
            self.counts[cat] += 1.0
            self.last_step[cat] = self.step
        self._resolve(etype, ts)

    def _resolve(self, etype: int, ts: float) -> None:
        """Settle the labels of earlier events that this event decides, then queue this one."""
        pending, head = self._pending, self._pending_head
        while head < len(pending) and ts - pending[head] > self.horizon_s:
            head += 1  # window closed without a purchase
            self.resolved += 1
        if etype == PURCHASE:
            k = len(pending) - head  # every still-open window contains this purchase
            self.resolved += k
            self.positives += k
            head = len(pending)
        if head > 64 and head * 2 > len(pending):
            # Compact now and then so the queue stays O(open windows) with O(1) amortized cost.
            del pending[:head]
            head = 0
        self._pending_head = head
        pending.append(ts)

    def category_scores(self) -> np.ndarray:
        # Seen categories score 1 + count * (step + 1) + last_step > 1: count first, recency second
        # (last_step <= step), all above the unseen ones, which keep their popularity scores < 1.
        seen = self.counts > 0
        scores = np.where(seen, 1.0 + self.counts * (self.step + 1) + self.last_step, self.pop)
        scores[0] = -np.inf
        return scores

    def purchase_proba(self) -> float:
        a = USER_RATE_PRIOR_STRENGTH
        return (self.positives + a * self.global_rate) / (self.resolved + a)


class Markov(Popularity):
    """First-order transitions P(next category | current category) from the fit rows.

    ``P(b | a) = (n(a, b) + alpha * pop(b)) / (n(a) + alpha)``: additive smoothing toward the
    popularity distribution, which is also the back-off when ``a`` was never seen or is unknown.
    The current category of an event with an unknown category is the user's last known category.

    Examples
    --------
    >>> cats = np.array([1, 2, 1, 2, 1, 3], dtype=np.int32)   # A->B, A->B, A->C (with B->A between)
    >>> b = Markov()
    >>> b.fit(cats, np.zeros(6, np.int8), np.arange(6.0), np.array([0, 6]), np.ones(6, bool), 10.0, 4)
    >>> b.start_user(); b.observe(1, 0, 0.0)
    >>> np.argsort(-b.category_scores())[:3].tolist()
    [2, 3, 1]
    """

    name = "markov"
    current = 0

    def fit(self, cats, etypes, ts, user_start, fit_mask, horizon_s, n_categories, *, gap_s=DEFAULT_GAP_S):
        super().fit(cats, etypes, ts, user_start, fit_mask, horizon_s, n_categories, gap_s=gap_s)
        cats = np.asarray(cats, dtype=np.int64)
        fit_mask = np.asarray(fit_mask, dtype=bool)
        n = cats.shape[0]
        user_start = np.asarray(user_start, dtype=np.int64)
        # Forward-fill the last known category within each user, using fit rows only.
        known = fit_mask & (cats > 0)
        last_known_row = np.maximum.accumulate(np.where(known, np.arange(n), -1))
        row_user_start = np.repeat(user_start[:-1], np.diff(user_start))
        current = np.where(last_known_row >= row_user_start, cats[np.maximum(last_known_row, 0)], 0)
        # Pairs (row i, row i+1) of the same user, both fit rows, with a known current and next category.
        nxt = np.r_[cats[1:], 0]
        same_user = np.r_[row_user_start[1:], -1] == row_user_start
        ok = same_user & fit_mask & np.r_[fit_mask[1:], False] & (current > 0) & (nxt > 0)
        keys, counts = np.unique(current[ok] * n_categories + nxt[ok], return_counts=True)
        src, dst = keys // n_categories, keys % n_categories
        # CSR by current category: row a's next categories are next_cats[indptr[a]:indptr[a+1]].
        self.indptr = csr_offsets(src, n_categories)
        self.next_cats = dst
        self.next_counts = counts.astype(np.float64)
        self.row_totals = np.bincount(src, weights=self.next_counts, minlength=n_categories)
        pop = np.where(np.isfinite(self.pop), self.pop, 0.0)
        self.pop_prob = pop / pop.sum()
        logger.debug("markov: %d transitions, %d distinct pairs", int(ok.sum()), keys.size)

    def start_user(self) -> None:
        self.current = 0

    def observe(self, cat: int, etype: int, ts: float) -> None:
        if cat > 0:
            self.current = cat

    def category_scores(self) -> np.ndarray:
        a = self.current
        if a == 0:
            return self.pop.copy()
        lo, hi = self.indptr[a], self.indptr[a + 1]
        denom = self.row_totals[a] + MARKOV_ALPHA
        scores = MARKOV_ALPHA * self.pop_prob / denom
        scores[self.next_cats[lo:hi]] += self.next_counts[lo:hi] / denom
        scores[0] = -np.inf
        return scores


class Funnel(Baseline):
    """Purchase propensity from the current event type only: P(purchase within horizon | type).

    Fitted on the fit rows with censored windows left out, Laplace smoothed: ``(k + 1) / (n + 2)``.

    Examples
    --------
    >>> et = np.array([0, 2, 5, 0, 2, 0])                 # view, cart, purchase | view, cart, view
    >>> t = np.array([0.0, 10.0, 20.0, 0.0, 10.0, 500.0])
    >>> b = Funnel()
    >>> b.fit(np.zeros(6, np.int32), et, t, np.array([0, 3, 6]), np.ones(6, bool), 100.0, 2)
    >>> b.start_user(); b.observe(0, 2, 0.0)
    >>> b.purchase_proba()                                 # carts: 1 of 2 followed by a purchase
    0.5
    """

    name = "funnel"
    etype = -1

    def fit(self, cats, etypes, ts, user_start, fit_mask, horizon_s, n_categories, *, gap_s=DEFAULT_GAP_S):
        super().fit(cats, etypes, ts, user_start, fit_mask, horizon_s, n_categories, gap_s=gap_s)
        etypes = np.asarray(etypes, dtype=np.int64)
        labels, observable = masked_purchase_labels(etypes, ts, user_start, fit_mask, horizon_s, gap_s=gap_s)
        n = np.bincount(etypes[observable], minlength=N_EVENT_TYPES).astype(np.float64)
        k = np.bincount(etypes[observable], weights=labels[observable], minlength=N_EVENT_TYPES)
        self.type_proba = (k + 1.0) / (n + 2.0)
        self.prior = (k.sum() + 1.0) / (n.sum() + 2.0)
        logger.debug("funnel: P(purchase | type) = %s", np.round(self.type_proba, 4).tolist())

    def start_user(self) -> None:
        self.etype = -1

    def observe(self, cat: int, etype: int, ts: float) -> None:
        self.etype = etype

    def purchase_proba(self) -> float:
        if self.etype < 0:
            return float(self.prior)
        return float(self.type_proba[self.etype])


ADD_TO_CART = TYPE_INDEX["add_to_cart"]
REMOVE_FROM_CART = TYPE_INDEX["remove_from_cart"]

#: Change of the cart count by event type (docs/ARCHITECTURE.md §Events): an add puts one item in, a removal
#: or a purchase takes one out. The same rule as the stream state's ``observe`` (model/core/state.py).
CART_DELTA = np.zeros(N_EVENT_TYPES, dtype=np.int64)
CART_DELTA[ADD_TO_CART] = 1
CART_DELTA[REMOVE_FROM_CART] = -1
CART_DELTA[PURCHASE] = -1


class Cascade(Markov):
    """A strict cascade of the simple signals, each tier ranked entirely above the next:

    1. the user's last known category;
    2. the categories in the user's cart (a per-category count: add +1, remove or purchase -1,
       floored at 0), the most recently added first;
    3. the user's other categories, by count, the most recent first on ties;
    4. the Markov successors of the last category (:class:`Markov`'s transition counts on the fit
       rows), by count, popularity on ties;
    5. everything else by popularity.

    A category is ranked in the highest tier it belongs to. Scores are ``tier + s`` with ``s`` in
    [0, 1) strictly ordered within the tier, so the whole ranking is strict.

    Examples
    --------
    >>> cats = np.array([1, 2, 1, 2, 1, 3], dtype=np.int32)   # successors of 1: 2 (twice), 3
    >>> b = Cascade()
    >>> b.fit(cats, np.zeros(6, np.int8), np.arange(6.0), np.array([0, 6]), np.ones(6, bool), 10.0, 6)
    >>> b.start_user()
    >>> for c, e in ((4, 0), (5, 2), (4, 0), (1, 0)):          # 5 added to the cart
    ...     b.observe(c, e, 0.0)
    >>> np.argsort(-b.category_scores()).tolist()             # last, cart, history, Markov, rest
    [1, 5, 4, 2, 3, 0]
    """

    name = "cascade"

    #: Tier offsets; the within-tier score is in [0, 1).
    TIER_LAST, TIER_CART, TIER_HISTORY, TIER_MARKOV = 4.0, 3.0, 2.0, 1.0

    def fit(self, cats, etypes, ts, user_start, fit_mask, horizon_s, n_categories, *, gap_s=DEFAULT_GAP_S):
        super().fit(cats, etypes, ts, user_start, fit_mask, horizon_s, n_categories, gap_s=gap_s)
        self.counts = np.zeros(n_categories, dtype=np.float64)
        self.last_step = np.zeros(n_categories, dtype=np.float64)
        self.cart = np.zeros(n_categories, dtype=np.int64)
        self.cart_step = np.zeros(n_categories, dtype=np.float64)
        self._touched: list[int] = []
        self.start_user()

    def start_user(self) -> None:
        super().start_user()
        if not hasattr(self, "counts"):
            return
        idx = self._touched
        self.counts[idx] = 0.0
        self.last_step[idx] = 0.0
        self.cart[idx] = 0
        self.cart_step[idx] = 0.0
        self._touched = []
        self.step = 0

    def observe(self, cat: int, etype: int, ts: float) -> None:
        super().observe(cat, etype, ts)
        self.step += 1
        if cat <= 0:
            return
        if self.counts[cat] == 0.0:
            self._touched.append(cat)
        self.counts[cat] += 1.0
        self.last_step[cat] = self.step
        delta = CART_DELTA[etype]
        if delta > 0:
            self.cart[cat] += 1
            self.cart_step[cat] = self.step
        elif delta < 0 and self.cart[cat] > 0:
            self.cart[cat] -= 1

    def category_scores(self) -> np.ndarray:
        return self._scores(np.asarray(self._touched, dtype=np.int64))

    def _scores(self, idx: np.ndarray) -> np.ndarray:
        """The cascade's scores with ``idx`` (categories the user touched) as the cart and history tiers."""
        scores = self.pop.copy()  # tier 0: popularity in [0, 1)
        a = self.current
        if a > 0:
            lo, hi = self.indptr[a], self.indptr[a + 1]
            nxt, cnt = self.next_cats[lo:hi], self.next_counts[lo:hi]
            if cnt.size:
                scores[nxt] = self.TIER_MARKOV + (cnt + self.pop[nxt]) / (cnt.max() + 1.0)
        if idx.size:
            span = self.step + 1.0
            hist = (self.counts[idx] * span + self.last_step[idx]) / ((self.counts[idx].max() + 1.0) * span)
            scores[idx] = self.TIER_HISTORY + hist
            in_cart = idx[self.cart[idx] > 0]
            scores[in_cart] = self.TIER_CART + self.cart_step[in_cart] / span
        if a > 0:
            scores[a] = self.TIER_LAST
        scores[0] = -np.inf
        return scores


class CascadeRecent(Cascade):
    """The cascade with a memory: its cart and history tiers hold only the ``window`` categories the
    user touched most recently (the last category among them), as the model's state holds its last
    ``history_slots`` (docs/MODEL.md §1); older categories fall back to the Markov and popularity tiers.

    Over a long history the plain cascade ranks a category the user counted often weeks ago above every
    Markov successor of what they look at now; a counter a data engineer would write forgets. How much
    to forget is a setting, so it is chosen as the model's are: on the validation window (rows from T1,
    ``valid_start``, to the end of ``fit_mask``, T2), with Markov and popularity fitted on the rows
    before T1, by MRR@20 over the next-category points whose next event is before T2, among
    :attr:`WINDOWS` (``None``: no window, the cascade itself; ties go to the larger window). Then it
    is fitted on every row of ``fit_mask``, as every baseline. Without a validation point (or without
    ``valid_start``) it is the cascade.

    Examples
    --------
    >>> cats = np.array([1, 2, 1, 2, 1, 3], dtype=np.int32)   # successors of 1: 2 (twice), 3
    >>> b = CascadeRecent(window=2)
    >>> b.fit(cats, np.zeros(6, np.int8), np.arange(6.0), np.array([0, 6]), np.ones(6, bool), 10.0, 6)
    >>> b.start_user()
    >>> for c in (4, 4, 4, 5, 1):                             # 4 counted thrice, then left behind
    ...     b.observe(c, 0, 0.0)
    >>> np.argsort(-b.category_scores()).tolist()[:4]         # last, 5 (in the window), then Markov
    [1, 5, 2, 3]
    """

    name = "cascade_recent"
    chooses_on_validation = True
    #: Windows tried on validation, in distinct categories; ``None`` is the whole history.
    WINDOWS: tuple[int | None, ...] = (4, 8, 16, 32, None)

    def __init__(self, window: int | None = None) -> None:
        self.window = window
        self._choice: dict | None = None

    def fit(
        self,
        cats,
        etypes,
        ts,
        user_start,
        fit_mask,
        horizon_s,
        n_categories,
        *,
        gap_s=DEFAULT_GAP_S,
        valid_start: float | None = None,
    ):
        fit_mask = np.asarray(fit_mask, dtype=bool)
        if valid_start is not None:
            before = fit_mask & (np.asarray(ts) < valid_start)
            super().fit(cats, etypes, ts, user_start, before, horizon_s, n_categories, gap_s=gap_s)
            self._choose(cats, etypes, ts, user_start, fit_mask & ~before)
        super().fit(cats, etypes, ts, user_start, fit_mask, horizon_s, n_categories, gap_s=gap_s)

    def settings(self) -> dict | None:
        return {"window": self.window, **(self._choice or {"chosen_on": "nothing (no validation point)"})}

    def category_scores(self) -> np.ndarray:
        return self._scores(self._recent(self.window))

    def _recent(self, window: int | None) -> np.ndarray:
        """The user's touched categories, at most ``window`` of them, the most recently seen first."""
        idx = np.asarray(self._touched, dtype=np.int64)
        if window is None or idx.size <= window:
            return idx
        return idx[np.argsort(-self.last_step[idx], kind="stable")[:window]]

    def _choose(self, cats, etypes, ts, user_start, valid: np.ndarray) -> None:
        """Score every window on the validation points (``valid`` rows with a next category in ``valid``)."""
        cats = np.asarray(cats)
        user_start = np.asarray(user_start, dtype=np.int64)
        target = next_category_targets(cats, user_start)
        point = valid & (target > 0) & np.r_[valid[1:], False]
        self.window = None
        if not point.any():
            self._choice = None
            return
        rr = np.zeros(len(self.WINDOWS))
        users = np.unique(np.searchsorted(user_start, np.flatnonzero(point), side="right") - 1)
        for u in users.tolist():
            s, e = int(user_start[u]), int(user_start[u + 1])
            last = s + int(np.flatnonzero(point[s:e]).max())
            self.start_user()
            for i in range(s, last + 1):
                self.observe(int(cats[i]), int(etypes[i]), float(ts[i]))
                if not point[i]:
                    continue
                full = self._recent(None)
                seen: dict[int, float] = {}
                for j, w in enumerate(self.WINDOWS):
                    size = full.size if w is None else min(w, full.size)
                    if size not in seen:  # windows at least as large as the history score alike
                        r = int(target_rank(self._scores(self._recent(size)), int(target[i])))
                        seen[size] = 1.0 / r if r <= RANK_CUTOFF else 0.0
                    rr[j] += seen[size]
        n = int(point.sum())
        mrr = rr / n
        best = max(range(len(self.WINDOWS)), key=lambda j: (mrr[j], j))  # ties: the larger window
        self.window = self.WINDOWS[best]
        self._choice = {
            "chosen_on": "validation",
            "validation_points": n,
            "validation_mrr@20": {
                ("all" if w is None else str(w)): float(m) for w, m in zip(self.WINDOWS, mrr, strict=True)
            },
        }


class CascadeMix(CascadeRecent):
    """``cascade_recent`` whose Markov tier reads the user's recent categories together: every category
    outside the cart and history tiers is ranked by the mixture of the Markov rows (smoothed toward
    popularity, as :class:`Markov`'s) of the window's categories, the most recent weighing 1, the next
    :attr:`DECAY`, then ``DECAY**2``, ... (Jannach & Ludewig's session kNN, RecSys 2017, over the
    transition table): where a user's last few categories point together. It is the model's history
    mixture (docs/MODEL.md §1) as a counter, at the decay the model starts from; its window is chosen on
    validation as ``cascade_recent``'s.

    Examples
    --------
    >>> cats = np.array([1, 2, 1, 2, 3, 4, 3, 4, 1, 5], dtype=np.int32)  # 1 -> 2 (twice), 5; 3 -> 4 (twice)
    >>> b = CascadeMix(window=None)
    >>> b.fit(cats, np.zeros(10, np.int8), np.arange(10.0), np.array([0, 10]), np.ones(10, bool), 10.0, 7)
    >>> b.start_user()
    >>> for c in (3, 1):                                       # 1 now, 3 before it
    ...     b.observe(c, 0, 0.0)
    >>> np.argsort(-b.category_scores()).tolist()[:4]          # last, history, then 2 (from 1), 4 (from 3)
    [1, 3, 2, 4]
    """

    name = "cascade_mix"
    #: Weight of the k-th most recent category's row is ``DECAY**k``: the start of the model's learned decay.
    DECAY = MIX_DECAY_INIT
    #: Rows mixed at most (the whole history's weight beyond them is below ``DECAY**DEPTH``).
    DEPTH = 32

    def _scores(self, idx: np.ndarray) -> np.ndarray:
        scores = super()._scores(idx)
        if idx.size == 0:
            return scores
        rows = idx[np.argsort(-self.last_step[idx], kind="stable")][: self.DEPTH]
        w = self.DECAY ** np.arange(rows.size, dtype=np.float64)
        denom = self.row_totals[rows] + MARKOV_ALPHA
        mix = float((w * MARKOV_ALPHA / denom).sum()) * self.pop_prob  # every row's popularity part
        for a, wa, da in zip(rows.tolist(), w.tolist(), denom.tolist(), strict=True):
            lo, hi = self.indptr[a], self.indptr[a + 1]
            mix[self.next_cats[lo:hi]] += wa * self.next_counts[lo:hi] / da
        outside = scores < self.TIER_HISTORY  # not the last category, the cart or the history
        outside[0] = False
        if not outside.any():  # the user has touched every category: no Markov tier to rank
            return scores
        # one tier ordered by the mixture, popularity breaking exact ties (the ranking stays strict)
        scores[outside] = (
            self.TIER_MARKOV + 0.999 * mix[outside] / mix[outside].max() + 1e-9 * self.pop[outside]
        )
        return scores


def floored_cart_counts(
    etypes: np.ndarray, user_start: np.ndarray, mask: np.ndarray | None = None
) -> np.ndarray:
    """Each user's cart count after each row: add +1, remove or purchase -1, never below 0.

    Rows outside ``mask`` change nothing. Vectorized: with ``C`` the running sum of the changes,
    the floored count is ``C - min(0, min(C so far))``, the running minimum taken within each user
    by giving every later user a lower offset than anything an earlier one reaches.

    >>> et = np.array([2, 2, 5, 3, 3, 2,   3, 2])      # adds 2, purchase, 2 removals, add | user 1
    >>> floored_cart_counts(et, np.array([0, 6, 8])).tolist()
    [1, 2, 1, 0, 0, 1, 0, 1]
    """
    etypes = np.asarray(etypes, dtype=np.int64)
    n = etypes.shape[0]
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    d = CART_DELTA[etypes]
    if mask is not None:
        d = np.where(np.asarray(mask, dtype=bool), d, 0)
    user_start = np.asarray(user_start, dtype=np.int64)
    row_user = np.repeat(np.arange(user_start.shape[0] - 1), np.diff(user_start))
    csum = np.cumsum(d)
    before = np.r_[0, csum][user_start[:-1]]  # running sum before each user's first row
    c = csum - before[row_user]
    big = 2 * n + 1  # more than any |c| difference
    run_min = np.minimum.accumulate(c - big * row_user) + big * row_user
    return c - np.minimum(run_min, 0)


class FunnelCart(Baseline):
    """P(purchase within horizon | current event type, cart non-empty).

    The cart is a per-user count (add +1, remove or purchase -1, floored at 0, as the stream
    state counts it), since the baselines see no item ids. Fitted like :class:`Funnel` on the fit
    rows with censored windows left out, Laplace smoothed ``(k + 1) / (n + 2)`` per cell.

    Examples
    --------
    >>> et = np.array([0, 2, 0, 5, 0, 0])                 # view, cart, view, buy | view, view
    >>> t = np.array([0.0, 10.0, 20.0, 30.0, 0.0, 500.0])
    >>> b = FunnelCart()
    >>> b.fit(np.zeros(6, np.int32), et, t, np.array([0, 4, 6]), np.ones(6, bool), 100.0, 2)
    >>> b.start_user(); b.observe(0, 0, 0.0)
    >>> float(b.purchase_proba())                          # views, empty cart: 1 of 2 observable
    0.5
    >>> b.observe(0, 2, 1.0); b.observe(0, 0, 2.0)
    >>> float(b.purchase_proba())                          # views with a cart: 1 of 1
    0.6666666666666666
    """

    name = "funnel_cart"
    etype = -1
    cart = 0

    def fit(self, cats, etypes, ts, user_start, fit_mask, horizon_s, n_categories, *, gap_s=DEFAULT_GAP_S):
        super().fit(cats, etypes, ts, user_start, fit_mask, horizon_s, n_categories, gap_s=gap_s)
        etypes = np.asarray(etypes, dtype=np.int64)
        labels, observable = masked_purchase_labels(etypes, ts, user_start, fit_mask, horizon_s, gap_s=gap_s)
        has_cart = floored_cart_counts(etypes, user_start, fit_mask) > 0
        cell = etypes * 2 + has_cart
        n = np.bincount(cell[observable], minlength=2 * N_EVENT_TYPES).astype(np.float64)
        k = np.bincount(cell[observable], weights=labels[observable], minlength=2 * N_EVENT_TYPES)
        self.cell_proba = ((k + 1.0) / (n + 2.0)).reshape(N_EVENT_TYPES, 2)
        self.prior = (k.sum() + 1.0) / (n.sum() + 2.0)
        logger.debug("funnel_cart: P(purchase | type, cart) = %s", np.round(self.cell_proba, 4).tolist())

    def start_user(self) -> None:
        self.etype = -1
        self.cart = 0

    def observe(self, cat: int, etype: int, ts: float) -> None:
        self.etype = etype
        self.cart = max(0, self.cart + int(CART_DELTA[etype]))

    def purchase_proba(self) -> float:
        if self.etype < 0:
            return float(self.prior)
        return float(self.cell_proba[self.etype, int(self.cart > 0)])


def make_baselines() -> list[Baseline]:
    """All baselines of the evaluation report, unfitted, in report order.

    >>> [b.name for b in make_baselines()]
    ['popularity', 'last_category', 'user_history', 'markov', 'funnel', 'cascade', 'cascade_recent', 'cascade_mix', 'funnel_cart']
    """
    return [
        Popularity(),
        LastCategory(),
        UserHistory(),
        Markov(),
        Funnel(),
        Cascade(),
        CascadeRecent(),
        CascadeMix(),
        FunnelCart(),
    ]
