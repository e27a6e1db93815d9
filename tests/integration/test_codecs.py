"""Compressed input: a shop's producers (or a topic's ``compression.type``) write lz4, snappy or zstd
record batches; the worker (aiokafka) and the tools that read topics with kafka-python (migrate,
tail) must decompress every codec Kafka has, not only gzip. Without the codec libraries the worker's
fetcher crashed on the first such batch ("Libraries for zstd compression codec not found")."""

from __future__ import annotations

import pytest
from kafka import KafkaProducer

from demandstream.model.core.events import event_to_json
from demandstream.model.data.synth import generate
from demandstream.stream.admin import ensure_topics
from demandstream.stream.settings import Settings
from tests.integration.faults import TopicReader, wait_until

pytestmark = [pytest.mark.kafka, pytest.mark.timeout(180)]

CODECS = ("lz4", "snappy", "zstd")


def test_the_worker_and_kafka_python_read_every_codec(worker_factory, stream_env, kafka_bootstrap):
    settings = Settings.from_env(stream_env)
    ensure_topics(settings)
    events = list(generate(30, 600, seed=11))
    users = sorted({e.user_id for e in events})
    for i, codec in enumerate(CODECS):  # each user's events in one codec, so per-user order holds
        mine = set(users[i :: len(CODECS)])
        producer = KafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all", compression_type=codec)
        try:
            for e in events:
                if e.user_id in mine:
                    producer.send(settings.topic_input, key=e.user_id.encode(), value=event_to_json(e))
            producer.flush()
        finally:
            producer.close()

    w = worker_factory().start()
    w.wait_ready()
    wait_until(
        lambda: w.metric("demandstream_signals_total") == len(events),
        90,
        "a signal for every compressed event",
    )
    assert w.metric("demandstream_events_total", result="valid") == len(events)
    assert w.proc.poll() is None, w.log_tail()

    reader = TopicReader(kafka_bootstrap, settings.topic_input)  # kafka-python, as migrate reads
    try:
        got = reader.read_until(lambda recs: len(recs) >= len(events), 30, idle_s=0.5)
    finally:
        reader.close()
    assert len(got) == len(events)
