"""The web settings: the advertised URL, the bearer token (from a file or the environment), never shown."""

from __future__ import annotations

import logging

import pytest

from demandstream.stream.settings import Settings, SettingsError
from demandstream.stream.worker.processes import child_settings_env

pytestmark = pytest.mark.timeout(30)

TOKEN = "0123456789abcdef0123456789abcdef"


def test_the_advertised_url_defaults_to_the_bind_address_and_is_refused_for_a_wildcard():
    assert Settings.from_env({}).web_url() == "http://127.0.0.1:6066"
    env = {"DEMANDSTREAM_WEB_HOST": "0.0.0.0", "DEMANDSTREAM_WEB_PORT": "7000"}
    s = Settings.from_env(env)  # other commands (replay, tail) with the worker's environment still work
    with pytest.raises(SettingsError, match="DEMANDSTREAM_WEB_ADVERTISED_URL") as e:
        s.web_url()
    assert "\n" not in str(e.value)
    url = "http://demandstream-1.demandstream-headless:7000"
    assert Settings.from_env({**env, "DEMANDSTREAM_WEB_ADVERTISED_URL": url}).web_url() == url


@pytest.mark.parametrize(
    "url",
    [
        "demandstream-0:6066",
        "https://demandstream-0:6066",  # the worker serves plain HTTP; Faust keeps the request's scheme
        "http://demandstream-0",  # no port
        "http://0.0.0.0:6066",
        "http://[::]:6066",
        "http://demandstream-0:6066/api",
        "http://demandstream-0:6066?x=1",
        "http://user:pw@demandstream-0:6066",
        "http://demandstream-0:99999",
        "http://:6066",
    ],
)
def test_an_advertised_url_other_than_http_host_port_is_refused(url):
    with pytest.raises(SettingsError, match="DEMANDSTREAM_WEB_ADVERTISED_URL"):
        Settings.from_env({"DEMANDSTREAM_WEB_ADVERTISED_URL": url})


def test_no_token_by_default():
    assert Settings().read_web_token() is None


def test_token_from_the_environment_or_a_file_and_not_both(tmp_path):
    assert Settings.from_env({"DEMANDSTREAM_WEB_TOKEN": TOKEN}).read_web_token() == TOKEN.encode()
    path = tmp_path / "token"
    path.write_text(f"  {TOKEN}\n")
    assert Settings.from_env({"DEMANDSTREAM_WEB_TOKEN_FILE": str(path)}).read_web_token() == TOKEN.encode()
    with pytest.raises(SettingsError, match="not both"):
        Settings.from_env({"DEMANDSTREAM_WEB_TOKEN": TOKEN, "DEMANDSTREAM_WEB_TOKEN_FILE": str(path)})


@pytest.mark.parametrize("bad", ["short", "has space in it 0123456789", "x" * 15, "é" * 20, "tok\x00" * 5])
def test_a_weak_or_malformed_token_is_refused_without_showing_it(tmp_path, bad):
    with pytest.raises(SettingsError) as e:
        Settings.from_env({"DEMANDSTREAM_WEB_TOKEN": bad})
    assert bad not in str(e.value)
    path = tmp_path / "token"
    path.write_bytes(bad.encode())
    with pytest.raises(SettingsError) as e:
        Settings.from_env({"DEMANDSTREAM_WEB_TOKEN_FILE": str(path)}).read_web_token()
    assert bad not in str(e.value) and str(path) in str(e.value)


def test_a_missing_token_file_is_one_settings_error(tmp_path):
    s = Settings.from_env({"DEMANDSTREAM_WEB_TOKEN_FILE": str(tmp_path / "absent")})
    with pytest.raises(SettingsError, match="DEMANDSTREAM_WEB_TOKEN_FILE: cannot read"):
        s.read_web_token()


def test_the_token_is_not_in_the_settings_repr(caplog):
    s = Settings(web_token=TOKEN)
    caplog.set_level(logging.DEBUG)
    logging.getLogger("t").info("settings %s %r", s, s)
    assert TOKEN not in repr(s) and TOKEN not in str(s) and TOKEN not in caplog.text


def test_each_of_several_processes_advertises_its_own_port():
    s = Settings(web_host="0.0.0.0", web_port=7000, web_advertised_url="http://node-a:7000", processes=3)
    urls = [child_settings_env(s, i, {})["DEMANDSTREAM_WEB_ADVERTISED_URL"] for i in range(3)]
    assert urls == ["http://node-a:7000", "http://node-a:7001", "http://node-a:7002"]
    children = [Settings.from_env(child_settings_env(s, i, {})) for i in range(3)]
    assert [c.web_url() for c in children] == urls
    # without an advertised URL each child's default follows its own bind port
    plain = Settings(web_port=7000, processes=2)
    assert Settings.from_env(child_settings_env(plain, 1, {})).web_url() == "http://127.0.0.1:7001"
