"""HTTP views on the worker's web port: /metrics, /healthz, /readyz, /users/{user_id}/demand, and
/categories/demand (stream/worker/demand.py, the same token rule).

These five are all the port serves (Faust's own views are off, see ``create_app``). With a token configured
(``DEMANDSTREAM_WEB_TOKEN_FILE`` or ``DEMANDSTREAM_WEB_TOKEN``), ``/users/{id}/demand`` answers 401 unless
the request carries ``Authorization: Bearer <token>``; it is checked before the request is forwarded to the
user's owner and again by the owner (the forwarded request keeps its headers). The probes and ``/metrics``
stay open: kubelet and Prometheus call them, and they show no user's data (docs/OPERATIONS.md §Security).
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Awaitable, Callable
from functools import wraps

import numpy as np
from faust.web import Request, Response, View

from demandstream.model.core.scoring import Scorer
from demandstream.model.core.state import StateFormatError, UserState, unpack
from demandstream.stream.engine.records import state_key
from demandstream.stream.worker.agents import Pipeline
from demandstream.stream.worker.app import Components
from demandstream.stream.worker.demand import attach_demand_view

logger = logging.getLogger(__name__)

# aiohttp refuses a charset inside content_type; Prometheus assumes UTF-8 anyway.
PROMETHEUS_CONTENT_TYPE = "text/plain; version=0.0.4"


#: The challenge of a 401 (RFC 6750).
WWW_AUTHENTICATE = 'Bearer realm="demandstream"'

#: Bind addresses that only this machine reaches: no warning about an open /users view there.
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})

Handler = Callable[..., Awaitable[Response]]


def bearer_token_matches(header: str | None, token: bytes) -> bool:
    """Whether an ``Authorization`` header value is ``Bearer <token>`` (scheme in any case), compared in
    constant time.

    >>> bearer_token_matches("Bearer abc", b"abc"), bearer_token_matches("Basic abc", b"abc")
    (True, False)
    """
    if not header:
        return False
    scheme, _, credentials = header.strip().partition(" ")
    if scheme.lower() != "bearer":
        return False
    try:
        given = credentials.strip().encode("ascii")
    except UnicodeEncodeError:
        return False
    return hmac.compare_digest(given, token)


def require_token(token: bytes | None) -> Callable[[Handler], Handler]:
    """A view decorator answering 401 to a request without the bearer token (nothing when ``token`` is None).

    Neither the token nor the request's header is logged or echoed.
    """

    def decorate(fun: Handler) -> Handler:
        if token is None:
            return fun

        @wraps(fun)
        async def checked(self: View, request: Request, *args, **kwargs) -> Response:
            if not bearer_token_matches(request.headers.get("Authorization"), token):
                return self.json(
                    {"error": "unauthorized"}, status=401, headers={"WWW-Authenticate": WWW_AUTHENTICATE}
                )
            return await fun(self, request, *args, **kwargs)

        return checked

    return decorate


def attach_views(c: Components, pipeline: Pipeline) -> None:
    app = c.app
    engine = pipeline.engine
    token = c.settings.read_web_token()
    if token is None and c.settings.web_host not in LOOPBACK_HOSTS:
        logger.warning(
            "/users/{id}/demand is open: no DEMANDSTREAM_WEB_TOKEN_FILE or DEMANDSTREAM_WEB_TOKEN is set"
        )

    @app.page("/metrics")
    async def metrics(self: View, request: Request) -> Response:
        return self.bytes(c.metrics.exposition(), content_type=PROMETHEUS_CONTENT_TYPE)

    @app.page("/healthz")
    async def healthz(self: View, request: Request) -> Response:
        return self.json({"status": "ok"})

    @app.page("/readyz")
    async def readyz(self: View, request: Request) -> Response:
        recovery = app.tables.recovery
        ready = recovery.completed.is_set() and not app.rebalancing and not recovery.in_recovery
        return self.json({"ready": ready}, status=200 if ready else 503)

    @app.page("/users/{user_id}/demand")
    @require_token(token)  # outermost: a request without the token is never forwarded
    @app.table_route(table=c.table, match_info="user_id")
    async def demand(self: View, request: Request, user_id: str) -> Response:
        uid = engine.pseudonymizer.user(user_id) if engine.pseudonymizer else user_id
        raw = pipeline.store.get(state_key(uid))
        if raw is None:
            return self.json({"error": "unknown user", "user_id": user_id}, status=404)
        try:
            s = unpack(raw)
        except StateFormatError as exc:
            return self.json({"error": str(exc)}, status=500)
        return self.json(
            {
                "user_id": user_id,
                "model_version": s.model_version,
                "events_seen": s.events_seen,
                "last_ts": s.last_ts,
                **demand_view(engine.scorer, s, engine.latest_why.get(uid, s.events_seen, s.model_version)),
            }
        )

    # GET /categories/demand: the merged category demand of every worker, same token rule
    attach_demand_view(c, require_token(token))


def recent_category_names(scorer: Scorer, s: UserState) -> list[str]:
    """Names of the categories in a state's history slots, most recently seen first.

    Slots hold category hashes: a vocabulary category is named by its index, any other by
    :meth:`Scorer.category_name` of minus its hash (its name when this worker saw it, else ``#hash``).
    """
    slots = sorted(
        ((last, h) for h, last in zip(s.hist_cats, s.hist_last, strict=True) if h > 0), reverse=True
    )
    hashes = [h for _last, h in slots]
    index = scorer.vocab.index_of_hashes(np.array(hashes, dtype=np.int64)).tolist() if hashes else []
    return [scorer.category_name(i if i > 0 else -h) for h, i in zip(hashes, index, strict=True)]


def demand_view(scorer: Scorer, s: UserState, why: list[list[dict]] | None = None) -> dict:
    """The demand part of ``/users/{id}/demand``: the last prediction and the recent categories, named.

    With ``why_top`` > 0 each top category has a ``why``: its explanation when this worker made the
    prediction the state holds (:class:`~demandstream.stream.engine.why.LatestWhy`), else null.
    """
    top = [{"category": scorer.category_name(code), "p": p} for code, p in s.last_top]
    if scorer.why_top:
        for i, t in enumerate(top):
            t["why"] = why[i] if why is not None and i < len(why) else None
    return {
        "top_categories": top,
        "purchase_propensity": s.last_propensity,
        "recent_categories": recent_category_names(scorer, s),
    }
