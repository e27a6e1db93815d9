"""``demandstream migrate`` end to end on the real broker: a model upgrade that keeps users' context.

A blue worker (app id A, the old model) consumes a known log with erasure requests among it, one
written by ``demandstream forget`` (with the input offset it waited for) and one without it (a request
of an older release, placed by time). ``migrate`` first runs dry (nothing may appear in Kafka), then
rebuilds the log into app id B with a new model. Then (a) every state in B's changelog equals the
offline step-by-step computation over the same events (h, c within 1e-5; history, counters and the
source offset exact), forgotten users have none, and B's group is committed exactly at the ends; (b) a
green worker started with app id B and the new model continues: its signals for new events count on
(``events_seen``), equal ``demandstream score`` over each user's whole sequence (≤ 1e-4), and no event
of the migrated history gets a second signal from it.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import orjson
import pytest
import torch
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition

from demandstream.model.core.checkpoint import load, save
from demandstream.model.core.events import Event, event_to_json
from demandstream.model.core.state import SUMMARY_FIELDS, unpack
from demandstream.model.data.synth import generate
from demandstream.stream.admin import changelog_topic, ensure_topics
from demandstream.stream.engine.records import state_key
from demandstream.stream.partitioner import key_partition
from demandstream.stream.settings import Settings
from demandstream.stream.tools.forget import forget, forget_record
from demandstream.stream.tools.migrate import MigrateError, migrate
from demandstream.stream.tools.score import score_file
from tests.helpers import latest_by_key, read_topic
from tests.integration.faults import STATE_TOL, reference_states

pytestmark = [pytest.mark.kafka, pytest.mark.slow, pytest.mark.timeout(300)]

N_USERS, N_EVENTS, N_LATER = 40, 1200, 300
#: |Δp| allowed between a green worker's signal and the offline score (docs/ARCHITECTURE.md §Semantics)
PARITY_TOL = 1e-4
BAD = [b"not json", b'{"event_id": "x", "user_id": "u1"}']


@pytest.fixture
def new_model(small_model, tmp_path):
    """Another checkpoint of the same shape (another model_version): the upgrade's model."""
    ckpt = load(small_model)
    torch.manual_seed(11)
    with torch.no_grad():
        for p in ckpt.net.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    path = tmp_path / "new.pt"
    save(path, ckpt.net, ckpt.vocab)
    return path


def _produce(settings: Settings, events: list[Event], placed: list) -> None:
    """Send events keyed by user; record each one's (event, partition, offset) in ``placed``."""
    p = KafkaProducer(bootstrap_servers=settings.bootstrap_servers, acks="all")
    futures = [
        (e, p.send(settings.topic_input, key=e.user_id.encode(), value=event_to_json(e))) for e in events
    ]
    p.flush(30)
    placed.extend((e, f.get(10).partition, f.get(10).offset) for e, f in futures)
    p.close()


def _shifted(events, tag: str, dt: float) -> list[Event]:
    return [dataclasses.replace(e, event_id=f"{tag}{e.event_id}", ts=e.ts + dt) for e in events]


def _committed(bootstrap: str, group: str, tps: list[TopicPartition]) -> dict:
    admin = KafkaAdminClient(bootstrap_servers=[bootstrap])
    try:
        got = admin.list_group_offsets({group: None}).get(group) or {}
    finally:
        admin.close()
    return {tp: got[tp].offset for tp in tps if tp in got}


def test_migrate_rebuilds_states_and_green_continues(
    worker_factory, stream_env, kafka_bootstrap, small_model, new_model, tmp_path
):
    settings = Settings.from_env(stream_env)
    green_id = f"{settings.app_id}-green"
    ensure_topics(settings)
    blue = worker_factory().start()
    blue.wait_ready()

    # The log: phase 1; erasure of x and w (forget, after blue consumed their events); phase 2 (x comes
    # back); a request of an older release for y (no input_end, placed by time); phase 3 without y.
    placed: list = []
    phase1 = list(generate(N_USERS, N_EVENTS, seed=3))
    _produce(settings, phase1, placed)
    p = KafkaProducer(bootstrap_servers=settings.bootstrap_servers, acks="all")
    for b in BAD:
        p.send(settings.topic_input, key=b"u1", value=b).get(10)
    p.close()
    users = sorted({e.user_id for e in phase1}, key=lambda u: -sum(e.user_id == u for e in phase1))
    x, w, y = users[0], users[1], users[2]
    forget(settings, x, wait_s=60)
    forget(settings, w, wait_s=60)
    later = [e for e in _shifted(generate(N_USERS, N_LATER, seed=4), "b", 3e6) if e.user_id != w]
    assert any(e.user_id == x for e in later) and any(e.user_id == y for e in later)
    _produce(settings, later, placed)
    time.sleep(0.05)  # the legacy request's timestamp is later than every event before it
    p = KafkaProducer(bootstrap_servers=settings.bootstrap_servers, acks="all")
    y_part = key_partition(y.encode(), settings.partitions)
    p.send(settings.topic_control, key=y.encode(), value=forget_record(y), partition=y_part).get(10)
    p.close()
    time.sleep(0.05)
    last = [e for e in _shifted(generate(N_USERS, N_LATER, seed=5), "c", 6e6) if e.user_id not in (w, y)]
    _produce(settings, last, placed)
    n_valid = len(placed)
    read_topic(kafka_bootstrap, settings.topic_signals, until=lambda r: len(r) >= n_valid, timeout=90)

    # What the new table must hold: each user's events after its last erasure, in partition order (x
    # keeps the events after its request, phase 1's ids start with "e"; w and y keep none).
    placed.sort(key=lambda t: (t[1], t[2]))
    expected: dict[str, list] = {}
    for e, part, off in placed:
        if e.user_id in (w, y) or e.user_id == x and e.event_id.startswith("e"):
            continue
        expected.setdefault(e.user_id, []).append((e, part, off))
    assert x in expected and len(expected) == N_USERS - 2

    # Dry run: the same computation, nothing written.
    dry = migrate(settings, str(new_model), green_id, dry_run=True)
    assert dry.dry_run and dry.records == n_valid + len(BAD)
    assert dry.applied == n_valid and dry.dead_letters == len(BAD) and dry.erasures == 3
    assert dry.users == len(expected) and not dry.truncated and dry.retained_from is not None
    assert not any("has no committed offsets" in w for w in dry.warnings)  # blue's group has consumed
    admin = KafkaAdminClient(bootstrap_servers=[kafka_bootstrap])
    try:
        assert changelog_topic(settings, green_id) not in admin.list_topics()
    finally:
        admin.close()
    in_tps = [TopicPartition(settings.topic_input, q) for q in range(settings.partitions)]
    assert _committed(kafka_bootstrap, green_id, in_tps) == {}

    with pytest.raises(MigrateError, match="running workers' app id"):
        migrate(settings, str(new_model), settings.app_id)

    report = migrate(settings, str(new_model), green_id)
    assert report.passes == 1 and report.lag == 0 and report.states_written == len(expected)
    with pytest.raises(MigrateError, match="already has a table"):
        migrate(settings, str(new_model), green_id)

    # (a) every rebuilt state equals the offline computation over the same events
    records = read_topic(
        kafka_bootstrap,
        changelog_topic(settings, green_id),
        until=lambda r: len(r) >= len(expected),
        timeout=30,
        idle_s=1,
    )
    table = {k: v for k, v in latest_by_key(records).items() if v is not None}
    assert set(table) == {state_key(u) for u in expected}
    ref = reference_states(new_model, [e for seq in expected.values() for e, _p, _o in seq])
    version = load(new_model).model_version
    max_diff = 0.0
    for u, seq in expected.items():
        got, want = unpack(table[state_key(u)]), ref[u]
        assert got.model_version == version
        assert (got.partition, got.offset) == (seq[-1][1], seq[-1][2]), u
        for f in SUMMARY_FIELDS:
            assert getattr(got, f) == getattr(want, f), (u, f)
        max_diff = max(max_diff, float(np.abs(got.h - want.h).max()), float(np.abs(got.c - want.c).max()))
    assert max_diff <= STATE_TOL, max_diff
    c = KafkaConsumer(bootstrap_servers=[kafka_bootstrap])
    ends = c.end_offsets(in_tps)
    c.close()
    assert _committed(kafka_bootstrap, green_id, in_tps) == ends

    # (b) green continues where the history leaves every user; blue stops
    green = worker_factory(DEMANDSTREAM_APP_ID=green_id, DEMANDSTREAM_MODEL=str(new_model)).start()
    green.wait_ready()
    blue.stop(timeout=30)
    t_new = max(e.ts for e, _p, _o in placed) + 60
    cont = [u for u in expected if u != x][:2] + [x]
    fresh = [
        Event(f"m-{u}-{i}", u, t_new + i, "view", f"i{i}", "pets.aquarium", 9.0)
        for u in cont
        for i in range(2)
    ]
    _produce(settings, fresh, [])
    want_ids = {e.event_id for e in fresh}

    def green_signals(rs):
        return [s for s in (orjson.loads(r.value) for r in rs) if s["model_version"] == version]

    sig = read_topic(
        kafka_bootstrap,
        settings.topic_signals,
        until=lambda rs: {s["event_id"] for s in green_signals(rs)} >= want_ids,
        timeout=60,
        idle_s=2,
    )
    mine = green_signals(sig)
    assert sorted(s["event_id"] for s in mine) == sorted(want_ids)  # none for the migrated history

    data = tmp_path / "full.jsonl"
    data.write_bytes(b"".join(event_to_json(e) + b"\n" for u in cont for e in [t[0] for t in expected[u]]))
    with open(data, "ab") as fh:
        fh.write(b"".join(event_to_json(e) + b"\n" for e in fresh))
    offline = {}
    scored = tmp_path / "scored.jsonl"
    score_file(str(new_model), [str(data)], "jsonl", str(scored), device="cpu", top_k=settings.top_k)
    for line in scored.read_bytes().splitlines():
        s = orjson.loads(line)
        offline[s["event_id"]] = s
    for s in mine:
        o = offline[s["event_id"]]
        u = s["user_id"]
        assert s["events_seen"] == o["events_seen"] == len(expected[u]) + int(s["event_id"][-1]) + 1
        assert abs(s["purchase_propensity"] - o["purchase_propensity"]) <= PARITY_TOL
        off = {t["category"]: t["p"] for t in o["top_categories"]}
        assert [t["category"] for t in s["top_categories"]] == list(off)
        assert max(abs(t["p"] - off[t["category"]]) for t in s["top_categories"]) <= PARITY_TOL
    assert green.get(f"/users/{w}/demand")[0] == 404


def test_retention_losses_are_reported_and_lost_erasures_refused(stream_env, kafka_bootstrap, small_model):
    """Deleted events shorten context (a warning); deleted erasure requests that may cover retained
    events would resurrect users: refused, unless accepted. Retention is simulated with DeleteRecords,
    which moves a partition's log start offset exactly as retention does."""
    settings = Settings.from_env(stream_env)
    ensure_topics(settings)
    placed: list = []
    _produce(settings, list(generate(20, 200, seed=9)), placed)
    u = placed[0][0].user_id
    part = key_partition(u.encode(), settings.partitions)
    p = KafkaProducer(bootstrap_servers=settings.bootstrap_servers, acks="all")
    for _ in range(2):  # the first will be deleted by "retention"
        p.send(settings.topic_control, key=u.encode(), value=forget_record(u, 0), partition=part).get(10)
    p.close()
    first = next(o for _e, q, o in sorted(placed, key=lambda t: t[2]) if q == part)
    admin = KafkaAdminClient(bootstrap_servers=[kafka_bootstrap])
    try:
        admin.delete_records({TopicPartition(settings.topic_input, part): first + 1})
        admin.delete_records({TopicPartition(settings.topic_control, part): 1})
    finally:
        admin.close()

    with pytest.raises(
        MigrateError, match=rf"retention deleted erasure requests of .* partitions \[{part}\]"
    ):
        migrate(settings, str(small_model), "green", dry_run=True)
    dry = migrate(settings, str(small_model), "green", dry_run=True, accept_lost_erasures=True)
    assert dry.truncated == {part: first + 1} and dry.records == len(placed) - 1
    assert dry.erasures == 1 and any("were deleted by retention" in w for w in dry.warnings)
    assert any("retention deleted the oldest events of 1 of" in w for w in dry.warnings)
    # no worker ever ran with this app id: the report says so (a mistyped --app-id would look the same)
    assert any(f"group {settings.app_id} (--app-id" in w for w in dry.warnings)
