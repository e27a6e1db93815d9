"""Live model quality: prequential figures of the worker's own predictions, as Prometheus counters.

Each applied event first judges the prediction its user's state held (the top-k stored in the state,
or the previous signal of the same batch) and the purchases resolve the open propensities
(:mod:`demandstream.model.core.prequential`, the functions ``demandstream evaluate`` uses for its
``prequential`` key). Counters, labelled by ``model_version``, not ratios: Prometheus divides rates
over any window and sums over workers (docs/ARCHITECTURE.md §Metrics; the PromQL and the drift alert in
docs/OPERATIONS.md §8). :meth:`LiveQuality.observe` runs after a batch is durable, like every other
metric (docs/ARCHITECTURE.md §Protocol); open purchase predictions live in memory, per partition, and
a partition revoked from this worker takes its open ones with it (counted ``revoked``).

>>> from prometheus_client import CollectorRegistry
>>> from demandstream.stream.worker.metrics import Metrics
>>> m = Metrics(CollectorRegistry())
>>> q = LiveQuality(m, "0a1b2c3d", str, horizon_s=1800.0, gap_s=3600.0, pending_max=10)
>>> q.offline({"hit@1": 0.4, "hit@5": 0.8, "mrr": 0.55, "purchase_logloss": 0.3}, margin=0.1)
>>> m.registry.get_sample_value("demandstream_quality_offline", {"model_version": "0a1b2c3d", "metric": "hit@1"})
0.4
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable
from pathlib import Path

from demandstream.model.core.checkpoint import Checkpoint
from demandstream.model.core.features import PURCHASE_HORIZON_S
from demandstream.model.core.prequential import (
    CALIBRATION_BUCKETS,
    HIT_KS,
    UNRESOLVED_REASONS,
    CategoryTally,
    PurchaseResolver,
    PurchaseTally,
    bucket_label,
    top_rank,
)
from demandstream.model.core.scoring import Scorer
from demandstream.stream.settings import Settings, SettingsError
from demandstream.stream.worker.metrics import Metrics

logger = logging.getLogger(__name__)

#: The offline figures exported beside the live ones (``demandstream_quality_offline{metric}``): the
#: keys of the ``prequential`` section of an evaluation report that the drift alert compares.
OFFLINE_METRICS = ("hit@1", "hit@5", "mrr", "purchase_logloss")


def model_horizon_s(ckpt: Checkpoint) -> float:
    """The purchase horizon the model was trained for (its propensities mean "a purchase within it"),
    as ``demandstream evaluate`` reads it; the default horizon for a checkpoint that does not say."""
    trained = (ckpt.metrics.get("train_config") or {}) if isinstance(ckpt.metrics, dict) else {}
    return float(trained.get("horizon_s", PURCHASE_HORIZON_S))


def load_offline_figures(path: str, model_version: str) -> dict[str, float]:
    """The ``prequential`` figures of an evaluation report (``demandstream evaluate --report``) of the
    loaded model; a missing, unreadable or foreign report is a setting error (one line, exit 2)."""
    name = "DEMANDSTREAM_QUALITY_REPORT"
    try:
        report = json.loads(Path(path).read_text())
    except OSError as e:
        raise SettingsError(f"{name}: cannot read {path!r}: {e.strerror}") from None
    except ValueError:
        raise SettingsError(f"{name}: {path!r} is not JSON (an evaluation report is expected)") from None
    if not isinstance(report, dict) or not isinstance(report.get("prequential"), dict):
        raise SettingsError(
            f"{name}: {path!r} has no 'prequential' figures: write it with this release's `demandstream evaluate`"
        )
    if report.get("model_version") != model_version:
        raise SettingsError(
            f"{name}: {path!r} evaluates model {report.get('model_version')!r}, but the worker runs "
            f"{model_version!r}: evaluate the loaded checkpoint"
        )
    pre = report["prequential"]
    return {k: float(pre[k]) for k in OFFLINE_METRICS if isinstance(pre.get(k), int | float)}


class LiveQuality:
    """The prequential figures of one worker, fed a durable batch at a time.

    ``category_name`` turns a stored prediction code into the name signals use
    (:meth:`demandstream.model.core.scoring.Scorer.category_name`); ``pending_max`` bounds the open
    purchase predictions of each partition (beyond it, new ones are not tracked: ``capacity``).
    """

    def __init__(
        self,
        metrics: Metrics,
        model_version: str,
        category_name: Callable[[int], str],
        horizon_s: float,
        gap_s: float,
        pending_max: int,
    ):
        self.metrics = metrics
        self.version = v = model_version
        self.category_name = category_name
        self.horizon_s, self.gap_s, self.pending_max = horizon_s, gap_s, pending_max
        self.cat = CategoryTally()
        self.pur = PurchaseTally()
        self.resolvers: dict[int, PurchaseResolver] = {}
        m = metrics
        # Children bound once: a labelled lookup per batch would cost more than the counting.
        self._cat_points = m.quality_category_points.labels(v)
        self._hits = [m.quality_category_hits.labels(v, str(k)) for k in HIT_KS]
        self._rr = m.quality_category_reciprocal_rank.labels(v)
        self._pur_points = m.quality_purchase_points.labels(v)
        self._pur_pos = m.quality_purchase_positives.labels(v)
        self._logloss = m.quality_purchase_logloss.labels(v)
        buckets = [bucket_label(b) for b in range(CALIBRATION_BUCKETS)]
        self._cal_points = [m.quality_calibration_points.labels(v, b) for b in buckets]
        self._cal_pred = [m.quality_calibration_predicted.labels(v, b) for b in buckets]
        self._cal_pos = [m.quality_calibration_positives.labels(v, b) for b in buckets]
        self._unresolved = {r: m.quality_purchase_unresolved.labels(v, r) for r in UNRESOLVED_REASONS}

    def offline(self, figures: dict[str, float], margin: float) -> None:
        """Export the offline figures of the loaded model and the drift margin the alert applies."""
        for k, value in figures.items():
            self.metrics.quality_offline.labels(self.version, k).set(value)
        self.metrics.quality_drift_margin.set(margin)

    def observe(self, applied: Iterable[tuple]) -> None:
        """Score a durable batch: ``applied`` is :attr:`demandstream.stream.engine.inference.BatchResult.applied`,
        per user and model round ``(previous, events, records, predictions)`` with ``previous`` None
        for a fresh state, else a tuple whose second item is the state's stored top-k (codes)."""
        cat, name = self.cat, self.category_name
        # ``applied`` is grouped by user; the purchase resolvers need each partition's events in
        # offset order (the watermark and the gaps are those of the partition's stream).
        stream = []
        append = stream.append
        for prev, events, recs, preds in applied:
            top = None if prev is None else [name(code) for code, _p in prev[1]]
            last = len(events) - 1
            for j, (e, rec, p) in enumerate(zip(events, recs, preds, strict=True)):
                if top is not None:
                    rank = top_rank(top, e.category)
                    if rank is not None:
                        cat.add(rank)
                if j < last:  # only a later event of this batch reads it; the next batch reads the state's
                    top = [c for c, _p in p.top_categories]
                # hash(): the open predictions need only tell users apart, never name them
                append((rec.partition, rec.offset, hash(e.user_id), e.ts, e.type, p.purchase_propensity))
        stream.sort()
        resolvers, r, part = self.resolvers, None, None
        for partition, _offset, user, ts, etype, p in stream:
            if partition != part:
                part = partition
                r = resolvers.get(partition)
                if r is None:
                    r = resolvers[partition] = PurchaseResolver(
                        self.horizon_s, self.gap_s, self.pur, self.pending_max
                    )
            r.event(user, ts, etype == "purchase", p)
        self._export()

    def revoke(self, partitions: Iterable[int]) -> None:
        """Partitions that left this worker: their open predictions can no longer be resolved here."""
        for p in partitions:
            r = self.resolvers.pop(p, None)
            if r is not None:
                self.pur.unresolved["revoked"] += r.discard()
        self._export()

    @property
    def pending(self) -> int:
        """Open purchase predictions on this worker."""
        return sum(r.pending for r in self.resolvers.values())

    def _export(self) -> None:
        c, p = self.cat.take(), self.pur.take()
        if c.points:
            self._cat_points.inc(c.points)
            for child, n in zip(self._hits, c.hits, strict=True):
                if n:
                    child.inc(n)
            self._rr.inc(c.rr_sum)
        if p.points:
            self._pur_points.inc(p.points)
            self._pur_pos.inc(p.positives)
            self._logloss.inc(p.logloss_sum)
            for b in range(CALIBRATION_BUCKETS):
                if p.counts[b]:
                    self._cal_points[b].inc(p.counts[b])
                    self._cal_pred[b].inc(p.predicted[b])
                    self._cal_pos[b].inc(p.observed[b])
        for reason, n in p.unresolved.items():
            self._unresolved[reason].inc(n)
        self.metrics.quality_purchase_pending.set(self.pending)


def live_quality(settings: Settings, metrics: Metrics, scorer: Scorer, horizon_s: float) -> LiveQuality:
    """The worker's :class:`LiveQuality` from its settings, with the offline figures of
    ``DEMANDSTREAM_QUALITY_REPORT`` exported when one is given (checked against the loaded model)."""
    q = LiveQuality(
        metrics,
        scorer.model_version,
        scorer.category_name,
        horizon_s,
        settings.quality_gap_s,
        settings.quality_pending_max,
    )
    figures = (
        load_offline_figures(settings.quality_report, scorer.model_version) if settings.quality_report else {}
    )
    q.offline(figures, settings.quality_drift_margin)
    return q
