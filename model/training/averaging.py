"""Polyak averaging of a network's weights during training (an exponential moving average).

Early stopping on a small shop's log picks an epoch while the learning rate is still high (the
cosine schedule runs over the whole budget, and validation MRR@20 peaks after 1-3 epochs), so the
iterate at an epoch's end is one noisy point of a trajectory. The average of the recent iterates is a
smoother estimate of the same solution (Polyak & Juditsky, SIAM J. Control Optim. 1992; the weight EMA
of modern training recipes), and costs nothing in the stream: the shipped network is an ordinary one.

>>> import torch
>>> net = torch.nn.Linear(1, 1, bias=False)
>>> with torch.no_grad():
...     _ = net.weight.fill_(0.0)
>>> avg = WeightAverage(net, decay=0.5)
>>> with torch.no_grad():
...     _ = net.weight.fill_(1.0)
>>> avg.update()
>>> with avg.swapped():
...     net.weight.item()
0.5
>>> net.weight.item()
1.0
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn


class WeightAverage:
    """An exponential moving average ``a <- decay * a + (1 - decay) * w`` of ``net``'s parameters,
    started at their current values; buffers (the Markov and funnel tables) are not averaged."""

    def __init__(self, net: nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.live = list(net.parameters())
        self.average = [p.detach().clone() for p in self.live]

    @torch.no_grad()
    def update(self) -> None:
        """Fold the current weights in (after each optimizer step)."""
        torch._foreach_lerp_(self.average, self.live, 1.0 - self.decay)

    @torch.no_grad()
    def install(self) -> None:
        """Put the average into the network for good (training is over)."""
        torch._foreach_copy_(self.live, self.average)

    @contextlib.contextmanager
    def swapped(self) -> Iterator[None]:
        """The average in the network for the block (to measure or keep it), the iterate back after."""
        iterate = [p.detach().clone() for p in self.live]
        self.install()
        try:
            yield
        finally:
            with torch.no_grad():
                torch._foreach_copy_(self.live, iterate)
