"""model/core/state_batch.py: a batch of state records decodes to what ``unpack`` reads and encodes to what
``pack`` writes, byte for byte; a record it cannot use makes a fresh user and says why."""

from __future__ import annotations

import math

import numpy as np
import pytest

from demandstream.model.core.events import EVENT_TYPES, TYPE_INDEX
from demandstream.model.core.features import category_hash
from demandstream.model.core.state import SUMMARY_FIELDS, UserState, new_state, observe, pack, unpack
from demandstream.model.core.state_batch import StateBatch

LAYERS, HIDDEN, SLOTS = 1, 6, 4
VERSION = "0a1b2c00"  # a trailing zero byte: numpy's fixed-size bytes must not drop it


def _state(seed: int, ntop: int = 3, version: str = VERSION) -> UserState:
    rng = np.random.default_rng(seed)
    s = new_state(LAYERS, HIDDEN, SLOTS)
    s.model_version = version
    s.h = rng.normal(size=s.h.shape).astype(np.float32)
    s.c = rng.normal(size=s.c.shape).astype(np.float32)
    ts = 1.7e9 + seed
    for _ in range(int(rng.integers(0, 12))):
        ts += float(rng.choice([0.5, 30.0, 4000.0]))
        cat = ["shoes", "bags", "hats", "kites", "owls", None][int(rng.integers(6))]
        observe(s, category_hash(cat), TYPE_INDEX[EVENT_TYPES[int(rng.integers(len(EVENT_TYPES)))]], ts)
    s.partition, s.offset = int(rng.integers(0, 8)), int(rng.integers(0, 1 << 40))
    s.last_top = [
        (int(rng.integers(-(1 << 30), 1 << 30)), float(np.float32(rng.random()))) for _ in range(ntop)
    ]
    s.last_propensity = float(np.float32(rng.random())) if ntop else math.nan
    return s


def _same(a: UserState, b: UserState) -> None:
    for f in SUMMARY_FIELDS + ("partition", "offset", "last_top"):
        assert getattr(a, f) == getattr(b, f), f
    for f in ("last_ts", "last_add_ts", "last_propensity"):
        x, y = getattr(a, f), getattr(b, f)
        assert x == y or (math.isnan(x) and math.isnan(y)), f
    assert np.array_equal(a.h, b.h) and np.array_equal(a.c, b.c)


def _decode(raws):
    return StateBatch.decode(raws, LAYERS, HIDDEN, SLOTS, VERSION)


@pytest.mark.parametrize("seed", range(5))
def test_a_batch_decodes_as_unpack_and_encodes_as_pack(seed):
    # top-k sizes differ (0, 3, 5): records of several lengths in one batch
    states = [_state(100 * seed + i, ntop=(0, 3, 5)[i % 3]) for i in range(9)]
    raws = [pack(s) for s in states]
    batch, status = _decode(raws)
    assert status == ["ok"] * len(raws)
    fresh = [new_state(LAYERS, HIDDEN, SLOTS) for _ in states]
    batch.into_states(fresh)
    for got, s, raw in zip(fresh, states, raws, strict=True):
        _same(got, unpack(raw))
        _same(got, s)
    assert batch.encode(list(range(len(raws))), VERSION) == raws
    # any subset, in any order
    assert batch.encode([4, 0, 7], VERSION) == [raws[4], raws[0], raws[7]]


def test_unusable_records_start_fresh_users_and_say_why():
    good = pack(_state(1))
    other = pack(_state(2, version="ffffffff"))
    bad_magic = b"XX" + good[2:]
    short = good[:20]
    wrong_ntop = bytearray(good)
    wrong_ntop[-1:] = b""  # one byte short: no top-k size fits
    wider = pack(new_state(LAYERS, HIDDEN + 2, SLOTS), VERSION)  # another shape under the same version
    raws = [good, None, other, bad_magic, short, bytes(wrong_ntop), wider]
    batch, status = _decode(raws)
    assert status[:3] == ["ok", "absent", "other_version"]
    assert all(s.startswith("undecodable: ") for s in status[3:]), status
    assert "magic" in status[3] and "shorter than its header" in status[4]
    for r in range(1, len(raws)):  # every unusable row is a user never seen
        assert batch.events_seen(r) == 0 and batch.partition[r] == -1 and batch.last_top[r] == []
        assert not batch.h[:, r].any() and batch.summaries.hist[r, 0].tolist() == [-1] * SLOTS
    assert batch.encode([0], VERSION) == [good]


def test_reset_makes_a_row_a_user_never_seen():
    s = _state(3)
    batch, _ = _decode([pack(s), pack(_state(4))])
    batch.reset(0)
    fresh = new_state(LAYERS, HIDDEN, SLOTS)
    fresh.model_version = VERSION
    assert batch.encode([0], VERSION) == [pack(fresh)]
    assert batch.encode([1], VERSION) == [pack(_state(4))]  # the other row untouched


def test_states_round_trip_through_a_batch():
    states = [_state(10 + i) for i in range(4)]
    batch = StateBatch.from_states(states)
    assert batch.encode(list(range(4)), VERSION) == [pack(s) for s in states]
    copies = [new_state(LAYERS, HIDDEN, SLOTS) for _ in states]
    batch.into_states(copies)
    for a, b in zip(copies, states, strict=True):
        _same(a, b)
