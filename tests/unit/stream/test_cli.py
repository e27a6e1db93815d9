"""The command line's contract: a user's mistake is one line and exit 2, a bug keeps its traceback."""

from __future__ import annotations

import subprocess
import sys

import pytest

from demandstream.model.errors import DemandstreamError, OptionError, UserError
from demandstream.stream import cli


def test_a_user_error_is_one_line_on_stderr_and_exit_2(monkeypatch, capsys, tmp_path):
    def bad_option(a, settings):
        raise OptionError("unknown device 'tpu':\n  use auto, cpu or cuda")

    monkeypatch.setattr(cli, "cmd_generate", bad_option)
    assert cli.main(["generate", "--out", str(tmp_path / "x.jsonl")]) == cli.EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert err == "demandstream generate: error: unknown device 'tpu': use auto, cpu or cuda\n"


@pytest.mark.parametrize(
    ("argv", "env", "says"),
    [
        (["train", "--data", "{tmp}/missing.jsonl", "--out", "{tmp}/m.pt"], {}, "data file not found"),
        (["tail"], {"DEMANDSTREAM_GUARANTEE": "maybe"}, "DEMANDSTREAM_GUARANTEE"),
        (
            ["evaluate", "--model", "{tmp}/none.pt", "--data", "{tmp}/d.jsonl", "--report", "{tmp}/r.json"],
            {},
            "model checkpoint not found",
        ),
    ],
)
def test_the_library_s_user_errors_reach_the_user_as_one_line(monkeypatch, capsys, tmp_path, argv, env, says):
    (tmp_path / "d.jsonl").write_text("")
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert cli.main([a.format(tmp=tmp_path) for a in argv]) == cli.EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and says in err


def test_the_user_errors_are_one_family_that_old_callers_still_catch():
    from demandstream.model.core.checkpoint import CheckpointError
    from demandstream.model.core.scoring import resolve_device
    from demandstream.model.data.split import parse_time
    from demandstream.model.training.train import run_training
    from demandstream.stream.admin import KafkaUnavailable
    from demandstream.stream.settings import SettingsError
    from demandstream.stream.worker.faust_patches import UnsupportedFaustVersion

    for cls in (CheckpointError, SettingsError, KafkaUnavailable, UnsupportedFaustVersion, OptionError):
        assert issubclass(cls, UserError) and issubclass(cls, DemandstreamError)
    for call in (
        lambda: parse_time("yesterday"),
        lambda: resolve_device("tpu"),
        lambda: run_training([], "jsonl", "m.pt", no_such_option=1),
    ):
        with pytest.raises(ValueError) as e:
            call()
        assert isinstance(e.value, UserError)


def test_a_plain_value_error_from_inside_is_a_bug_and_keeps_its_traceback(monkeypatch, tmp_path):
    def bug(a, settings):
        return int("not a number")  # a ValueError the user did not cause

    monkeypatch.setattr(cli, "cmd_generate", bug)
    with pytest.raises(ValueError, match="invalid literal"):
        cli.main(["generate", "--out", str(tmp_path / "x.jsonl")])


def test_the_bug_s_traceback_reaches_the_terminal_with_a_non_2_exit(tmp_path):
    code = (
        "import sys\n"
        "from stream import cli\n"
        "cli.cmd_generate = lambda a, s: int('not a number')\n"
        f"sys.exit(cli.main(['generate', '--out', {str(tmp_path / 'x.jsonl')!r}]))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode not in (0, cli.EXIT_USER_ERROR)
    assert "Traceback (most recent call last)" in r.stderr and "ValueError: invalid literal" in r.stderr


@pytest.mark.parametrize(
    ("argv", "broker", "log_level"),
    [
        (["tail", "--broker", "kafka://b1:9092"], "kafka://b1:9092", None),
        (["--broker", "kafka://b1:9092", "tail"], "kafka://b1:9092", None),
        (["--log-level", "debug", "tail", "--broker", "kafka://b2:9092"], "kafka://b2:9092", "debug"),
        (
            ["--broker", "kafka://b1:9092", "replay", "--data", "x", "--broker", "kafka://b2:9092"],
            "kafka://b2:9092",
            None,
        ),
        (["worker", "--log-level", "warning", "--model", "m.pt"], None, "warning"),
        (["tail"], None, None),
    ],
)
def test_global_options_are_accepted_before_and_after_the_command(argv, broker, log_level):
    args = cli.build_parser().parse_args(argv)
    assert (args.broker, args.log_level) == (broker, log_level)


def test_a_broker_given_after_the_command_reaches_the_settings(monkeypatch):
    seen = {}
    monkeypatch.setattr(cli, "cmd_tail", lambda a, settings: seen.update(broker=settings.broker) or 0)
    assert cli.main(["tail", "--broker", "kafka://elsewhere:9093", "--max", "1"]) == 0
    assert seen["broker"] == "kafka://elsewhere:9093"


def test_generate_builds_a_shop_of_many_categories_and_refuses_an_empty_catalog(tmp_path, capsys):
    """`--departments/--leaves` size the generated catalog (scale tests of a shop's 10,000 categories)."""
    import json

    out = tmp_path / "big.jsonl"
    assert cli.main(["generate", "--users", "300", "--events", "6000", "--departments", "30", "--leaves", "40",
                     "--out", str(out)]) == 0  # fmt: skip
    cats = {json.loads(line).get("category") for line in out.read_text().splitlines()} - {None}
    assert 167 < len(cats) <= 30 * 40 and all(c.count(".") == 1 for c in cats)
    with pytest.raises(SystemExit) as exc:
        cli.main(["generate", "--departments", "0", "--out", str(out)])
    assert exc.value.code == 2
    assert "--departments: expected a whole number >= 1, got '0'" in capsys.readouterr().err


def test_evaluate_bootstrap_takes_a_count_and_refuses_a_negative_one(capsys):
    args = cli.build_parser().parse_args(
        ["evaluate", "--data", "x", "--report", "r.json", "--bootstrap", "0"]
    )
    assert args.bootstrap == 0
    with pytest.raises(SystemExit) as exc:
        cli.main(["evaluate", "--data", "x", "--report", "r.json", "--bootstrap", "-5"])
    assert exc.value.code == 2
    assert "--bootstrap: expected a whole number >= 0, got '-5'" in capsys.readouterr().err


def test_evaluate_takes_several_models_in_one_or_many_flags_and_says_when_a_glob_matches_none(
    capsys, tmp_path
):
    args = cli.build_parser().parse_args(
        ["evaluate", "--data", "x", "--report", "r.json", "--model", "a.pt", "b.pt", "--model", "c.pt"]
    )
    assert args.models == ["a.pt", "b.pt", "c.pt"]
    (tmp_path / "d.jsonl").write_text("")
    argv = ["evaluate", "--data", str(tmp_path / "d.jsonl"), "--report", str(tmp_path / "r.json")]
    assert cli.main([*argv, "--model", str(tmp_path / "seed*.pt")]) == cli.EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"no model checkpoint matches {tmp_path / 'seed*.pt'}" in err


def test_topics_print_gives_the_commands_of_every_topic_and_contacts_no_broker(capsys):
    """Operators who keep topics as code get what `demandstream topics` would create, with the
    changelog's configs, without a broker (this one does not exist)."""
    code = cli.main(
        ["--broker", "kafka://127.0.0.1:1", "topics", "--print", "--app-id", "acme", "--partitions", "6"]
    )
    lines = capsys.readouterr().out.splitlines()
    assert code == 0 and len(lines) == 5
    assert all(
        line.startswith("kafka-topics.sh --bootstrap-server 127.0.0.1:1 --create --topic ") for line in lines
    )
    assert all(" --partitions 6" in line for line in lines)
    assert lines[-1].endswith(
        "--topic acme-user-state-changelog --partitions 6 --config cleanup.policy=compact "
        "--config max.compaction.lag.ms=86400000"
    )
