"""Export the one-step model to TorchScript and ONNX, each checked for parity with PyTorch.

The exported graph is :class:`StepModule`: one event per user from feature tensors plus (h, c) to
(category probabilities [B, C + K], purchase propensity, h, c) — exactly :meth:`DemandLSTM.step` followed
by :meth:`DemandLSTM.category_probs` and a sigmoid, i.e. the numbers :meth:`demandstream.model.core.scoring.Scorer.step`
ranks. The per-user history summary (including ``hist_vocab``, the vocabulary index of each slot's
category hash) is computed outside the graph (:mod:`demandstream.model.core.encoding`), as in the stream.

ONNX parity is checked with onnxruntime when it is importable; otherwise only ``onnx.checker`` runs
and the result says so (``onnx_parity`` is None).
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from demandstream.model.core import checkpoint as ckpt_mod
from demandstream.model.core.encoding import COLUMNS, FeatureBuffer, encode_events
from demandstream.model.core.events import EVENT_TYPES, Event
from demandstream.model.core.features import Vocabulary
from demandstream.model.core.network import DemandLSTM
from demandstream.model.core.state import new_state

logger = logging.getLogger(__name__)

#: Parity bound between an exported graph and the PyTorch step (the parity of docs/ARCHITECTURE.md §Semantics
#: is 1e-4 on p; exports are held to the tighter float32 bound the network tests use).
PARITY_TOL = 1e-5

#: ONNX opset: 17 is the oldest with every operator the step uses and is what onnxruntime >= 1.14 runs.
ONNX_OPSET = 17

#: Users in the example batch used for tracing and parity checks.
EXAMPLE_BATCH = 4

#: Feature inputs of the graph: every column :class:`~demandstream.model.core.encoding.FeatureBuffer` hands the network.
FEATURES = tuple(COLUMNS)
INPUT_NAMES = (*FEATURES, "h", "c")
OUTPUT_NAMES = ("category_probs", "purchase_propensity", "h_out", "c_out")


class StepModule(nn.Module):
    """One streaming step as a graph with positional tensor inputs (the order of :data:`INPUT_NAMES`).

    Outputs ``(category_probs [B, C + K], purchase_propensity [B], h, c)``: the numbers
    :meth:`demandstream.model.core.scoring.Scorer.step` ranks and emits (C vocabulary columns, then K history-slot columns
    for categories outside the vocabulary; ``hist_cats`` names those slots by hash).
    """

    def __init__(self, net: DemandLSTM):
        super().__init__()
        self.net = net

    def forward(self, *inputs: torch.Tensor):
        f = dict(zip(FEATURES, inputs[: len(FEATURES)], strict=True))
        h, c = inputs[len(FEATURES)], inputs[len(FEATURES) + 1]
        out, (h2, c2) = self.net.step(f, (h, c))
        probs = self.net.category_probs(out, f)
        return probs, torch.sigmoid(out["purchase_logit"]), h2, c2


def step_inputs(f: dict[str, torch.Tensor], h: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Positional graph inputs from a feature dict (:meth:`FeatureBuffer.tensors`) and (h, c)."""
    return (*(f[k] for k in FEATURES), h, c)


#: Categories outside the vocabulary mixed into the example events, so the history-slot columns of the
#: exported distribution carry probability (a category the vocabulary does not know can be repeated).
EXAMPLE_OOV = ("__export_oov_a", "__export_oov_b")


def example_inputs(
    net: DemandLSTM, vocab_names: list[str], batch: int = EXAMPLE_BATCH, seed: int = 0
) -> tuple[torch.Tensor, ...]:
    """Realistic step inputs: ``batch`` users a few events into their history (vocabulary categories and
    categories outside it), with random (h, c)."""
    cfg = net.cfg
    rng = np.random.default_rng(seed)
    vocab = Vocabulary(vocab_names)
    buf = FeatureBuffer(cfg, batch, vocab)
    states = [new_state(cfg.layers, cfg.hidden, cfg.history_slots) for _ in range(batch)]
    cats = [*vocab_names[1:], *EXAMPLE_OOV, None]
    for k in range(4):
        evs = []
        for b in range(batch):
            et = EVENT_TYPES[int(rng.integers(len(EVENT_TYPES)))]
            evs.append(
                Event(
                    f"e{b}-{k}",
                    f"u{b}",
                    1.7e9 + 60.0 * k + b,
                    et,
                    None if et == "search" else f"i{int(rng.integers(100))}",
                    cats[int(rng.integers(len(cats)))],
                    float(rng.uniform(1, 100)),
                    "red shoes" if et == "search" else None,
                )
            )
        encode_events(buf, evs, states)
    f = buf.tensors(slice(0, batch))
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(cfg.layers, batch, cfg.hidden, generator=gen) * 0.5
    c = torch.randn(cfg.layers, batch, cfg.hidden, generator=gen) * 0.5
    return step_inputs(f, h, c)


def _max_diff(a, b) -> float:
    return max(
        float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
        for x, y in zip(a, b, strict=True)
    )


def export(ckpt_path: str | Path, out_dir: str | Path) -> dict:
    """Write ``step.ts`` (TorchScript) and ``step.onnx`` for a checkpoint; verify both.

    Returns ``{"torchscript": path, "onnx": path, "torchscript_parity": max |Δ|, "onnx_parity": max |Δ| or
    None, "onnx_checked_with": "onnxruntime" | "onnx.checker"}``. Raises ``RuntimeError`` when an export
    differs from PyTorch by more than :data:`PARITY_TOL`.
    """
    ck = ckpt_mod.load(ckpt_path)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    step = StepModule(ck.net.cpu().eval()).eval()
    inputs = example_inputs(ck.net, ck.vocab.names)
    other = example_inputs(ck.net, ck.vocab.names, batch=EXAMPLE_BATCH + 3, seed=1)  # another batch size
    with torch.no_grad(), warnings.catch_warnings():
        # The tracer warns about Python-level shape checks inside nn.LSTM; they are constant for a
        # given model, and parity on a second batch size below proves the graph generalizes.
        warnings.simplefilter("ignore")
        ref = [t.numpy() for t in step(*inputs)]
        ref_other = [t.numpy() for t in step(*other)]

        ts_path = out_dir / "step.ts"
        traced = torch.jit.trace(step, inputs, check_trace=False)
        traced.save(str(ts_path))
        loaded = torch.jit.load(str(ts_path))
        ts_diff = max(
            _max_diff(ref, [t.numpy() for t in loaded(*inputs)]),
            _max_diff(ref_other, [t.numpy() for t in loaded(*other)]),
        )
    if ts_diff > PARITY_TOL:
        raise RuntimeError(f"TorchScript export differs from PyTorch by {ts_diff:.2e} > {PARITY_TOL}")

    onnx_path = out_dir / "step.onnx"
    batch_dim = {0: "batch"}
    dynamic = {name: batch_dim for name in FEATURES}
    dynamic.update(
        {
            "h": {1: "batch"},
            "c": {1: "batch"},
            "category_probs": batch_dim,
            "purchase_propensity": batch_dim,
            "h_out": {1: "batch"},
            "c_out": {1: "batch"},
        }
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the same tracer warnings, and the h0/c0 note: they are inputs here
        torch.onnx.export(
            step,
            inputs,
            str(onnx_path),
            input_names=list(INPUT_NAMES),
            output_names=list(OUTPUT_NAMES),
            dynamic_axes=dynamic,
            opset_version=ONNX_OPSET,
            dynamo=False,
        )
    import onnx

    onnx.checker.check_model(onnx.load(str(onnx_path)))
    result = {
        "torchscript": str(ts_path),
        "onnx": str(onnx_path),
        "torchscript_parity": ts_diff,
        "onnx_parity": None,
        "onnx_checked_with": "onnx.checker",
        "model_version": ck.model_version,
    }
    try:
        import onnxruntime as ort
    except ImportError:
        logger.warning("onnxruntime is not installed: ONNX graph checked with onnx.checker only, no parity")
        return result
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    diff = 0.0
    for inp, expected in ((inputs, ref), (other, ref_other)):
        feeds = {n: t.numpy() for n, t in zip(INPUT_NAMES, inp, strict=True)}
        diff = max(diff, _max_diff(expected, sess.run(list(OUTPUT_NAMES), feeds)))
    if diff > PARITY_TOL:
        raise RuntimeError(f"ONNX export differs from PyTorch by {diff:.2e} > {PARITY_TOL}")
    result.update(onnx_parity=diff, onnx_checked_with="onnxruntime")
    return result
