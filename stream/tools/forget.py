"""``demandstream forget USER_ID``: the right to erasure.

The request is a control record on the input topic, keyed by the user: it lands in the user's
partition, after every event already sent, and the worker owning that partition deletes the state
(local store + tombstone in the changelog, so compaction removes it from Kafka too).
"""

from __future__ import annotations

import time

import orjson

from demandstream.model.errors import OptionError
from demandstream.stream.engine.inference import CONTROL_FIELD
from demandstream.stream.settings import Settings
from demandstream.stream.tools.replay import make_producer


def forget_record(user_id: str) -> bytes:
    """The control record's value (field order matters: the worker matches its prefix)."""
    return orjson.dumps({CONTROL_FIELD: "forget", "user_id": user_id, "requested_at": time.time()})


def forget(settings: Settings, user_id: str) -> None:
    if not user_id or len(user_id) > 128:
        raise OptionError("user_id must be 1-128 characters")
    producer = make_producer(settings)
    try:
        producer.send(settings.topic_input, key=user_id.encode("utf-8"), value=forget_record(user_id)).get(
            timeout=30
        )
    finally:
        producer.close()
