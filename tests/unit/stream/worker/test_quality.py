"""stream/worker/quality.py: the engine's batches scored live equal the offline prequential report."""

from __future__ import annotations

import json
import math

import pytest
import torch
from prometheus_client import CollectorRegistry

from demandstream.model.core.checkpoint import Checkpoint
from demandstream.model.core.events import event_to_json
from demandstream.model.core.features import Vocabulary
from demandstream.model.core.network import DemandLSTM, ModelConfig, init_like_cascade
from demandstream.model.core.scoring import Scorer
from demandstream.model.data.eventlog import EventLog
from demandstream.model.data.synth import generate
from demandstream.model.evaluation.prequential import prequential_report
from demandstream.stream.engine.inference import InferenceEngine, SourceRecord
from demandstream.stream.settings import SettingsError
from demandstream.stream.worker.metrics import Metrics
from demandstream.stream.worker.quality import LiveQuality, load_offline_figures

HORIZON_S, GAP_S, TOP_K = 1800.0, 3600.0, 5
VERSION = "0a1b2c3d"


@pytest.fixture(scope="module")
def setup():
    events = list(generate(60, 1500, seed=3))
    # the vocabulary leaves some categories out, so predictions also name categories by history slot
    vocab = Vocabulary.build(e.category for e in events[:400])
    torch.manual_seed(1)
    net = DemandLSTM(ModelConfig(n_categories=len(vocab)))
    init_like_cascade(net)
    return events, Checkpoint(net.eval(), vocab, VERSION)


def live(events, ckpt, batch: int, pending_max: int = 50000):
    """The events through the engine in batches (one partition), each batch then scored live."""
    scorer = Scorer(ckpt, top_k=TOP_K)
    engine = InferenceEngine(scorer)
    m = Metrics(CollectorRegistry())
    q = LiveQuality(m, VERSION, scorer.category_name, HORIZON_S, GAP_S, pending_max)
    store: dict[bytes, bytes | None] = {}
    recs = [SourceRecord(e.user_id.encode(), event_to_json(e), 0, i) for i, e in enumerate(events)]
    for i in range(0, len(recs), batch):
        res = engine.process(recs[i : i + batch], lambda keys: {k: store.get(k) for k, _p in keys})
        store.update({k: v for k, (_p, v) in res.states.items()})
        q.observe(res.applied)
    return m, q


def sample(m: Metrics, name: str, **labels) -> float:
    return m.registry.get_sample_value(name, {"model_version": VERSION, **labels}) or 0.0


@pytest.fixture(scope="module")
def offline(setup):
    events, ckpt = setup
    log = EventLog.from_events(events).sorted_by_user_time()
    return prequential_report(ckpt, log, -math.inf, HORIZON_S, GAP_S, top_k=TOP_K)


@pytest.mark.parametrize("batch", [13, 97])
def test_live_counters_equal_the_offline_report_on_the_same_events(setup, offline, batch):
    events, ckpt = setup
    m, q = live(events, ckpt, batch)
    off = offline
    assert off["category_points"] > 1000 and off["purchase_points"] > 100 and off["purchase_positives"] > 0
    assert sample(m, "demandstream_quality_category_points_total") == off["category_points"]
    assert sample(m, "demandstream_quality_category_hits_total", k="1") == off["hits@1"]
    assert sample(m, "demandstream_quality_category_hits_total", k="5") == off["hits@5"]
    rr = sample(m, "demandstream_quality_category_reciprocal_rank_total")
    assert rr == pytest.approx(off["reciprocal_rank_sum"], rel=1e-9)
    assert sample(m, "demandstream_quality_purchase_points_total") == off["purchase_points"]
    assert sample(m, "demandstream_quality_purchase_positives_total") == off["purchase_positives"]
    ll = sample(m, "demandstream_quality_purchase_logloss_total")
    assert ll == pytest.approx(off["purchase_logloss_sum"], rel=1e-6)
    for b in off["calibration"]:
        assert sample(m, "demandstream_quality_calibration_points_total", bucket=b["bucket"]) == b["points"]
        assert (
            sample(m, "demandstream_quality_calibration_positives_total", bucket=b["bucket"])
            == b["positives"]
        )
        pred = sample(m, "demandstream_quality_calibration_predicted_total", bucket=b["bucket"])
        assert pred == pytest.approx(b["predicted"], rel=1e-6, abs=1e-9)
    assert (
        sample(m, "demandstream_quality_purchase_unresolved_total", reason="gap") == off["unresolved"]["gap"]
    )
    assert (
        q.pending
        == off["open_at_end"]
        == m.registry.get_sample_value("demandstream_quality_purchase_pending")
    )


def test_capacity_and_revoked_partitions_are_counted_not_scored(setup):
    events, ckpt = setup
    m, q = live(events[:300], ckpt, 50, pending_max=5)
    assert sample(m, "demandstream_quality_purchase_unresolved_total", reason="capacity") > 0
    assert q.pending <= 5
    open_ = q.pending
    q.revoke([0])
    assert sample(m, "demandstream_quality_purchase_unresolved_total", reason="revoked") == open_
    assert q.pending == 0


def test_offline_figures_come_from_the_report_of_the_loaded_model(tmp_path):
    path = tmp_path / "report.json"
    path.write_text(json.dumps({"model_version": VERSION, "prequential": {"hit@1": 0.5, "mrr": 0.6}}))
    assert load_offline_figures(str(path), VERSION) == {"hit@1": 0.5, "mrr": 0.6}
    with pytest.raises(SettingsError, match="evaluates model '0a1b2c3d', but the worker runs 'ffffffff'"):
        load_offline_figures(str(path), "ffffffff")
    with pytest.raises(SettingsError, match="cannot read"):
        load_offline_figures(str(tmp_path / "missing.json"), VERSION)
    path.write_text(json.dumps({"model_version": VERSION}))
    with pytest.raises(SettingsError, match="no 'prequential' figures"):
        load_offline_figures(str(path), VERSION)
