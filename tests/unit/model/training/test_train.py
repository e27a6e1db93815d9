"""model/training/train.py: lanes, leakage-free inputs, a one-epoch run and a loadable, stable checkpoint."""

import dataclasses

import numpy as np
import pytest

from demandstream.model.core import checkpoint
from demandstream.model.core.encoding import category_hashes, category_index
from demandstream.model.core.features import Vocabulary
from demandstream.model.core.network import ModelConfig
from demandstream.model.data.eventlog import EventLog
from demandstream.model.data.sampling import training_memory_bytes
from demandstream.model.data.split import Split, next_category_targets, phase_points
from demandstream.model.data.synth import generate, write_jsonl
from demandstream.model.evaluation.baselines import CascadeMix, CascadeRecent
from demandstream.model.training.train import (
    TrainConfig,
    _lane_windows,
    _selection_split,
    _user_ranges,
    choose_history_window,
    purchase_head_summary,
    run_training,
    train,
)
from tests.unit.model.data.test_split import HORIZON, T1, T2, leaky_log

TINY_MODEL = ModelConfig(hidden=16, item_buckets=256, query_buckets=64, emb_item=8, emb_query=4, emb_repeat=8)

#: Selection on the given validation window however small it is (tiny logs are far below the defaults).
ANY_VALID = dict(min_valid_category_points=0, min_valid_positives=0)


#: run_training keyword arguments for a one-epoch run of the tiny model (CLI path, seconds on CPU).
TINY_RUN = dict(
    epochs=1,
    lanes=16,
    bptt=16,
    progress=False,
    device="cpu",
    threads=1,
    **{
        k: getattr(TINY_MODEL, k)
        for k in ("hidden", "item_buckets", "query_buckets", "emb_item", "emb_query", "emb_repeat")
    },
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
    """Choosing the epochs sees rows before T1 only; without a refit that is the whole model."""
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
        log,
        TrainConfig(epochs=1, lanes=4, bptt=8, threads=1, refit=False, **ANY_VALID),
        TINY_MODEL,
        progress=False,
        split=split,
    )
    assert not any(n.startswith("late") for n in res.vocab.names)
    assert res.metrics["n_train_events"] == int((log.ts < T1).sum())
    assert res.metrics["selection"]["source"] == "validation"


def test_refit_trains_on_train_and_validation_for_the_chosen_epochs_and_never_on_test_rows():
    log = leaky_log()
    split = Split(T1, T2, float(log.ts.max()))
    tcfg = TrainConfig(epochs=2, lanes=4, bptt=8, threads=1, patience=2, **ANY_VALID)
    res = train(log, tcfg, TINY_MODEL, progress=False, split=split)
    m = res.metrics
    assert m["refit"]["epochs"] == m["selection"]["best_epoch"] == m["best_epoch"]
    assert len(m["refit"]["history"]) == m["refit"]["epochs"]
    assert m["selection"]["n_train_events"] == int((log.ts < T1).sum())
    assert m["n_train_events"] == m["refit"]["n_train_events"] == int((log.ts < T2).sum())
    assert m["optimizer_steps"] == m["selection"]["optimizer_steps"] + m["refit"]["optimizer_steps"]
    # a category seen only in validation rows (T1 <= ts < T2) is in the refit model's vocabulary ...
    valid_only = {log.categories[c] for c in log.category[(log.ts >= T1) & (log.ts < T2)]}
    assert valid_only and valid_only <= set(res.vocab.names)
    assert res.net.cfg.n_categories == len(res.vocab)
    # ... and no category first seen in the test window is
    test_only = {log.categories[c] for c in log.category[log.ts >= T2]} - valid_only
    assert test_only and not test_only & set(res.vocab.names)

    res = train(
        log, TrainConfig(**{**tcfg.__dict__, "refit": False}), TINY_MODEL, progress=False, split=split
    )
    assert "refit" not in res.metrics and res.metrics["train_config"]["refit"] is False
    assert not valid_only & set(res.vocab.names)


def test_a_refit_on_many_times_the_data_replays_the_chosen_steps_not_epochs():
    """A log whose validation outweighs its training (a ramping rate under the default split): the chosen
    epochs on the union would be several times the updates validation judged, so the refit replays the
    chosen epoch's optimizer steps on the selection's schedule; an ordinary split still replays epochs."""
    log = tiny_log(2000, seed=5)
    t1, t2 = np.quantile(log.ts, [0.2, 0.9])
    tcfg = TrainConfig(epochs=3, lanes=4, bptt=8, threads=1, patience=3, select_se=0.0, **ANY_VALID)
    m = train(log, tcfg, TINY_MODEL, progress=False, split=Split(t1, t2, float(log.ts.max()))).metrics
    sel, refit = m["selection"], m["refit"]
    assert m["refit"]["n_train_events"] > 2 * sel["n_train_events"]
    assert refit["replayed"] == "steps" and sel["best_epoch"] >= 1
    chosen = next(h["steps"] for h in sel["history"] if h["epoch"] == sel["best_epoch"])
    assert refit["optimizer_steps"] == refit["max_steps"] == chosen
    assert len(refit["history"]) < sel["best_epoch"] or sel["best_epoch"] == 1  # fewer, longer epochs
    # the purchase-head phase after it replays its chosen steps too, on its own schedule
    kept = sel["purchase_epochs"]
    chosen = next(h["steps"] for h in sel["purchase_history"] if h["epoch"] == kept)
    assert refit["purchase_max_steps"] == chosen
    assert (refit["purchase_history"][-1]["steps"] if kept else 0) == chosen

    t1, t2 = np.quantile(log.ts, [0.8, 0.9])
    m = train(log, tcfg, TINY_MODEL, progress=False, split=Split(t1, t2, float(log.ts.max()))).metrics
    assert m["refit"]["replayed"] == "epochs" and "max_steps" not in m["refit"]
    assert len(m["refit"]["history"]) == m["refit"]["epochs"] == m["selection"]["best_epoch"]


def test_a_validation_window_that_cannot_judge_purchases_ships_the_funnel_table():
    """Validation shorter than the purchase horizon: every validation window is censored, so no trained
    purchase head can be told from the counter it starts from. The head shipped is the funnel table alone
    (the funnel_cart estimator on the rows before T2), in the refit too, and the run says why."""
    import torch

    from demandstream.model.core.network import funnel_table
    from demandstream.model.training.train import _prepare

    log = tiny_log(2000, seed=5)
    t1 = float(np.quantile(log.ts, 0.8))
    split = Split(t1, t1 + HORIZON / 2, float(log.ts.max()))
    tcfg = TrainConfig(epochs=2, lanes=4, bptt=8, threads=1, patience=2, purchase_epochs=2, **ANY_VALID)
    res = train(log, tcfg, TINY_MODEL, progress=False, split=split)
    sel = res.metrics["selection"]
    assert sel["purchase_unjudged"] == "no observable validation purchase window"
    assert sel["purchase_from_funnel"] and sel["purchase_epochs"] == 0 and sel["purchase_history"] == []
    if sel["category_epoch"] == 0:  # the cascade kept the categories: nothing trained is kept at all
        assert sel["best_epoch"] == 0 and res.metrics["refit"]["optimizer_steps"] == 0
    # the shipped purchase logit is the table alone: the MLP's correction is zero ...
    assert not res.net.purchase[-1].weight.any() and not res.net.purchase[-1].bias.any()
    # ... and the table is the funnel_cart estimator on the observable windows before T2
    rows = log.take(np.flatnonzero(log.ts < split.valid_end)).sorted_by_user_time()
    next_hash = next_category_targets(category_hashes(rows), rows.user_start)
    all_split = Split(split.valid_end, split.valid_end + 1.0, split.end_ts)
    _v, _c, feats, tr, _va, _b = _prepare(rows, all_split, split.valid_end, tcfg, res.net.cfg, next_hash)
    obs = tr.mask & tr.observable
    want = funnel_table(feats.etype[obs], feats.cart[obs] > 0, tr.purchase[obs])
    assert torch.allclose(res.net.funnel_logit, torch.as_tensor(want, dtype=torch.float32))
    assert purchase_head_summary(sel) == "funnel table (no observable validation purchase window)"
    # without the funnel base there is no counter to fall back to: a trained epoch is kept, never the
    # untrained start's purchase MLP
    plain = dataclasses.replace(TINY_MODEL, funnel_base=False)
    sel = train(log, tcfg, plain, progress=False, split=split).metrics["selection"]
    assert sel["best_epoch"] >= 1 and not sel["purchase_from_funnel"]

    # a window of both outcomes judges as before
    split = Split(*np.quantile(log.ts, [0.6, 0.8]), float(log.ts.max()))
    res = train(log, tcfg, TINY_MODEL, progress=False, split=split)
    assert res.metrics["selection"]["purchase_unjudged"] == ""
    assert res.metrics["selection"]["purchase_history"][0]["epoch"] == 0  # the phase ran, judged


def test_a_too_small_validation_window_falls_back_to_a_training_holdout(caplog):
    log = tiny_log(1500)
    t_max = float(log.ts.max())
    split = Split(t_max - 60.0, t_max - 30.0, t_max + 1.0)  # half a minute of validation
    with caplog.at_level("WARNING", logger="demandstream.model.training.train"):
        res = train(
            log,
            TrainConfig(epochs=1, lanes=16, bptt=16, threads=1, refit=False),
            TINY_MODEL,
            progress=False,
            split=split,
        )
    sel = res.metrics["selection"]
    assert sel["source"] == "holdout" and "validation window" in sel["reason"]
    # a 1,500-event log's hold-out is small too, and the user is told how small
    assert 0 < sel["holdout_category_points"] < TrainConfig.min_valid_category_points
    assert f"the hold-out is small too ({sel['holdout_category_points']} next-category points" in caplog.text
    assert sel["n_category_points"] < TrainConfig.min_valid_category_points
    assert float(log.ts.min()) < sel["holdout_start"] < split.train_end
    assert sel["split"]["train_end"] == sel["holdout_start"] and sel["split"]["valid_end"] == split.train_end
    assert res.metrics["n_train_events"] == int((log.ts < sel["holdout_start"]).sum())
    assert np.isfinite(res.metrics["best_valid_mrr@20"])


def test_a_holdout_with_less_evidence_than_a_small_validation_window_does_not_replace_it(caplog):
    """Validation as long as the purchase horizon has no observable purchase window, but thousands of
    next-category points; a hold-out of a few minutes has fewer of both: validation keeps choosing."""
    log = tiny_log(1500)
    t0, t_max = float(log.ts.min()), float(log.ts.max())
    split = Split(t0 + 0.6 * (t_max - t0), t_max + 1.0, t_max + 1.0)  # 40 % validation, 6 % hold-out
    tcfg = TrainConfig()
    with caplog.at_level("WARNING", logger="demandstream.model.training.train"):
        chosen, info = _selection_split(log, split, tcfg)
    assert info["n_category_points"] < tcfg.min_valid_category_points  # small: the fallback is considered
    assert info["holdout_category_points"] <= info["n_category_points"]
    assert info["holdout_positives"] <= info["n_positives"]
    assert chosen is split and info["source"] == "validation" and "holdout_start" not in info
    assert "has no more" in info["reason"] and info["reason"] in caplog.text
    # a hold-out with more evidence still replaces it (the half-minute window of the test above)
    chosen, info = _selection_split(log, Split(t_max - 60.0, t_max - 30.0, t_max + 1.0), tcfg)
    assert info["source"] == "holdout" and chosen.train_end == info["holdout_start"]


def test_a_log_too_large_for_the_memory_gets_a_hint_before_training(tmp_path, monkeypatch, caplog):
    data = tmp_path / "tiny.jsonl"
    write_jsonl(generate(60, 1500, seed=3), data)
    monkeypatch.setattr("demandstream.model.training.train.available_memory_bytes", lambda: 10**12)
    with caplog.at_level("WARNING", logger="demandstream.model.training.train"):
        run_training(str(data), "jsonl", tmp_path / "a.pt", **TINY_RUN)
    assert "--sample-users" not in caplog.text  # plenty of memory: no hint
    # memory for the libraries and a twentieth of this log's rows (the catalog's part set aside, so that
    # the fraction depends on the rows alone): the hint proposes a small fraction, of the sample's
    monkeypatch.setattr("demandstream.model.data.sampling.TRAIN_BYTES_PER_CATEGORY", 0)
    rows = sum(1 for _ in data.open())
    monkeypatch.setattr(
        "demandstream.model.training.train.available_memory_bytes",
        lambda: training_memory_bytes(rows // 20, 0),
    )
    with caplog.at_level("WARNING", logger="demandstream.model.training.train"):
        run_training(str(data), "jsonl", tmp_path / "b.pt", user_sample=0.5, **TINY_RUN)
    assert "it may run out of memory; --sample-users 0.0" in caplog.text
    assert " categories needs about " in caplog.text
    # less than the libraries need: no fraction is promised
    monkeypatch.setattr("demandstream.model.training.train.available_memory_bytes", lambda: 10**8)
    caplog.clear()
    with caplog.at_level("WARNING", logger="demandstream.model.training.train"):
        run_training(str(data), "jsonl", tmp_path / "c.pt", **TINY_RUN)
    assert "even a 1 % user sample would not fit" in caplog.text


def test_one_epoch_run_saves_a_loadable_checkpoint_with_stable_version(tmp_path):
    data = tmp_path / "tiny.jsonl"
    write_jsonl(generate(60, 1500, seed=3), data)
    s1 = run_training(str(data), "jsonl", tmp_path / "a.pt", **TINY_RUN)
    s2 = run_training(str(data), "jsonl", tmp_path / "b.pt", **TINY_RUN)
    assert s1["epochs_run"] >= 1 and s1["n_train_events"] > 0 and s1["train_events_per_s"] > 0
    assert s1["model_version"] == s2["model_version"]  # same data + seed -> same weights -> same version
    # what calibration did, and where the purchase head comes from, are in the summary the CLI prints
    assert s1["purchase_calibration"].startswith(("platt(", "identity("))
    assert s1["purchase_head"].startswith(("funnel table", "joint epoch"))
    ck = checkpoint.load(tmp_path / "a.pt")
    assert ck.model_version == s1["model_version"]
    assert ck.cfg.hidden == 16 and ck.cfg.n_categories == len(ck.vocab) > 1
    m = ck.metrics
    for key in (
        "train_events_per_s",
        "epochs_run",
        "best_epoch",
        "valid_losses",
        "valid_mrr@20",
        "best_valid_mrr@20",
        "optimizer_steps",
        "selection",
        "refit",
        "n_train_events",
        "n_categories",
        "split",
    ):
        assert key in m
    assert m["split"]["train_end"] < m["split"]["valid_end"] <= m["split"]["end_ts"]
    assert np.isfinite(m["valid_losses"][0]) and 0.0 <= m["valid_mrr@20"][0] <= 1.0
    # one epoch trained to choose on validation, then the chosen number of epochs on train + validation
    assert max(h["epoch"] for h in m["selection"]["history"]) == 1
    assert m["refit"]["epochs"] == m["best_epoch"] <= 1 and len(m["refit"]["history"]) == m["best_epoch"]


def test_training_reduces_the_loss():
    res = train(
        tiny_log(1500),
        TrainConfig(epochs=2, lanes=16, bptt=16, patience=2, lr=1e-2, threads=1, refit=False),
        TINY_MODEL,
        progress=False,
    )
    losses = [h["train_loss"] for h in res.metrics["history"] if h["epoch"] >= 1]  # epochs that trained
    assert len(losses) == 2 and losses[-1] < losses[0]


def test_unknown_option_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="unknown training option"):
        run_training("nothing.jsonl", "jsonl", tmp_path / "m.pt", lanez=3)


def test_training_records_calibration_and_starts_from_the_rule_cascade():
    import torch

    from demandstream.model.core.network import (
        CASCADE_SLOT_WEIGHTS,
        SLOT_FEATURES,
        DemandLSTM,
        init_like_cascade,
    )

    res = train(
        tiny_log(1500),
        TrainConfig(epochs=1, lanes=16, bptt=16, threads=1, refit=False),
        TINY_MODEL,
        progress=False,
    )
    calib = res.metrics["calibration"]
    assert calib["applied"] or calib["reason"]
    assert res.metrics["train_config"]["cascade_init"] is True
    # the Markov tables were learned from the training rows and travel with the network
    assert (res.net.markov_count > 0).any() and torch.isfinite(res.net.pop_logp).all()
    net = DemandLSTM(TINY_MODEL)
    init_like_cascade(net)
    for name, w in CASCADE_SLOT_WEIGHTS.items():
        assert float(net.slot_w0.detach()[SLOT_FEATURES.index(name)]) == pytest.approx(w)
    assert float(net.slot_ctx.weight.detach().abs().sum()) == 0.0  # the context starts with no say


def test_a_vocabulary_cap_is_reported_not_silent():
    log = tiny_log()
    n_cats = len({c for c in log.categories})
    split = Split(float(np.quantile(log.ts, 0.8)), float(np.quantile(log.ts, 0.9)), float(log.ts.max()))
    tcfg = TrainConfig(epochs=1, lanes=16, bptt=16, threads=1, device="cpu", max_categories=4)
    res = train(log, tcfg, TINY_MODEL, progress=False, split=split)
    assert len(res.vocab) == 4 and res.metrics["n_categories_beyond_cap"] > 0
    assert res.metrics["n_categories_beyond_cap"] <= n_cats - 3


def test_the_purchase_head_phase_moves_only_the_purchase_head_and_is_replayed_by_the_refit(monkeypatch):
    """After the joint epochs, epochs of the purchase head alone: nothing the category head reads moves, the
    count kept is the one with the lowest validation purchase BCE (0 when none is lower), and the refit
    runs exactly that many."""
    import torch

    from demandstream.model.training.train import _fit_purchase_head, _user_ranges

    log = leaky_log()
    split = Split(T1, T2, float(log.ts.max()))
    tcfg = TrainConfig(epochs=1, lanes=4, bptt=8, threads=1, patience=2, purchase_epochs=3, **ANY_VALID)
    res = train(log, tcfg, TINY_MODEL, progress=False, split=split)
    sel = res.metrics["selection"]
    bces = [h["purchase_bce"] for h in sel["purchase_history"]]
    assert 0 <= sel["purchase_epochs"] <= 3 and sel["purchase_history"][0]["epoch"] == 0
    assert bces[sel["purchase_epochs"]] == min(bces)
    assert len(res.metrics["refit"]["history"]) == res.metrics["refit"]["epochs"]

    # one phase on a trained network: only purchase.* changes
    net = res.net
    before = {k: v.clone() for k, v in net.state_dict().items()}
    from demandstream.model.training.train import _prepare

    all_split = Split(T2, T2 + 1.0, split.end_ts)
    next_hash = next_category_targets(category_hashes(log), log.user_start)
    vocab, _cfg, feats, tr, _va, _ = _prepare(log, all_split, T2, tcfg, net.cfg, next_hash)

    def phase(epochs: int, from_funnel: bool):  # a refit's purchase phase (no validation points)
        return _fit_purchase_head(
            net,
            feats,
            log,
            tr,
            None,
            tcfg,
            torch.device("cpu"),
            np.random.default_rng(0),
            _user_ranges(log.user_start, tr.mask),
            epochs,
            from_funnel,
            False,
            "test",
        )

    n, from_funnel, hist, _s, _t = phase(2, False)
    assert n == 2 and len(hist) == 2 and not from_funnel
    changed = {k for k, v in net.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(k.startswith("purchase.") for k in changed), changed
    assert all(p.requires_grad for p in net.parameters())  # the freeze is undone

    # the replay ships the average of its iterates (as the joint epochs do), not the last iterate
    import demandstream.model.training.train as train_mod

    averages = []

    class Spy(train_mod.WeightAverage):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            averages.append(self)

    monkeypatch.setattr(train_mod, "WeightAverage", Spy)
    phase(2, False)
    (avg,) = averages
    assert all(torch.equal(p, a) for p, a in zip(net.purchase.parameters(), avg.average, strict=True))

    # a validated run that chose the funnel table alone is replayed with the correction reset
    n, from_funnel, hist, _s, _t = phase(0, True)
    assert (n, from_funnel, hist) == (0, True, [])
    assert not net.purchase[-1].weight.any() and not net.purchase[-1].bias.any()
    assert isinstance(sel["purchase_from_funnel"], bool)


def test_progress_in_a_log_file_is_lines_not_bars(tmp_path, capsys, monkeypatch):
    """Redirected to a file, tqdm's bars are megabytes of carriage returns: the epoch lines go, and
    within an epoch a line every PROGRESS_LINE_S seconds (here: every step), none with --quiet."""
    from demandstream.model.training import train as train_mod

    monkeypatch.setattr(train_mod, "PROGRESS_LINE_S", 0.0)
    data = tmp_path / "d.jsonl"
    # a log whose validation holds purchase windows of both outcomes, so the purchase phase runs too
    write_jsonl(generate(30, 1500, seed=3), data)
    run_training(str(data), "jsonl", tmp_path / "m.pt", **{**TINY_RUN, "progress": True})
    out, err = capsys.readouterr()
    assert "\r" not in out + err
    assert "choose epoch 1: train loss" in out
    lines = [ln for ln in out.splitlines() if ln.startswith("choose epoch 1: ") and "events/s" in ln]
    assert lines and ", loss " in lines[-1]  # the running loss rides along
    assert any(ln.startswith("choose purchase 1: ") and "events/s" in ln for ln in out.splitlines())
    run_training(str(data), "jsonl", tmp_path / "m.pt", **TINY_RUN)  # progress=False: silent
    out, err = capsys.readouterr()
    assert "events/s" not in out + err


def test_training_with_blocked_windows_follows_the_unblocked_run(monkeypatch):
    """Every window blocked (the threshold at 0, blocks of 5 cells) trains the same model as one call
    per window, to float rounding: the same losses and validation figures, epoch by epoch."""
    from demandstream.model.core import network
    from demandstream.model.training import train as train_module

    def run():
        res = train(
            tiny_log(1500),
            TrainConfig(epochs=2, lanes=16, bptt=16, threads=1, refit=False),
            TINY_MODEL,
            progress=False,
        )
        return [(h["epoch"], h["train_loss"], h.get("valid_mrr@20")) for h in res.metrics["history"]]

    whole = run()
    monkeypatch.setattr(train_module, "TRAIN_BLOCK_FLOATS", 0)
    monkeypatch.setattr(network, "HEAD_BLOCK_MIN_ROWS", 5)
    monkeypatch.setattr(network, "HEAD_BLOCK_FLOATS", 1)
    blocked = run()
    assert [e for e, *_ in whole] == [e for e, *_ in blocked] and len(whole) >= 3
    for (_, la, ma), (_, lb, mb) in zip(whole, blocked, strict=True):
        assert (np.isnan(la) and np.isnan(lb)) or la == pytest.approx(lb, rel=1e-4)
        assert ma == pytest.approx(mb, abs=2e-3)


def _window_log(comes_back: bool) -> EventLog:
    """Users before T1 teach the transition k5 -> k8; validation users count k1 five times, touch k2, k3,
    k4, k5 once each, then go on to k8 (the Markov pick) or back to k1."""
    from demandstream.model.core.events import Event

    t0, events = 1.7e9, []
    for u in range(5):
        for j, cat in enumerate(("k5", "k8")):
            events.append(Event(f"f{u}-{j}", f"f{u}", t0 + 10.0 * u + j, "view", f"i{cat}", cat))
    seq = ["k1"] * 5 + ["k2", "k3", "k4", "k5", "k1" if comes_back else "k8"]
    for u in range(3):
        for j, cat in enumerate(seq):
            events.append(Event(f"v{u}-{j}", f"v{u}", t0 + 1000.0 + 10.0 * j, "view", f"i{cat}", cat))
    return EventLog.from_events(events).sorted_by_user_time()


@pytest.mark.parametrize(("comes_back", "window"), [(False, 4), (True, None)])
def test_the_cascade_start_s_history_window_is_chosen_on_validation(comes_back, window):
    log = _window_log(comes_back)
    split = Split(1.7e9 + 500.0, 1.7e9 + 2000.0, float(log.ts.max()))
    chosen = choose_history_window(log, split, slots=16, horizon_s=HORIZON)
    assert chosen["window"] == window and chosen["validation_points"] == 3 * 9
    # the mixture only where its best window beats the plain Markov tier's on validation
    best = {}
    for name, b in (("plain", CascadeRecent()), ("mixture", CascadeMix())):
        cats = (log.category.astype(np.int64) + 1).astype(np.int32)
        b.fit(
            cats,
            log.etype,
            log.ts,
            log.user_start,
            log.ts < split.valid_end,
            HORIZON,
            len(log.categories) + 1,
            valid_start=split.train_end,
        )
        best[name] = max(b.settings()["validation_mrr@20"].values())
    assert chosen["mixture"] == (best["mixture"] > best["plain"])
    # a model without the history mixture chooses among cascade_recent's windows alone
    plain = choose_history_window(log, split, slots=16, horizon_s=HORIZON, mixture=False)
    assert plain["mixture"] is False and max(plain["validation_mrr@20"].values()) == best["plain"]
    # a window the state's slots cannot hold more than is no window
    assert choose_history_window(log, split, slots=4, horizon_s=HORIZON)["window"] is None


def test_training_starts_from_the_window_validation_chose_and_the_refit_keeps_it(monkeypatch, tmp_path):
    import torch

    from demandstream.model.core.network import (
        CASCADE_WINDOW_WEIGHTS,
        DemandLSTM,
        init_like_cascade,
        slot_features,
    )
    from demandstream.model.training import train as train_mod

    chosen = {"window": 3, "chosen_on": "validation", "validation_points": 1, "mixture": True}
    monkeypatch.setattr(train_mod, "choose_history_window", lambda *a, **k: chosen)
    starts = []
    monkeypatch.setattr(train_mod, "init_like_cascade", lambda net, mixture: starts.append(mixture))
    tcfg = TrainConfig(epochs=1, lanes=16, bptt=16, threads=1)
    res = train(tiny_log(1500), tcfg, TINY_MODEL, progress=False)
    assert res.net.cfg.history_window == 3 and res.metrics["history_window"] == chosen
    assert starts == [True, True]  # the selection and the refit both start from cascade_mix
    assert res.net.slot_w0.shape[0] == len(slot_features(res.net.cfg))
    start = DemandLSTM(res.net.cfg)
    init_like_cascade(start)
    names = slot_features(start.cfg)
    for name, w in CASCADE_WINDOW_WEIGHTS.items():
        assert float(start.slot_w0.detach()[names.index(name)]) == pytest.approx(w)
    # the checkpoint keeps the window; switched off, training starts from the whole history
    off = train(
        tiny_log(1500), dataclasses.replace(tcfg, choose_history_window=False), TINY_MODEL, progress=False
    )
    assert off.net.cfg.history_window is None and "history_window" not in off.net.cfg.to_dict()
    # without the history mixture the choice may not pick cascade_mix, whose start needs it
    asked = []
    monkeypatch.setattr(train_mod, "choose_history_window", lambda *a, **k: asked.append(k) or chosen)
    monkeypatch.setattr(train_mod, "init_like_cascade", init_like_cascade)
    no_mix = dataclasses.replace(TINY_MODEL, markov_history=False)
    with pytest.raises(ValueError, match="history mixture"):
        train(tiny_log(1500), tcfg, no_mix, progress=False)  # the chooser's answer is refused, not ignored
    assert asked == [{"mixture": False}]
    with pytest.raises(ValueError, match="history mixture"):
        init_like_cascade(DemandLSTM(dataclasses.replace(res.net.cfg, markov_history=False)), mixture=True)
    assert torch.isfinite(res.net.slot_w0).all()
    checkpoint.save(tmp_path / "w.pt", res.net, res.vocab, res.metrics)
    ck = checkpoint.load(tmp_path / "w.pt")
    assert ck.net.cfg.history_window == 3
    assert all(
        torch.equal(a, b)
        for a, b in zip(ck.net.state_dict().values(), res.net.state_dict().values(), strict=True)
    )
