"""``demandstream forget USER_ID``: the right to erasure.

The request is a record of the control topic (``DEMANDSTREAM_TOPIC_CONTROL``), not of the input topic:
every shop front-end may write events, but only whoever the deployment's ACLs let write the control
topic can erase a user (docs/OPERATIONS.md §4 Privacy). It is keyed by the user and sent to the
partition number the user's events have in the input topic; the worker owning that partition consumes
both and deletes the state (local store + tombstone in the changelog, so compaction removes it from
Kafka too; docs/ARCHITECTURE.md §Topics says how it is ordered with the user's events).

Two topics have no common order, so the request is sent only once the workers' consumer group has
committed the user's input partition up to its end at the time of the request: every event the shop
wrote before the request is then applied, and the erasure removes it. Events written after the request
may be applied before or after it. If the group does not catch up within ``wait_s``, nothing is sent
and the command fails (:class:`ErasureNotSent`): retry once the lag is gone.
"""

from __future__ import annotations

import time

import orjson
from kafka import KafkaConsumer, TopicPartition

from demandstream.model.errors import OptionError, UserError
from demandstream.stream.admin import (
    UNREACHABLE,
    KafkaUnavailable,
    ensure_topics,
    unreachable_message,
)
from demandstream.stream.engine.inference import CONTROL_FIELD
from demandstream.stream.partitioner import key_partition
from demandstream.stream.settings import Settings
from demandstream.stream.tools.replay import make_producer

#: How long ``forget`` waits for the workers to consume the user's events written before the request.
FORGET_WAIT_S = 60.0
#: The request's field holding the end offset of the user's input partition when the request was made:
#: every event below it was applied before the request was sent, so a rebuild of the table
#: (``demandstream migrate``) applies the erasure exactly after them (docs/ARCHITECTURE.md §Topics).
INPUT_END_FIELD = "input_end"


class ErasureNotSent(UserError, TimeoutError):
    """The workers did not consume the user's earlier events in time; the request was not sent."""


def forget_record(user_id: str, input_end: int | None = None) -> bytes:
    """The control record's value; ``input_end``: the input partition's end offset at the request."""
    request = {CONTROL_FIELD: "forget", "user_id": user_id, "requested_at": time.time()}
    if input_end is not None:
        request[INPUT_END_FIELD] = input_end
    return orjson.dumps(request)


def forget(settings: Settings, user_id: str, wait_s: float = FORGET_WAIT_S) -> int:
    """Send the erasure request of ``user_id`` to the control topic; return its partition."""
    if not user_id or len(user_id) > 128:
        raise OptionError("user_id must be 1-128 characters")
    counts = ensure_topics(settings)  # the control topic exists, with the input's partition count
    key = user_id.encode("utf-8")
    partition = key_partition(key, counts[settings.topic_input], settings.partitioner)
    end = wait_until_consumed(settings, TopicPartition(settings.topic_input, partition), wait_s, user_id)
    producer = make_producer(settings)
    try:
        producer.send(
            settings.topic_control, key=key, value=forget_record(user_id, end), partition=partition
        ).get(timeout=30)
    finally:
        producer.close()
    return partition


def wait_until_consumed(settings: Settings, tp: TopicPartition, wait_s: float, user_id: str) -> int:
    """Return ``tp``'s current end once the workers' group (``app_id``) committed ``tp`` up to it."""
    try:
        consumer = KafkaConsumer(
            bootstrap_servers=settings.bootstrap_servers,
            group_id=settings.app_id,  # only reads the group's committed offsets: never joins it
            enable_auto_commit=False,
            client_id="demandstream-forget",
            **settings.kafka_python_security(),
        )
    except UNREACHABLE:
        raise KafkaUnavailable(unreachable_message(settings)) from None
    try:
        end = consumer.end_offsets([tp])[tp]
        deadline = time.monotonic() + wait_s
        committed = None
        while end > 0:
            committed = consumer.committed(tp)
            if committed is not None and committed >= end:
                return end
            if time.monotonic() > deadline:
                raise ErasureNotSent(
                    f"erasure of {user_id!r} not sent: the workers (group {settings.app_id}) have consumed "
                    f"partition {tp.partition} of {tp.topic} up to offset {committed or 0} of {end} after "
                    f"{wait_s:.0f} s, so the user's latest events may not be applied yet; retry once "
                    "the lag is gone"
                )
            time.sleep(0.5)
        return end
    finally:
        consumer.close()
