"""``demandstream worker``: load the model, make sure the topics exist, run the Faust worker."""

from __future__ import annotations

import contextlib
import errno
import gc
import logging
import socket
from dataclasses import dataclass
from pathlib import Path

import aiokafka.errors
import torch
from faust.exceptions import ConsistencyError

from demandstream.model.core.checkpoint import Checkpoint, CheckpointError, load
from demandstream.model.core.scoring import Scorer, resolve_device
from demandstream.model.errors import UserError
from demandstream.stream.acls import (
    check_worker_rights,
    group_refused,
    topic_refused,
    transactional_ids_refused,
)
from demandstream.stream.admin import ensure_topics, with_cluster_replication
from demandstream.stream.settings import Settings, SettingsError
from demandstream.stream.worker.agents import attach
from demandstream.stream.worker.app import Components, create_app
from demandstream.stream.worker.quality import live_quality, model_horizon_s
from demandstream.stream.worker.web import attach_views

logger = logging.getLogger(__name__)

#: Torch intra-op threads in a worker: micro-batch steps are small, and on a shared box extra threads
#: mostly fight the Kafka client and the broker for cores.
WORKER_TORCH_THREADS = 1

#: Python's cyclic garbage collector thresholds in a worker. The default (700, 10, 10) runs a young
#: collection every 700 net allocations; a worker allocates several objects per event (records, events,
#: predictions, JSON), so at thousands of events per second it collected hundreds of times a second,
#: and every 100th time the whole heap (torch, Faust, the model). Measured: ``Scorer.step_many`` on
#: 30,000 generated events in batches of 2,000, 17,388 -> 24,558 events/s with the young threshold at
#: 50,000. Together with :func:`gc.freeze` after start-up (what start-up built lives as long as the
#: process) as large services do (Instagram's "Dismissing Python Garbage Collection", 2017).
WORKER_GC_THRESHOLDS = (50_000, 50, 100)


def prepare_data_dir(path: str) -> Path:
    """Create the worker's data directory with its parents (Faust makes only the last level, and ends
    with an ``os.mkdir`` traceback when a parent is missing); a path that cannot be created is a
    setting error, said in one line.

    >>> import tempfile, os
    >>> d = prepare_data_dir(os.path.join(tempfile.mkdtemp(), "a", "b"))
    >>> d.is_dir()
    True
    """
    p = Path(path)
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SettingsError(f"DEMANDSTREAM_DATA_DIR: cannot create {path!r}: {e.strerror}") from None
    return p


def require_model(settings: Settings) -> None:
    """The cheap model checks: one is named and the file is there (:func:`load_model` then reads it)."""
    if not settings.model:
        raise SettingsError(
            "no model: pass --model or set DEMANDSTREAM_MODEL (train one with `demandstream train`)"
        )
    if not Path(settings.model).is_file():
        raise CheckpointError(f"model checkpoint not found: {settings.model}")


@dataclass(frozen=True)
class LoadedModel:
    """The checkpoint, where it runs and its scorer: loaded before the worker contacts Kafka."""

    ckpt: Checkpoint
    device: torch.device
    scorer: Scorer


def load_model(settings: Settings) -> LoadedModel:
    """Load and check the model (one line for a missing, corrupt or foreign file; no broker needed)."""
    require_model(settings)
    device = resolve_device(settings.device)
    ckpt = load(settings.model, device)
    scorer = Scorer(
        ckpt,
        device,
        top_k=settings.top_k,
        max_batch=settings.batch_max,
        why_top=settings.why_top,
        inference=settings.inference,
    )
    return LoadedModel(ckpt, device, scorer)


def build_worker(settings: Settings, model: LoadedModel | None = None) -> Components:
    """Everything but running: model loaded (fails fast on a bad checkpoint), app, agent, views."""
    model = model or load_model(settings)
    prepare_data_dir(settings.data_dir)
    ckpt, device, scorer = model.ckpt, model.device, model.scorer
    c = create_app(settings)
    pipeline = attach(c, scorer)
    pipeline.quality = live_quality(settings, c.metrics, scorer, model_horizon_s(ckpt))
    attach_views(c, pipeline)
    c.metrics.model_info.labels(
        ckpt.model_version, str(device), str(ckpt.cfg.hidden), str(len(ckpt.vocab))
    ).set(1)
    logger.info("model %s on %s, %d categories", ckpt.model_version, device, len(ckpt.vocab))
    return c


class StaleLocalState(UserError, RuntimeError):
    """The worker's local state is ahead of its changelog topic: the topics were deleted or recreated
    (another broker, ``kafka.sh up --fresh``) while the data directory was kept."""


def stale_state_error(data_dir: str, reason: ConsistencyError) -> StaleLocalState:
    """The one line a worker ends with when Faust's recovery finds the local state ahead of the
    changelog (Faust raises it rather than serve states the changelog cannot vouch for).

    >>> e = stale_state_error("var/data", ConsistencyError("The persisted offset is higher\\nthan (12 > -1).\\n\\nMost likely ..."))
    >>> str(e).startswith("the local state in var/data is ahead of its changelog topic (The persisted offset is higher than (12 > -1).)")
    True
    """
    faust_says = " ".join(str(reason).split("\n\n")[0].split())
    return StaleLocalState(
        f"the local state in {data_dir} is ahead of its changelog topic ({faust_says}): the topics were "
        "deleted or recreated since this data directory was written (another broker, or `kafka.sh up "
        f"--fresh`). The changelog is the states' source of truth: delete {data_dir} to start from it, or "
        "point the worker back at the broker that holds its topics"
    )


class WebPortInUse(UserError, OSError):
    """Another process (often another worker on the same machine) listens on the worker's web port."""


def web_port_error(settings: Settings) -> WebPortInUse:
    """The one line a worker ends with when its web port is taken.

    >>> print(web_port_error(Settings(web_port=6066)))
    the web port 127.0.0.1:6066 is already in use (another worker on this machine?): give each worker its own --web-port / DEMANDSTREAM_WEB_PORT, or run them as one `demandstream worker --processes N`
    """
    return WebPortInUse(
        f"the web port {settings.web_host}:{settings.web_port} is already in use (another worker on this "
        "machine?): give each worker its own --web-port / DEMANDSTREAM_WEB_PORT, or run them as one "
        "`demandstream worker --processes N`"
    )


def check_web_port(settings: Settings) -> None:
    """Refuse, before the model loads and the worker joins its group, a web port another process listens
    on: Faust would find it only when its web server starts, and end in a traceback. Bound as asyncio's
    servers bind (``SO_REUSEADDR``), so a port left in TIME_WAIT by a worker just stopped is free here
    as it is to the server. Any other failure to bind is left to the server, which says it."""
    try:
        family = socket.getaddrinfo(settings.web_host, settings.web_port, type=socket.SOCK_STREAM)[0][0]
    except socket.gaierror:
        return
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((settings.web_host, settings.web_port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise web_port_error(settings) from None


def run_worker(settings: Settings) -> int:
    torch.set_num_threads(WORKER_TORCH_THREADS)
    check_web_port(settings)
    model = load_model(settings)  # before anything connects: a bad model needs no broker to be named
    # Topics (the changelog included) and the principal's rights before the app; with
    # DEMANDSTREAM_REPLICATION unset Faust is given the input topic's factor, as it wants a number
    ensure_topics(settings, with_changelog=True)
    check_worker_rights(settings)
    settings = with_cluster_replication(settings)
    c = build_worker(settings, model)
    tune_gc()
    worker = faust_worker(c.app, settings.log_level)
    try:
        worker.execute_from_commandline()
    except SystemExit:
        # mode ends every run with SystemExit; after a crash (mode hands a service's crash to the root
        # service, this worker), its reason tells a user's mistake from a bug
        reason = worker.crash_reason
        if isinstance(reason, ConsistencyError):
            raise stale_state_error(settings.data_dir, reason) from None
        if isinstance(reason, UserError):  # raised by our code in a Faust service: already its one line
            raise reason from None
        refused = refused_by_acls(settings, reason)
        if refused is not None:
            raise refused from None
        if isinstance(reason, OSError) and reason.errno == errno.EADDRINUSE:
            # taken between the check above and the server's start: the web server is the worker's only
            # listening socket
            raise web_port_error(settings) from None
        raise
    return 0


def refused_by_acls(settings: Settings, reason: BaseException | None) -> UserError | None:
    """The one line for a worker that crashed on a right the cluster's ACLs refuse it (a topic it may
    read but not write, a right taken away while it ran); None for any other crash.

    >>> str(refused_by_acls(Settings(sasl_username="shop"), aiokafka.errors.TopicAuthorizationFailedError("signals")))[:60]
    "the cluster's ACLs refused user shop an operation on topic s"
    """
    if isinstance(reason, aiokafka.errors.TopicAuthorizationFailedError):
        return topic_refused(settings, reason.args[0] if reason.args else "")
    if isinstance(reason, aiokafka.errors.GroupAuthorizationFailedError):
        return group_refused(settings)
    if isinstance(reason, aiokafka.errors.TransactionalIdAuthorizationFailed):
        return transactional_ids_refused(settings)
    return None


def tune_gc() -> None:
    """Fewer cyclic collections in a worker, none of them over what start-up built (see
    :data:`WORKER_GC_THRESHOLDS`); reference counting still frees everything acyclic at once."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*WORKER_GC_THRESHOLDS)


@contextlib.contextmanager
def worker_gc():
    """:func:`tune_gc` for the duration of a block, then the previous thresholds and an unfrozen heap:
    the bench times ``Scorer.step`` under the collector settings the worker runs with.

    >>> before = gc.get_threshold()
    >>> with worker_gc():
    ...     gc.get_threshold() == WORKER_GC_THRESHOLDS
    True
    >>> gc.get_threshold() == before
    True
    """
    before = gc.get_threshold()
    tune_gc()
    try:
        yield
    finally:
        gc.set_threshold(*before)
        gc.unfreeze()


def faust_worker(app, log_level: str):
    """Faust's ``Worker`` for ``app`` at ``log_level``, without its terminal spinner.

    At log level WARNING and above Faust's Worker draws a spinner on the terminal, and for that sets the
    root logger to DEBUG for good: every debug call in Faust and aiokafka then builds a log record that
    no handler prints (a sixth of a state restore's time, docs/OPERATIONS.md §4 "How long recovery
    takes").
    """
    from faust.worker import Worker

    worker = Worker(app, loglevel=log_level, quiet=True, redirect_stdouts=False)
    worker.spinner = None
    return worker
