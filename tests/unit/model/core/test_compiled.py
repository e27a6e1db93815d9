"""model/core/compiled.py: the compiled heads give the eager heads' numbers, at every batch size the
stream makes (one user, several, several events per user), and the explained path stays eager."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from demandstream.model.core.checkpoint import Checkpoint
from demandstream.model.core.compiled import CompiledHeads
from demandstream.model.core.features import Vocabulary
from demandstream.model.core.network import ModelConfig
from demandstream.model.core.scoring import Scorer
from demandstream.model.core.state import SUMMARY_FIELDS
from demandstream.model.errors import OptionError
from tests.unit.model.core.test_network import live_net, random_events

#: as step vs forward (docs/ARCHITECTURE.md §Semantics, parity): fused loops may round differently
TOL = 1e-5

pytestmark = pytest.mark.slow  # one compilation: ~50 s on 2 cores with a cold inductor cache


@pytest.fixture(scope="module")
def scorers():
    events = random_events(np.random.default_rng(5), n_users=9, max_len=12)
    vocab = Vocabulary.build([e.category for e in events], max_size=6)  # some categories outside it
    ckpt = Checkpoint(
        live_net(ModelConfig(n_categories=len(vocab), hidden=16), vocab, events, 5), vocab, "0c0c0c0c"
    )
    return events, Scorer(ckpt, top_k=4), Scorer(ckpt, top_k=4, inference="compiled")


@pytest.fixture
def no_recompile():
    """A compilation after the scorer's own is an error (RecompileError) while the test runs."""
    with torch._dynamo.config.patch(error_on_recompile=True):
        yield


def users_events(events):
    out = {}
    for e in sorted(events, key=lambda e: (e.user_id, e.ts)):
        out.setdefault(e.user_id, []).append(e)
    return out


@pytest.mark.parametrize("per_batch", [1, 3])
def test_the_compiled_step_gives_the_eager_signals_and_states(scorers, per_batch, no_recompile):
    """Rounds of one user alone, then of every user, each with ``per_batch`` events per user (3: the
    packed path), advance states the same way and give the same signals as the eager scorer, and
    nothing compiles again once the scorer is built (a compilation would stall a running worker)."""
    events, eager, compiled = scorers
    by_user = users_events(events)
    users = sorted(by_user)
    a = {u: eager.new_state() for u in users}
    b = {u: compiled.new_state() for u in users}
    rounds = [[users[0]]] + [users] * 4
    pos = dict.fromkeys(users, 0)
    compared = 0
    for us in rounds:
        seqs, who = [], []
        for u in us:
            q = by_user[u][pos[u] : pos[u] + per_batch]
            if q:
                seqs.append(q)
                who.append(u)
                pos[u] += len(q)
        if not seqs:
            continue
        pa = eager.step_many(seqs, [a[u] for u in who])
        pb = compiled.step_many(seqs, [b[u] for u in who])
        for xs, ys in zip(pa, pb, strict=True):
            for p, q in zip(xs, ys, strict=True):
                assert [c for c, _ in p.top_categories] == [c for c, _ in q.top_categories]
                assert np.allclose(
                    [x for _, x in p.top_categories], [x for _, x in q.top_categories], atol=TOL
                )
                assert abs(p.purchase_propensity - q.purchase_propensity) <= TOL
                compared += 1
    assert compared >= len(users) * 2
    for u in users:
        assert np.abs(a[u].h - b[u].h).max() <= TOL and np.abs(a[u].c - b[u].c).max() <= TOL
        for f in SUMMARY_FIELDS:
            assert getattr(a[u], f) == getattr(b[u], f), f


def test_the_compiled_heads_equal_the_eager_heads_at_any_batch_size(scorers, no_recompile):
    """The logits themselves, -inf where eager has -inf, on random LSTM outputs, with no new compilation."""
    events, eager, compiled = scorers
    net, heads = eager.net, compiled._compiled
    rng = torch.Generator().manual_seed(2)
    for n in (1, 2, 5, 23):
        with torch.inference_mode():  # as the Scorer steps
            f = features_of(eager, events[:n])
            h = torch.randn(n, net.cfg.hidden, generator=rng)
            want, got = net.heads(h, f), heads.heads(h, f)
        for key in ("cat_logits", "purchase_logit"):
            assert torch.equal(torch.isinf(want[key]), torch.isinf(got[key])), key
            assert (want[key] - got[key]).nan_to_num(posinf=0.0, neginf=0.0).abs().max() <= TOL, key


def test_explaining_runs_the_eager_heads_even_when_compiled(scorers):
    events, eager, compiled = scorers
    f = features_of(eager, events[:3])
    h0 = eager.net.initial_state(3)
    with torch.inference_mode():
        out, _ = eager.net.step(f, h0, explain=True, compiled=compiled._compiled)
    assert "x_phi" in out  # only the eager heads return the explained terms
    with pytest.raises(ValueError, match="do not explain"):
        compiled._compiled.heads(torch.zeros(3, eager.net.cfg.hidden), f, explain=True)


def test_an_unknown_inference_mode_is_a_user_error(scorers):
    _, eager, _ = scorers
    ckpt = Checkpoint(eager.net, eager.vocab, eager.model_version)
    with pytest.raises(OptionError, match="unknown inference mode 'jit'"):
        Scorer(ckpt, inference="jit")


def test_a_net_in_training_mode_is_not_compiled(scorers):
    _, eager, _ = scorers
    net = eager.net.train()
    try:
        with pytest.raises(ValueError, match="eval-mode"):
            CompiledHeads(net, [])
    finally:
        net.eval()


def features_of(scorer: Scorer, events) -> dict[str, torch.Tensor]:
    """Step features of ``events`` as each one's user's first event (fresh states)."""
    from demandstream.model.core.encoding import FeatureBuffer, encode_rows
    from demandstream.model.core.state_batch import StateBatch

    buf = FeatureBuffer(scorer.cfg, len(events), scorer.vocab)
    batch = StateBatch.from_states([scorer.new_state() for _ in events])
    encode_rows(buf, [[e] for e in events], batch.summaries, np.arange(len(events)))
    return buf.tensors(slice(0, len(events)))


def test_a_host_that_cannot_compile_gets_one_line_naming_the_way_out(scorers, monkeypatch):
    """What inductor raises without a working C++ compiler (InvalidCxxCompiler, wrapped) becomes an
    OptionError: the CLI prints it as one line and exits non-zero."""
    from demandstream.model.core import compiled

    def no_compiler(fn, **_):
        def run(*_a, **_k):
            raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found\n(long details)")

        return run

    monkeypatch.setattr(compiled.torch, "compile", no_compiler)
    _, eager, _ = scorers
    ckpt = Checkpoint(eager.net, eager.vocab, eager.model_version)
    with pytest.raises(OptionError) as e:
        Scorer(ckpt, inference="compiled")
    assert "\n" not in str(e.value)
    assert "No working C++ compiler found" in str(e.value) and "DEMANDSTREAM_INFERENCE=eager" in str(e.value)


def test_explaining_every_step_compiles_nothing_and_says_so(scorers, monkeypatch, caplog):
    from demandstream.model.core import compiled

    monkeypatch.setattr(compiled.torch, "compile", lambda *a, **k: pytest.fail("compiled while explaining"))
    _, eager, _ = scorers
    sc = Scorer(Checkpoint(eager.net, eager.vocab, eager.model_version), why_top=2, inference="compiled")
    assert sc._compiled is None
    assert "not used while why_top > 0" in caplog.text
