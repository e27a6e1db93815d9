"""The worker's topics on the real broker: an existing topic with another partition count is refused
before any other topic is created (a shop's own clickstream topic, typically, or a changelog kept from
a run with another count)."""

from __future__ import annotations

import time
import uuid

import pytest
from kafka import KafkaProducer
from kafka.admin import KafkaAdminClient, NewPartitions, NewTopic

from demandstream.model.core.events import event_to_json
from demandstream.model.data.synth import generate
from demandstream.stream.admin import TopicMismatch, TopicRefused, changelog_topic, ensure_topics
from demandstream.stream.settings import Settings
from demandstream.stream.worker.app import CONSUMER_METADATA_MAX_AGE_MS
from tests.helpers import read_topic, user_error_line

pytestmark = [pytest.mark.kafka, pytest.mark.timeout(180)]


def create_listed(admin: KafkaAdminClient, topic: NewTopic) -> None:
    """Create ``topic`` and wait until the broker lists it: a topic list right after creation can
    still miss it, and the product's check would then find nothing to refuse."""
    admin.create_topics([topic])
    deadline = time.monotonic() + 30
    while topic.name not in admin.list_topics():
        assert time.monotonic() < deadline, f"{topic.name} not listed after 30 s"
        time.sleep(0.2)


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
        create_listed(admin, NewTopic(settings.topic_input, 6, 1))
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


def test_a_worker_refuses_a_changelog_of_another_partition_count_in_one_line(worker_factory, stream_env):
    # Left by a run with another DEMANDSTREAM_PARTITIONS, or made by hand: the worker used to start, pass
    # /readyz, and crash with a traceback ("Unrecognized partition") on the first event of a partition
    # the changelog lacks.
    settings = Settings.from_env(stream_env)
    admin = KafkaAdminClient(bootstrap_servers=settings.bootstrap_servers)
    try:
        changelog = changelog_topic(settings)
        create_listed(admin, NewTopic(changelog, 2, 1, topic_configs={"cleanup.policy": "compact"}))
        with pytest.raises(
            TopicMismatch, match=rf"changelog {changelog} has 2 partitions, not the worker's 4"
        ):
            ensure_topics(settings, with_changelog=True)
        assert settings.topic_input not in admin.list_topics()  # nothing created before the refusal
    finally:
        admin.close()
    last = user_error_line(worker_factory().start())
    assert "has 2 partitions" in last and "DEMANDSTREAM_PARTITIONS=2" in last


def test_a_worker_refuses_a_changelog_that_deletes_states_in_one_line(worker_factory, stream_env):
    """An operator's changelog made with their tooling's defaults (cleanup.policy=delete) would drop
    every state idle longer than retention.ms, and a restore would start those users over silently."""
    settings = Settings.from_env(stream_env)
    admin = KafkaAdminClient(bootstrap_servers=settings.bootstrap_servers)
    try:
        changelog = changelog_topic(settings)
        create_listed(
            admin, NewTopic(changelog, settings.partitions, 1, topic_configs={"cleanup.policy": "delete"})
        )
    finally:
        admin.close()
    last = user_error_line(worker_factory().start())
    assert f"changelog {changelog} has cleanup.policy=delete" in last and "cleanup.policy=compact" in last


def test_partitions_added_to_the_input_while_a_worker_runs_stop_it_in_one_line(worker_factory, stream_env):
    """A shop adds partitions to its clickstream topic under a running pipeline: users whose keys hash
    elsewhere now would meet no state (their table and changelog partitions do not exist). The worker
    used to leave the new partitions unread for Faust's 5-minute metadata age, then crash on their first
    event with ``AssertionError: Unrecognized partition``; it now stops at the rebalance, within
    ``CONSUMER_METADATA_MAX_AGE_MS``, naming the change, and signals none of the new partitions' events."""
    settings = Settings.from_env(stream_env)
    w = worker_factory().start()
    w.wait_ready()
    admin = KafkaAdminClient(bootstrap_servers=settings.bootstrap_servers)
    try:
        admin.create_partitions({settings.topic_input: NewPartitions(settings.partitions + 2)})
    finally:
        admin.close()
    event = next(iter(generate(1, 1, seed=11)))
    producer = KafkaProducer(bootstrap_servers=settings.bootstrap_servers)
    try:  # straight to a new partition, as the shop's producers now send some users
        producer.send(
            settings.topic_input,
            key=event.user_id.encode(),
            value=event_to_json(event),
            partition=settings.partitions,
        ).get(timeout=30)
    finally:
        producer.close()
    last = user_error_line(w, timeout=CONSUMER_METADATA_MAX_AGE_MS / 1000 + 90, crashed=True)
    assert f"partitions were added to {settings.topic_input} (this worker was given partition" in last, last
    assert not read_topic(settings.bootstrap_servers[0], settings.topic_signals, timeout=5, idle_s=2)


def test_a_replication_factor_the_cluster_cannot_give_is_one_line(kafka_bootstrap):
    tag = uuid.uuid4().hex[:8]
    settings = Settings.from_env(
        {
            "DEMANDSTREAM_BROKER": f"kafka://{kafka_bootstrap}",
            "DEMANDSTREAM_REPLICATION": "3",  # the session broker is one node
            "DEMANDSTREAM_TOPIC_INPUT": f"rf-clicks-{tag}",
            "DEMANDSTREAM_TOPIC_SIGNALS": f"rf-signals-{tag}",
            "DEMANDSTREAM_TOPIC_DLQ": f"rf-dlq-{tag}",
            "DEMANDSTREAM_TOPIC_CONTROL": f"rf-control-{tag}",
        }
    )
    with pytest.raises(TopicRefused, match=r"replication factor 3 .*set DEMANDSTREAM_REPLICATION to at most"):
        ensure_topics(settings)
    # the default takes the cluster's own factor, which a one-node cluster can give
    counts = ensure_topics(settings.with_(replication=0))
    assert set(counts.values()) == {settings.partitions}
