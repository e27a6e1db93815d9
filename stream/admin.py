"""Kafka administration with kafka-python: create the product's topics, inspect them.

The input, control, signal and dead-letter topics are created with the same partition count: signals
and dead letters are produced to the partition of their source record, which keeps a user's signals in
order and lets exactly-once transactions cover one source partition at a time; a user's erasure
requests on the control topic land in the partition number of the user's events, which the same worker
owns (docs/ARCHITECTURE.md §Topics).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence

import kafka.errors
from kafka import KafkaAdminClient
from kafka.admin import ConfigResource, ConfigResourceType, NewTopic
from kafka.errors import (
    InvalidReplicationFactorError,
    KafkaError,
    PolicyViolationError,
    TopicAlreadyExistsError,
    TopicAuthorizationFailedError,
)

from demandstream.model.errors import UserError
from demandstream.stream.settings import Settings

logger = logging.getLogger(__name__)


class KafkaUnavailable(UserError, RuntimeError):
    """The configured brokers cannot be reached (one clear line for the CLI)."""


#: What kafka-python (3.x, the version pyproject.toml requires) raises when no broker answers.
UNREACHABLE = (kafka.errors.KafkaTimeoutError, kafka.errors.KafkaConnectionError)


class TopicRefused(UserError, RuntimeError):
    """The cluster refused to create or describe a topic (replication factor, creation policy, ACLs):
    one line."""


class TopicMismatch(UserError, ValueError):
    """An existing topic does not fit the worker: the input, control, signal and dead-letter topics (or
    the changelog) have different partition counts, or the changelog's cleanup policy deletes states."""


def unreachable_message(settings: Settings) -> str:
    """One line for "no broker answered": kafka-python reports refused SASL logins the same way."""
    if settings.security_protocol == "PLAINTEXT":
        return f"cannot reach Kafka at {settings.broker} (is it running? `make kafka-up`)"
    return (
        f"cannot reach or authenticate with Kafka at {settings.broker} over {settings.security_protocol} "
        "(check the DEMANDSTREAM_SASL_* and DEMANDSTREAM_SSL_* settings: the CA, and the client certificate "
        "of a broker that requires one)"
    )


def admin_client(settings: Settings, timeout_s: float = 10.0) -> KafkaAdminClient:
    try:
        return KafkaAdminClient(
            bootstrap_servers=settings.bootstrap_servers,
            client_id="demandstream-admin",
            request_timeout_ms=int(timeout_s * 1000),
            **settings.kafka_python_security(),
        )
    except UNREACHABLE:
        raise KafkaUnavailable(unreachable_message(settings)) from None


def create_topics(
    settings: Settings,
    names: list[str],
    configs: dict[str, str] | None = None,
    check_counts_of: Sequence[str] = (),
    configs_of: Mapping[str, dict[str, str]] | None = None,
) -> dict[str, int]:
    """Create the topics of ``names`` that are missing (``settings.partitions``, ``settings.replication``,
    the topic ``configs`` given) and wait until every broker knows them; return the partition count of
    each. The one topic creator of the product (the worker's topics, the bench's).

    ``check_counts_of``: topics (of ``names`` or not) that, where they exist, must already have
    ``settings.partitions`` partitions; checked before anything is created (:class:`TopicMismatch`).
    ``configs_of``: the configs of particular topics, instead of ``configs``."""
    admin = admin_client(settings)
    try:
        existing = set(admin.list_topics())
        present = [n for n in check_counts_of if n in existing]
        if present:
            refuse_other_counts(settings, wait_for_topics(admin, present))
        new = [
            NewTopic(
                n,
                settings.partitions,
                replication_factor(settings),
                topic_configs=dict((configs_of or {}).get(n, configs or {})),
            )
            for n in names
            if n not in existing
        ]
        if new:
            try:
                admin.create_topics(new)
            except TopicAlreadyExistsError:
                pass  # another worker created it between list and create
            except InvalidReplicationFactorError as exc:
                asked = settings.replication or "the cluster's default (-1, Kafka 2.4 or later)"
                raise TopicRefused(
                    f"the cluster refused to create {', '.join(t.name for t in new)} with replication factor "
                    f"{asked} ({exc}): set DEMANDSTREAM_REPLICATION to at most the number of brokers"
                ) from None
            except TopicAuthorizationFailedError:
                raise TopicRefused(not_authorized_to_create(settings, [t.name for t in new])) from None
            except PolicyViolationError as exc:
                raise TopicRefused(
                    f"the cluster's topic creation policy refused {', '.join(t.name for t in new)} ({exc}): "
                    "create them as your cluster requires, with the same partition count, and start again"
                ) from None
            logger.info("created topics %s", [t.name for t in new])
        return wait_for_topics(admin, names)
    finally:
        admin.close()


def not_authorized_to_create(settings: Settings, names: list[str]) -> str:
    """One line for a principal whose ACLs do not let it create the topics it needs."""
    return (
        f"the cluster's ACLs do not let {settings.principal} create {', '.join(names)} (nor see them, if "
        f"they exist): have an administrator create them with {settings.partitions} partitions "
        "(`demandstream topics` run with an administrator's credentials creates every topic a worker of "
        "these settings needs) and grant it READ, WRITE and DESCRIBE on them, or grant it CREATE "
        "(docs/OPERATIONS.md §ACLs)"
    )


def replication_factor(settings: Settings) -> int:
    """The replication factor to create topics with: the setting, or -1 (the cluster's
    ``default.replication.factor``, KIP-464) when it is 0."""
    return settings.replication or -1


def topic_replication(settings: Settings, name: str) -> int:
    """How many replicas the partitions of topic ``name`` have (its first partition's replica list)."""
    admin = admin_client(settings)
    try:
        for t in admin.describe_topics([name]):
            partitions = t.get("partitions") or []
            if partitions:
                return len(partitions[0]["replica_nodes"])
        raise KafkaError(f"describe {name}: no partitions")
    finally:
        admin.close()


def with_cluster_replication(settings: Settings) -> Settings:
    """``settings`` with ``replication`` resolved: unchanged when set, else the replication factor of the
    input topic (created with the cluster's default by :func:`ensure_topics`, or the shop's own): what
    Faust must create the changelog with, as it needs a number."""
    if settings.replication:
        return settings
    rf = topic_replication(settings, settings.topic_input)
    logger.info("replication factor %d (the input topic's; DEMANDSTREAM_REPLICATION unset)", rf)
    return settings.with_(replication=rf)


def topic_names(settings: Settings) -> list[str]:
    """The topics of a worker, its changelog aside: input, control, signals, dead letters (and the
    category demand windows' when they are on).

    >>> topic_names(Settings(demand_window_s=0))
    ['clickstream', 'clickstream-control', 'demand-signals', 'clickstream-dlq']
    """
    names = [settings.topic_input, settings.topic_control, settings.topic_signals, settings.topic_dlq]
    if settings.demand_window_s:  # closed windows go to their source partition (§Category demand)
        names.append(settings.topic_demand)
    return names


def ensure_topics(settings: Settings, with_changelog: bool = False) -> dict[str, int]:
    """Create input, control, signal and dead-letter topics if missing; return their partition counts.
    ``with_changelog`` (the worker's start) creates the state table's changelog too.

    Raises :class:`TopicMismatch` (a ``ValueError``) when existing topics disagree on partition counts
    (signals could not stay co-partitioned with their input). ``with_changelog`` (the worker's start)
    also refuses an existing changelog of the table with another count: Faust writes a state to the
    changelog partition of its source record, and would crash on the first event of a partition the
    changelog lacks.
    """
    # The changelog is created here rather than by Faust at its start: so that a principal the ACLs keep
    # from creating topics is told, in one line before the worker joins, of every topic it lacks
    specs = worker_topic_specs(settings) if with_changelog else {n: {} for n in topic_names(settings)}
    # Existing topics (a shop's own clickstream topic, typically) are checked before any is created:
    # creating the others with the setting's count first would leave them in the way of the fix.
    counts = create_topics(settings, list(specs), check_counts_of=list(specs), configs_of=specs)
    if with_changelog:
        del counts[changelog_topic(settings)]  # refused above unless it has the setting's count
        refuse_a_deleting_changelog(settings)
    if len(set(counts.values())) != 1:
        raise TopicMismatch(f"topics must have equal partition counts, found {counts}")
    return counts


def refuse_a_deleting_changelog(settings: Settings) -> None:
    """Raise :class:`TopicMismatch` when the table's changelog (an operator's, say, made with their
    tooling's defaults) has a cleanup policy other than ``compact``.

    Under ``delete`` (Kafka's default) or ``compact,delete`` the broker drops segments older than
    ``retention.ms`` (7 days by default), and with them the last state of every user idle that long: a
    worker restoring from the changelog would start those users over, with nothing said. A principal
    without DESCRIBE_CONFIGS on the topic (not among the rights docs/OPERATIONS.md §ACLs asks for)
    leaves it unchecked, logged."""
    name = changelog_topic(settings)
    admin = admin_client(settings)
    try:
        found = admin.describe_configs(
            [ConfigResource(ConfigResourceType.TOPIC, name, {"cleanup.policy": None})], config_filter="all"
        )
    except KafkaError as exc:
        logger.info("cleanup.policy of %s not checked: %r", name, exc)
        return
    finally:
        admin.close()
    policy = found.get("topic", {}).get(name, {}).get("cleanup.policy", {}).get("value")
    if policy is None:
        logger.info("cleanup.policy of %s not checked: the broker did not say it", name)
        return
    if {p.strip() for p in policy.split(",")} != {"compact"}:
        raise TopicMismatch(
            f"the table's changelog {name} has cleanup.policy={policy}: the broker deletes its segments after "
            "retention.ms, and with them the states of users idle that long, which a restore would miss. Set "
            f"it to compact (kafka-configs.sh --alter --entity-type topics --entity-name {name} "
            "--add-config cleanup.policy=compact), as `demandstream topics --print` creates it"
        )


def worker_topic_specs(settings: Settings) -> dict[str, dict[str, str]]:
    """Every topic a worker needs, the table's changelog last, with the configs it is created with.

    >>> worker_topic_specs(Settings(demand_window_s=0))["demandstream-user-state-changelog"]["cleanup.policy"]
    'compact'
    """
    specs: dict[str, dict[str, str]] = {n: {} for n in topic_names(settings)}
    specs[changelog_topic(settings)] = changelog_topic_configs(settings)
    return specs


def worker_topics(settings: Settings) -> tuple[list[str], list[str]]:
    """Create every topic a worker of ``settings`` needs (:func:`ensure_topics` with the changelog), as
    ``demandstream topics`` does for operators whose workers may not create topics; return the names
    created and those that were there already."""
    admin = admin_client(settings)
    try:
        before = set(admin.list_topics())
    finally:
        admin.close()
    ensure_topics(settings, with_changelog=True)
    names = list(worker_topic_specs(settings))
    return [n for n in names if n not in before], [n for n in names if n in before]


def kafka_topics_commands(settings: Settings) -> list[str]:
    """The ``kafka-topics.sh`` commands that create what :func:`worker_topics` creates, for operators who
    keep topics as code (``demandstream topics --print``; nothing is contacted).

    >>> for c in kafka_topics_commands(Settings(demand_window_s=0, partitions=12, replication=3))[-2:]:
    ...     print(c)
    kafka-topics.sh --bootstrap-server 127.0.0.1:9092 --create --topic clickstream-dlq --partitions 12 --replication-factor 3
    kafka-topics.sh --bootstrap-server 127.0.0.1:9092 --create --topic demandstream-user-state-changelog --partitions 12 --replication-factor 3 --config cleanup.policy=compact --config max.compaction.lag.ms=86400000
    """
    base = f"kafka-topics.sh --bootstrap-server {','.join(settings.bootstrap_servers)} --create --topic"
    rf = f" --replication-factor {settings.replication}" if settings.replication else ""
    return [
        f"{base} {n} --partitions {settings.partitions}{rf}"
        + "".join(f" --config {k}={v}" for k, v in c.items())
        for n, c in worker_topic_specs(settings).items()
    ]


def refuse_other_counts(settings: Settings, counts: dict[str, int]) -> None:
    """Raise :class:`TopicMismatch` naming the existing topics whose partition count is not the setting's."""
    other = {n: c for n, c in counts.items() if c != settings.partitions}
    if not other:
        return
    found = ", ".join(f"{n} has {c}" for n, c in other.items())
    changelog = changelog_topic(settings)
    if changelog in other:
        raise TopicMismatch(
            f"the table's changelog {changelog} has {other[changelog]} partitions, not the worker's "
            f"{settings.partitions} ({found}): the states of app id {settings.app_id} were kept with "
            f"{other[changelog]}; set DEMANDSTREAM_PARTITIONS={other[changelog]} (and topics of that count), "
            "or start a new table under another DEMANDSTREAM_APP_ID (`demandstream migrate` builds one "
            "from the input topic)"
        )
    raise TopicMismatch(
        f"existing topics have another partition count than the worker's {settings.partitions} "
        f"({found}): set DEMANDSTREAM_PARTITIONS to theirs (every topic of a worker, its changelog "
        "included, has one count), or name other topics"
    )


#: How long a just-created topic may take to appear in every broker's metadata. On a multi-broker
#: cluster, describing it right after creation can reach a broker that does not know it yet.
TOPIC_READY_TIMEOUT_S = 30.0
_UNKNOWN_TOPIC = 3  # Kafka error code UNKNOWN_TOPIC_OR_PARTITION
_TOPIC_AUTHORIZATION_FAILED = 29


def wait_for_topics(admin: KafkaAdminClient, names: list[str]) -> dict[str, int]:
    """:func:`partition_counts`, retried while a broker still reports a topic as unknown."""
    deadline = time.monotonic() + TOPIC_READY_TIMEOUT_S
    while True:
        try:
            return partition_counts(admin, names)
        except UnknownTopic:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


class UnknownTopic(KafkaError):
    """A broker does not (yet) know one of the topics."""


def partition_counts(admin: KafkaAdminClient, names: list[str]) -> dict[str, int]:
    out = {}
    for t in admin.describe_topics(names):
        name = t["name"]
        code = t.get("error_code", 0)
        if code == _UNKNOWN_TOPIC:
            raise UnknownTopic(f"topic {name} is unknown to the broker")
        if code == _TOPIC_AUTHORIZATION_FAILED:
            raise TopicRefused(
                f"the cluster's ACLs do not let this principal describe topic {name}: grant it DESCRIBE "
                "(docs/OPERATIONS.md §ACLs)"
            )
        if code:
            raise KafkaError(f"describe {name}: error {code}")
        out[name] = len(t["partitions"])
    return out


def changelog_topic(settings: Settings, app_id: str | None = None) -> str:
    """The state table's changelog topic, as Faust names it for an app id (default: the configured one).

    >>> changelog_topic(Settings(), "demandstream-v2")
    'demandstream-v2-user-state-changelog'
    """
    return f"{app_id or settings.app_id}-{settings.table}-changelog"


def changelog_topic_configs(settings: Settings) -> dict[str, str]:
    """The configs a worker's Faust gives the changelog it creates: compacted (one record per user),
    with ``stream/worker/app.py``'s ``changelog_topic_configs`` (tests/unit/stream/tools/test_migrate.py
    checks that the two agree); ``demandstream migrate`` creates a green table's changelog with them.

    >>> changelog_topic_configs(Settings())
    {'cleanup.policy': 'compact', 'max.compaction.lag.ms': '86400000'}
    """
    return {
        "cleanup.policy": "compact",
        "max.compaction.lag.ms": str(int(settings.changelog_max_compaction_lag_s * 1000)),
    }


def create_changelog_topic(settings: Settings, name: str, partitions: int) -> None:
    """Create a table changelog as the worker would (:func:`changelog_topic_configs`,
    ``settings.replication``), with the input topic's partition count; wait until it is known."""
    admin = admin_client(settings)
    try:
        admin.create_topics(
            {
                name: {
                    "num_partitions": partitions,
                    "replication_factor": replication_factor(settings),
                    "configs": changelog_topic_configs(settings),
                }
            }
        )
        logger.info("created changelog topic %s (%d partitions)", name, partitions)
        wait_for_topics(admin, [name])
    finally:
        admin.close()
