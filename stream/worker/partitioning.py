"""Whether the shop's producers partition keys as Kafka's default partitioner does (murmur2).

Per-user order needs only that each user's events stay in one partition, which every keyed
partitioner gives. Two things need more: ``demandstream forget`` sends a user's erasure to the control
partition murmur2 gives the user (stream/tools/forget.py), and Faust routes ``/users/{id}/demand`` to
the worker owning that partition. A producer built on librdkafka (confluent-kafka, the Go and .NET
clients, kcat) partitions with CRC32 by default (``partitioner=consistent_random``): most users' states
then live in another partition than the one those requests reach, so an erasure finds no state to
delete and the view answers 404. Signals stay correct, which is why nothing else would show it.

The worker checks one input record of each partition in every micro-batch (the last, which its lag
bookkeeping picks out anyway: at most one hash per partition and batch, not one per event) and counts
the records whose partition is not murmur2's (``demandstream_misrouted_records_total``); the first one is logged as an error saying what
to change (docs/OPERATIONS.md §4, "Producers' partitioner").
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from demandstream.stream.admin import key_partition

logger = logging.getLogger(__name__)


class PartitionerCheck:
    """Samples of each micro-batch's input records against murmur2's partition of their key.

    >>> from types import SimpleNamespace as R
    >>> check = PartitionerCheck("clicks", 4)
    >>> p = key_partition(b"u1", 4)
    >>> check.check([R(topic="clicks", key=b"u1", partition=p), R(topic="clicks", key=b"u1", partition=p)])
    0
    >>> check.check([R(topic="clicks", key=b"u1", partition=(p + 1) % 4), R(topic="ctl", key=b"u1", partition=p)])
    1
    """

    def __init__(self, input_topic: str, n_partitions: int):
        self.input_topic = input_topic
        self.n_partitions = n_partitions
        self.logged = False

    def check(self, records: Iterable) -> int:
        """How many of the sampled records (the first keyed input record of each partition) sit in
        another partition than murmur2 gives their key; the first such record is logged."""
        seen: set[int] = set()
        misrouted = 0
        for r in records:
            if r.topic != self.input_topic or r.partition in seen or not r.key:
                continue
            seen.add(r.partition)
            expected = key_partition(r.key, self.n_partitions)
            if expected != r.partition:
                misrouted += 1
                if not self.logged:
                    self.logged = True
                    logger.error(
                        "a record of %s keyed for partition %d (Kafka's default partitioner, murmur2) arrived "
                        "on partition %d: the producers partition keys otherwise (librdkafka's default is "
                        "CRC32; set partitioner=murmur2_random). Signals stay right, but `demandstream "
                        "forget` and /users/{id}/demand reach the murmur2 partition and miss such users "
                        "(docs/OPERATIONS.md §4); counted in demandstream_misrouted_records_total",
                        self.input_topic,
                        expected,
                        r.partition,
                    )
        return misrouted
