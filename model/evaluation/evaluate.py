"""Evaluation (docs/ARCHITECTURE.md §Evaluation): the model and every baseline on exactly the same points.

Protocol
--------
- Test points are rows with ``ts ≥ T2``; everything earlier is context. The model runs each user's
  whole sequence from its first event (:meth:`demandstream.model.core.scoring.Scorer.predict_log`, the numbers the stream
  emits); each baseline observes every earlier event of the user.
- Category task: points whose next event (same user) has a category. A next category outside the
  model's vocabulary is a miss for every method (counted as ``n_targets_out_of_vocab``). Ranks count
  ties against the target (:func:`demandstream.model.evaluation.metrics.target_rank`); every category is ranked, no sampled
  negatives.
- Purchase task: points whose label is observable (a window past the end of the data, or across a
  gap of the log longer than ``gap_s``, is censored, even when a purchase was seen inside it).
- Baselines are fitted on rows ``< T2``, never on test rows.
- ``best_baseline`` names, for every metric, the best baseline and the model's ratio to it (> 1:
  the model is better), and :func:`aggregate_reports` folds reports of several seeds into mean,
  std and n.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from demandstream.model.core import checkpoint as ckpt_mod
from demandstream.model.core.checkpoint import Checkpoint
from demandstream.model.core.features import PURCHASE_HORIZON_S, category_hash
from demandstream.model.core.network import DemandLSTM
from demandstream.model.core.scoring import Scorer
from demandstream.model.data.eventlog import EventLog
from demandstream.model.data.split import Split, phase_points, temporal_split, utc_text
from demandstream.model.errors import DataError, OptionError
from demandstream.model.evaluation.baselines import DEFAULT_GAP_S, make_baselines
from demandstream.model.evaluation.metrics import (
    CATEGORY_KEYS,
    LOWER_IS_BETTER,
    PURCHASE_KEYS,
    category_metrics,
    purchase_metrics,
    target_rank,
)
from demandstream.model.evaluation.prequential import prequential_report
from demandstream.model.evaluation.uncertainty import (
    BOOTSTRAP_LEVEL,
    BOOTSTRAP_RESAMPLES,
    BOOTSTRAP_SEED,
    oriented_ratio,
    ratio_intervals,
)

logger = logging.getLogger(__name__)

METHOD_KEYS = CATEGORY_KEYS + PURCHASE_KEYS


def _score_model(
    ckpt: Checkpoint, log: EventLog, want: np.ndarray, cat_target: np.ndarray, device: str
) -> tuple[dict[int, tuple[int, int]], dict[int, float]]:
    """(rank, top1) per category point and propensity per wanted row, from the model.

    ``cat_target`` and the returned top-1 are in the log's raw category space (:func:`raw_categories`).
    The model ranks its vocabulary plus the history slots of categories outside it; a target that is in
    neither is a miss (rank past every column).
    """
    scorer = Scorer(ckpt, device=device)
    vocab = ckpt.vocab
    raw_vocab = np.array([0] + [vocab.index(c) for c in log.categories], np.int64)
    raw_hash = np.r_[0, category_hashes_of(log.categories)]
    vocab_raw = np.zeros(len(vocab), np.int64)
    vocab_raw[raw_vocab[1:]] = np.arange(1, len(raw_vocab))
    vocab_raw[0] = 0
    hash_raw = {int(h): i + 1 for i, h in enumerate(raw_hash[1:].tolist())}
    ranks: dict[int, tuple[int, int]] = {}
    props: dict[int, float] = {}
    for rows, probs, prop, hist_cats in scorer.predict_log(log, want):
        t = cat_target[rows]
        is_cat = t >= 0
        if is_cat.any():
            p = probs[torch.from_numpy(is_cat)]
            hc = hist_cats[torch.from_numpy(is_cat)]
            t_raw = t[is_cat]
            n_vocab = p.shape[1] - hc.shape[1]
            col = (
                DemandLSTM.target_columns(
                    {
                        "hist_cats": hc,
                        "hist_vocab": torch.from_numpy(vocab.index_of_hashes(hc.cpu().numpy())).to(hc.device),
                    },
                    torch.from_numpy(raw_vocab[t_raw]).to(p.device),
                    torch.from_numpy(raw_hash[t_raw]).to(p.device),
                    n_vocab,
                )
                .cpu()
                .numpy()
            )
            pn = p.float().cpu().numpy()
            r = target_rank(pn, np.maximum(col, 0))
            r = np.where(col > 0, r, pn.shape[1] + 1)
            top = pn.argmax(1)
            slot_hash = hc.cpu().numpy()[np.arange(len(top)), np.maximum(top - n_vocab, 0)]
            top_raw = [
                int(vocab_raw[c]) if c < n_vocab else hash_raw.get(int(h), 0)
                for c, h in zip(top.tolist(), slot_hash.tolist(), strict=True)
            ]
            for row, rk, tp in zip(rows[is_cat].tolist(), r.tolist(), top_raw, strict=True):
                ranks[row] = (rk, tp)
        for row, pr in zip(rows.tolist(), prop.float().cpu().numpy().tolist(), strict=True):
            props[row] = pr
    return ranks, props


def raw_categories(log: EventLog) -> np.ndarray:
    """Every row's category in the log's own space: interned id + 1 (0 = none). Baselines rank in this
    space, so they can repeat a category no vocabulary knows, just as the model's history slots can."""
    return (np.asarray(log.category, np.int64) + 1).astype(np.int32)


def category_hashes_of(names) -> np.ndarray:
    return np.array([category_hash(c) for c in names], np.int64)


def _score_baselines(
    log: EventLog,
    cats: np.ndarray,
    split: Split,
    want: np.ndarray,
    cat_target: np.ndarray,
    horizon_s: float,
    n_categories: int,
    gap_s: float | None = DEFAULT_GAP_S,
):
    """Per baseline: (ranks, top1) over category points in row order, propensities over wanted rows,
    and ``settings`` for a baseline that chose some on validation."""
    baselines = make_baselines()
    fit_mask = log.ts < split.valid_end
    for b in baselines:
        chooses = {"valid_start": split.train_end} if b.chooses_on_validation else {}
        b.fit(
            cats, log.etype, log.ts, log.user_start, fit_mask, horizon_s, n_categories, gap_s=gap_s, **chooses
        )
    out = {b.name: {"rank": {}, "top1": {}, "prop": {}, "switch_rank": {}} for b in baselines}
    for b in baselines:
        if b.settings() is not None:
            out[b.name]["settings"] = b.settings()
    etypes, ts = log.etype, log.ts
    for u in range(log.n_users):
        s, e = int(log.user_start[u]), int(log.user_start[u + 1])
        if e == s or not want[s:e].any():
            continue
        last = s + int(np.flatnonzero(want[s:e]).max())
        for b in baselines:
            b.start_user()
            res = out[b.name]
            for i in range(s, last + 1):
                b.observe(int(cats[i]), int(etypes[i]), float(ts[i]))
                if not want[i]:
                    continue
                if cat_target[i] >= 0:
                    sc = b.category_scores()
                    if sc is not None:
                        res["rank"][i] = target_rank(sc, int(cat_target[i]))
                        res["top1"][i] = int(np.argmax(sc))
                        if b.name == HEADROOM_BASELINE and cat_target[i] != cats[i]:
                            rest = sc.copy()
                            rest[int(cats[i])] = -np.inf
                            res["switch_rank"][i] = target_rank(rest, int(cat_target[i]))
                pp = b.purchase_proba()
                if pp is not None:
                    res["prop"][i] = pp
    return out


#: The baseline the report's ``headroom`` is measured on (the strongest rule on real logs).
HEADROOM_BASELINE = "cascade"


def repeat_headroom(
    switch_rank: dict[int, int], cat_pts: np.ndarray, targets: np.ndarray, cats: np.ndarray, k: int = 20
) -> dict:
    """How much knowing *whether* each user repeats their current category would add to the cascade.

    At every category point, an oracle gate puts the current category first when the next event repeats
    it (rank 1) and drops it otherwise (the target's rank among the cascade's other candidates,
    ``switch_rank``). Its MRR@k bounds what any model ranking the cascade's candidates in the cascade's
    order can gain from a better copy-or-switch decision alone; beating it needs better ranking of the
    categories a user switches to. Returned: ``repeat_share`` and ``oracle_gate_mrr@k``.

    >>> repeat_headroom({1: 2}, np.array([0, 1]), np.array([5, 7]), np.array([5, 3]))
    {'repeat_share': 0.5, 'oracle_gate_mrr@20': 0.75}
    """
    if len(cat_pts) == 0:
        return {"repeat_share": math.nan, f"oracle_gate_mrr@{k}": math.nan}
    repeat = targets == cats[cat_pts]
    rr = np.array(
        [
            1.0 if rep else (1.0 / switch_rank[i] if switch_rank[i] <= k else 0.0)
            for i, rep in zip(cat_pts.tolist(), repeat, strict=True)
        ]
    )
    return {"repeat_share": float(repeat.mean()), f"oracle_gate_mrr@{k}": float(rr.mean())}


def _method_report(
    ranks: np.ndarray | None,
    top1: np.ndarray | None,
    targets: np.ndarray,
    n_classes: int,
    props: np.ndarray | None,
    labels: np.ndarray,
) -> dict:
    rep = {}
    if ranks is not None:
        rep.update(category_metrics(ranks, top1, targets, n_classes))
    if props is not None:
        rep.update(purchase_metrics(props, labels))
    return rep


def evaluate(
    ckpt: Checkpoint | str | Path,
    log: EventLog,
    split: Split | None = None,
    horizon_s: float = PURCHASE_HORIZON_S,
    plots_dir: str | Path | None = None,
    device: str = "cpu",
    gap_s: float | None = DEFAULT_GAP_S,
    bootstrap: int = BOOTSTRAP_RESAMPLES,
    refuse_unfitted: bool = True,
    baseline_cache: dict | None = None,
) -> dict:
    """The evaluation report of docs/ARCHITECTURE.md §Evaluation for a checkpoint on a log (see the module
    docstring).

    Returns a dict with ``n_users``, ``n_train_events``, ``n_test_points``, ``model``, ``baselines``
    (``popularity``, ``last_category``, ``user_history``, ``markov``, ``funnel``, ``cascade``,
    ``funnel_cart``), ``best_baseline`` (see :func:`best_baselines`), plus ``n_category_points``,
    ``n_purchase_points``, ``split``, ``category_coverage``, ``model_version``, ``gap_s``.
    ``gap_s`` is the gap threshold of the purchase labels (:func:`demandstream.model.evaluation.baselines.purchase_labels`).
    Each ``best_baseline`` entry carries the user-bootstrap interval of its ratio and a verdict
    (:mod:`demandstream.model.evaluation.uncertainty`; ``bootstrap`` resamples, 0: none).
    A log with no row before T2 is refused (:func:`baseline_fit_check`) unless ``refuse_unfitted`` is
    off. ``baseline_cache`` (a dict the caller keeps) lets several checkpoints evaluated on the same log
    share the baselines, which do not depend on the model: they are scored once per log, split, horizon
    and gap.
    """
    if not isinstance(ckpt, Checkpoint):
        ckpt = ckpt_mod.load(ckpt)
    if log.user_start is None:
        log = log.sorted_by_user_time()
    split = split or temporal_split(log)
    fit_events, model_events = baseline_fit_check(log, split, ckpt, refuse_unfitted)
    vocab = ckpt.vocab
    cats = raw_categories(log)
    pts = phase_points(log, split, "test", cats, horizon_s, gap_s=gap_s)
    cat_pts = np.flatnonzero(pts.category_points)
    buy_pts = np.flatnonzero(pts.observable)
    want = pts.category_points | pts.observable
    targets = pts.cat_target[cat_pts]
    labels = pts.purchase[buy_pts].astype(np.float64)
    n_classes = len(log.categories) + 1

    ranks, props = _score_model(ckpt, log, want, pts.cat_target, device)
    # Per method: target ranks, top-1 predictions and propensities at the shared points (None = cannot score).
    scored: dict[str, tuple] = {
        "model": (
            np.array([ranks[i][0] for i in cat_pts], np.int64),
            np.array([ranks[i][1] for i in cat_pts], np.int64),
            np.array([props[i] for i in buy_pts], np.float64),
        )
    }
    key = (split.train_end, split.valid_end, split.end_ts, horizon_s, gap_s)
    cached = (baseline_cache or {}).get(key)
    if cached is not None and cached[0] is log:
        base = cached[1]
    else:
        base = _score_baselines(log, cats, split, want, pts.cat_target, horizon_s, n_classes, gap_s)
        if baseline_cache is not None:
            baseline_cache[key] = (log, base)
    for name, res in base.items():
        # A baseline scores a task at every point or at none (its method returns None).
        has_cat = len(cat_pts) > 0 and len(res["rank"]) > 0
        has_buy = len(buy_pts) > 0 and len(res["prop"]) > 0
        scored[name] = (
            np.array([res["rank"][i] for i in cat_pts], np.int64) if has_cat else None,
            np.array([res["top1"][i] for i in cat_pts], np.int64) if has_cat else None,
            np.array([res["prop"][i] for i in buy_pts], np.float64) if has_buy else None,
        )
    reports = {n: _method_report(r, t, targets, n_classes, p, labels) for n, (r, t, p) in scored.items()}
    model_rep = reports.pop("model")
    base_rep = reports

    has_cat_row = log.category >= 0
    in_vocab = np.array([True] + [vocab.index(c) > 0 for c in log.categories])
    n_oov = int((~in_vocab[targets]).sum())
    report = {
        "n_users": int(log.n_users),
        "n_train_events": int((log.ts < split.train_end).sum()),
        "n_test_points": int(pts.mask.sum()),
        "model": model_rep,
        "baselines": base_rep,
        "best_baseline": best_baselines(model_rep, base_rep),
        "bootstrap": {
            "unit": "user",
            "resamples": bootstrap,
            "level": BOOTSTRAP_LEVEL,
            "seed": BOOTSTRAP_SEED,
        },
        "headroom": {
            "over": HEADROOM_BASELINE,
            **repeat_headroom(base[HEADROOM_BASELINE]["switch_rank"], cat_pts, targets, cats),
        },
        "baseline_settings": {name: res["settings"] for name, res in base.items() if "settings" in res},
        "n_category_points": len(cat_pts),
        "n_purchase_points": len(buy_pts),
        "baseline_fit_events": fit_events,
        "model_train_events": model_events,
        "purchase_positive_rate": float(labels.mean()) if len(labels) else float("nan"),
        "split": split.to_dict(),
        "horizon_s": horizon_s,
        "gap_s": gap_s,
        "model_version": ckpt.model_version,
        "category_coverage": {
            "vocab_size": len(vocab) - 1,
            "n_categories_in_data": len(log.categories),
            "rows_with_category": float(has_cat_row.mean()) if len(log) else float("nan"),
            "n_targets_out_of_vocab": int(n_oov),
            "targets_in_vocab": float(1 - n_oov / len(targets)) if len(targets) else float("nan"),
        },
    }
    intervals = ratio_intervals(
        report["best_baseline"],
        scored,
        targets=targets,
        cat_users=log.user[cat_pts],
        n_classes=n_classes,
        labels=labels,
        buy_users=log.user[buy_pts],
        resamples=bootstrap,
    )
    for key, ci in intervals.items():
        report["best_baseline"][key].update(ci)
    # The figures a live worker exports for the same events (docs/ARCHITECTURE.md §Metrics, "quality").
    report["prequential"] = prequential_report(ckpt, log, split.valid_end, horizon_s, gap_s, device)
    if plots_dir is not None:
        from demandstream.model.evaluation.plots import save_plots

        curves = {}
        for name, (r, _t, p) in scored.items():
            curves[name] = {
                k: v
                for k, v in (("ranks", r), ("p", p), ("y", labels if p is not None else None))
                if v is not None
            }
        report["plots"] = [str(x) for x in save_plots(curves, plots_dir)]
    return report


def baseline_fit_check(
    log: EventLog, split: Split, ckpt: Checkpoint, refuse_unfitted: bool = True
) -> tuple[int, int | None]:
    """``(events the baselines are fitted on, events the model was trained on)``; refuses a log that
    leaves the baselines nothing to learn from, unless ``refuse_unfitted`` is off (then it warns).

    The comparison is only fair when the baselines learn from the data the model learned from: its
    Markov table, popularity and funnel came from the training log's events before T2
    (``n_train_events`` in the checkpoint's metrics). A log that starts at or after T2 (a later
    month's file evaluated with the split stored in the checkpoint) would fit every baseline on no
    event and flatter the model by up to 2 × (measured on the cosmetics sample's last days: purchase
    log loss 0.33 against an untrained funnel's 0.69): that is an error. A log that holds fewer
    events before T2 than the model saw is allowed (a model moved to another shop's log with its own
    split) and logged as a warning. A split given on purpose before the log's first event (to read
    only the ``prequential`` figures of a whole file, which involve no baseline) is the caller's
    choice: ``refuse_unfitted=False`` turns the error into a warning.
    """
    fit_events = int((log.ts < split.valid_end).sum())
    trained = ckpt.metrics.get("n_train_events") if isinstance(ckpt.metrics, dict) else None
    model_events = (
        int(trained) if isinstance(trained, int | float) and not isinstance(trained, bool) else None
    )
    if fit_events == 0 and not refuse_unfitted:
        logger.warning(
            "no event of this log is before T2 = %s: every baseline is fitted on nothing, so the "
            "best_baseline ratios favour the model; the prequential figures are unaffected",
            utc_text(split.valid_end),
        )
    elif fit_events == 0:
        raise DataError(
            f"no event of this log is before the test start T2 = {utc_text(split.valid_end)}, so the baselines "
            "would be fitted on nothing"
            + (f" while the model learned from {model_events:,} events" if model_events else "")
            + ": give the log the model was trained on as well (--data is repeatable), or a split inside "
            "this log (--train-end/--valid-end)"
        )
    elif model_events is not None and fit_events < model_events:
        logger.warning(
            "the baselines are fitted on %d events before T2 = %s, the model learned from %d: the "
            "comparison favours the model unless this log is another shop's on purpose",
            fit_events,
            utc_text(split.valid_end),
            model_events,
        )
    return fit_events, model_events


def _finite(v) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def best_baselines(model: dict, baselines: dict[str, dict]) -> dict[str, dict]:
    """For every metric of :data:`METHOD_KEYS` that some baseline scores, the best baseline and the
    model's standing against it: ``{"name", "value", "model", "ratio"}``.

    The best is the highest value, except for the keys of :data:`LOWER_IS_BETTER` (log loss, ECE)
    where it is the lowest. ``ratio`` is oriented so that **> 1 means the model is better**: it is
    ``model / best`` for higher-is-better metrics and ``best / model`` for log loss and ECE. It is
    ``inf`` when the denominator is 0 and the numerator is not, NaN when the model has no value or
    both are 0. Ties between baselines go to the one listed first. NaN values are skipped.

    >>> b = best_baselines({"purchase_auc": 0.8, "purchase_logloss": 0.3},
    ...                    {"f": {"purchase_auc": 0.7, "purchase_logloss": 0.4},
    ...                     "g": {"purchase_auc": 0.5, "purchase_logloss": 0.2}})
    >>> b["purchase_auc"]["name"], round(b["purchase_auc"]["ratio"], 4)
    ('f', 1.1429)
    >>> b["purchase_logloss"]["name"], round(b["purchase_logloss"]["ratio"], 4)   # 0.2 / 0.3
    ('g', 0.6667)
    """
    out: dict[str, dict] = {}
    for key in METHOD_KEYS:
        cands = [(n, float(m[key])) for n, m in baselines.items() if _finite(m.get(key))]
        if not cands:
            continue
        lower = key in LOWER_IS_BETTER
        name, best = min(cands, key=lambda c: c[1]) if lower else max(cands, key=lambda c: c[1])
        mv = model.get(key)
        mval = float(mv) if _finite(mv) else float("nan")
        out[key] = {"name": name, "value": best, "model": mval, "ratio": oriented_ratio(key, mval, best)}
    return out


def _numeric_leaves(obj, prefix: tuple[str, ...] = ()):
    """(path, value) of every int/float leaf (not bool) of nested dicts."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _numeric_leaves(v, (*prefix, str(k)))
    elif isinstance(obj, int | float) and not isinstance(obj, bool):
        yield prefix, float(obj)


def aggregate_reports(reports: list[dict]) -> dict:
    """Mean, sample std (ddof=1) and n of every numeric leaf of ``model``, ``baselines`` and
    ``best_baseline.<metric>.ratio`` over evaluation reports of several seeds.

    The result mirrors the reports' nesting with ``{"mean", "std", "n"}`` in place of each leaf,
    plus ``n_reports``. ``n`` counts the reports where the leaf is finite (NaN and inf are left
    out); ``mean`` and ``std`` are NaN when ``n`` is 0, ``std`` also when ``n`` is 1. A report
    without ``best_baseline`` has it computed from its ``model`` and ``baselines``.

    >>> reps = [{"model": {"auc": 0.6}, "baselines": {"f": {"auc": 0.5}}},
    ...         {"model": {"auc": 0.8}, "baselines": {"f": {"auc": 0.5}}}]
    >>> agg = aggregate_reports(reps)
    >>> agg["model"]["auc"]["mean"], round(agg["model"]["auc"]["std"], 4), agg["model"]["auc"]["n"]
    (0.7, 0.1414, 2)
    >>> agg["baselines"]["f"]["auc"]
    {'mean': 0.5, 'std': 0.0, 'n': 2}
    """
    values: dict[tuple[str, ...], list[float]] = {}

    def add(path: tuple[str, ...], v: float) -> None:
        values.setdefault(path, []).append(v)

    for rep in reports:
        for section in ("model", "baselines"):
            for path, v in _numeric_leaves(rep.get(section, {}), (section,)):
                add(path, v)
        best = rep.get("best_baseline")
        if best is None:
            best = best_baselines(rep.get("model", {}), rep.get("baselines", {}))
        for key, entry in best.items():
            r = entry.get("ratio") if isinstance(entry, dict) else None
            if isinstance(r, int | float) and not isinstance(r, bool):
                add(("best_baseline", key, "ratio"), float(r))

    out: dict = {"n_reports": len(reports)}
    for path, vs in values.items():
        arr = np.array([v for v in vs if math.isfinite(v)], dtype=np.float64)
        n = int(arr.size)
        stats = {
            "mean": float(arr.mean()) if n else float("nan"),
            "std": float(arr.std(ddof=1)) if n > 1 else float("nan"),
            "n": n,
        }
        node = out
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = stats
    return out


#: What the checkpoints of one multi-model report share: the log, the split, the points and the baselines.
SHARED_REPORT_KEYS = (
    "n_users",
    "n_train_events",
    "n_test_points",
    "n_category_points",
    "n_purchase_points",
    "purchase_positive_rate",
    "baselines",
    "baseline_settings",
    "bootstrap",
    "headroom",
    "baseline_fit_events",
    "split",
    "horizon_s",
    "gap_s",
    "user_sample",
)

VERDICTS = ("better", "worse", "inconclusive")


def _verdict_counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{v} {counts[v]}" for v in VERDICTS if counts.get(v))


def combine_reports(reports: list[dict], names: list[str]) -> dict:
    """One report for several checkpoints of one recipe (seeds) evaluated on the same log and split.

    Today's keys keep their meaning over the models: ``model`` is each metric's mean (``model_std`` its
    sample standard deviation), ``best_baseline.<metric>`` names the best baseline as before and gives
    the mean ``ratio`` with ``ratio_std``, every model's ``ratios``, the ``verdicts`` counted, one
    ``verdict`` (the common one, or ``mixed``) and ``ratio_ci_range`` (the lowest and highest bound of
    the models' intervals). The shared keys (:data:`SHARED_REPORT_KEYS`) are the first report's;
    ``reports`` holds every model's own report, in order, and ``aggregate`` :func:`aggregate_reports`
    of them.

    >>> one = {"model": {"purchase_auc": 0.8}, "baselines": {"f": {"purchase_auc": 0.5}},
    ...        "best_baseline": {"purchase_auc": {"name": "f", "value": 0.5, "model": 0.8, "ratio": 1.6,
    ...                                           "ratio_ci": [1.2, 2.0], "verdict": "better"}}}
    >>> two = {"model": {"purchase_auc": 0.6}, "baselines": {"f": {"purchase_auc": 0.5}},
    ...        "best_baseline": {"purchase_auc": {"name": "f", "value": 0.5, "model": 0.6, "ratio": 1.2,
    ...                                           "ratio_ci": [0.9, 1.5], "verdict": "inconclusive"}}}
    >>> rep = combine_reports([one, two], ["s0.pt", "s1.pt"])
    >>> round(rep["model"]["purchase_auc"], 4), round(rep["model_std"]["purchase_auc"], 4)
    (0.7, 0.1414)
    >>> b = rep["best_baseline"]["purchase_auc"]
    >>> round(b["ratio"], 4), b["verdict"], b["verdicts"], b["ratio_ci_range"]
    (1.4, 'mixed', {'better': 1, 'inconclusive': 1}, [0.9, 2.0])
    """
    if not reports or len(reports) != len(names):
        raise ValueError(f"{len(reports)} reports for {len(names)} names")
    first = reports[0]

    def same(a, b) -> bool:  # NaN-aware: a baseline that cannot score a window reports NaN
        return json.dumps(a, sort_keys=True, default=float) == json.dumps(b, sort_keys=True, default=float)

    for name, rep in zip(names[1:], reports[1:], strict=True):
        if not same(rep.get("baselines"), first.get("baselines")):
            raise ValueError(f"{name} was not evaluated on the same points as {names[0]}")
    agg = aggregate_reports(reports)
    out: dict = {k: first[k] for k in SHARED_REPORT_KEYS if k in first}
    out["n_models"] = len(reports)
    out["models"] = [str(n) for n in names]
    out["model_versions"] = [r.get("model_version") for r in reports]
    stats = agg.get("model", {})
    out["model"] = {k: v["mean"] for k, v in stats.items()}
    out["model_std"] = {k: v["std"] for k, v in stats.items()}
    best: dict[str, dict] = {}
    nan = float("nan")
    for key, entry in (
        first.get("best_baseline") or best_baselines(first["model"], first["baselines"])
    ).items():
        per = [(r.get("best_baseline") or best_baselines(r["model"], r["baselines"]))[key] for r in reports]
        ratio = agg.get("best_baseline", {}).get(key, {}).get("ratio", {})
        e = {
            "name": entry["name"],
            "value": entry["value"],
            "model": out["model"].get(key, nan),
            "ratio": ratio.get("mean", nan),
            "ratio_std": ratio.get("std", nan),
            "ratios": [p.get("ratio", nan) for p in per],
        }
        verdicts = [p.get("verdict") for p in per]
        if all(verdicts):
            e["verdicts"] = {v: verdicts.count(v) for v in VERDICTS if v in verdicts}
            e["verdict"] = verdicts[0] if len(set(verdicts)) == 1 else "mixed"
            # an interval with an undefined bound (a ratio with a zero baseline in some resamples) says
            # nothing about the range
            cis = [p["ratio_ci"] for p in per if p.get("ratio_ci") and all(_finite(v) for v in p["ratio_ci"])]
            if cis:
                e["ratio_ci_range"] = [min(c[0] for c in cis), max(c[1] for c in cis)]
        best[key] = e
    out["best_baseline"] = best
    out["reports"] = reports
    out["aggregate"] = agg
    return out


def _pm(mean: float, std: float) -> str:
    if not _finite(mean):
        return "–"
    return f"{mean:.4f} ± {std:.4f}" if _finite(std) else f"{mean:.4f}"


def format_models_table(report: dict) -> str:
    """A report of several models (:func:`combine_reports`) as the Markdown table of docs/MODEL.md §4:
    per metric the model's mean ± sd, the best baseline and its value, the ratio's mean ± sd and the
    verdicts with the range of the intervals' bounds.

    >>> rep = {"n_models": 2, "n_category_points": 10, "n_purchase_points": 8, "purchase_positive_rate": 0.25,
    ...        "model": {"purchase_auc": 0.7}, "model_std": {"purchase_auc": 0.1414},
    ...        "best_baseline": {"purchase_auc": {"name": "f", "value": 0.5, "ratio": 1.4, "ratio_std": 0.2828,
    ...            "verdicts": {"better": 1, "inconclusive": 1}, "ratio_ci_range": [0.9, 2.0]}}}
    >>> print(format_models_table(rep))
    2 models; points: category 10, purchase 8 (positive rate 0.250)
    | metric | model (mean ± sd) | best baseline | its value | model / best (mean ± sd) | verdicts (95 % CI range) |
    |---|---:|---|---:|---:|---|
    | purchase_auc | 0.7000 ± 0.1414 | f | 0.5000 | 1.4000 ± 0.2828 | better 1, inconclusive 1 (0.900–2.000) |
    """
    rate = report.get("purchase_positive_rate", float("nan"))
    level = (report.get("bootstrap") or {}).get("level", BOOTSTRAP_LEVEL)
    said = f"positive rate {rate:.3f}" if _finite(rate) else "no observable purchase window"
    lines = [
        f"{report['n_models']} models; points: category {report['n_category_points']}, "
        f"purchase {report['n_purchase_points']} ({said})",
        "| metric | model (mean ± sd) | best baseline | its value | model / best (mean ± sd) "
        f"| verdicts ({level * 100:g} % CI range) |",
        "|---|---:|---|---:|---:|---|",
    ]
    model, std, best = report["model"], report.get("model_std", {}), report.get("best_baseline", {})
    for key in METHOD_KEYS:
        if key not in model and key not in best:
            continue
        b = best.get(key)
        cells = [key, _pm(model.get(key, float("nan")), std.get(key, float("nan")))]
        if b is None:
            cells += ["–", "–", "–", "–"]
        else:
            verdict = _verdict_counts(b.get("verdicts", {})) or "–"
            ci = b.get("ratio_ci_range")
            if ci and all(_finite(v) for v in ci):
                verdict += f" ({ci[0]:.3f}–{ci[1]:.3f})"
            cells += [
                b["name"],
                f"{b['value']:.4f}",
                _pm(b["ratio"], b.get("ratio_std", float("nan"))),
                verdict,
            ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_table(report: dict) -> str:
    """Methods × metrics as a fixed-width text table (NaN or absent = '-'), then the best baseline
    of each metric, the model's ratio to it (> 1: the model is better, see :func:`best_baselines`),
    the ratio's user-bootstrap interval and its verdict (:mod:`demandstream.model.evaluation.uncertainty`).

    >>> rep = {"model": {"category_accuracy": 0.5, "purchase_auc": 0.8},
    ...        "baselines": {"funnel": {"purchase_auc": 0.7}}}
    >>> lines = format_table(rep).splitlines()
    >>> lines[0].split()
    ['metric', 'model', 'funnel', 'best', 'ratio', '95%_CI', 'verdict']
    >>> lines[1].split()
    ['category_accuracy', '0.5000', '-', '-', '-', '-', '-']
    >>> [ln.split() for ln in lines if ln.startswith("purchase_auc")]
    [['purchase_auc', '0.8000', '0.7000', 'funnel', '1.1429', '-', '-']]
    >>> rep["best_baseline"] = {"purchase_auc": {"name": "funnel", "ratio": 1.1429,
    ...                         "ratio_ci": [1.05, 1.2], "verdict": "better"}}
    >>> [ln.split()[-2:] for ln in format_table(rep).splitlines() if ln.startswith("purchase_auc")]
    [['1.050-1.200', 'better']]
    """
    methods = {"model": report["model"], **report["baselines"]}
    best = report.get("best_baseline")
    if best is None:
        best = best_baselines(report["model"], report["baselines"])
    names = list(methods)
    width = max(10, *(len(n) for n in names)) + 2
    lines = [
        "metric".ljust(28)
        + "".join(n.rjust(width) for n in names)
        + "best".rjust(width)
        + "ratio".rjust(width)
        + "95%_CI".rjust(width)
        + "verdict".rjust(width + 2)
    ]
    for key in METHOD_KEYS:
        cells = []
        for n in names:
            v = methods[n].get(key)
            cells.append(("-" if v is None or v != v else f"{v:.4f}").rjust(width))
        b = best.get(key)
        ratio = None if b is None else b.get("ratio")
        cells.append(("-" if b is None else str(b["name"])).rjust(width))
        cells.append(("-" if ratio is None or ratio != ratio else f"{ratio:.4f}").rjust(width))
        ci = None if b is None else b.get("ratio_ci")
        ci_ok = ci is not None and all(v == v for v in ci)
        cells.append((f"{ci[0]:.3f}-{ci[1]:.3f}" if ci_ok else "-").rjust(width))
        cells.append(str((b or {}).get("verdict", "-")).rjust(width + 2))
        lines.append(key.ljust(28) + "".join(cells))
    return "\n".join(lines)


#: The metrics the verdict line names first: the issue's four, then the purchase quality figures.
HEADLINE_KEYS = (
    "category_mrr@20",
    "category_recall@5",
    "category_recall@20",
    "purchase_auc",
    "purchase_logloss",
    "purchase_ece",
)


def verdict_summary(report: dict) -> str:
    """One line that reads the headline metrics' intervals: where the test window shows the model
    better than the best baseline, worse, or cannot tell; empty when the report has no intervals.

    >>> verdict_summary({"bootstrap": {"resamples": 1000, "level": 0.95}, "best_baseline": {
    ...     "category_mrr@20": {"name": "cascade", "verdict": "better"},
    ...     "purchase_auc": {"name": "funnel_cart", "verdict": "inconclusive"}}})
    'against the best baseline, 95 % user-bootstrap intervals: better on category_mrr@20 (cascade); cannot tell on purchase_auc (funnel_cart)'

    A report of several models (:func:`combine_reports`) says ``better`` where every model's interval
    does, and ``mixed`` with the counts where they disagree.

    >>> verdict_summary({"best_baseline": {"purchase_auc": {"name": "funnel_cart", "verdict": "mixed",
    ...     "verdicts": {"better": 2, "inconclusive": 1}}}})
    'against the best baseline, 95 % user-bootstrap intervals: mixed on purchase_auc (funnel_cart: better 2, inconclusive 1)'
    """
    best = report.get("best_baseline") or {}
    groups: dict[str, list[str]] = {"better": [], "worse": [], "inconclusive": [], "mixed": []}
    for key in HEADLINE_KEYS:
        entry = best.get(key)
        if entry and entry.get("verdict") == "mixed":
            groups["mixed"].append(f"{key} ({entry['name']}: {_verdict_counts(entry['verdicts'])})")
        elif entry and entry.get("verdict") in groups:
            groups[entry["verdict"]].append(f"{key} ({entry['name']})")
    if not any(groups.values()):
        return ""
    level = (report.get("bootstrap") or {}).get("level", BOOTSTRAP_LEVEL)
    words = {
        "better": "better on",
        "worse": "worse on",
        "inconclusive": "cannot tell on",
        "mixed": "mixed on",
    }
    parts = [f"{words[v]} {', '.join(keys)}" for v, keys in groups.items() if keys]
    return f"against the best baseline, {level * 100:g} % user-bootstrap intervals: " + "; ".join(parts)


def settings_summary(report: dict) -> str:
    """One line on what the baselines chose on validation, so that a reader of the table knows which
    counter ``cascade_recent`` was; empty when none chose anything.

    >>> settings_summary({"baseline_settings": {"cascade_recent": {"window": 8, "chosen_on": "validation",
    ...     "validation_points": 1200}}})
    'cascade_recent: a window of the 8 most recent categories (chosen on 1,200 validation points)'
    >>> settings_summary({"baseline_settings": {"cascade_recent": {"window": None,
    ...     "chosen_on": "nothing (no validation point)"}}})
    'cascade_recent: the whole history (chosen on nothing (no validation point))'
    """
    out = []
    for name, chosen in (report.get("baseline_settings") or {}).items():
        if "window" not in chosen:
            continue
        w = chosen["window"]
        what = "the whole history" if w is None else f"a window of the {w} most recent categories"
        on = chosen.get("chosen_on", "")
        where = f"{chosen['validation_points']:,} validation points" if "validation_points" in chosen else on
        out.append(f"{name}: {what} (chosen on {where})")
    return "; ".join(out)


def start_summary(history_window: int | str | None, mixture: bool) -> str:
    """The counter the category head started from (docs/MODEL.md §4.10), in the words of the report's
    baselines, for a summary a person reads; ``history_window`` as train's summary gives it (an int, or
    ``"all"``/None for every slot).

    >>> start_summary(8, False)
    'cascade_recent over the 8 most recent categories'
    >>> start_summary("all", True)
    'cascade_mix over the whole history'
    >>> start_summary(None, False)
    'the cascade'
    """
    window = None if history_window in (None, "all") else int(history_window)
    if window is None:
        return "cascade_mix over the whole history" if mixture else "the cascade"
    return f"{'cascade_mix' if mixture else 'cascade_recent'} over the {window} most recent categories"


def heads_summary(report: dict) -> str:
    """One line on where the evaluated model's heads come from, so that a ratio of exactly 1 reads as
    "training kept the counter" rather than as a coincidence; empty for a checkpoint that does not say.

    >>> heads_summary({"train_metrics": {"category_epoch": 0, "purchase_head": "funnel table (won validation)"}})
    'the model as trained: category head its start, the cascade (no trained epoch beat it on validation); purchase head funnel table (won validation)'
    >>> heads_summary({"train_metrics": {"category_epoch": 0, "history_window": 4}})
    'the model as trained: category head its start, cascade_recent over the 4 most recent categories (no trained epoch beat it on validation)'
    >>> heads_summary({"train_metrics": {"category_epoch": 0, "history_window": 4, "history_mixture": True}})
    'the model as trained: category head its start, cascade_mix over the 4 most recent categories (no trained epoch beat it on validation)'
    >>> heads_summary({"train_metrics": {"category_epoch": 3, "purchase_head": None}})
    'the model as trained: category head of epoch 3'
    """
    tm = report.get("train_metrics") or {}
    parts = []
    epoch = tm.get("category_epoch")
    if epoch == 0:
        start = (
            f"its start, {start_summary(tm.get('history_window'), bool(tm.get('history_mixture')))}"
            if tm.get("cascade_init", True)
            else "the untrained start"
        )
        parts.append(f"category head {start} (no trained epoch beat it on validation)")
    elif epoch is not None:
        parts.append(f"category head of epoch {epoch}")
    if tm.get("purchase_head"):
        parts.append(f"purchase head {tm['purchase_head']}")
    return "the model as trained: " + "; ".join(parts) if parts else ""


def run_evaluation(
    model: str | Path | Sequence[str | Path],
    data,
    fmt: str,
    report: str | Path,
    plots: str | Path | None = None,
    train_end: str | float | None = None,
    valid_end: str | float | None = None,
    horizon_s: float | None = None,
    device: str = "cpu",
    gap_s: float | None = DEFAULT_GAP_S,
    bootstrap: int = BOOTSTRAP_RESAMPLES,
    user_sample: float = 1.0,
) -> dict:
    """CLI entry (``demandstream evaluate``): load checkpoint(s) and data, evaluate, write the JSON report.

    Without explicit bounds the split is the one stored in the checkpoint's training metrics when
    there is one (so evaluation tests exactly what training held out), else 80/10/10 of the data.
    A log with no event before that split's T2 is refused; bounds given explicitly before the log's
    first event are taken as meant (a whole file scored for its ``prequential`` figures), with a
    warning that the baselines learned nothing.
    Without ``horizon_s`` the purchase horizon is the one the model was trained for (else the default).
    ``user_sample`` below 1 evaluates model and baselines on that stable fraction of the users
    (:mod:`~demandstream.model.data.sampling`); the report records it.

    Several checkpoints (``model`` a list: the seeds of one recipe) are evaluated on one load of the
    log, on the same split and points, the baselines scored once; they must agree on the split they
    were trained for (unless the bounds are given) and on the horizon, else an :class:`OptionError`
    says so before anything is scored. The report is :func:`combine_reports` of theirs, and with
    ``plots`` each model's plots go to a folder of their own inside it.
    """
    from demandstream.model.data.loaders import load_log

    names = [model] if isinstance(model, str | Path) else list(model)
    if not names:
        raise OptionError("no model checkpoint to evaluate")
    cks = [ckpt_mod.load(m) for m in names]
    log = load_log(data, fmt, keep_ids=False, user_sample=user_sample)
    if log.user_start is None:
        log = log.sorted_by_user_time()
    explicit = train_end is not None or valid_end is not None
    splits, horizons, given = [], [], None
    for ck in cks:
        metrics = ck.metrics if isinstance(ck.metrics, dict) else {}
        stored = metrics.get("split")
        if not explicit and stored:
            splits.append(Split(float(stored["train_end"]), float(stored["valid_end"]), float(log.ts.max())))
        else:
            # the bounds given (or the log's default split) are the same for every model: split once, so
            # its warnings are said once too
            given = given or temporal_split(log, train_end, valid_end)
            splits.append(given)
        trained = metrics.get("train_config") or {}
        horizons.append(
            float(horizon_s if horizon_s is not None else trained.get("horizon_s", PURCHASE_HORIZON_S))
        )
    last = splits[0].end_ts  # the log's last event, as every split here records it
    if last < splits[0].valid_end:
        whose = "--valid-end" if explicit else f"the valid end {names[0]} was trained for"
        raise OptionError(
            f"nothing to test: the test window starts at {utc_text(splits[0].valid_end)} ({whose}), after "
            f"the log's last event ({utc_text(last)}); pass --train-end/--valid-end that leave events after "
            "the valid end, or a log that goes on after it"
        )
    for name, split, h in zip(names[1:], splits[1:], horizons[1:], strict=True):
        if split != splits[0]:
            raise OptionError(
                f"{name} was trained for the split T1={utc_text(split.train_end)}, T2={utc_text(split.valid_end)} "
                f"and {names[0]} for T1={utc_text(splits[0].train_end)}, T2={utc_text(splits[0].valid_end)}: "
                "evaluate them apart, or give --train-end/--valid-end to test them on one split"
            )
        if h != horizons[0]:
            raise OptionError(
                f"{name} predicts purchases within {h:g} s and {names[0]} within {horizons[0]:g} s: "
                "one report compares models of one horizon"
            )
    reports, cache = [], {}
    for i, (name, ck) in enumerate(zip(names, cks, strict=True)):
        where = plots if plots is None or len(cks) == 1 else Path(plots) / f"model{i}-{Path(name).stem}"
        with torch.inference_mode():
            rep = evaluate(
                ck,
                log,
                splits[0],
                horizon_s=horizons[0],
                plots_dir=where,
                device=device,
                gap_s=gap_s,
                bootstrap=bootstrap,
                refuse_unfitted=not explicit,
                baseline_cache=cache,
            )
        rep["user_sample"] = user_sample
        rep["train_metrics"] = checkpoint_train_metrics(ck)
        reports.append(rep)
    rep = reports[0] if len(reports) == 1 else combine_reports(reports, [str(n) for n in names])
    path = Path(report)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rep, indent=2, default=float))
    return rep


def checkpoint_train_metrics(ck: Checkpoint) -> dict:
    """The report's ``train_metrics``: what the checkpoint says about how it was trained."""
    metrics = ck.metrics if isinstance(ck.metrics, dict) else {}
    # calibration: whether the model's propensities were Platt-scaled, and why not (demandstream.model.training.calibration.calibrate)
    out = {
        k: metrics.get(k)
        for k in ("train_events_per_s", "epochs_run", "best_epoch", "calibration", "purchase_head")
    }
    # the fraction of users the model was trained on (1.0 for checkpoints from before the option)
    out["user_sample"] = metrics.get("user_sample", 1.0)
    # which epoch's category head was shipped (0: the start, the cascade unless trained without it)
    out["category_epoch"] = (metrics.get("selection") or {}).get("category_epoch")
    out["cascade_init"] = (metrics.get("train_config") or {}).get("cascade_init", True)
    # the cascade start's history window (None: every slot, as for checkpoints from before it)
    out["history_window"] = ck.net.cfg.history_window
    # whether the start ranks the rest by the history mixture, as cascade_mix (False before it existed)
    out["history_mixture"] = bool((metrics.get("history_window") or {}).get("mixture", False))
    return out
