"""``demandstream score``: offline signals for every valid event of a file, same schema as the topic.

Uses :meth:`demandstream.model.core.scoring.Scorer.score_log`, the offline twin of the stream's step; the output is what
a parity check compares the stream against (|Δp| ≤ 1e-4, docs/ARCHITECTURE.md §Semantics).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

from demandstream.model.core.checkpoint import load
from demandstream.model.core.scoring import Scorer, resolve_device
from demandstream.model.data.loaders import load_log
from demandstream.stream.engine.inference import Pseudonymizer
from demandstream.stream.engine.records import encode_signal


def score_file(
    model_path: str,
    data: Sequence[str],
    fmt: str,
    out: str,
    device: str = "auto",
    top_k: int = 5,
    pseudonym_key: str = "",
    why_top: int = 0,
) -> int:
    dev = resolve_device(device)
    scorer = Scorer(load(model_path, dev), dev, top_k=top_k, why_top=why_top)
    log = load_log(list(data), fmt, keep_ids=True, clean=None).sorted_by_user_arrival()
    pseudo = Pseudonymizer(pseudonym_key) if pseudonym_key else None
    n = 0
    Path(out).parent.mkdir(parents=True, exist_ok=True)  # as checkpoints and reports do
    with open(out, "wb") as fh:
        for row, pred in scorer.score_log(log):
            e = log.event(row)
            uid = pseudo.user(e.user_id) if pseudo else e.user_id
            fh.write(encode_signal(uid, e.event_id, e.ts, scorer.model_version, pred, time.time()) + b"\n")
            n += 1
    return n
