"""model/core/scoring.py: the Scorer's three ways to score (step, step_many, score_log) give the same
signals, its top-k is a ranking, and a device it cannot use is a user error."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from demandstream.model.core import scoring
from demandstream.model.core.checkpoint import Checkpoint
from demandstream.model.core.events import Event
from demandstream.model.core.features import Vocabulary, category_hash
from demandstream.model.core.network import ModelConfig
from demandstream.model.core.scoring import Prediction, Scorer, resolve_device
from demandstream.model.core.state import SUMMARY_FIELDS, UserState
from demandstream.model.data.eventlog import EventLog
from demandstream.model.errors import OptionError, UserError
from tests.unit.model.core.test_network import live_net, random_events

TOL = 1e-5


@pytest.fixture(scope="module")
def events() -> list[Event]:
    return random_events(np.random.default_rng(11), n_users=6, max_len=14)


def make_scorer(
    events: list[Event],
    top_k: int = 4,
    max_batch: int = 4096,
    window: int | None = None,
    mixture: bool = False,
) -> Scorer:
    vocab = Vocabulary.build([e.category for e in events], max_size=6)  # some categories outside it
    cfg = ModelConfig(n_categories=len(vocab), hidden=16, history_window=window)
    net = live_net(cfg, vocab, events, 11, mixture=mixture)
    return Scorer(Checkpoint(net, vocab, "0a1b2c3d"), top_k=top_k, max_batch=max_batch)


def by_user(events: list[Event]) -> dict[str, list[Event]]:
    out: dict[str, list[Event]] = {}
    for e in sorted(events, key=lambda e: (e.user_id, e.ts)):
        out.setdefault(e.user_id, []).append(e)
    return out


def assert_same(p: Prediction, q: Prediction) -> None:
    assert p.events_seen == q.events_seen
    assert abs(p.purchase_propensity - q.purchase_propensity) <= TOL
    assert [c for c, _ in p.top_categories] == [c for c, _ in q.top_categories]
    assert np.allclose([x for _, x in p.top_categories], [x for _, x in q.top_categories], atol=TOL)


@pytest.fixture(scope="module")
def stepped(events) -> tuple[dict[str, Prediction], dict[str, UserState]]:
    """The stream's reference: every user's events stepped one at a time. Returns the prediction after
    each event (by event id) and each user's final state."""
    scorer = make_scorer(events)
    preds, states = {}, {}
    for user, seq in by_user(events).items():
        s = states[user] = scorer.new_state()
        for e in seq:
            [preds[e.event_id]] = scorer.step([e], [s])
    return preds, states


def test_score_log_equals_stepping_every_event(events, stepped):
    """The offline signal of every row is the one the stream emits after that event."""
    scorer = make_scorer(events)
    log = EventLog.from_events(events).sorted_by_user_time()
    offline = {log.event_ids[r]: p for r, p in scorer.score_log(log)}
    preds, _ = stepped
    assert offline.keys() == preds.keys() and len(preds) == len(events)
    for event_id, p in preds.items():
        assert_same(offline[event_id], p)
    # categories outside the vocabulary were ranked and named on both paths
    assert any(c not in scorer.vocab.names for p in preds.values() for c, _ in p.top_categories)


def test_score_log_of_some_rows_equals_the_stream_there(events, stepped):
    """Asked for some rows only (the evaluation's later points), each user still runs from its first
    event: the signals at those rows are the stream's, and no other row is yielded."""
    scorer = make_scorer(events)
    log = EventLog.from_events(events).sorted_by_user_time()
    rows = np.asarray(log.ts) >= np.median(log.ts)
    offline = {log.event_ids[r]: p for r, p in scorer.score_log(log, rows)}
    preds, _ = stepped
    assert offline.keys() == {log.event_ids[r] for r in np.flatnonzero(rows)} and 0 < len(offline) < len(
        preds
    )
    for event_id, p in offline.items():
        assert_same(p, preds[event_id])


def test_step_many_equals_one_step_per_event_and_grows_its_buffer(events, stepped):
    scorer = make_scorer(events, max_batch=2)  # far fewer rows than a round holds: the buffer grows
    users = list(by_user(events))
    seqs = list(by_user(events).values())
    packed_states = [scorer.new_state() for _ in seqs]
    packed = scorer.step_many(seqs, packed_states)
    assert scorer._buf.n >= sum(len(q) for q in seqs)
    preds, states = stepped
    for user, seq, ps, sp in zip(users, seqs, packed, packed_states, strict=True):
        assert [p.events_seen for p in ps] == list(range(1, len(seq) + 1))
        for e, p in zip(seq, ps, strict=True):
            assert_same(p, preds[e.event_id])
        s = states[user]
        assert np.abs(sp.h - s.h).max() <= TOL and np.abs(sp.c - s.c).max() <= TOL
        assert abs(sp.last_propensity - s.last_propensity) <= TOL
        assert [c for c, _ in sp.last_top] == [c for c, _ in s.last_top]
        for f in SUMMARY_FIELDS:
            assert getattr(sp, f) == getattr(s, f), f


def test_a_model_with_a_history_window_scores_alike_on_every_path(events):
    """A model started from ``cascade_mix`` over a window (docs/MODEL.md §4.10) adds per-slot features
    that depend on the slots' recency ranks: the stream's batched step, one step per event and the
    offline ``score_log`` still give one signal per event."""
    scorer = make_scorer(events, max_batch=3, window=2, mixture=True)
    seqs = list(by_user(events).values())
    assert max(len({e.category for e in q}) for q in seqs) > 2  # some slot falls beyond the window
    one, states = {}, []
    for seq in seqs:
        s = scorer.new_state()
        states.append(s)
        for e in seq:
            [one[e.event_id]] = scorer.step([e], [s])
    packed_states = [scorer.new_state() for _ in seqs]
    for seq, ps in zip(seqs, scorer.step_many(seqs, packed_states), strict=True):
        for e, p in zip(seq, ps, strict=True):
            assert_same(p, one[e.event_id])
    log = EventLog.from_events(events).sorted_by_user_time()
    offline = {log.event_ids[r]: p for r, p in scorer.score_log(log)}
    assert offline.keys() == one.keys()
    for event_id, p in one.items():
        assert_same(offline[event_id], p)
    for sp, s in zip(packed_states, states, strict=True):
        assert np.abs(sp.h - s.h).max() <= TOL and np.abs(sp.c - s.c).max() <= TOL


def test_step_many_with_one_event_per_user_is_one_step(events):
    scorer = make_scorer(events)
    firsts = [seq[0] for seq in by_user(events).values()]
    a = [scorer.new_state() for _ in firsts]
    b = [scorer.new_state() for _ in firsts]
    many = scorer.step_many([[e] for e in firsts], a)
    for [p], q in zip(many, scorer.step(firsts, b), strict=True):
        assert p == q  # the same call underneath: equal to the bit


def test_nothing_to_score():
    scorer = make_scorer(random_events(np.random.default_rng(1), n_users=2))
    assert scorer.step([], []) == [] and scorer.step_many([], []) == []


def test_top_k_is_a_ranking_of_distinct_known_categories(events):
    scorer = make_scorer(events, top_k=4)
    seqs = list(by_user(events).values())
    states = [scorer.new_state() for _ in seqs]
    for preds, s in zip(scorer.step_many(seqs, states), states, strict=True):
        for p in preds:
            names = [c for c, _ in p.top_categories]
            probs = [x for _, x in p.top_categories]
            assert len(names) == 4 and len(set(names)) == 4 and "<unk>" not in names
            assert probs == sorted(probs, reverse=True) and 0.0 <= probs[-1] and probs[0] <= 1.0
            assert 0.0 < p.purchase_propensity < 1.0
        # the state keeps the last prediction, as codes
        assert [scorer.category_name(c) for c, _ in s.last_top] == names
        assert [x for _, x in s.last_top] == probs and s.last_propensity == p.purchase_propensity


def test_top_k_is_capped_by_the_vocabulary():
    vocab = Vocabulary(["<unk>", "shoes", "bags"])
    scorer = Scorer(
        Checkpoint(live_net(ModelConfig(n_categories=3, hidden=8), vocab, []), vocab, "0"), top_k=10
    )
    assert scorer.top_k == 2
    [p] = scorer.step([Event("e1", "u", 1.7e9, "view", "i", "shoes")], [scorer.new_state()])
    assert len(p.top_categories) == 2


def test_new_state_carries_the_model_version(events):
    s = make_scorer(events).new_state()
    assert s.model_version == "0a1b2c3d" and s.events_seen == 0 and s.h.shape == (1, 16)


def test_category_names_of_codes(events, monkeypatch):
    scorer = make_scorer(events)
    assert scorer.category_name(1) == scorer.vocab.names[1]
    h = category_hash("garden-gnomes")
    assert scorer.category_name(-h) == f"#{h:08x}"  # never seen: named by its hash
    scorer.remember("garden-gnomes")
    assert scorer.category_name(-h) == "garden-gnomes"
    scorer.remember(scorer.vocab.names[1])
    scorer.remember(None)
    assert len(scorer._oov_names) == 1  # vocabulary categories and None are not remembered
    # the names are a bounded LRU: the least recently seen goes first
    monkeypatch.setattr(scoring, "OOV_NAMES_MAX", 2)
    for name in ("x1", "x2", "garden-gnomes", "x3"):
        scorer.remember(name)
    assert sorted(scorer._oov_names.values()) == ["garden-gnomes", "x3"]


# -- devices --------------------------------------------------------------------------------------


def test_cpu_and_auto_without_a_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("cpu") == resolve_device("auto") == torch.device("cpu")


def test_auto_picks_cuda_when_torch_sees_a_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda")
    assert resolve_device("cuda:1") == torch.device("cuda:1")


@pytest.mark.parametrize(
    ("name", "gpu", "says"),
    [("cuda", False, "no CUDA GPU"), ("cuda:0", False, "no CUDA GPU"), ("tpu", True, "unknown device 'tpu'")],
)
def test_a_device_that_cannot_be_used_is_a_user_error(monkeypatch, name, gpu, says):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpu)
    with pytest.raises(OptionError, match=says) as err:
        resolve_device(name)
    assert isinstance(err.value, UserError) and isinstance(err.value, ValueError)
    assert "\n" not in str(err.value)
