"""Poison records (issue #13, items 1 and 2): input that used to kill the worker on every restart.

1. *Ids that collide with the store's own keys.* Faust's RocksDB store keeps a table partition's
   changelog offset under the key ``b"__faust\\0offset__"``, in the same key space as the table's keys.
   A user with exactly that id (a valid id) must get its signals and its state like any other user,
   and the worker must restart cleanly afterwards (it used to parse the packed state as the offset).
2. *Records too big to copy.* A ~1 MB key with a control-character value, a ~1 MB key on a valid
   event, a 1 MB control-character value, keys just over and at the key cap: each becomes one dead
   letter that fits the output topic (the dead letter of a 1 MB key used to be larger than the broker
   accepts, so producing it raised, the worker died, and the record came back after every restart).

Each test runs two phases against one worker, with a SIGKILL and a restart on the same data dir in
between, under both guarantees, and ends in :func:`~tests.integration.faults.check_invariants`: the
worker is alive, every good event has its signal, every user's state equals the offline reference, and
every record is accounted for as a signal or a dead letter. A third test sends batches that hypothesis
draws from the engine's property test (tests/unit/stream/engine/test_poison.py) through one worker.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import random
import time
import urllib.parse

import orjson
import pytest
from faust.stores.rocksdb import Store
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from kafka import KafkaProducer

from demandstream.model.core.events import Event, event_to_json
from demandstream.stream.engine.records import DLQ_KEY_MAX, RECORD_MAX
from demandstream.stream.settings import Settings
from tests.conftest import WorkerProcess
from tests.integration.faults import (
    FAULT_ENV,
    FaultReport,
    TopicReader,
    check_invariants,
    reference_states,
    synth_events,
)
from tests.integration.test_faults_badinput import expected_reason
from tests.unit.stream.engine.test_poison import hostile_events, poison

pytestmark = [pytest.mark.kafka, pytest.mark.slow, pytest.mark.timeout(600)]

N_USERS, N_EVENTS, SEED = 200, 2000, 31
#: The key under which Faust's RocksDB store keeps the changelog offset.
FAUST_OFFSET_KEY = Store.offset_key
#: Valid user ids that look like keys: Faust's own, one that looks namespaced, control characters.
COLLIDING_IDS = [FAUST_OFFSET_KEY.decode(), "u:u0", "\x00\x01\x7f"]
#: Events per colliding user in each phase.
PER_PHASE = 6
#: Just under the broker's default max.message.bytes (1,048,588) with a 4 KiB value beside it.
HUGE = 1_040_000
#: Bound for waiting on one phase's outputs.
PHASE_TIMEOUT_S = 120


def ts0() -> float:
    return synth_events(N_USERS, N_EVENTS, SEED)[0].ts


def colliding_events(phase: int) -> list[Event]:
    """Valid events of the colliding users, a few per phase, with past timestamps."""
    out = []
    for j, uid in enumerate(COLLIDING_IDS):
        for i in range(PER_PHASE):
            n = phase * PER_PHASE + i
            out.append(Event(f"c{j}-{n}", uid, ts0() + n, "view", f"i{n % 3}", "apparel.hat", 10.0 + n))
    return out


def long_category_events(phase: int) -> list[Event]:
    """A user whose categories are 12 KB of escaped control characters each (valid, under 16 KiB)."""
    return [
        Event(
            f"lc-{phase}-{i}",
            "long-categories",
            ts0() + 100 * phase + i,
            "view",
            "i1",
            "\x01" * 2000 + f"-{i}",
        )
        for i in range(5)
    ]


def poison_records(phase: int) -> list[tuple[bytes | None, bytes]]:
    """Records whose dead letters used not to fit (or to be 6x their cap), as (key, value)."""
    valid = event_to_json(Event(f"x{phase}", "u1", ts0(), "view", "i1", None, None))
    return [
        (b"k" * HUGE, b"\x01" * 4096),  # 1 MB key, 4 KiB of control characters: not_json
        (b"\xff" * HUGE, valid),  # 1 MB of non-UTF-8 key on a valid event: key_mismatch
        (b"u1", b"\x01" * 4096),  # a 25 KB dead letter before escaping was bounded
        (b"u2", b"\x01" * HUGE),  # too_large, 1 MB of control characters
        (b"\x00" * 600, b"{oops"),  # a key just over the cap
        (b"\x01" * 512, b"{oops"),  # a key at the cap
    ]


class Pipeline:
    """One worker (restarted on the same node) and a producer that can send 1 MB records."""

    def __init__(self, worker_factory, stream_env, kafka_bootstrap, guarantee: str):
        self.env = {"DEMANDSTREAM_GUARANTEE": guarantee, **FAULT_ENV}
        self.node = {
            "DEMANDSTREAM_WEB_PORT": stream_env["DEMANDSTREAM_WEB_PORT"],
            "DEMANDSTREAM_DATA_DIR": stream_env["DEMANDSTREAM_DATA_DIR"],
        }
        self.factory = worker_factory
        self.settings = Settings.from_env(stream_env | self.env)
        self.bootstrap = kafka_bootstrap
        self.worker: WorkerProcess = worker_factory(**self.env, **self.node).start()
        self.worker.wait_ready()
        self.producer = KafkaProducer(
            bootstrap_servers=[kafka_bootstrap], acks="all", linger_ms=5, max_request_size=2 * HUGE
        )
        self.records_in = 0
        self.bad: dict[tuple[int, int], tuple[bytes | None, bytes, str]] = {}

    def send(
        self, events: list[Event], bad: list[tuple[bytes | None, bytes]], rng: random.Random
    ) -> set[str]:
        """Produce ``events`` in order with ``bad`` records at random places; return the event ids."""
        items: list = [(e.user_id.encode(), event_to_json(e), None) for e in events]
        for key, value in bad:
            items.insert(rng.randrange(len(items) + 1), (key, value, expected_reason(key, value)))
        futures = [
            (self.producer.send(self.settings.topic_input, key=k, value=v), k, v, r) for k, v, r in items
        ]
        self.producer.flush(timeout=120)
        for fut, key, value, reason in futures:
            md = fut.get(timeout=30)
            if reason is not None:
                self.bad[(md.partition, md.offset)] = (key, value, reason)
        self.records_in += len(items)
        return {e.event_id for e in events}

    def wait_outputs(self, event_ids: set[str]) -> None:
        """Until every event has a signal and every bad record its dead letter; fail at once if the worker died."""
        isolation = "read_committed" if self.settings.guarantee == "exactly_once" else "read_uncommitted"
        sig = TopicReader(self.bootstrap, self.settings.topic_signals, isolation)
        dlq = TopicReader(self.bootstrap, self.settings.topic_dlq, isolation)
        try:
            deadline = time.monotonic() + PHASE_TIMEOUT_S
            while True:
                sig.poll()
                dlq.poll()
                seen = {orjson.loads(r.value)["event_id"] for r in sig.records}
                dead = {
                    (orjson.loads(r.value)["partition"], orjson.loads(r.value)["offset"]) for r in dlq.records
                }
                if event_ids <= seen and set(self.bad) <= dead:
                    return
                w = self.worker
                assert w.proc.poll() is None, f"the worker died (exit {w.proc.returncode}):\n{w.log_tail()}"
                assert time.monotonic() < deadline, (
                    f"after {PHASE_TIMEOUT_S} s: {len(event_ids - seen)} events without a signal, "
                    f"{len(set(self.bad) - dead)} bad records without a dead letter:\n{w.log_tail()}"
                )
        finally:
            sig.close()
            dlq.close()

    def crash_and_restart(self) -> None:
        time.sleep(1.0)  # the last batch's local writes follow its acks/commit
        self.worker.kill()
        self.worker = self.factory(**self.env, **self.node).start()
        self.worker.wait_ready()

    def close(self) -> None:
        self.producer.close()

    def check_dead(self, dead: list[dict]) -> list[str]:
        problems = []
        for d in dead:
            want = self.bad.get((d["partition"], d["offset"]))
            if want is None:
                problems.append(f"dead letter for a valid record at {d['partition']}/{d['offset']}")
            elif d["reason"] != want[2]:
                problems.append(f"dead letter at {d['offset']}: reason {d['reason']}, expected {want[2]}")
        return problems

    def output_sizes(self) -> list[str]:
        """Every record the worker wrote to its output topics fits the bound; over-long keys are hashed."""
        problems = []
        for topic in (self.settings.topic_signals, self.settings.topic_dlq):
            reader = TopicReader(self.bootstrap, topic, "read_uncommitted")
            try:
                for r in reader.read_until(lambda recs: True, 30, idle_s=2):
                    size = len(r.key or b"") + len(r.value or b"")
                    if size > RECORD_MAX:
                        problems.append(f"{topic} {r.partition}/{r.offset}: {size} bytes > {RECORD_MAX}")
                    if topic == self.settings.topic_dlq:
                        d = orjson.loads(r.value)
                        key = self.bad[(d["partition"], d["offset"])][0]
                        want = None if key is None else hashlib.sha256(key).hexdigest()
                        if d["key_sha256"] != want or r.key != (key if key is None else key[:DLQ_KEY_MAX]):
                            problems.append(
                                f"dead letter at {d['offset']}: key or key_sha256 is not the key's"
                            )
                        if d["key_truncated"] != (key is not None and len(key) > DLQ_KEY_MAX):
                            problems.append(
                                f"dead letter at {d['offset']}: key_truncated={d['key_truncated']}"
                            )
            finally:
                reader.close()
        return problems


def two_phases(
    name: str, guarantee: str, worker_factory, stream_env, kafka_bootstrap, small_model, extra, bad
) -> Pipeline:
    """Phase 0, SIGKILL and restart, phase 1; then every invariant of the fault tests."""
    started = time.time()
    good = synth_events(N_USERS, N_EVENTS, SEED)
    halves = [list(good[: N_EVENTS // 2]) + extra(0), list(good[N_EVENTS // 2 :]) + extra(1)]
    events = halves[0] + halves[1]
    reference_states(small_model, events)
    rng = random.Random(f"{SEED}-{name}-{guarantee}")
    p = Pipeline(worker_factory, stream_env, kafka_bootstrap, guarantee)
    try:
        p.wait_outputs(p.send(halves[0], bad(0), rng))
        p.crash_and_restart()
        p.wait_outputs(p.send(halves[1], bad(1), rng))
    finally:
        p.close()
    report = FaultReport(
        name, guarantee, len(events), N_USERS, garbage=len(p.bad), faults=["SIGKILL between phases"]
    )
    check_invariants(
        report,
        bootstrap=kafka_bootstrap,
        settings=p.settings,
        model_path=small_model,
        events=events,
        records_in=p.records_in,
        started=started,
        check_dead=p.check_dead,
    )
    assert report.duplicates == 0 or guarantee == "at_least_once"
    assert not p.output_sizes()
    assert p.worker.proc.poll() is None, f"the worker died:\n{p.worker.log_tail()}"
    return p


@pytest.mark.parametrize("guarantee", ["at_least_once", "exactly_once"])
def test_ids_colliding_with_store_keys(guarantee, worker_factory, stream_env, kafka_bootstrap, small_model):
    p = two_phases(
        "colliding ids",
        guarantee,
        worker_factory,
        stream_env,
        kafka_bootstrap,
        small_model,
        colliding_events,
        lambda phase: [],
    )
    for uid in COLLIDING_IDS:  # the served view finds each of them, not Faust's bookkeeping
        status, body = p.worker.get(f"/users/{urllib.parse.quote(uid, safe='')}/demand")
        assert status == 200, (uid, body)
        assert orjson.loads(body)["events_seen"] == 2 * PER_PHASE


@pytest.mark.parametrize("guarantee", ["at_least_once", "exactly_once"])
def test_oversized_records(guarantee, worker_factory, stream_env, kafka_bootstrap, small_model):
    two_phases(
        "oversized records",
        guarantee,
        worker_factory,
        stream_env,
        kafka_bootstrap,
        small_model,
        long_category_events,
        poison_records,
    )


#: Generated batches sent to one worker: each waits for its outputs (a few seconds), so the whole test,
#: worker start included, stays under a minute. No shrinking: a failure reports the batch as drawn.
GENERATED_BATCHES = 3


def test_generated_poison_through_a_worker(worker_factory, stream_env, kafka_bootstrap, small_model):
    """The engine's property test (tests/unit/stream/engine/test_poison.py) on the real broker."""
    started = time.time()
    p = Pipeline(worker_factory, stream_env, kafka_bootstrap, "at_least_once")
    events: list[Event] = []
    ids = itertools.count()
    rng = random.Random(SEED)

    @settings(
        max_examples=GENERATED_BATCHES,
        deadline=None,
        phases=[Phase.generate],
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(st.lists(hostile_events | poison, min_size=8, max_size=20))
    def one_batch(items):
        good = [dataclasses.replace(e, event_id=f"h{next(ids)}") for e in items if isinstance(e, Event)]
        bad = [i for i in items if not isinstance(i, Event) and i != (None, None)]  # a client sends neither
        p.wait_outputs(p.send(good, bad, rng))
        events.extend(good)

    try:
        one_batch()
    finally:
        p.close()
    users = {e.user_id for e in events}
    report = FaultReport("generated poison", "at_least_once", len(events), len(users), garbage=len(p.bad))
    check_invariants(
        report,
        bootstrap=kafka_bootstrap,
        settings=p.settings,
        model_path=small_model,
        events=events,
        records_in=p.records_in,
        started=started,
        check_dead=p.check_dead,
    )
    assert not p.output_sizes()
    assert p.worker.proc.poll() is None, f"the worker died:\n{p.worker.log_tail()}"
