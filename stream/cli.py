"""``demandstream`` command line (docs/ARCHITECTURE.md §CLI). Also ``python -m stream``.

User mistakes (a missing file, an unreachable broker, a bad setting, a corrupt checkpoint: every
:class:`~demandstream.model.errors.UserError`) end with one line on stderr and exit status 2; every other exception
is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from demandstream.model.data.sampling import check_fraction  # stdlib only: the parser stays quick
from demandstream.model.errors import UserError
from demandstream.stream.settings import Settings

logger = logging.getLogger("demandstream")

FORMATS = (
    "auto",
    "jsonl",
    "rees46",
    "retailrocket",
    "taobao",
)  # demandstream.model.data.loaders.AUTO and FORMATS (not imported: startup cost)
EXIT_USER_ERROR = 2


# -- commands -----------------------------------------------------------------------------------


def cmd_generate(a, settings: Settings) -> int:
    from demandstream.model.data.synth import SynthConfig, generate, write_jsonl

    t0 = time.perf_counter()
    config = SynthConfig(n_departments=a.departments, leaves_per_department=a.leaves)
    n = write_jsonl(generate(a.users, a.events, seed=a.seed, config=config), a.out)
    print(f"wrote {n} events for {a.users} users to {a.out} in {time.perf_counter() - t0:.1f} s")
    return 0


def cmd_train(a, settings: Settings) -> int:
    from demandstream.model.training.train import run_training

    summary = run_training(
        a.data,
        a.format,
        a.out,
        epochs=a.epochs,
        device=a.device or settings.device,
        train_end=a.train_end,
        valid_end=a.valid_end,
        seed=a.seed,
        refit=a.refit,
        progress=not a.quiet,
        user_sample=a.user_sample,
    )
    print(_summary_line("trained", summary))
    return 0


def cmd_evaluate(a, settings: Settings) -> int:
    from demandstream.model.evaluation.evaluate import (
        format_models_table,
        format_table,
        heads_summary,
        run_evaluation,
        settings_summary,
        verdict_summary,
    )

    # a missing checkpoint is the loader's to report (one line, as for a single --model)
    models = _globbed(a.models, "model checkpoint") if a.models else [settings.model]
    report = run_evaluation(
        models,
        a.data,
        a.format,
        a.report,
        plots=a.plots,
        train_end=a.train_end,
        valid_end=a.valid_end,
        bootstrap=a.bootstrap,
        user_sample=a.user_sample,
    )
    several = len(models) > 1
    print(format_models_table(report) if several else format_table(report))
    if report["user_sample"] < 1.0:
        print(f"on a stable sample of {report['user_sample']:g} of the users (--sample-users)")
    lines = [verdict_summary(report), settings_summary(report)]
    for m, r in zip(models, report["reports"] if several else [report], strict=True):
        heads = heads_summary(r)
        lines.append(f"{m}: {heads}" if several and heads else heads)
    for line in lines:
        if line:
            print(line)
    print(f"report written to {a.report}")
    return 0


def cmd_score(a, settings: Settings) -> int:
    from demandstream.stream.tools.score import score_file

    n = score_file(
        a.model or settings.model,
        a.data,
        a.format,
        a.out,
        device=a.device or settings.device,
        top_k=settings.top_k,
        pseudonym_key=settings.pseudonym_key,
        why_top=settings.why_top,
    )
    print(f"wrote {n} signals to {a.out}")
    return 0


def cmd_worker(a, settings: Settings) -> int:
    if settings.processes > 1:
        from demandstream.stream.worker.processes import run_processes

        return run_processes(settings)
    from demandstream.stream.worker.run import run_worker

    return run_worker(settings)


def cmd_topics(a, settings: Settings) -> int:
    from demandstream.stream.admin import kafka_topics_commands, worker_topics

    if a.print:
        print("\n".join(kafka_topics_commands(settings)))
        return 0
    created, existing = worker_topics(settings)
    for what, names in (("created", created), ("already there", existing)):
        if names:
            print(f"{what}: {', '.join(names)}")
    print(
        f"every topic a worker of app id {settings.app_id} needs exists, with {settings.partitions} "
        "partitions: its own principal needs READ, WRITE and DESCRIBE on them, not CREATE "
        "(docs/OPERATIONS.md §ACLs)"
    )
    return 0


def cmd_replay(a, settings: Settings) -> int:
    from demandstream.stream.tools.replay import replay

    stats = replay(
        settings, _paths(a.data), a.format, rate=a.rate, topic=a.topic, progress=not a.quiet, limit=a.limit
    )
    print(
        f"sent {stats.sent} records to {a.topic or settings.topic_input} in {stats.seconds:.1f} s "
        f"({stats.rate:,.0f}/s)"
    )
    return 0


def cmd_tail(a, settings: Settings) -> int:
    from demandstream.stream.tools.tail import tail

    tail(
        settings,
        a.topic,
        from_beginning=a.from_beginning,
        max_records=a.max,
        timeout_s=a.timeout,
        raw=a.raw,
        why=a.why,
    )
    return 0


def cmd_forget(a, settings: Settings) -> int:
    from demandstream.stream.tools.forget import forget

    partition = forget(settings, a.user_id, wait_s=a.wait_s)
    print(
        f"erasure of user {a.user_id!r} requested on {settings.topic_control} partition {partition} (the "
        f"{settings.partitioner} partitioner's, DEMANDSTREAM_PARTITIONER); the owning worker deletes its state "
        "and tombstones the changelog"
    )
    return 0


def cmd_migrate(a, settings: Settings) -> int:
    from demandstream.stream.tools.migrate import format_report, migrate

    report = migrate(
        settings,
        a.model,
        a.to_app_id,
        dry_run=a.dry_run,
        force=a.force,
        accept_lost_erasures=a.accept_lost_erasures,
        progress=not a.quiet,
        **({} if a.max_lag is None else {"max_lag": a.max_lag}),
    )
    if a.report:
        Path(a.report).write_bytes(json.dumps(report.as_dict(), indent=2).encode() + b"\n")
    print(format_report(report, settings.data_dir))
    return 0


def cmd_bench(a, settings: Settings) -> int:
    """Run the bench; it always writes what it measured, and exits 1 (one line per failed part on
    stderr) if any part failed, so a script or CI sees a partial run."""
    from demandstream.stream.bench.runner import EXIT_PARTS_FAILED, run_bench

    result = run_bench(settings, out=a.out, quick=a.quick, markdown=a.markdown)
    for f in result["failed"]:
        print(f"demandstream bench: {f['part']} failed: {f['error']}", file=sys.stderr)
    return EXIT_PARTS_FAILED if result["failed"] else 0


def cmd_export(a, settings: Settings) -> int:
    from demandstream.model.training.export import export

    paths = export(a.model or settings.model, a.out)
    for kind, p in paths.items():
        print(f"{kind}: {p}")
    return 0


# -- parser ---------------------------------------------------------------------------------------


def _whole_number_at_least(low: int):
    """argparse type: an integer >= ``low`` (argparse turns the error into one line and exit 2)."""

    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            v = low - 1
        if v < low:
            raise argparse.ArgumentTypeError(f"expected a whole number >= {low}, got {text!r}")
        return v

    return parse


_positive_int = _whole_number_at_least(1)
_non_negative_int = _whole_number_at_least(0)


def _fraction(text: str) -> float:
    """argparse type: a user-sample fraction, by the loader's own rule (argparse turns the error into one
    line and exit 2)."""
    try:
        return check_fraction(float(text))
    except ValueError:  # not a number, or check_fraction's OptionError (a ValueError)
        raise argparse.ArgumentTypeError(f"expected a fraction in (0, 1], got {text!r}") from None


def _globbed(values: Sequence[str], what: str) -> list[str]:
    """Each value as given, a glob standing for its matches in name order; a glob that matches nothing
    is a user error naming ``what``."""
    import glob

    out: list[str] = []
    for v in values:
        matches = sorted(glob.glob(v)) if any(ch in v for ch in "*?[") else [v]
        if not matches:
            raise UserError(f"no {what} matches {v}")
        out += matches
    return out


def _paths(values: Sequence[str]) -> list[Path]:
    out: list[Path] = []
    for m in _globbed(values, "file"):
        p = Path(m)
        if not p.is_file():
            raise UserError(f"data file not found: {p}")
        out.append(p)
    return out


def _summary_line(verb: str, d: dict) -> str:
    keys = [
        k
        for k in (
            "out",
            "model_version",
            "n_train_events",
            "epochs_run",
            "best_epoch",
            "best_valid_mrr@20",
            "history_window",
            "history_mixture",
            "train_events_per_s",
            "purchase_head",
            "purchase_calibration",
            "valid_loss",
        )
        if k in d
    ]
    if d.get("user_sample", 1.0) < 1.0:  # only when asked for: a sample must never pass unnoticed
        keys.append("user_sample")
    return f"{verb}: " + ", ".join(
        f"{k}={d[k]:.4g}" if isinstance(d[k], float) else f"{k}={d[k]}" for k in keys
    )


def _global_options(after_command: bool) -> argparse.ArgumentParser:
    """The options every command takes, before or after its name (``demandstream tail --broker ...``).

    Given after the command, they are only set when present (``SUPPRESS``), so they never reset a value
    given before it; given both ways, the one after the command wins.
    """
    g = argparse.ArgumentParser(add_help=False)
    default = argparse.SUPPRESS if after_command else None
    g.add_argument(
        "--broker", default=default, help="Kafka bootstrap, e.g. kafka://127.0.0.1:9092 (DEMANDSTREAM_BROKER)"
    )
    g.add_argument("--log-level", default=default, help="debug, info, warning (DEMANDSTREAM_LOG_LEVEL)")
    return g


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="demandstream",
        description="Real-time customer demand from clickstreams.",
        parents=[_global_options(after_command=False)],
    )
    sub = p.add_subparsers(dest="command", required=True)
    after = _global_options(after_command=True)

    def command(name: str, help: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help, parents=[after])

    def data_args(sp, model=False):
        sp.add_argument("--data", action="append", required=True, help="file or glob; repeatable; .gz ok")
        sp.add_argument(
            "--format",
            choices=FORMATS,
            default="auto",
            help="the files' format (default: told by each file's first line)",
        )
        if model:
            sp.add_argument("--model", help="checkpoint path (DEMANDSTREAM_MODEL)")

    def split_args(sp):
        sp.add_argument("--train-end", help="T1: ISO-8601 date or unix seconds")
        sp.add_argument("--valid-end", help="T2: ISO-8601 date or unix seconds")
        sp.add_argument(
            "--sample-users",
            dest="user_sample",
            type=_fraction,
            default=1.0,
            metavar="FRACTION",
            help="keep this stable fraction of the users, every event of each (default 1: all); "
            "for logs too large to train or evaluate whole in memory",
        )

    sp = command("generate", help="write a synthetic clickstream (JSONL)")
    sp.add_argument("--users", type=int, default=1000)
    sp.add_argument("--events", type=int, default=20000)
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument(
        "--departments",
        type=_positive_int,
        help="catalog departments (default: the 12 hand-named ones); with --leaves, a shop of many categories",
    )
    sp.add_argument(
        "--leaves",
        type=_positive_int,
        help="leaf categories per department (default: the hand-named 12-16; 167 categories in all)",
    )
    sp.add_argument("--out", required=True)
    sp.set_defaults(func=cmd_generate)

    sp = command("train", help="train a model on a log")
    data_args(sp)
    sp.add_argument("--out", required=True)
    sp.add_argument("--epochs", type=int, help="upper bound; validation chooses how many are kept")
    sp.add_argument("--device")
    sp.add_argument("--seed", type=int, default=0, help="seeds weights, user order and the hold-out sample")
    sp.add_argument(
        "--no-refit",
        dest="refit",
        action="store_false",
        help="keep the model chosen on validation instead of retraining on train + validation",
    )
    sp.add_argument("--quiet", action="store_true", help="no progress bars or per-epoch lines")
    split_args(sp)
    sp.set_defaults(func=cmd_train)

    sp = command("evaluate", help="evaluate a model against baselines on a temporal split")
    data_args(sp)
    sp.add_argument(
        "--model",
        dest="models",
        action="extend",
        nargs="+",
        metavar="MODEL",
        help="checkpoint path or glob (DEMANDSTREAM_MODEL); several (the seeds of one recipe: "
        "--model cos0.pt cos1.pt cos2.pt, or cos*.pt) are evaluated on one load and the same points, "
        "in a report of their mean and spread",
    )
    sp.add_argument("--report", required=True)
    sp.add_argument("--plots")
    # numpy and the metrics only, no torch: the parser stays quick to build
    from demandstream.model.evaluation.uncertainty import BOOTSTRAP_RESAMPLES

    sp.add_argument(
        "--bootstrap",
        type=_non_negative_int,
        default=BOOTSTRAP_RESAMPLES,
        help=f"user-bootstrap resamples of each model/best-baseline ratio's 95%% interval (default {BOOTSTRAP_RESAMPLES}; 0: none)",
    )
    split_args(sp)
    sp.set_defaults(func=cmd_evaluate)

    sp = command("score", help="offline signals for every event of a file (same schema as the topic)")
    data_args(sp, model=True)
    sp.add_argument("--out", required=True)
    sp.add_argument("--device")
    sp.set_defaults(func=cmd_score)

    sp = command("worker", help="run a stream worker")
    sp.add_argument("--model", help="checkpoint path (DEMANDSTREAM_MODEL)")
    sp.add_argument("--app-id")
    sp.add_argument("--data-dir")
    sp.add_argument("--web-port", type=int)
    sp.add_argument("--web-host")
    sp.add_argument("--guarantee", choices=("at_least_once", "exactly_once"))
    sp.add_argument("--device")
    sp.add_argument("--store", choices=("rocksdb", "memory"))
    sp.add_argument(
        "--processes",
        type=int,
        help="worker processes on this machine, one core each; each gets DATA_DIR/worker-i and "
        "WEB_PORT+i (DEMANDSTREAM_PROCESSES)",
    )
    sp.add_argument("--partitions", type=int)
    sp.add_argument("--batch-max", type=int)
    sp.set_defaults(func=cmd_worker)

    sp = command(
        "topics",
        help="create every topic a worker needs, its changelog included (run it as a principal that may "
        "create topics, for workers whose principal may not)",
    )
    sp.add_argument("--app-id")
    sp.add_argument("--partitions", type=int)
    sp.add_argument(
        "--print",
        action="store_true",
        help="print the kafka-topics.sh commands that create them instead (topics as code); contacts nothing",
    )
    sp.set_defaults(func=cmd_topics)

    sp = command("replay", help="send a log file to the input topic")
    data_args(sp)
    sp.add_argument("--rate", type=float, help="events per second (default: as fast as possible)")
    sp.add_argument("--topic")
    sp.add_argument("--limit", type=int)
    sp.add_argument("--quiet", action="store_true")
    sp.set_defaults(func=cmd_replay)

    sp = command("tail", help="follow the signal topic")
    sp.add_argument("--topic")
    sp.add_argument("--from-beginning", action="store_true")
    sp.add_argument("--max", type=int)
    sp.add_argument("--timeout", type=float)
    sp.add_argument("--raw", action="store_true")
    sp.add_argument(
        "--why",
        action="store_true",
        help="show each top category's reasons (workers run with DEMANDSTREAM_WHY_TOP)",
    )
    sp.set_defaults(func=cmd_tail)

    sp = command("forget", help="erase a user's state (right to erasure)")
    sp.add_argument("user_id")
    sp.add_argument(
        "--wait-s",
        type=float,
        default=60.0,
        help="how long to wait for the workers to consume the user's earlier events before sending (default 60)",
    )
    sp.set_defaults(func=cmd_forget)

    sp = command("migrate", help="rebuild users' states with a new model into a new app id (blue/green)")
    sp.add_argument("--model", required=True, help="the new checkpoint")
    sp.add_argument("--to-app-id", required=True, help="the green workers' app id (a new table)")
    sp.add_argument("--app-id", help="the running (blue) workers' app id (DEMANDSTREAM_APP_ID)")
    sp.add_argument("--device")
    sp.add_argument("--dry-run", action="store_true", help="read and compute everything, write nothing")
    sp.add_argument("--force", action="store_true", help="delete the target app id's table and offsets first")
    sp.add_argument(
        "--accept-lost-erasures",
        action="store_true",
        help="migrate although retention deleted erasure requests that may cover retained events",
    )
    sp.add_argument(
        "--max-lag",
        type=int,
        help="follow until fewer input events than this are left (default 10,000: migrate.MAX_LAG)",
    )
    sp.add_argument("--report", help="also write the report as JSON to this file")
    sp.add_argument("--quiet", action="store_true", help="no progress line")
    sp.set_defaults(func=cmd_migrate)

    sp = command("bench", help="measure throughput and latency; write JSON (and Markdown with --markdown)")
    sp.add_argument("--out", default="bench.json")
    sp.add_argument("--quick", action="store_true")
    sp.add_argument(
        "--markdown",
        default=None,
        help="rewrite the results block of this file (make bench: docs/BENCHMARKS.md); off by default, "
        "so a quick run never overwrites the published figures",
    )
    sp.set_defaults(func=cmd_bench)

    sp = command("export", help="export the one-step model to TorchScript and ONNX")
    sp.add_argument("--model")
    sp.add_argument("--out", required=True)
    sp.set_defaults(func=cmd_export)
    return p


_SETTING_FLAGS = (
    "broker",
    "log_level",
    "model",
    "app_id",
    "data_dir",
    "web_port",
    "web_host",
    "guarantee",
    "device",
    "store",
    "partitions",
    "batch_max",
    "processes",
)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        overrides = {k: getattr(args, k, None) for k in _SETTING_FLAGS}
        if args.command not in ("worker", "evaluate", "score", "export"):
            overrides.pop("model", None)
        if args.command in ("train", "score"):
            overrides.pop("device", None)  # their --device is the command's own, not the worker's
        settings = Settings.from_env(**overrides)
        logging.basicConfig(
            level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
        )
        # kafka-python narrates every connection and metadata refresh at INFO; keep its warnings only.
        logging.getLogger("kafka").setLevel(max(logging.WARNING, logging.getLogger().level))
        if hasattr(args, "data") and args.command != "replay":
            args.data = [str(p) for p in _paths(args.data)]
        return args.func(args, settings) or 0
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except UserError as exc:
        message = " ".join(str(exc).split())  # one line, whatever the exception carried
        print(f"demandstream {args.command}: error: {message}", file=sys.stderr)
        return EXIT_USER_ERROR


if __name__ == "__main__":
    sys.exit(main())
