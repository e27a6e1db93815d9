"""How the shop's producers map a user's key to a partition, which the product must know to reach a user.

Per-user order needs only that each user's events stay in one partition, which every keyed
partitioner gives. Two requests need the same partition as the producers: ``demandstream forget``
sends a user's erasure to the control partition of the user's state (stream/tools/forget.py), and
Faust routes ``/users/{id}/demand`` to the worker owning that partition (its producer partitioner is
set to the same function, stream/worker/app.py). ``DEMANDSTREAM_PARTITIONER`` names the producers'
partitioner; the worker checks that the records it reads agree (stream/worker/partitioning.py).

The partitioners of the clients a shop is likely to run (docs/OPERATIONS.md §4, "Producers'
partitioner"):

- ``murmur2``: Kafka's Java client, kafka-python, aiokafka, franz-go, and librdkafka's
  ``murmur2_random``: ``(murmur2(key) & 0x7fffffff) % n``.
- ``crc32``: librdkafka's default ``consistent_random`` (confluent-kafka for Python, Go and .NET,
  kcat) and its ``consistent``: ``crc32(key) % n``.
- ``fnv1a``: librdkafka's ``fnv1a_random`` and Sarama's default hash partitioner (Go): the absolute
  value of the 32-bit signed FNV-1a hash, ``% n`` (librdkafka's src/rdfnv1a.c).

Keyless records have no user and are never routed by these functions.
"""

from __future__ import annotations

import random
import zlib
from collections.abc import Callable, Sequence

from kafka.partitioner.default import murmur2

#: What ``DEMANDSTREAM_PARTITIONER`` accepts, and the clients whose default each one is.
PARTITIONERS: dict[str, str] = {
    "murmur2": "Kafka's Java client, kafka-python, aiokafka; librdkafka's murmur2_random",
    "crc32": "librdkafka's default consistent_random (confluent-kafka, kcat)",
    "fnv1a": "Sarama's default; librdkafka's fnv1a_random",
}

_FNV_OFFSET, _FNV_PRIME = 0x811C9DC5, 0x01000193


def fnv1a_abs(key: bytes) -> int:
    """Sarama's and librdkafka's FNV-1a: 32-bit FNV-1a read as a signed integer, then its absolute value.

    >>> hex(fnv1a_abs(b"kafka")), hex(fnv1a_abs(b""))  # librdkafka's unit test vectors
    ('0xd33c4e1', '0x7ee3623b')
    """
    h = _FNV_OFFSET
    for byte in key:
        h = ((h ^ byte) * _FNV_PRIME) & 0xFFFFFFFF
    signed = h - (1 << 32) if h & 0x80000000 else h
    return abs(signed) & 0xFFFFFFFF  # -2**31 stays 2**31 as in C's unsigned cast


_HASHES: dict[str, Callable[[bytes], int]] = {
    "murmur2": lambda key: murmur2(key) & 0x7FFFFFFF,
    "crc32": zlib.crc32,
    "fnv1a": fnv1a_abs,
}


def key_partition(key: bytes, n_partitions: int, partitioner: str = "murmur2") -> int:
    """The partition ``partitioner`` (a name of :data:`PARTITIONERS`) gives ``key`` among ``n_partitions``.

    >>> key_partition(b"u1", 4) == key_partition(b"u1", 4, "murmur2") and 0 <= key_partition(b"u1", 4) < 4
    True
    >>> key_partition(b"u1", 4, "crc32") == __import__("zlib").crc32(b"u1") % 4
    True
    """
    return _HASHES[partitioner](key) % n_partitions


def matching_partitioners(key: bytes, partition: int, n_partitions: int) -> list[str]:
    """The known partitioners that put ``key`` in ``partition``: a hint at what a producer runs.

    With few partitions several match by chance, so a single record is only a hint.
    """
    return [name for name in PARTITIONERS if key_partition(key, n_partitions, name) == partition]


def producer_partitioner(
    partitioner: str,
) -> Callable[[bytes | None, Sequence[int], Sequence[int]], int] | None:
    """The ``partitioner`` callable of aiokafka's producer (Faust's ``producer_partitioner``) that places
    keyed records as ``partitioner`` does; None for murmur2, the client's own default. Keyless records
    go to a random available partition, as with that default.

    >>> producer_partitioner("murmur2") is None
    True
    >>> producer_partitioner("crc32")(b"u1", [0, 1, 2, 3], [0, 1, 2, 3]) == key_partition(b"u1", 4, "crc32")
    True
    """
    if partitioner == "murmur2":
        return None

    def partition(key: bytes | None, all_partitions: Sequence[int], available: Sequence[int]) -> int:
        if key is None:
            return random.choice(list(available or all_partitions))
        return key_partition(key, len(all_partitions), partitioner)  # partitions are numbered 0..n-1

    return partition
