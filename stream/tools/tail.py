"""``demandstream tail``: follow a topic (signals by default) and print its records readably."""

from __future__ import annotations

import sys
import time

import orjson
from kafka import KafkaConsumer

from demandstream.stream.admin import UNREACHABLE, KafkaUnavailable, unreachable_message
from demandstream.stream.settings import Settings

#: Characters of a record that ``tail`` cannot render that it prints as they are.
RAW_PREVIEW = 200

#: C0 and C1 control characters (and DEL) as visible escapes: a record's strings come from whoever wrote
#: the input (event ids, category names) or the topic, and an escape sequence printed as it is would
#: drive the reader's terminal (clear it, rewrite earlier lines, set its title).
_CONTROL_ESCAPES = {c: f"\\x{c:02x}" for c in (*range(0x20), *range(0x7F, 0xA0))}


def printable(text: str) -> str:
    r"""``text`` with every control character escaped, so printing it can only show it.

    >>> print(printable("u1\x1b[2J\nnext\x9b"))
    u1\x1b[2J\x0anext\x9b
    """
    return text.translate(_CONTROL_ESCAPES)


def _printable_json(x):
    """A decoded record with :func:`printable` applied to every string in it (keys too)."""
    if isinstance(x, str):
        return printable(x)
    if isinstance(x, dict):
        return {printable(k): _printable_json(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_printable_json(v) for v in x]
    return x


#: What a record of the wrong shape raises while it is rendered (a producer other than the worker, a
#: truncated or hand-written record): tail prints it raw, marked, and goes on.
_MALFORMED = (KeyError, TypeError, ValueError, AttributeError, IndexError)


def format_signal(value: bytes, why: bool = False) -> str:
    """One line per signal: user, event, propensity, top categories; with ``why``, one more line per top
    category with its reasons (when the signal carries them). A record that is not JSON is printed as it
    is; JSON of the wrong shape is printed raw after ``MALFORMED``, so one bad record never stops tail.
    Control characters are printed as escapes (:func:`printable`) wherever they come from.

    >>> format_signal(b'{"top_categories": [{"category": "a"}], "user_id": "u"}')
    'MALFORMED {"top_categories": [{"category": "a"}], "user_id": "u"}'
    """
    try:
        s = _printable_json(orjson.loads(value))
    except orjson.JSONDecodeError:
        return _preview(value)
    try:
        return _format_signal(s, why)
    except _MALFORMED:
        return "MALFORMED " + _preview(value)


def _preview(value: bytes) -> str:
    return printable(value[:RAW_PREVIEW].decode("utf-8", "replace"))


def _format_signal(s, why: bool) -> str:
    if not isinstance(s, dict):
        raise TypeError(f"a record is a JSON object, not {type(s).__name__}")
    if "top_categories" in s:
        cats = ", ".join(f"{c['category']} {c['p']:.2f}" for c in s["top_categories"][:3])
        line = (
            f"{s['user_id'][:16]:<16} {s['event_id'][:14]:<14} seen={s['events_seen']:<4} "
            f"buy={s['purchase_propensity']:.3f}  {cats}"
        )
        if why:
            line += "".join(_why_line(c) for c in s["top_categories"])
        return line

    if "reason" in s:
        return f"DEAD LETTER {s['reason']:<14} p{s.get('partition')}@{s.get('offset')} {s.get('detail', '')[:60]}"
    return orjson.dumps(s).decode()


def _why_line(cat: dict) -> str:
    """``    lipstick 0.61  because last_category +8.00, in_cart +4.00 (...)``; the reasons of one category.

    >>> print(_why_line({"category": "bags", "p": 0.2, "why": [{"reason": "frequency", "logit": 0.35, "count": 3},
    ...     {"reason": "transition", "logit": -1.2, "from": "shoes"}]}).strip())
    bags                 0.20  because frequency +0.35 (3 events), transition -1.20 (from shoes)
    """
    reasons = cat.get("why")
    if reasons is None:
        return f"\n    {cat['category'][:20]:<20} {cat['p']:.2f}  (no why: the worker runs without DEMANDSTREAM_WHY_TOP)"
    parts = []
    for r in reasons:
        detail = f" ({r['count']} events)" if "count" in r else f" (from {r['from']})" if "from" in r else ""
        parts.append(f"{r['reason']} {r['logit']:+.2f}{detail}")
    return f"\n    {cat['category'][:20]:<20} {cat['p']:.2f}  because {', '.join(parts)}"


def tail(
    settings: Settings,
    topic: str | None = None,
    from_beginning: bool = False,
    max_records: int | None = None,
    timeout_s: float | None = None,
    out=sys.stdout,
    raw: bool = False,
    why: bool = False,
) -> int:
    """Print records until ``max_records`` or ``timeout_s`` (None = forever); returns how many were printed."""
    topic = topic or settings.topic_signals
    demand = topic == settings.topic_demand and not raw  # rendered as tables of windows
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    try:
        consumer = KafkaConsumer(
            bootstrap_servers=settings.bootstrap_servers,
            client_id="demandstream-tail",
            group_id=None,
            auto_offset_reset="earliest" if from_beginning else "latest",
            enable_auto_commit=False,
            # exactly-once workers write demand windows in transactions: never show an aborted one
            isolation_level="read_committed" if demand else "read_uncommitted",
            **settings.kafka_python_security(),
        )
    except UNREACHABLE:
        raise KafkaUnavailable(unreachable_message(settings)) from None
    if not wait_for_topic(consumer, topic, deadline):
        consumer.close()
        return 0
    consumer.subscribe([topic])
    if demand:
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        return tail_demand(consumer, settings, max_records, left, out)
    n = 0
    try:
        while (max_records is None or n < max_records) and (deadline is None or time.monotonic() < deadline):
            polled = consumer.poll(timeout_ms=200, max_records=500)
            for recs in polled.values():
                for r in recs:
                    print(
                        printable(r.value.decode("utf-8", "replace")) if raw else format_signal(r.value, why),
                        file=out,
                    )
                    n += 1
                    if max_records is not None and n >= max_records:
                        return n
    finally:
        consumer.close()
    return n


#: How often ``tail`` asks whether the topic it waits for exists yet.
TOPIC_WAIT_POLL_S = 1.0


def wait_for_topic(consumer, topic: str, deadline: float | None, err=None) -> bool:
    """Whether ``topic`` exists by ``deadline`` (monotonic; None: wait for ever), said once on ``err``
    (stderr) when it does not exist yet. Subscribed to a missing topic, the client logs an error on
    every poll, several a second, for as long as the topic is missing."""
    if topic in consumer.topics():
        return True
    print(
        f"tail: topic {topic} does not exist yet; waiting for it (a worker creates its topics when it starts)",
        file=err or sys.stderr,
    )
    while deadline is None or time.monotonic() < deadline:
        time.sleep(
            TOPIC_WAIT_POLL_S
            if deadline is None
            else min(TOPIC_WAIT_POLL_S, max(0.0, deadline - time.monotonic()))
        )
        if topic in consumer.topics():
            return True
    return False


# -- category demand (`tail --topic category-demand`) ------------------------------------------------

#: Categories per window in ``tail --topic category-demand``'s tables (the view's default top).
DEMAND_TABLE_TOP = 20


def tail_demand(consumer, settings: Settings, max_records: int | None, timeout_s: float | None, out) -> int:
    """Follow the ``category-demand`` topic, merging the partitions' records; print each window's table
    once every partition has closed it, and at the end the windows still incomplete. Returns how many
    records were read."""
    from demandstream.stream.engine.demand import DemandBoard, Rising

    parts = None
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while not parts and (deadline is None or time.monotonic() < deadline):
        parts = consumer.partitions_for_topic(settings.topic_demand)
        if not parts:
            consumer.poll(timeout_ms=200)
    rising = Rising(settings.demand_rising_ratio, settings.demand_rising_windows, settings.demand_rising_min)
    board = DemandBoard(len(parts or ()) or settings.partitions, rising)
    printed: set[int] = set()
    n = malformed = 0
    try:
        while (max_records is None or n < max_records) and (deadline is None or time.monotonic() < deadline):
            polled = consumer.poll(timeout_ms=200, max_records=5000)
            for recs in polled.values():
                for r in recs:
                    n += 1
                    try:
                        board.add(r.value)
                    except _MALFORMED:  # also orjson.JSONDecodeError, a ValueError
                        malformed += 1
            for w in board.windows():
                if w not in printed and board.complete(w):
                    printed.add(w)
                    print(format_demand_table(board.view(DEMAND_TABLE_TOP, w)), file=out)
    finally:
        consumer.close()
    for w in board.windows():
        if w not in printed:
            print(format_demand_table(board.view(DEMAND_TABLE_TOP, w)), file=out)
    if malformed:
        print(f"skipped {malformed} malformed record(s) of {settings.topic_demand}", file=out)
    return n


def format_demand_table(view: dict) -> str:
    """One window of ``GET /categories/demand`` (or the tail's merge) as a text table.

    >>> print(format_demand_table({"window_start": 0, "window_end": 300, "complete": True,
    ...     "partitions": 4, "partitions_reported": 4, "users": 3, "events": 7, "categories": [
    ...     {"category": "shoes", "expected": 1.5, "propensity": 0.25, "observed": 4, "purchases": 1,
    ...      "ratio": 2.0, "rising": True}]}))
    window 1970-01-01 00:00:00 to 00:05:00 UTC, 4/4 partitions, 3 users, 7 events
    category                              expected  propensity  observed  purchases   ratio  rising
    shoes                                    1.500       0.250         4          1    2.00  rising
    """
    import datetime as dt

    start, end = view["window_start"], view["window_end"]
    t0 = dt.datetime.fromtimestamp(start, dt.UTC)
    t1 = dt.datetime.fromtimestamp(end, dt.UTC)
    span = (
        f"{t0:%Y-%m-%d %H:%M:%S} to {t1:%H:%M:%S}"
        if t0.date() == t1.date()
        else f"{t0:%Y-%m-%d %H:%M:%S} to {t1:%Y-%m-%d %H:%M:%S}"
    )
    state = "" if view["complete"] else " (incomplete)"
    lines = [
        f"window {span} UTC, {view['partitions_reported']}/{view['partitions']} partitions{state}, "
        f"{view['users']} users, {view['events']} events",
        f"{'category':<36}{'expected':>10}{'propensity':>12}{'observed':>10}{'purchases':>11}{'ratio':>8}  rising",
    ]
    for c in view["categories"]:
        ratio = "-" if c["ratio"] is None else f"{c['ratio']:.2f}"
        lines.append(
            f"{printable(c['category'])[:35]:<36}{c['expected']:>10.3f}{c['propensity']:>12.3f}{c['observed']:>10}"
            f"{c['purchases']:>11}{ratio:>8}  {'rising' if c['rising'] else ''}".rstrip()
        )
    return "\n".join(lines)
