"""The exactly-once commit guard: an offset commit never lands inside a micro-batch."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from demandstream.stream.worker.agents import Pipeline
from demandstream.stream.worker.faust_patches import guard_commits


class FakeConsumer:
    """Records the order of chunk starts, acks and commits as the event loop interleaves them."""

    def __init__(self, log: list):
        self.log = log

    def ack(self, message) -> None:
        self.log.append(("ack", message))

    async def commit(self, *args, **kwargs) -> bool:
        self.log.append(("commit", None))
        await asyncio.sleep(0)  # a real commit awaits the broker
        return True


def make_pipeline(log: list, batch_max: int) -> Pipeline:
    consumer = FakeConsumer(log)
    pipeline = object.__new__(Pipeline)  # only what handle_messages touches
    pipeline.c = SimpleNamespace(app=SimpleNamespace(consumer=consumer))
    pipeline.settings = SimpleNamespace(batch_max=batch_max)
    pipeline.batch_lock = asyncio.Lock()

    async def process(chunk):
        log.append(("start", chunk[0]))
        for _ in range(5):  # outputs go out over several awaits, as produce_transactional's do
            await asyncio.sleep(0)

    pipeline.process = process
    return pipeline


def commits_inside_chunks(log: list) -> int:
    """Commits seen after a chunk started and before all of its records were acked."""
    inside, open_acks = 0, 0
    for kind, _ in log:
        if kind == "start":
            open_acks = 4
        elif kind == "ack":
            open_acks -= 1
        elif kind == "commit" and open_acks:
            inside += 1
    return inside


async def run(guarded: bool) -> list:
    log: list = []
    pipeline = make_pipeline(log, batch_max=4)
    consumer = pipeline.c.app.consumer
    if guarded:
        guard_commits(consumer, pipeline.batch_lock)
    done = asyncio.Event()

    async def committer():  # Faust's commit timer, here as fast as the loop allows
        while not done.is_set():
            await consumer.commit()
            await asyncio.sleep(0)

    task = asyncio.create_task(committer())
    await pipeline.handle_messages(list(range(40)))
    done.set()
    await task
    return log


def test_unguarded_commit_lands_inside_a_chunk():
    # the failure the guard exists for: without it the timer commits half-way through a chunk
    assert commits_inside_chunks(asyncio.run(run(guarded=False))) > 0


def test_guarded_commit_waits_for_the_chunk_to_be_acked():
    log = asyncio.run(run(guarded=True))
    assert sum(1 for k, _ in log if k == "commit") > 1
    assert [m for k, m in log if k == "ack"] == list(range(40))
    assert commits_inside_chunks(log) == 0


def test_a_chunk_cancelled_half_way_runs_to_its_last_ack_before_the_cancellation_and_a_commit():
    """Shutdown cancels the fetcher, then commits: never between a chunk's first output and last ack.

    A graceful stop cancels the task that runs handle_messages and then commits what was acked; under
    exactly-once the commit takes the partitions' transactions with it. A chunk cut off half-way left
    part of its outputs in the committed transaction without its offsets (duplicate signals).
    """

    async def scenario() -> list:
        log: list = []
        pipeline = make_pipeline(log, batch_max=4)
        consumer = pipeline.c.app.consumer
        guard_commits(consumer, pipeline.batch_lock)
        task = asyncio.create_task(pipeline.handle_messages(list(range(12))))
        while ("start", 4) not in log:  # the second chunk is producing its outputs
            await asyncio.sleep(0)
        task.cancel()
        await asyncio.sleep(0)
        commit = asyncio.create_task(consumer.commit())  # the shutdown's commit, waiting for the lock
        with pytest.raises(asyncio.CancelledError):
            await task
        await commit
        return log

    log = asyncio.run(scenario())
    assert [m for k, m in log if k == "ack"] == list(range(8))  # the cut chunk finished, no third one
    assert [k for k, _ in log][-1] == "commit"
    assert commits_inside_chunks(log) == 0


@pytest.mark.parametrize("crashed", [False, True])
def test_on_commit_applies_staged_states_only_if_the_transaction_committed(crashed):
    from faust.types import TP

    from demandstream.stream.worker.store import StateStore

    written = {}
    store = StateStore(table=None)
    store.write_local = lambda values: written.update(values)
    store.stage({b"u1": (0, b"s1"), b"u2": (1, b"s2")})
    pipeline = object.__new__(Pipeline)
    pipeline.exactly_once = True
    pipeline.store = store
    pipeline.settings = SimpleNamespace(topic_input="clickstream", topic_control="clickstream-control")
    pipeline.c = SimpleNamespace(app=SimpleNamespace(crashed=crashed))

    pipeline.on_commit({TP("clickstream", 0): 10})

    assert written == ({} if crashed else {b"u1": (0, b"s1")})
    # partition 1 did not commit either way: its state stays staged for its own transaction
    assert store._staged == {1: {b"u2": b"s2"}}


def test_a_stopped_producer_of_another_topic_group_drops_nothing():
    from demandstream.stream.worker.store import StateStore

    store = StateStore(table=None)
    store.stage({b"u0": (0, b"s0")})
    pipeline = object.__new__(Pipeline)
    pipeline.store = store
    pipeline.settings = SimpleNamespace(topic_input="clickstream")
    pipeline.c = SimpleNamespace(
        app=SimpleNamespace(
            conf=SimpleNamespace(id="app-1"), assignor=SimpleNamespace(group_for_topic=lambda t: 1)
        )
    )
    pipeline.on_transaction_abandoned("app-1-0-0")  # Faust's leader topic, group 0, partition 0
    pipeline.on_transaction_abandoned("other-1-0")
    assert store._staged == {0: {b"u0": b"s0"}}
    pipeline.on_transaction_abandoned("app-1-1-0")
    assert store._staged == {}


def test_revoked_partitions_lose_their_lag_gauge():
    """A revoked partition's lag is another worker's to report: its gauge label goes (issue #13 item 7)."""
    from faust.types import TP

    from demandstream.stream.worker.metrics import Metrics

    pipeline = object.__new__(Pipeline)
    pipeline.metrics = Metrics()
    pipeline.settings = SimpleNamespace(topic_input="clickstream")
    for p in (0, 1, 2):
        pipeline.metrics.consumer_lag.labels(str(p)).set(10 + p)
    pipeline.on_partitions_revoked(
        {TP("clickstream", 0), TP("clickstream", 2), TP("other", 1), TP("clickstream", 3)}
    )
    exported = pipeline.metrics.exposition().decode()
    assert 'demandstream_consumer_lag{partition="1"} 11.0' in exported
    assert 'partition="0"' not in exported and 'partition="2"' not in exported
