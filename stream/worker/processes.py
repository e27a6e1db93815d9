"""``demandstream worker --processes N``: N worker processes on one machine, one core each.

A Python process steps its micro-batches on one core; Faust scales by partitions, so a machine with N
cores runs N members of the same consumer group (same ``app_id``). Each child is a plain
``demandstream worker`` with its own data directory (RocksDB allows one process per database) and its
own web port (``web_port + i``), and Kafka assigns each its share of the partitions. The supervisor
does no stream work: it starts the children, forwards SIGTERM/SIGINT to them, and when one of them ends
unasked it stops the others and exits with that child's status, so the process manager above it
(systemd, Kubernetes) sees the failure and restarts the group rather than a silently shrunken one.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import fields
from pathlib import Path

from yarl import URL

from demandstream.stream.settings import PREFIX, Settings, SettingsError

logger = logging.getLogger(__name__)

#: How long children get to finish their batch and leave the group after SIGTERM before SIGKILL.
STOP_GRACE_S = 60.0
#: How often the supervisor looks at its children.
POLL_S = 0.5


def child_settings_env(settings: Settings, i: int, base: dict[str, str]) -> dict[str, str]:
    """The environment of child ``i``: every setting of ``settings`` (flags included) as
    ``DEMANDSTREAM_*``, with its own data directory and web port, and one process. An advertised URL's
    port moves with the web port (``web_port + i``), so each child advertises its own.

    >>> env = child_settings_env(Settings(data_dir="var/d", web_port=7000, processes=2), 1, {})
    >>> env["DEMANDSTREAM_DATA_DIR"], env["DEMANDSTREAM_WEB_PORT"], env["DEMANDSTREAM_PROCESSES"]
    ('var/d/worker-1', '7001', '1')
    >>> s = Settings(web_host="0.0.0.0", web_port=7000, web_advertised_url="http://node-a:7000", processes=2)
    >>> child_settings_env(s, 1, {})["DEMANDSTREAM_WEB_ADVERTISED_URL"]
    'http://node-a:7001'
    """
    env = {k: v for k, v in base.items() if not k.startswith(PREFIX)}
    for f in fields(Settings):
        env[PREFIX + f.name.upper()] = str(getattr(settings, f.name))
    env[PREFIX + "DATA_DIR"] = str(Path(settings.data_dir) / f"worker-{i}")
    env[PREFIX + "WEB_PORT"] = str(settings.web_port + i)
    if settings.web_advertised_url:
        url = URL(settings.web_advertised_url)
        env[PREFIX + "WEB_ADVERTISED_URL"] = str(url.with_port(url.port + i))
    env[PREFIX + "PROCESSES"] = "1"
    return env


def run_processes(settings: Settings) -> int:
    """Run ``settings.processes`` workers and supervise them until stopped; returns the exit status."""
    n = settings.processes
    if settings.web_port + n - 1 > 65535:
        raise SettingsError(
            f"{PREFIX}WEB_PORT: ports {settings.web_port}..{settings.web_port + n - 1} do not fit"
        )
    if n > settings.partitions:
        # Not an error (a member without a partition takes partitions over when another leaves the
        # group), but it adds no throughput, which is what --processes is asked for.
        logger.warning(
            "%d worker processes for %d partitions (%sPARTITIONS): Kafka gives each partition to one "
            "member, so %d of them will process nothing; topics with at least %d partitions use them all",
            n,
            settings.partitions,
            PREFIX,
            n - settings.partitions,
            n,
        )
    stopping = False

    def on_signal(signum, _frame):
        nonlocal stopping
        stopping = True
        logger.info("received %s: stopping %d workers", signal.Signals(signum).name, n)

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    children: list[subprocess.Popen] = []
    try:
        for i in range(n):
            env = child_settings_env(settings, i, dict(os.environ))
            children.append(
                subprocess.Popen([sys.executable, "-m", "demandstream.stream", "worker"], env=env)
            )
            logger.info(
                "worker %d/%d: pid %d, web port %s, data %s",
                i + 1,
                n,
                children[-1].pid,
                env[PREFIX + "WEB_PORT"],
                env[PREFIX + "DATA_DIR"],
            )
        status = 0
        while not stopping:
            ended = [(i, c.returncode) for i, c in enumerate(children) if c.poll() is not None]
            if ended:
                i, code = ended[0]
                logger.error(
                    "worker %d (pid %d) ended with status %s: stopping the others",
                    i + 1,
                    children[i].pid,
                    code,
                )
                status = code or 1
                break
            time.sleep(POLL_S)
        _stop(children)
        return status
    finally:
        _stop(children)  # also after an exception in the supervisor itself
        for s, h in previous.items():
            signal.signal(s, h)


def _stop(children: list[subprocess.Popen]) -> None:
    for c in children:
        if c.poll() is None:
            c.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + STOP_GRACE_S
    for c in children:
        try:
            c.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            logger.warning("worker pid %d did not stop in %.0f s: killing it", c.pid, STOP_GRACE_S)
            c.kill()
            c.wait()
