"""The worker's HTTP surface without Kafka: which views answer, bearer-token authentication, the advertised URL.

The Faust app is built as the worker builds it (``create_app``, ``attach``, ``attach_views``) and its aiohttp
application served by aiohttp's test server. No consumer or producer starts, so there is no partition
assignment: the router is told every key is this worker's (``SameNode``), and an authenticated
``/users/{id}/demand`` answers 404 (unknown user) from the empty table. Forwarding to the owner is tested on
the real broker in tests/integration/test_security.py.
"""

from __future__ import annotations

import asyncio
import logging

import pytest
from aiohttp.test_utils import TestClient, TestServer
from faust.exceptions import SameNode

from demandstream.stream.settings import Settings, SettingsError
from demandstream.stream.worker.agents import attach
from demandstream.stream.worker.app import create_app
from demandstream.stream.worker.web import attach_views, bearer_token_matches
from tests.unit.stream.scorers import tiny_scorer

pytestmark = pytest.mark.timeout(60)

TOKEN = "s3cret-token-for-tests"


def _settings(tmp_path, **kw) -> Settings:
    return Settings(store="memory", data_dir=str(tmp_path / "data"), app_id=f"web-{tmp_path.name}", **kw)


def _get_all(settings: Settings, requests: list[tuple[str, dict]]) -> list[tuple[int, str, dict]]:
    """Serve the worker's views and GET each (path, headers): [(status, body, response headers)]."""
    c = create_app(settings)
    attach_views(c, attach(c, tiny_scorer()))

    async def every_key_is_local(*args, **kwargs):
        raise SameNode()

    c.app.router.route_req = every_key_is_local

    async def run():
        web_app = await c.app.web.wsgi()
        async with TestClient(TestServer(web_app)) as client:
            out = []
            for path, headers in requests:
                async with client.get(path, headers=headers) as r:
                    out.append((r.status, await r.text(), dict(r.headers)))
            return out

    return asyncio.run(asyncio.wait_for(run(), 30))


def test_faust_table_and_router_views_are_not_served(tmp_path):
    paths = ["/table/", "/table/user-state/", "/table/user-state/u:u1/", "/router/", "/router/user-state/"]
    paths += ["/graph/", "/stats/", "/assignment/", "/performance/"]
    answers = _get_all(_settings(tmp_path), [(p, {}) for p in paths])
    assert [status for status, _, _ in answers] == [404] * len(paths), list(zip(paths, answers, strict=True))


def test_without_a_token_the_user_view_is_open(tmp_path):
    ((status, _, _),) = _get_all(_settings(tmp_path), [("/users/u1/demand", {})])
    assert status == 404  # nothing required; an unknown user


def test_with_a_token_the_user_view_requires_it_and_probes_and_metrics_stay_open(tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    requests = [
        ("/users/u1/demand", {}),
        ("/users/u1/demand", {"Authorization": "Bearer wrong"}),
        ("/users/u1/demand", {"Authorization": f"Basic {TOKEN}"}),
        ("/users/u1/demand", {"Authorization": f"Bearer {TOKEN}x"}),
        ("/users/u1/demand", {"Authorization": f"Bearer {TOKEN}"}),
        ("/users/u1/demand", {"Authorization": f"bearer  {TOKEN}"}),
        ("/healthz", {}),
        ("/readyz", {}),
        ("/metrics", {}),
    ]
    answers = _get_all(_settings(tmp_path, web_token=TOKEN), requests)
    statuses = [status for status, _, _ in answers]
    assert statuses[:4] == [401] * 4
    assert statuses[4:6] == [404, 404]  # past authentication: an unknown user
    assert statuses[6] == 200 and statuses[7] in (200, 503) and statuses[8] == 200
    assert answers[0][2]["WWW-Authenticate"].startswith("Bearer")
    assert TOKEN not in caplog.text


def test_token_from_a_file(tmp_path):
    path = tmp_path / "token"
    path.write_text(TOKEN + "\n")  # `kubectl create secret --from-file` keeps a trailing newline
    s = _settings(tmp_path, web_token_file=str(path))
    answers = _get_all(
        s, [("/users/u1/demand", {}), ("/users/u1/demand", {"Authorization": f"Bearer {TOKEN}"})]
    )
    assert [status for status, _, _ in answers] == [401, 404]


def test_advertised_url_is_faust_canonical_url_and_the_bind_address_stays_separate(tmp_path):
    url = "http://demandstream-0.demandstream-headless:6066"
    c = create_app(_settings(tmp_path, web_host="0.0.0.0", web_advertised_url=url))
    assert str(c.app.conf.canonical_url) == url
    assert c.app.conf.web_bind == "0.0.0.0"
    assert c.app.conf.web_port == 6066


def test_a_wildcard_bind_address_without_an_advertised_url_is_refused(tmp_path):
    for host in ("0.0.0.0", "::", ""):
        with pytest.raises(SettingsError, match="DEMANDSTREAM_WEB_ADVERTISED_URL"):
            create_app(_settings(tmp_path, web_host=host))


def test_default_advertised_url_is_the_bind_address(tmp_path):
    c = create_app(_settings(tmp_path, web_port=7001))
    assert str(c.app.conf.canonical_url) == "http://127.0.0.1:7001"


@pytest.mark.parametrize(
    ("header", "ok"),
    [
        (None, False),
        ("", False),
        ("Bearer", False),
        ("Bearer ", False),
        (f"Bearer {TOKEN}", True),
        (f"bearer {TOKEN}", True),
        (f"BEARER   {TOKEN}  ", True),
        (f"Bearer {TOKEN[:-1]}", False),
        (f"Bearer {TOKEN} extra", False),
        (f"Basic {TOKEN}", False),
        (f"Bearer {TOKEN}é", False),
    ],
)
def test_bearer_token_matches(header, ok):
    assert bearer_token_matches(header, TOKEN.encode()) is ok
