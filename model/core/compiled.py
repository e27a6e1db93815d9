"""The streaming step's heads compiled by ``torch.compile``: the same numbers, far fewer dispatches.

A worker's micro-batches are small (a median of ~110 events under paced load), and on those
:class:`~demandstream.model.core.network.DemandLSTM`'s heads cost more in dispatching ~230 tensor
operations one by one from Python than in arithmetic (docs/BENCHMARKS.md, "2026-12-06"). Inductor fuses
them into a few generated C++ loops. Measured on the bench model (docs/BENCHMARKS.md): the heads take
a third of the eager time at 16 rows and half at 128, and agree with eager to float rounding (the
parity tests bound it).

It is not the default: inductor needs a C++ compiler on the worker's host, and compiling took ~50 s on
2 cores the first time on a machine (~10 s later, from inductor's on-disk cache). Both happen when the
scorer is built, before a worker joins its group: :class:`CompiledHeads` compiles for 1 row and for
2 rows up front, because PyTorch specialises dimensions of size 1, so a first batch of one user would
otherwise compile again inside the running event loop, heartbeats included. ``torch.jit.trace`` was
measured too and left: a deprecated API that saved 10-15 % of the step where this saves 30 %.

Training and the explained path (``why``) stay eager: only :meth:`DemandLSTM.step` and
:meth:`DemandLSTM.heads_in_blocks` (the stream's step) take compiled heads, and only when not explaining.

>>> INFERENCE_MODES
('eager', 'compiled')
"""

from __future__ import annotations

import torch

from demandstream.model.core.network import DemandLSTM
from demandstream.model.errors import OptionError

#: How a :class:`~demandstream.model.core.scoring.Scorer` runs the streaming step's heads: ``eager``
#: (plain PyTorch, the default and the reference) or ``compiled`` (:class:`CompiledHeads`).
INFERENCE_MODES = ("eager", "compiled")


class CompiledHeads:
    """``net.heads`` (eval mode, not explained) compiled with dynamic batch sizes, and compiled now:
    ``samples`` are feature dicts (as :meth:`~demandstream.model.core.encoding.FeatureBuffer.tensors`
    gives, on the net's device) of 1 row and of 2 or more rows, each run once in inference mode.

    The compiled code reads the net's parameters and buffers as they are at each call, so the net
    must be on its device before and stay there after.
    """

    def __init__(self, net: DemandLSTM, samples: list[dict[str, torch.Tensor]]):
        if net.training:
            raise ValueError("compile an eval-mode net: dropout is not part of serving")
        self._net = net
        self._fn = torch.compile(_heads, dynamic=True)
        device = net.pop_logp.device
        try:
            with torch.inference_mode():
                for f in samples:
                    # copies made in inference mode: the compiled code guards on whether its inputs are
                    # inference tensors, and the Scorer's always are (it steps in inference mode)
                    f = {k: v.clone() for k, v in f.items()}
                    n = next(iter(f.values())).shape[0]
                    self._fn(net, torch.zeros(n, net.cfg.hidden, device=device), f)
        except Exception as e:  # a missing or broken C++ toolchain surfaces here, as many types
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise OptionError(
                f"inference 'compiled' could not compile the model's heads ({type(e).__name__}: {first}); "
                "install a C++ compiler or use DEMANDSTREAM_INFERENCE=eager"
            ) from e

    def heads(
        self, h: torch.Tensor, f: dict[str, torch.Tensor], explain: bool = False
    ) -> dict[str, torch.Tensor]:
        """:meth:`DemandLSTM.heads` (the category logits and the purchase logit), compiled. Call it in
        ``torch.inference_mode`` on tensors made there, as the Scorer does: other tensors are correct
        too, but compile again the first time."""
        if explain:
            raise ValueError("the compiled heads do not explain; run the net itself with explain=True")
        return self._fn(self._net, h, f)


def _heads(net: DemandLSTM, h: torch.Tensor, f: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return net.heads(h, f)
