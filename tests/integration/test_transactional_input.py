"""Input written by a transactional producer (a Flink or Kafka Streams job with exactly-once sinks,
say): the events of an aborted transaction never happened, and the worker must not apply them,
whatever its own guarantee. A Flink job aborts the records written since its last checkpoint on every
restart and writes them again, so reading them would apply those events twice."""

from __future__ import annotations

import pytest
from kafka import KafkaProducer

from demandstream.model.core.events import event_to_json
from demandstream.model.data.synth import generate
from demandstream.stream.admin import ensure_topics
from demandstream.stream.settings import Settings
from tests.integration.faults import wait_until

pytestmark = [pytest.mark.kafka, pytest.mark.timeout(180)]


def test_events_of_aborted_transactions_are_never_applied(worker_factory, stream_env, kafka_bootstrap):
    settings = Settings.from_env(stream_env)
    assert settings.guarantee == "at_least_once"  # exactly-once reads committed records by construction
    ensure_topics(settings)
    events = list(generate(20, 400, seed=13))
    kept, aborted = events[:300], events[300:]
    producer = KafkaProducer(
        bootstrap_servers=kafka_bootstrap, transactional_id=f"shop-{settings.app_id}", acks="all"
    )
    try:
        producer.init_transactions()
        for batch, commit in ((kept[:150], True), (aborted, False), (kept[150:], True)):
            producer.begin_transaction()
            for e in batch:
                producer.send(settings.topic_input, key=e.user_id.encode(), value=event_to_json(e))
            producer.flush()
            producer.commit_transaction() if commit else producer.abort_transaction()
    finally:
        producer.close()

    w = worker_factory().start()
    w.wait_ready()
    wait_until(
        lambda: w.metric("demandstream_signals_total") >= len(kept), 60, "a signal per committed event"
    )
    # the last committed event's signal came after every aborted one in the log: nothing more follows
    assert w.metric("demandstream_signals_total") == len(kept)
    assert w.metric("demandstream_events_total", result="valid") == len(kept)
