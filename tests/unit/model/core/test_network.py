"""DemandLSTM: one-step streaming equals the full-sequence forward (docs/ARCHITECTURE.md §Semantics, parity);
the hybrid next-category head ranks categories outside the vocabulary and starts out as the rule cascade."""

import numpy as np
import pytest
import torch

from demandstream.model.core.checkpoint import Checkpoint
from demandstream.model.core.encoding import encode_log
from demandstream.model.core.events import EVENT_TYPES, Event
from demandstream.model.core.features import Vocabulary
from demandstream.model.core.network import (
    DemandLSTM,
    ModelConfig,
    funnel_table,
    init_like_cascade,
    markov_tables,
    packed_order,
)
from demandstream.model.core.scoring import Scorer
from demandstream.model.core.state import SUMMARY_FIELDS
from demandstream.model.data.eventlog import EventLog


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


def live_net(cfg: ModelConfig, vocab: Vocabulary, events, seed: int = 0, mixture: bool = False) -> DemandLSTM:
    """A network whose every term contributes: Markov tables from ``events``, the cascade weights (those
    of ``cascade_mix`` with ``mixture``), then noise on every parameter (the context and LSTM terms are
    zero at initialisation)."""
    torch.manual_seed(seed)
    net = DemandLSTM(cfg)
    cats = np.array([vocab.index(e.category) for e in events])
    pairs = np.stack([cats[:-1], cats[1:]], axis=1)
    net.set_tables(markov_tables(cats, pairs, cfg.n_categories, cfg.markov_top_k))
    init_like_cascade(net, mixture=mixture)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
        net.funnel_logit.normal_()  # every (event type, cart) cell differs
    return net.eval()


def offline_column(code: int, n_vocab: int, hist_cats) -> int:
    """Column of a prediction code (Scorer.category_name's codes) in a predict_log row [C + K]."""
    if code >= 0:
        return code
    return n_vocab + list(hist_cats).index(-code)


@pytest.mark.parametrize(("layers", "window"), [(1, None), (2, None), (1, 3)])
def test_step_equals_forward(layers, window):
    rng = np.random.default_rng(layers)
    events = random_events(rng)
    # a capped vocabulary: the rarer categories are outside it and ranked through their history slots
    vocab = Vocabulary.build([e.category for e in events], max_size=7)
    cfg = ModelConfig(
        n_categories=len(vocab), hidden=24, layers=layers, markov_top_k=4, history_window=window
    )
    scorer = Scorer(Checkpoint(live_net(cfg, vocab, events, layers), vocab, "00000000"), top_k=8)
    log = EventLog.from_events(events).sorted_by_user_time()

    offline = {}
    for rows, probs, prop, hist_cats in scorer.predict_log(log):
        assert probs.shape[1] == len(vocab) + cfg.history_slots
        for j, r in enumerate(rows.tolist()):
            offline[log.event_ids[r]] = (probs[j].numpy(), float(prop[j]), hist_cats[j].tolist())

    # Stream the same events one round at a time: round r = r-th event of every user.
    by_user = {}
    for e in sorted(events, key=lambda e: (e.user_id, e.ts)):
        by_user.setdefault(e.user_id, []).append(e)
    states = {u: scorer.new_state() for u in by_user}
    max_diff, oov_ranked = 0.0, 0
    for r in range(max(len(v) for v in by_user.values())):
        round_events = [v[r] for v in by_user.values() if len(v) > r]
        round_states = [states[e.user_id] for e in round_events]
        preds = scorer.step(round_events, round_states)
        for e, p, s in zip(round_events, preds, round_states, strict=True):
            probs, prop, hist_cats = offline[e.event_id]
            assert s.hist_cats == hist_cats
            max_diff = max(max_diff, abs(prop - p.purchase_propensity))
            # the step's top k (read off the logits) are the k largest of the offline distribution
            top_offline = np.sort(probs)[::-1][: len(p.top_categories)]
            max_diff = max(max_diff, float(np.abs(top_offline - [pn for _, pn in p.top_categories]).max()))
            for (code, pc), (name, pn) in zip(s.last_top, p.top_categories, strict=True):
                assert scorer.category_name(code) == name and pn == pc
                oov_ranked += code < 0
                max_diff = max(max_diff, abs(pc - probs[offline_column(code, len(vocab), hist_cats)]))
    assert max_diff <= 1e-5
    assert oov_ranked > 0  # the comparison covered history-slot columns too
    assert len(offline) == len(events)


def test_forward_at_equals_forward_at_the_chosen_cells_in_any_chunking(monkeypatch):
    """Offline scoring and validation run the heads only at the points they need, a bounded chunk at a
    time (a shop with 10,000 categories held GBs per head tensor); the numbers are forward's."""
    from demandstream.model.core import network
    from demandstream.model.core.encoding import encode_log, padded_user_batches

    rng = np.random.default_rng(11)
    events = random_events(rng, n_users=9)
    vocab = Vocabulary.build([e.category for e in events], max_size=7)
    cfg = ModelConfig(n_categories=len(vocab), hidden=16, markov_top_k=4)
    net = live_net(cfg, vocab, events)
    log = EventLog.from_events(events).sorted_by_user_time()
    feats = encode_log(log, cfg, vocab)
    want = rng.random(len(log)) < 0.4
    (idx, real), *_ = padded_user_batches(log.user_start, want, 1 << 16)
    f = feats.tensors(idx)
    cells = torch.from_numpy(real & want[idx])
    with torch.no_grad():
        full, _ = net(f, explain=True)
        expected = {k: v[cells] for k, v in full.items()}
        columns = len(vocab) + cfg.history_slots
        monkeypatch.setattr(network, "HEAD_BLOCK_MIN_ROWS", 1)
        for floats in (columns, 3 * columns + 1, network.HEAD_BLOCK_FLOATS):  # 1 cell, 3 cells, one block
            monkeypatch.setattr(network, "HEAD_BLOCK_FLOATS", floats)
            parts = list(net.forward_at(f, cells, explain=True))
            assert len(parts) == -(-int(cells.sum()) // max(1, floats // columns))
            for k, v in expected.items():
                got = torch.cat([out[k] for _p, out, _f in parts])
                assert got.shape == v.shape
                both = torch.isfinite(v)
                assert torch.equal(both, torch.isfinite(got)), k
                assert torch.allclose(got[both], v[both], rtol=0, atol=1e-6), k
            # each chunk's features are its own cells'
            assert torch.equal(torch.cat([fc["hist_cats"] for _p, _o, fc in parts]), f["hist_cats"][cells])


def test_the_purchase_head_alone_gives_the_same_logits_and_draws_the_same_dropout():
    """Training's purchase-head phase and the calibration skip the category head (most of the cost with
    many categories); the purchase logits, and the random stream dropout draws in training, are the
    full forward's."""
    from demandstream.model.core.encoding import encode_log, padded_user_batches

    rng = np.random.default_rng(4)
    events = random_events(rng, n_users=6)
    vocab = Vocabulary.build([e.category for e in events], max_size=7)
    cfg = ModelConfig(n_categories=len(vocab), hidden=16, markov_top_k=4, dropout=0.3)
    net = live_net(cfg, vocab, events)
    log = EventLog.from_events(events).sorted_by_user_time()
    (idx, _real), *_ = padded_user_batches(log.user_start, np.ones(len(log), bool), 1 << 16)
    f = encode_log(log, cfg, vocab).tensors(idx)
    for training in (False, True):
        net.train(training)
        torch.manual_seed(1)
        full, (h1, c1) = net(f)
        after_full = torch.rand(3)
        torch.manual_seed(1)
        alone, (h2, c2) = net(f, purchase_only=True)
        after_alone = torch.rand(3)
        assert set(alone) == {"purchase_logit"}
        assert torch.equal(full["purchase_logit"], alone["purchase_logit"])
        assert torch.equal(h1, h2) and torch.equal(c1, c2) and torch.equal(after_full, after_alone)


def test_category_head_at_chosen_cells_gives_their_logits_gradients_and_dropout():
    """Training computes the category head only at the cells with a next category (about half of a
    window's); the logits there, every purchase logit, the random stream and the gradients of a loss
    read at those cells are the full forward's."""
    from demandstream.model.core.encoding import encode_log, padded_user_batches

    rng = np.random.default_rng(5)
    events = random_events(rng, n_users=6)
    vocab = Vocabulary.build([e.category for e in events], max_size=7)
    cfg = ModelConfig(n_categories=len(vocab), hidden=16, markov_top_k=4, dropout=0.3)
    net = live_net(cfg, vocab, events)
    with torch.no_grad():  # non-zero LSTM terms and context weights, so every head parameter gets a gradient
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    log = EventLog.from_events(events).sorted_by_user_time()
    (idx, real), *_ = padded_user_batches(log.user_start, np.ones(len(log), bool), 1 << 16)
    f = encode_log(log, cfg, vocab).tensors(idx)
    cells = torch.from_numpy(real & (rng.random(real.shape) < 0.5))
    assert 0 < int(cells.sum()) < cells.numel()

    def run(cat_at):
        net.zero_grad()
        torch.manual_seed(3)
        out, _ = net(f, cat_at=cat_at)
        after = torch.rand(3)
        logits = out["cat_logits"] if cat_at is not None else out["cat_logits"][cells]
        loss = torch.log_softmax(logits, -1)[..., -1].nan_to_num(0.0, 0.0, 0.0).sum()
        loss = loss + out["purchase_logit"].sum()
        loss.backward()
        grads = {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}
        return logits, out["purchase_logit"], after, grads

    for training in (False, True):
        net.train(training)
        full_logits, full_buy, full_after, full_grads = run(None)
        at_logits, at_buy, at_after, at_grads = run(cells)
        assert at_logits.shape == (int(cells.sum()), len(vocab) + cfg.history_slots)
        assert torch.equal(full_after, at_after)  # the same dropout draws
        assert torch.equal(full_buy, at_buy)
        both = torch.isfinite(full_logits)
        assert torch.equal(both, torch.isfinite(at_logits))
        assert torch.allclose(at_logits[both], full_logits[both], rtol=0, atol=1e-6)
        assert full_grads.keys() == at_grads.keys() and "explore.weight" in at_grads
        for n, g in full_grads.items():
            assert torch.allclose(at_grads[n], g, rtol=1e-5, atol=1e-6), n


def test_serving_writes_the_logits_training_computes():
    """Without gradients (the stream's step, ``score``) the category head writes its logits into one
    [..., C + K] tensor and the explore product into it; with them (training) and when explained it
    keeps the out-of-place form. Both give the same logits to float rounding, [B, T] cells and the
    step's [n] rows alike."""
    from demandstream.model.core.encoding import encode_log, padded_user_batches

    rng = np.random.default_rng(11)
    events = random_events(rng, n_users=6)
    vocab = Vocabulary.build([e.category for e in events], max_size=7)
    cfg = ModelConfig(n_categories=len(vocab), hidden=16, markov_top_k=4, history_window=3)
    net = live_net(cfg, vocab, events, mixture=True)
    log = EventLog.from_events(events).sorted_by_user_time()
    (idx, real), *_ = padded_user_batches(log.user_start, np.ones(len(log), bool), 1 << 16)
    f = encode_log(log, cfg, vocab).tensors(idx)
    h = torch.randn(*real.shape, cfg.hidden)
    cells = torch.from_numpy(real)
    rows = (h[cells], {k: v[cells] for k, v in f.items()})
    assert rows[0].dim() == 2 and int(cells.sum()) == len(log)
    for args in ((h, f), rows):
        trained = net.heads(*args)["cat_logits"]
        assert trained.requires_grad
        with torch.no_grad():
            served = net.heads(*args)["cat_logits"]
            explained = net.heads(*args, explain=True)["cat_logits"]
        with torch.inference_mode():
            inferred = net.heads(*args)["cat_logits"]
        finite = torch.isfinite(trained)
        assert finite.any() and (~finite).any()  # history columns and masked ones both covered
        for other in (served, explained, inferred):
            assert torch.equal(torch.isfinite(other), finite)
            assert torch.allclose(other[finite], trained.detach()[finite], rtol=0, atol=1e-5)


def test_distribution_sums_to_one_and_never_predicts_unknown():
    torch.manual_seed(0)
    events = random_events(np.random.default_rng(5), n_users=3)
    vocab = Vocabulary.build([e.category for e in events], max_size=6)
    net = live_net(ModelConfig(n_categories=len(vocab), hidden=16), vocab, events)
    log = EventLog.from_events(events).sorted_by_user_time()
    for _rows, probs, _p, hist_cats in Scorer(Checkpoint(net, vocab, "00000000")).predict_log(log):
        assert torch.allclose(probs.sum(-1), torch.ones(probs.shape[0]), atol=1e-5)
        assert float(probs[:, 0].abs().max()) == 0.0
        # a history-slot column has mass only when the slot holds a category outside the vocabulary
        slot_vocab = torch.from_numpy(vocab.index_of_hashes(hist_cats.numpy()))
        slot_p = probs[:, len(vocab) :]
        assert float(slot_p[(slot_vocab > 0) | (hist_cats <= 0)].sum()) == 0.0
        assert float(slot_p.sum()) > 0.0


def test_category_top_is_the_top_of_the_distribution_without_writing_it_out():
    """category_top reads the k most probable categories off the logits: the same probabilities and
    columns (in category_probs' layout, a known slot's category at its vocabulary column) as the top k
    of category_probs, history slots outside the vocabulary included."""
    rng = np.random.default_rng(11)
    events = random_events(rng, n_users=9, n_cats=15)
    vocab = Vocabulary.build([e.category for e in events], max_size=6)  # most categories outside it
    cfg = ModelConfig(n_categories=len(vocab), hidden=16, markov_top_k=3)
    net = live_net(cfg, vocab, events, seed=3)
    log = EventLog.from_events(events).sorted_by_user_time()
    feats = encode_log(log, cfg, vocab).tensors(slice(0, len(log)), torch.device("cpu"))
    oov_in_top = 0
    with torch.inference_mode():
        out = net.heads(torch.randn(len(log), cfg.hidden), feats)
        for k in (1, 3, len(vocab) - 1):
            p, cols = net.category_top(out, feats, k)
            p_ref, cols_ref = net.category_probs(out, feats).topk(k, dim=-1)
            assert torch.equal(p, p_ref)
            distinct = (p_ref[:, 1:] != p_ref[:, :-1]).all(-1)  # rows without exact ties in their top
            assert bool(distinct.any())
            assert torch.equal(cols[distinct], cols_ref[distinct])
            oov_in_top += int((cols >= len(vocab)).sum())
    assert oov_in_top > 0  # slots outside the vocabulary were among the top


@pytest.mark.parametrize("why_top", [0, 2])
def test_a_micro_batch_scored_in_blocks_of_rows_gives_what_one_call_gives(monkeypatch, why_top):
    """A large micro-batch at a large catalog runs its heads a block of rows at a time
    (network.head_block_rows); signals (top categories, propensities, reasons) and the stored states
    are those of one call over the whole batch, packed (several events per user) or not."""
    from demandstream.model.core import network
    from demandstream.model.core.state_batch import StateBatch

    rng = np.random.default_rng(21)
    events = random_events(rng, n_users=11, max_len=6)
    vocab = Vocabulary.build([e.category for e in events], max_size=6)
    cfg = ModelConfig(n_categories=len(vocab), hidden=16, markov_top_k=3)
    scorer = Scorer(Checkpoint(live_net(cfg, vocab, events, 5), vocab, "00000000"), top_k=3, why_top=why_top)
    by_user: dict[str, list] = {}
    for e in sorted(events, key=lambda e: (e.user_id, e.ts)):
        by_user.setdefault(e.user_id, []).append(e)
    seqs = list(by_user.values())
    rounds = [[q[:1] for q in seqs], [q[1:] for q in seqs if len(q) > 1]]  # one event each, then the rest

    def run(block_rows: int | None):
        if block_rows is not None:
            monkeypatch.setattr(network, "HEAD_BLOCK_MIN_ROWS", block_rows)
            monkeypatch.setattr(network, "HEAD_BLOCK_FLOATS", 1)
        batch = StateBatch.from_states([scorer.new_state() for _ in seqs])
        preds = []
        for r, qs in enumerate(rounds):
            rows = range(len(qs)) if r == 0 else [i for i, q in enumerate(seqs) if len(q) > 1]
            preds.append(scorer.step_rows(qs, batch, rows))
        return preds, batch

    (whole, whole_batch), (blocks, blocks_batch) = run(None), run(3)
    assert len(rounds[1]) > 3  # the packed round had several blocks too
    for a, b in zip(whole, blocks, strict=True):
        assert len(a) == len(b)
        for pa, pb in zip(sum(a, []), sum(b, []), strict=True):
            assert [c for c, _ in pa.top_categories] == [c for c, _ in pb.top_categories]
            assert np.allclose(
                [p for _, p in pa.top_categories], [p for _, p in pb.top_categories], atol=1e-6
            )
            assert abs(pa.purchase_propensity - pb.purchase_propensity) <= 1e-6
            assert pa.events_seen == pb.events_seen and (pa.why is None) == (why_top == 0)
            assert [[w["reason"] for w in r] for r in pa.why or []] == [
                [w["reason"] for w in r] for r in pb.why or []
            ]
    assert np.allclose(whole_batch.h, blocks_batch.h) and np.allclose(whole_batch.c, blocks_batch.c)
    assert [[c for c, _ in t] for t in whole_batch.last_top] == [
        [c for c, _ in t] for t in blocks_batch.last_top
    ]


@pytest.mark.parametrize("seed", range(5))
def test_packed_order_is_the_layout_torch_packs(seed):
    """recur_packed gathers the (user, step) rows straight into PackedSequence's time-major layout;
    the gather must be the one pack_padded_sequence would have made from a padded [B, T] tensor."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 9, size=int(rng.integers(1, 40)))
    perm, batch_sizes, order = packed_order(lengths)
    starts = np.cumsum(lengths) - lengths
    expected = [starts[u] + t for t in range(lengths.max()) for u in order if lengths[u] > t]
    assert perm.tolist() == expected
    assert sorted(perm.tolist()) == list(range(lengths.sum()))
    padded = torch.zeros(len(lengths), int(lengths.max()), 1)
    packed = torch.nn.utils.rnn.pack_padded_sequence(
        padded, torch.from_numpy(lengths), batch_first=True, enforce_sorted=False
    )
    assert batch_sizes.tolist() == packed.batch_sizes.tolist()
    assert lengths[order].tolist() == lengths[packed.sorted_indices.numpy()].tolist()


def test_step_many_equals_one_step_per_event():
    """A micro-batch with several events per user: one packed call == one step per event."""
    rng = np.random.default_rng(3)
    torch.manual_seed(3)
    events = random_events(rng, n_users=6, max_len=9)
    vocab = Vocabulary.build([e.category for e in events], max_size=6)
    cfg = ModelConfig(n_categories=len(vocab), hidden=24)
    scorer = Scorer(Checkpoint(live_net(cfg, vocab, events, 3), vocab, "00000000"), top_k=4)
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
        assert np.allclose([x for _, x in p.top_categories], [x for _, x in q.top_categories], atol=1e-5)
    for u in users:
        assert np.abs(a[u].h - b[u].h).max() <= 1e-5 and np.abs(a[u].c - b[u].c).max() <= 1e-5
        assert [c for c, _ in a[u].last_top] == [c for c, _ in b[u].last_top]
        for f in SUMMARY_FIELDS:
            assert getattr(a[u], f) == getattr(b[u], f), f


def test_a_category_outside_the_vocabulary_is_ranked_under_its_own_name():
    """A category unseen in training (so outside the vocabulary) that the user viewed twice is predicted,
    named, from its history slot: streaming, in the stored last_top, and offline."""
    vocab = Vocabulary(["<unk>", "shoes", "bags", "hats"])
    net = DemandLSTM(ModelConfig(n_categories=len(vocab), hidden=16))
    net.set_tables(
        markov_tables(np.array([1, 1, 2, 3]), np.array([[1, 2], [2, 3]]), len(vocab), net.cfg.markov_top_k)
    )
    init_like_cascade(net)
    scorer = Scorer(Checkpoint(net.eval(), vocab, "00000000"), top_k=3)
    s = scorer.new_state()
    events = [
        Event(f"e{k}", "u1", 1.7e9 + 30.0 * k, "view", f"i{k}", c, 20.0)
        for k, c in enumerate(["shoes", "garden-gnomes", "bags", "garden-gnomes"])
    ]
    preds = [scorer.step([e], [s])[0] for e in events]
    assert "garden-gnomes" not in vocab.names
    assert preds[-1].top_categories[0][0] == "garden-gnomes"  # the current category comes first
    assert "garden-gnomes" in [c for c, _ in preds[2].top_categories]  # and is still ranked one event later
    code = s.last_top[0][0]
    assert code < 0 and scorer.category_name(code) == "garden-gnomes"
    # a scorer that never saw the name still ranks the category, by hash
    assert Scorer(Checkpoint(net, vocab, "00000000")).category_name(code) == f"#{-code:08x}"
    log = EventLog.from_events(events).sorted_by_user_time()
    offline = dict(scorer.score_log(log))
    assert offline[len(events) - 1].top_categories == preds[-1].top_categories


def _cascade_start_ranking(pairs, history, window: int | None = None, mixture: bool = False) -> list[str]:
    """The untrained, cascade-initialised network's ranking after one user's ``history`` of (category,
    event type), categories c1..c9 with popularity c7 > c8 > c9 > c6 > c4 > the rest and the Markov
    ``pairs`` (vocabulary indices) as its transition table."""
    names = ["<unk>", *(f"c{i}" for i in range(1, 10))]
    vocab = Vocabulary(names)
    c = len(vocab)
    counts = {1: 1, 2: 1, 3: 1, 4: 4, 5: 1, 6: 3, 7: 9, 8: 7, 9: 5}
    cats = np.repeat(list(counts), list(counts.values()))
    torch.manual_seed(0)
    net = DemandLSTM(ModelConfig(n_categories=c, hidden=16, markov_top_k=4, history_window=window))
    net.set_tables(markov_tables(cats, np.array(pairs), c, 4))
    init_like_cascade(net, mixture=mixture)
    scorer = Scorer(Checkpoint(net.eval(), vocab, "00000000"), top_k=c - 1)
    s = scorer.new_state()
    for k, (cat, etype) in enumerate(history):
        [p] = scorer.step([Event(f"e{k}", "u1", 1.7e9 + 60.0 * k, etype, f"i{k}", cat, 5.0)], [s])
    return [n for n, _ in p.top_categories]


def test_untrained_network_with_cascade_init_ranks_like_the_rule_cascade():
    """set_tables + init_like_cascade: last category, then the cart, then the rest of the history by count
    (recent first on ties; a category outside the vocabulary too), then Markov successors of the current
    category, then popularity."""
    # popularity: c7 > c8 > c9 > the rest; Markov successors of c4: c6 (3 times), then c5 (once)
    pairs = [(4, 6), (4, 6), (4, 6), (4, 5), (1, 2), (7, 8)]
    history = [
        ("c1", "view"),
        ("c2", "view"),
        ("c3", "add_to_cart"),
        ("zz-oov", "view"),
        ("c2", "view"),
        ("c1", "view"),
        ("c4", "view"),
    ]
    ranked = _cascade_start_ranking(pairs, history)
    #       last  cart  history: count 2 (c1 more recent), count 1  Markov of c4  popularity
    assert ranked == ["c4", "c3", "c1", "c2", "zz-oov", "c6", "c5", "c7", "c8"]


def test_calibration_is_applied_inside_heads_so_step_and_forward_agree():
    torch.manual_seed(4)
    events = random_events(np.random.default_rng(4), n_users=4, max_len=12)
    vocab = Vocabulary.build([e.category for e in events])
    net = DemandLSTM(ModelConfig(n_categories=len(vocab), hidden=16)).eval()
    assert float(net.purchase_scale) == 1.0 and float(net.purchase_shift) == 0.0  # identity by default
    log = EventLog.from_events(events).sorted_by_user_time()
    scorer = Scorer(Checkpoint(net, vocab, "00000000"))
    raw = torch.cat([p for _r, _c, p, _h in scorer.predict_log(log)])
    with torch.no_grad():
        net.purchase_scale.fill_(0.5)
        net.purchase_shift.fill_(-1.0)
    cal = torch.cat([p for _r, _c, p, _h in scorer.predict_log(log)])
    assert torch.allclose(cal, torch.sigmoid(0.5 * torch.logit(raw.double()) - 1.0).float(), atol=1e-5)
    # the streaming step goes through the same heads: first events of every user, one round
    firsts = {}
    for e in sorted(events, key=lambda e: (e.user_id, e.ts)):
        firsts.setdefault(e.user_id, e)
    states = [scorer.new_state() for _ in firsts]
    streamed = [p.purchase_propensity for p in scorer.step(list(firsts.values()), states)]
    offline = []
    for rows, _c, p, _h in scorer.predict_log(log):
        offline.extend((int(r), float(v)) for r, v in zip(rows, p, strict=True))
    offline = dict(offline)
    first_row = {log.users[log.user[s]]: int(s) for s in log.user_start[:-1]}
    for uid, p in zip(firsts, streamed, strict=True):
        assert abs(p - offline[first_row[uid]]) <= 1e-5


def test_an_untrained_purchase_head_is_the_funnel_table():
    """The MLP's correction starts at zero: before training, the propensity after every event is the
    table's P(purchase | event type, cart non-empty), whatever the LSTM state."""
    from demandstream.model.core.encoding import encode_log

    events = random_events(np.random.default_rng(5), n_users=6, max_len=20)
    vocab = Vocabulary.build([e.category for e in events])
    cfg = ModelConfig(n_categories=len(vocab), hidden=16)
    net = DemandLSTM(cfg).eval()
    n = len(EVENT_TYPES)
    table = funnel_table(np.repeat(np.arange(n), 4), np.tile([0, 1, 1, 1], n), np.arange(4 * n) % 3 == 0)
    net.set_tables(
        {**markov_tables(np.zeros(0), np.zeros((0, 2)), len(vocab), cfg.markov_top_k), "funnel_logit": table}
    )
    log = EventLog.from_events(events).sorted_by_user_time()
    feats = encode_log(log, cfg, vocab)
    scorer = Scorer(Checkpoint(net, vocab, "00000000"))
    rows = np.concatenate([r for r, _c, _p, _h in scorer.predict_log(log)])
    got = np.concatenate([p.double().numpy() for _r, _c, p, _h in scorer.predict_log(log)])
    want = 1.0 / (1.0 + np.exp(-table[feats.etype[rows], (feats.cart[rows] > 0).astype(int)]))
    assert (feats.cart[rows] > 0).any() and (feats.cart[rows] == 0).any()
    np.testing.assert_allclose(got, want, atol=1e-6)


def test_checkpoint_without_calibration_loads_as_identity_and_version_tracks_it(tmp_path):
    from demandstream.model.core import checkpoint

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


def test_markov_features_leave_out_what_the_rows_own_user_contributed():
    """A training row must not see its own user's transitions in its Markov feature (target leakage):
    with them subtracted, a transition only that user made becomes the popularity back-off, and other
    successors keep their counts over the reduced total."""
    import numpy as np

    from demandstream.model.core.network import MARKOV_ALPHA, markov_tables

    net = DemandLSTM(ModelConfig(n_categories=5, hidden=4, markov_top_k=2))
    cats = np.array([1, 2, 1, 3, 1, 3])
    net.set_tables(markov_tables(cats, np.array([[1, 2], [1, 3], [1, 3]]), 5, 2))
    assert net.markov_next[1].tolist() == [3, 2]
    pop = torch.exp(net.pop_logp)
    src = torch.tensor([1, 1])
    with_own = net.markov_row(src).exp()
    left_out = net.markov_row(src, torch.tensor([[0.0, 1.0], [0.0, 0.0]]), torch.tensor([1.0, 0.0])).exp()
    denom = 3 + MARKOV_ALPHA
    assert torch.allclose(with_own[0, 2], (1 + MARKOV_ALPHA * pop[2]) / denom)
    assert torch.allclose(left_out[0, 2], MARKOV_ALPHA * pop[2] / (denom - 1))  # own count gone
    assert torch.allclose(left_out[0, 3], (2 + MARKOV_ALPHA * pop[3]) / (denom - 1))  # others kept
    assert torch.allclose(left_out[1], with_own[1])  # nothing of its own: untouched


def test_markov_history_mixes_the_rows_of_the_users_categories_by_recency():
    """The history mixture is the Markov row of the current category when the user has one category,
    the recency-weighted mean of the rows otherwise, popularity with no known category; and a training
    row's own transitions are left out of every row it mixes."""
    import numpy as np

    from demandstream.model.core.network import markov_tables

    net = DemandLSTM(ModelConfig(n_categories=5, hidden=4, markov_top_k=2))
    cats = np.array([1, 2, 1, 3, 1, 3, 4, 2])
    net.set_tables(markov_tables(cats, np.array([[1, 2], [1, 3], [1, 3], [4, 2]]), 5, 2))
    d = float(torch.sigmoid(net.mix_decay.detach()))
    hv = torch.tensor([[1, 0, 0], [4, 1, 0], [0, 0, 0]])
    known = hv > 0
    ages = torch.tensor([[0.0, 0.0, 0.0], [0.0, 3.0, 0.0], [0.0, 0.0, 0.0]])
    mix = net.markov_history(hv, known, ages).exp()
    rows = net.markov_row(torch.tensor([1, 4])).exp()
    assert torch.allclose(mix[0], rows[0], atol=1e-6)  # one category: its own row
    assert torch.allclose(mix[1], (rows[1] + d * rows[0]) / (1 + d), atol=1e-6)  # 4 most recent, then 1
    assert torch.equal(mix[2], net.pop_logp.exp().log().exp())  # nothing known: exactly popularity
    # leaving out a user's own 1->3 (the slot of category 1) equals markov_row's leave-out
    own_count = torch.tensor([[[1.0, 0.0], [0.0, 0.0], [0.0, 0.0]]])
    own_total = torch.tensor([[1.0, 0.0, 0.0]])
    left = net.markov_history(hv[:1], known[:1], ages[:1], own_count, own_total).exp()
    assert torch.allclose(
        left[0], net.markov_row(torch.tensor([1]), own_count[:, 0], own_total[:, 0]).exp()[0]
    )


def test_cascade_init_with_a_history_window_ranks_like_cascade_recent():
    """With ``history_window`` W the start keeps only the W most recently seen slots in its cart and
    history tiers; an older slot ranks by the current category's Markov row, as any category outside the
    history (the ``cascade_recent`` baseline, docs/MODEL.md §4.10)."""
    pairs = [(4, 6), (4, 6), (4, 6), (4, 5), (1, 2), (7, 8), (4, 3), (4, 3)]
    history = [
        ("c3", "add_to_cart"),
        ("c9", "view"),
        ("c9", "view"),
        ("c1", "view"),
        ("c2", "view"),
        ("c4", "view"),
    ]
    ranked = {w: _cascade_start_ranking(pairs, history, w) for w in (None, 3)}
    # the whole history: last, cart, history by count (c9 twice), Markov successors of c4, popularity
    assert ranked[None] == ["c4", "c3", "c9", "c2", "c1", "c6", "c5", "c7", "c8"]
    # the 3 most recent (c4, c2, c1): c3 leaves the cart tier for its Markov rank (c4 -> c3 twice),
    # c9 leaves the history tier for its popularity
    assert ranked[3] == ["c4", "c2", "c1", "c6", "c3", "c5", "c7", "c8", "c9"]


def test_cascade_init_with_the_mixture_ranks_the_successors_of_the_recent_categories_together():
    """``init_like_cascade(mixture=True)`` is ``cascade_mix``'s start: outside the history, the mixture of
    the Markov rows of the user's categories (the most recent weighing 1, the one before 0.5) ranks."""
    pairs = [(4, 6), (4, 6), (4, 6), (4, 5), *[(2, 5)] * 10]
    history = [("c2", "view"), ("c4", "view")]
    # c4's row alone: c6 (3 of 4), then c5
    assert _cascade_start_ranking(pairs, history)[:7] == ["c4", "c2", "c6", "c5", "c7", "c8", "c9"]
    # with c2's row at half weight, c5 (1/5 + 0.5 * 10/11) passes c6 (3/5)
    assert _cascade_start_ranking(pairs, history, mixture=True)[:7] == [
        "c4",
        "c2",
        "c5",
        "c6",
        "c7",
        "c8",
        "c9",
    ]
    # beyond a window of one slot, c2 itself is ranked by the mixture too (as no successor, by popularity)
    ranked = _cascade_start_ranking(pairs, history, window=1, mixture=True)
    assert ranked[:4] == ["c4", "c5", "c6", "c7"] and "c2" in ranked
