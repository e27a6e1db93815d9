"""State TTL end to end on the real broker: expiry rides on the batch protocol, in event time.

Old users are gone from the local store (the served view) and from the changelog (tombstones); a user
who comes back starts fresh; the users of the batches in flight keep their state. Both guarantees: the
tombstones are acknowledged writes under at_least_once and transactional ones under exactly_once.
"""

from __future__ import annotations

import time

import orjson
import pytest

from demandstream.model.core.events import Event
from demandstream.stream.engine.records import state_key
from demandstream.stream.settings import Settings
from tests.helpers import latest_by_key, read_topic, send_events
from tests.integration.faults import changelog_topic

pytestmark = [pytest.mark.kafka, pytest.mark.slow, pytest.mark.timeout(300)]

TTL_S = 600.0
T0 = 1.75e9
OLD_USERS = [f"old{i}" for i in range(24)]
NEW_USERS = [f"new{i}" for i in range(48)]  # enough to land in every partition


def _events(users: list[str], t: float, tag: str, n: int = 2) -> list[Event]:
    return [Event(f"{tag}-{u}-{i}", u, t + i, "view", f"i{i}", "shoes", 5.0) for u in users for i in range(n)]


@pytest.mark.parametrize("guarantee", ["at_least_once", "exactly_once"])
def test_idle_users_expire_by_event_time_and_come_back_fresh(
    guarantee, worker_factory, stream_env, kafka_bootstrap
):
    isolation = "read_committed" if guarantee == "exactly_once" else "read_uncommitted"
    w = worker_factory(DEMANDSTREAM_GUARANTEE=guarantee, DEMANDSTREAM_STATE_TTL_S=str(TTL_S)).start()
    w.wait_ready()
    settings = Settings.from_env(stream_env)

    # Phase 1: old users, at T0. Their event time is years before the wall clock: expiry by the wall
    # clock would wipe them as they arrive.
    send_events(settings.bootstrap_servers, settings.topic_input, _events(OLD_USERS, T0, "a"))
    # Exactly-once: a state reaches the local store (and the HTTP view) when its transaction commits,
    # so wait for the committed signals; uncommitted ones can be seen a whole commit interval earlier.
    read_topic(
        kafka_bootstrap,
        settings.topic_signals,
        until=lambda r: len(r) >= 2 * len(OLD_USERS),
        timeout=120,
        isolation=isolation,
    )
    time.sleep(2)  # a few more idle batches: nothing may expire without newer events
    for u in OLD_USERS[:3]:
        assert w.get(f"/users/{u}/demand")[0] == 200, u

    # Phase 2: new users, past the TTL in event time; their batches expire the old users.
    send_events(settings.bootstrap_servers, settings.topic_input, _events(NEW_USERS, T0 + 2 * TTL_S, "b"))
    n_signals = 2 * (len(OLD_USERS) + len(NEW_USERS))
    read_topic(kafka_bootstrap, settings.topic_signals, until=lambda r: len(r) >= n_signals, timeout=120)
    changelog = changelog_topic(settings)

    def tombstoned(records):
        latest = latest_by_key(records)
        return all(state_key(u) in latest and latest[state_key(u)] is None for u in OLD_USERS)

    records = read_topic(kafka_bootstrap, changelog, until=tombstoned, timeout=90, isolation=isolation)
    latest = latest_by_key(records)
    assert tombstoned(records), [u for u in OLD_USERS if latest.get(state_key(u)) is not None]
    assert all(latest.get(state_key(u)) for u in NEW_USERS)  # the batches' own users keep their state
    for u in OLD_USERS:
        assert w.get(f"/users/{u}/demand")[0] == 404, u
    assert w.metric("demandstream_expired_states_total") >= len(OLD_USERS)

    # Phase 3: an old user comes back and starts from a fresh state.
    back = OLD_USERS[0]
    send_events(
        settings.bootstrap_servers,
        settings.topic_input,
        [Event(f"c-{back}", back, T0 + 2 * TTL_S + 60, "view", "i9", "bags", 5.0)],
    )
    sig = read_topic(
        kafka_bootstrap,
        settings.topic_signals,
        until=lambda r: any(orjson.loads(x.value)["event_id"] == f"c-{back}" for x in r),
        timeout=90,
        isolation=isolation,
    )
    mine = [orjson.loads(x.value) for x in sig if orjson.loads(x.value)["event_id"] == f"c-{back}"]
    assert mine[-1]["events_seen"] == 1
