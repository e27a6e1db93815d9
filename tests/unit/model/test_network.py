"""DemandLSTM: one-step streaming equals the full-sequence forward (DESIGN §6 parity)."""

import numpy as np
import pytest
import torch

from model.checkpoint import Checkpoint
from model.eventlog import EventLog
from model.events import EVENT_TYPES, Event
from model.features import Vocabulary
from model.network import DemandLSTM, ModelConfig
from model.scoring import Scorer


def random_events(rng, n_users=7, max_len=30, n_cats=12):
    events = []
    for u in range(n_users):
        ts = 1.7e9 + rng.uniform(0, 1e5)
        for k in range(int(rng.integers(1, max_len))):
            ts += float(rng.exponential(300)) - 50  # some out-of-order (negative) gaps on purpose
            etype = EVENT_TYPES[int(rng.integers(0, len(EVENT_TYPES)))]
            cat = None if rng.random() < 0.1 else f"c{int(rng.integers(0, n_cats))}"
            events.append(
                Event(
                    f"e{u}-{k}",
                    f"u{u}",
                    ts,
                    etype,
                    None if etype == "search" else f"i{int(rng.integers(0, 500))}",
                    cat,
                    None if rng.random() < 0.2 else float(rng.uniform(0, 300)),
                    "red shoes size 42" if etype == "search" else None,
                )
            )
    return events


@pytest.mark.parametrize("layers", [1, 2])
def test_step_equals_forward(layers):
    rng = np.random.default_rng(layers)
    torch.manual_seed(layers)
    events = random_events(rng)
    vocab = Vocabulary.build([e.category for e in events])
    net = DemandLSTM(ModelConfig(n_categories=len(vocab), hidden=24, layers=layers)).eval()
    scorer = Scorer(Checkpoint(net, vocab, "00000000"), top_k=5)
    log = EventLog.from_events(events).sorted_by_user_time()

    offline = {}
    for rows, probs, prop in scorer.predict_log(log):
        for j, r in enumerate(rows.tolist()):
            offline[log.event_ids[r]] = (probs[j].numpy(), float(prop[j]))

    # Stream the same events one round at a time: round r = r-th event of every user.
    by_user = {}
    for e in sorted(events, key=lambda e: (e.user_id, e.ts)):
        by_user.setdefault(e.user_id, []).append(e)
    states = {u: scorer.new_state() for u in by_user}
    max_diff = 0.0
    for r in range(max(len(v) for v in by_user.values())):
        round_events = [v[r] for v in by_user.values() if len(v) > r]
        round_states = [states[e.user_id] for e in round_events]
        preds = scorer.step(round_events, round_states)
        for e, p in zip(round_events, preds, strict=True):
            probs, prop = offline[e.event_id]
            max_diff = max(max_diff, abs(prop - p.purchase_propensity))
            for name, pc in p.top_categories:
                max_diff = max(max_diff, abs(pc - probs[vocab.index(name)]))
    assert max_diff <= 1e-5
    assert len(offline) == len(events)


def test_distribution_sums_to_one_and_never_predicts_unknown():
    torch.manual_seed(0)
    events = random_events(np.random.default_rng(5), n_users=3)
    vocab = Vocabulary.build([e.category for e in events])
    net = DemandLSTM(ModelConfig(n_categories=len(vocab), hidden=16)).eval()
    log = EventLog.from_events(events).sorted_by_user_time()
    for _rows, probs, _p in Scorer(Checkpoint(net, vocab, "00000000")).predict_log(log):
        assert torch.allclose(probs.sum(-1), torch.ones(probs.shape[0]), atol=1e-5)
        assert float(probs[:, 0].abs().max()) == 0.0


def test_step_many_equals_one_step_per_event():
    """A micro-batch with several events per user: one packed call == one step per event."""
    rng = np.random.default_rng(3)
    torch.manual_seed(3)
    events = random_events(rng, n_users=6, max_len=9)
    vocab = Vocabulary.build([e.category for e in events])
    scorer = Scorer(
        Checkpoint(DemandLSTM(ModelConfig(n_categories=len(vocab), hidden=24)).eval(), vocab, "00000000"),
        top_k=4,
    )
    by_user = {}
    for e in events:
        by_user.setdefault(e.user_id, []).append(e)
    users = sorted(by_user)
    a = {u: scorer.new_state() for u in users}
    b = {u: scorer.new_state() for u in users}
    # two micro-batches: first 3 events of each user, then the rest
    packed = []
    for lo, hi in ((0, 3), (3, None)):
        seqs = [by_user[u][lo:hi] for u in users if by_user[u][lo:hi]]
        us = [u for u in users if by_user[u][lo:hi]]
        for u, preds in zip(us, scorer.step_many(seqs, [a[u] for u in us]), strict=True):
            packed.extend((u, p) for p in preds)
    single = []
    for u in users:
        for e in by_user[u]:
            single.append((u, scorer.step([e], [b[u]])[0]))
    packed.sort(key=lambda x: (x[0], x[1].events_seen))
    assert len(packed) == len(single) == len(events)
    for (u1, p), (u2, q) in zip(packed, single, strict=True):
        assert u1 == u2 and p.events_seen == q.events_seen
        assert abs(p.purchase_propensity - q.purchase_propensity) <= 1e-5
        assert [c for c, _ in p.top_categories] == [c for c, _ in q.top_categories]
    for u in users:
        assert np.abs(a[u].h - b[u].h).max() <= 1e-5 and np.abs(a[u].c - b[u].c).max() <= 1e-5
        assert a[u].hist_cats == b[u].hist_cats and a[u].events_seen == b[u].events_seen


def test_calibration_is_applied_inside_heads_so_step_and_forward_agree():
    torch.manual_seed(4)
    events = random_events(np.random.default_rng(4), n_users=4, max_len=12)
    vocab = Vocabulary.build([e.category for e in events])
    net = DemandLSTM(ModelConfig(n_categories=len(vocab), hidden=16)).eval()
    assert float(net.purchase_scale) == 1.0 and float(net.purchase_shift) == 0.0  # identity by default
    log = EventLog.from_events(events).sorted_by_user_time()
    scorer = Scorer(Checkpoint(net, vocab, "00000000"))
    raw = torch.cat([p for _r, _c, p in scorer.predict_log(log)])
    with torch.no_grad():
        net.purchase_scale.fill_(0.5)
        net.purchase_shift.fill_(-1.0)
    cal = torch.cat([p for _r, _c, p in scorer.predict_log(log)])
    assert torch.allclose(cal, torch.sigmoid(0.5 * torch.logit(raw.double()) - 1.0).float(), atol=1e-5)
    # the streaming step goes through the same heads: first events of every user, one round
    firsts = {}
    for e in sorted(events, key=lambda e: (e.user_id, e.ts)):
        firsts.setdefault(e.user_id, e)
    states = [scorer.new_state() for _ in firsts]
    streamed = [p.purchase_propensity for p in scorer.step(list(firsts.values()), states)]
    offline = []
    for rows, _c, p in scorer.predict_log(log):
        offline.extend((int(r), float(v)) for r, v in zip(rows, p, strict=True))
    offline = dict(offline)
    first_row = {log.users[log.user[s]]: int(s) for s in log.user_start[:-1]}
    for uid, p in zip(firsts, streamed, strict=True):
        assert abs(p - offline[first_row[uid]]) <= 1e-5


def test_checkpoint_without_calibration_loads_as_identity_and_version_tracks_it(tmp_path):
    from model import checkpoint

    vocab = Vocabulary(["<unk>", "a", "b"])
    net = DemandLSTM(ModelConfig(n_categories=3, hidden=8))
    old = {k: v for k, v in net.state_dict().items() if not k.startswith("purchase_s")}
    fresh = DemandLSTM(ModelConfig(n_categories=3, hidden=8))
    fresh.load_state_dict(old)  # a state dict from before calibration existed
    assert float(fresh.purchase_scale) == 1.0 and float(fresh.purchase_shift) == 0.0
    assert "purchase_scale" not in old  # the caller's dict is untouched (model_version is hashed from it)
    v1 = checkpoint.save(tmp_path / "a.pt", net, vocab)
    with torch.no_grad():
        net.purchase_shift.fill_(0.25)
    v2 = checkpoint.save(tmp_path / "b.pt", net, vocab)
    assert v1 != v2
    assert float(checkpoint.load(tmp_path / "b.pt").net.purchase_shift) == 0.25
