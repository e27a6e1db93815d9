"""model/core/state.py: the binary record round-trips every field and fits the per-user budget."""

import math

import numpy as np
import pytest

from demandstream.model.core.events import TYPE_INDEX
from demandstream.model.core.features import category_hash
from demandstream.model.core.network import ModelConfig
from demandstream.model.core.state import (
    FORMAT,
    HEADER_BYTES,
    SESSION_GAP_S,
    SLOT_BYTES,
    SLOT_FIELDS,
    StateFormatError,
    UserState,
    new_state,
    observe,
    pack,
    peek_last_ts,
    unpack,
)

#: The per-user state budget of the default model (README, docs/MODEL.md).
STATE_BUDGET_BYTES = 1200


def _fields(s: UserState) -> dict:
    return {name: getattr(s, name) for name in UserState.__slots__}


def _busy_state() -> UserState:
    cfg = ModelConfig()
    s = new_state(cfg.layers, cfg.hidden, cfg.history_slots)
    rng = np.random.default_rng(0)
    s.h = rng.normal(size=s.h.shape).astype(np.float32)
    s.c = rng.normal(size=s.c.shape).astype(np.float32)
    ts = 1.7e9
    for k, (cat, etype) in enumerate(
        [
            ("shoes", "view"),
            ("bags", "add_to_cart"),
            ("shoes", "add_to_cart"),
            ("hats", "view"),
            ("bags", "purchase"),
            ("shoes", "remove_from_cart"),
            ("socks", "add_to_cart"),
        ]
    ):
        ts += 40.0 + 0.25 * k
        observe(s, category_hash(cat), TYPE_INDEX[etype], ts)
    s.partition, s.offset = 3, 123_456_789_012
    s.last_top = [(2, 0.5), (-category_hash("socks"), 0.25), (7, 0.125), (1, 0.0625), (4, 0.03125)]
    s.last_propensity = 0.375
    return s


def test_pack_unpack_round_trips_every_field():
    s = _busy_state()
    assert s.session_adds == 3 and s.cart == 1 and s.purchases == 1 and not math.isnan(s.last_add_ts)
    assert sorted(s.hist_cart, reverse=True)[:2] == [1, 0] and any(s.hist_etype) and len(set(s.hist_ts)) > 2
    t = unpack(pack(s, model_version="0a1b2c3d"))
    a, b = _fields(s), _fields(t)
    for name in ("h", "c"):
        assert np.array_equal(a.pop(name), b.pop(name)), name
    a["model_version"] = "0a1b2c3d"
    assert a == b
    # the new per-slot lists and funnel fields are really stored, not defaulted
    for name in ("hist_ts", "hist_cart", "hist_etype", "session_adds", "last_add_ts", "last_top"):
        assert getattr(t, name) == getattr(s, name) and getattr(t, name) != getattr(
            new_state(1, 96, 16), name
        )


def test_a_new_user_round_trips_with_nan_times():
    s = new_state(1, 8, 4)
    t = unpack(pack(s))
    assert math.isnan(t.last_ts) and math.isnan(t.last_add_ts) and math.isnan(t.last_propensity)
    assert (
        t.hist_cats == [-1] * 4 and t.hist_ts == t.hist_cart == t.hist_etype == [0] * 4 and t.last_top == []
    )


def test_default_model_record_fits_the_budget():
    cfg = ModelConfig()
    s = new_state(cfg.layers, cfg.hidden, cfg.history_slots)
    s.last_top = [(i, 0.1) for i in range(5)]  # the stream keeps the default top 5
    assert len(pack(s)) <= STATE_BUDGET_BYTES
    assert len(pack(s)) == 1153


def test_session_adds_restart_after_a_session_gap():
    s = new_state(1, 4, 3)
    add = TYPE_INDEX["add_to_cart"]
    observe(s, category_hash("a"), add, 0.0)
    observe(s, category_hash("a"), add, 10.0)
    assert s.session_adds == 2 and s.hist_cart[0] == 2
    observe(s, category_hash("b"), TYPE_INDEX["view"], 10.0 + SESSION_GAP_S + 1)
    assert s.session_adds == 0 and s.cart == 2  # the cart outlives the session


def test_a_record_of_another_format_is_refused():
    data = bytearray(pack(new_state(1, 4, 2)))
    data[2] = FORMAT - 1
    with pytest.raises(StateFormatError):
        unpack(bytes(data))
    with pytest.raises(StateFormatError):
        unpack(pack(new_state(1, 4, 2))[:-1])


def test_every_history_list_is_a_stored_slot_field_of_the_documented_size():
    """A per-slot list added to UserState without a place in SLOT_FIELDS would silently not be stored."""
    assert [n for n in UserState.__slots__ if n.startswith("hist_")] == [n for n, _ in SLOT_FIELDS]
    assert (HEADER_BYTES, SLOT_BYTES) == (57, 18)  # the sizes the module docstring and the budget use


def test_peek_last_ts_reads_the_header_field_only():
    s = _busy_state()
    data = pack(s)
    assert peek_last_ts(data) == s.last_ts == unpack(data).last_ts
    assert peek_last_ts(data[:HEADER_BYTES]) == s.last_ts  # the arrays are not needed
    assert math.isnan(peek_last_ts(pack(new_state(1, 4, 2))))
    with pytest.raises(StateFormatError):
        peek_last_ts(data[: HEADER_BYTES - 1])


def test_pack_writes_the_documented_layout_field_by_field():
    """pack passes the header positionally (for speed): the bytes must be the layout that HEADER_FIELDS
    and SLOT_FIELDS document, built here by name, so that records written before stay readable."""
    import struct

    from demandstream.model.core.state import HEADER_FIELDS, MAGIC

    s = _busy_state()
    s.model_version = "0a1b2c3d"
    # every counter different, so that two values passed in each other's place cannot go unseen
    s.cart, s.purchases, s.session_adds, s.streak = 5, 2, 3, 4
    s.last_add_ts = s.last_ts - 1.5
    layers, hidden = s.h.shape
    by_name = {
        "magic": MAGIC,
        "format": FORMAT,
        "flags": 0,
        "model_version": bytes.fromhex(s.model_version),
        "hidden": hidden,
        "layers": layers,
        "slots": len(s.hist_cats),
        "n_top": len(s.last_top),
    }
    header = struct.pack(
        "<" + "".join(code for _, code in HEADER_FIELDS),
        *(by_name[name] if name in by_name else getattr(s, name) for name, _ in HEADER_FIELDS),
    )
    slots = b"".join(
        struct.pack(f"<{len(s.hist_cats)}{code}", *getattr(s, name)) for name, code in SLOT_FIELDS
    )
    top = struct.pack(f"<{len(s.last_top)}i", *(i for i, _ in s.last_top)) + struct.pack(
        f"<{len(s.last_top)}f", *(p for _, p in s.last_top)
    )
    expected = header + s.h.astype("<f4").tobytes() + s.c.astype("<f4").tobytes() + slots + top
    assert pack(s) == expected
