"""CLI flags of ``demandstream train`` and the names the ``/users/{id}/demand`` view shows."""

from __future__ import annotations

import pytest

from demandstream.model.core.events import Event
from demandstream.model.core.features import category_hash
from demandstream.model.core.state import pack, unpack
from demandstream.model.data.loaders import AUTO
from demandstream.model.data.loaders import FORMATS as LOADER_FORMATS
from demandstream.stream import cli
from demandstream.stream.worker.web import demand_view, recent_category_names
from tests.unit.stream.scorers import tiny_scorer


def test_cli_accepts_every_loader_format_and_tells_it_by_default():
    assert set(cli.FORMATS) == {AUTO, *LOADER_FORMATS}
    args = cli.build_parser().parse_args(["train", "--data", "x.csv", "--format", "taobao", "--out", "m.pt"])
    assert args.format == "taobao"
    for command in (["train", "--out", "m.pt"], ["evaluate", "--report", "r.json"], ["replay"]):
        assert cli.build_parser().parse_args([*command, "--data", "x.csv"]).format == AUTO


@pytest.mark.parametrize(
    ("flags", "refit", "seed", "sample"),
    [([], True, 0, 1.0), (["--no-refit", "--seed", "7", "--sample-users", "0.25"], False, 7, 0.25)],
)
def test_train_flags_reach_run_training(monkeypatch, tmp_path, flags, refit, seed, sample):
    data = tmp_path / "d.jsonl"
    data.write_text("")
    seen = {}

    def fake_run_training(data, fmt, out, **kw):
        seen.update(kw, fmt=fmt)
        return {"model_version": "0a1b2c3d", "epochs_run": 1}

    monkeypatch.setattr("demandstream.model.training.train.run_training", fake_run_training)
    assert cli.main(["train", "--data", str(data), "--out", str(tmp_path / "m.pt"), *flags]) == 0
    assert seen["refit"] is refit and seen["seed"] == seed and seen["fmt"] == AUTO
    assert seen["user_sample"] == sample


def test_evaluate_takes_a_user_sample_and_refuses_one_outside_0_1(capsys):
    parse = cli.build_parser().parse_args
    assert parse(["evaluate", "--data", "x", "--report", "r.json"]).user_sample == 1.0
    assert (
        parse(["evaluate", "--data", "x", "--report", "r.json", "--sample-users", "0.1"]).user_sample == 0.1
    )
    for bad in ("0", "1.5", "nan", "a tenth"):
        with pytest.raises(SystemExit) as exc:
            cli.main(["evaluate", "--data", "x", "--report", "r.json", "--sample-users", bad])
        assert exc.value.code == 2
        assert f"--sample-users: expected a fraction in (0, 1], got {bad!r}" in capsys.readouterr().err


def test_demand_view_names_vocabulary_and_out_of_vocabulary_categories():
    scorer = tiny_scorer()
    s = scorer.new_state()
    for k, cat in enumerate(["shoes", "garden-gnomes", "garden-gnomes", "bags"]):
        scorer.step([Event(f"e{k}", "u1", 1.7e9 + k, "view", f"i{k}", cat, 3.0)], [s])
    s = unpack(pack(s))  # what the view reads: the stored record
    view = demand_view(scorer, s)
    assert [t["category"] for t in view["top_categories"]] == ["bags", "garden-gnomes"]  # top_k = 2 here
    assert view["recent_categories"] == ["bags", "garden-gnomes", "shoes"]
    assert 0.0 < view["purchase_propensity"] < 1.0
    # a worker that never saw an out-of-vocabulary name still answers, with the hash
    fresh = tiny_scorer()
    assert recent_category_names(fresh, s) == ["bags", f"#{category_hash('garden-gnomes'):08x}", "shoes"]
    assert recent_category_names(fresh, fresh.new_state()) == []
