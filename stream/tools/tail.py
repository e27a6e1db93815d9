"""``demandstream tail``: follow a topic (signals by default) and print its records readably."""

from __future__ import annotations

import sys
import time

import orjson
from kafka import KafkaConsumer

from demandstream.stream.admin import UNREACHABLE, KafkaUnavailable, unreachable_message
from demandstream.stream.settings import Settings


def format_signal(value: bytes, why: bool = False) -> str:
    """One line per signal: user, event, propensity, top categories; with ``why``, one more line per top
    category with its reasons (when the signal carries them)."""
    try:
        s = orjson.loads(value)
    except orjson.JSONDecodeError:
        return value[:200].decode("utf-8", "replace")
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
    try:
        consumer = KafkaConsumer(
            topic,
            bootstrap_servers=settings.bootstrap_servers,
            client_id="demandstream-tail",
            group_id=None,
            auto_offset_reset="earliest" if from_beginning else "latest",
            enable_auto_commit=False,
            **settings.kafka_python_security(),
        )
    except UNREACHABLE:
        raise KafkaUnavailable(unreachable_message(settings)) from None
    n = 0
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    try:
        while (max_records is None or n < max_records) and (deadline is None or time.monotonic() < deadline):
            polled = consumer.poll(timeout_ms=200, max_records=500)
            for recs in polled.values():
                for r in recs:
                    print(
                        r.value.decode("utf-8", "replace") if raw else format_signal(r.value, why), file=out
                    )
                    n += 1
                    if max_records is not None and n >= max_records:
                        return n
    finally:
        consumer.close()
    return n
