"""The ``why`` of each user's latest signal, kept for the query API (docs/ARCHITECTURE.md §Signals).

The user state holds the last prediction's top categories and propensity but not its explanation: that
would put 10 to 30 reasons per user into a record bounded at 1.2 KB. The engine remembers the
explanation of the latest signal of recently active users instead, in memory and bounded, and
``/users/{id}/demand`` shows it when it belongs to the prediction the state holds (same model, same
event count). After a restart or a rebalance the view says ``"why": null`` until the user's next event.

>>> w = LatestWhy(max_users=2)
>>> w.put("u1", 3, "v1", [[{"reason": "in_cart", "logit": 4.0}]])
>>> w.get("u1", 3, "v1"), w.get("u1", 4, "v1")
([[{'reason': 'in_cart', 'logit': 4.0}]], None)
>>> w.put("u2", 1, "v1", []); w.put("u3", 1, "v1", [])
>>> w.get("u1", 3, "v1") is None, len(w)
(True, 2)
"""

from __future__ import annotations

from collections import OrderedDict

import orjson

#: Users whose latest explanation a worker keeps (least recently active dropped first). An entry is
#: the encoded JSON, about 0.3-1 KB with the default top 5 and 3 reasons, so at most ~50 MB.
WHY_CACHE_USERS = 50_000


class LatestWhy:
    """A bounded LRU map: user (id or pseudonym) -> the ``why`` of its latest prediction."""

    def __init__(self, max_users: int = WHY_CACHE_USERS):
        self.max_users = max_users
        self._entries: OrderedDict[str, tuple[int, str, bytes]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def put(self, user: str, events_seen: int, model_version: str, why: list[list[dict]]) -> None:
        self._entries[user] = (events_seen, model_version, orjson.dumps(why))
        self._entries.move_to_end(user)
        if len(self._entries) > self.max_users:
            self._entries.popitem(last=False)

    def get(self, user: str, events_seen: int, model_version: str) -> list[list[dict]] | None:
        """The explanation of the prediction made after the user's ``events_seen``-th event, if known."""
        entry = self._entries.get(user)
        if entry is None or entry[0] != events_seen or entry[1] != model_version:
            return None
        return orjson.loads(entry[2])

    def forget(self, user: str) -> None:
        """An erased user leaves no explanation behind."""
        self._entries.pop(user, None)
