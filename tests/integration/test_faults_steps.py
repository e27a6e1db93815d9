"""Crashes at each step of the batch protocol, not only at random moments (issue #13).

A failpoint (``DEMANDSTREAM_FAULT_AT``, test-only, :meth:`Pipeline.failpoint`) ends the worker at one
exact step of a micro-batch, as a SIGKILL landing there would:

- ``after_signals`` (at_least_once): signals and dead letters acknowledged, the new states not written;
- ``after_state`` (both): states durable in the changelog and the local store (at_least_once), or every
  output in the open transaction (exactly_once), and the source offsets not committed;
- ``mid_transaction`` (exactly_once): the batch's signals in the open transaction, its states not yet.

A worker without the failpoint then restarts on the same node, the replay finishes, and the full
invariant check runs: at_least_once may duplicate signals, exactly_once may not, neither may lose an
event or apply one twice; every final state equals the offline reference.
"""

from __future__ import annotations

import time

import pytest

from demandstream.model.data.synth import write_jsonl
from demandstream.stream.settings import Settings
from demandstream.stream.worker.agents import FAULT_EXIT_STATUS
from tests.integration.faults import (
    FAULT_ENV,
    FaultReport,
    Replayer,
    check_invariants,
    reference_states,
    synth_events,
)

pytestmark = [pytest.mark.kafka, pytest.mark.slow, pytest.mark.timeout(420)]

N_USERS, N_EVENTS, SEED = 200, 1600, 23
RATE = 800  # events/s: the failpoint fires a few batches into the stream, with most of it still to come
CASES = [
    ("at_least_once", "after_signals"),
    ("at_least_once", "after_state"),
    ("exactly_once", "mid_transaction"),
    ("exactly_once", "after_state"),
]


@pytest.mark.parametrize(("guarantee", "step"), CASES)
def test_crash_at_a_step_of_the_batch_protocol(
    guarantee, step, worker_factory, stream_env, kafka_bootstrap, small_model, tmp_path
):
    started = time.time()
    env = {"DEMANDSTREAM_GUARANTEE": guarantee, "DEMANDSTREAM_BATCH_MAX": "200", **FAULT_ENV}
    s = Settings.from_env(stream_env | env)
    events = synth_events(N_USERS, N_EVENTS, SEED)
    data = tmp_path / "events.jsonl"
    write_jsonl(events, data)
    reference_states(small_model, events)
    same_node = {
        "DEMANDSTREAM_WEB_PORT": stream_env["DEMANDSTREAM_WEB_PORT"],
        "DEMANDSTREAM_DATA_DIR": stream_env["DEMANDSTREAM_DATA_DIR"],
    }
    faulty = worker_factory(
        **env, **same_node, DEMANDSTREAM_FAULT_AT=step, DEMANDSTREAM_FAULT_AFTER_BATCHES="3"
    ).start()
    faulty.wait_ready()
    rep = Replayer(s, data, RATE)
    rep.start()
    assert faulty.proc.wait(120) == FAULT_EXIT_STATUS, faulty.log_tail()
    died = time.time()
    assert f"fault injection: exiting at {step}" in faulty.log_tail()
    worker = worker_factory(**env, **same_node).start()
    worker.wait_ready()
    sent = rep.finish(timeout=240)
    assert sent == N_EVENTS

    report = FaultReport(f"crash at {step}", guarantee, N_EVENTS, N_USERS, faults=[f"failpoint {step}"])
    check_invariants(
        report,
        bootstrap=kafka_bootstrap,
        settings=s,
        model_path=small_model,
        events=events,
        records_in=sent,
        kill_times=[died],
        started=started,
        served=worker.get,
    )
    assert worker.proc.poll() is None, f"the restarted worker died:\n{worker.log_tail()}"
