"""CUDA paths: the same model on the GPU gives the CPU's numbers (runs only where CUDA exists; CI has none)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from demandstream.model.core.checkpoint import Checkpoint
from demandstream.model.core.features import Vocabulary
from demandstream.model.core.network import DemandLSTM, ModelConfig
from demandstream.model.core.scoring import Scorer, resolve_device
from demandstream.model.data.eventlog import EventLog
from tests.unit.model.core.test_network import live_net, random_events

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine"),
]

#: CPU and GPU kernels sum in different orders (and cuDNN's LSTM fuses gates); 1e-4 is the parity
#: bound of docs/ARCHITECTURE.md §Semantics for signals.
GPU_TOL = 1e-4


def test_auto_device_picks_cuda():
    assert resolve_device("auto").type == "cuda"


def test_gpu_step_and_offline_match_cpu():
    rng = np.random.default_rng(11)
    torch.manual_seed(11)
    events = random_events(rng, n_users=40, max_len=25)
    # a capped vocabulary, so categories outside it are ranked through their history slots on both devices
    vocab = Vocabulary.build([e.category for e in events], max_size=8)
    net = live_net(ModelConfig(n_categories=len(vocab)), vocab, events, seed=11)
    cpu = Scorer(Checkpoint(net, vocab, "00000000"), "cpu", top_k=5)
    gpu_net = DemandLSTM(net.cfg)
    gpu_net.load_state_dict(net.state_dict())
    gpu = Scorer(Checkpoint(gpu_net.eval(), vocab, "00000000"), "cuda", top_k=5)
    by_user = {}
    for e in events:
        by_user.setdefault(e.user_id, []).append(e)
    users = sorted(by_user)
    sc, sg = [cpu.new_state() for _ in users], [gpu.new_state() for _ in users]
    pc = cpu.step_many([by_user[u] for u in users], sc)
    pg = gpu.step_many([by_user[u] for u in users], sg)
    diff = 0.0
    for a_list, b_list in zip(pc, pg, strict=True):
        for a, b in zip(a_list, b_list, strict=True):
            diff = max(diff, abs(a.purchase_propensity - b.purchase_propensity))
            pa, pb = dict(a.top_categories), dict(b.top_categories)
            assert a.top_categories[0][0] == b.top_categories[0][0]
            diff = max(diff, max((abs(pa[c] - pb[c]) for c in pa.keys() & pb.keys()), default=0.0))
    assert diff <= GPU_TOL, f"GPU and CPU differ by {diff}"
    for a, b in zip(sc, sg, strict=True):
        assert np.abs(a.h - b.h).max() <= GPU_TOL
        assert a.hist_cats == b.hist_cats and a.last_top[0][0] == b.last_top[0][0]
    assert any(code < 0 for s in sc for code, _ in s.last_top)  # out-of-vocabulary slots were ranked
    # offline scoring on the GPU too
    log = EventLog.from_events(events).sorted_by_user_arrival()
    off_c = {r: p for r, p in cpu.score_log(log)}
    off_g = {r: p for r, p in gpu.score_log(log)}
    assert max(abs(off_c[r].purchase_propensity - off_g[r].purchase_propensity) for r in off_c) <= GPU_TOL
