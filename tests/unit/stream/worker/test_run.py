"""The worker launcher's own checks, before Faust or Kafka are involved."""

from __future__ import annotations

import pytest

from demandstream.model.errors import UserError
from demandstream.stream.worker.run import prepare_data_dir


def test_a_data_dir_with_missing_parents_is_created(tmp_path):
    d = prepare_data_dir(str(tmp_path / "not" / "yet" / "there"))
    assert d.is_dir()
    assert prepare_data_dir(str(d)) == d  # idempotent: a restart finds it


def test_a_data_dir_that_cannot_exist_is_one_user_error(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(UserError) as e:
        prepare_data_dir(str(blocker / "data"))
    msg = str(e.value)
    assert "DEMANDSTREAM_DATA_DIR" in msg and "\n" not in msg


def test_a_quiet_worker_keeps_the_root_logger_at_its_level():
    import logging

    import faust

    from demandstream.stream.worker.run import faust_worker

    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        worker = faust_worker(faust.App("test-quiet-worker", store="memory://"), "warning")
        worker._setup_logging()  # what the Worker does on start
        assert root.level == logging.WARNING  # Faust's spinner would have set DEBUG
        assert not logging.getLogger("faust.tables.recovery").isEnabledFor(logging.DEBUG)
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)


def test_tune_gc_freezes_start_up_objects_and_raises_the_thresholds():
    import gc

    from demandstream.stream.worker.run import WORKER_GC_THRESHOLDS, tune_gc

    before = gc.get_threshold()
    try:
        tune_gc()
        assert gc.get_threshold() == WORKER_GC_THRESHOLDS
        assert gc.get_freeze_count() > 0  # what was alive at start-up is out of every collection
        garbage = []
        garbage.append(garbage)  # a cycle made after start-up is still collected
        del garbage
        assert gc.collect() >= 1
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)


@pytest.mark.parametrize(
    "crash", ["stale", "port", "topic_acl", "group_acl", "txn_acl", "ours", "bug", "other_os", None]
)
def test_only_a_stale_local_state_a_taken_port_a_refused_right_or_our_user_error_becomes_one_line(
    crash, monkeypatch
):
    """Faust's ConsistencyError (local state ahead of the changelog), a web port taken while the
    worker started, a right the cluster's ACLs refuse and a user error our code raised in a Faust service
    (partitions added to the input) are the user's to fix: one line, exit 2 (the real cases:
    tests/integration/test_faults_stale_state.py, test_security.py, test_topics.py). Any other crash
    is a bug and keeps mode's exit status, as does a clean stop."""
    import errno
    import types

    import aiokafka.errors
    from faust.exceptions import ConsistencyError

    from demandstream.stream.settings import Settings
    from demandstream.stream.worker import run
    from demandstream.stream.worker.partitioning import InputPartitionsChanged

    reason = {
        "stale": ConsistencyError("persisted 12 > highwater -1"),
        "port": OSError(errno.EADDRINUSE, "error while attempting to bind on address"),
        "topic_acl": aiokafka.errors.TopicAuthorizationFailedError("demand-signals"),
        "group_acl": aiokafka.errors.GroupAuthorizationFailedError("demandstream"),
        "txn_acl": aiokafka.errors.TransactionalIdAuthorizationFailed(),
        "ours": InputPartitionsChanged("partitions were added to clicks"),
        "bug": KeyError("x"),
        "other_os": OSError(errno.EACCES, "permission denied"),
        None: None,
    }[crash]

    class Worker:
        crash_reason = reason

        def execute_from_commandline(self):
            raise SystemExit(1 if reason else 0)

    monkeypatch.setattr(run, "build_worker", lambda s, model=None: types.SimpleNamespace(app=object()))
    monkeypatch.setattr(run, "load_model", lambda s: None)
    monkeypatch.setattr(run, "ensure_topics", lambda s, with_changelog=False: None)
    monkeypatch.setattr(run, "with_cluster_replication", lambda s: s.with_(replication=1))
    monkeypatch.setattr(run, "check_worker_rights", lambda s: None)
    monkeypatch.setattr(run, "tune_gc", lambda: None)
    monkeypatch.setattr(run.torch, "set_num_threads", lambda n: None)  # the test process keeps its threads
    monkeypatch.setattr(run, "faust_worker", lambda app, level: Worker())
    monkeypatch.setattr(run, "check_web_port", lambda s: None)
    settings = Settings(data_dir="/srv/ds", sasl_username="shop")
    refused = {
        "topic_acl": r"ACLs refused user shop an operation on topic demand-signals: a worker needs READ, WRITE",
        "group_acl": r"ACLs do not let user shop use consumer group demandstream \(the app id\)",
        "txn_acl": r"ACLs do not let user shop write with transactional ids prefixed demandstream-",
        "ours": r"^partitions were added to clicks$",  # a user error raised in a Faust service, as it is
    }
    if crash == "stale":
        with pytest.raises(
            UserError, match=r"the local state in /srv/ds is ahead of its changelog topic \(persisted 12"
        ):
            run.run_worker(settings)
    elif crash == "port":
        with pytest.raises(UserError, match=r"the web port 127\.0\.0\.1:6066 is already in use"):
            run.run_worker(settings)
    elif crash in refused:
        with pytest.raises(UserError, match=refused[crash]):
            run.run_worker(settings)
    else:
        with pytest.raises(SystemExit) as exit_:
            run.run_worker(settings)
        assert exit_.value.code == (1 if crash else 0)


def test_a_web_port_another_process_listens_on_is_refused_before_the_worker_starts():
    import socket

    from demandstream.stream.settings import Settings
    from demandstream.stream.worker.run import check_web_port

    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        with pytest.raises(UserError, match=rf"the web port 127\.0\.0\.1:{port} is already in use") as e:
            check_web_port(Settings(web_port=port))
        assert "\n" not in str(e.value)
    check_web_port(Settings(web_port=port))  # free again once its listener is closed


@pytest.mark.parametrize("model", ["", "/nonexistent/model.pt"])
def test_a_missing_model_is_named_before_kafka_is_contacted(monkeypatch, model):
    from demandstream.stream.settings import Settings
    from demandstream.stream.worker import run

    def no_kafka(*args, **kwargs):
        raise AssertionError("Kafka contacted before the model was checked")

    monkeypatch.setattr(run, "ensure_topics", no_kafka)
    monkeypatch.setattr(run, "check_web_port", lambda s: None)
    monkeypatch.setattr(run.torch, "set_num_threads", lambda n: None)
    with pytest.raises(UserError, match="no model: pass --model|model checkpoint not found"):
        run.run_worker(Settings(model=model))
