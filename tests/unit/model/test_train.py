"""model/train.py: lanes, leakage-free inputs, a one-epoch run and a loadable, stable checkpoint."""

import numpy as np
import pytest

from model import checkpoint
from model.data import Split, phase_points
from model.encoding import category_index
from model.eventlog import EventLog
from model.features import Vocabulary
from model.network import ModelConfig
from model.synth import generate, write_jsonl
from model.train import TrainConfig, _lane_windows, _user_ranges, run_training, train
from tests.unit.model.test_data import HORIZON, T1, T2, leaky_log

TINY_MODEL = ModelConfig(hidden=16, item_buckets=256, query_buckets=64, emb_item=8, emb_query=4, emb_repeat=8)


def tiny_log(n_events=1500, seed=3):
    return EventLog.from_events(generate(60, n_events, seed=seed)).sorted_by_user_time()


def test_lanes_cover_every_training_row_once_and_reset_on_new_users():
    ranges = [(0, 5), (5, 6), (6, 30), (30, 33)]
    seen = []
    for active, idx, valid, reset in _lane_windows(ranges, lanes=2, window=4):
        assert idx.shape == valid.shape and idx.shape[0] == len(active) <= 2
        seen.extend(idx[valid].tolist())
        assert reset.dtype == bool
    assert sorted(seen) == list(range(33))


def test_training_inputs_and_vocabulary_never_contain_events_after_t1():
    log = leaky_log()
    split = Split(T1, T2, float(log.ts.max()))
    pts = phase_points(log, split, "train", category_index(log, Vocabulary.build(log.categories)), HORIZON)
    rows = [
        r
        for _, idx, valid, _ in _lane_windows(_user_ranges(log.user_start, pts.mask), 3, 8)
        for r in idx[valid].tolist()
    ]
    assert rows and (log.ts[rows] < T1).all()
    res = train(
        log, TrainConfig(epochs=1, lanes=4, bptt=8, threads=1), TINY_MODEL, progress=False, split=split
    )
    assert not any(n.startswith("late") for n in res.vocab.names)
    assert res.metrics["n_train_events"] == int((log.ts < T1).sum())


def test_one_epoch_run_saves_a_loadable_checkpoint_with_stable_version(tmp_path):
    data = tmp_path / "tiny.jsonl"
    write_jsonl(generate(60, 1500, seed=3), data)
    kw = dict(
        epochs=1,
        lanes=16,
        bptt=16,
        hidden=16,
        item_buckets=256,
        query_buckets=64,
        emb_item=8,
        emb_query=4,
        emb_repeat=8,
        progress=False,
        device="cpu",
        threads=1,
    )
    s1 = run_training(str(data), "jsonl", tmp_path / "a.pt", **kw)
    s2 = run_training(str(data), "jsonl", tmp_path / "b.pt", **kw)
    assert s1["epochs_run"] == 1 and s1["n_train_events"] > 0 and s1["train_events_per_s"] > 0
    assert s1["model_version"] == s2["model_version"]  # same data + seed -> same weights -> same version
    ck = checkpoint.load(tmp_path / "a.pt")
    assert ck.model_version == s1["model_version"]
    assert ck.cfg.hidden == 16 and ck.cfg.n_categories == len(ck.vocab) > 1
    m = ck.metrics
    for key in (
        "train_events_per_s",
        "epochs_run",
        "best_epoch",
        "valid_losses",
        "n_train_events",
        "n_categories",
        "split",
    ):
        assert key in m
    assert m["split"]["train_end"] < m["split"]["valid_end"] <= m["split"]["end_ts"]
    assert np.isfinite(m["valid_losses"][0])


def test_training_reduces_the_loss():
    res = train(
        tiny_log(1500),
        TrainConfig(epochs=2, lanes=16, bptt=16, patience=2, lr=1e-2, threads=1),
        TINY_MODEL,
        progress=False,
    )
    losses = res.metrics["train_losses"]
    assert losses[-1] < losses[0]


def test_unknown_option_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="unknown training option"):
        run_training("nothing.jsonl", "jsonl", tmp_path / "m.pt", lanez=3)
