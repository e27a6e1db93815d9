"""The producers' partitioners: each one places keys as the client whose default it is.

Expected values are librdkafka's own test vectors (tests/0048-partitioner.c: CRC32 from `crc32`,
murmur2 from Kafka's Java client, FNV-1a from Go's hash/fnv as Sarama uses it), so the functions
are checked against the clients, not against themselves.
"""

from __future__ import annotations

import pytest
from aiokafka.partitioner import DefaultPartitioner

from demandstream.stream.partitioner import (
    PARTITIONERS,
    fnv1a_abs,
    key_partition,
    matching_partitioners,
    producer_partitioner,
)

KEYS = [b"23456", b"this is another string with more length to it perhaps", b"hejsan"]
#: librdkafka tests/0048-partitioner.c: the hash each partitioner takes modulo the partition count
LIBRDKAFKA_HASHES = {
    "crc32": [0xB1B451D7, 0xB0150DF7, 0xD077037E],
    "murmur2": [0x058D780F, 0x4F7703DA, 0x5EC19395],
    "fnv1a": [0x27E6F469, 0x155E3E5F, 0x17B1E27A],
}


@pytest.mark.parametrize("name", sorted(LIBRDKAFKA_HASHES))
@pytest.mark.parametrize("n", [7, 17])
def test_each_partitioner_places_keys_as_librdkafka_does(name, n):
    expected = [h % n for h in LIBRDKAFKA_HASHES[name]]
    assert [key_partition(k, n, name) for k in KEYS] == expected


def test_fnv1a_matches_go_hash_fnv_as_sarama_reads_it():
    # librdkafka src/rdfnv1a.c's unit test vectors, from Go's hash/fnv (signed, then absolute)
    vectors = {b"kafka": 0xD33C4E1, b"giberish123456789": 0x77A58295, b"1234": 0x23BDD03, b"": 0x7EE3623B}
    assert {k: fnv1a_abs(k) for k in vectors} == vectors


def test_murmur2_is_the_default_of_aiokafka_which_faust_routes_with():
    parts = list(range(12))
    for key in (b"u1", b"user-42", "müller".encode(), *KEYS):
        expected = key_partition(key, 12)
        assert DefaultPartitioner()(key, parts, parts) == expected


@pytest.mark.parametrize("name", ["crc32", "fnv1a"])
def test_the_producer_partitioner_places_keyed_records_and_spreads_keyless_ones(name):
    place = producer_partitioner(name)
    parts = list(range(5))
    assert [place(k, parts, parts) for k in KEYS] == [key_partition(k, 5, name) for k in KEYS]
    assert {place(None, parts, [1, 3]) for _ in range(50)} <= {1, 3}  # only available ones
    assert producer_partitioner("murmur2") is None  # the clients' own default


def test_matching_partitioners_names_every_one_that_agrees():
    key = KEYS[2]
    for name in PARTITIONERS:
        assert name in matching_partitioners(key, key_partition(key, 17, name), 17)
    taken = {key_partition(key, 17, name) for name in PARTITIONERS}
    free = next(p for p in range(17) if p not in taken)
    assert matching_partitioners(key, free, 17) == []
