"""model/train.py: lanes, leakage-free inputs, a one-epoch run and a loadable, stable checkpoint."""

import functools

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


#: run_training keyword arguments for a one-epoch run of the tiny model (CLI path, seconds on CPU).
TINY_RUN = dict(
    epochs=1, lanes=16, bptt=16, progress=False, device="cpu", threads=1,
    **{k: getattr(TINY_MODEL, k) for k in ("hidden", "item_buckets", "query_buckets", "emb_item", "emb_query",
                                           "emb_repeat")},
)


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
    s1 = run_training(str(data), "jsonl", tmp_path / "a.pt", **TINY_RUN)
    s2 = run_training(str(data), "jsonl", tmp_path / "b.pt", **TINY_RUN)
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


@functools.cache  # trained once per test session; calibrate() itself resets the net's calibration
def _calibration_case():
    """A tiny log, its points (train phase: enough purchase labels) and a trained but overconfident net."""
    import torch

    from model.encoding import encode_log

    log = tiny_log(3000, seed=5)
    split = Split(float(np.quantile(log.ts, 0.9)), float(log.ts.max()) + 1, float(log.ts.max()) + 1)
    # A briefly trained net (its logits rank buyers), then made overconfident: p ~ 0.95 far too often.
    tcfg = TrainConfig(epochs=2, lanes=16, bptt=16, threads=1, calibrate=False, lr=1e-2)
    res = train(log, tcfg, TINY_MODEL, progress=False, split=split)
    net, vocab, cfg = res.net, res.vocab, res.net.cfg
    with torch.no_grad():
        net.purchase[-1].bias.add_(3.0)
    pts = phase_points(log, split, "train", category_index(log, vocab), HORIZON)
    return net, encode_log(log, cfg, vocab), log, pts


def test_calibration_reduces_validation_log_loss_and_lives_in_the_network():
    import torch

    from model.train import calibrate, validation_loss

    net, feats, log, pts = _calibration_case()
    assert int(pts.purchase[pts.observable].sum()) >= 20  # the case exercises a real fit
    before = validation_loss(net, feats, log, pts, 1.0, torch.device("cpu"))["purchase_bce"]
    info = calibrate(net, feats, log, pts, torch.device("cpu"))
    after = validation_loss(net, feats, log, pts, 1.0, torch.device("cpu"))["purchase_bce"]
    assert info["applied"] and info["b"] < 0  # pulls the inflated propensities down
    assert after < before - 0.1
    assert info["bce_after"] == pytest.approx(after, abs=1e-4)
    assert (float(net.purchase_scale), float(net.purchase_shift)) == pytest.approx((info["a"], info["b"]))


def test_calibration_is_skipped_with_too_few_positives_or_one_class():
    import torch

    from model.data import Points
    from model.train import calibrate

    net, feats, log, pts = _calibration_case()
    info = calibrate(net, feats, log, pts, torch.device("cpu"), min_positives=10**6)
    assert not info["applied"] and "positive" in info["reason"]
    assert (float(net.purchase_scale), float(net.purchase_shift)) == (1.0, 0.0)
    negatives_only = Points(pts.mask, pts.cat_target, pts.purchase, pts.observable & (pts.purchase == 0))
    info = calibrate(net, feats, log, negatives_only, torch.device("cpu"))
    assert not info["applied"] and "single class" in info["reason"]


def test_training_records_calibration_and_starts_the_gate_at_the_repeat_rate():
    import torch

    from model.network import DemandLSTM
    from model.train import init_repeat_prior

    res = train(
        tiny_log(1500), TrainConfig(epochs=1, lanes=16, bptt=16, threads=1), TINY_MODEL, progress=False
    )
    calib = res.metrics["calibration"]
    assert calib["applied"] or calib["reason"]
    assert 0.0 < res.metrics["repeat_prior"] < 1.0
    net = DemandLSTM(TINY_MODEL)
    init_repeat_prior(net, 0.8)
    assert float(torch.sigmoid(net.gate.bias.detach())) == pytest.approx(0.8)
    init_repeat_prior(net, 1.0)  # clipped: a saturated gate would not learn
    assert float(torch.sigmoid(net.gate.bias.detach())) < 0.96
