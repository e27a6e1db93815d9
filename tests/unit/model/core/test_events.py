"""Tests of model/core/events.py: parsing and validation of input events (docs/ARCHITECTURE.md §Events)."""

from __future__ import annotations

import inspect
import json
import math
import re

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from demandstream.model.core import events
from demandstream.model.core.events import (
    EVENT_TYPES,
    MAX_EVENT_BYTES,
    MAX_FUTURE_S,
    MAX_ID_CHARS,
    MAX_JSON_DEPTH,
    MAX_QUERY_CHARS,
    MIN_TS,
    REASONS,
    TYPE_ALIASES,
    BadEvent,
    Event,
    event_to_json,
    parse_event,
    parse_ts,
    validate_event,
)

#: A fixed clock, so that "now + 1 day" does not move while the tests run.
NOW = 1_750_000_000.0
DROP = object()  # marks a field to remove from the base event


def raw(**changes: object) -> bytes:
    """A valid view event as JSON bytes, with fields changed (or dropped with DROP)."""
    return orjson.dumps(event_dict(**changes))


def event_dict(**changes: object) -> dict:
    d = {
        "event_id": "e1",
        "user_id": "u1",
        "ts": 1_700_000_000,
        "type": "view",
        "item_id": "i1",
        "category": "electronics.smartphone",
        "price": 199.0,
    }
    for k, v in changes.items():
        if v is DROP:
            d.pop(k, None)
        else:
            d[k] = v
    return d


def padded(size: int) -> bytes:
    """A valid event padded with an extra field to exactly ``size`` bytes."""
    payload = raw(pad="")
    return raw(pad="x" * (size - len(payload)))


def nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


BAD_INPUTS = [
    # payload
    ("not_json_text", b"hello", "not_json"),
    ("truncated_json", raw()[:-7], "not_json"),
    ("empty_payload", b"", "not_json"),
    ("whitespace_payload", b"  \n ", "not_json"),
    ("trailing_garbage", raw() + b" x", "not_json"),
    ("utf8_bom", b"\xef\xbb\xbf" + raw(), "not_json"),
    ("nan_literal_price", raw().replace(b"199.0", b"NaN"), "not_json"),
    ("infinity_literal_price", raw().replace(b"199.0", b"Infinity"), "not_json"),
    # A NaN literal is refused even where a number overflows, i.e. on the stdlib fallback path.
    ("nan_literal_with_overflow", raw().replace(b"199.0", b"1e400").replace(b'"i1"', b"NaN"), "not_json"),
    ("escaped_lone_surrogate", raw(user_id=DROP).replace(b"{", b'{"user_id":"\\ud800",', 1), "not_json"),
    ("list", b"[1, 2]", "not_object"),
    ("string", b'"view"', "not_object"),
    ("number", b"42", "not_object"),
    ("null", b"null", "not_object"),
    ("invalid_utf8", raw(user_id="u1").replace(b"u1", b"u\xff"), "not_utf8"),
    ("utf16_with_bom", json.dumps(event_dict()).encode("utf-16"), "not_utf8"),
    ("utf16_le_no_bom", json.dumps(event_dict()).encode("utf-16-le"), "not_json"),
    ("one_mib", raw(query="x" * (1 << 20)), "too_large"),
    ("one_byte_over_limit", padded(MAX_EVENT_BYTES + 1), "too_large"),
    ("nested_100k_deep_is_too_large_first", nested(100_000), "too_large"),
    ("nested_5k_deep_list", nested(5_000), "too_deep"),
    ("nested_2k_deep_objects", b'{"a":' * 2_000 + b"1" + b"}" * 2_000, "too_deep"),
    ("deep_inside_field", raw().replace(b"}", b',"extra":' + nested(MAX_JSON_DEPTH) + b"}"), "too_deep"),
    # required fields
    ("missing_event_id", raw(event_id=DROP), "missing_field"),
    ("null_user_id", raw(user_id=None), "missing_field"),
    ("missing_ts", raw(ts=DROP), "missing_field"),
    ("missing_type", raw(type=DROP), "missing_field"),
    ("empty_user_id", raw(user_id=""), "bad_id"),
    ("user_id_129_chars", raw(user_id="u" * (MAX_ID_CHARS + 1)), "bad_id"),
    ("event_id_129_chars", raw(event_id="e" * (MAX_ID_CHARS + 1)), "bad_id"),
    ("user_id_float", raw(user_id=42.0), "bad_field_type"),
    ("user_id_bool", raw(user_id=True), "bad_field_type"),
    ("event_id_huge_integer", raw(event_id="E").replace(b'"E"', b"9" * 200), "bad_field_type"),
    ("event_id_list", raw(event_id=["e1"]), "bad_field_type"),
    # type
    ("unknown_type", raw(type="click"), "bad_type"),
    ("type_number", raw(type=3), "bad_field_type"),
    ("type_empty", raw(type=""), "bad_type"),
    # price
    ("price_overflows_to_inf", raw().replace(b"199.0", b"1e400"), "bad_price"),
    ("price_integer_overflow", raw().replace(b"199.0", b"1" + b"0" * 400), "bad_price"),
    ("price_5000_digit_integer", raw().replace(b"199.0", b"9" * 5_000), "bad_price"),
    ("price_negative", raw(price=-0.01), "bad_price"),
    ("price_string", raw(price="9.99"), "bad_field_type"),
    ("price_bool", raw(price=True), "bad_field_type"),
    # ts
    ("ts_1970", raw(ts=0), "bad_ts"),
    ("ts_just_before_2000", raw(ts=MIN_TS - 1), "bad_ts"),
    ("ts_iso_1999", raw(ts="1999-12-31T23:59:59Z"), "bad_ts"),
    ("ts_far_future", raw(ts=NOW + MAX_FUTURE_S + 1), "bad_ts"),
    ("ts_unix_millis_not_guessed", raw(ts=1_700_000_000_000), "bad_ts"),
    ("ts_nan_string", raw(ts="NaN"), "bad_ts"),
    ("ts_numeric_string", raw(ts="1700000000"), "bad_ts"),
    ("ts_unparseable", raw(ts="yesterday at noon"), "bad_ts"),
    ("ts_month_13", raw(ts="2024-13-01"), "bad_ts"),
    ("ts_overflows_to_inf", raw(ts=DROP).replace(b"{", b'{"ts":1e999,', 1), "bad_ts"),
    ("ts_year_1_with_offset", raw(ts="0001-01-01T00:00:00+01:00"), "bad_ts"),
    ("ts_bool", raw(ts=True), "bad_field_type"),
    ("ts_object", raw(ts={"s": 1}), "bad_field_type"),
    # search / query
    ("search_without_query", raw(type="search", item_id=DROP), "missing_query"),
    ("search_empty_query", raw(type="search", query=""), "missing_query"),
    ("search_blank_query", raw(type="search", query="   "), "missing_query"),
    ("query_513_chars", raw(type="search", query="q" * (MAX_QUERY_CHARS + 1)), "bad_query"),
    ("query_number", raw(type="search", query=7), "bad_field_type"),
    # item / category / session
    ("view_without_item", raw(item_id=DROP), "missing_item"),
    ("view_null_item", raw(item_id=None), "missing_item"),
    ("purchase_empty_item", raw(type="purchase", item_id=""), "missing_item"),
    ("item_id_float", raw(item_id=12.0), "bad_field_type"),
    ("item_id_bool", raw(item_id=False), "bad_field_type"),
    ("item_id_129_chars", raw(item_id="i" * (MAX_ID_CHARS + 1)), "bad_id"),
    ("category_list", raw(category=["a"]), "bad_field_type"),
    ("category_float", raw(category=1.5), "bad_field_type"),
    ("session_id_number", raw(session_id=5), "bad_field_type"),
]


@pytest.mark.parametrize(("payload", "reason"), [c[1:] for c in BAD_INPUTS], ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_has_exact_reason(payload: bytes, reason: str) -> None:
    with pytest.raises(BadEvent) as info:
        parse_event(payload, now=NOW)
    assert info.value.reason == reason, info.value.detail
    assert reason in REASONS
    # Details go into every dead letter: short, whatever the size of the input.
    assert len(info.value.detail) < 300


def test_bad_table_covers_every_payload_and_field_reason() -> None:
    transport = {"missing_key", "key_mismatch", "bad_control"}
    assert {c[2] for c in BAD_INPUTS} == set(REASONS) - transport


def test_every_reason_raised_in_the_module_is_documented() -> None:
    raised = set(re.findall(r'BadEvent\(\s*"(\w+)"', inspect.getsource(events)))
    assert raised <= set(REASONS)
    assert {"missing_key", "key_mismatch"} <= set(REASONS)
    assert all(isinstance(d, str) and d and "\n" not in d for d in REASONS.values())


def test_str_input_with_lone_surrogate_is_not_utf8() -> None:
    text = raw().decode().replace("u1", "u\ud800")
    with pytest.raises(BadEvent) as info:
        parse_event(text, now=NOW)
    assert info.value.reason == "not_utf8"


def test_oversized_str_is_too_large() -> None:
    with pytest.raises(BadEvent, match="too_large"):
        parse_event("x" * (MAX_EVENT_BYTES + 1), now=NOW)
    with pytest.raises(BadEvent, match="too_large"):  # few chars, but more bytes in UTF-8
        parse_event(raw(query="😀" * (MAX_EVENT_BYTES // 4)).decode(), now=NOW)


def test_null_record_value_is_not_json() -> None:
    with pytest.raises(BadEvent) as info:
        parse_event(None, now=NOW)  # type: ignore[arg-type]
    assert info.value.reason == "not_json"


def test_non_payload_type_is_a_programming_error() -> None:
    with pytest.raises(TypeError):
        parse_event(12, now=NOW)  # type: ignore[arg-type]


def test_depth_limit_is_inclusive() -> None:
    inside = raw().replace(b"}", b',"extra":' + nested(MAX_JSON_DEPTH - 1) + b"}")
    assert parse_event(inside, now=NOW).event_id == "e1"
    with pytest.raises(BadEvent, match="too_deep"):
        parse_event(raw().replace(b"}", b',"extra":' + nested(MAX_JSON_DEPTH) + b"}"), now=NOW)


def test_brackets_inside_strings_do_not_count_as_nesting() -> None:
    query = '[[[{{{ "\\" [[[[[[[[[[[[[[[[[[[[[[[[[[[[[[['
    e = parse_event(raw(type="search", query=query), now=NOW)
    assert e.query == query


def test_payload_of_exactly_max_bytes_is_accepted() -> None:
    payload = padded(MAX_EVENT_BYTES)
    assert len(payload) == MAX_EVENT_BYTES
    assert parse_event(payload, now=NOW).user_id == "u1"


# -- good inputs ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "canonical"), sorted(TYPE_ALIASES.items()), ids=sorted(TYPE_ALIASES))
def test_type_alias(name: str, canonical: str) -> None:
    assert parse_event(raw(type=name), now=NOW).type == canonical
    assert parse_event(raw(type=name.upper()), now=NOW).type == canonical


@pytest.mark.parametrize("name", EVENT_TYPES)
def test_canonical_types_any_case(name: str) -> None:
    for spelled in (name, name.upper(), name.title()):
        e = parse_event(raw(type=spelled, query="tv"), now=NOW)
        assert e.type == name
        assert e.type_index == EVENT_TYPES.index(name)


GOOD_TS = [
    ("integer", 1_700_000_000, 1_700_000_000.0),
    ("float", 1_700_000_000.25, 1_700_000_000.25),
    ("iso_z", "2024-05-01T12:00:00Z", 1_714_564_800.0),
    ("iso_offset", "2024-05-01T14:00:00+02:00", 1_714_564_800.0),
    ("iso_fraction", "2024-05-01T12:00:00.5Z", 1_714_564_800.5),
    ("iso_naive_is_utc", "2024-05-01T12:00:00", 1_714_564_800.0),
    ("iso_space_separator", "2024-05-01 12:00:00", 1_714_564_800.0),
    ("date_only", "2024-05-01", 1_714_521_600.0),
    ("lower_bound", MIN_TS, MIN_TS),
    ("iso_lower_bound", "2000-01-01T00:00:00Z", MIN_TS),
    ("upper_bound", NOW + MAX_FUTURE_S, NOW + MAX_FUTURE_S),
]


@pytest.mark.parametrize(("ts", "seconds"), [c[1:] for c in GOOD_TS], ids=[c[0] for c in GOOD_TS])
def test_good_ts(ts: object, seconds: float) -> None:
    e = parse_event(raw(ts=ts), now=NOW)
    assert e.ts == seconds
    assert type(e.ts) is float


def test_full_event_normalized() -> None:
    e = parse_event(raw(session_id="s1", query="ignored?"), now=NOW)
    assert e == Event(
        "e1", "u1", 1_700_000_000.0, "view", "i1", "electronics.smartphone", 199.0, "ignored?", "s1"
    )


def test_integer_item_and_category_become_decimal_strings() -> None:
    e = parse_event(raw(item_id=1_004_856, category=2_053_013_555_631_882_655), now=NOW)
    assert (e.item_id, e.category) == ("1004856", "2053013555631882655")


def test_null_and_absent_optionals() -> None:
    e = parse_event(raw(price=None, category=DROP), now=NOW)
    assert (e.price, e.category, e.query, e.session_id) == (None, None, None, None)


def test_empty_optional_strings_mean_null() -> None:
    e = parse_event(raw(category="", session_id="", query=""), now=NOW)
    assert (e.category, e.session_id, e.query) == (None, None, None)


def test_integer_and_zero_price() -> None:
    assert parse_event(raw(price=5), now=NOW).price == 5.0
    assert type(parse_event(raw(price=5), now=NOW).price) is float
    assert parse_event(raw(price=0), now=NOW).price == 0.0


def test_extra_fields_ignored() -> None:
    e = parse_event(raw(referrer="ads", context={"device": {"os": "ios"}}, tags=[1, 2]), now=NOW)
    assert e == parse_event(raw(), now=NOW)


def test_search_without_item() -> None:
    e = parse_event(raw(type="search", item_id=DROP, category=DROP, price=DROP, query="red shoes"), now=NOW)
    assert (e.type, e.item_id, e.query) == ("search", None, "red shoes")


def test_search_keeps_an_item_when_given() -> None:
    assert parse_event(raw(type="search", query="tv"), now=NOW).item_id == "i1"


def test_limits_are_inclusive() -> None:
    e = parse_event(raw(user_id="u" * MAX_ID_CHARS, type="search", query="q" * MAX_QUERY_CHARS), now=NOW)
    assert len(e.user_id) == MAX_ID_CHARS and len(e.query) == MAX_QUERY_CHARS


@pytest.mark.parametrize("user_id", ["ユーザー42", "пользователь", "😀", "ü" * MAX_ID_CHARS])
def test_unicode_user_ids(user_id: str) -> None:
    assert parse_event(raw(user_id=user_id), now=NOW).user_id == user_id


def test_bytes_like_and_str_payloads() -> None:
    expected = parse_event(raw(), now=NOW)
    assert parse_event(bytearray(raw()), now=NOW) == expected
    assert parse_event(memoryview(raw()), now=NOW) == expected
    assert parse_event(raw().decode(), now=NOW) == expected


def test_now_defaults_to_the_clock() -> None:
    # 1.7e9 (Nov 2023) is in the past for the real clock, and a year 2999 ts never is.
    assert parse_event(raw()).ts == 1_700_000_000.0
    with pytest.raises(BadEvent, match="bad_ts"):
        parse_event(raw(ts="2999-01-01"))


def test_overflowing_price_detected_with_other_fields_intact() -> None:
    # The stdlib fallback must keep normal integers as integers (item_id) while price overflows.
    payload = raw(item_id=42).replace(b"199.0", b"1e400")
    with pytest.raises(BadEvent) as info:
        parse_event(payload, now=NOW)
    assert info.value.reason == "bad_price"


# -- validate_event, parse_ts, event_to_json ------------------------------------------------------


@pytest.mark.parametrize("obj", [None, [], "e", 3, 2.5, True, ("a", 1)], ids=repr)
def test_validate_event_non_dict_is_not_object(obj: object) -> None:
    with pytest.raises(BadEvent) as info:
        validate_event(obj, now=NOW)
    assert info.value.reason == "not_object"


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"ts": math.nan}, "bad_ts"),
        ({"ts": math.inf}, "bad_ts"),
        ({"ts": 10**400}, "bad_ts"),
        ({"price": math.nan}, "bad_price"),
        ({"price": -math.inf}, "bad_price"),
        ({"price": 10**400}, "bad_price"),
        ({"item_id": 10**5000}, "bad_id"),
        ({"category": 10**5000}, "bad_id"),
        ({"item_id": 10**MAX_ID_CHARS}, "bad_id"),  # 129 digits
    ],
    ids=[
        "ts_nan",
        "ts_inf",
        "ts_huge_int",
        "price_nan",
        "price_minus_inf",
        "price_huge_int",
        "item_5000_digits",
        "category_5000_digits",
        "item_129_digits",
    ],
)
def test_validate_event_python_values(changes: dict, reason: str) -> None:
    with pytest.raises(BadEvent) as info:
        validate_event(event_dict(**changes), now=NOW)
    assert info.value.reason == reason


def test_validate_event_matches_parse_event() -> None:
    d = event_dict(type="Cart", ts="2024-05-01", item_id=7, session_id="s")
    assert validate_event(d, now=NOW) == parse_event(orjson.dumps(d), now=NOW)


def test_parse_ts() -> None:
    assert parse_ts("2024-05-01T12:00:00Z", now=NOW) == 1_714_564_800.0
    for value, reason in [
        (None, "missing_field"),
        (False, "bad_field_type"),
        ("x", "bad_ts"),
        (1.0, "bad_ts"),
    ]:
        with pytest.raises(BadEvent) as info:
            parse_ts(value, now=NOW)
        assert info.value.reason == reason


def test_event_to_json_matches_schema_and_round_trips() -> None:
    e = Event("e1", "ü", 1_700_000_000.123456, "search", None, "a.b", 0.1, 'q "x"', "s1")
    data = event_to_json(e)
    assert isinstance(data, bytes)
    assert orjson.loads(data) == e.to_dict()
    assert parse_event(data, now=NOW) == e


def test_bad_event_carries_reason_and_detail() -> None:
    with pytest.raises(BadEvent) as info:
        parse_event(raw(user_id="x" * 5_000), now=NOW)
    bad = info.value
    assert (bad.reason, str(bad)) == ("bad_id", f"bad_id: {bad.detail}")
    assert isinstance(bad, ValueError)


def test_detail_quotes_long_values_truncated() -> None:
    with pytest.raises(BadEvent) as info:
        parse_event(raw(type="z" * 1_000), now=NOW)
    assert info.value.reason == "bad_type"
    assert "zzz" in info.value.detail and len(info.value.detail) < 100


# -- properties -----------------------------------------------------------------------------------

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=40)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)
field_values = (
    json_values
    | st.sampled_from([*EVENT_TYPES, *TYPE_ALIASES, "2024-05-01", "2024-05-01T10:00:00+02:00", "", "x" * 600])
    | st.floats(min_value=0, max_value=2e9)
)
EVENT_FIELDS = ("event_id", "user_id", "ts", "type", "item_id", "category", "price", "query", "session_id")


@st.composite
def event_like(draw: st.DrawFn) -> dict:
    """A valid event with up to three fields replaced by arbitrary values or removed."""
    d = event_dict(session_id="s1", query="tv")
    for k in draw(st.sets(st.sampled_from(EVENT_FIELDS), max_size=3)):
        value = draw(field_values | st.just(DROP))
        if value is DROP:
            del d[k]
        else:
            d[k] = value
    return d


PROPERTY = settings(max_examples=300, deadline=None)


def parses_or_rejects(payload: object) -> None:
    """The stream's contract: an Event, or a BadEvent with a documented reason, nothing else."""
    try:
        e = parse_event(payload, now=NOW)  # type: ignore[arg-type]
    except BadEvent as bad:
        assert bad.reason in REASONS
    else:
        assert isinstance(e, Event) and e.type in EVENT_TYPES
        assert MIN_TS <= e.ts <= NOW + MAX_FUTURE_S
        assert parse_event(event_to_json(e), now=NOW) == e  # a valid event survives re-encoding


@PROPERTY
@given(st.binary(max_size=2_000))
def test_property_arbitrary_bytes(payload: bytes) -> None:
    parses_or_rejects(payload)


@PROPERTY
@given(st.text(max_size=500))
def test_property_arbitrary_text(payload: str) -> None:
    parses_or_rejects(payload)


@PROPERTY
@given(json_values)
def test_property_arbitrary_json(value: object) -> None:
    parses_or_rejects(orjson.dumps(value))


@PROPERTY
@given(event_like())
def test_property_event_like_objects(obj: dict) -> None:
    parses_or_rejects(orjson.dumps(obj))
    try:
        direct = validate_event(obj, now=NOW)
    except BadEvent as bad:
        assert bad.reason in REASONS
    else:
        assert direct == parse_event(orjson.dumps(obj), now=NOW)


# -- Confluent Schema Registry's wire format --------------------------------------------------------

REGISTRY_EVENT = b'{"event_id":"e1","user_id":"u1","ts":1714564800,"type":"view","item_id":"i1"}'


def registry_framed(body: bytes, schema_id: int = 42) -> bytes:
    """A value as the Schema Registry serializers frame it: magic byte 0, schema id, payload."""
    return b"\x00" + schema_id.to_bytes(4, "big") + body


def test_a_json_schema_serializers_value_is_read_after_its_registry_header():
    assert parse_event(registry_framed(REGISTRY_EVENT), now=2e9) == parse_event(REGISTRY_EVENT, now=2e9)
    # the header is skipped once; the payload after it is checked as any other
    with pytest.raises(BadEvent) as e:
        parse_event(registry_framed(b'{"event_id":"e1"}'), now=2e9)
    assert e.value.reason == "missing_field"


@pytest.mark.parametrize(
    "value",
    [
        registry_framed(b"\x02\x04u1\x02\x04i1"),  # Avro's binary encoding
        registry_framed(b"\x00\x0a\x02u1"),  # Protobuf: message indexes, then the message
        registry_framed(b""),
    ],
)
def test_other_registry_payloads_are_not_json_naming_the_schema_and_the_fix(value):
    with pytest.raises(BadEvent) as e:
        parse_event(value, now=2e9)
    assert e.value.reason == "not_json"
    assert "Schema Registry payload (schema id 42)" in str(e.value) and "JSON Schema value serializer" in str(
        e.value
    )


def test_a_lone_zero_byte_or_a_short_header_is_plain_bad_input():
    for value in (b"\x00", b"\x00\x00\x00"):
        with pytest.raises(BadEvent) as e:
            parse_event(value, now=2e9)
        assert e.value.reason == "not_json" and "Schema Registry" not in str(e.value)


@pytest.mark.parametrize(
    ("ts", "unit"),
    [
        (1714564800_000, "milliseconds"),
        (1714564800_000_000, "microseconds"),
        (1714564800_000_000_000, "nanoseconds"),
    ],
)
def test_a_ts_in_another_unit_is_refused_and_the_dead_letter_names_the_unit(ts, unit):
    raw = orjson.dumps({"event_id": "e1", "user_id": "u1", "ts": ts, "type": "view", "item_id": "i1"})
    with pytest.raises(BadEvent) as e:
        parse_event(raw, now=2e9)
    assert e.value.reason == "bad_ts" and f"(unix {unit}? ts is in seconds)" in str(e.value)
    # seconds out of range name no unit
    with pytest.raises(BadEvent) as e:
        parse_event(raw.replace(str(ts).encode(), b"946684000"), now=2e9)
    assert "unix" not in str(e.value)


def test_integer_user_and_event_ids_are_their_decimal_strings():
    e = parse_event(raw(user_id=1234567, event_id=-9), now=2e9)
    assert (e.user_id, e.event_id) == ("1234567", "-9")
    assert parse_event(raw(user_id="1234567", event_id="-9"), now=2e9) == e
