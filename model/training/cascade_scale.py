"""The one-parameter fit of the cascade start's scale on training points (docs/MODEL.md §2), in chunks
of points when a large catalog's logits would not fit in memory at once."""

from __future__ import annotations

import logging

import numpy as np
import torch

from demandstream.model.core.encoding import FeatureBuffer
from demandstream.model.core.network import DemandLSTM
from demandstream.model.data.eventlog import EventLog
from demandstream.model.training.leave_out import OwnCounts
from demandstream.model.training.validation import Targets, full_context_batches

logger = logging.getLogger(__name__)


#: Training points on which the cascade's scale is fitted (a 1-parameter fit: a sample suffices).
SCALE_FIT_POINTS = 20_000


#: ... and fewer when points x (C + K) columns would pass this: the fit holds a few float64 copies of
#: that matrix, 4 GB at 3,600 categories with 20,000 points, and a shop may have 50,000 categories.
SCALE_FIT_FLOATS = 1 << 25


#: Up to this many logits the fit runs on the whole matrix at once; a larger one (a catalog of more than
#: ~400 categories) is scored in chunks of :data:`SCALE_FIT_CHUNK_FLOATS`, its float64 copies made per
#: chunk: measured on a generated shop of 5,730 categories, the whole-matrix fit (5,839 points) was the
#: peak of training (2.74 GB), about 1.2 GB above the epochs'.
SCALE_FIT_WHOLE_FLOATS = 1 << 23


SCALE_FIT_CHUNK_FLOATS = 1 << 21


@torch.no_grad()
def fit_cascade_scale(
    net: DemandLSTM,
    feats: FeatureBuffer,
    log: EventLog,
    tr: Targets,
    device: torch.device,
    rng: np.random.Generator,
    own: OwnCounts | None = None,
) -> float:
    """Multiply the cascade's base weights by the temperature that minimises the training NLL.

    The cascade weights only fix an order; their scale makes the initial distribution far too sharp
    (NLL ~5 nats on the cosmetics sample). Left to Adam, which moves every weight by about the step
    size whatever its gradient, the first epochs spend themselves undoing that sharpness in ways that
    reorder the ranking. One scalar fitted by LBFGS keeps the cascade's order exactly and starts
    gradient training from calibrated probabilities. Returns the fitted scale.
    """
    rows = np.flatnonzero(tr.cat >= 0)
    if not len(rows):
        return 1.0
    columns = int(net.pop_logp.shape[0]) + net.cfg.history_slots
    size = min(SCALE_FIT_POINTS, max(1, SCALE_FIT_FLOATS // columns), len(rows))
    rows = np.sort(rng.choice(rows, size=size, replace=False))
    sample = np.full(len(tr.cat), -1, np.int64)
    sample[rows] = tr.cat[rows]
    was_training = net.training
    net.eval()
    parts = []
    only_sample = Targets(tr.mask, sample, tr.cat_hash, tr.purchase, np.zeros_like(tr.observable))
    for b in full_context_batches(net, feats, log, only_sample, device, own):
        m = b.cat_t >= 0
        parts.append((b.out["cat_logits"][m], b.f["hist_cats"][m], b.cat_t[m], b.hash_t[m]))
    whole = sum(p[0].numel() for p in parts) <= SCALE_FIT_WHOLE_FLOATS
    if whole:
        chunks = [_scale_fit_chunk(net, *(torch.cat(x) for x in zip(*parts, strict=True)), keep_double=True)]
    else:
        rows_per = max(1, SCALE_FIT_CHUNK_FLOATS // columns)
        chunks = [
            _scale_fit_chunk(net, *(x[i : i + rows_per] for x in part), keep_double=False)
            for part in parts
            for i in range(0, part[0].shape[0], rows_per)
        ]
    del parts
    n = sum(len(c[2]) for c in chunks)
    # the temperature is fitted as its log: a negative scale would turn the masked columns' -1e9 into
    # the largest logits, and the line search does try one
    log_scale = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_scale], lr=1.0, max_iter=100, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        with torch.enable_grad():
            if whole:
                z, f, cat_t, hash_t = chunks[0]
                loss = -net.category_log_prob({"cat_logits": log_scale.exp() * z}, f, cat_t, hash_t).mean()
                loss.backward()
                return loss
            # the mean over every point, one chunk's graph at a time (the gradients add up in log_scale)
            total = torch.zeros((), dtype=torch.float64)
            for z, f, cat_t, hash_t in chunks:
                zd = z.double()
                part = (
                    -net.category_log_prob({"cat_logits": log_scale.exp() * zd}, f, cat_t, hash_t).sum() / n
                )
                part.backward()
                total += part.detach()
            return total

    opt.step(closure)
    a = float(log_scale.detach().exp().clamp(min=1e-3))
    net.slot_w0.mul_(a)
    net.vocab_w0.mul_(a)
    net.train(was_training)
    logger.info("cascade scale fitted on %d training points: %.4f", n, a)
    return a


def _finite_logits(z: torch.Tensor) -> torch.Tensor:
    """-inf marks candidates that are never scored; a large finite value keeps them at probability 0
    without turning the scale's gradient into NaN."""
    return torch.where(torch.isfinite(z), z, torch.full_like(z, -1e9))


def _scale_fit_chunk(net: DemandLSTM, logits, hist_cats, cat_t, hash_t, keep_double: bool) -> tuple:
    """The rankable points of one chunk of the cascade-scale fit: ``(logits, {"hist_cats": ...}, cat_t,
    hash_t)``, the never-scored candidates made finite, the logits as float64 (``keep_double``) or
    narrowed back to float32, to be widened per use: the same values either way, since they came as
    float32 and -1e9 is one (2^9 × 1,953,125)."""
    z = _finite_logits(logits.double())
    f = {"hist_cats": hist_cats}
    ok = torch.isfinite(net.category_log_prob({"cat_logits": z}, f, cat_t, hash_t))  # rankable targets only
    kept = z[ok] if keep_double else z[ok].float()
    return kept, {"hist_cats": hist_cats[ok]}, cat_t[ok], hash_t[ok]
