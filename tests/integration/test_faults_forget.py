"""``demandstream forget USER`` end to end: a tombstone in the changelog and a 404 from the worker.

The erasure request travels through the control topic; afterwards the user's latest changelog record
is a tombstone (so compaction removes the state from Kafka), the worker answers 404 for the user, and
every other user keeps its state. With standby replicas, the copy a second worker keeps of the user's
partition is deleted from its disk too.
"""

from __future__ import annotations

import collections
import subprocess
import sys
import time
import zlib
from collections.abc import Callable, Mapping
from pathlib import Path

import pytest
from kafka import KafkaProducer
from rocksdict import AccessType, Options, Rdict

from demandstream.model.core.events import event_to_json
from demandstream.model.core.state import unpack
from demandstream.model.data.synth import generate, write_jsonl
from demandstream.stream.engine.records import user_of_state_key
from demandstream.stream.partitioner import key_partition
from demandstream.stream.settings import Settings
from demandstream.stream.tools.replay import replay
from tests.conftest import REPO
from tests.integration.faults import TopicReader, changelog_topic, latest_states, wait_until

pytestmark = [pytest.mark.kafka, pytest.mark.slow, pytest.mark.timeout(300)]

N_USERS, N_EVENTS = 50, 1000


def forget_cli(user: str, env: Mapping[str, str]) -> None:
    """``demandstream forget USER`` as a user runs it, with the workers' environment; it must succeed."""
    proc = subprocess.run(
        [sys.executable, "-m", "demandstream.stream", "forget", user],
        env=dict(env),
        cwd=REPO,
        capture_output=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr.decode()


def all_applied(counts: Mapping[str, int]) -> Callable[[list], bool]:
    """Whether a changelog's records hold each user's state after all of its ``counts[user]`` events."""

    def done(recs: list) -> bool:
        latest = latest_states(recs)
        return all(latest.get(u) and unpack(latest[u]).events_seen == n for u, n in counts.items())

    return done


def test_forget_user_end_to_end(worker_factory, stream_env, kafka_bootstrap, tmp_path):
    s = Settings.from_env(stream_env)
    events = list(generate(N_USERS, N_EVENTS, seed=3))
    data = tmp_path / "events.jsonl"
    write_jsonl(events, data)
    counts = collections.Counter(e.user_id for e in events)
    victim = counts.most_common(1)[0][0]

    w = worker_factory().start()
    w.wait_ready()
    replay(s, [data], "jsonl", progress=False)
    reader = TopicReader(kafka_bootstrap, changelog_topic(s))
    try:
        applied = all_applied(counts)
        reader.read_until(applied, 120, idle_s=1)
        assert applied(reader.records)
        status, body = w.get(f"/users/{victim}/demand")
        assert status == 200, body

        t0 = time.time()
        forget_cli(victim, stream_env)

        reader.read_until(lambda recs: latest_states(recs).get(victim, b"") is None, 60, idle_s=1)
        latest = latest_states(reader.records)
    finally:
        reader.close()
    assert victim in latest and latest[victim] is None, (
        "the user's latest changelog record is not a tombstone"
    )
    wait_until(lambda: w.get(f"/users/{victim}/demand")[0] == 404, 30, "404 for the forgotten user")
    erased_s = time.time() - t0
    others = [u for u in counts if u != victim]
    assert all(latest[u] is not None and unpack(latest[u]).events_seen == counts[u] for u in others)
    assert w.get(f"/users/{others[0]}/demand")[0] == 200
    print(
        f"\nFAULT FIGURES forget: {counts[victim]} events of the user erased, tombstone + 404 in {erased_s:.1f} s"
    )


def users_on_disk(data_dir: str) -> set[str] | None:
    """Users whose state a worker's RocksDB holds, active and standby partitions alike (None: unreadable now).

    Opened read-only beside the running worker (RocksDB allows it; the WAL is replayed, so unflushed
    writes are seen); a file the worker compacts away meanwhile makes it unreadable for this round.
    """
    users: set[str] = set()
    for db_path in sorted(Path(data_dir).glob("v1/tables/*.db")):
        try:
            db = Rdict(str(db_path), Options(raw_mode=True), access_type=AccessType.read_only())
        except Exception:  # noqa: BLE001 - rocksdict raises its own generic exception
            return None
        try:
            users.update(u for u in map(user_of_state_key, db.keys()) if u is not None)
        finally:
            db.close()
    return users


def test_forget_reaches_the_standby_copy(worker_factory, stream_env, kafka_bootstrap, tmp_path):
    # A standby writes its copy to disk every DEMANDSTREAM_STANDBY_BUFFER changelog records of a partition
    # (and when promoted or stopped); 1 makes every record visible on disk at once, so the test can
    # watch the copy appear and go instead of stopping the workers to flush it.
    env = {"DEMANDSTREAM_STANDBY_REPLICAS": "1", "DEMANDSTREAM_STANDBY_BUFFER": "1"}
    s = Settings.from_env(stream_env | env)
    events = list(generate(N_USERS, N_EVENTS, seed=5))
    data = tmp_path / "events.jsonl"
    write_jsonl(events, data)
    counts = collections.Counter(e.user_id for e in events)
    victim = counts.most_common(1)[0][0]

    workers = [worker_factory(**env).start() for _ in range(2)]
    for w in workers:
        w.wait_ready()
    dirs = [w.env["DEMANDSTREAM_DATA_DIR"] for w in workers]
    replay(s, [data], "jsonl", progress=False)

    # Two workers, four partitions, one standby: each worker's disk holds every user, half of them as
    # standby copies. Only then does "the standby's copy is gone" say anything.
    wait_until(
        lambda: all((users_on_disk(d) or set()) >= set(counts) for d in dirs),
        120,
        "both workers' disks to hold every user (active or standby)",
    )
    forget_cli(victim, stream_env | env)
    reader = TopicReader(kafka_bootstrap, changelog_topic(s))
    try:
        reader.read_until(lambda recs: latest_states(recs).get(victim, b"") is None, 60, idle_s=1)
    finally:
        reader.close()

    def erased_everywhere() -> bool:
        on_disk = [users_on_disk(d) for d in dirs]
        return all(u is not None and victim not in u for u in on_disk)

    wait_until(erased_everywhere, 30, "the forgotten user to leave both workers' disks")
    others = set(counts) - {victim}
    assert all((users_on_disk(d) or set()) >= others for d in dirs), "other users lost from a worker's disk"
    for w in workers:
        assert w.get(f"/users/{victim}/demand")[0] == 404
        assert w.proc.poll() is None, w.log_tail()


def test_forget_and_the_view_follow_a_crc32_producer(worker_factory, stream_env, kafka_bootstrap, tmp_path):
    # A shop whose producers run librdkafka's default partitioner (CRC32) and say so in
    # DEMANDSTREAM_PARTITIONER: the erasure must reach the partition holding the user's state, and the
    # router must send the view to the worker owning it. The victim's records are placed here with
    # zlib's CRC32, librdkafka's `consistent_random`, not with the product's own function; half of the
    # other users come through `demandstream replay`, which must place them the same way.
    env = {"DEMANDSTREAM_PARTITIONER": "crc32"}
    s = Settings.from_env(stream_env | env)
    n = s.partitions
    events = list(generate(N_USERS, N_EVENTS, seed=7))
    counts = collections.Counter(e.user_id for e in events)
    moved = [u for u in counts if zlib.crc32(u.encode()) % n != key_partition(u.encode(), n)]
    victim = max(moved, key=counts.__getitem__)  # a user murmur2 would look for elsewhere

    workers = [worker_factory(**env).start() for _ in range(2)]
    for w in workers:
        w.wait_ready()
    replayed = {u for u in sorted(counts)[::2] if u != victim}
    data = tmp_path / "replayed.jsonl"
    write_jsonl([e for e in events if e.user_id in replayed], data)
    replay(s, [data], "jsonl", progress=False)
    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all")
    try:
        for e in (e for e in events if e.user_id not in replayed):
            key = e.user_id.encode()
            producer.send(s.topic_input, key=key, value=event_to_json(e), partition=zlib.crc32(key) % n)
        producer.flush()
    finally:
        producer.close()
    state_partition = zlib.crc32(victim.encode()) % n
    reader = TopicReader(kafka_bootstrap, changelog_topic(s))
    try:
        applied = all_applied(counts)
        reader.read_until(applied, 120, idle_s=1)
        assert applied(reader.records)
        for w in workers:  # one owns the user, the other forwards to it
            assert w.get(f"/users/{victim}/demand")[0] == 200
        forget_cli(victim, stream_env | env)

        def erased_in_its_partition(recs: list) -> bool:
            mine = [r for r in recs if r.partition == state_partition]
            return latest_states(mine).get(victim, b"") is None

        reader.read_until(erased_in_its_partition, 60, idle_s=1)
        assert erased_in_its_partition(reader.records), "no tombstone in the partition holding the state"
    finally:
        reader.close()
    inputs = TopicReader(kafka_bootstrap, s.topic_input)
    try:
        recs = inputs.read_until(lambda recs: len(recs) >= len(events), 30, idle_s=0.5)
    finally:
        inputs.close()
    assert len(recs) == len(events) and all(r.partition == zlib.crc32(r.key) % n for r in recs)
    for w in workers:
        wait_until(lambda w=w: w.get(f"/users/{victim}/demand")[0] == 404, 30, "404 for the forgotten user")
        assert w.get(f"/users/{next(u for u in counts if u != victim)}/demand")[0] == 200
        # the records sit where the setting says: nothing is reported off its partition
        assert w.metric("demandstream_misrouted_records_total") == 0
