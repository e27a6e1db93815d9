"""Batch delivery: input records go from the consumer to the pipeline a fetch at a time.

Faust hands every record to its streams one by one: its drain loop awaits
``wait_first(callback(message), suspend_flow.wait())`` per record (two tasks and an ``asyncio.wait``
each), then the conductor builds an Event, queues it, and the stream dequeues it. On this machine
that path tops out around 2-3k records/s (shared/PERF-ANCHORS.md), an order of magnitude below the
Kafka client. Our work is batched anyway, so :func:`install` replaces the consumer's drain loop with
one that collects each fetch's records of the *input topic* and gives them to the pipeline as one
list. Everything else is Faust's as before: records of other topics (table changelogs during
recovery and standby) take Faust's per-record path, and input records are tracked and acked exactly
as a Faust stream does (``_unacked_messages``, ``Consumer.ack``), so offset commits, ``wait_empty``
on rebalance and graceful shutdown keep working.
"""

from __future__ import annotations

import asyncio
import logging
import types
from collections.abc import Awaitable, Callable

from faust.transport.consumer import CONSUMER_FETCHING

logger = logging.getLogger(__name__)

BatchHandler = Callable[[list], Awaitable[None]]


def install(app, input_topic: str, handler: BatchHandler) -> None:
    """Make ``app``'s consumer deliver ``input_topic`` records to ``handler`` in fetch-sized lists."""
    consumer = app.consumer
    consumer._drain_messages = types.MethodType(_make_drain(input_topic, handler), consumer)


def _make_drain(input_topic: str, handler: BatchHandler):
    async def _drain_messages(self, fetcher) -> None:  # bound to faust's Consumer
        # Mirrors faust.transport.consumer.Consumer._drain_messages (faust-streaming 0.15) except
        # for the batch path; keep the two in step when upgrading Faust.
        callback = self.callback
        getmany = self.getmany
        consumer_should_stop = self._stopped.is_set
        fetcher_should_stop = fetcher._stopped.is_set
        get_read_offset = self._read_offset.__getitem__
        set_read_offset = self._read_offset.__setitem__
        app = self.app
        add_unacked = self._unacked_messages.add
        on_message_in = self._on_message_in
        acks_enabled_for = app.topics.acks_enabled_for
        commit_every = self._commit_every
        try:
            while not (consumer_should_stop() or fetcher_should_stop()):
                self.diag.set_flag(CONSUMER_FETCHING)
                ait = getmany(timeout=1.0)
                await asyncio.sleep(0)
                batch = []
                if not self.should_stop:
                    async for tp, message in ait:
                        offset = message.offset
                        r_offset = get_read_offset(tp)
                        if r_offset is not None and offset < r_offset:
                            continue  # already delivered (a seek back re-fetched it)
                        if r_offset and offset - r_offset > 1 and acks_enabled_for(message.topic):
                            # offsets skipped by the log (transaction markers, compaction) must
                            # count as acked, or the committed offset could never pass them
                            await self._add_gap(tp, r_offset + 1, offset)
                        if commit_every is not None and self._n_acked >= commit_every:
                            self._n_acked = 0
                            await self.commit()
                        if tp.topic == input_topic:
                            batch.append(message)
                        else:
                            await self.wait_first(callback(message), self.suspend_flow.wait())
                        set_read_offset(tp, offset)
                self.diag.unset_flag(CONSUMER_FETCHING)
                if batch:
                    # A rebalance while these were in flight makes them stale: their partitions may
                    # be someone else's now. Dropping them untracked is what Faust's streams do.
                    generation = app.consumer_generation_id
                    batch = [m for m in batch if m.generation_id == generation]
                    for m in batch:
                        m.tracked = True
                        add_unacked(m)
                        on_message_in(m.tp, m.offset, m)
                    if batch:
                        await handler(batch)
        except self.consumer_stopped_errors:
            if app.should_stop:
                logger.info("broker stopped consumer, shutting down")
                return
            raise
        except asyncio.CancelledError:
            if app.should_stop:
                return
            raise
        except Exception as exc:
            logger.exception("batch delivery crashed: %r", exc)
            raise

    return _drain_messages
