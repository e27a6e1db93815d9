"""A stable sample of users: how a log too large to train on in memory is cut to a fraction of it.

A clickstream is sampled by user, never by row: every kept user keeps every event, so sequences,
carts, sessions and purchase windows stay whole, and training, validation and test see the same
users' full histories. Whether a user is in the sample depends only on the user id and the
fraction (a keyed hash, no seed and no state), so two loads of the same files, in any order or
split, keep the same users, and a smaller fraction's users are a subset of a larger one's.

>>> in_user_sample("u1", 1.0)
True
>>> sum(in_user_sample(f"u{i}", 0.25) for i in range(10_000))  # about a quarter
2478
>>> all(in_user_sample(f"u{i}", 0.5) for i in range(10_000) if in_user_sample(f"u{i}", 0.25))
True

Whether a log needs a sample is told before training starts (:func:`suggested_user_sample`), from what
training was measured to hold per row, so that a user reads a hint instead of an out-of-memory kill.
"""

from __future__ import annotations

import hashlib
import math
import re
from pathlib import Path

from demandstream.model.errors import OptionError

#: Hash width behind the sample's threshold: 2**64 levels, so any fraction is kept to within 1e-19.
_HASH_BYTES = 8
_HASH_SPACE = 1 << (8 * _HASH_BYTES)
#: Personalises the hash so that the sample is not correlated with other hashes of user ids.
_PERSON = b"ds-users"
#: Training's peak resident memory: a fixed part (libraries, model), a part per category of the
#: vocabulary and a part per log row before the test start (features, labels, the refit's copy).
#: Rounded up from generated logs (peak VmRSS, 2026-12-06): 167 categories, 221k / 899k rows: 1.45 /
#: 2.01 GB since the slots' counts are stored in 16 and 8 bits (model/core/encoding.py COLUMNS; 1.45 /
#: 2.13 GB before, docs/MODEL.md §4.9); since the cascade-scale fit is scored in chunks
#: (model/training/cascade_scale.py, SCALE_FIT_WHOLE_FLOATS), 5,730 categories and 45k rows: 1.51 GB (2.74
#: before), 9,501 and 180k: 1.73 GB (1.60 GB since a large catalog's category head trains in blocks
#: of cells, 2026-12-07). The estimate overstates those two by 2 % and 12 %: it is for a warning, and
#: errs on the side of warning.
TRAIN_FIXED_BYTES = 1_300_000_000
TRAIN_BYTES_PER_CATEGORY = 35_000
TRAIN_BYTES_PER_ROW = 850
#: The smallest fraction a hint proposes; below it a log would be better cut by time.
MIN_SUGGESTED = 0.01


def check_fraction(fraction: float) -> float:
    """The fraction itself when it is in (0, 1]; otherwise one clear error.

    >>> check_fraction(0.1)
    0.1
    >>> check_fraction(0)
    Traceback (most recent call last):
    ...
    demandstream.model.errors.OptionError: the user sample must be a fraction in (0, 1], got 0
    """
    if not 0.0 < fraction <= 1.0:
        raise OptionError(f"the user sample must be a fraction in (0, 1], got {fraction:g}")
    return fraction


def in_user_sample(user_id: str, fraction: float) -> bool:
    """Whether ``user_id`` is among the stable ``fraction`` of users (every user at 1.0)."""
    if fraction >= 1.0:
        return True
    digest = hashlib.blake2b(user_id.encode("utf-8"), digest_size=_HASH_BYTES, person=_PERSON).digest()
    return int.from_bytes(digest, "big") < fraction * _HASH_SPACE


def training_memory_bytes(rows: int, categories: int) -> int:
    """Estimated peak memory of ``demandstream train`` on ``rows`` log rows before the test start that
    name ``categories`` categories.

    >>> round(training_memory_bytes(1_000_000, 167) / 1e9, 2)
    2.16
    >>> round(training_memory_bytes(100_000, 10_000) / 1e9, 2)
    1.74
    """
    return _fixed_bytes(categories) + TRAIN_BYTES_PER_ROW * rows


def suggested_user_sample(rows: int, categories: int, available_bytes: int) -> float | None:
    """A user fraction whose training fits in ``available_bytes``; None when the whole log fits.

    A sample keeps most categories, so only the rows' part is taken to shrink with it. Rounded down
    to two significant digits, and never below :data:`MIN_SUGGESTED`.

    >>> suggested_user_sample(1_000_000, 167, 8_000_000_000) is None
    True
    >>> suggested_user_sample(40_000_000, 500, 16_000_000_000)
    0.43
    >>> suggested_user_sample(40_000_000, 500, 1_000_000_000)
    0.01
    """
    if training_memory_bytes(rows, categories) <= available_bytes:
        return None
    fits = (available_bytes - _fixed_bytes(categories)) / (TRAIN_BYTES_PER_ROW * rows)
    if fits <= MIN_SUGGESTED:
        return MIN_SUGGESTED
    digits = 1 - math.floor(math.log10(fits))
    return max(MIN_SUGGESTED, math.floor(fits * 10**digits) / 10**digits)


def _fixed_bytes(categories: int) -> int:
    return TRAIN_FIXED_BYTES + TRAIN_BYTES_PER_CATEGORY * categories


def available_memory_bytes(meminfo: str | Path = "/proc/meminfo") -> int | None:
    """The kernel's estimate of memory available to a new process (Linux ``MemAvailable``), or None
    where there is no such file (then no hint is given)."""
    try:
        text = Path(meminfo).read_text()
    except OSError:
        return None
    m = re.search(r"^MemAvailable:\s*(\d+) kB", text, re.M)
    return int(m.group(1)) * 1024 if m else None
