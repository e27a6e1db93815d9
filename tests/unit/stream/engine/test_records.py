"""What the worker writes, for any input: state keys outside Faust's keys, bounded dead letters and signals."""

from __future__ import annotations

import base64
import hashlib

import orjson
from faust.stores.rocksdb import Store
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from demandstream.model.core.events import MAX_ID_CHARS
from demandstream.model.core.features import category_hash
from demandstream.model.core.scoring import Prediction
from demandstream.stream.engine.records import (
    CATEGORY_NAME_MAX,
    DLQ_DETAIL_MAX,
    DLQ_KEY_MAX,
    DLQ_RAW_MAX,
    RECORD_MAX,
    dead_letter_key,
    encode_dead_letter,
    encode_signal,
    state_key,
    user_of_state_key,
)

#: Faust's RocksDB store keeps each table partition's changelog offset under this key.
FAUST_OFFSET_KEY = Store.offset_key
#: The longest topic name Kafka allows: a dead letter names its source topic.
LONGEST_TOPIC = "t" * 249
#: Largest dead letter: raw and detail at their caps, a long topic name, the key's hash, the fixed fields.
DLQ_MAX = DLQ_RAW_MAX + DLQ_DETAIL_MAX + len(LONGEST_TOPIC) + 512
PROPERTY = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

#: Bytes that JSON writes 6 times larger (control characters), 2 times (quote, backslash), as is, or
#: that are not UTF-8 at all: blown up to sizes up to a few MB by repetition.
hostile_bytes = st.builds(
    lambda unit, n: unit * n,
    st.sampled_from(
        [b"\x01", b"\x00\x1f", b'"', b"\\", b"a", b"\xc3\xa9", b"\xf0\x9f\x98\x80", b"\xff", b"\x80a"]
    ),
    st.sampled_from([0, 1, 100, 511, 512, 513, 1365, 4095, 4096, 4097, 20_000, 1_048_576]),
)
any_bytes = st.binary(max_size=300) | hostile_bytes


def test_state_keys_never_address_faust_s_own_key():
    """The id that is Faust's offset key gets a key of its own, and no table key can start like Faust's."""
    uid = FAUST_OFFSET_KEY.decode()
    assert state_key(uid) != FAUST_OFFSET_KEY
    assert user_of_state_key(state_key(uid)) == uid
    assert user_of_state_key(FAUST_OFFSET_KEY) is None


@PROPERTY
@given(st.text(max_size=MAX_ID_CHARS))
def test_every_user_id_has_a_key_in_the_namespace_and_back(uid):
    key = state_key(uid)
    assert not key.startswith(b"__faust") and key != FAUST_OFFSET_KEY
    assert user_of_state_key(key) == uid
    assert state_key(uid + "x") != key  # distinct ids, distinct keys (the prefix is fixed)


@PROPERTY
@given(st.none() | any_bytes, st.none() | any_bytes, st.text(max_size=2000))
def test_a_dead_letter_is_bounded_and_keeps_a_prefix_of_its_record(key, raw, detail):
    value = encode_dead_letter("not_json", detail, key, raw, LONGEST_TOPIC, 3, 2**62, 1.7e9)
    out_key = dead_letter_key(key)
    assert len(value) <= DLQ_MAX and len(out_key or b"") <= DLQ_KEY_MAX
    assert len(value) + len(out_key or b"") <= RECORD_MAX
    d = orjson.loads(value)
    payload = raw or b""
    kept = base64.b64decode(d["raw"]) if d["raw_encoding"] == "base64" else d["raw"].encode()
    assert payload.startswith(kept) and d["raw_truncated"] == (len(kept) < len(payload))
    assert len(orjson.dumps(d["raw"])) - 2 <= DLQ_RAW_MAX  # the cap holds as written, escapes included
    assert len(orjson.dumps(d["detail"])) - 2 <= DLQ_DETAIL_MAX and detail.startswith(d["detail"])
    assert d["key_sha256"] == (None if key is None else hashlib.sha256(key).hexdigest())
    assert d["key_truncated"] == (key is not None and len(key) > DLQ_KEY_MAX)
    assert out_key is None or key.startswith(out_key)
    if payload and len(payload) <= DLQ_RAW_MAX // 6:  # short enough to fit whatever its escapes
        assert kept == payload


def test_control_characters_no_longer_blow_a_dead_letter_up():
    """4,096 control bytes took 24,576 bytes escaped: the cap now counts what is written."""
    d = orjson.loads(encode_dead_letter("not_json", "x", b"u1", b"\x01" * 4096, "clickstream", 0, 1, 1.0))
    assert d["raw"] == "\x01" * (DLQ_RAW_MAX // 6) and d["raw_truncated"] is True
    binary = orjson.loads(
        encode_dead_letter("not_utf8", "x", b"u1", b"\xff" * 5000, "clickstream", 0, 1, 1.0)
    )
    assert base64.b64decode(binary["raw"]) == b"\xff" * (DLQ_RAW_MAX // 4 * 3)
    assert len(binary["raw"]) == DLQ_RAW_MAX


def test_keys_at_the_cap_are_kept_whole_and_longer_ones_cut():
    assert dead_letter_key(b"k" * DLQ_KEY_MAX) == b"k" * DLQ_KEY_MAX
    assert dead_letter_key(b"k" * 1_000_000) == b"k" * DLQ_KEY_MAX
    assert dead_letter_key(None) is None
    longest_valid = ("\U0001f600" * MAX_ID_CHARS).encode()  # 128 characters of 4 bytes
    assert dead_letter_key(longest_valid) == longest_valid


@PROPERTY
@given(
    st.lists(
        st.text(max_size=20) | st.builds(lambda c, n: c * n, st.characters(), st.integers(0, 16_384)),
        max_size=5,
    ),
    st.text(max_size=MAX_ID_CHARS),
)
def test_a_signal_names_categories_in_bounded_space(names, uid):
    pred = Prediction([(n, 0.1) for n in names], 0.5, 7)
    sig = orjson.loads(encode_signal(uid, "e" * MAX_ID_CHARS, 1.7e9, "0a1b2c3d", pred, 1.7e9))
    for name, entry in zip(names, sig["top_categories"], strict=True):
        written = entry["category"]
        assert len(orjson.dumps(written)) - 2 <= CATEGORY_NAME_MAX
        assert written == name or written == f"#{category_hash(name):08x}"
    # so a signal of the default top-5 stays far below the output cap whatever the names were
    assert (
        len(encode_signal(uid, "e", 1.7e9, "0a1b2c3d", pred, 1.7e9)) <= 6 * MAX_ID_CHARS * 2 + 5 * 300 + 512
    )
