"""model/export.py: TorchScript and ONNX one-step graphs agree with the PyTorch step."""

import numpy as np
import pytest
import torch

from model import checkpoint
from model.export import INPUT_NAMES, PARITY_TOL, StepModule, example_inputs, export
from model.features import Vocabulary
from model.network import DemandLSTM, ModelConfig


@pytest.fixture(scope="module")
def ckpt_path(tmp_path_factory):
    torch.manual_seed(0)
    vocab = Vocabulary(["<unk>", "shoes", "bags", "hats", "socks"])
    net = DemandLSTM(ModelConfig(n_categories=len(vocab), hidden=16, item_buckets=256, query_buckets=64))
    path = tmp_path_factory.mktemp("export") / "m.pt"
    checkpoint.save(path, net.eval(), vocab)
    return path


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit is deprecated upstream, still what we ship
def test_torchscript_and_onnx_match_pytorch(ckpt_path, tmp_path):
    res = export(ckpt_path, tmp_path)
    assert res["torchscript_parity"] <= PARITY_TOL
    ts = torch.jit.load(res["torchscript"])
    inputs = example_inputs(
        checkpoint.load(ckpt_path).net, ["<unk>", "shoes", "bags", "hats", "socks"], batch=5, seed=9
    )
    ref = StepModule(checkpoint.load(ckpt_path).net).eval()
    with torch.no_grad():
        expected = ref(*inputs)
        got = ts(*inputs)
    for e, g in zip(expected, got, strict=True):
        assert torch.max(torch.abs(e - g)) <= PARITY_TOL
    probs = expected[0]
    assert torch.allclose(probs.sum(-1), torch.ones(5), atol=1e-5) and (probs[:, 0] == 0).all()

    ort = pytest.importorskip(
        "onnxruntime", reason="onnxruntime not installed: ONNX checked by onnx.checker only"
    )
    assert res["onnx_checked_with"] == "onnxruntime" and res["onnx_parity"] <= PARITY_TOL
    sess = ort.InferenceSession(res["onnx"], providers=["CPUExecutionProvider"])
    outs = sess.run(None, {n: t.numpy() for n, t in zip(INPUT_NAMES, inputs, strict=True)})
    for e, g in zip(expected, outs, strict=True):
        assert np.max(np.abs(e.numpy() - g)) <= PARITY_TOL
