"""What the worker writes: demand signals (docs/ARCHITECTURE.md §Signals), dead letters (§Dead letters) and
the keys of user states (§State keys), as bytes.

>>> from demandstream.model.core.scoring import Prediction
>>> raw = encode_signal("u1", "e9", 1700000000.5, "0a1b2c3d", Prediction([("shoes", 0.5)], 0.25, 3), 1700000000.6)
>>> orjson.loads(raw)["top_categories"]
[{'category': 'shoes', 'p': 0.5}]
>>> d = orjson.loads(encode_dead_letter("not_json", "bad", b"{oops", "clickstream", 2, 41, 1.0))
>>> d["reason"], d["raw"], d["partition"], d["offset"]
('not_json', '{oops', 2, 41)
"""

from __future__ import annotations

import base64

import orjson

from demandstream.model.core.scoring import Prediction

#: A dead letter keeps at most this much of the original payload (docs/ARCHITECTURE.md §Dead letters), so a
#: 1 MiB blob cannot turn the DLQ topic into a copy of the attack.
DLQ_RAW_MAX = 4096
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
            "top_categories": [{"category": c, "p": p} for c, p in pred.top_categories],
            "purchase_propensity": pred.purchase_propensity,
        }
    )


def encode_dead_letter(
    reason: str, detail: str, raw: bytes | None, topic: str, partition: int, offset: int, received_at: float
) -> bytes:
    """The raw payload is kept as text when it is valid UTF-8, else base64 (flagged by ``raw_encoding``)."""
    chunk = (raw or b"")[:DLQ_RAW_MAX]
    text, encoding = _as_text(chunk), "utf-8"
    if text is None:
        text, encoding = base64.b64encode(chunk).decode("ascii"), "base64"
    return orjson.dumps(
        {
            "reason": reason,
            "detail": detail[:512],
            "raw": text,
            "raw_encoding": encoding,
            "raw_truncated": raw is not None and len(raw) > DLQ_RAW_MAX,
            "topic": topic,
            "partition": partition,
            "offset": offset,
            "received_at": received_at,
        }
    )


def _as_text(chunk: bytes) -> str | None:
    """UTF-8 text of ``chunk``, tolerating a multi-byte character cut by truncation; None if binary."""
    for cut in range(4):  # a UTF-8 character is at most 4 bytes
        try:
            return chunk[: len(chunk) - cut].decode("utf-8")
        except UnicodeDecodeError:
            if len(chunk) < DLQ_RAW_MAX:
                return None
    return None
