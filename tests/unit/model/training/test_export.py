"""model/training/export.py: TorchScript and ONNX one-step graphs agree with the PyTorch step and with Scorer.step."""

import copy

import numpy as np
import pytest
import torch

from demandstream.model.core import checkpoint
from demandstream.model.core.encoding import FeatureBuffer, encode_events
from demandstream.model.core.events import Event
from demandstream.model.core.features import Vocabulary
from demandstream.model.core.network import DemandLSTM, ModelConfig, init_like_cascade, markov_tables
from demandstream.model.core.scoring import Scorer
from demandstream.model.training.export import (
    INPUT_NAMES,
    PARITY_TOL,
    StepModule,
    example_inputs,
    export,
    step_inputs,
)

NAMES = ["<unk>", "shoes", "bags", "hats", "socks"]


def _net(window: int | None = None) -> DemandLSTM:
    """A small network whose every term is live: Markov tables, cascade weights, then random noise on all
    parameters (the context and LSTM terms start at zero otherwise and would not be exercised)."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    c = len(NAMES)
    net = DemandLSTM(
        ModelConfig(
            n_categories=c,
            hidden=16,
            item_buckets=256,
            query_buckets=64,
            markov_top_k=2,
            history_window=window,
        )
    )
    net.set_tables(markov_tables(rng.integers(1, c, 60), rng.integers(1, c, (40, 2)), c, 2))
    init_like_cascade(net)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return net.eval()


@pytest.fixture(scope="module")
def ckpt_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("export") / "m.pt"
    checkpoint.save(path, _net(), Vocabulary(NAMES))
    return path


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit is deprecated upstream, still what we ship
def test_torchscript_and_onnx_match_pytorch(ckpt_path, tmp_path):
    res = export(ckpt_path, tmp_path)
    assert res["torchscript_parity"] <= PARITY_TOL
    ts = torch.jit.load(res["torchscript"])
    inputs = example_inputs(checkpoint.load(ckpt_path).net, NAMES, batch=5, seed=9)
    ref = StepModule(checkpoint.load(ckpt_path).net).eval()
    with torch.no_grad():
        expected = ref(*inputs)
        got = ts(*inputs)
    for e, g in zip(expected, got, strict=True):
        assert torch.max(torch.abs(e - g)) <= PARITY_TOL
    probs = expected[0]
    k = ref.net.cfg.history_slots
    assert probs.shape == (5, len(NAMES) + k)
    assert torch.allclose(probs.sum(-1), torch.ones(5), atol=1e-5) and (probs[:, 0] == 0).all()
    assert float(probs[:, len(NAMES) :].sum()) > 0  # the example histories hold out-of-vocabulary slots

    ort = pytest.importorskip(
        "onnxruntime", reason="onnxruntime not installed: ONNX checked by onnx.checker only"
    )
    assert res["onnx_checked_with"] == "onnxruntime" and res["onnx_parity"] <= PARITY_TOL
    sess = ort.InferenceSession(res["onnx"], providers=["CPUExecutionProvider"])
    outs = sess.run(None, {n: t.numpy() for n, t in zip(INPUT_NAMES, inputs, strict=True)})
    for e, g in zip(expected, outs, strict=True):
        assert np.max(np.abs(e.numpy() - g)) <= PARITY_TOL


def test_step_module_reproduces_scorer_step():
    """The exported graph's outputs are what the stream emits: Scorer.step's top categories (including a
    category outside the vocabulary, named via its history slot), propensity and new (h, c)."""
    net, vocab = _net(), Vocabulary(NAMES)
    scorer = Scorer(checkpoint.Checkpoint(net, vocab, "00000000"), top_k=4)
    cats = ["shoes", "mittens", "mittens", "bags", None, "hats", "mittens"]
    users = ["u0", "u1", "u2"]
    states = [scorer.new_state() for _ in users]
    graph = StepModule(net).eval()
    buf = FeatureBuffer(net.cfg, len(users), vocab)
    for k in range(5):
        events = [
            Event(
                f"e{u}-{k}",
                u,
                1.7e9 + 60.0 * k + j,
                "view" if (k + j) % 3 else "add_to_cart",
                f"i{k}",
                cats[(k + 2 * j) % len(cats)],
                9.5,
            )
            for j, u in enumerate(users)
        ]
        before = [copy.deepcopy(s) for s in states]
        h = torch.from_numpy(np.stack([s.h for s in before], axis=1))
        c = torch.from_numpy(np.stack([s.c for s in before], axis=1))
        encode_events(buf, events, before)
        f = buf.tensors(slice(0, len(users)))
        with torch.no_grad():
            probs, prop, h2, c2 = graph(*step_inputs(f, h, c))
        preds = scorer.step(events, states)
        for j, p in enumerate(preds):
            top_p, top_i = probs[j].topk(4)
            names = [
                scorer.category_name(i if i < len(NAMES) else -int(f["hist_cats"][j, i - len(NAMES)]))
                for i in top_i.tolist()
            ]
            assert names == [n for n, _ in p.top_categories]
            assert np.allclose(top_p.numpy(), [q for _, q in p.top_categories], atol=PARITY_TOL)
            assert abs(float(prop[j]) - p.purchase_propensity) <= PARITY_TOL
            assert np.abs(h2[:, j].numpy() - states[j].h).max() <= PARITY_TOL
            assert np.abs(c2[:, j].numpy() - states[j].c).max() <= PARITY_TOL
    assert any(n == "mittens" for s in states for n in [scorer.category_name(i) for i, _ in s.last_top])


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_a_model_with_a_history_window_exports_with_the_same_parity(tmp_path):
    path = tmp_path / "w.pt"
    checkpoint.save(path, _net(window=2), Vocabulary(NAMES))
    res = export(path, tmp_path / "out")
    assert res["torchscript_parity"] <= PARITY_TOL
    if res.get("onnx_parity") is not None:
        assert res["onnx_parity"] <= PARITY_TOL
