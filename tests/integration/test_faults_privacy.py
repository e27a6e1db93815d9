"""Privacy promises the topics must keep (issue #13 item 5), on the real broker.

- With a pseudonym key set, no raw user id is in any key or value of the signal topic, the
  dead-letter topic (nor the raw payload) or the changelog, for valid events and bad records alike.
- An erasure request is obeyed only from the control topic: a forged ``forget`` record on the input
  topic (which every shop front-end may write) is a dead letter; ``demandstream forget`` (control
  topic) erases the user.
- The table's changelog is created with ``max.compaction.lag.ms`` bounding how long an erased state
  may stay in its log segments.
"""

from __future__ import annotations

import subprocess
import sys
import time

import orjson
import pytest
from kafka import KafkaAdminClient, KafkaProducer
from kafka.admin import ConfigResource, ConfigResourceType

from demandstream.model.core.events import event_to_json
from demandstream.model.core.state import unpack
from demandstream.model.data.synth import generate
from demandstream.stream.settings import Settings
from demandstream.stream.tools.forget import forget_record
from tests.conftest import REPO
from tests.integration.faults import TopicReader, changelog_topic, latest_states

pytestmark = [pytest.mark.kafka, pytest.mark.slow, pytest.mark.timeout(300)]

PSEUDONYM_KEY = "test-pseudonym-key"
N_BAD = 30
N_USERS, N_EVENTS = 20, 400


def _bad_records(n: int) -> list[tuple[bytes | None, bytes | None, str]]:
    """(key, value, raw id) of ``n`` bad records, each naming a raw id in its key, payload or both."""
    out = []
    for i in range(n):
        uid = f"rawid-{i:04d}-secret"
        good = {"event_id": f"e{i}", "user_id": uid, "ts": 1_700_000_000, "type": "view", "item_id": "i1"}
        raw = orjson.dumps(good)
        kinds = [
            (uid.encode(), raw[: len(raw) // 2]),  # not_json, the id in the key and payload
            (f"other-{uid}".encode(), raw),  # key_mismatch: two ids, one in the detail
            (uid.encode(), raw[:-1] + b', "price": -1}'),  # bad_price
            (None, raw),  # missing_key: the id only in the payload
            (uid.encode(), None),  # tombstone: the id only in the key
            (uid.encode(), b"\xff" + raw),  # not_utf8
        ]
        k, v = kinds[i % len(kinds)]
        out.append((k, v, uid))
    return out


def _changelog_config(bootstrap: str, topic: str, name: str) -> str | None:
    admin = KafkaAdminClient(bootstrap_servers=bootstrap, client_id="test-privacy")
    try:
        res = admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, topic, configs=[name])])
    finally:
        admin.close()
    # {"topic": {name: {config: {"value": ...}}}} (kafka-python 3.x, the version pyproject.toml requires)
    return res.get("topic", {}).get(topic, {}).get(name, {}).get("value")


def _raw_ids_in(records, raw_ids: list[str]) -> list[str]:
    """The raw ids found anywhere in the keys or values of ``records``."""
    found = []
    for r in records:
        blob = (r.key or b"") + b"\0" + (r.value or b"")
        found += [uid for uid in raw_ids if uid.encode() in blob]
    return found


def test_pseudonymised_topics_hold_no_raw_id(worker_factory, stream_env, kafka_bootstrap):
    env = {**stream_env, "DEMANDSTREAM_PSEUDONYM_KEY": PSEUDONYM_KEY}
    s = Settings.from_env(env)
    w = worker_factory(DEMANDSTREAM_PSEUDONYM_KEY=PSEUDONYM_KEY).start()
    w.wait_ready()
    bad = _bad_records(N_BAD)
    # valid events too, of users whose ids cannot occur by chance in a pseudonym or an event id
    rename = {}
    events = []
    for e in generate(N_USERS, N_EVENTS, seed=17):
        uid = rename.setdefault(e.user_id, f"rawuser-{len(rename):04d}-secret")
        events.append(e.to_dict() | {"user_id": uid})
    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap)
    for k, v, _uid in bad:
        producer.send(s.topic_input, key=k, value=v)
    for e in events:
        producer.send(s.topic_input, key=e["user_id"].encode(), value=orjson.dumps(e))
    producer.flush(30)
    producer.close()
    raw_ids = [uid for _k, _v, uid in bad] + list(rename.values())
    read, leaks = {}, {}
    for topic, n, name in (
        (s.topic_dlq, N_BAD, "dead letters"),
        (s.topic_signals, len(events), "signals"),
        (changelog_topic(s), len(rename), "changelog records"),
    ):
        reader = TopicReader(kafka_bootstrap, topic)
        try:
            read[name] = reader.read_until(lambda r, n=n: len(r) >= n, 120, idle_s=1)
        finally:
            reader.close()
        assert len(read[name]) >= n, f"{len(read[name])} {name}, expected at least {n}"
        leaks[name] = _raw_ids_in(read[name], raw_ids)
    assert not any(leaks.values()), f"raw ids found: { {k: v[:3] for k, v in leaks.items() if v} }"
    recs = read["dead letters"]
    assert len(recs) == N_BAD, f"{len(recs)} dead letters of {N_BAD} bad records"
    for r in recs:
        d = orjson.loads(r.value)
        assert d["raw_encoding"] == "redacted" and d["raw"] == "" and d["reason"], d
    # the changelog's compaction lag is bounded (default one day)
    lag = _changelog_config(kafka_bootstrap, changelog_topic(s), "max.compaction.lag.ms")
    assert lag == str(int(s.changelog_max_compaction_lag_s * 1000)), lag


def test_forget_obeyed_from_the_control_topic_only(worker_factory, stream_env, kafka_bootstrap):
    s = Settings.from_env(stream_env)
    w = worker_factory().start()
    w.wait_ready()
    events = [e for e in generate(20, 300, seed=5)]
    users = sorted({e.user_id for e in events})
    forged, victim = users[0], users[1]
    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap)
    for e in events:
        producer.send(s.topic_input, key=e.user_id.encode(), value=event_to_json(e))
    producer.flush(30)
    changelog = TopicReader(kafka_bootstrap, changelog_topic(s))
    dlq = TopicReader(kafka_bootstrap, s.topic_dlq)
    try:
        counts = {u: sum(e.user_id == u for e in events) for u in users}

        def all_applied(recs: list) -> bool:
            latest = latest_states(recs)
            return all(latest.get(u) and unpack(latest[u]).events_seen == n for u, n in counts.items())

        changelog.read_until(all_applied, 120, idle_s=1)
        assert all_applied(changelog.records)
        # a forged erasure on the input topic: anyone who can write events could send it
        meta = producer.send(s.topic_input, key=forged.encode(), value=forget_record(forged)).get(30)
        producer.close()
        t0 = time.monotonic()
        proc = subprocess.run(
            [sys.executable, "-m", "demandstream.stream", "forget", victim],
            env=stream_env,
            cwd=REPO,
            capture_output=True,
            timeout=120,
        )
        assert proc.returncode == 0, proc.stderr.decode()
        changelog.read_until(lambda r: latest_states(r).get(victim, b"") is None, 60, idle_s=1)
        dlq.read_until(
            lambda r: any(x.partition == meta.partition and x.offset >= 0 for x in r), 60, idle_s=2
        )
        latest = latest_states(changelog.records)
        letters = [orjson.loads(x.value) for x in dlq.records]
    finally:
        changelog.close()
        dlq.close()
    assert latest.get(victim, b"") is None, "demandstream forget (control topic) did not erase the user"
    assert latest.get(forged) is not None, "a forget record on the input topic erased the user"
    assert unpack(latest[forged]).events_seen == counts[forged]
    forged_letters = [d for d in letters if d["partition"] == meta.partition and d["offset"] == meta.offset]
    assert len(forged_letters) == 1 and forged_letters[0]["reason"] == "missing_field", letters
    assert w.get(f"/users/{victim}/demand")[0] == 404
    print(f"\nFAULT FIGURES privacy: forget via control topic in {time.monotonic() - t0:.1f} s")
