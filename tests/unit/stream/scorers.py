"""A tiny, deterministic scorer for the stream's unit tests (two categories, cascade-initialised)."""

from __future__ import annotations

import numpy as np
import torch

from demandstream.model.core.checkpoint import Checkpoint
from demandstream.model.core.features import Vocabulary
from demandstream.model.core.network import DemandLSTM, ModelConfig, init_like_cascade, markov_tables
from demandstream.model.core.scoring import Scorer


def tiny_scorer() -> Scorer:
    vocab = Vocabulary(["<unk>", "shoes", "bags"])
    torch.manual_seed(0)
    net = DemandLSTM(ModelConfig(n_categories=len(vocab), hidden=8))
    net.set_tables(markov_tables(np.array([1, 2]), np.array([[1, 2]]), len(vocab), net.cfg.markov_top_k))
    init_like_cascade(net)
    return Scorer(Checkpoint(net.eval(), vocab, "00000000"), top_k=3)
