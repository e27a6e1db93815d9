"""Scoring: demand predictions from a trained model, one step at a time or over a whole log.

:class:`Scorer` is the single place where events meet the network. The stream calls
:meth:`Scorer.step` once per micro-batch round (one event per user); ``demandstream score`` and the
evaluator call :meth:`Scorer.predict_log`, which runs the same weights over whole sequences. Both
encode through :mod:`demandstream.model.core.encoding`, so their outputs agree to float precision
(docs/ARCHITECTURE.md §Semantics, parity).

>>> from demandstream.model.core.network import DemandLSTM, ModelConfig, init_like_cascade
>>> from demandstream.model.core.features import Vocabulary
>>> from demandstream.model.core.checkpoint import Checkpoint
>>> from demandstream.model.core.events import Event
>>> torch.manual_seed(0) is not None
True
>>> vocab = Vocabulary(["<unk>", "shoes", "bags"])
>>> net = DemandLSTM(ModelConfig(n_categories=3))
>>> init_like_cascade(net)  # untrained, it ranks as the rule cascade: the current category first
>>> sc = Scorer(Checkpoint(net.eval(), vocab, "0a1b2c3d"), top_k=2)
>>> st = sc.new_state()
>>> [p] = sc.step([Event("e1", "u1", 1.7e9, "view", "i1", "shoes", 10.0)], [st])
>>> [c for c, _ in p.top_categories], st.events_seen, 0.0 < p.purchase_propensity < 1.0
(['shoes', 'bags'], 1, True)
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from demandstream.model.core import encoding_kernel as kernel
from demandstream.model.core.checkpoint import Checkpoint
from demandstream.model.core.compiled import INFERENCE_MODES, CompiledHeads
from demandstream.model.core.encoding import (
    FeatureBuffer,
    encode_log,
    encode_rows,
    padded_user_batches,
    warm_up,
)
from demandstream.model.core.events import Event
from demandstream.model.core.explain import contributions, top_reasons
from demandstream.model.core.features import category_hash
from demandstream.model.core.network import DemandLSTM
from demandstream.model.core.state import UserState, new_state
from demandstream.model.core.state_batch import StateBatch
from demandstream.model.errors import OptionError

if TYPE_CHECKING:  # the core runs on duck-typed logs; the data layer is never imported by it
    from demandstream.model.data.eventlog import EventLog

logger = logging.getLogger(__name__)

#: Offline scoring pads users of similar length into one batch of at most this many (user, step) cells.
OFFLINE_BATCH_CELLS = 1 << 16

_SEEN = kernel.INT_FIELDS.index("events_seen")

#: Names of out-of-vocabulary categories a Scorer remembers (LRU): enough for every category a shop has.
OOV_NAMES_MAX = 1 << 17


@dataclass(slots=True)
class Prediction:
    """The demand signal's payload for one event (docs/ARCHITECTURE.md §Signals)."""

    top_categories: list[tuple[str, float]]
    purchase_propensity: float
    events_seen: int
    #: per top category, its largest contributions (:func:`demandstream.model.core.explain.top_reasons`);
    #: None unless the Scorer explains (``why_top`` > 0)
    why: list[list[dict]] | None = None


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` -> CUDA when available, else CPU; ``cuda`` without a GPU is a user error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise OptionError("device 'cuda' requested but torch sees no CUDA GPU (use --device cpu or auto)")
    if name != "cpu" and not name.startswith("cuda"):
        raise OptionError(f"unknown device {name!r}: use auto, cpu or cuda")
    return torch.device(name)


class Scorer:
    """A loaded model ready to score: network in eval mode on a device, vocabulary, top-k.

    ``why_top`` > 0 adds to each prediction, per top category, its ``why_top`` largest named
    contributions (:mod:`demandstream.model.core.explain`); 0, the default, costs nothing.
    ``inference`` is how the streaming step runs its heads (:data:`~demandstream.model.core.compiled.INFERENCE_MODES`):
    ``eager``, or ``compiled`` by ``torch.compile``, which happens here (seconds to a minute) and makes
    small batches faster, with the same numbers to float rounding.
    """

    def __init__(
        self,
        ckpt: Checkpoint,
        device: str | torch.device = "cpu",
        top_k: int = 5,
        max_batch: int = 4096,
        why_top: int = 0,
        inference: str = "eager",
    ):
        if inference not in INFERENCE_MODES:
            raise OptionError(f"unknown inference mode {inference!r}: use {' or '.join(INFERENCE_MODES)}")
        self.device = torch.device(device)
        if self.device.type == "cuda":
            # TF32 (PyTorch's default for cuDNN on Ampere and later) rounds matmul inputs to 10-bit
            # mantissas: ~1e-3 relative error, which would break stream/offline parity (1e-4).
            # This model is far too small for TF32 to matter for speed.
            torch.backends.cuda.matmul.allow_tf32 = False
            torch.backends.cudnn.allow_tf32 = False
        self.net: DemandLSTM = ckpt.net.to(self.device).eval()
        self.cfg = ckpt.net.cfg
        self.vocab = ckpt.vocab
        self.model_version = ckpt.model_version
        self.top_k = min(top_k, len(self.vocab) - 1)
        self.why_top = why_top
        self._buf = FeatureBuffer(self.cfg, max_batch, self.vocab)
        warm_up(self._buf)
        self._compiled = None
        if inference == "compiled" and why_top:
            # every step explains, and the explained heads are eager: compiling would only cost time
            logger.warning(
                "inference 'compiled' is not used while why_top > 0: the explained heads run eager"
            )
        elif inference == "compiled":
            samples = FeatureBuffer(self.cfg, 2, self.vocab)
            self._compiled = CompiledHeads(
                self.net,
                [samples.tensors(slice(0, 1), self.device), samples.tensors(slice(0, 2), self.device)],
            )
        self._names = self.vocab.names
        #: the names as an object array: a batch's top-k are named by one fancy index, not per element
        self._names_arr = np.array(self._names, dtype=object)
        #: names of categories outside the vocabulary, by hash, learned from the events scored (bounded)
        self._oov_names: OrderedDict[int, str] = OrderedDict()

    def new_state(self) -> UserState:
        s = new_state(self.cfg.layers, self.cfg.hidden, self.cfg.history_slots)
        s.model_version = self.model_version
        return s

    def remember(self, category: str | None) -> None:
        """Learn the name of a category outside the vocabulary, so a prediction can name it."""
        if category and self.vocab.index(category) == 0:
            h = category_hash(category)
            self._oov_names[h] = category
            self._oov_names.move_to_end(h)
            if len(self._oov_names) > OOV_NAMES_MAX:
                self._oov_names.popitem(last=False)

    def category_name(self, code: int) -> str:
        """Name of a prediction code: a vocabulary index, or minus the hash of an out-of-vocabulary
        category (``#`` and the hash in hex when this process never saw its name)."""
        if code >= 0:
            return self._names[code]
        return self._oov_names.get(-code) or f"#{-code:08x}"

    def _top(
        self, out: dict[str, torch.Tensor], f: dict[str, torch.Tensor]
    ) -> tuple[list[list[int]], list[list[float]], torch.Tensor, list[list[str]]]:
        """Top-k per row of the heads' output ``out`` for features ``f``
        (:meth:`DemandLSTM.category_top`): codes as in :meth:`category_name`, probabilities, the top
        columns of :meth:`DemandLSTM.category_probs`'s layout [n, k] (what :meth:`_why` explains) and
        the categories' names.

        The names of a whole batch come from one index into the vocabulary's names (the per-event
        naming was the top frame of the worker's profile, docs/BENCHMARKS.md); only categories outside
        the vocabulary are looked up one by one.
        """
        top_p, cols = self.net.category_top(out, f, self.top_k)
        hist_cats = f["hist_cats"]
        c = len(self._names)
        top_i = cols
        oov = cols >= c
        any_oov = bool(oov.any())
        if any_oov:
            slot_hash = hist_cats.gather(-1, (cols - c).clamp(min=0))
            top_i = torch.where(oov, -slot_hash, cols)
        codes = top_i.cpu().numpy()
        names = self._names_arr[np.maximum(codes, 0)]
        if any_oov:
            for r, k in zip(*np.nonzero(codes < 0), strict=True):
                names[r, k] = self.category_name(int(codes[r, k]))
        return codes.tolist(), top_p.cpu().tolist(), cols, names.tolist()

    def _why(self, out: dict, f: dict, cols: torch.Tensor) -> list[list[list[dict]]] | None:
        """Per row, per top column, its largest named contributions; None when not explaining."""
        if not self.why_top:
            return None
        terms, count = contributions(out, f, self.net.pop_logp, cols)
        names = self._names
        src = [names[i] if i > 0 else None for i in out["x_src"].cpu().tolist()]
        n = self.why_top
        return [
            [top_reasons(t, k, source, n) for t, k in zip(row_t, row_k, strict=True)]
            for row_t, row_k, source in zip(terms.cpu().tolist(), count.cpu().tolist(), src, strict=True)
        ]

    @staticmethod
    def _prediction(
        names: list[str], ps: list[float], prop: float, seen: int, why: list[list[dict]] | None = None
    ) -> Prediction:
        return Prediction(list(zip(names, ps, strict=True)), prop, seen, why)

    def step(self, events: Sequence[Event], states: Sequence[UserState]) -> list[Prediction]:
        """Advance each user's state by one event (users distinct) and predict; ``states`` are updated.

        One batched network call for the whole round, whatever its size.
        """
        return [p for (p,) in self.step_many([[e] for e in events], states)]

    def step_many(
        self, seqs: Sequence[Sequence[Event]], states: Sequence[UserState]
    ) -> list[list[Prediction]]:
        """Advance each user by all of its events in order (users distinct); one network call.

        Equal to calling :meth:`step` once per event (tests/unit/model/core/test_network.py checks it).
        """
        if not seqs:
            return []
        batch = StateBatch.from_states(states)
        preds = self.step_rows(seqs, batch, range(len(states)))
        batch.into_states(states)
        return preds

    @torch.inference_mode()
    def step_rows(
        self, seqs: Sequence[Sequence[Event]], batch: StateBatch, rows: Sequence[int]
    ) -> list[list[Prediction]]:
        """:meth:`step_many` on states held as arrays (the stream's path): the events of ``seqs[i]``
        advance row ``rows[i]`` of ``batch`` (rows distinct), which is updated in place."""
        lengths = [len(q) for q in seqs]
        n = sum(lengths)
        if n == 0:
            return [[] for _ in seqs]
        if n > self._buf.n:
            self._buf = FeatureBuffer(self.cfg, max(n, 2 * self._buf.n), self.vocab)
        for q in seqs:
            for e in q:
                self.remember(e.category)
        idx = np.asarray(rows, np.int64)
        encode_rows(self._buf, seqs, batch.summaries, idx)
        # The rows were written in (user, step) order, the order recur_packed takes and returns.
        fv = self._buf.tensors(slice(0, n), self.device)
        h = torch.from_numpy(batch.h[:, idx]).to(self.device)
        c = torch.from_numpy(batch.c[:, idx]).to(self.device)
        if max(lengths) == 1:  # one event per user: the plain step, no packing
            hs, (h2, c2) = self.net.recur(fv, (h, c))
        else:
            hs, (h2, c2) = self.net.recur_packed(fv, np.asarray(lengths), (h, c))
        top_i, top_p, names, why, prop = [], [], [], [], []
        # a large micro-batch at a large catalog runs its heads in blocks (network.head_block_rows)
        for _part, out, fb in self.net.heads_in_blocks(
            hs, fv, explain=bool(self.why_top), compiled=self._compiled
        ):
            ti, tp, cols, nm = self._top(out, fb)
            top_i += ti
            top_p += tp
            names += nm
            why += self._why(out, fb, cols) or [None] * len(ti)
            prop += torch.sigmoid(out["purchase_logit"]).cpu().tolist()
        batch.h[:, idx] = h2.cpu().numpy()
        batch.c[:, idx] = c2.cpu().numpy()
        seen = batch.summaries.ints[idx, _SEEN].tolist()
        result, k = [], 0
        for q, r, last_seen in zip(seqs, rows, seen, strict=True):
            first_seen = last_seen - len(q)
            preds = []
            for t in range(len(q)):
                preds.append(self._prediction(names[k], top_p[k], prop[k], first_seen + t + 1, why[k]))
                k += 1
            batch.last_top[r] = list(zip(top_i[k - 1], top_p[k - 1], strict=True))
            batch.last_propensity[r] = prop[k - 1]
            result.append(preds)
        return result

    @torch.inference_mode()
    def predict_log(
        self, log: EventLog, rows: np.ndarray | None = None, features: FeatureBuffer | None = None
    ) -> Iterator[tuple[np.ndarray, torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Offline: yield ``(row_ids, category_probs [n, C + K], purchase_propensity [n], hist_cats [n, K])``.

        Columns past C are the history slots holding categories outside the vocabulary (``hist_cats``
        gives their hashes), as :meth:`DemandLSTM.category_probs` lays them out.

        Every user's whole sequence is run from a fresh state; only rows where ``rows`` (a bool mask
        over the log) is true are yielded (all rows when None). The log must be sorted by user and time.
        """
        for row_ids, prop, out, fv in self._predict_batches(log, rows, features):
            yield row_ids, self.net.category_probs(out, fv), prop, fv["hist_cats"]

    def _predict_batches(self, log: EventLog, rows: np.ndarray | None, features: FeatureBuffer | None):
        """:meth:`predict_log`'s batches with the selected head outputs and features (for ``why``)."""
        feats = features if features is not None else encode_log(log, self.cfg, self.vocab)
        want = np.ones(len(log), bool) if rows is None else rows
        for idx, real in padded_user_batches(log.user_start, want, OFFLINE_BATCH_CELLS):
            f = feats.tensors(idx, self.device)
            valid = real & want[idx]
            row_ids = idx[valid]
            for part, sel, fv in self.net.forward_at(f, torch.from_numpy(valid), explain=bool(self.why_top)):
                yield row_ids[part], torch.sigmoid(sel["purchase_logit"]), sel, fv

    @torch.inference_mode()
    def score_log(self, log: EventLog, rows: np.ndarray | None = None) -> Iterator[tuple[int, Prediction]]:
        """Offline signals of every row (or of the rows where the bool mask ``rows`` is true):
        ``(row, Prediction)``, the same numbers the stream emits. Each user still runs from its first
        event; the heads and the signal run only at the rows asked for."""
        for c in log.categories:
            self.remember(c)
        for row_ids, prop, out, fv in self._predict_batches(log, rows, None):
            ti, tp, cols, names = self._top(out, fv)
            why = self._why(out, fv, cols) or [None] * len(ti)
            pp = prop.cpu().tolist()
            for j, r in enumerate(row_ids.tolist()):
                seen = r - int(log.user_start[log.user[r]]) + 1
                yield r, self._prediction(names[j], tp[j], pp[j], seen, why[j])
