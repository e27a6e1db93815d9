"""Whether the shop's producers partition keys as ``DEMANDSTREAM_PARTITIONER`` says (murmur2 by default).

Per-user order needs only that each user's events stay in one partition, which every keyed
partitioner gives. Two things need more: ``demandstream forget`` sends a user's erasure to the control
partition the setting's partitioner gives the user (stream/tools/forget.py), and Faust routes
``/users/{id}/demand`` with the same function (stream/partitioner.py). A producer built on librdkafka
(confluent-kafka, kcat) partitions with CRC32 by default (``partitioner=consistent_random``), Sarama
with FNV-1a: unless the setting names it, most users' states then live in another partition than
those requests reach, so an erasure finds no state to delete and the view answers 404. Signals stay
correct, which is why nothing else would show it.

The worker checks one input record of each partition in every micro-batch (the last, which its lag
bookkeeping picks out anyway: at most one hash per partition and batch, not one per event) and counts
the records whose partition is not the setting's (``demandstream_misrouted_records_total``); the
first one is logged as an error naming the partitioners that would have put it there and what to
change (docs/OPERATIONS.md §4, "Producers' partitioner").

:func:`refuse_new_partitions` stops a worker given a partition its table does not have: partitions
added to the input topic while the workers run.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from demandstream.model.errors import UserError
from demandstream.stream.partitioner import key_partition, matching_partitioners

logger = logging.getLogger(__name__)


class PartitionerCheck:
    """Samples of each micro-batch's input records against the partition ``partitioner`` gives their key.

    >>> from types import SimpleNamespace as R
    >>> check = PartitionerCheck("clicks", 4)
    >>> p = key_partition(b"u1", 4)
    >>> check.check([R(topic="clicks", key=b"u1", partition=p), R(topic="clicks", key=b"u1", partition=p)])
    0
    >>> check.check([R(topic="clicks", key=b"u1", partition=(p + 1) % 4), R(topic="ctl", key=b"u1", partition=p)])
    1
    """

    def __init__(self, input_topic: str, n_partitions: int, partitioner: str = "murmur2"):
        self.input_topic = input_topic
        self.n_partitions = n_partitions
        self.partitioner = partitioner
        self.logged = False

    def check(self, records: Iterable) -> int:
        """How many of the sampled records (the first keyed input record of each partition) sit in
        another partition than the partitioner gives their key; the first such record is logged."""
        seen: set[int] = set()
        misrouted = 0
        for r in records:
            if r.topic != self.input_topic or r.partition in seen or not r.key:
                continue
            seen.add(r.partition)
            expected = key_partition(r.key, self.n_partitions, self.partitioner)
            if expected != r.partition:
                misrouted += 1
                if not self.logged:
                    self.logged = True
                    self._log(expected, r.key, r.partition)
        return misrouted

    def _log(self, expected: int, key: bytes, partition: int) -> None:
        candidates = matching_partitioners(key, partition, self.n_partitions)
        hint = (
            f"{' or '.join(candidates)} would put it there"
            if candidates
            else "none of murmur2, crc32 and fnv1a would put it there"
        )
        logger.error(
            "a record of %s keyed for partition %d (DEMANDSTREAM_PARTITIONER=%s) arrived on partition %d "
            "(%s): set DEMANDSTREAM_PARTITIONER to the producers' partitioner, or set theirs to "
            "Kafka's default (librdkafka: partitioner=murmur2_random). Signals stay right, but "
            "`demandstream forget` and /users/{id}/demand miss such users until then "
            '(docs/OPERATIONS.md §4, "Producers\' partitioner"); counted in '
            "demandstream_misrouted_records_total",
            self.input_topic,
            expected,
            self.partitioner,
            partition,
            hint,
        )


class InputPartitionsChanged(UserError, RuntimeError):
    """Partitions were added to the input (or control) topic while the workers ran: one line."""


def refuse_new_partitions(assigned: Iterable, topics: Iterable[str], partitions: int, changelog: str) -> None:
    """Raise :class:`InputPartitionsChanged` when ``assigned`` holds a partition of ``topics`` numbered
    ``partitions`` or above.

    Adding partitions to a keyed topic moves every user whose key now hashes elsewhere: their next
    events arrive in a partition whose table partition (and changelog partition) does not exist, with
    their state left behind in the old one. The consumer sees the new partitions at its next metadata
    refresh (Faust's ``consumer_metadata_max_age_ms``, 5 minutes), rebalances, and the worker crashed on
    the first such event with ``AssertionError: Unrecognized partition``; the new partitions' events
    wait unprocessed until then. This check names the change at the rebalance instead, before any of
    them is processed.

    >>> from types import SimpleNamespace as TP
    >>> refuse_new_partitions([TP(topic="clicks", partition=3)], ["clicks"], 4, "app-user-state-changelog")
    >>> try:
    ...     refuse_new_partitions([TP(topic="clicks", partition=5)], ["clicks"], 4, "app-user-state-changelog")
    ... except InputPartitionsChanged as e:
    ...     print(str(e)[:68])
    partitions were added to clicks (this worker was given partition 5):
    """
    wanted = set(topics)
    grown: dict[str, int] = {}
    for tp in assigned:
        if tp.topic in wanted and tp.partition >= partitions:
            grown[tp.topic] = max(grown.get(tp.topic, 0), tp.partition)
    if not grown:
        return
    found = ", ".join(f"{t} (this worker was given partition {p})" for t, p in sorted(grown.items()))
    raise InputPartitionsChanged(
        f"partitions were added to {found}: the worker's table (and {changelog}) has {partitions}, and the users whose keys "
        "now hash to another partition left their states behind. Partitions cannot be added to a running "
        "pipeline's topics (docs/OPERATIONS.md §2): give the topic back its count by recreating it, or "
        "start a new table under another DEMANDSTREAM_APP_ID on topics created with the new count"
    )
