"""Workarounds for Faust bugs that would corrupt or lose table state; each names the bug it avoids.

Keep these few and small: they replace one method on one of the app's own objects, never Faust's
classes, and the tests that found them (tests/integration/test_faults_*.py) keep them honest when
Faust is upgraded.
"""

from __future__ import annotations

import logging
import types

logger = logging.getLogger(__name__)


def install(app) -> None:
    """Apply every workaround to ``app`` (call once its consumer exists)."""
    fix_transactional_highwaters(app.consumer._thread)
    fix_stale_transactional_producers(app.consumer.transactions, app.producer)


def fix_transactional_highwaters(thread) -> None:
    """Ask the broker for a changelog's end under exactly-once, instead of the fetcher's cached LSO.

    Under exactly-once, faust-streaming 0.15 takes a changelog partition's highwater from
    ``AIOKafkaConsumer.last_stable_offset(tp)``, which aiokafka only knows after it has fetched that
    partition in the current assignment; before, it is ``None`` and Faust's recovery uses -1 ("empty").
    A live worker that is given a partition in a rebalance then either crashes with
    ``ConsistencyError: persisted offset ... is higher than ... highwater (N > -1)`` (its standby copy
    has a persisted offset; faust-streaming/faust#158) or, with no local offset, skips recovery and
    applies new events to stale state. Found by the rebalance fault test under exactly-once.

    ``end_offsets`` sends ListOffsets with the consumer's isolation level, so under ``read_committed``
    the broker answers with the last stable offset: the same number, never missing.
    """

    async def _highwaters(self, partitions):
        return await self._ensure_consumer().end_offsets(partitions)

    thread._highwaters = types.MethodType(_highwaters, thread)


def fix_stale_transactional_producers(transactions, producer) -> None:
    """On every rebalance, stop the transactional producers of partitions this worker no longer owns.

    Faust (faust-streaming 0.15, ``TransactionManager.on_rebalance``) stops the producers of revoked
    partitions only if the partition is not a *standby* of this worker, and with standby replicas a
    partition that moves away usually stays here as a standby. Its producer is kept, the new owner's
    producer fences it, and when the partition comes back Faust reuses the fenced one ("Invalid state
    transition IN_TRANSACTION -> IN_TRANSACTION" in the log): the first send raises ProducerFenced and
    the worker crashes. Found by the rebalance fault test under exactly-once.

    Before Faust starts the producers of the new assignment, every producer whose transactional id
    is not one of the assignment's active partitions is stopped, so a partition that comes back gets
    a fresh producer (whose initialisation fences and aborts whatever the last owner left open).
    """
    on_rebalance = transactions.on_rebalance

    async def stop_stale_then_rebalance(assigned, revoked, newly_assigned):
        active = transactions._tps_to_transactional_ids(assigned)
        stale = sorted(set(producer._transaction_producers) - active)
        if stale:
            logger.info("stopping %d transactional producers of partitions no longer active here: %s",
                        len(stale), ", ".join(stale))
            for tid in stale:
                await producer.stop_transaction(tid)
        await on_rebalance(assigned, revoked, newly_assigned)

    transactions.on_rebalance = stop_stale_then_rebalance

    # Faust's "maybe" begin calls begin_transaction on producers that are already in one (those of the
    # partitions this worker keeps) and logs the refusal as a WARNING on every rebalance; skip them.
    maybe_begin = producer.maybe_begin_transaction

    async def begin_unless_open(transactional_id: str) -> None:
        txn = getattr(producer._transaction_producers.get(transactional_id), "_txn_manager", None)
        if txn is not None and txn.is_in_transaction():
            return
        await maybe_begin(transactional_id)

    producer.maybe_begin_transaction = begin_unless_open
