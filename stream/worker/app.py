"""The Faust application, built from :class:`~demandstream.stream.settings.Settings` in one place.

Topics and the table are declared here with raw serializers (records are JSON bytes we encode
ourselves with orjson, states are packed bytes); the agent lives in :mod:`demandstream.stream.worker.agents`, the HTTP
views in :mod:`demandstream.stream.worker.web`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import faust
from yarl import URL

from demandstream.stream.partitioner import producer_partitioner
from demandstream.stream.settings import Settings
from demandstream.stream.worker import faust_patches
from demandstream.stream.worker.metrics import Metrics

logger = logging.getLogger(__name__)

#: Producer linger: how long the client waits to fill a batch. A few ms costs little latency and
#: lets one request carry hundreds of signals instead of one.
PRODUCER_LINGER_MS = 5
#: Consumer fetch sizes large enough that one fetch feeds a whole micro-batch.
CONSUMER_MAX_FETCH_BYTES = 8 * 1024 * 1024
#: How old the consumer's topic metadata may get: partitions added to the input topic are seen, and
#: refused (stream/worker/partitioning.py), within this, rather than after Faust's 5 minutes during which
#: the new partitions' events waited unread. One metadata request per interval and worker.
CONSUMER_METADATA_MAX_AGE_MS = 30_000
#: How long the broker may hold a fetch that finds no data (Faust fixes 1,500 ms). aiokafka keeps one
#: fetch in flight per broker, so while the input partitions' records are buffered a fetch of the
#: empty control topic alone waits this long, and the input's next fetch behind it: the worker's
#: cycle under load locks to it (docs/BENCHMARKS.md, 2026-12-05 afternoon). An idle worker sends
#: one fetch per this interval.
CONSUMER_FETCH_MAX_WAIT_MS = 100


@dataclass
class Components:
    """Everything the agent and the views share, created once per worker."""

    app: faust.App
    settings: Settings
    input_topic: faust.TopicT
    signals_topic: faust.TopicT
    dlq_topic: faust.TopicT
    table: faust.Table
    metrics: Metrics
    #: the input and control topics together: what the agent subscribes (one co-partitioned group)
    source_topics: faust.TopicT | None = None


def broker_credentials(settings: Settings):
    """Faust credentials for SASL/SSL from settings (None for PLAINTEXT)."""
    proto = settings.security_protocol
    if proto == "PLAINTEXT":
        return None
    ssl_context = None
    if proto.endswith("SSL"):
        import ssl

        ssl_context = ssl.create_default_context(cafile=settings.ssl_cafile or None)
        if settings.ssl_certfile:  # mutual TLS: the broker authenticates the worker by its certificate
            ssl_context.load_cert_chain(settings.ssl_certfile, settings.ssl_keyfile or None)
    if proto.startswith("SASL"):
        from faust.auth import SASLCredentials

        mechanism = settings.sasl_mechanism
        return SASLCredentials(
            username=settings.sasl_username,
            password=settings.sasl_password,
            ssl_context=ssl_context,
            mechanism=mechanism,
        )
    from faust.auth import SSLCredentials

    return SSLCredentials(ssl_context)


def create_app(settings: Settings, metrics: Metrics | None = None) -> Components:
    """Build the Faust app, its topics and table. The agent is attached by :func:`demandstream.stream.worker.agents.attach`."""
    advertised = settings.web_url()  # refuses a wildcard bind address with nothing to advertise
    app = faust.App(
        settings.app_id,
        broker=settings.faust_broker,
        broker_credentials=broker_credentials(settings),
        store="rocksdb://" if settings.store == "rocksdb" else "memory://",
        datadir=settings.data_dir,
        processing_guarantee=settings.guarantee,
        topic_partitions=settings.partitions,
        topic_replication_factor=settings.replication,
        table_standby_replicas=settings.standby_replicas,
        # No leader election: nothing runs on the leader alone (the lag timer runs on every worker), and
        # its topic ({app id}-__assignor-__leader) would be one more for operators to create on a
        # cluster whose ACLs keep the worker from creating topics (docs/OPERATIONS.md §ACLs)
        topic_disable_leader=True,
        web_enabled=True,
        # Bound on web_host, advertised as web_url() (docs/ARCHITECTURE.md §HTTP): the partition assignor
        # tells the other workers this URL, and the router forwards a user's request to its owner's URL.
        web_bind=settings.web_host,
        web_port=settings.web_port,
        web_host=URL(advertised).host,
        canonical_url=advertised,
        # Faust's own views are not served: /table/* reads any table key (user state), /router/* maps
        # keys to workers, the statistics and graph views describe the app. Only ours (web.py) are.
        web_tables_enabled=False,
        web_router_enabled=False,
        web_stats_enabled=False,
        web_graph_enabled=False,
        web_metrics_enabled=False,
        producer_linger_ms=PRODUCER_LINGER_MS,
        producer_acks=-1,  # acks=all: an acknowledged signal survives a broker loss
        # Signals are sent to their source partition; the partitioner only decides where the router
        # sends /users/{id}/demand, which must be where the shop's producers put the user
        producer_partitioner=producer_partitioner(settings.partitioner),
        consumer_max_fetch_size=CONSUMER_MAX_FETCH_BYTES,
        consumer_metadata_max_age_ms=CONSUMER_METADATA_MAX_AGE_MS,
        broker_max_poll_records=settings.batch_max,  # one poll can fill a whole micro-batch
        # under exactly-once each commit ends the transactions: how soon read_committed consumers see a signal
        broker_commit_interval=settings.commit_interval,
        stream_buffer_maxsize=max(4 * settings.batch_max, 4096),
        # Faust's own table key TTL and web stats are not used: we expire states ourselves.
        autodiscover=False,
    )
    # This app is always run as a worker. Faust caches ``app.in_transaction`` (exactly-once on/off) the
    # first time the consumer or producer is built, and only its own Worker.on_start sets in_worker;
    # we build both earlier (batch delivery, producer buffer), which would silently turn exactly-once
    # into no transactions at all.
    app.in_worker = True
    raw = {"key_serializer": "raw", "value_serializer": "raw"}
    input_topic = app.topic(settings.topic_input, partitions=settings.partitions, **raw)
    signals_topic = app.topic(settings.topic_signals, partitions=settings.partitions, **raw)
    dlq_topic = app.topic(settings.topic_dlq, partitions=settings.partitions, **raw)
    # Erasure requests come on a topic of their own (ACLs decide who may write it), with the input's
    # partition count and subscribed by the same agent, so Faust's assignor puts partition p of both in
    # one co-partitioned group: the worker owning a user's events also owns its erasure requests.
    source_topics = app.topic(
        settings.topic_input, settings.topic_control, partitions=settings.partitions, **raw
    )
    # Faust's producer buffer warns above 100 pending messages; a micro-batch writes one changelog
    # record per user it touched, so allow a full batch.
    app.producer.buffer.max_messages = max(settings.batch_max, app.producer.buffer.max_messages)
    table = app.Table(
        settings.table,
        default=None,
        partitions=settings.partitions,
        standby_buffer_size=settings.standby_buffer,
        key_type=bytes,
        value_type=bytes,
        # Applies when Faust creates the changelog topic: an erased or expired state's record may stay in
        # the log's segments at most this long (plus a segment roll; docs/OPERATIONS.md §4 Privacy).
        extra_topic_configs=changelog_topic_configs(settings),
    )
    faust_patches.install(app)
    faust_patches.tune_worker_consumer(app.consumer._thread, CONSUMER_FETCH_MAX_WAIT_MS)
    return Components(
        app, settings, input_topic, signals_topic, dlq_topic, table, metrics or Metrics(), source_topics
    )


def changelog_topic_configs(settings: Settings) -> dict[str, str]:
    """Topic configs of the table's changelog beyond Faust's (``cleanup.policy=compact``).

    >>> changelog_topic_configs(Settings())
    {'max.compaction.lag.ms': '86400000'}
    """
    return {"max.compaction.lag.ms": str(int(settings.changelog_max_compaction_lag_s * 1000))}
