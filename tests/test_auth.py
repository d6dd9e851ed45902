"""Who may use the API (tornado_gateway/auth.py): the start-up rule, the check, the masking,
and the gateway's routes with a token (real Application, real echo upstream)."""
from __future__ import annotations

import ipaddress
import json
import logging
import os
import subprocess
import sys

import pytest
from hypothesis import given, settings, strategies as st

from tornado_gateway import PythonBridge, make_app
from tornado_gateway.auth import (OPEN, Access, TokenFileError, access_for, is_loopback,
                                  read_token_file, redact, resolve_access)
from tornado_gateway.config import FlaskConfig, GatewayConfig, load_config

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "child_scripts"))
from proxy_gateway import FakeBridge  # noqa: E402

ERROR_KEYS = {"error", "message", "suggestion", "timestamp"}
TOKEN = "s3cret-token-0123456789abcdef"


def _fixed() -> str:
    return "generated-token"


# --- the start-up rule -------------------------------------------------------------------

@pytest.mark.parametrize("mode,host,token,expected_token,source", [
    ("auto", "127.0.0.1", None, None, "loopback"),
    ("auto", "::1", None, None, "loopback"),
    ("auto", "localhost", None, None, "loopback"),
    ("auto", "0.0.0.0", None, "generated-token", "generated"),
    ("auto", "::", None, "generated-token", "generated"),
    ("auto", "192.168.1.20", None, "generated-token", "generated"),
    ("auto", "myhost.example", None, "generated-token", "generated"),
    ("auto", "127.0.0.1", TOKEN, TOKEN, "GATEWAY_TOKEN"),
    ("auto", "0.0.0.0", TOKEN, TOKEN, "GATEWAY_TOKEN"),
    ("token", "127.0.0.1", None, "generated-token", "generated"),
    ("token", "127.0.0.1", TOKEN, TOKEN, "GATEWAY_TOKEN"),
    ("none", "0.0.0.0", None, None, "GATEWAY_AUTH=none"),
    ("none", "0.0.0.0", TOKEN, None, "GATEWAY_AUTH=none"),
])
def test_the_rule(mode, host, token, expected_token, source):
    access = resolve_access(mode, host, token, None, _fixed)
    assert access.token == expected_token
    assert access.source == source
    assert access.generated == (source == "generated")


@settings(max_examples=200)
@given(st.one_of(st.ip_addresses(v=4), st.ip_addresses(v=6)))
def test_auto_protects_every_address_but_loopback(address):
    access = resolve_access("auto", str(address), make_token=_fixed)
    assert (access.token is None) == ipaddress.ip_address(address).is_loopback
    assert is_loopback(str(address)) == address.is_loopback


def test_generated_tokens_are_long_and_differ():
    first = resolve_access("token", "127.0.0.1")
    second = resolve_access("token", "127.0.0.1")
    assert first.token != second.token and len(first.token) >= 40


def test_token_file(tmp_path):
    path = tmp_path / "token"
    path.write_text("\n  %s  \nsecond line\n" % TOKEN)
    access = resolve_access("auto", "0.0.0.0", token_file=str(path), make_token=_fixed)
    assert access.token == TOKEN and str(path) in access.source
    assert read_token_file(str(path)) == TOKEN


@pytest.mark.parametrize("content", [None, "", "\n  \n"])
def test_unreadable_or_empty_token_file_is_an_error(tmp_path, content):
    path = tmp_path / "token"
    if content is not None:
        path.write_text(content)
    with pytest.raises(TokenFileError) as info:
        resolve_access("auto", "0.0.0.0", token_file=str(path), make_token=_fixed)
    assert str(path) in str(info.value)


def test_config_settings_never_print_the_token():
    config = load_config({"GATEWAY_TOKEN": TOKEN, "GATEWAY_AUTH": "token"})
    assert config.token == TOKEN and config.auth == "token"
    assert TOKEN not in repr(config)
    assert access_for(config).token == TOKEN
    warnings = []
    load_config({"GATEWAY_AUTH": "sometimes"}, warn=warnings.append)
    assert warnings and "GATEWAY_AUTH" in warnings[0] and "'auto'" in warnings[0]


# --- the check ---------------------------------------------------------------------------

def test_bearer_check():
    access = Access(TOKEN, "GATEWAY_TOKEN")
    assert access.allows("Bearer " + TOKEN)
    assert access.allows("bearer  %s " % TOKEN)
    for bad in (None, "", TOKEN, "Bearer", "Bearer ", "Basic " + TOKEN, "Bearer " + TOKEN[:-1],
                "Bearer " + TOKEN + "x", "Token " + TOKEN):
        assert not access.allows(bad), bad
    error = access.check("Bearer nope")
    assert error.status == 401 and error.error == "unauthorized"
    assert ("WWW-Authenticate", 'Bearer realm="tornado_gateway"') in error.headers
    assert "does not carry it" in error.message and TOKEN not in error.message
    assert "no Authorization header" in access.check(None).message
    assert OPEN.allows(None) and OPEN.check("anything") is None


@settings(max_examples=300)
@given(st.text(min_size=1, max_size=40).filter(lambda t: t.strip() == t and " " not in t),
       st.text(max_size=60))
def test_only_the_exact_token_passes(token, presented):
    access = Access(token, "GATEWAY_TOKEN")
    assert access.allows("Bearer " + presented) == (presented.strip() == token)


@settings(max_examples=300)
@given(st.text(alphabet=st.characters(blacklist_characters="&#", min_codepoint=33,
                                      max_codepoint=0x2FF), min_size=8, max_size=40),
       st.sampled_from(["/?token=%s", "/api/x?a=1&token=%s&b=2", "/p?TOKEN=%s#frag"]))
def test_redact_masks_the_token_and_keeps_the_rest(secret, shape):
    uri = shape % secret
    masked = redact(uri)
    assert secret not in masked.replace("[redacted]", "")
    assert masked == shape % "[redacted]"


def test_redact_leaves_other_parameters():
    assert redact("/api/deepfake/stats?tokens=1&mytoken=2") == "/api/deepfake/stats?tokens=1&mytoken=2"


# --- the routes with a token ---------------------------------------------------------------

@pytest.fixture(scope="module")
def echo_url():
    proc = subprocess.Popen([sys.executable, os.path.join(HERE, "child_scripts", "echo_server.py"),
                             "--host", "127.0.0.1", "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    assert line.startswith("LISTENING"), line
    yield "http://127.0.0.1:%d" % int(line.split()[1])
    proc.terminate()
    proc.wait(10)


@pytest.fixture
def access():
    return Access(TOKEN, "GATEWAY_TOKEN")


class StatusBridge(FakeBridge):
    """The echo as the service, with a two-worker status holding what must stay private."""

    def status(self):
        worker = {"state": "ready", "ready": True, "pid": 4242, "port": 5001,
                  "last_error": {"message": "secret path /srv/x"}}
        return dict(worker, workers=[worker, dict(worker, ready=False, state="exited")])


@pytest.fixture
def app(echo_url, access):
    bridge = StatusBridge(echo_url)
    return make_app(bridge, GatewayConfig(mode="production", proxy_timeout=10000), access)


def _json(resp):
    return json.loads(resp.body)


async def test_api_without_the_token_is_a_json_401(http_server_client):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic " + TOKEN}):
        resp = await http_server_client.fetch("/api/deepfake/stats", headers=headers,
                                              raise_error=False)
        assert resp.code == 401, headers
        assert resp.headers["WWW-Authenticate"] == 'Bearer realm="tornado_gateway"'
        assert resp.headers["Content-Type"].startswith("application/json")
        assert set(_json(resp)) == ERROR_KEYS and _json(resp)["error"] == "unauthorized"
    # an upload is refused before its body is read, and never reaches the service
    resp = await http_server_client.fetch("/api/deepfake/analyze", method="POST",
                                          body=b"x" * 100000, raise_error=False)
    assert resp.code == 401


async def test_api_with_the_token_is_proxied_without_it(http_server_client):
    resp = await http_server_client.fetch("/api/deepfake/echo?x=1",
                                          headers={"Authorization": "Bearer " + TOKEN,
                                                   "X-Mine": "kept"})
    assert resp.code == 200
    seen = {name.lower(): value for name, value in _json(resp)["headers"]}
    assert "authorization" not in seen  # the gateway's token is not forwarded
    assert seen["x-mine"] == "kept"


async def test_status_is_open_but_says_little_without_the_token(http_server_client):
    resp = await http_server_client.fetch("/api/gateway/status")
    data = _json(resp)
    assert resp.code == 200 and data["auth"]["required"] is True
    assert set(data["service"]) == {"state", "ready", "workers_ready", "workers"}
    assert data["service"] == {"state": "ready", "ready": True, "workers_ready": 1,
                               "workers": 2}
    assert "gateway" not in data and b"4242" not in resp.body and b"secret" not in resp.body
    full = _json(await http_server_client.fetch(
        "/api/gateway/status", headers={"Authorization": "Bearer " + TOKEN}))
    assert full["gateway"]["pid"] == os.getpid() and "auth" not in full
    assert full["service"]["pid"] == 4242


async def test_the_page_is_open(http_server_client):
    resp = await http_server_client.fetch("/?token=" + TOKEN)
    assert resp.code == 200 and b"<html" in resp.body.lower()


async def test_logged_urls_mask_the_token(http_server_client, caplog):
    with caplog.at_level(logging.INFO, logger="tornado.access"):
        await http_server_client.fetch("/nothing/here?token=" + TOKEN, raise_error=False)
    lines = [r.getMessage() for r in caplog.records if r.name == "tornado.access"]
    assert any("token=[redacted]" in line for line in lines), lines
    assert not any(TOKEN in line for line in lines)


def test_loopback_default_stays_open():
    app = make_app(PythonBridge(FlaskConfig(port=1)), GatewayConfig())
    assert app.settings["gateway_access"].token is None
    protected = make_app(PythonBridge(FlaskConfig(port=1)), GatewayConfig(auth="token"))
    assert protected.settings["gateway_access"].generated


# --- serve(): the decision made once at start-up -------------------------------------------

def test_serve_prints_the_url_with_a_generated_token_and_enforces_it(gw_fakes, caplog):
    import asyncio
    import re

    from tornado.httpclient import AsyncHTTPClient

    from tornado_gateway.server import serve

    bridge = gw_fakes.make_bridge(gw_fakes.FakeControl())

    async def main():
        stop = asyncio.Event()
        ports = []
        task = asyncio.ensure_future(serve(GatewayConfig(port=0, auth="token"), bridge=bridge,
                                           install_signals=False, stop_event=stop,
                                           on_listening=ports.append))
        await asyncio.wait_for(bridge.wait_until_ready(None), 5)
        printed = [r.getMessage() for r in caplog.records if "?token=" in r.getMessage()]
        token = re.search(r"\?token=(\S+)", printed[0]).group(1)
        client = AsyncHTTPClient(force_instance=True)
        base = "http://127.0.0.1:%d" % ports[0]
        try:
            without = await client.fetch(base + "/api/deepfake/stats", raise_error=False)
            wrong = await client.fetch(base + "/api/deepfake/stats", raise_error=False,
                                       headers={"Authorization": "Bearer " + token[:-1]})
            full = await client.fetch(base + "/api/gateway/status",
                                      headers={"Authorization": "Bearer " + token})
        finally:
            client.close()
        stop.set()
        return printed, token, without.code, wrong.code, json.loads(full.body), await task

    with caplog.at_level(logging.INFO, logger="tornado_gateway"):
        printed, token, without, wrong, full, code = asyncio.run(main())
    assert len(printed) == 1 and printed[0].rstrip().endswith("/?token=" + token)
    assert len(token) >= 40
    assert (without, wrong, code) == (401, 401, 0)
    assert "gateway" in full  # the full status with the token
    # printed once, at start-up, and nowhere else
    assert sum(token in r.getMessage() for r in caplog.records) == 1


def test_serve_refuses_to_start_with_an_unreadable_token_file(gw_fakes, tmp_path, caplog):
    import asyncio

    from tornado_gateway.server import serve

    control = gw_fakes.FakeControl()
    bridge = gw_fakes.make_bridge(control)
    missing = str(tmp_path / "missing-token")
    with caplog.at_level(logging.ERROR, logger="tornado_gateway"):
        code = asyncio.run(serve(GatewayConfig(port=0, token_file=missing), bridge=bridge,
                                 install_signals=False, stop_event=asyncio.Event()))
    assert code == 2 and control.calls == []  # nothing started, nothing served open
    assert any(missing in r.getMessage() and "GATEWAY_TOKEN" in r.getMessage()
               for r in caplog.records)
