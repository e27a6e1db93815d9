"""End to end on the real broker: replay -> worker -> signals and dead letters, with offline parity."""

from __future__ import annotations

import collections

import orjson
import pytest

from demandstream.model.core.checkpoint import load
from demandstream.model.core.events import BadEvent, parse_event
from demandstream.model.core.scoring import Scorer
from demandstream.model.data.loaders import load_log
from demandstream.model.data.synth import generate, write_jsonl
from demandstream.stream.settings import Settings
from demandstream.stream.tools.replay import replay
from tests.helpers import read_topic

pytestmark = [pytest.mark.kafka, pytest.mark.slow, pytest.mark.timeout(400)]

N_USERS, N_EVENTS, N_BAD = 200, 5000, 50
PARITY_USERS = 20
PARITY_TOL = 1e-4


def bad_payloads(n: int) -> list[bytes]:
    """A mix of broken inputs a shop's producers really send."""
    kinds = [
        b"this is not json",
        b'{"event_id": "x1", "user_id": "u1", "ts": 1732300000, "type": "view"',  # truncated
        b"[1, 2, 3]",
        b'{"user_id": "u1", "ts": 1732300000, "type": "view", "item_id": "i1"}',  # no event_id
        b'{"event_id": "x2", "user_id": "u1", "ts": 1732300000, "type": "teleport", "item_id": "i1"}',
        b'{"event_id": "x3", "user_id": "u1", "ts": 1732300000, "type": "view", "item_id": "i1", "price": -3}',
        b'{"event_id": "x4", "user_id": "u1", "ts": 86400, "type": "view", "item_id": "i1"}',  # 1970
        b'{"event_id": "x5", "user_id": "u1", "ts": 1732300000, "type": "search"}',  # no query
        b'{"event_id": "x6", "user_id": "u1", "ts": 1732300000, "type": "view", "item_id": "i1", "price": "9"}',
        b'\xff\xfe{"event_id": "x7"}',  # not UTF-8
    ]
    return [kinds[i % len(kinds)] for i in range(n)]


def write_stream_file(path, events, bad: list[bytes]) -> None:
    """Valid events with the bad lines spread evenly between them."""
    write_jsonl(events, path)
    lines = path.read_bytes().splitlines()
    step = len(lines) // (len(bad) + 1)
    out = []
    for i, line in enumerate(lines):
        out.append(line)
        if i % step == step - 1 and bad:
            out.append(bad.pop())
    out.extend(bad)
    path.write_bytes(b"\n".join(out) + b"\n")


@pytest.mark.parametrize("guarantee", ["at_least_once", "exactly_once"])
def test_replay_through_worker(guarantee, worker_factory, stream_env, kafka_bootstrap, small_model, tmp_path):
    events = list(generate(N_USERS, N_EVENTS, seed=42))
    assert len({e.user_id for e in events}) == N_USERS
    data = tmp_path / "events.jsonl"
    bad = bad_payloads(N_BAD)
    expected_reasons = collections.Counter()
    for b in bad:
        with pytest.raises(BadEvent) as err:
            parse_event(b)
        expected_reasons[err.value.reason] += 1
    write_stream_file(data, events, list(bad))

    worker = worker_factory(DEMANDSTREAM_GUARANTEE=guarantee).start()
    worker.wait_ready()
    settings = Settings.from_env(stream_env)
    isolation = "read_committed" if guarantee == "exactly_once" else "read_uncommitted"
    stats = replay(settings, [data], "jsonl", progress=False)
    assert stats.sent == N_EVENTS + N_BAD

    signals = read_topic(
        kafka_bootstrap,
        settings.topic_signals,
        until=lambda r: len(r) >= N_EVENTS,
        timeout=180,
        idle_s=3,
        isolation=isolation,
    )
    dead = read_topic(
        kafka_bootstrap,
        settings.topic_dlq,
        until=lambda r: len(r) >= N_BAD,
        timeout=60,
        idle_s=1,
        isolation=isolation,
    )

    # exactly one signal per valid event, one dead letter per bad record
    sig = [orjson.loads(r.value) for r in signals]
    assert len(sig) == N_EVENTS
    assert len({s["event_id"] for s in sig}) == N_EVENTS
    dl = [orjson.loads(r.value) for r in dead]
    assert len(dl) == N_BAD
    assert collections.Counter(d["reason"] for d in dl) == expected_reasons
    assert all(d["topic"] == settings.topic_input and d["offset"] >= 0 for d in dl)

    # each user's events applied in file order, also inside micro-batches (events_seen 1..n)
    by_user = collections.defaultdict(list)
    for s in sig:
        by_user[s["user_id"]].append(s)
    file_order = collections.defaultdict(list)
    for e in events:
        file_order[e.user_id].append(e.event_id)
    for uid, ss in by_user.items():
        assert [s["event_id"] for s in ss] == file_order[uid]
        assert [s["events_seen"] for s in ss] == list(range(1, len(ss) + 1))
    batches = worker.metric("demandstream_batch_size_count")
    assert batches < N_EVENTS  # really micro-batched
    phases = (
        ("engine", "transaction")
        if guarantee == "exactly_once"
        else ("engine", "signals", "changelog", "store")
    )
    for phase in phases:  # every batch timed in every phase of its guarantee
        assert worker.metric("demandstream_batch_phase_seconds_count", phase=phase) == batches
    assert worker.metric("demandstream_events_total", result="valid") == N_EVENTS
    assert worker.metric("demandstream_signals_total") == N_EVENTS
    # replay keys with kafka-python's partitioner (murmur2): no record is reported off its partition
    assert worker.metric("demandstream_misrouted_records_total") == 0

    # parity with the offline model over the same events, for 20 users
    scorer = Scorer(load(small_model), "cpu", top_k=settings.top_k)
    log = load_log([data], "jsonl", clean=None).sorted_by_user_arrival()
    offline = {log.event_ids[r]: p for r, p in scorer.score_log(log)}
    heavy = sorted(by_user, key=lambda u: -len(by_user[u]))[:PARITY_USERS]
    max_diff, compared = 0.0, 0
    for uid in heavy:
        for s in by_user[uid]:
            p = offline[s["event_id"]]
            assert s["events_seen"] == p.events_seen
            max_diff = max(max_diff, abs(s["purchase_propensity"] - p.purchase_propensity))
            off = dict(p.top_categories)
            assert s["top_categories"][0]["category"] == p.top_categories[0][0]
            for c in s["top_categories"]:
                if c["category"] in off:
                    max_diff = max(max_diff, abs(c["p"] - off[c["category"]]))
            compared += 1
    assert compared >= PARITY_USERS
    assert max_diff <= PARITY_TOL, f"stream and offline differ by {max_diff}"
