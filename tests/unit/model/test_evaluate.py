"""model/evaluate.py: every report key for the model and every baseline, on the same points."""

import json

import numpy as np
import pytest

from model.data import temporal_split
from model.evaluate import evaluate, format_table, run_evaluation
from model.metrics import CATEGORY_KEYS, PURCHASE_KEYS
from model.synth import generate, write_jsonl
from model.train import TrainConfig, run_training, train
from tests.unit.model.test_train import TINY_MODEL, TINY_RUN, tiny_log

CATEGORY_METHODS = ("popularity", "last_category", "user_history", "markov")
PURCHASE_METHODS = ("user_history", "funnel")


@pytest.fixture(scope="module")
def trained():
    log = tiny_log(2000, seed=5)
    split = temporal_split(log)
    res = train(
        log, TrainConfig(epochs=1, lanes=16, bptt=16, threads=1), TINY_MODEL, progress=False, split=split
    )
    from model.checkpoint import Checkpoint

    return Checkpoint(res.net, res.vocab, "0a1b2c3d", res.metrics), log, split


def test_report_has_every_key_for_model_and_baselines(trained):
    ck, log, split = trained
    rep = evaluate(ck, log, split)
    for key in (
        "n_users",
        "n_train_events",
        "n_test_points",
        "model",
        "baselines",
        "n_category_points",
        "n_purchase_points",
        "split",
        "category_coverage",
    ):
        assert key in rep
    assert set(rep["baselines"]) == {"popularity", "last_category", "user_history", "markov", "funnel"}
    assert set(rep["model"]) == set(CATEGORY_KEYS + PURCHASE_KEYS)
    for name, m in rep["baselines"].items():
        expected = set()
        if name in CATEGORY_METHODS:
            expected |= set(CATEGORY_KEYS)
        if name in PURCHASE_METHODS:
            expected |= set(PURCHASE_KEYS)
        assert set(m) == expected, name
    assert rep["n_test_points"] == int((log.ts >= split.valid_end).sum()) > 0
    assert 0 < rep["n_category_points"] <= rep["n_test_points"]
    assert 0 < rep["n_purchase_points"] <= rep["n_test_points"]
    assert rep["n_train_events"] == int((log.ts < split.train_end).sum())
    for m in (rep["model"], *rep["baselines"].values()):
        for k, v in m.items():
            assert 0.0 <= v <= (np.inf if k == "purchase_logloss" else 1.0), k
    # popularity is the same ranking for every user: far from a perfect score on real sequences
    assert (
        rep["baselines"]["popularity"]["category_mrr@20"]
        < rep["baselines"]["last_category"]["category_mrr@20"]
    )
    table = format_table(rep)
    assert table.splitlines()[0].split() == ["metric", "model", *rep["baselines"]]
    assert len(table.splitlines()) == 1 + len(CATEGORY_KEYS) + len(PURCHASE_KEYS)


def test_run_evaluation_writes_the_report_and_reuses_the_training_split(tmp_path):
    data = tmp_path / "d.jsonl"
    write_jsonl(generate(40, 1200, seed=2), data)
    run_training(str(data), "jsonl", tmp_path / "m.pt", **TINY_RUN)
    rep = run_evaluation(tmp_path / "m.pt", str(data), "jsonl", tmp_path / "out" / "report.json")
    on_disk = json.loads((tmp_path / "out" / "report.json").read_text())
    assert on_disk["n_test_points"] == rep["n_test_points"] > 0
    assert on_disk["model"].keys() == rep["model"].keys()
    from model.checkpoint import load

    assert rep["split"]["valid_end"] == load(tmp_path / "m.pt").metrics["split"]["valid_end"]
    # the report says whether the propensities it scored were calibrated, and if not, why
    calib = on_disk["train_metrics"]["calibration"]
    assert calib["applied"] or calib["reason"]
