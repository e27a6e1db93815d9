"""The input event of DESIGN §3: its schema, parsing and validation.

Every event that enters demandstream, from Kafka or from a file, becomes an :class:`Event`
through :func:`parse_event` (raw bytes) or :func:`validate_event` (an already decoded object).
Anything else raises :class:`BadEvent` carrying a reason code from :data:`REASONS`; the stream
turns that into a dead letter with the same code.

>>> e = parse_event(b'{"event_id": "e1", "user_id": "u1", "ts": 1700000000, "type": "pv", "item_id": "i9"}')
>>> (e.type, e.item_id, e.category)
('view', 'i9', None)
"""

from __future__ import annotations

from dataclasses import dataclass

#: Event types of DESIGN §3, in the order used for their integer index everywhere.
EVENT_TYPES: tuple[str, ...] = ("view", "search", "add_to_cart", "remove_from_cart", "favorite", "purchase")
TYPE_INDEX: dict[str, int] = {t: i for i, t in enumerate(EVENT_TYPES)}


class BadEvent(ValueError):
    """An input that is not a valid event. ``reason`` is a code from :data:`REASONS`."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass(slots=True, frozen=True)
class Event:
    """One valid clickstream event, normalized (type names mapped, ts in unix seconds)."""

    event_id: str
    user_id: str
    ts: float
    type: str
    item_id: str | None = None
    category: str | None = None
    price: float | None = None
    query: str | None = None
    session_id: str | None = None

    @property
    def type_index(self) -> int:
        return TYPE_INDEX[self.type]

    def to_dict(self) -> dict:
        """The event as a JSON-ready dict in the schema of DESIGN §3."""
        return {
            "event_id": self.event_id,
            "user_id": self.user_id,
            "ts": self.ts,
            "type": self.type,
            "item_id": self.item_id,
            "category": self.category,
            "price": self.price,
            "query": self.query,
            "session_id": self.session_id,
        }
