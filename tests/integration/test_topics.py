"""The worker's topics on the real broker: an existing topic with another partition count is refused
before any other topic is created (a shop's own clickstream topic, typically)."""

from __future__ import annotations

import uuid

import pytest
from kafka.admin import KafkaAdminClient, NewTopic

from demandstream.stream.admin import TopicMismatch, ensure_topics
from demandstream.stream.settings import Settings

pytestmark = [pytest.mark.kafka, pytest.mark.timeout(120)]


def test_an_input_topic_of_another_partition_count_is_refused_before_anything_is_created(kafka_bootstrap):
    tag = uuid.uuid4().hex[:8]
    settings = Settings.from_env(
        {
            "DEMANDSTREAM_BROKER": f"kafka://{kafka_bootstrap}",
            "DEMANDSTREAM_PARTITIONS": "4",
            "DEMANDSTREAM_TOPIC_INPUT": f"shop-clicks-{tag}",
            "DEMANDSTREAM_TOPIC_SIGNALS": f"signals-{tag}",
            "DEMANDSTREAM_TOPIC_DLQ": f"dlq-{tag}",
            "DEMANDSTREAM_TOPIC_CONTROL": f"control-{tag}",
        }
    )
    admin = KafkaAdminClient(bootstrap_servers=[kafka_bootstrap])
    try:
        admin.create_topics([NewTopic(settings.topic_input, 6, 1)])
        with pytest.raises(TopicMismatch, match=rf"shop-clicks-{tag} has 6\): set DEMANDSTREAM_PARTITIONS"):
            ensure_topics(settings)
        # nothing created that would stand in the way of the fix
        assert not {settings.topic_signals, settings.topic_dlq, settings.topic_control} & set(
            admin.list_topics()
        )
        counts = ensure_topics(settings.with_(partitions=6))
        assert set(counts.values()) == {6} and settings.topic_signals in counts
    finally:
        admin.close()
