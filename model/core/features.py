"""Feature encoding: one event -> small integers the network embeds.

Every function here is pure and shared by the offline (training, scoring) and streaming paths, so the
two can never encode an event differently.

>>> price_bucket(None), price_bucket(0.0), price_bucket(9.99) > price_bucket(1.0)
(0, 1, True)
>>> gap_bucket(None), gap_bucket(0.0), gap_bucket(-5.0), gap_bucket(3600.0) > gap_bucket(60.0)
(0, 1, 1, True)
>>> hash_bucket("i42", 1024) == hash_bucket("i42", 1024)  # stable across processes (crc32, not hash())
True
>>> query_tokens("Red  Running-Shoes", buckets=4096, max_tokens=8) == query_tokens("red running shoes", 4096, 8)
True
>>> category_hash(None), category_hash("shoes") == category_hash("shoes") > 0
(0, True)
"""

from __future__ import annotations

import bisect
import math
import re
import zlib
from collections import Counter
from collections.abc import Iterable

import numpy as np

#: Upper edges (seconds) of the time-gap buckets since the user's previous event. Bucket 0 means "first
#: event of the user"; a gap above the last edge falls in the last bucket. Log-spaced because shopper
#: behaviour changes by orders of magnitude: within a page view, a session, a day, a week.
GAP_EDGES_S: tuple[float, ...] = (
    1,
    3,
    10,
    30,
    60,
    120,
    300,
    600,
    1800,
    3600,
    3 * 3600,
    6 * 3600,
    12 * 3600,
    86400,
    3 * 86400,
    7 * 86400,
    30 * 86400,
)
N_GAP_BUCKETS = len(GAP_EDGES_S) + 2  # first-event bucket + one per edge + overflow

#: The purchase horizon, in seconds of event time: a signal's ``purchase_propensity`` is the probability
#: of a purchase within this long after the event (docs/ARCHITECTURE.md §Evaluation); purchase labels,
#: training, evaluation and the network's "added to cart within the horizon" input use it.
PURCHASE_HORIZON_S = 1800.0

#: Price buckets are log2-spaced: 0 = no price, then floor(log2(1 + price)) + 1, capped.
N_PRICE_BUCKETS = 20

_TOKEN_RE = re.compile(r"[^\w]+", re.UNICODE)
UNKNOWN = "<unk>"


def hash_bucket(value: str | None, buckets: int) -> int:
    """Stable hash of a string into 1..buckets-1; 0 is reserved for "no value"."""
    if value is None or value == "":
        return 0
    return zlib.crc32(value.encode("utf-8")) % (buckets - 1) + 1


#: Category hashes live in 1..CATEGORY_HASH_SPACE; 0 means "no category". 31 bits so that a hash fits
#: the int32 history slots of the per-user state (model/core/state.py) with EMPTY = -1 to spare. Two of
#: 10,000 categories collide with probability ~2 %; a collision makes two categories share one slot.
CATEGORY_HASH_SPACE = (1 << 31) - 1


def category_hash(category: str | None) -> int:
    """Stable hash of a raw category name into 1..CATEGORY_HASH_SPACE (0 = no category).

    History slots of the per-user state hold this hash rather than a vocabulary index, so that a
    category unseen in training (or beyond the vocabulary cap) can still be remembered and repeated.
    """
    if category is None or category == "":
        return 0
    # surrogatepass: a str with a lone surrogate (never valid input, see events.py) still hashes
    # instead of raising; every other str encodes exactly as in UTF-8
    return zlib.crc32(category.encode("utf-8", "surrogatepass")) % CATEGORY_HASH_SPACE + 1


def price_bucket(price: float | None) -> int:
    """Log-scale price bucket, 0 for a missing price."""
    if price is None or price != price:  # NaN is how the columnar log stores "no price"
        return 0
    return min(N_PRICE_BUCKETS - 1, int(math.log2(1.0 + max(price, 0.0))) + 1)


def gap_bucket(gap_s: float | None) -> int:
    """Bucket of the gap since the user's previous event; None = first event. Negative gaps count as 0."""
    if gap_s is None:
        return 0
    return 1 + bisect.bisect_left(GAP_EDGES_S, max(gap_s, 0.0))


def query_tokens(query: str | None, buckets: int, max_tokens: int) -> list[int]:
    """Hashed lower-case word tokens of a search query, at most ``max_tokens``, no padding."""
    if not query:
        return []
    out = []
    for tok in _TOKEN_RE.split(query.lower()):
        if tok:
            out.append(hash_bucket(tok, buckets))
            if len(out) == max_tokens:
                break
    return out


class Vocabulary:
    """Category names <-> indices; index 0 is the unknown/absent category and is never predicted.

    >>> v = Vocabulary.build(["a", "b", "a", None, "c"], max_size=3)
    >>> v.names, v.index("a"), v.index("c"), v.index(None)
    (['<unk>', 'a', 'b'], 1, 0, 0)
    """

    def __init__(self, names: list[str]):
        if not names or names[0] != UNKNOWN:
            raise ValueError("a vocabulary starts with the unknown category")
        self.names = list(names)
        self._index = {n: i for i, n in enumerate(self.names)}
        # hash -> index as two sorted arrays (vectorised lookups of whole history-slot matrices); on a
        # hash collision inside the vocabulary the more frequent (lower index) category keeps the hash.
        hashes = np.array([category_hash(n) for n in self.names[1:]], dtype=np.int64)
        order = np.lexsort((np.arange(len(hashes)), hashes))
        h_sorted = hashes[order]
        first = np.ones(len(h_sorted), dtype=bool)  # (np.r_[True, ...] would be one too long when empty)
        first[1:] = h_sorted[1:] != h_sorted[:-1]
        self._hash_keys = h_sorted[first]
        self._hash_index = (order[first] + 1).astype(np.int64)
        self.hashes = np.r_[0, hashes]  #: category_hash of every index (0 for <unk>)

    def __len__(self) -> int:
        return len(self.names)

    def index(self, category: str | None) -> int:
        if category is None:
            return 0
        return self._index.get(category, 0)

    def index_of_hashes(self, hashes: np.ndarray) -> np.ndarray:
        """Vocabulary index of each category hash (0 where the hash is no vocabulary category).

        >>> v = Vocabulary(["<unk>", "a", "b"])
        >>> v.index_of_hashes(np.array([category_hash("b"), -1, 0, category_hash("zz")])).tolist()
        [2, 0, 0, 0]
        """
        h = np.asarray(hashes, dtype=np.int64)
        if not len(self._hash_keys):
            return np.zeros(h.shape, np.int64)
        pos = np.searchsorted(self._hash_keys, h).clip(max=len(self._hash_keys) - 1)
        return np.where(self._hash_keys[pos] == h, self._hash_index[pos], 0)

    @classmethod
    def build(cls, categories: Iterable[str | None], max_size: int = 5000, min_count: int = 1) -> Vocabulary:
        """Most frequent categories first (ties by name, so the result is deterministic)."""
        counts = Counter(c for c in categories if c is not None)
        ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
        names = [UNKNOWN] + [c for c, n in ranked if n >= min_count][: max_size - 1]
        return cls(names)
