"""The input event of docs/ARCHITECTURE.md §Events: its schema, parsing and validation.

Every event that enters demandstream, from Kafka or from a file, becomes an :class:`Event`
through :func:`parse_event` (raw bytes) or :func:`validate_event` (an already decoded object).
Anything else raises :class:`BadEvent` carrying a reason code from :data:`REASONS`; the stream
turns that into a dead letter with the same code.

>>> e = parse_event(b'{"event_id": "e1", "user_id": "u1", "ts": 1700000000, "type": "pv", "item_id": "i9"}')
>>> (e.type, e.item_id, e.category)
('view', 'i9', None)
>>> try:
...     parse_event(b'{"event_id": "e1", "user_id": "u1", "ts": 1700000000, "type": "view"}')
... except BadEvent as bad:
...     print(bad.reason)
missing_item

Checks run in a fixed order, so an input with several faults always gets the same reason:
the payload (size, encoding, nesting depth, JSON syntax, top-level object), then each field in
the order of the table in docs/ARCHITECTURE.md §Events, then the rules that tie fields to the type (item or
query required).
"""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from itertools import accumulate

import orjson

#: Event types of docs/ARCHITECTURE.md §Events, in the order used for their integer index everywhere.
EVENT_TYPES: tuple[str, ...] = ("view", "search", "add_to_cart", "remove_from_cart", "favorite", "purchase")
TYPE_INDEX: dict[str, int] = {t: i for i, t in enumerate(EVENT_TYPES)}

#: Names used by public clickstream logs (REES46, RetailRocket, Taobao) for our event types.
#: Matching is case-insensitive, for these and for the canonical names.
TYPE_ALIASES: dict[str, str] = {
    "cart": "add_to_cart",
    "addtocart": "add_to_cart",
    "transaction": "purchase",
    "buy": "purchase",
    "pv": "view",
    "fav": "favorite",
}

#: Reason codes of bad input, code -> one-line description (dead letters, metrics, docs).
REASONS: dict[str, str] = {
    "too_large": "payload is larger than MAX_EVENT_BYTES (16 KiB)",
    "not_utf8": "payload is not valid UTF-8",
    "not_json": "payload is empty or not valid JSON (NaN/Infinity literals included)",
    "too_deep": "JSON nests arrays/objects deeper than MAX_JSON_DEPTH",
    "not_object": "JSON value is not an object",
    "missing_field": "a required field (event_id, user_id, ts, type) is absent or null",
    "bad_field_type": "a field has the wrong JSON type (e.g. user_id a number, price a string, ts a bool)",
    "bad_id": "an id (event_id, user_id, item_id, session_id, integer category) is empty or too long",
    "bad_type": "type is not a known event type or alias",
    "bad_ts": "ts is not finite, not parseable as ISO-8601, or outside [2000-01-01, now + 1 day]",
    "bad_price": "price is negative, NaN or infinite",
    "bad_query": "query is longer than MAX_QUERY_CHARS",
    "missing_item": "item_id is absent, null or empty for a type other than search",
    "missing_query": "search event without a non-empty query",
    # Transport reasons: raised by the stream, which sees the Kafka record around the payload.
    "missing_key": "Kafka record has no key",
    "key_mismatch": "record key differs from user_id",
    "bad_control": "control-topic record that is not an erasure request of its key's user",
}

#: Largest accepted payload (docs/ARCHITECTURE.md §Events); checked first, so nothing bigger is ever decoded.
MAX_EVENT_BYTES = 16 * 1024
#: Longest event_id / user_id / item_id / session_id, in characters (docs/ARCHITECTURE.md §Events).
MAX_ID_CHARS = 128
#: Longest search query, in characters (docs/ARCHITECTURE.md §Events).
MAX_QUERY_CHARS = 512
#: Deepest nesting of arrays/objects accepted anywhere in the payload (the event object itself is
#: depth 1). An event is flat; this leaves room for nested extra fields while keeping any recursive
#: decoder far from its stack limit.
MAX_JSON_DEPTH = 16
#: Earliest accepted ts: 2000-01-01T00:00:00Z in unix seconds. Anything older is a unit or clock bug.
MIN_TS = 946_684_800.0
#: How far in the future a ts may lie, in seconds (one day), to tolerate skewed client clocks.
MAX_FUTURE_S = 86_400.0
#: Above this many digits an integer is read as a float (so a huge price overflows to inf and is
#: bad_price), staying under Python's int-string conversion limit (4300 digits by default).
_MAX_INT_DIGITS = 4000
#: How much of an offending value a BadEvent detail quotes; details go into every dead letter.
_DETAIL_CHARS = 64

_SEARCH = "search"
#: Canonical names and aliases, lower case, to canonical names.
_TYPE_NAMES: dict[str, str] = {t: t for t in EVENT_TYPES} | TYPE_ALIASES
#: A complete JSON string literal; brackets inside strings do not nest anything.
_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
#: Depth change per byte, for the bracket-only bytes that remain after stripping strings.
_DEPTH_STEP = [0] * 256
_DEPTH_STEP[ord("[")] = _DEPTH_STEP[ord("{")] = 1
_DEPTH_STEP[ord("]")] = _DEPTH_STEP[ord("}")] = -1


class BadEvent(ValueError):
    """An input that is not a valid event. ``reason`` is a code from :data:`REASONS`."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


# Not frozen: a frozen dataclass's __init__ sets each of the nine fields through object.__setattr__,
# 1.0 µs against 0.2 µs, and the worker builds one Event per record (parse_event 3.4 -> 2.5 µs). Events
# are still values: nothing assigns to one, and they hash and compare by their fields as before.
@dataclass(slots=True, unsafe_hash=True)
class Event:
    """One valid clickstream event, normalized (type names mapped, ts in unix seconds)."""

    event_id: str
    user_id: str
    ts: float
    type: str
    item_id: str | None = None
    category: str | None = None
    price: float | None = None
    query: str | None = None
    session_id: str | None = None

    @property
    def type_index(self) -> int:
        return TYPE_INDEX[self.type]

    def to_dict(self) -> dict:
        """The event as a JSON-ready dict in the schema of docs/ARCHITECTURE.md §Events."""
        return {
            "event_id": self.event_id,
            "user_id": self.user_id,
            "ts": self.ts,
            "type": self.type,
            "item_id": self.item_id,
            "category": self.category,
            "price": self.price,
            "query": self.query,
            "session_id": self.session_id,
        }


# -- public API -----------------------------------------------------------------------------------


def parse_event(raw: bytes | str, *, now: float | None = None) -> Event:
    """Parse one raw Kafka value (UTF-8 JSON) into a validated :class:`Event`.

    Parameters
    ----------
    raw
        The record value: bytes (``bytearray``/``memoryview`` too) or an already decoded str.
        ``None`` (a Kafka record without a value) is rejected as ``not_json``.
    now
        Unix seconds that bound ``ts`` from above (plus one day); ``time.time()`` when None.

    Returns
    -------
    Event

    Raises
    ------
    BadEvent
        With a ``reason`` from :data:`REASONS`; never any other exception for any bytes or str
        (a payload of another type is a programming error and raises ``TypeError``).

    Examples
    --------
    >>> parse_event('{"event_id":"e1","user_id":"u1","ts":"2024-05-01T12:00:00Z","type":"search","query":"tv"}')
    Event(event_id='e1', user_id='u1', ts=1714564800.0, type='search', item_id=None, category=None, price=None, query='tv', session_id=None)
    >>> parse_event(b'[1, 2]')
    Traceback (most recent call last):
    ...
    demandstream.model.core.events.BadEvent: not_object: expected a JSON object, got array
    """
    if isinstance(raw, str):
        if len(raw) > MAX_EVENT_BYTES:  # never shorter in UTF-8: refuse before copying it
            raise BadEvent("too_large", f"{len(raw)} chars > {MAX_EVENT_BYTES} bytes")
        try:
            data = raw.encode()
        except UnicodeEncodeError as exc:  # lone surrogates: the str never was UTF-8
            raise BadEvent("not_utf8", str(exc)) from None
    elif isinstance(raw, bytes):
        data = raw
    elif isinstance(raw, bytearray | memoryview):
        data = bytes(raw)
    elif raw is None:
        raise BadEvent("not_json", "empty payload (record value is null)")
    else:
        raise TypeError(f"parse_event expects bytes or str, got {type(raw).__name__}")

    if len(data) > MAX_EVENT_BYTES:
        raise BadEvent("too_large", f"{len(data)} bytes > {MAX_EVENT_BYTES}")
    # Fast path: with no more opening brackets than the limit, the depth cannot exceed it.
    if data.count(b"[") + data.count(b"{") > MAX_JSON_DEPTH:
        depth = _json_depth(data)
        if depth > MAX_JSON_DEPTH:
            raise BadEvent("too_deep", f"nesting depth {depth} > {MAX_JSON_DEPTH}")
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        obj = _decode_slow(data, exc)
    return validate_event(obj, now=now)


def validate_event(obj: object, *, now: float | None = None) -> Event:
    """Validate an already decoded JSON value (a dict) into a normalized :class:`Event`.

    Loaders that decode whole files use this directly. Accepted variants: ``ts`` as unix
    seconds (int or float) or an ISO-8601 string (``Z``, an offset, naive = UTC, date only);
    ``type`` in any case or as a public alias (:data:`TYPE_ALIASES`); ``event_id``, ``user_id``,
    ``item_id`` and ``category`` as integers (turned into their decimal strings); empty ``item_id``,
    ``category``, ``query`` and ``session_id`` strings mean null. Unknown fields are ignored.

    Parameters
    ----------
    obj
        The decoded value; anything but a dict is ``not_object``.
    now
        Unix seconds that bound ``ts`` from above (plus one day); ``time.time()`` when None.

    Raises
    ------
    BadEvent
        With a ``reason`` from :data:`REASONS`.

    Examples
    --------
    >>> e = validate_event({"event_id": "e7", "user_id": "u1", "ts": "2024-05-01", "type": "Cart",
    ...                     "item_id": 1234, "category": 2053013555631882655, "price": 9})
    >>> (e.ts, e.type, e.item_id, e.category, e.price)
    (1714521600.0, 'add_to_cart', '1234', '2053013555631882655', 9.0)
    """
    if not isinstance(obj, dict):
        raise BadEvent("not_object", f"expected a JSON object, got {_json_type(obj)}")
    get = obj.get
    event_id = _required_id(get("event_id"), "event_id")
    user_id = _required_id(get("user_id"), "user_id")
    ts = _ts_field(get("ts"), time.time() if now is None else now)

    etype = get("type")
    if etype is None:
        raise BadEvent("missing_field", "type is missing or null")
    if not isinstance(etype, str):
        raise BadEvent("bad_field_type", f"type must be a string, got {_json_type(etype)}")
    canonical = _TYPE_NAMES.get(etype) or _TYPE_NAMES.get(etype.lower())
    if canonical is None:
        raise BadEvent("bad_type", f"unknown event type {_show(etype)}")

    item_id = _optional_id(get("item_id"), "item_id", allow_int=True)
    category = _category(get("category"))
    price = _price(get("price"))

    query = get("query")
    if query is not None:
        if not isinstance(query, str):
            raise BadEvent("bad_field_type", f"query must be a string or null, got {_json_type(query)}")
        if len(query) > MAX_QUERY_CHARS:
            raise BadEvent("bad_query", f"query has {len(query)} chars > {MAX_QUERY_CHARS}")
        if not query:
            query = None
    session_id = _optional_id(get("session_id"), "session_id", allow_int=False)

    if canonical == _SEARCH:
        if query is None or not query.strip():
            raise BadEvent("missing_query", "search event needs a non-empty query")
    elif item_id is None:
        raise BadEvent("missing_item", f"{canonical} event needs an item_id")
    return Event(event_id, user_id, ts, canonical, item_id, category, price, query, session_id)


def parse_ts(value: object, *, now: float | None = None) -> float:
    """A timestamp as unix seconds: a number, or an ISO-8601 string (naive = UTC, date only ok).

    Raises ``BadEvent("bad_ts")`` outside [2000-01-01, now + 1 day] or when not finite, and
    ``BadEvent("bad_field_type")`` for a bool or any non-number, non-string value. Unix
    milliseconds are not guessed: they land far in the future and are rejected.

    >>> parse_ts("2024-05-01T14:00:00+02:00"), parse_ts(1714564800)
    (1714564800.0, 1714564800.0)
    """
    return _ts_field(value, time.time() if now is None else now)


def iso_seconds(text: str, *, naive_is_utc: bool = True, utc_word: bool = False) -> float:
    """Unix seconds of an ISO-8601 date or date-time: the one time parser of events, loaders and options.

    A time without a zone is UTC, as the event contract says (docs/ARCHITECTURE.md §Events), never the
    machine's local zone; with ``naive_is_utc=False`` it is refused as ambiguous instead. With
    ``utc_word``, the REES46 spelling ``2019-10-01 00:00:00 UTC`` is read too. Raises ``ValueError``
    for anything else, a time pushed out of range by its offset included.

    >>> iso_seconds("2019-10-01"), iso_seconds("2019-10-01T02:00:00+02:00"), iso_seconds("2019-10-01T00:00Z")
    (1569888000.0, 1569888000.0, 1569888000.0)
    >>> iso_seconds("2019-10-01 00:00:00 UTC", utc_word=True)
    1569888000.0
    >>> iso_seconds("2019-10-01 00:00:00", naive_is_utc=False)
    Traceback (most recent call last):
    ...
    ValueError: time '2019-10-01 00:00:00' has no time zone
    """
    if utc_word and text.endswith(" UTC"):
        text = text[:-4] + "+00:00"
    try:
        dt = datetime.fromisoformat(text)
        if dt.tzinfo is None:
            if not naive_is_utc:
                raise ValueError(f"time {text!r} has no time zone")
            dt = dt.replace(tzinfo=UTC)
        return dt.timestamp()
    except OverflowError:  # year 1 or 9999 shifted out of range by an offset
        raise ValueError(f"time {text!r} is out of range") from None


def event_to_json(e: Event) -> bytes:
    """The event as compact UTF-8 JSON in the schema of docs/ARCHITECTURE.md §Events (all fields, nulls
    included).

    >>> event_to_json(Event("e1", "u1", 1714564800.0, "view", "i9"))
    b'{"event_id":"e1","user_id":"u1","ts":1714564800.0,"type":"view","item_id":"i9","category":null,"price":null,"query":null,"session_id":null}'
    """
    return orjson.dumps(e)


# -- payload helpers ------------------------------------------------------------------------------


def _json_depth(data: bytes) -> int:
    """Deepest array/object nesting in ``data``, without decoding it (no recursion, no stack).

    String literals are removed first so that brackets inside them do not count; an unterminated
    string is left in place, which can only over-count (the payload is not valid JSON anyway).
    """
    brackets = _JSON_STRING.sub(b"", data).translate(None, _NOT_BRACKETS)
    if not brackets:
        return 0
    return max(0, max(accumulate(_DEPTH_STEP[b] for b in brackets)))


def _reject_constant(name: str) -> object:
    raise BadEvent("not_json", f"{name} is not a JSON value")


def _parse_int(digits: str) -> int | float:
    return int(digits) if len(digits) <= _MAX_INT_DIGITS else float(digits)


#: Confluent Schema Registry's wire format: a zero byte, the schema id (4 bytes, big-endian), then the
#: serialized value. Its JSON Schema serializer writes plain JSON after the header.
REGISTRY_MAGIC = b"\x00"
REGISTRY_HEADER_BYTES = 5


def _registry_payload(data: bytes) -> object:
    """The JSON after a Schema Registry header (the JSON Schema serializer's output); any other
    registry payload (Avro, Protobuf) is ``not_json`` with the schema id and what to change.

    >>> _registry_payload(bytes([0, 0, 0, 0, 7]) + b'{"a": 1}')
    {'a': 1}
    """
    schema_id = int.from_bytes(data[1:REGISTRY_HEADER_BYTES], "big")
    body = data[REGISTRY_HEADER_BYTES:]
    if body.lstrip()[:1] != b"{":
        raise BadEvent(
            "not_json",
            f"a Schema Registry payload (schema id {schema_id}) that is not JSON, Avro or Protobuf "
            "perhaps: events are JSON objects; use a JSON or JSON Schema value serializer",
        )
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        return _decode_slow(body, exc)


def _decode_slow(data: bytes, exc: orjson.JSONDecodeError) -> object:
    """Classify an orjson failure, or decode the valid JSON that orjson refuses.

    orjson refuses numbers beyond a double or a 64-bit integer, but they are valid JSON, and a
    price of 1e999 is a bad price, not a broken payload. So the standard library gets a second
    try (numbers overflow to inf; the depth check already ran, so its recursion is safe), with
    its extra leniencies closed: NaN/Infinity literals are rejected, and strings with lone
    surrogates (which nothing downstream could re-encode) are caught by re-encoding.
    This costs a second decode only for payloads that fail the first, which is also where a Schema
    Registry header (JSON never starts with a zero byte) is recognised and skipped.
    """
    if data[:1] == REGISTRY_MAGIC and len(data) >= REGISTRY_HEADER_BYTES:
        return _registry_payload(data)
    try:
        text = data.decode()
    except UnicodeDecodeError as err:
        raise BadEvent("not_utf8", str(err)) from None
    if not text.strip():
        raise BadEvent("not_json", "empty payload")
    try:
        obj = json.loads(text, parse_constant=_reject_constant, parse_int=_parse_int)
        if b"\\u" in data:  # only a \u escape can make a lone surrogate
            json.dumps(obj, ensure_ascii=False).encode()
    except BadEvent:
        raise
    except ValueError:  # JSONDecodeError and UnicodeEncodeError are subclasses
        raise BadEvent("not_json", str(exc)) from None  # orjson's message is the more precise one
    return obj


# -- field helpers --------------------------------------------------------------------------------


def _json_type(value: object) -> str:
    """The JSON name of a value's type, for details ("number", not "int")."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list | tuple):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def _show(value: object) -> str:
    """A short repr of an offending value for a detail."""
    text = repr(value)
    return text if len(text) <= _DETAIL_CHARS else text[: _DETAIL_CHARS - 3] + "..."


def _is_integer(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _integer_id(value: int, name: str) -> str:
    """An integer id's decimal string. A cheap bound (4 bits > 1 digit) comes before str(), which is
    quadratic in the digits and refuses more than 4300 of them; the caller's length check is the exact
    one."""
    if value.bit_length() > MAX_ID_CHARS * 4:
        raise BadEvent("bad_id", f"{name} integer has more than {MAX_ID_CHARS} digits")
    return str(value)


def _required_id(value: object, name: str) -> str:
    if value is None:
        raise BadEvent("missing_field", f"{name} is missing or null")
    if not isinstance(value, str):
        # Shops' backends and every public log here number their users and events: an integer is
        # its decimal string, as for item_id (the record key must then be that string)
        if not _is_integer(value):
            raise BadEvent(
                "bad_field_type", f"{name} must be a string or an integer, got {_json_type(value)}"
            )
        value = _integer_id(value, name)
    if not value or len(value) > MAX_ID_CHARS:
        raise BadEvent("bad_id", f"{name} must have 1-{MAX_ID_CHARS} chars, has {len(value)}")
    return value


def _optional_id(value: object, name: str, *, allow_int: bool) -> str | None:
    """An optional id: a string (empty means null) or, where public logs use them, an integer."""
    if value is None:
        return None
    if isinstance(value, str):
        if not value:
            return None
    elif allow_int and _is_integer(value):
        value = _integer_id(value, name)
    else:
        kinds = "a string, an integer or null" if allow_int else "a string or null"
        raise BadEvent("bad_field_type", f"{name} must be {kinds}, got {_json_type(value)}")
    if len(value) > MAX_ID_CHARS:
        raise BadEvent("bad_id", f"{name} must have at most {MAX_ID_CHARS} chars, has {len(value)}")
    return value


def _ts_field(value: object, now: float) -> float:
    t = value
    if type(t) is not float and type(t) is not int:  # fast path for plain numbers
        if value is None:
            raise BadEvent("missing_field", "ts is missing or null")
        if isinstance(value, str):
            t = _iso_seconds(value)
        elif not isinstance(value, int | float) or isinstance(value, bool):
            raise BadEvent("bad_field_type", f"ts must be a number or a string, got {_json_type(value)}")
    # Unix milliseconds (or microseconds) are not guessed: a heuristic would misread some real
    # seconds and silently rescale the gaps the model learns from. They fail the upper bound.
    # The chained comparison is False for NaN too, and works on huge ints without overflow.
    if not MIN_TS <= t <= now + MAX_FUTURE_S:
        # ... but the dead letter says what they look like, the one mistake every Java shop can make
        hint = next(
            (
                f" (unix {u}? ts is in seconds)"
                for u, k in _TS_UNITS
                if MIN_TS * k <= t <= (now + MAX_FUTURE_S) * k
            ),
            "",
        )
        raise BadEvent(
            "bad_ts", f"ts {_show(value)} is outside [2000-01-01, now + 1 day] or not finite{hint}"
        )
    return float(t)


#: Units a numeric ts out of range may have been sent in, and their factor to seconds: only named in
#: the dead letter's detail (the ranges of valid instants in each unit do not overlap).
_TS_UNITS = (("milliseconds", 1_000), ("microseconds", 1_000_000), ("nanoseconds", 1_000_000_000))


def _iso_seconds(text: str) -> float:
    try:
        return iso_seconds(text)
    except ValueError:
        raise BadEvent("bad_ts", f"ts {_show(text)} is not an ISO-8601 date or time") from None


def _category(value: object) -> str | None:
    if value is None:
        return None
    if isinstance(value, str):
        return value or None
    if isinstance(value, int) and not isinstance(value, bool):
        if value.bit_length() > MAX_ID_CHARS * 4:  # as for item_id: an integer id, bounded like one
            raise BadEvent("bad_id", f"category integer has more than {MAX_ID_CHARS} digits")
        return str(value)
    raise BadEvent(
        "bad_field_type", f"category must be a string, an integer or null, got {_json_type(value)}"
    )


def _price(value: object) -> float | None:
    if value is None:
        return None
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise BadEvent("bad_field_type", f"price must be a number or null, got {_json_type(value)}")
    try:
        p = float(value)
    except OverflowError:  # an integer beyond the double range is an infinite price
        p = math.inf
    if not 0.0 <= p < math.inf:  # also False for NaN
        raise BadEvent("bad_price", f"price {_show(value)} must be finite and >= 0")
    return p
