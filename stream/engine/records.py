"""What the worker writes: demand signals (docs/ARCHITECTURE.md §Signals), dead letters (§Dead letters; with
a pseudonym key :func:`encode_redacted_dead_letter`, which holds no raw id or payload) and
the keys of user states (§State keys), as bytes.

>>> from demandstream.model.core.scoring import Prediction
>>> raw = encode_signal("u1", "e9", 1700000000.5, "0a1b2c3d", Prediction([("shoes", 0.5)], 0.25, 3), 1700000000.6)
>>> orjson.loads(raw)["top_categories"]
[{'category': 'shoes', 'p': 0.5}]
>>> d = orjson.loads(encode_dead_letter("not_json", "bad", b"u1", b"{oops", "clickstream", 2, 41, 1.0))
>>> d["reason"], d["raw"], d["partition"], d["offset"], d["key_truncated"]
('not_json', '{oops', 2, 41, False)

Every record the worker writes to an output topic has at most :data:`RECORD_MAX` bytes whatever its
input was: a dead letter by construction (its key, raw payload and detail are cut to an encoded size),
a signal because its ids are validated and its category names bounded (the engine dead-letters the
event of a signal that would still not fit, see :class:`~demandstream.stream.engine.inference.InferenceEngine`).
"""

from __future__ import annotations

import base64
import hashlib

import orjson

from demandstream.model.core.events import MAX_ID_CHARS
from demandstream.model.core.features import category_hash
from demandstream.model.core.scoring import Prediction

#: Largest record (key + value) the worker writes to the signal and dead-letter topics. A sixteenth of
#: what Kafka accepts by default (the broker's max.message.bytes, 1 MiB; the producer's
#: max_request_size, 1,000,000 in Faust), so batch and header overhead never matter.
RECORD_MAX = 64 * 1024
#: A dead letter keeps at most this much of the original payload, counted as written in the dead letter's
#: JSON (escapes and base64 included), so a 1 MiB blob cannot turn the DLQ topic into a copy of the attack
#: (docs/ARCHITECTURE.md §Dead letters).
DLQ_RAW_MAX = 4096
#: ... and of the reason's detail, encoded.
DLQ_DETAIL_MAX = 512
#: Longest dead-letter key: a longer source key is cut to this many bytes (the dead letter carries the
#: whole key's SHA-256). Every valid key fits: a user id is at most MAX_ID_CHARS characters of at most 4
#: UTF-8 bytes.
DLQ_KEY_MAX = 4 * MAX_ID_CHARS
#: A category name whose JSON takes more bytes than this is written in a signal as ``#`` and its hash in
#: hex, the name the worker gives a category whose name it does not know
#: (:meth:`~demandstream.model.core.scoring.Scorer.category_name`). Category names are not length-checked
#: on input (only the 16 KiB event is), and a signal names top-k of them.
CATEGORY_NAME_MAX = 256
#: Table (and changelog) keys live in their own namespace (docs/ARCHITECTURE.md §State keys): Faust's
#: RocksDB store keeps its own bookkeeping, the changelog offset under ``b"__faust\\0offset__"``, in the
#: same key space as the table's keys, and a valid user id may be any string, that one included.
STATE_KEY_PREFIX = b"u:"


def state_key(user: str) -> bytes:
    """The table and changelog key of a user id (or its pseudonym): never one of Faust's own keys.

    >>> state_key("u42"), state_key("__faust\\x00offset__")
    (b'u:u42', b'u:__faust\\x00offset__')
    >>> user_of_state_key(state_key("__faust\\x00offset__")) == "__faust\\x00offset__"
    True
    """
    return STATE_KEY_PREFIX + user.encode("utf-8")


def user_of_state_key(key: bytes) -> str | None:
    """The user id (or pseudonym) of a table key, None for a key outside the namespace (not a user's)."""
    if not key.startswith(STATE_KEY_PREFIX):
        return None
    return key[len(STATE_KEY_PREFIX) :].decode("utf-8", "replace")


def encode_signal(
    user_id: str, event_id: str, ts: float, model_version: str, pred: Prediction, emitted_at: float
) -> bytes:
    return orjson.dumps(
        {
            "user_id": user_id,
            "event_id": event_id,
            "ts": ts,
            "emitted_at": emitted_at,
            "model_version": model_version,
            "events_seen": pred.events_seen,
            "top_categories": _top_categories(pred),
            "purchase_propensity": pred.purchase_propensity,
        }
    )


def _top_categories(pred: Prediction) -> list[dict]:
    """The signal's ``top_categories``; each with its ``why`` when the prediction carries one."""
    if pred.why is None:
        return [{"category": _category(c), "p": p} for c, p in pred.top_categories]
    return [
        {"category": _category(c), "p": p, "why": [_named_source(r) for r in why]}
        for (c, p), why in zip(pred.top_categories, pred.why, strict=True)
    ]


def _named_source(reason: dict) -> dict:
    """A reason whose ``from`` category name is written as the signal writes category names."""
    if "from" in reason:
        return {**reason, "from": _category(reason["from"])}
    return reason


def _category(name: str) -> str:
    """``name``, or ``#`` and its hash in hex when its JSON would take more than CATEGORY_NAME_MAX bytes
    (or it could not be JSON at all).

    >>> _category("shoes"), _category("x" * 300) == f"#{category_hash('x' * 300):08x}"
    ('shoes', True)
    """
    try:
        if len(name) * 6 <= CATEGORY_NAME_MAX and name.isascii():  # 6: the longest escape
            return name
        if _json_len(name) <= CATEGORY_NAME_MAX:
            return name
    except TypeError:  # lone surrogates: not UTF-8, so not JSON; only a checkpoint could hold one
        pass
    return f"#{category_hash(name):08x}"


def dead_letter_key(key: bytes | None) -> bytes | None:
    """The key of a record's dead letter: the record's own key, cut to DLQ_KEY_MAX bytes."""
    return key if key is None or len(key) <= DLQ_KEY_MAX else key[:DLQ_KEY_MAX]


def encode_dead_letter(
    reason: str,
    detail: str,
    key: bytes | None,
    raw: bytes | None,
    topic: str,
    partition: int,
    offset: int,
    received_at: float,
) -> bytes:
    """The dead letter of a record with ``key`` and payload ``raw``: about 5 KiB at most, whatever they were.

    The raw payload is kept as text when it is valid UTF-8, else base64 (flagged by ``raw_encoding``);
    either way its first bytes, as many as take at most DLQ_RAW_MAX bytes in the JSON written.
    """
    payload = raw or b""
    text = _as_text(payload[:DLQ_RAW_MAX])  # JSON takes at least a byte per UTF-8 byte: no more can fit
    if text is not None:
        text, encoding = _json_prefix(text, DLQ_RAW_MAX), "utf-8"
        kept = len(text.encode("utf-8"))
    else:
        kept = min(len(payload), DLQ_RAW_MAX // 4 * 3)  # base64 writes 4 characters per 3 bytes
        text, encoding = base64.b64encode(payload[:kept]).decode("ascii"), "base64"
    return orjson.dumps(
        {
            "reason": reason,
            "detail": _json_prefix(detail, DLQ_DETAIL_MAX),
            "raw": text,
            "raw_encoding": encoding,
            "raw_truncated": kept < len(payload),
            "topic": topic,
            "partition": partition,
            "offset": offset,
            "received_at": received_at,
            "key_sha256": None if key is None else hashlib.sha256(key).hexdigest(),
            "key_truncated": key is not None and len(key) > DLQ_KEY_MAX,
        }
    )


def encode_redacted_dead_letter(
    reason: str,
    key_pseudonym: str | None,
    raw: bytes | None,
    raw_hmac: str | None,
    topic: str,
    partition: int,
    offset: int,
    received_at: float,
) -> bytes:
    """The dead letter of a record when user ids are pseudonymised (docs/ARCHITECTURE.md §Dead letters).

    Nothing of the record's key or payload is written: the payload may hold the raw user id (and the
    detail may quote it), and an unkeyed hash of an id is no protection (ids are guessable). It keeps the
    reason code, the payload's size, a keyed hash of the payload (``raw_hmac``: who holds the pseudonym
    key can match a payload they have) and the key's pseudonym (the same as the user's signals and state
    key carry when the key is the user's id). The caller computes both hashes with the pseudonym key.

    >>> d = orjson.loads(encode_redacted_dead_letter("not_json", "9f" * 16, b"{oops", "ab" * 32, "clickstream", 2, 41, 1.0))
    >>> d["raw"], d["raw_encoding"], d["raw_bytes"], d["detail"], d["key_sha256"], d["key_pseudonym"] == "9f" * 16
    ('', 'redacted', 5, '', None, True)
    """
    return orjson.dumps(
        {
            "reason": reason,
            "detail": "",
            "raw": "",
            "raw_encoding": "redacted",
            "raw_truncated": bool(raw),
            "raw_bytes": None if raw is None else len(raw),
            "raw_hmac": raw_hmac,
            "topic": topic,
            "partition": partition,
            "offset": offset,
            "received_at": received_at,
            "key_sha256": None,
            "key_pseudonym": key_pseudonym,
            "key_truncated": False,
        }
    )


def _json_len(text: str) -> int:
    """Bytes ``text`` takes as a JSON string, without its quotes (escapes make a character up to 6)."""
    return len(orjson.dumps(text)) - 2


def _json_prefix(text: str, limit: int) -> str:
    """The longest prefix of ``text`` that takes at most ``limit`` bytes as a JSON string.

    >>> _json_prefix("\\x01" * 10, 12) == "\\x01" * 2  # a control character is written \\u0001
    True
    """
    if _json_len(text) <= limit:
        return text
    lo, hi = 0, min(len(text), limit)  # every character takes at least one byte
    while lo < hi:  # binary search: the encoded length grows with the prefix
        mid = (lo + hi + 1) // 2
        if _json_len(text[:mid]) <= limit:
            lo = mid
        else:
            hi = mid - 1
    return text[:lo]


def _as_text(chunk: bytes) -> str | None:
    """UTF-8 text of ``chunk``, tolerating a multi-byte character cut by truncation; None if binary."""
    for cut in range(4):  # a UTF-8 character is at most 4 bytes
        try:
            return chunk[: len(chunk) - cut].decode("utf-8")
        except UnicodeDecodeError:
            if len(chunk) < DLQ_RAW_MAX:
                return None
    return None
