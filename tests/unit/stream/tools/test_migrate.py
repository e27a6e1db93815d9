"""``demandstream migrate`` without a broker: the rebuild, erasure order, TTL, refusals, the report.

The Kafka side (dry run writing nothing, the target's changelog and offsets, a green worker continuing)
is tests/integration/test_migrate.py.
"""

from __future__ import annotations

import io
from collections import deque

import numpy as np
import pytest
import torch

from demandstream.model.core.checkpoint import Checkpoint, save
from demandstream.model.core.events import Event, event_to_json
from demandstream.model.core.features import Vocabulary
from demandstream.model.core.network import DemandLSTM, ModelConfig
from demandstream.model.core.scoring import Scorer
from demandstream.model.core.state import SUMMARY_FIELDS, unpack
from demandstream.stream import cli
from demandstream.stream.admin import changelog_topic_configs
from demandstream.stream.engine.inference import InferenceEngine, SourceRecord
from demandstream.stream.engine.records import state_key
from demandstream.stream.settings import Settings
from demandstream.stream.tools import migrate as m
from demandstream.stream.tools.forget import forget_record

CATS = ["<unk>", "shoes", "bags", "hats"]
CTL = "clickstream-control"


@pytest.fixture
def scorer():
    torch.manual_seed(0)
    net = DemandLSTM(ModelConfig(n_categories=len(CATS), hidden=16)).eval()
    return Scorer(Checkpoint(net, Vocabulary(CATS), "0a1b2c3d"), top_k=3)


def ev(i: int, user: str, ts: float | None = None) -> Event:
    return Event(f"e{i}", user, 1.73e9 + i if ts is None else ts, "view", f"i{i % 7}", CATS[1 + i % 3], 10.0)


def rec(e: Event, offset: int, partition: int = 0) -> SourceRecord:
    return SourceRecord(e.user_id.encode(), event_to_json(e), partition, offset, topic="clickstream")


def erasure(user: str, offset: int, partition: int = 0, input_end: int | None = None) -> SourceRecord:
    return SourceRecord(user.encode(), forget_record(user, input_end), partition, offset, topic=CTL)


def rebuild(scorer, batch_max: int = 4, ttl_s: float = 0.0) -> m.Rebuild:
    return m.Rebuild(InferenceEngine(scorer, control_topic=CTL), batch_max, ttl_s)


def reference(scorer, events: list[Event]):
    """Every user's state after its events, one step at a time from a fresh state (offline)."""
    states = {}
    for e in events:
        s = states.setdefault(e.user_id, scorer.new_state())
        scorer.step([e], [s])
    return states


def test_the_rebuild_equals_the_offline_steps_across_micro_batches(scorer):
    events = [ev(i, f"u{i % 3}") for i in range(11)]
    r = rebuild(scorer, batch_max=4)  # 11 events: three micro-batches, users split between them
    r.feed([rec(e, i) for i, e in enumerate(events)])
    want = reference(scorer, events)
    assert r.counts.applied == 11 and r.users == 3
    for u, s in want.items():
        got = unpack(r.states[0][state_key(u)])
        assert all(getattr(got, f) == getattr(s, f) for f in SUMMARY_FIELDS)
        assert np.abs(got.h - s.h).max() <= 1e-5 and np.abs(got.c - s.c).max() <= 1e-5
    assert unpack(r.states[0][state_key("u1")]).offset == 10  # the source offset of its last event


def test_an_erasure_applies_after_the_events_before_its_input_end(scorer):
    events = [ev(i, "u1") for i in range(5)]
    pending = deque([m.Erasure(erasure("u1", 0, input_end=3), 3)])
    order = m.interleave([rec(e, i) for i, e in enumerate(events)], pending, 5)
    assert [(x.topic, x.offset) for x in order] == [("clickstream", 0), ("clickstream", 1)] + [
        ("clickstream", 2),
        (CTL, 0),
        ("clickstream", 3),
        ("clickstream", 4),
    ]
    r = rebuild(scorer)
    r.feed(order)
    got = unpack(r.states[0][state_key("u1")])
    want = reference(scorer, events[3:])["u1"]  # only what came after the request
    assert got.events_seen == 2 and np.abs(got.h - want.h).max() <= 1e-5
    assert r.counts.erasures == 1


def test_a_request_waits_until_its_partition_is_read_up_to_its_input_end():
    pending = deque([m.Erasure(erasure("u1", 0), 9), m.Erasure(erasure("u2", 1), 2)])
    assert m.interleave([], pending, 5) == []  # the second is due, but requests keep their order
    assert [x.offset for x in m.interleave([], pending, 9)] == [0, 1]


def test_changes_carry_tombstones_only_for_keys_written_before(scorer):
    r = rebuild(scorer)
    r.feed([rec(ev(0, "u1"), 0), rec(ev(1, "u2"), 1)])
    assert {(k, v is not None) for k, _p, v in r.take_changes()} == {
        (state_key("u1"), True),
        (state_key("u2"), True),
    }
    r.feed([erasure("u1", 0), rec(ev(2, "u3"), 2), erasure("u3", 1)])
    # u1 was written: it needs its tombstone; u3 never reached the changelog: nothing to delete
    assert r.take_changes() == [(state_key("u1"), 0, None)]
    assert r.users == 1 and r.take_changes() == []


def test_the_ttl_expires_idle_users_in_event_time(scorer):
    r = rebuild(scorer, ttl_s=100.0)
    r.feed([rec(ev(0, "old", ts=1.73e9), 0), rec(ev(1, "busy", ts=1.73e9), 1)])
    r.feed([rec(ev(2, "busy", ts=1.73e9 + 500), 2)])
    assert set(r.states[0]) == {state_key("busy")} and r.counts.expired == 1


def test_the_changelog_configs_are_those_the_worker_creates():
    from demandstream.stream.worker.app import changelog_topic_configs as worker_configs

    s = Settings(changelog_max_compaction_lag_s=3600)
    assert changelog_topic_configs(s) == {"cleanup.policy": "compact", **worker_configs(s)}


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["--to-app-id", "demandstream"], "is the running workers' app id"),
        (["--to-app-id", "green", "--app-id", "green"], "is the running workers' app id"),
        (["--to-app-id", "green", "--max-lag", "-1"], "--max-lag must not be negative"),
        (["--to-app-id", "green", "--model", "{tmp}/none.pt"], "model checkpoint not found"),
        (["--to-app-id", "green", "--model", "{tmp}/text.pt"], "model checkpoint {tmp}/text.pt"),
        (["--to-app-id", "green", "--model", "{tmp}/other.pt"], "is not a demandstream checkpoint"),
    ],
)
def test_refusals_before_any_broker_are_one_line(monkeypatch, capsys, tmp_path, argv, says):
    monkeypatch.delenv("DEMANDSTREAM_APP_ID", raising=False)
    (tmp_path / "text.pt").write_text("not a checkpoint\n")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")  # a torch file, not a checkpoint
    torch.manual_seed(0)
    save(tmp_path / "ok.pt", DemandLSTM(ModelConfig(n_categories=len(CATS), hidden=16)), Vocabulary(CATS))
    args = ["migrate", "--model", str(tmp_path / "ok.pt"), "--broker", "kafka://127.0.0.1:1"]
    assert cli.main(args + [a.format(tmp=tmp_path) for a in argv]) == cli.EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert err.startswith("demandstream migrate: error: ") and err.count("\n") == 1
    assert says.format(tmp=tmp_path) in err


def test_the_report_says_what_happened_and_what_to_do_next():
    r = m.MigrationReport("demandstream", "demandstream-v2", "new.pt", "3f9c2a1b", "x-changelog", 4, False)
    r.users, r.records, r.applied, r.passes, r.seconds, r.retained_from = 2, 10, 9, 1, 2.0, 1.7e9
    r.truncated = {1: 500}
    text = m.format_report(r, "var/data")
    assert "rebuilt 2 users' states" in text and "partitions 1 (before offset 500)" in text
    assert (
        "demandstream worker --app-id demandstream-v2 --model new.pt --data-dir var/data-demandstream-v2"
        in text
    )
    r.dry_run = True
    dry = m.format_report(r)
    assert "would rebuild" in dry and "dry run: nothing written" in dry and "worker --app-id" not in dry


def test_progress_in_a_log_is_one_line_per_interval():
    out, now = io.StringIO(), [0.0]
    p = m.Progress(stream=out, clock=lambda: now[0])
    for t in (0.0, 1.0, m.LOG_PROGRESS_S + 0.5):
        now[0] = t
        p.show(f"at {t}")
    p.show("done", final=True)
    assert out.getvalue().splitlines() == ["at 0.0", f"at {m.LOG_PROGRESS_S + 0.5}", "done"]
