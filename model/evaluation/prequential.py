"""Offline prequential figures: a log scored the way a live worker scores its stream.

The ``prequential`` key of ``demandstream evaluate``'s report (docs/ARCHITECTURE.md §Evaluation): the
model's signal after every point (a row at or after ``start_ts``) is judged by the user's next event and
by the purchases that follow, with the functions and the :class:`~demandstream.model.core.prequential.PurchaseResolver`
the worker runs (stream/worker/quality.py), over the rows in event-time order as one stream. A worker
fed the same events in time order exports the same counts (tests/integration/test_quality.py); it
differs only where a partition of its own sees a gap or an end that the whole log does not.

>>> import torch
>>> from demandstream.model.core.checkpoint import Checkpoint
>>> from demandstream.model.core.events import Event
>>> from demandstream.model.core.features import Vocabulary
>>> from demandstream.model.core.network import DemandLSTM, ModelConfig
>>> from demandstream.model.data.eventlog import EventLog
>>> _ = torch.manual_seed(0)
>>> ck = Checkpoint(DemandLSTM(ModelConfig(n_categories=3)).eval(), Vocabulary(["<unk>", "a", "b"]), "0a1b2c3d")
>>> evs = [Event(f"e{i}", "u", 1000.0 + 60 * i, "purchase" if i == 3 else "view", "i", "ab"[i % 2])
...        for i in range(6)]
>>> rep = prequential_report(ck, EventLog.from_events(evs).sorted_by_user_time(), 0.0, horizon_s=120.0)
>>> rep["category_points"], rep["purchase_points"], rep["purchase_positives"]
(5, 3, 2)
"""

from __future__ import annotations

import math

import numpy as np

from demandstream.model.core.checkpoint import Checkpoint
from demandstream.model.core.prequential import (
    CategoryTally,
    PurchaseResolver,
    PurchaseTally,
    figures,
    top_rank,
)
from demandstream.model.core.scoring import Scorer
from demandstream.model.data.eventlog import EventLog
from demandstream.model.data.labels import PURCHASE


def prequential_report(
    ckpt: Checkpoint,
    log: EventLog,
    start_ts: float,
    horizon_s: float,
    gap_s: float | None = None,
    device: str = "cpu",
    top_k: int = 5,
) -> dict:
    """:func:`demandstream.model.core.prequential.figures` of the points ``ts >= start_ts`` of a log
    sorted by user and time, every user's sequence scored from its first event (context before
    ``start_ts`` included). ``gap_s`` None: no gap censoring. ``top_k`` is the stored top size
    (``DEMANDSTREAM_TOP_K`` of the workers compared with)."""
    scorer = Scorer(ckpt, device=device, top_k=top_k)
    ts = np.asarray(log.ts, np.float64)
    points = ts >= start_ts
    preds: dict[int, tuple[list[str], float]] = {}
    for row, p in scorer.score_log(log, points):
        preds[row] = ([c for c, _ in p.top_categories], p.purchase_propensity)
    cat, pur = CategoryTally(), PurchaseTally()
    resolver = PurchaseResolver(horizon_s, math.inf if gap_s is None else gap_s, pur)
    users, cats, names, etypes = log.user, log.category, log.categories, log.etype
    last: dict[int, list[str]] = {}  # user -> the top of its latest point
    rows = np.flatnonzero(points)
    for r in rows[np.argsort(ts[rows], kind="stable")].tolist():
        u = int(users[r])
        prior = last.get(u)
        if prior is not None:
            c = int(cats[r])
            rank = top_rank(prior, names[c] if c >= 0 else None)
            if rank is not None:
                cat.add(rank)
        top, p = preds[r]
        resolver.event(str(u), float(ts[r]), int(etypes[r]) == PURCHASE, p)
        last[u] = top
    return {
        "start_ts": float(start_ts),
        "horizon_s": float(horizon_s),
        "gap_s": gap_s,
        "open_at_end": resolver.pending,
        **figures(cat, pur, scorer.top_k),
    }
