"""``make demo``: the whole product once, on this machine, then everything it started is stopped.

1. start the project's Kafka broker on the demo port (unless it already runs there, or
   ``DEMANDSTREAM_BROKER`` names the broker to use), and refuse a port another process holds,
2. generate a synthetic clickstream (and a few broken records, as real producers send),
3. train a small model on it, unless ``DEMANDSTREAM_MODEL`` names one,
4. start a worker, replay the events with a progress bar, show live signals,
5. print a summary (events in, signals out, dead letters, events/s) and stop what it started.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import orjson

from demandstream.model.data.synth import generate, write_jsonl
from demandstream.model.errors import UserError
from demandstream.stream.settings import Settings
from demandstream.stream.worker.launcher import WorkerLauncher

#: The demo's files (data, model, worker state), under the directory it is run from (`make demo`: the checkout).
DEMO_DIR = Path("var") / "demo"
#: Demo size: enough users and events to show batching and a trained model, small enough for a minute.
DEMO_USERS, DEMO_EVENTS, DEMO_BAD = 2_000, 60_000, 100
DEMO_SEED = 2026
READY_TIMEOUT_S = 180
DRAIN_TIMEOUT_S = 300


def say(msg: str) -> None:
    print(f"\033[1mdemo:\033[0m {msg}", flush=True)


def kafka(script: Path, cmd: str, port: int, quiet: bool = False) -> int:
    """Run ``kafka.sh CMD --port PORT``; its exit status (its output hidden with ``quiet``)."""
    return subprocess.run([str(script), cmd, "--port", str(port)], capture_output=quiet).returncode


def port_answers(port: int, host: str = "127.0.0.1") -> bool:
    """Whether something accepts TCP connections on ``host:port`` now."""
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False


def broker_action(broker_given: bool, ours_running: bool, port_taken: bool) -> str:
    """What the demo does for a broker: ``use`` the one it is given (``DEMANDSTREAM_BROKER``) or its own
    already running, ``start`` its own, or ``refuse`` when another process holds the demo's port (a
    shop's own local Kafka, typically: the demo does not add its topics to a broker it was not given).

    >>> broker_action(True, False, True), broker_action(False, True, True)
    ('use', 'use')
    >>> broker_action(False, False, False), broker_action(False, False, True)
    ('start', 'refuse')
    """
    if broker_given or ours_running:
        return "use"
    return "refuse" if port_taken else "start"


def metric(worker: WorkerLauncher, name: str) -> float:
    """Sum of a metric's samples on the worker's /metrics; 0 while the worker does not answer."""
    # The demo polls a worker busy with the replay: a scrape that fails reads as nothing counted yet.
    try:
        return worker.metric(name)
    except (OSError, RuntimeError):
        return 0.0


def main() -> int:
    work = DEMO_DIR.resolve()
    work.mkdir(parents=True, exist_ok=True)
    port = int(os.environ.get("DEMANDSTREAM_DEMO_KAFKA_PORT", "9092"))
    env = dict(os.environ)
    env.setdefault("DEMANDSTREAM_BROKER", f"kafka://127.0.0.1:{port}")
    # A fresh app id and topics per run: the demo's numbers are this run's, not the last one's.
    tag = time.strftime("%Y%m%d%H%M%S")
    env.update(
        {
            "DEMANDSTREAM_APP_ID": f"demandstream-demo-{tag}",
            "DEMANDSTREAM_TOPIC_INPUT": f"clickstream-demo-{tag}",
            "DEMANDSTREAM_TOPIC_SIGNALS": f"demand-signals-demo-{tag}",
            "DEMANDSTREAM_TOPIC_DLQ": f"clickstream-dlq-demo-{tag}",
            "DEMANDSTREAM_TOPIC_CONTROL": f"clickstream-control-demo-{tag}",
            "DEMANDSTREAM_DATA_DIR": str(work / f"data-{tag}"),
            "DEMANDSTREAM_LOG_LEVEL": env.get("DEMANDSTREAM_LOG_LEVEL", "warning"),
            "DEMANDSTREAM_LAG_INTERVAL_S": "1",
        }
    )
    settings = Settings.from_env(env)
    script = settings.kafka_script_path()
    web_port = settings.web_port

    started_kafka = False
    given = "DEMANDSTREAM_BROKER" in os.environ
    ours = not given and kafka(script, "status", port, quiet=True) == 0
    action = broker_action(given, ours, not given and not ours and port_answers(port))
    if action == "refuse":
        print(
            f"demo: error: another process already listens on 127.0.0.1:{port} (your own Kafka?): run "
            f"`DEMANDSTREAM_DEMO_KAFKA_PORT={port + 100} make demo` for a broker of the demo's own, or "
            f"`DEMANDSTREAM_BROKER=kafka://127.0.0.1:{port} make demo` to run the demo on that one (it adds "
            "topics named *-demo-<time>)",
            file=sys.stderr,
        )
        return 2
    if action == "start":
        say(f"starting Apache Kafka on 127.0.0.1:{port} (first run fetches the jars with Maven)")
        if kafka(script, "up", port) != 0:
            print("demo: error: Kafka did not start (see the message above)", file=sys.stderr)
            return 1
        started_kafka = True

    worker = None
    try:
        data = work / "events.jsonl"
        say(f"generating {DEMO_EVENTS:,} events for {DEMO_USERS:,} users (+{DEMO_BAD} broken records)")
        write_jsonl(generate(DEMO_USERS, DEMO_EVENTS, seed=DEMO_SEED), data)
        with open(data, "ab") as fh:
            for i in range(DEMO_BAD):
                fh.write(
                    b'{"event_id": "bad%d", "user_id": "u1", "type": "teleport"}\n' % i
                    if i % 2
                    else b"this line is not JSON\n"
                )

        model = Path(settings.model) if settings.model else work / "model.pt"
        if not settings.model:
            say("training a small model on the generated events")
            # start_summary lives with the report's other summaries; train re-exports it, as the demo's layer
            # may use training but not evaluation (tests/unit/test_layers.py)
            from demandstream.model.training.train import run_training, start_summary

            summary = run_training([str(data)], "jsonl", model, device="cpu", epochs=3)
            say(
                f"model {summary.get('model_version')} trained on {summary.get('n_train_events'):,} events "
                f"at {summary.get('train_events_per_s', 0):,.0f} events/s, starting from "
                f"{start_summary(summary.get('history_window'), bool(summary.get('history_mixture')))}"
            )
        env["DEMANDSTREAM_MODEL"] = str(model)

        say(f"starting a worker (metrics on http://127.0.0.1:{web_port}/metrics)")
        log_path = work / "worker.log"
        log_path.unlink(missing_ok=True)  # the launcher appends: the log is this run's alone
        worker = WorkerLauncher(env, log_path, port=web_port, ready_timeout_s=READY_TIMEOUT_S).start()
        try:
            worker.wait_ready()
        except (RuntimeError, TimeoutError):
            print(f"demo: error: worker did not become ready; see {log_path}", file=sys.stderr)
            return 1

        from demandstream.stream.tools.replay import replay

        say("replaying the clickstream into Kafka")
        t0 = time.perf_counter()
        stats = replay(settings, [data], "jsonl", progress=True)
        expected = stats.sent
        deadline = time.monotonic() + DRAIN_TIMEOUT_S
        done = 0.0
        while time.monotonic() < deadline:
            done = metric(worker, "demandstream_signals_total") + metric(
                worker, "demandstream_dead_letters_total"
            )
            if done >= expected:
                break
            time.sleep(0.2)
        elapsed = time.perf_counter() - t0

        say("live demand signals (latest 8):")
        from demandstream.stream.tools.tail import tail

        tail(settings, from_beginning=False, max_records=8, timeout_s=0.1)  # warm the consumer quietly
        _show_latest(settings, 8)

        signals = metric(worker, "demandstream_signals_total")
        dead = metric(worker, "demandstream_dead_letters_total")
        p50 = _quantile(worker, 0.5)
        print()
        say("summary")
        print(f"  events in        {expected:>10,}")
        print(f"  signals out      {int(signals):>10,}")
        print(f"  dead letters     {int(dead):>10,}")
        print(
            f"  throughput       {expected / elapsed:>10,.0f} events/s  (replay start to last signal, "
            f"{elapsed:.1f} s)"
        )
        if p50 is not None:
            print(f"  batch size p50   {p50:>10,.0f} events")
        ok = signals + dead == expected
        print(f"  in = signals + dead letters: {'yes' if ok else 'NO'}")
        return 0 if ok else 1
    finally:
        if worker is not None and worker.poll() is None:
            say("stopping the worker")
            worker.stop(timeout=60)
        if started_kafka:
            say("stopping Kafka")
            kafka(script, "down", port)


def _show_latest(settings: Settings, n: int) -> None:
    from kafka import KafkaConsumer, TopicPartition

    from demandstream.stream.tools.tail import format_signal

    c = KafkaConsumer(bootstrap_servers=settings.bootstrap_servers, group_id=None, enable_auto_commit=False)
    try:
        tps = [
            TopicPartition(settings.topic_signals, p)
            for p in sorted(c.partitions_for_topic(settings.topic_signals))
        ]
        c.assign(tps)
        ends = c.end_offsets(tps)
        for tp in tps:
            c.seek(tp, max(0, ends[tp] - (n // len(tps) + 1)))
        got = []
        for recs in c.poll(timeout_ms=3000, max_records=n * 2).values():
            got.extend(recs)
        for r in sorted(got, key=lambda r: orjson.loads(r.value)["emitted_at"])[-n:]:
            print("  " + format_signal(r.value))
    finally:
        c.close()


def _quantile(worker: WorkerLauncher, q: float) -> float | None:
    """Approximate quantile of the batch-size histogram from its cumulative buckets."""
    from prometheus_client.parser import text_string_to_metric_families

    try:
        status, body = worker.get("/metrics")
    except OSError:
        return None
    if status != 200:
        return None
    buckets = []
    for fam in text_string_to_metric_families(body.decode()):
        if fam.name == "demandstream_batch_size":
            buckets = [(float(s.labels["le"]), s.value) for s in fam.samples if s.name.endswith("_bucket")]
    if not buckets or buckets[-1][1] == 0:
        return None
    total = buckets[-1][1]
    for le, count in buckets:
        if count >= q * total:
            return le
    return None


if __name__ == "__main__":
    try:
        sys.exit(main())
    except UserError as e:  # a bad setting: one line, as the CLI does
        print(f"demo: error: {e}", file=sys.stderr)
        sys.exit(2)
