"""The producers' partitioner check: records off murmur2's partition are counted, the first is logged."""

from __future__ import annotations

import logging
import re
import zlib
from types import SimpleNamespace as Record

from aiokafka.partitioner import DefaultPartitioner

from demandstream.stream.partitioner import key_partition
from demandstream.stream.worker.partitioning import PartitionerCheck

N = 4


def crc32_partition(key: bytes) -> int:
    """librdkafka's default (``consistent_random`` for keyed records): CRC32 of the key."""
    return zlib.crc32(key) % N


def test_key_partition_is_the_default_of_aiokafka_which_faust_routes_with():
    for key in (b"u1", b"user-42", "müller".encode()):
        assert key_partition(key, N) == DefaultPartitioner()(key, list(range(N)), list(range(N)))


def test_a_crc32_producer_is_counted_and_logged_once(caplog):
    keys = [f"u{i}".encode() for i in range(200)]
    off = [k for k in keys if crc32_partition(k) != key_partition(k, N)]
    assert len(off) > 100  # the two partitioners disagree on most keys
    check = PartitionerCheck("clicks", N)
    murmur = [Record(topic="clicks", key=k, partition=key_partition(k, N)) for k in keys]
    assert check.check(murmur) == 0
    with caplog.at_level(logging.ERROR, logger="demandstream.stream.worker.partitioning"):
        crc = [Record(topic="clicks", key=k, partition=crc32_partition(k)) for k in off]
        first = check.check(crc)
        assert 1 <= first <= N  # one sampled record per partition and batch, not one per event
        assert check.check(crc) == first
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1
    message = errors[0].getMessage()
    # both fixes, and the partitioners that would have placed the record there (CRC32 among them)
    assert "DEMANDSTREAM_PARTITIONER" in message and "partitioner=murmur2_random" in message
    hint = re.search(r"arrived on partition \d+ \(([^)]*)\)", message)
    assert hint and "crc32" in hint.group(1)
    # records without a key (dead letters) and control records are not sampled
    assert (
        check.check(
            [Record(topic="clicks", key=None, partition=0), Record(topic="ctl", key=off[0], partition=3)]
        )
        == 0
    )


def test_a_check_told_crc32_accepts_crc32_records_and_counts_murmur2_ones():
    keys = [f"u{i}".encode() for i in range(200)]
    check = PartitionerCheck("clicks", N, "crc32")
    assert check.check([Record(topic="clicks", key=k, partition=crc32_partition(k)) for k in keys]) == 0
    off = [k for k in keys if crc32_partition(k) != key_partition(k, N)]
    assert check.check([Record(topic="clicks", key=k, partition=key_partition(k, N)) for k in off]) >= 1
