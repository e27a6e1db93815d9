"""model/evaluation/evaluate.py: every report key for the model and every baseline, on the same points."""

import json
import math

import numpy as np
import pytest

from demandstream.model.data.split import temporal_split
from demandstream.model.data.synth import generate, write_jsonl
from demandstream.model.errors import DataError, OptionError
from demandstream.model.evaluation.baselines import CascadeRecent
from demandstream.model.evaluation.evaluate import (
    HEADLINE_KEYS,
    LOWER_IS_BETTER,
    METHOD_KEYS,
    aggregate_reports,
    best_baselines,
    evaluate,
    format_table,
    heads_summary,
    run_evaluation,
    verdict_summary,
)
from demandstream.model.evaluation.metrics import CATEGORY_KEYS, PURCHASE_KEYS
from demandstream.model.training.train import TrainConfig, run_training, train
from tests.unit.model.training.test_train import TINY_MODEL, TINY_RUN, tiny_log

CATEGORY_METHODS = (
    "popularity",
    "last_category",
    "user_history",
    "markov",
    "cascade",
    "cascade_recent",
    "cascade_mix",
)
PURCHASE_METHODS = ("user_history", "funnel", "funnel_cart")


@pytest.fixture(scope="module")
def trained():
    log = tiny_log(2000, seed=5)
    split = temporal_split(log)
    res = train(
        log, TrainConfig(epochs=1, lanes=16, bptt=16, threads=1), TINY_MODEL, progress=False, split=split
    )
    from demandstream.model.core.checkpoint import Checkpoint

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
    assert set(rep["baselines"]) == set(CATEGORY_METHODS + PURCHASE_METHODS)
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
    # the baselines learn from exactly the events the model (refit on everything before T2) learned from
    assert rep["baseline_fit_events"] == rep["model_train_events"] == int((log.ts < split.valid_end).sum())
    # the oracle copy-or-switch gate can only move targets up the cascade's ranking
    head = rep["headroom"]
    assert head["over"] == "cascade" and 0 < head["repeat_share"] < 1
    assert rep["baselines"]["cascade"]["category_mrr@20"] <= head["oracle_gate_mrr@20"] <= 1.0
    # the recency-windowed cascade says which window validation chose, and on how many points
    chosen = rep["baseline_settings"]["cascade_recent"]
    assert chosen["window"] in CascadeRecent.WINDOWS and chosen["validation_points"] > 0
    assert set(chosen["validation_mrr@20"]) == {"all" if w is None else str(w) for w in CascadeRecent.WINDOWS}
    for m in (rep["model"], *rep["baselines"].values()):
        for k, v in m.items():
            assert 0.0 <= v <= (np.inf if k == "purchase_logloss" else 1.0), k
    # popularity is the same ranking for every user: far from a perfect score on real sequences
    assert (
        rep["baselines"]["popularity"]["category_mrr@20"]
        < rep["baselines"]["last_category"]["category_mrr@20"]
    )
    # the best baseline of every metric, and the model's ratio to it (> 1: the model is better)
    assert set(rep["best_baseline"]) == set(METHOD_KEYS)
    for key, best in rep["best_baseline"].items():
        values = {n: m[key] for n, m in rep["baselines"].items() if key in m}
        pick = min if key in LOWER_IS_BETTER else max
        assert best["value"] == pick(values.values()) == values[best["name"]], key
        assert best["model"] == rep["model"][key]
        # ... with the user-bootstrap interval of the ratio and its reading
        lo, hi = best["ratio_ci"]
        assert lo <= hi or math.isnan(lo), (key, best)
        assert best["verdict"] in ("better", "worse", "inconclusive")
    assert rep["bootstrap"]["unit"] == "user" and rep["bootstrap"]["resamples"] > 0
    line = verdict_summary(rep)  # the CLI's reading of the intervals names every headline metric once
    assert line.startswith("against the best baseline, 95 % user-bootstrap intervals: ")
    assert all(line.count(f"{k} (") == 1 for k in HEADLINE_KEYS), line
    table = format_table(rep)
    assert table.splitlines()[0].split() == [
        "metric",
        "model",
        *rep["baselines"],
        "best",
        "ratio",
        "95%_CI",
        "verdict",
    ]
    assert len(table.splitlines()) == 1 + len(CATEGORY_KEYS) + len(PURCHASE_KEYS)
    json.dumps(rep, default=float)  # the report stays JSON-serialisable


def test_run_evaluation_writes_the_report_and_reuses_the_training_split(tmp_path):
    data = tmp_path / "d.jsonl"
    write_jsonl(generate(40, 1200, seed=2), data)
    run_training(str(data), "jsonl", tmp_path / "m.pt", horizon_s=900.0, **TINY_RUN)
    rep = run_evaluation(tmp_path / "m.pt", str(data), "jsonl", tmp_path / "out" / "report.json")
    assert rep["horizon_s"] == 900.0  # the purchase horizon the model was trained for, not the default
    on_disk = json.loads((tmp_path / "out" / "report.json").read_text())
    assert on_disk["n_test_points"] == rep["n_test_points"] > 0
    assert on_disk["model"].keys() == rep["model"].keys()
    from demandstream.model.core.checkpoint import load

    assert rep["split"]["valid_end"] == load(tmp_path / "m.pt").metrics["split"]["valid_end"]
    # the report says whether the propensities it scored were calibrated, and if not, why
    calib = on_disk["train_metrics"]["calibration"]
    assert calib["applied"] or calib["reason"]
    # ... and where its heads come from, as training recorded it, in one line
    tm = on_disk["train_metrics"]
    stored = load(tmp_path / "m.pt").metrics
    assert tm["purchase_head"] == stored["purchase_head"] and tm["purchase_head"]
    assert tm["category_epoch"] == stored["selection"]["category_epoch"]
    assert heads_summary(on_disk).startswith("the model as trained: category head ")
    assert f"purchase head {tm['purchase_head']}" in heads_summary(on_disk)

    # A later file alone under the stored split: its baselines would learn nothing, so it is refused ...
    events = list(generate(40, 1200, seed=2))
    later = tmp_path / "later.jsonl"
    write_jsonl([e for e in events if e.ts >= rep["split"]["valid_end"]], later)
    with pytest.raises(DataError, match="no event of this log is before the test start"):
        run_evaluation(tmp_path / "m.pt", str(later), "jsonl", tmp_path / "later.json")
    # ... while a split put before its first event on purpose scores the whole file, and says so
    t0 = min(e.ts for e in events if e.ts >= rep["split"]["valid_end"])
    whole = run_evaluation(
        tmp_path / "m.pt", str(later), "jsonl", tmp_path / "w.json", train_end=t0 - 2, valid_end=t0 - 1
    )
    assert whole["baseline_fit_events"] == 0 and whole["prequential"]["category_points"] > 0
    # An earlier file under the stored split, or bounds past the log's end: no event to test, said in
    # one line (it used to print a table of dashes and exit 0)
    earlier = tmp_path / "earlier.jsonl"
    write_jsonl([e for e in events if e.ts < rep["split"]["train_end"]], earlier)
    with pytest.raises(OptionError, match=r"nothing to test: .*\(the valid end \S*m\.pt was trained for\)"):
        run_evaluation(tmp_path / "m.pt", str(earlier), "jsonl", tmp_path / "earlier.json")
    end = max(e.ts for e in events)
    with pytest.raises(OptionError, match=r"nothing to test: .*\(--valid-end\), after the log's last event"):
        run_evaluation(
            tmp_path / "m.pt", str(data), "jsonl", tmp_path / "x.json", train_end=end, valid_end=end + 1
        )


def test_a_user_sample_trains_and_evaluates_a_stable_part_of_the_users_and_both_say_so(tmp_path):
    data = tmp_path / "d.jsonl"
    write_jsonl(generate(60, 1800, seed=3), data)
    summary = run_training(str(data), "jsonl", tmp_path / "m.pt", user_sample=0.5, **TINY_RUN)
    n_users = len({e.user_id for e in generate(60, 1800, seed=3)})
    assert summary["user_sample"] == 0.5 and 0 < summary["n_users"] < n_users
    from demandstream.model.core.checkpoint import load

    assert load(tmp_path / "m.pt").metrics["user_sample"] == 0.5
    half = run_evaluation(tmp_path / "m.pt", str(data), "jsonl", tmp_path / "h.json", user_sample=0.5)
    whole = run_evaluation(tmp_path / "m.pt", str(data), "jsonl", tmp_path / "w.json")
    assert half["user_sample"] == 0.5 and whole["user_sample"] == 1.0
    assert half["train_metrics"]["user_sample"] == whole["train_metrics"]["user_sample"] == 0.5
    assert 0 < half["n_test_points"] < whole["n_test_points"]


def test_a_taobao_log_with_rows_stamped_years_away_trains_and_evaluates_on_the_default_split(tmp_path):
    """Rows stamped years away from the log's days (valid timestamps, wrong clocks): the default split
    must still give the model a training set and the test a window (docs/ARCHITECTURE.md §Evaluation)."""
    back = {"view": "pv", "add_to_cart": "cart", "favorite": "fav", "purchase": "buy"}
    rows = [
        f"{e.user_id},{e.item_id},{e.category},{back[e.type]},{int(e.ts)}"
        for e in generate(40, 1200, seed=2)
        if e.type in back and e.category
    ]
    first = rows[0].split(",")
    # 2003-01-01 and 2026-06-01: both pass validation (after 2000, not in the future)
    rows += [f"{first[0]},{first[1]},{first[2]},pv,{t}" for t in (1_041_379_200, 1_780_272_000)]
    data = tmp_path / "UserBehavior.csv"
    data.write_text("\n".join(rows) + "\n")
    summary = run_training(str(data), "taobao", tmp_path / "m.pt", **TINY_RUN)
    rep = run_evaluation(tmp_path / "m.pt", str(data), "taobao", tmp_path / "report.json")
    body = np.array([float(r.rsplit(",", 1)[1]) for r in rows[:-2]])
    assert body.min() < rep["split"]["train_end"] < rep["split"]["valid_end"] < body.max()
    assert summary["n_train_events"] > 0.5 * len(body)
    # the summary line says which start training chose, and the report which start the model had
    assert summary["history_window"] == (rep["train_metrics"]["history_window"] or "all")
    assert summary["history_mixture"] == rep["train_metrics"]["history_mixture"]
    assert rep["n_category_points"] > 0 and rep["n_purchase_points"] > 0
    assert 0.0 < rep["model"]["category_mrr@20"] <= 1.0


# -- best baseline and aggregation (pure functions) -----------------------------------------------


def test_best_baselines_picks_per_metric_and_orients_the_ratio():
    model = {"category_mrr@20": 0.3, "purchase_auc": 0.6, "purchase_logloss": 0.5, "purchase_ece": 0.02}
    baselines = {
        "popularity": {"category_mrr@20": 0.1},
        "cascade": {"category_mrr@20": 0.4},
        "funnel": {"purchase_auc": 0.7, "purchase_logloss": 0.4, "purchase_ece": 0.01},
        "funnel_cart": {"purchase_auc": 0.65, "purchase_logloss": 0.45, "purchase_ece": float("nan")},
    }
    best = best_baselines(model, baselines)
    assert set(best) == {"category_mrr@20", "purchase_auc", "purchase_logloss", "purchase_ece"}
    assert best["category_mrr@20"] == {
        "name": "cascade",
        "value": 0.4,
        "model": 0.3,
        "ratio": pytest.approx(0.75),
    }
    assert best["purchase_auc"]["name"] == "funnel"
    assert best["purchase_auc"]["ratio"] == pytest.approx(0.6 / 0.7)
    # lower is better: the best is the lowest and the ratio best / model (< 1: the model is worse)
    assert best["purchase_logloss"]["name"] == "funnel"
    assert best["purchase_logloss"]["ratio"] == pytest.approx(0.4 / 0.5)
    assert best["purchase_ece"]["name"] == "funnel"  # the NaN of funnel_cart is skipped
    assert best["purchase_ece"]["ratio"] == pytest.approx(0.01 / 0.02)


def test_best_baselines_edge_cases():
    best = best_baselines(
        {"category_accuracy": 0.2, "purchase_ece": 0.0, "purchase_auc": float("nan")},
        {"a": {"category_accuracy": 0.0, "purchase_ece": 0.0, "purchase_auc": 0.5}},
    )
    assert best["category_accuracy"]["ratio"] == float("inf")  # every baseline at 0
    assert np.isnan(best["purchase_ece"]["ratio"])  # 0 / 0
    assert np.isnan(best["purchase_auc"]["ratio"]) and np.isnan(best["purchase_auc"]["model"])
    # ties go to the baseline listed first
    tie = best_baselines(
        {"category_accuracy": 0.5}, {"x": {"category_accuracy": 0.4}, "y": {"category_accuracy": 0.4}}
    )
    assert tie["category_accuracy"]["name"] == "x"


def test_aggregate_reports_mean_std_n_of_every_numeric_leaf():
    def rep(mrr, auc, funnel_auc):
        model = {"category_mrr@20": mrr, "purchase_auc": auc}
        baselines = {"markov": {"category_mrr@20": 0.2}, "funnel": {"purchase_auc": funnel_auc}}
        return {
            "model": model,
            "baselines": baselines,
            "best_baseline": best_baselines(model, baselines),
            "n_users": 7,
        }

    agg = aggregate_reports([rep(0.1, 0.6, 0.5), rep(0.3, float("nan"), 0.7), rep(0.2, 0.8, 0.6)])
    assert agg["n_reports"] == 3
    assert agg["model"]["category_mrr@20"] == {"mean": pytest.approx(0.2), "std": pytest.approx(0.1), "n": 3}
    assert agg["model"]["purchase_auc"]["n"] == 2  # the NaN is left out
    assert agg["model"]["purchase_auc"]["mean"] == pytest.approx(0.7)
    assert agg["baselines"]["markov"]["category_mrr@20"] == {
        "mean": pytest.approx(0.2),
        "std": pytest.approx(0.0),
        "n": 3,
    }
    assert agg["baselines"]["funnel"]["purchase_auc"]["std"] == pytest.approx(0.1)
    ratio = agg["best_baseline"]["category_mrr@20"]["ratio"]
    assert ratio["mean"] == pytest.approx(np.mean([0.5, 1.5, 1.0])) and ratio["n"] == 3
    assert agg["best_baseline"]["purchase_auc"]["ratio"]["n"] == 2
    assert set(agg) == {"n_reports", "model", "baselines", "best_baseline"}  # only the three sections


def test_aggregate_reports_of_one_report_and_without_best_baseline():
    agg = aggregate_reports([{"model": {"purchase_ece": 0.02}, "baselines": {"f": {"purchase_ece": 0.04}}}])
    assert agg["model"]["purchase_ece"]["mean"] == 0.02 and np.isnan(agg["model"]["purchase_ece"]["std"])
    assert agg["best_baseline"]["purchase_ece"]["ratio"]["mean"] == pytest.approx(2.0)
    assert aggregate_reports([]) == {"n_reports": 0}


def test_format_table_shows_the_best_baseline_and_the_ratio():
    model = {"category_mrr@20": 0.3, "purchase_logloss": 0.5}
    baselines = {"markov": {"category_mrr@20": 0.2}, "funnel_cart": {"purchase_logloss": 0.4}}
    lines = format_table({"model": model, "baselines": baselines}).splitlines()
    rows = {ln.split()[0]: ln.split() for ln in lines[1:]}
    # a report without intervals (written before them, or --bootstrap 0) shows '-' for them
    assert rows["category_mrr@20"] == [
        "category_mrr@20",
        "0.3000",
        "0.2000",
        "-",
        "markov",
        "1.5000",
        "-",
        "-",
    ]
    assert rows["purchase_logloss"] == [
        "purchase_logloss",
        "0.5000",
        "-",
        "0.4000",
        "funnel_cart",
        "0.8000",
        "-",
        "-",
    ]
    assert rows["purchase_auc"][-4:] == ["-", "-", "-", "-"]


def test_a_log_without_events_before_the_test_start_is_refused(trained, caplog):
    """A later month's file evaluated with the stored split would fit every baseline on nothing."""
    ck, log, split = trained
    later = log.take(np.flatnonzero(log.ts >= split.valid_end))
    with pytest.raises(DataError, match="no event of this log is before the test start"):
        evaluate(ck, later, split)
    # fewer events than the model saw (another shop's log, say) is allowed, and said
    part = log.take(np.flatnonzero(log.ts >= split.train_end))  # validation and test rows only
    with caplog.at_level("WARNING"):
        rep = evaluate(ck, part, split, bootstrap=0)
    assert rep["baseline_fit_events"] < rep["model_train_events"]
    assert "the comparison favours the model" in caplog.text
    assert "ratio_ci" not in rep["best_baseline"]["category_mrr@20"]  # --bootstrap 0: no intervals
    assert verdict_summary(rep) == ""


def test_the_seeds_of_a_recipe_are_one_load_one_scoring_of_the_baselines_and_one_report(
    tmp_path, monkeypatch, capsys
):
    """`evaluate --model a --model b`: what each model would report alone, the baselines scored once on
    one load of the log, and the issue's mean and spread of every metric and ratio (docs/ARCHITECTURE.md
    §Evaluation)."""
    from demandstream.model.data import loaders
    from demandstream.model.evaluation import evaluate as evaluate_mod
    from demandstream.stream import cli

    data = tmp_path / "d.jsonl"
    write_jsonl(generate(40, 1200, seed=2), data)
    models = [tmp_path / f"s{s}.pt" for s in (0, 1)]
    for s, m in enumerate(models):
        run_training(str(data), "jsonl", m, seed=s, **TINY_RUN)
    alone = [run_evaluation(m, str(data), "jsonl", tmp_path / f"alone{i}.json") for i, m in enumerate(models)]
    assert alone[0]["model"] != alone[1]["model"]  # two seeds, two models

    calls = {"load": 0, "baselines": 0}

    def counted(name, fn):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(loaders, "load_log", counted("load", loaders.load_log))
    monkeypatch.setattr(evaluate_mod, "_score_baselines", counted("baselines", evaluate_mod._score_baselines))
    argv = [
        "evaluate",
        "--data",
        str(data),
        "--report",
        str(tmp_path / "both.json"),
        "--plots",
        str(tmp_path / "p"),
    ]
    assert cli.main([*argv, "--model", str(models[0]), "--model", str(models[1])]) == 0
    assert calls == {"load": 1, "baselines": 1}
    rep = json.loads((tmp_path / "both.json").read_text())

    assert rep["n_models"] == 2 and rep["models"] == [str(m) for m in models]

    def same(a, b):  # NaN-aware: the tiny log's windows leave some metrics undefined
        return json.dumps(a, sort_keys=True, default=float) == json.dumps(b, sort_keys=True, default=float)

    for own, lone in zip(rep["reports"], alone, strict=True):
        for key in ("model", "best_baseline", "train_metrics", "prequential", "baselines", "split"):
            assert same(own[key], lone[key]), key
    assert same(rep["baselines"], alone[0]["baselines"]) and rep["split"] == alone[0]["split"]
    assert rep["model_versions"] == [a["model_version"] for a in alone]
    for key in METHOD_KEYS:
        values = [a["model"][key] for a in alone]
        assert rep["model"][key] == pytest.approx(np.mean(values), nan_ok=True)
        assert rep["model_std"][key] == pytest.approx(np.std(values, ddof=1), nan_ok=True)
    assert rep["best_baseline"].keys() == alone[0]["best_baseline"].keys()
    for key in rep["best_baseline"]:
        best, per = rep["best_baseline"][key], [a["best_baseline"][key] for a in alone]
        assert best["name"] == per[0]["name"] and best["value"] == per[0]["value"]
        assert best["ratios"] == [p["ratio"] for p in per]
        assert best["ratio"] == pytest.approx(np.mean(best["ratios"]))
        assert sum(best["verdicts"].values()) == 2
        verdicts = {p["verdict"] for p in per}
        assert best["verdict"] == (verdicts.pop() if len(verdicts) == 1 else "mixed")
        lo, hi = best["ratio_ci_range"]
        assert lo == min(p["ratio_ci"][0] for p in per) and hi == max(p["ratio_ci"][1] for p in per)
    # each model's plots in a folder of its own
    assert {p.name for p in (tmp_path / "p").iterdir()} == {"model0-s0", "model1-s1"}

    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("2 models; points: category ")
    assert out[1].startswith("| metric | model (mean ± sd) | best baseline |")
    rows = [ln for ln in out if ln.startswith("| category_") or ln.startswith("| purchase_")]
    assert len(rows) == len(METHOD_KEYS)
    assert sum(ln.startswith(f"{m}: the model as trained: ") for ln in out for m in models) == 2

    # a glob (quoted, or expanded by the shell into one --model's list) names the same models in order
    assert (
        cli.main([*argv[:-2], "--model", str(tmp_path / "s*.pt"), "--report", str(tmp_path / "glob.json")])
        == 0
    )
    globbed = json.loads((tmp_path / "glob.json").read_text())
    assert globbed["models"] == rep["models"]
    assert all(same(globbed[k], rep[k]) for k in ("model", "model_std", "best_baseline", "baselines"))


def test_seeds_trained_for_different_splits_are_refused_unless_one_split_is_given(tmp_path):
    data = tmp_path / "d.jsonl"
    events = list(generate(40, 1200, seed=2))
    write_jsonl(events, data)
    t0, t1 = min(e.ts for e in events), max(e.ts for e in events)
    bounds = [(t0 + 0.7 * (t1 - t0), t0 + 0.8 * (t1 - t0)), (t0 + 0.6 * (t1 - t0), t0 + 0.8 * (t1 - t0))]
    models = [tmp_path / f"m{i}.pt" for i in range(2)]
    for (te, ve), m in zip(bounds, models, strict=True):
        run_training(str(data), "jsonl", m, train_end=te, valid_end=ve, **TINY_RUN)
    with pytest.raises(
        OptionError, match=r"m1\.pt was trained for the split T1=.*give --train-end/--valid-end"
    ):
        run_evaluation(models, str(data), "jsonl", tmp_path / "r.json")
    assert not (tmp_path / "r.json").exists()
    te, ve = bounds[0]
    rep = run_evaluation(models, str(data), "jsonl", tmp_path / "r.json", train_end=te, valid_end=ve)
    assert rep["n_models"] == 2 and rep["split"]["valid_end"] == ve


def test_combined_verdicts_leave_an_undefined_interval_out_of_the_range():
    from demandstream.model.evaluation.evaluate import combine_reports, format_models_table

    def rep(auc, ci, verdict):
        best = {
            "name": "f",
            "value": 0.5,
            "model": auc,
            "ratio": auc / 0.5,
            "ratio_ci": ci,
            "verdict": verdict,
        }
        return {
            "model": {"purchase_auc": auc},
            "baselines": {"f": {"purchase_auc": 0.5}},
            "best_baseline": {"purchase_auc": best},
            "n_category_points": 0,
            "n_purchase_points": 9,
            "purchase_positive_rate": 0.3,
        }

    out = combine_reports(
        [
            rep(0.6, [1.1, 1.3], "better"),
            rep(0.55, [float("nan"), 1.2], "inconclusive"),
            rep(0.6, [1.0, 1.4], "better"),
        ],
        ["a", "b", "c"],
    )
    b = out["best_baseline"]["purchase_auc"]
    assert b["ratio_ci_range"] == [1.0, 1.4] and b["verdicts"] == {"better": 2, "inconclusive": 1}
    assert b["verdict"] == "mixed" and verdict_summary(out).endswith("(f: better 2, inconclusive 1)")
    assert format_models_table(out).splitlines()[-1].endswith("| better 2, inconclusive 1 (1.000–1.400) |")
    with pytest.raises(ValueError, match="b was not evaluated on the same points as a"):
        other = rep(0.6, [1.1, 1.3], "better")
        other["baselines"] = {"f": {"purchase_auc": 0.4}}
        combine_reports([rep(0.6, [1.1, 1.3], "better"), other], ["a", "b"])
