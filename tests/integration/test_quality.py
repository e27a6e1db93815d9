"""Live model quality end to end: an evaluation split replayed through a real worker on the real broker,
scraped by a real Prometheus, gives the figures of `demandstream evaluate`'s ``prequential`` key."""

from __future__ import annotations

import shutil

import pytest

from demandstream.model.data.synth import generate, write_jsonl
from demandstream.model.evaluation.evaluate import run_evaluation
from demandstream.stream.settings import Settings
from demandstream.stream.tools.replay import replay
from tests.helpers import read_topic
from tests.integration.prometheus_server import PrometheusServer, free_port

pytestmark = [pytest.mark.kafka, pytest.mark.slow, pytest.mark.prometheus, pytest.mark.timeout(300)]

N_USERS, N_EVENTS = 120, 2500
SCRAPE_WAIT_S = 60
#: Stream and offline scoring agree to |Δp| <= 1e-4 (docs/ARCHITECTURE.md §Semantics); summed over a few
#: thousand points the log losses and propensities agree far closer than this relative bound.
SUM_REL_TOL = 1e-4


@pytest.mark.skipif(
    shutil.which("prometheus") is None, reason="Debian's prometheus is installed by `make test`"
)
def test_live_quality_equals_the_offline_evaluation_on_the_same_events(
    worker_factory, stream_env, kafka_bootstrap, small_model, tmp_path
):
    data = tmp_path / "split.jsonl"
    events = list(generate(N_USERS, N_EVENTS, seed=29))
    write_jsonl(events, data)
    # The whole file is the evaluation split: train and validation end before its first event, so every
    # event is a test point, scored (as in the stream) from each user's first event.
    t0 = min(e.ts for e in events)
    report = run_evaluation(
        small_model, [data], "jsonl", tmp_path / "report.json", train_end=t0 - 2, valid_end=t0 - 1
    )
    off = report["prequential"]
    assert off["category_points"] > 1000 and off["purchase_points"] > 200 and off["purchase_positives"] > 0

    # One partition: the worker's event-time watermark is then the whole split's, as offline.
    env = {"DEMANDSTREAM_PARTITIONS": "1", "DEMANDSTREAM_QUALITY_REPORT": str(tmp_path / "report.json")}
    s = Settings.from_env({**stream_env, **env})
    w = worker_factory(**env).start()
    w.wait_ready()
    with PrometheusServer([f"127.0.0.1:{w.port}"], tmp_path / "prom", free_port()) as prom:
        replay(s, [data], "jsonl", progress=False)
        read_topic(kafka_bootstrap, s.topic_signals, until=lambda r: len(r) >= N_EVENTS, timeout=180)

        def value(expr: str, want: float | None = None) -> float:
            ok = (
                (lambda r: bool(r))
                if want is None
                else (lambda r: bool(r) and float(r[0]["value"][1]) == want)
            )
            return float(prom.wait_for(expr, ok, SCRAPE_WAIT_S)[0]["value"][1])

        v = report["model_version"]
        sel = f'{{model_version="{v}"}}'
        # Counts are equal exactly; wait for the last batch's scrape on the first of them.
        value(f"sum(demandstream_quality_purchase_points_total{sel})", off["purchase_points"])
        value(f"sum(demandstream_quality_category_points_total{sel})", off["category_points"])
        for k in ("1", "5"):
            value(
                f'sum(demandstream_quality_category_hits_total{{model_version="{v}",k="{k}"}})',
                off[f"hits@{k}"],
            )
        value(f"sum(demandstream_quality_purchase_positives_total{sel})", off["purchase_positives"])
        gap = value(
            f'sum(demandstream_quality_purchase_unresolved_total{{model_version="{v}",reason="gap"}})'
        )
        assert gap == off["unresolved"]["gap"]
        rr = value(f"sum(demandstream_quality_category_reciprocal_rank_total{sel})")
        assert rr == pytest.approx(off["reciprocal_rank_sum"], rel=SUM_REL_TOL)
        ll = value(f"sum(demandstream_quality_purchase_logloss_total{sel})")
        assert ll == pytest.approx(off["purchase_logloss_sum"], rel=SUM_REL_TOL)
        by_bucket = {
            r["metric"]["bucket"]: float(r["value"][1])
            for r in prom.query(f"sum by (bucket) (demandstream_quality_calibration_points_total{sel})")
        }
        assert by_bucket == {b["bucket"]: b["points"] for b in off["calibration"]}  # every bucket exported
        # The dashboard's ratios, over the whole run, are the report's figures.
        hit1 = value(
            'sum(demandstream_quality_category_hits_total{k="1"}) / sum(demandstream_quality_category_points_total)'
        )
        assert hit1 == pytest.approx(off["hit@1"], rel=1e-12)
        # The offline figures the drift alert compares with come from the report, with the margin.
        assert value(f'demandstream_quality_offline{{metric="mrr",model_version="{v}"}}') == pytest.approx(
            off["mrr"]
        )
        assert value("demandstream_quality_drift_margin") == 0.1
        pending = value("demandstream_quality_purchase_pending")
        assert pending == off["open_at_end"]
