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
"""

from __future__ import annotations

import hashlib

from demandstream.model.errors import OptionError

#: Hash width behind the sample's threshold: 2**64 levels, so any fraction is kept to within 1e-19.
_HASH_BYTES = 8
_HASH_SPACE = 1 << (8 * _HASH_BYTES)
#: Personalises the hash so that the sample is not correlated with other hashes of user ids.
_PERSON = b"ds-users"


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
