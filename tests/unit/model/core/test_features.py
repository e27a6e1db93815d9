"""model/core/features.py: the pure encodings every path shares (hashes, buckets, tokens, vocabulary).

Hashes are persisted (per-user state records hold category hashes, checkpoints hold the embedding rows
of item and query buckets), so their values are pinned here: a change would silently break every stored
state and checkpoint.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from demandstream.model.core.features import (
    CATEGORY_HASH_SPACE,
    GAP_EDGES_S,
    N_GAP_BUCKETS,
    N_PRICE_BUCKETS,
    UNKNOWN,
    Vocabulary,
    category_hash,
    gap_bucket,
    hash_bucket,
    price_bucket,
    query_tokens,
)

#: Values computed once (crc32 based); they must never change.
PINNED_CATEGORY_HASHES = {"shoes": 349143448, "electronics.smartphone": 2040820, "Größe": 342790167}
PINNED_BUCKETS = {("i42", 1024): 812, ("red", 4096): 1696}
#: Two names whose category hashes collide (found by search; crc32 modulo 2**31 - 1).
COLLIDING = ("jnvuuundjg", "qnaqaxuyty")


# -- hashes ---------------------------------------------------------------------------------------


def test_category_hash_values_are_pinned():
    assert {c: category_hash(c) for c in PINNED_CATEGORY_HASHES} == PINNED_CATEGORY_HASHES
    assert {k: hash_bucket(*k) for k in PINNED_BUCKETS} == PINNED_BUCKETS


def test_hashes_are_the_same_in_another_process_with_another_hash_seed():
    names = ["shoes", "bags", "electronics.smartphone", "Größe", "😀", "x" * 200]
    code = (
        "import sys, json\n"
        "from demandstream.model.core.features import category_hash, hash_bucket\n"
        "names = json.loads(sys.argv[1])\n"
        "print(json.dumps([[category_hash(n), hash_bucket(n, 4096)] for n in names]))"
    )
    env = dict(os.environ, PYTHONHASHSEED="4242")
    out = subprocess.run(
        [sys.executable, "-c", code, json.dumps(names)], env=env, capture_output=True, text=True, check=True
    )
    assert json.loads(out.stdout) == [[category_hash(n), hash_bucket(n, 4096)] for n in names]


@pytest.mark.parametrize("empty", [None, ""])
def test_no_category_hashes_to_zero(empty):
    assert category_hash(empty) == 0
    assert hash_bucket(empty, 1024) == 0


def test_category_hash_range_fits_the_int32_state_slots():
    hashes = [category_hash(f"category-{i}") for i in range(5000)]
    assert min(hashes) >= 1 and max(hashes) <= CATEGORY_HASH_SPACE < 2**31
    assert len(set(hashes)) == len(hashes)  # distinct names, distinct hashes (collisions are rare)


@pytest.mark.parametrize("buckets", [2, 3, 64])
def test_hash_bucket_fills_1_to_buckets_minus_1(buckets):
    got = {hash_bucket(f"item-{i}", buckets) for i in range(2000)}
    assert got == set(range(1, buckets))  # 0 is reserved for "no value" and never produced


# -- buckets --------------------------------------------------------------------------------------


def test_gap_bucket_boundaries():
    assert gap_bucket(None) == 0  # first event of a user
    assert gap_bucket(0.0) == gap_bucket(-30.0) == 1  # out-of-order events count as no gap
    for i, edge in enumerate(GAP_EDGES_S):
        # an edge is the inclusive upper bound of its bucket
        assert gap_bucket(float(edge)) == 1 + i, edge
        assert gap_bucket(math.nextafter(float(edge), math.inf)) == 2 + i, edge
    assert gap_bucket(1e12) == N_GAP_BUCKETS - 1 == 1 + len(GAP_EDGES_S)


def test_gap_buckets_are_monotone_and_in_range():
    gaps = np.concatenate([[0.0], np.geomspace(0.01, 1e9, 500)])
    b = [gap_bucket(float(g)) for g in gaps]
    assert b == sorted(b) and set(b) == set(range(1, N_GAP_BUCKETS))


@pytest.mark.parametrize(
    ("price", "bucket"),
    [
        (None, 0),
        (math.nan, 0),  # how the columnar log stores "no price"
        (0.0, 1),
        (-5.0, 1),
        (0.99, 1),  # log2(1.99) < 1
        (1.0, 2),  # log2(2) == 1
        (3.0, 3),
        (7.0, 4),
        (1e300, N_PRICE_BUCKETS - 1),
    ],
)
def test_price_bucket(price, bucket):
    assert price_bucket(price) == bucket


def test_price_buckets_are_monotone_and_capped():
    b = [price_bucket(float(p)) for p in np.geomspace(0.001, 1e9, 400)]
    assert b == sorted(b) and min(b) == 1 and max(b) == N_PRICE_BUCKETS - 1


# -- query tokens ---------------------------------------------------------------------------------


def test_query_tokens_lower_case_and_split_on_non_word_characters():
    expected = [hash_bucket(t, 4096) for t in ("red", "running", "shoes", "size_42")]
    for q in ("red running shoes size_42", "RED  Running-Shoes,size_42", "  red/running.shoes!size_42 "):
        assert query_tokens(q, 4096, 8) == expected, q


def test_query_tokens_keep_unicode_words():
    assert query_tokens("Größe 42", 4096, 8) == [hash_bucket("größe", 4096), hash_bucket("42", 4096)]


def test_query_tokens_stop_at_max_tokens_without_padding():
    q = "a b c d e f"
    assert query_tokens(q, 4096, 3) == [hash_bucket(t, 4096) for t in "abc"]
    assert len(query_tokens(q, 4096, 100)) == 6


@pytest.mark.parametrize("q", [None, "", "  ", "--!!"])
def test_empty_queries_have_no_tokens(q):
    assert query_tokens(q, 4096, 8) == []


# -- vocabulary -----------------------------------------------------------------------------------


def test_vocabulary_orders_by_count_then_name_and_caps():
    cats = ["b", "a", "c", "b", "a", None, "d", "b"]
    v = Vocabulary.build(cats)
    assert v.names == [UNKNOWN, "b", "a", "c", "d"]  # a/b by count, c/d tied at 1: by name
    assert Vocabulary.build(cats, max_size=3).names == [UNKNOWN, "b", "a"]
    assert Vocabulary.build(cats, min_count=2).names == [UNKNOWN, "b", "a"]
    assert len(v) == 5


def test_vocabulary_index_and_hashes():
    v = Vocabulary([UNKNOWN, "shoes", "bags"])
    assert [v.index(c) for c in ("shoes", "bags", "hats", None)] == [1, 2, 0, 0]
    assert v.hashes.tolist() == [0, category_hash("shoes"), category_hash("bags")]
    probe = np.array([[category_hash("bags"), -1], [0, category_hash("hats")]])
    assert v.index_of_hashes(probe).tolist() == [[2, 0], [0, 0]]


def test_on_a_hash_collision_the_more_frequent_category_keeps_the_hash():
    a, b = COLLIDING
    assert a != b and category_hash(a) == category_hash(b)
    for first, second in ((a, b), (b, a)):
        v = Vocabulary([UNKNOWN, "x", first, second])
        assert v.index_of_hashes(np.array([category_hash(a)])).tolist() == [2]


def test_a_log_without_categories_gives_a_vocabulary_that_maps_every_hash_to_unknown():
    v = Vocabulary.build([None, None])
    assert v.names == [UNKNOWN] and v.hashes.tolist() == [0]
    assert v.index_of_hashes(np.array([category_hash("shoes"), 0, -1])).tolist() == [0, 0, 0]


@pytest.mark.parametrize("names", [[], ["shoes", UNKNOWN]])
def test_a_vocabulary_must_start_with_the_unknown_category(names):
    with pytest.raises(ValueError, match="unknown category"):
        Vocabulary(names)
