"""What the worker's Kafka principal may do, asked of the cluster before the worker joins, and the one
line for each right its ACLs refuse (docs/OPERATIONS.md §ACLs).

Topic creation is :mod:`demandstream.stream.admin`'s (``TopicRefused`` when the principal may not
create); here are the rights whose lack Faust would not name: the consumer group, the transactional ids
of exactly-once, and writes to a topic the principal may only read (:func:`topic_refused`, for the crash
``stream/worker/run.py`` turns into a line).
"""

from __future__ import annotations

import logging
import time

from kafka import KafkaProducer
from kafka.errors import GroupAuthorizationFailedError, KafkaError, TransactionalIdAuthorizationFailedError

from demandstream.model.errors import UserError
from demandstream.stream.admin import admin_client
from demandstream.stream.settings import Settings

logger = logging.getLogger(__name__)


class NotAuthorized(UserError, RuntimeError):
    """The cluster's ACLs refuse the principal a right the worker needs: one line naming the right."""


#: The transactional id :func:`check_worker_rights` initialises under exactly-once: under the app id's
#: prefix, as Faust's own ids (``{app id}-{topic group}-{partition}``), and never one of them, which
#: would fence a running worker's transaction.
RIGHTS_CHECK_TRANSACTIONAL_ID = "{app_id}-rights-check"
#: How many times, a second apart, the group check asks a cluster that has no group coordinator yet.
RIGHTS_CHECK_ATTEMPTS = 10
#: How long the transactional check may wait for the cluster's transaction coordinator (created on the
#: first use of transactions on a fresh cluster).
RIGHTS_CHECK_TIMEOUT_MS = 30_000


def group_refused(settings: Settings) -> NotAuthorized:
    return NotAuthorized(
        f"the cluster's ACLs do not let {settings.principal} use consumer group {settings.app_id} (the "
        "app id): grant it READ on that group (docs/OPERATIONS.md §ACLs)"
    )


def transactional_ids_refused(settings: Settings) -> NotAuthorized:
    return NotAuthorized(
        f"the cluster's ACLs do not let {settings.principal} write with transactional ids prefixed "
        f"{settings.app_id}-, which --guarantee exactly_once uses: grant it WRITE on TRANSACTIONAL_ID "
        f"{settings.app_id} with a prefixed pattern (docs/OPERATIONS.md §ACLs)"
    )


def topic_refused(settings: Settings, topic: str) -> NotAuthorized:
    return NotAuthorized(
        f"the cluster's ACLs refused {settings.principal} an operation on topic {topic or '(unnamed)'}: a "
        "worker needs READ, WRITE and DESCRIBE on each of its topics, its changelog included "
        "(docs/OPERATIONS.md §ACLs)"
    )


def check_worker_rights(settings: Settings) -> None:
    """Ask the broker, before the worker joins, for the rights whose lack Faust would not name.

    Without READ on its consumer group a worker waits for an assignment forever, saying nothing (aiokafka
    keeps the coordinator's authorization error for a ``getmany`` that Faust's fetcher never calls).
    Without WRITE on its transactional ids an exactly-once worker passes ``/readyz`` and crashes on its
    first event ("No transaction producer found"). Both are asked here without side effects on the group:
    its committed offsets are listed (the group's DESCRIBE, which READ implies), and under exactly-once
    a producer initialises :data:`RIGHTS_CHECK_TRANSACTIONAL_ID`. Raises :class:`NotAuthorized`.
    """
    check_group(settings)
    if settings.guarantee == "exactly_once":
        check_transactional_ids(settings)


def check_group(settings: Settings) -> None:
    """:class:`NotAuthorized` unless the principal may use the consumer group (the app id)."""
    admin = admin_client(settings)
    try:
        for attempt in range(RIGHTS_CHECK_ATTEMPTS):
            try:
                admin.list_group_offsets({settings.app_id: None})
                break
            except GroupAuthorizationFailedError:
                raise group_refused(settings) from None
            except KafkaError as exc:
                # a fresh cluster has no group coordinator for a second or two (retriable); anything
                # else is the worker's to meet, and say, as before the check
                if not exc.retriable or attempt == RIGHTS_CHECK_ATTEMPTS - 1:
                    logger.info("consumer group rights not checked: %r", exc)
                    break
                time.sleep(1.0)
    finally:
        admin.close()


def check_transactional_ids(settings: Settings) -> None:
    """:class:`NotAuthorized` unless the principal may write with transactional ids under the app id."""
    producer = KafkaProducer(
        bootstrap_servers=settings.bootstrap_servers,
        client_id="demandstream-rights-check",
        transactional_id=RIGHTS_CHECK_TRANSACTIONAL_ID.format(app_id=settings.app_id),
        max_block_ms=RIGHTS_CHECK_TIMEOUT_MS,
        **settings.kafka_python_security(),
    )
    try:
        producer.init_transactions()
    except TransactionalIdAuthorizationFailedError:
        raise transactional_ids_refused(settings) from None
    except KafkaError as exc:
        logger.info("transactional id rights not checked: %r", exc)
    finally:
        producer.close(timeout=5)
