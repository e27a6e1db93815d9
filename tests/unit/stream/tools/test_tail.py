"""tail renders what the worker writes and survives what it does not (records of other producers)."""

from __future__ import annotations

import io
from types import SimpleNamespace

import orjson
import pytest

from demandstream.stream.settings import Settings
from demandstream.stream.tools.tail import RAW_PREVIEW, format_signal, tail_demand

SIGNAL = {
    "user_id": "u-1",
    "event_id": "e-1",
    "events_seen": 3,
    "purchase_propensity": 0.25,
    "top_categories": [
        {"category": "lipstick", "p": 0.6, "why": [{"reason": "last_category", "logit": 8.0}]},
        {"category": "bags", "p": 0.2, "why": [{"reason": "transition", "logit": -1.2, "from": "shoes"}]},
    ],
}


def test_a_signal_renders_with_its_reasons():
    line = format_signal(orjson.dumps(SIGNAL), why=True)
    assert line.startswith("u-1") and "buy=0.250" and "lipstick 0.60, bags 0.20" in line
    assert "because last_category +8.00" in line and "transition -1.20 (from shoes)" in line


@pytest.mark.parametrize(
    "record",
    [
        {**SIGNAL, "top_categories": [{"category": "a"}]},  # no p
        {**SIGNAL, "top_categories": "lipstick"},  # not a list
        {**SIGNAL, "purchase_propensity": None},
        {k: v for k, v in SIGNAL.items() if k != "user_id"},
        {**SIGNAL, "top_categories": [{"category": "a", "p": 0.1, "why": [{"logit": 1.0}]}]},
        [1, 2, 3],
        "just a string",
    ],
)
def test_a_record_of_the_wrong_shape_is_printed_raw_not_raised(record):
    raw = orjson.dumps(record)
    assert format_signal(raw, why=True) == "MALFORMED " + raw[:RAW_PREVIEW].decode()


def test_bytes_that_are_not_json_are_printed_as_they_are():
    assert format_signal(b"\xffnot json") == "\ufffdnot json"


class _Consumer:
    """The two calls tail_demand makes of a KafkaConsumer, over a fixed list of record values."""

    def __init__(self, values):
        self.batches = [{0: [SimpleNamespace(value=v) for v in values]}]

    def partitions_for_topic(self, _topic):
        return {0}

    def poll(self, timeout_ms=0, max_records=None):
        return self.batches.pop(0) if self.batches else {}

    def close(self):
        pass


def test_demand_tail_skips_malformed_records_and_says_how_many():
    good = {
        "kind": "category",
        "partition": 0,
        "window_start": 0,
        "window_end": 300,
        "category": "shoes",
        "expected": 1.5,
        "propensity": 0.25,
        "observed": 4,
        "purchases": 1,
    }
    values = [b"{not json", orjson.dumps({"kind": "category"}), orjson.dumps([1]), orjson.dumps(good)]
    out = io.StringIO()
    n = tail_demand(_Consumer(values), Settings(), None, 1.0, out)
    assert n == 4
    text = out.getvalue()
    assert "shoes" in text and "skipped 3 malformed record(s)" in text


HOSTILE = "\x1b]0;owned\x07\x1b[2J\r\n\x9b31m"  # set the title, clear the screen, CR/LF, C1 CSI


def _controls(text: str) -> set[str]:
    return {c for c in text if ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0} - {"\n"}


@pytest.mark.parametrize(
    "value",
    [
        orjson.dumps({**SIGNAL, "user_id": HOSTILE, "event_id": HOSTILE}),
        orjson.dumps({**SIGNAL, "top_categories": [{"category": HOSTILE, "p": 0.5, "why": []}]}),
        orjson.dumps({"reason": HOSTILE, "detail": HOSTILE}),
        orjson.dumps({"user_id": HOSTILE}),  # malformed: printed raw
        HOSTILE.encode(),  # not JSON
    ],
)
def test_control_characters_of_a_record_never_reach_the_terminal(value):
    for why in (False, True):
        line = format_signal(value, why=why)
        assert not _controls(line), repr(line)
        assert "\\x1b" in line  # shown, not dropped
    # the only newlines are tail's own (one line per top category with why), never the record's
    assert "\n" not in format_signal(value)


def test_control_characters_of_a_category_never_reach_the_demand_table():
    from demandstream.stream.tools.tail import format_demand_table

    view = {"window_start": 0, "window_end": 300, "complete": True, "partitions": 1,
            "partitions_reported": 1, "users": 1, "events": 1, "categories": [
                {"category": HOSTILE, "expected": 1.0, "propensity": 0.1, "observed": 1, "purchases": 0,
                 "ratio": None, "rising": False}]}  # fmt: skip
    text = format_demand_table(view)
    assert not _controls(text) and text.count("\n") == 2


class _Topics:
    """``KafkaConsumer.topics()`` of a broker where ``topic`` appears at the ``appears``-th call."""

    def __init__(self, topic, appears):
        self.topic, self.appears, self.calls = topic, appears, 0

    def topics(self):
        self.calls += 1
        return {"other"} | ({self.topic} if self.calls >= self.appears else set())


def test_tail_waits_for_a_missing_topic_saying_so_once(monkeypatch):
    # subscribed to a missing topic, kafka-python logged an ERROR on every poll, several a second
    import time

    from demandstream.stream.tools import tail as tail_mod

    monkeypatch.setattr(tail_mod, "TOPIC_WAIT_POLL_S", 0.01)
    err = io.StringIO()
    assert tail_mod.wait_for_topic(_Topics("s", 1), "s", None, err) and err.getvalue() == ""
    late = _Topics("s", 4)
    assert tail_mod.wait_for_topic(late, "s", time.monotonic() + 5.0, err) and late.calls == 4
    assert err.getvalue().count("tail: topic s does not exist yet; waiting for it") == 1
    never = _Topics("s", 10**9)
    t0 = time.monotonic()
    assert not tail_mod.wait_for_topic(never, "s", t0 + 0.1, io.StringIO())
    assert 0.1 <= time.monotonic() - t0 < 2.0  # gives up at the deadline
