"""Scoring: demand predictions from a trained model, one step at a time or over a whole log.

:class:`Scorer` is the single place where events meet the network. The stream calls
:meth:`Scorer.step` once per micro-batch round (one event per user); ``demandstream score`` and the
evaluator call :meth:`Scorer.predict_log`, which runs the same weights over whole sequences. Both
encode through :mod:`model.encoding`, so their outputs agree to float precision (DESIGN §6, parity).

>>> from model.network import DemandLSTM, ModelConfig
>>> from model.features import Vocabulary
>>> from model.checkpoint import Checkpoint
>>> from model.events import TYPE_INDEX, Event
>>> torch.manual_seed(0) is not None
True
>>> vocab = Vocabulary(["<unk>", "shoes", "bags"])
>>> sc = Scorer(Checkpoint(DemandLSTM(ModelConfig(n_categories=3)).eval(), vocab, "0a1b2c3d"), top_k=2)
>>> st = sc.new_state()
>>> [p] = sc.step([Event("e1", "u1", 1.7e9, "view", "i1", "shoes", 10.0)], [st])
>>> [c for c, _ in p.top_categories], st.events_seen, 0.0 < p.purchase_propensity < 1.0
(['shoes', 'bags'], 1, True)
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from model.checkpoint import Checkpoint
from model.encoding import FeatureBuffer, encode_events, encode_log, event_features
from model.eventlog import EventLog
from model.events import TYPE_INDEX, Event
from model.network import DemandLSTM
from model.state import UserState, new_state

logger = logging.getLogger(__name__)

#: Offline scoring pads users of similar length into one batch of at most this many (user, step) cells.
OFFLINE_BATCH_CELLS = 1 << 16


@dataclass(slots=True)
class Prediction:
    """The demand signal's payload for one event (DESIGN §4)."""

    top_categories: list[tuple[str, float]]
    purchase_propensity: float
    events_seen: int


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` -> CUDA when available, else CPU; ``cuda`` without a GPU is a user error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but torch sees no CUDA GPU (use --device cpu or auto)")
    if name != "cpu" and not name.startswith("cuda"):
        raise ValueError(f"unknown device {name!r}: use auto, cpu or cuda")
    return torch.device(name)


class Scorer:
    """A loaded model ready to score: network in eval mode on a device, vocabulary, top-k."""

    def __init__(self, ckpt: Checkpoint, device: str | torch.device = "cpu", top_k: int = 5,
                 max_batch: int = 4096):
        self.device = torch.device(device)
        if self.device.type == "cuda":
            # TF32 (PyTorch's default for cuDNN on Ampere and later) rounds matmul inputs to 10-bit
            # mantissas: ~1e-3 relative error, which would break stream/offline parity (1e-4, DESIGN §6).
            # This model is far too small for TF32 to matter for speed.
            torch.backends.cuda.matmul.allow_tf32 = False
            torch.backends.cudnn.allow_tf32 = False
        self.net: DemandLSTM = ckpt.net.to(self.device).eval()
        self.cfg = ckpt.net.cfg
        self.vocab = ckpt.vocab
        self.model_version = ckpt.model_version
        self.top_k = min(top_k, len(self.vocab) - 1)
        self._buf = FeatureBuffer(self.cfg, max_batch)
        self._names = self.vocab.names

    def new_state(self) -> UserState:
        s = new_state(self.cfg.layers, self.cfg.hidden, self.cfg.history_slots)
        s.model_version = self.model_version
        return s

    @torch.inference_mode()
    def step(self, events: Sequence[Event], states: Sequence[UserState]) -> list[Prediction]:
        """Advance each user's state by one event (users distinct) and predict; ``states`` are updated.

        One batched network call for the whole round, whatever its size.
        """
        n = len(events)
        if n == 0:
            return []
        if n > self._buf.n:
            self._buf = FeatureBuffer(self.cfg, max(n, 2 * self._buf.n))
        encode_events(self._buf, events, states, self.vocab)
        f = self._buf.tensors(slice(0, n), self.device)
        h = torch.from_numpy(np.stack([s.h for s in states], axis=1)).to(self.device)
        c = torch.from_numpy(np.stack([s.c for s in states], axis=1)).to(self.device)
        out, (h2, c2) = self.net.step(f, (h, c))
        probs = self.net.category_probs(out, f["hist_cats"])
        top_p, top_i = probs.topk(self.top_k, dim=-1)
        prop = torch.sigmoid(out["purchase_logit"])
        h_np, c_np = h2.cpu().numpy(), c2.cpu().numpy()
        top_p, top_i, prop = top_p.cpu().tolist(), top_i.cpu().tolist(), prop.cpu().tolist()
        names = self._names
        preds = []
        for j, s in enumerate(states):
            s.h = h_np[:, j, :].copy()
            s.c = c_np[:, j, :].copy()
            s.last_top = list(zip(top_i[j], top_p[j], strict=True))
            s.last_propensity = prop[j]
            preds.append(Prediction([(names[i], p) for i, p in zip(top_i[j], top_p[j], strict=True)],
                                    prop[j], s.events_seen))
        return preds

    @torch.inference_mode()
    def step_many(self, seqs: Sequence[Sequence[Event]], states: Sequence[UserState]) -> list[list[Prediction]]:
        """Advance each user by all of its events in order (users distinct); one network call.

        Equal to calling :meth:`step` once per event (tests/unit/model/test_network.py checks it).
        """
        lengths = [len(q) for q in seqs]
        if not seqs:
            return []
        t_max = max(lengths)
        if t_max == 1:
            return [[p] for p in self.step([q[0] for q in seqs], states)]
        n = sum(lengths)
        if n > self._buf.n:
            self._buf = FeatureBuffer(self.cfg, max(n, 2 * self._buf.n))
        buf, index, cfg = self._buf, self.vocab.index, self.cfg
        idx = np.empty((len(seqs), t_max), np.int64)
        rows = []
        for b, (q, s) in enumerate(zip(seqs, states, strict=True)):
            r0 = len(rows)
            rows.extend(event_features(cfg, s, index(e.category), TYPE_INDEX[e.type], e.ts, e.item_id, e.price,
                                       e.query) for e in q)
            idx[b, : len(q)] = np.arange(r0, r0 + len(q))
            idx[b, len(q):] = r0 + len(q) - 1  # padding repeats the last row; it is masked out
        buf.put_rows(0, rows)
        f = buf.tensors(idx, self.device)
        h = torch.from_numpy(np.stack([s.h for s in states], axis=1)).to(self.device)
        c = torch.from_numpy(np.stack([s.c for s in states], axis=1)).to(self.device)
        out, (h2, c2), valid = self.net.forward_packed(f, torch.tensor(lengths), (h, c))
        probs = self.net.category_probs(out, f["hist_cats"][valid])
        top_p, top_i = probs.topk(self.top_k, dim=-1)
        prop = torch.sigmoid(out["purchase_logit"])
        h_np, c_np = h2.cpu().numpy(), c2.cpu().numpy()
        top_p, top_i, prop = top_p.cpu().tolist(), top_i.cpu().tolist(), prop.cpu().tolist()
        names = self._names
        result, k = [], 0
        for b, (q, s) in enumerate(zip(seqs, states, strict=True)):
            preds = []
            first_seen = s.events_seen - len(q)
            for t in range(len(q)):
                preds.append(Prediction([(names[i], p) for i, p in zip(top_i[k], top_p[k], strict=True)],
                                        prop[k], first_seen + t + 1))
                k += 1
            s.h = h_np[:, b, :].copy()
            s.c = c_np[:, b, :].copy()
            s.last_top = list(zip(top_i[k - 1], top_p[k - 1], strict=True))
            s.last_propensity = prop[k - 1]
            result.append(preds)
        return result

    @torch.inference_mode()
    def predict_log(self, log: EventLog, rows: np.ndarray | None = None,
                    features: FeatureBuffer | None = None) -> Iterator[tuple[np.ndarray, torch.Tensor, torch.Tensor]]:
        """Offline: yield ``(row_ids, category_probs [n, C], purchase_propensity [n])`` chunks.

        Every user's whole sequence is run from a fresh state; only rows where ``rows`` (a bool mask
        over the log) is true are yielded (all rows when None). The log must be sorted by user and time.
        """
        feats = features if features is not None else encode_log(log, self.cfg, self.vocab)
        want = np.ones(len(log), bool) if rows is None else rows
        starts, ends = log.user_start[:-1], log.user_start[1:]
        lengths = ends - starts
        users = [u for u in np.argsort(-lengths, kind="stable") if lengths[u] > 0 and want[starts[u]:ends[u]].any()]
        i = 0
        while i < len(users):
            t_max = int(lengths[users[i]])
            b = max(1, OFFLINE_BATCH_CELLS // t_max)
            batch = users[i: i + b]
            i += b
            # Pad each user's row indices with its own last row: an LSTM is causal, so padding after
            # the end never changes earlier outputs.
            idx = np.empty((len(batch), t_max), np.int64)
            for k, u in enumerate(batch):
                s, e = int(starts[u]), int(ends[u])
                idx[k, : e - s] = np.arange(s, e)
                idx[k, e - s:] = e - 1
            f = feats.tensors(idx, self.device)
            out, _ = self.net(f)
            valid = np.zeros_like(idx, dtype=bool)
            for k, u in enumerate(batch):
                n_u = int(lengths[u])
                valid[k, :n_u] = want[idx[k, :n_u]]
            vt = torch.from_numpy(valid).to(self.device)
            sel = {k: v[vt] for k, v in out.items()}
            probs = self.net.category_probs(sel, f["hist_cats"][vt])
            yield idx[valid], probs, torch.sigmoid(sel["purchase_logit"])

    def score_log(self, log: EventLog) -> Iterator[tuple[int, Prediction]]:
        """Offline signals of every row: ``(row, Prediction)``, the same numbers the stream emits."""
        names = self._names
        for row_ids, probs, prop in self.predict_log(log):
            top_p, top_i = probs.topk(self.top_k, dim=-1)
            tp, ti, pp = top_p.cpu().tolist(), top_i.cpu().tolist(), prop.cpu().tolist()
            for j, r in enumerate(row_ids.tolist()):
                seen = r - int(log.user_start[log.user[r]]) + 1
                yield r, Prediction([(names[i], p) for i, p in zip(ti[j], tp[j], strict=True)], pp[j], seen)
