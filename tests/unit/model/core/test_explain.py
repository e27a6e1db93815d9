"""The ``why`` of a prediction: exact, named, the same in the stream and offline (model/core/explain.py)."""

import numpy as np
import pytest
import torch

from demandstream.model.core.checkpoint import Checkpoint
from demandstream.model.core.encoding import FeatureBuffer, encode_events
from demandstream.model.core.events import Event
from demandstream.model.core.explain import REASONS, contributions
from demandstream.model.core.features import Vocabulary
from demandstream.model.core.network import DemandLSTM, ModelConfig, init_like_cascade
from demandstream.model.core.scoring import Scorer
from demandstream.model.data.eventlog import EventLog
from tests.unit.model.core.test_network import live_net, random_events


def _setup(seed: int = 3, window: int | None = None):
    rng = np.random.default_rng(seed)
    events = random_events(rng)
    vocab = Vocabulary.build([e.category for e in events], max_size=7)  # some categories outside it
    cfg = ModelConfig(n_categories=len(vocab), hidden=24, markov_top_k=4, history_window=window)
    net = live_net(cfg, vocab, events, seed)
    return events, vocab, cfg, net


def _rounds(events):
    """Round r holds the r-th event of every user (users distinct within a round)."""
    by_user: dict[str, list[Event]] = {}
    for e in sorted(events, key=lambda e: (e.user_id, e.ts)):
        by_user.setdefault(e.user_id, []).append(e)
    for r in range(max(len(v) for v in by_user.values())):
        yield [v[r] for v in by_user.values() if len(v) > r]


@pytest.mark.parametrize("window", [None, 3])
def test_contributions_sum_to_the_logit_of_every_column(window):
    """Every column a prediction can name (vocabulary outside the history, vocabulary inside it through its
    slot, a slot outside the vocabulary) is explained exactly: its reasons sum to its logit, with a
    history window's features too."""
    events, vocab, cfg, net = _setup(window=window)
    scorer = Scorer(Checkpoint(net, vocab, "00000000"))
    states = {e.user_id: scorer.new_state() for e in events}
    buf = FeatureBuffer(cfg, 64, vocab)
    kinds = set()
    n_vocab = len(vocab)
    with torch.inference_mode():
        for rnd in _rounds(events):
            st = [states[e.user_id] for e in rnd]
            h = torch.from_numpy(np.stack([s.h for s in st], axis=1))
            c = torch.from_numpy(np.stack([s.c for s in st], axis=1))
            encode_events(buf, rnd, st)
            f = buf.tensors(slice(0, len(rnd)), "cpu")
            out, (h2, c2) = net.step(f, (h, c), explain=True)
            for j, s in enumerate(st):
                s.h, s.c = h2[:, j].numpy().copy(), c2[:, j].numpy().copy()
            probs = net.category_probs(out, f)
            cols = probs.topk(min(8, probs.shape[-1]), dim=-1).indices
            terms, _count = contributions(out, f, net.pop_logp, cols)
            logits = out["cat_logits"]
            hv, valid = f["hist_vocab"], f["hist_cats"] > 0
            for i in range(len(rnd)):
                for k, col in enumerate(cols[i].tolist()):
                    if probs[i, col] <= 0:
                        continue  # a zero-probability column (a known slot's own): never in a top list
                    if col >= n_vocab:
                        logit, kind = logits[i, col], "oov slot"
                    else:
                        slots = ((hv[i] == col) & valid[i]).nonzero().flatten().tolist()
                        if slots:
                            logit, kind = logits[i, n_vocab + slots[0]], "vocabulary slot"
                        else:
                            logit, kind = logits[i, col], "vocabulary"
                    kinds.add(kind)
                    assert float(terms[i, k].sum()) == pytest.approx(float(logit), abs=1e-4)
    assert kinds == {"oov slot", "vocabulary slot", "vocabulary"}


def test_the_stream_and_offline_score_give_the_same_why():
    events, vocab, _cfg, net = _setup(5)
    stream = Scorer(Checkpoint(net, vocab, "00000000"), top_k=4, why_top=3)
    states = {e.user_id: stream.new_state() for e in events}
    online = {}
    for rnd in _rounds(events):
        for e, p in zip(rnd, stream.step(rnd, [states[e.user_id] for e in rnd]), strict=True):
            online[e.event_id] = p
    offline_scorer = Scorer(Checkpoint(net, vocab, "00000000"), top_k=4, why_top=3)
    log = EventLog.from_events(events).sorted_by_user_time()
    n = 0
    for row, p in offline_scorer.score_log(log):
        q = online[log.event_ids[row]]
        assert [c for c, _ in p.top_categories] == [c for c, _ in q.top_categories]
        for why_p, why_q in zip(p.why, q.why, strict=True):
            assert [r["reason"] for r in why_p] == [r["reason"] for r in why_q]
            assert [r["logit"] for r in why_p] == pytest.approx([r["logit"] for r in why_q], abs=2e-3)
            assert len(why_p) <= 3 and all(r["reason"] in REASONS for r in why_p)
        n += 1
    assert n == len(events)


def test_step_many_gives_the_same_why_as_step():
    events, vocab, _cfg, net = _setup(7)
    one = Scorer(Checkpoint(net, vocab, "00000000"), top_k=3, why_top=2)
    many = Scorer(Checkpoint(net, vocab, "00000000"), top_k=3, why_top=2)
    by_user: dict[str, list[Event]] = {}
    for e in sorted(events, key=lambda e: (e.user_id, e.ts)):
        by_user.setdefault(e.user_id, []).append(e)
    s_one = {u: one.new_state() for u in by_user}
    s_many = {u: many.new_state() for u in by_user}
    expected = {}
    for rnd in _rounds(events):
        for e, p in zip(rnd, one.step(rnd, [s_one[e.user_id] for e in rnd]), strict=True):
            expected[e.event_id] = p.why
    users = list(by_user)
    got = many.step_many([by_user[u] for u in users], [s_many[u] for u in users])
    for u, preds in zip(users, got, strict=True):
        for e, p in zip(by_user[u], preds, strict=True):
            assert [[r["reason"] for r in w] for w in p.why] == [
                [r["reason"] for r in w] for w in expected[e.event_id]
            ]


def test_the_cascade_start_explains_the_current_category_by_it_being_the_last_one():
    vocab = Vocabulary(["<unk>", "shoes", "bags", "hats"])
    net = DemandLSTM(ModelConfig(n_categories=4, hidden=8))
    init_like_cascade(net)
    sc = Scorer(Checkpoint(net.eval(), vocab, "00000000"), top_k=3, why_top=2)
    st = sc.new_state()
    evs = [
        Event("e1", "u", 1.7e9, "view", "i1", "bags", 5.0),
        Event("e2", "u", 1.7e9 + 5, "add_to_cart", "i1", "bags", 5.0),
        Event("e3", "u", 1.7e9 + 9, "view", "i2", "shoes", 5.0),
    ]
    for e in evs:
        [p] = sc.step([e], [st])
    assert [c for c, _ in p.top_categories] == ["shoes", "bags", "hats"]
    assert p.why[0][0] == {"reason": "last_category", "logit": 8.0}
    assert p.why[1][0] == {"reason": "in_cart", "logit": 4.0}  # bags: its item is in the cart
    # hats was never touched: only the transition from the current category (a log-probability) explains it
    assert p.why[2][0]["reason"] == "transition" and p.why[2][0]["from"] == "shoes"


def test_no_why_unless_asked():
    events, vocab, _cfg, net = _setup(2)
    sc = Scorer(Checkpoint(net, vocab, "00000000"))
    st = sc.new_state()
    [p] = sc.step([events[0]], [st])
    assert p.why is None
