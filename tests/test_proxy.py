"""HTTP behaviour of the streaming proxy (tornado_gateway/proxy.py), contract bullet by bullet.

The upstream is ``tests/child_scripts/echo_server.py`` run as a real subprocess (it echoes what
it received as JSON); the bridge is a fake whose state the test sets. Odd request targets and
aborted uploads are sent over raw sockets, because HTTP clients normalise or refuse them.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
import uuid
from typing import Any, List, Tuple

import pytest
import tornado.web
from tornado import httputil
from tornado.httpclient import AsyncHTTPClient, HTTPClientError
from tornado.iostream import StreamClosedError
from tornado.simple_httpclient import SimpleAsyncHTTPClient
from tornado.tcpclient import TCPClient
from tornado.tcpserver import TCPServer

from tornado_gateway.config import GatewayConfig
from tornado_gateway.proxy import (
    check_target, client_response_headers, has_request_body,
    UpstreamClient, proxy_routes, upstream_request_headers,
)
from tornado_gateway.supervisor.state import BridgeState

CHILD_SCRIPTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "child_scripts")
sys.path.insert(0, CHILD_SCRIPTS)
from proxy_gateway import FakeBridge  # noqa: E402

ERROR_KEYS = {"error", "message", "suggestion", "timestamp"}
TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


# --- fixtures and helpers ------------------------------------------------------------------

def start_script(name: str, *args: str) -> Tuple[subprocess.Popen, int]:
    """Start a script from child_scripts/ and wait for its ``LISTENING <port>`` line."""
    proc = subprocess.Popen([sys.executable, os.path.join(CHILD_SCRIPTS, name), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    if not line.startswith("LISTENING"):
        proc.kill()
        raise RuntimeError("%s did not start: %r %s" % (name, line, proc.stderr.read()))
    return proc, int(line.split()[1])


def stop_script(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


@pytest.fixture(scope="module")
def echo_url():
    proc, port = start_script("echo_server.py", "--host", "127.0.0.1", "--port", "0")
    yield "http://127.0.0.1:%d" % port
    stop_script(proc)


@pytest.fixture
def config_overrides() -> dict:
    return {}


@pytest.fixture
def config(config_overrides) -> GatewayConfig:
    values = dict(max_body=4 << 20, proxy_timeout=10000, connect_timeout=2000, ready_wait=2000)
    values.update(config_overrides)
    return GatewayConfig(**values)


@pytest.fixture
def bridge(echo_url) -> FakeBridge:
    return FakeBridge(echo_url)


@pytest.fixture
def proxy_client():
    """The proxy's client class: the gateway's default (None); PROXY_TEST_CLIENT=tornado.
    simple_httpclient.SimpleAsyncHTTPClient runs the suite on the alternative
    (GATEWAY_UPSTREAM=simple)."""
    return os.environ.get("PROXY_TEST_CLIENT") or None


@pytest.fixture
def app(bridge, config, proxy_client):
    return tornado.web.Application(proxy_routes(bridge, config, client=proxy_client))


@pytest.fixture
def gw_port(http_server, http_server_port) -> int:
    """The proxy's port, with the server running (http_server_port alone only binds)."""
    return http_server_port[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class CountingServer(TCPServer):
    """Counts TCP connections and closes them: proof that nothing tried to reach upstream."""

    def __init__(self) -> None:
        super().__init__()
        self.connections = 0

    async def handle_stream(self, stream, address) -> None:
        self.connections += 1
        stream.close()


@pytest.fixture
def counting_upstream(io_loop):
    server = CountingServer()
    port = free_port()
    server.listen(port, "127.0.0.1")
    server.url = "http://127.0.0.1:%d" % port
    yield server
    server.stop()


def hdrs(pairs) -> httputil.HTTPHeaders:
    """HTTPHeaders with repeats kept (the constructor overwrites them)."""
    headers = httputil.HTTPHeaders()
    for name, value in pairs:
        headers.add(name, value)
    return headers


async def fetch(client, path: str, **kwargs: Any):
    kwargs.setdefault("raise_error", False)
    kwargs.setdefault("allow_nonstandard_methods", True)
    kwargs.setdefault("request_timeout", 20)
    return await client.fetch(path, **kwargs)


async def raw_exchange(port: int, data: bytes, timeout: float = 10) -> bytes:
    """Send raw bytes, read until the server closes (or the timeout)."""
    stream = await TCPClient().connect("127.0.0.1", port)
    try:
        await stream.write(data)
        return await asyncio.wait_for(stream.read_until_close(), timeout)
    except StreamClosedError as exc:
        return bytes(getattr(exc, "partial", b"") or b"")
    finally:
        stream.close()


async def raw_response(port: int, data: bytes, timeout: float = 10):
    """Send one raw request, return (status, reason, headers, body) of the first response."""
    stream = await TCPClient().connect("127.0.0.1", port)
    try:
        await stream.write(data)
        head = await asyncio.wait_for(stream.read_until(b"\r\n\r\n"), timeout)
        lines = head.decode("latin-1").split("\r\n")
        start = httputil.parse_response_start_line(lines[0])
        headers = httputil.HTTPHeaders.parse("\r\n".join(lines[1:]))
        body = b""
        if "Content-Length" in headers:
            body = await asyncio.wait_for(stream.read_bytes(int(headers["Content-Length"])), timeout)
        return start.code, start.reason, headers, body
    finally:
        stream.close()


def assert_error(code: int, headers, body: bytes, status: int) -> dict:
    assert code == status
    assert headers["Content-Type"].startswith("application/json")
    payload = json.loads(body)
    assert set(payload) == ERROR_KEYS
    assert TIMESTAMP.match(payload["timestamp"])
    assert all(isinstance(payload[k], str) and payload[k] for k in ERROR_KEYS)
    return payload


async def echo_get(echo_url: str, path: str) -> Any:
    """Ask the echo directly, on a fresh connection (SimpleAsyncHTTPClient: no keep-alive)."""
    client = SimpleAsyncHTTPClient(force_instance=True)
    try:
        response = await client.fetch(echo_url + path)
    finally:
        client.close()
    return json.loads(response.body)


async def upstream_connections(echo_url: str) -> int:
    """Connections the echo accepted so far, not counting earlier calls of this function
    (each opens one connection of its own)."""
    upstream_connections.calls += 1  # type: ignore[attr-defined]
    seen = (await echo_get(echo_url, "/api/deepfake/_connections"))["connections"]
    return seen - upstream_connections.calls  # type: ignore[attr-defined]


upstream_connections.calls = 0  # type: ignore[attr-defined]


# --- pure functions ------------------------------------------------------------------------

@pytest.mark.parametrize("path,query,status", [
    ("/api/deepfake", "", None),
    ("/api/deepfake/", "", None),
    ("/api/deepfake/predict", "a=1&b=%2F", None),
    ("/api/deepfake/a%20b/c", "", None),
    ("/api/deepfake/..", "", 400),
    ("/api/deepfake/../secret", "", 400),
    ("/api/deepfake/%2e%2e/x", "", 400),
    ("/api/deepfake/%2E%2e/x", "", 400),
    ("/api/deepfake/./x", "", 400),
    ("/api/deepfake/%2fetc", "", 400),
    ("/api/deepfake/a%2Fb", "", 400),
    ("/api/deepfake//x", "", 400),
    ("/api/deepfake/a\\b", "", 400),
    ("/api/deepfake/a%5cb", "", 400),
    ("/api/deepfake/%252e%252e/x", "", 400),
    ("/api/deepfake/a\x00", "", 400),
    ("/api/deepfakes", "", 400),
    ("/api/deepfake/__debugger__", "", 404),
    ("/api/deepfake/x", "__debugger__=yes&cmd=resource&f=style.css", 404),
    ("/api/deepfake/x", "%5F%5Fdebugger%5F%5F=yes", 404),
    ("/api/deepfake/x", "%255F_debugger__=yes", 404),
])
def test_check_target(path, query, status):
    error = check_target(path, query)
    assert (error.status if error else None) == status


def test_upstream_request_headers_filtering():
    headers = httputil.HTTPHeaders()
    for name, value in [("Host", "gw:8080"), ("Connection", "keep-alive, X-Hop"),
                        ("X-Hop", "1"), ("Keep-Alive", "300"), ("TE", "trailers"),
                        ("Trailer", "X-T"), ("Transfer-Encoding", "chunked"), ("Upgrade", "h2c"),
                        ("Proxy-Authorization", "Basic x"), ("Proxy-Connection", "close"),
                        ("Expect", "100-continue"), ("X-Forwarded-For", "10.0.0.1"),
                        ("X-Forwarded-Proto", "https"), ("Cookie", "a=1"), ("Cookie", "b=2"),
                        ("Content-Length", "12")]:
        headers.add(name, value)
    out = upstream_request_headers(headers, "127.0.0.9", "http", "gw:8080")
    names = {n.lower() for n, _ in out.get_all()}
    assert not names & {"connection", "x-hop", "keep-alive", "te", "trailer", "transfer-encoding",
                        "upgrade", "proxy-authorization", "proxy-connection", "expect"}
    assert out.get_list("Cookie") == ["a=1", "b=2"]
    assert out["Content-Length"] == "12" and out["Host"] == "gw:8080"
    assert out["X-Forwarded-For"] == "10.0.0.1, 127.0.0.9"
    assert out["X-Forwarded-Proto"] == "http" and out["X-Forwarded-Host"] == "gw:8080"


def test_connection_cannot_drop_framing_headers():
    headers = httputil.HTTPHeaders({"Connection": "Content-Length, Host", "Content-Length": "3",
                                    "Host": "h"})
    out = upstream_request_headers(headers, None, "http", "h")
    assert out["Content-Length"] == "3" and out["Host"] == "h"


def test_client_response_headers_filtering():
    headers = httputil.HTTPHeaders()
    for name, value in [("Connection", "X-Hop"), ("X-Hop", "1"), ("Set-Cookie", "a=1"),
                        ("Set-Cookie", "b=2"), ("Transfer-Encoding", "chunked"),
                        ("Proxy-Authenticate", "Basic"), ("Content-Length", "5")]:
        headers.add(name, value)
    assert client_response_headers(headers) == [("Set-Cookie", "a=1"), ("Set-Cookie", "b=2"),
                                                ("Content-Length", "5")]


def test_has_request_body():
    assert not has_request_body(httputil.HTTPHeaders())
    assert not has_request_body(httputil.HTTPHeaders({"Content-Length": "0"}))
    assert has_request_body(httputil.HTTPHeaders({"Content-Length": "1"}))
    assert has_request_body(httputil.HTTPHeaders({"Transfer-Encoding": "chunked"}))


# --- forwarding ----------------------------------------------------------------------------

async def test_get_preserves_method_target_and_headers(http_server_client):
    response = await fetch(http_server_client, "/api/deepfake/items/a%20b?x=1&y=%2F&x=2&z",
                           headers=hdrs([("X-Multi", "one"), ("X-Multi", "two"),
                                                         ("User-Agent", "t/1"),
                                                         ("Authorization", "Bearer t")]))
    assert response.code == 200
    echo = json.loads(response.body)
    assert echo["method"] == "GET"
    assert echo["target"] == "/api/deepfake/items/a%20b?x=1&y=%2F&x=2&z"
    pairs = [(k.lower(), v) for k, v in echo["headers"]]
    assert [v for k, v in pairs if k == "x-multi"] == ["one", "two"]
    assert ("authorization", "Bearer t") in pairs and ("user-agent", "t/1") in pairs
    assert echo["body_length"] == 0


async def test_prefix_itself_is_proxied(http_server_client):
    response = await fetch(http_server_client, "/api/deepfake")
    assert response.code == 200 and json.loads(response.body)["target"] == "/api/deepfake"


@pytest.mark.parametrize("method", ["POST", "PUT", "PATCH", "DELETE", "OPTIONS", "PROPFIND",
                                    "M-SEARCH", "PURGE"])
async def test_methods_and_bodies(http_server_client, method):
    body = os.urandom(100_000)
    response = await fetch(http_server_client, "/api/deepfake/m", method=method, body=body,
                           headers={"Content-Type": "application/octet-stream"})
    assert response.code == 200
    echo = json.loads(response.body)
    assert echo["method"] == method
    assert echo["body_length"] == len(body)
    assert echo["body_sha256"] == hashlib.sha256(body).hexdigest()


@pytest.mark.parametrize("method", ["POST", "DELETE", "REPORT"])
async def test_chunked_request_body(http_server_client, method):
    parts = [os.urandom(n) for n in (1, 70_000, 5, 300_000)]

    # Tornado's client frames chunks itself only for POST/PUT/PATCH; frame the others here
    self_framed = method not in ("POST", "PUT", "PATCH")

    async def producer(write):
        for part in parts:
            await write(b"%x\r\n%s\r\n" % (len(part), part) if self_framed else part)
        if self_framed:
            await write(b"0\r\n\r\n")

    response = await fetch(http_server_client, "/api/deepfake/chunked", method=method,
                           body_producer=producer,
                           headers={"Transfer-Encoding": "chunked"} if self_framed else None)
    assert response.code == 200
    echo = json.loads(response.body)
    whole = b"".join(parts)
    assert echo["body_length"] == len(whole)
    assert echo["body_sha256"] == hashlib.sha256(whole).hexdigest()


async def test_head_keeps_content_length_and_sends_no_body(http_server_client, gw_port):
    port = gw_port
    raw = await raw_exchange(port, b"HEAD /api/deepfake/download?size=12345 HTTP/1.1\r\n"
                                   b"Host: x\r\nConnection: close\r\n\r\n")
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    assert b"\r\nContent-Length: 12345" in head
    assert body == b""


async def test_head_of_chunked_gets_no_invented_length(http_server_client, gw_port):
    raw = await raw_exchange(gw_port,
                             b"HEAD /api/deepfake/download?size=10&chunked=1 HTTP/1.1\r\n"
                             b"Host: x\r\nConnection: close\r\n\r\n")
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    assert b"Content-Length" not in head and b"Transfer-Encoding" not in head
    assert body == b""


@pytest.mark.parametrize("code", [204, 304])
async def test_no_body_statuses(http_server_client, code):
    response = await fetch(http_server_client, "/api/deepfake/status/%d" % code)
    assert response.code == code
    assert response.body == b""
    assert "Content-Length" not in response.headers or response.headers["Content-Length"] == "0"


async def test_status_and_reason_phrase_preserved(http_server_client):
    response = await fetch(http_server_client, "/api/deepfake/status/299?reason=Very%20Fine")
    assert response.code == 299 and response.reason == "Very Fine"
    response = await fetch(http_server_client, "/api/deepfake/status/418")
    assert response.code == 418
    assert json.loads(response.body)["target"] == "/api/deepfake/status/418"


async def test_upstream_server_and_date_replace_tornados(http_server_client):
    response = await fetch(http_server_client, "/api/deepfake/x")
    assert response.headers.get_list("Server") == [response.headers["Server"]]
    assert response.headers["Server"].startswith("echo")
    assert response.headers["Content-Type"] == "application/json"
    assert len(response.headers.get_list("Date")) == 1


async def test_repeated_response_headers(http_server_client):
    response = await fetch(http_server_client, "/api/deepfake/cookies?n=4")
    assert response.headers.get_list("Set-Cookie") == ["c%d=v%d; Path=/" % (i, i)
                                                       for i in range(4)]


async def test_hop_by_hop_stripped_both_ways(http_server_client):
    headers = hdrs([
        ("Connection", "X-Hop-Req"), ("X-Hop-Req", "1"), ("Keep-Alive", "timeout=5"),
        ("TE", "trailers"), ("Trailer", "X-Sum"), ("Upgrade", "websocket"),
        ("Proxy-Authorization", "Basic Zm9v"), ("Proxy-Connection", "keep-alive"),
        ("Expect", "100-continue"), ("X-End", "kept")])
    response = await fetch(http_server_client, "/api/deepfake/hop", method="POST", body=b"abc",
                           headers=headers)
    assert response.code == 200
    seen = {k.lower() for k, _ in json.loads(response.body)["headers"]}
    assert "x-end" in seen
    assert not seen & {"x-hop-req", "keep-alive", "te", "trailer", "upgrade",
                       "proxy-authorization", "proxy-connection", "expect"}
    # response side: the echo sent Connection: X-Hop, X-Hop, Keep-Alive, Proxy-Agent, Upgrade
    assert response.headers.get("X-Kept") == "yes"
    for name in ("X-Hop", "Keep-Alive", "Proxy-Agent", "Upgrade"):
        assert name not in response.headers


async def test_x_forwarded_headers(http_server_client, gw_port):
    response = await fetch(http_server_client, "/api/deepfake/x",
                           headers={"X-Forwarded-For": "203.0.113.7"})
    pairs = {k.lower(): v for k, v in json.loads(response.body)["headers"]}
    assert pairs["x-forwarded-for"] == "203.0.113.7, 127.0.0.1"
    assert pairs["x-forwarded-proto"] == "http"
    assert pairs["x-forwarded-host"] == "127.0.0.1:%d" % gw_port
    response = await fetch(http_server_client, "/api/deepfake/x")
    pairs = {k.lower(): v for k, v in json.loads(response.body)["headers"]}
    assert pairs["x-forwarded-for"] == "127.0.0.1"


async def test_multipart_passes_byte_exact(http_server_client):
    boundary = "----tg" + uuid.uuid4().hex
    payload = os.urandom(300_000) + b"\r\n--" + boundary.encode() + b"-not-really\r\n"
    body = (("--%s\r\nContent-Disposition: form-data; name=\"label\"\r\n\r\nreal\r\n"
             "--%s\r\nContent-Disposition: form-data; name=\"image\"; filename=\"a b.png\"\r\n"
             "Content-Type: image/png\r\n\r\n" % (boundary, boundary)).encode()
            + payload + ("\r\n--%s--\r\n" % boundary).encode())
    ctype = "multipart/form-data; boundary=%s" % boundary
    response = await fetch(http_server_client, "/api/deepfake/feedback", method="POST",
                           body=body, headers={"Content-Type": ctype})
    echo = json.loads(response.body)
    assert echo["body_length"] == len(body)
    assert echo["body_sha256"] == hashlib.sha256(body).hexdigest()
    assert dict((k.lower(), v) for k, v in echo["headers"])["content-type"] == ctype


async def test_large_download_streams_intact(gw_port):
    size = 150 * 1024 * 1024 + 7  # over Tornado's default 100 MiB client limit
    digest = hashlib.sha256()
    count = [0]

    def on_chunk(chunk: bytes) -> None:
        count[0] += len(chunk)
        digest.update(chunk)

    # the test's own client needs a raised limit too (it applies to streamed bodies)
    client = AsyncHTTPClient(force_instance=True, max_body_size=1 << 40)
    try:
        response = await client.fetch("http://127.0.0.1:%d/api/deepfake/download?size=%d"
                                      % (gw_port, size), streaming_callback=on_chunk,
                                      request_timeout=60, raise_error=False)
    finally:
        client.close()
    assert response.code == 200 and count[0] == size
    assert digest.hexdigest() == hashlib.sha256(b"x" * size).hexdigest()


# --- refusals ------------------------------------------------------------------------------

@pytest.mark.parametrize("target", [
    "/api/deepfake/../../etc/passwd", "/api/deepfake/%2e%2e/%2e%2e/x", "/api/deepfake/a%2fb",
    "/api/deepfake//x", "/api/deepfake/a\\..\\b", "/api/deepfake/%5c", "/api/deepfake/./x",
])
async def test_escaping_paths_refused_without_upstream(gw_port, echo_url, target):
    before = await upstream_connections(echo_url)
    code, _, headers, body = await raw_response(
        gw_port, ("GET %s HTTP/1.1\r\nHost: x\r\n\r\n" % target).encode())
    payload = assert_error(code, headers, body, 400)
    assert "refuses" in payload["message"]
    assert await upstream_connections(echo_url) == before


@pytest.mark.parametrize("target", [
    "/api/deepfake/__debugger__", "/api/deepfake/x?__debugger__=yes&cmd=resource&f=debugger.js",
    "/api/deepfake/x?%5f%5fdebugger%5f%5f=yes&cmd=printpin", "/api/deepfake/x?a=1&__DEBUGGER__=yes",
])
async def test_werkzeug_debugger_unreachable(gw_port, echo_url, target):
    before = await upstream_connections(echo_url)
    code, _, headers, body = await raw_response(
        gw_port, ("GET %s HTTP/1.1\r\nHost: x\r\n\r\n" % target).encode())
    assert_error(code, headers, body, 404)
    assert await upstream_connections(echo_url) == before


async def test_colliding_method_name_refused(gw_port):
    code, _, headers, body = await raw_response(
        gw_port, b"FINISH /api/deepfake/x HTTP/1.1\r\nHost: x\r\n\r\n")
    assert_error(code, headers, body, 501)


async def test_413_by_content_length_before_upstream(gw_port, echo_url, config):
    before = await upstream_connections(echo_url)
    code, _, headers, body = await raw_response(
        gw_port, ("POST /api/deepfake/up HTTP/1.1\r\nHost: x\r\nContent-Length: %d"
                              "\r\nExpect: 100-continue\r\n\r\n" % (config.max_body + 1)).encode())
    payload = assert_error(code, headers, body, 413)
    assert str(config.max_body) in payload["message"]
    assert await upstream_connections(echo_url) == before


async def test_413_chunked_over_limit_aborts_upstream(gw_port, echo_url, config):
    marker = uuid.uuid4().hex
    stream = await TCPClient().connect("127.0.0.1", gw_port)
    await stream.write(("POST /api/deepfake/chunky?m=%s HTTP/1.1\r\nHost: x\r\n"
                        "Transfer-Encoding: chunked\r\n\r\n" % marker).encode())
    piece = b"y" * 65536
    sent = 0
    while sent <= config.max_body:
        await stream.write(b"%x\r\n%s\r\n" % (len(piece), piece))
        sent += len(piece)
    head = await asyncio.wait_for(stream.read_until(b"\r\n\r\n"), 10)
    lines = head.decode().split("\r\n")
    headers = httputil.HTTPHeaders.parse("\r\n".join(lines[1:]))
    body = await stream.read_bytes(int(headers["Content-Length"]))
    stream.close()
    assert_error(int(lines[0].split()[1]), headers, body, 413)
    events = await wait_for_events(echo_url, marker)
    assert events and not any(e["complete"] for e in events)


# --- state gating --------------------------------------------------------------------------

@pytest.mark.parametrize("state", ["idle", "failed", "exited", "stopping", "stopped"])
async def test_503_when_not_usable_without_connecting(http_server_client, bridge,
                                                      counting_upstream, state):
    bridge.flask_url = counting_upstream.url
    bridge.set_state(BridgeState(state))
    response = await fetch(http_server_client, "/api/deepfake/predict", method="POST",
                           body=b"x" * 1000)
    payload = assert_error(response.code, response.headers, response.body, 503)
    assert "(state: %s)" % state in payload["message"]
    assert "Retry-After" not in response.headers
    assert bridge.wait_calls == 0
    assert counting_upstream.connections == 0


@pytest.mark.parametrize("config_overrides", [dict(ready_wait=3000)])
async def test_waits_while_starting_then_proxies(config_overrides, http_server_client, bridge, io_loop):
    bridge.set_state(BridgeState.STARTING)
    io_loop.call_later(0.4, bridge.set_state, BridgeState.READY)
    t0 = time.monotonic()
    body = os.urandom(500_000)
    response = await fetch(http_server_client, "/api/deepfake/predict", method="POST", body=body)
    assert response.code == 200
    assert time.monotonic() - t0 >= 0.35
    assert json.loads(response.body)["body_sha256"] == hashlib.sha256(body).hexdigest()


@pytest.mark.parametrize("config_overrides", [dict(ready_wait=300)])
@pytest.mark.parametrize("state", ["starting", "unhealthy"])
async def test_starting_too_long_gives_503(config_overrides, http_server_client, bridge, counting_upstream, state):
    bridge.flask_url = counting_upstream.url
    bridge.set_state(BridgeState(state))
    t0 = time.monotonic()
    response = await fetch(http_server_client, "/api/deepfake/predict")
    assert 0.25 <= time.monotonic() - t0 < 3
    payload = assert_error(response.code, response.headers, response.body, 503)
    assert "(state: %s)" % state in payload["message"]
    assert response.headers["Retry-After"] == "5"
    assert counting_upstream.connections == 0


@pytest.mark.parametrize("config_overrides", [dict(ready_wait=3000)])
async def test_starting_then_failed_gives_503_at_once(config_overrides, http_server_client, bridge, io_loop):
    bridge.set_state(BridgeState.STARTING)
    io_loop.call_later(0.2, bridge.set_state, BridgeState.FAILED)
    t0 = time.monotonic()
    response = await fetch(http_server_client, "/api/deepfake/predict")
    assert time.monotonic() - t0 < 2
    payload = assert_error(response.code, response.headers, response.body, 503)
    assert "(state: failed)" in payload["message"]


# --- upstream failures ---------------------------------------------------------------------

async def test_502_when_refused(http_server_client, bridge):
    bridge.flask_url = "http://127.0.0.1:%d" % free_port()
    response = await fetch(http_server_client, "/api/deepfake/predict", method="POST", body=b"z")
    payload = assert_error(response.code, response.headers, response.body, 502)
    assert response.headers["Retry-After"] == "5"
    assert "could not be reached" in payload["message"]
    assert len(bridge.failures) == 1


async def test_502_when_upstream_drops_the_connection_before_answering(
        http_server_client, bridge, counting_upstream):
    bridge.flask_url = counting_upstream.url  # accepts, then closes without a byte
    response = await fetch(http_server_client, "/api/deepfake/predict")
    assert_error(response.code, response.headers, response.body, 502)
    assert counting_upstream.connections == 1
    assert len(bridge.failures) == 1


@pytest.mark.parametrize("config_overrides", [dict(proxy_timeout=400)])
async def test_504_when_upstream_too_slow(config_overrides, http_server_client, bridge):
    t0 = time.monotonic()
    response = await fetch(http_server_client, "/api/deepfake/slow?delay=2")
    assert time.monotonic() - t0 < 1.5
    assert_error(response.code, response.headers, response.body, 504)
    assert response.headers["Retry-After"] == "10"
    assert bridge.failures == []


async def test_upstream_dying_mid_body_closes_client(gw_port):
    raw = await raw_exchange(gw_port, b"GET /api/deepfake/die?after=100000 HTTP/1.1"
                                                  b"\r\nHost: x\r\n\r\n")
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    assert b"Content-Length: 200000" in head
    assert len(body) < 200000  # and the connection was closed (read_until_close returned)


async def test_upstream_dying_mid_body_is_an_error_for_clients(http_server_client):
    # the client sees a broken response (599 "Connection closed"), never a complete 200
    with pytest.raises(HTTPClientError) as info:
        await fetch(http_server_client, "/api/deepfake/die?after=100000")
    assert info.value.code == 599


async def wait_for_events(echo_url: str, marker: str, timeout: float = 5) -> List[dict]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        events = [e for e in await echo_get(echo_url, "/api/deepfake/_events")
                  if marker in e["target"]]
        if events:
            return events
        await asyncio.sleep(0.05)
    return []


async def test_client_disconnect_mid_upload_aborts_upstream(gw_port, echo_url):
    marker = uuid.uuid4().hex
    stream = await TCPClient().connect("127.0.0.1", gw_port)
    await stream.write(("PUT /api/deepfake/up?m=%s HTTP/1.1\r\nHost: x\r\nContent-Length: %d"
                        "\r\n\r\n" % (marker, 3 << 20)).encode())
    await stream.write(b"u" * (512 * 1024))
    await asyncio.sleep(0.3)
    stream.close()
    events = await wait_for_events(echo_url, marker)
    assert len(events) == 1
    assert events[0]["complete"] is False
    assert 0 < events[0]["received"] < 3 << 20


async def test_client_disconnect_mid_chunked_upload_aborts_upstream(gw_port, echo_url):
    marker = uuid.uuid4().hex
    stream = await TCPClient().connect("127.0.0.1", gw_port)
    await stream.write(("DELETE /api/deepfake/up?m=%s HTTP/1.1\r\nHost: x\r\n"
                        "Transfer-Encoding: chunked\r\n\r\n" % marker).encode())
    await stream.write(b"%x\r\n%s\r\n" % (200_000, b"c" * 200_000))
    await asyncio.sleep(0.3)
    stream.close()
    events = await wait_for_events(echo_url, marker)
    assert len(events) == 1 and events[0]["complete"] is False


async def test_client_disconnect_mid_download_stops_upstream(gw_port, http_server_client,
                                                             echo_url):
    marker = uuid.uuid4().hex
    stream = await TCPClient().connect("127.0.0.1", gw_port)
    await stream.write(("GET /api/deepfake/download?size=2000000000&m=%s HTTP/1.1\r\n"
                        "Host: x\r\n\r\n" % marker).encode())
    await stream.read_bytes(1 << 20, partial=False)
    stream.close()
    events = [e for e in await wait_for_events(echo_url, marker) if e.get("download_aborted")]
    deadline = time.monotonic() + 5
    while not events and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
        events = [e for e in await wait_for_events(echo_url, marker)
                  if e.get("download_aborted")]
    assert events, "the upstream kept sending after the client left"
    assert events[0]["sent"] < 2000000000
    response = await fetch(http_server_client, "/api/deepfake/x")
    assert response.code == 200


class _Hang(tornado.web.RequestHandler):
    """An upstream that thinks for 5 s and notes when its client (the proxy) leaves."""

    def initialize(self, closed: list) -> None:
        self.closed = closed

    async def get(self) -> None:
        await asyncio.sleep(5)
        self.write("late")

    def on_connection_close(self) -> None:
        self.closed.append(time.monotonic())


async def test_client_leaving_while_upstream_thinks_closes_upstream(gw_port, bridge):
    closed: list = []
    port = free_port()
    upstream = tornado.web.Application([(r"/.*", _Hang, dict(closed=closed))]).listen(
        port, "127.0.0.1")
    try:
        bridge.flask_url = "http://127.0.0.1:%d" % port
        stream = await TCPClient().connect("127.0.0.1", gw_port)
        await stream.write(b"GET /api/deepfake/hang HTTP/1.1\r\nHost: x\r\n\r\n")
        await asyncio.sleep(0.3)
        left = time.monotonic()
        stream.close()
        deadline = left + 2
        while not closed and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        assert closed, "the upstream request outlived its client"
        assert closed[0] - left < 1
    finally:
        upstream.stop()


# --- memory: 1 GiB up and 1 GiB down through a gateway process -----------------------------

def _sampler(pid: int, stop: threading.Event, peak: List[int]) -> None:
    import psutil
    proc = psutil.Process(pid)
    while not stop.is_set():
        try:
            peak[0] = max(peak[0], proc.memory_info().rss)
        except psutil.Error:
            return
        time.sleep(0.02)


@pytest.mark.integration
@pytest.mark.timeout(90)
def test_memory_bounded_for_1gib_each_way():
    """1 GiB up (to a slow-starting reader) and 1 GiB down (to a reader that pauses): the
    gateway's RSS must stay within 64 MB of where it started."""
    import http.client
    import psutil

    echo, echo_port = start_script("echo_server.py", "--port", "0")
    simple = ["--simple"] if os.environ.get("PROXY_TEST_CLIENT", "").endswith(
        "SimpleAsyncHTTPClient") else []
    gateway, port = start_script("proxy_gateway.py", "--upstream",
                                 "http://127.0.0.1:%d" % echo_port, *simple)
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        conn.request("GET", "/api/deepfake/warmup")
        conn.getresponse().read()
        base = psutil.Process(gateway.pid).memory_info().rss
        peak = [base]
        stop = threading.Event()
        sampler = threading.Thread(target=_sampler, args=(gateway.pid, stop, peak), daemon=True)
        sampler.start()
        size = 1 << 30
        t0 = time.monotonic()

        block = b"u" * (1 << 20)

        def body():
            for _ in range(size // len(block)):
                yield block

        # upload: the echo leaves the body unread for 1 s first (upstream slower than client)
        conn.request("POST", "/api/deepfake/upload?pause=1", body=body(),
                     headers={"Content-Length": str(size)})
        echo_reply = json.loads(conn.getresponse().read())
        t_up = time.monotonic() - t0
        assert echo_reply["body_length"] == size

        # download: the client pauses 1 s after the first MiB (client slower than upstream)
        t1 = time.monotonic()
        conn.request("GET", "/api/deepfake/download?size=%d" % size)
        response = conn.getresponse()
        assert response.status == 200
        got = len(response.read(1 << 20))
        time.sleep(1)
        while True:
            chunk = response.read(1 << 20)
            if not chunk:
                break
            got += len(chunk)
        t_down = time.monotonic() - t1
        assert got == size
        stop.set()
        sampler.join(2)
        growth = peak[0] - base
        print("\nproxy 1 GiB: up %.1f s, down %.1f s; gateway RSS start %.1f MB, peak %.1f MB "
              "(+%.1f MB)" % (t_up, t_down, base / 1e6, peak[0] / 1e6, growth / 1e6))
        assert growth < 64 * 1024 * 1024
    finally:
        stop_script(gateway)
        stop_script(echo)


async def test_503_for_a_failed_start_carries_the_recorded_cause(http_server_client, bridge):
    bridge.set_state(BridgeState.FAILED)
    bridge.last_error = {"message": "The Flask script 'api.py' was not found.",
                         "suggestion": "Set FLASK_SCRIPT to the path of api_server.py.",
                         "at": "2026-01-01T00:00:00.000Z"}
    response = await fetch(http_server_client, "/api/deepfake/stats")
    assert response.code == 503
    body = json.loads(response.body)
    assert "The Flask script 'api.py' was not found." in body["message"]
    assert body["suggestion"] == "Set FLASK_SCRIPT to the path of api_server.py."


# --- an answer the child sends before the request body is complete --------------------------
#
# As the gateway runs (``python -m tornado_gateway``): GatewayHTTPServer in front, the
# keep-alive pool behind. The upstream is ``early_answer_server.py``: what waitress does with a
# body over its ``max_request_body_size`` -- a JSON 413 as soon as the head is read, then a
# close, with the upload unread (a reset: "rst") or after a FIN, reading and dropping the rest
# ("fin"). Before the fix a client that kept sending got a 502 (and report_upstream_failure);
# one that stalled got a 502 ("rst") or the gateway's 408 after body_timeout ("fin").

@pytest.fixture(scope="module")
def refusing_urls():
    procs, urls = [], {}
    try:
        for mode in ("rst", "fin"):
            proc, port = start_script("early_answer_server.py", "--port", "0", "--limit",
                                      str(1 << 20), "--close", mode)
            procs.append(proc)
            urls[mode] = "http://127.0.0.1:%d" % port
        yield urls
    finally:
        for proc in procs:
            stop_script(proc)


@pytest.fixture
def close_mode() -> str:
    return "rst"


@pytest.fixture
def production_stack(io_loop, refusing_urls, close_mode):
    """(port, bridge, log records) of a gateway stack in this process, as server.serve()
    builds it: the pool as upstream client, GatewayHTTPServer, the body stall timeout of
    60 s. The client configuration is restored afterwards."""
    import logging

    from tornado.netutil import bind_sockets

    from tornado_gateway.http.server import GatewayHTTPServer

    config = GatewayConfig(max_body=256 << 20, proxy_timeout=30000, connect_timeout=2000,
                           ready_wait=2000, body_timeout=60000)
    bridge = FakeBridge(refusing_urls[close_mode])
    bridge.upstream = UpstreamClient(config)  # the stack's own client, for the tests to look at
    app = tornado.web.Application(proxy_routes(bridge, config, client=bridge.upstream))
    server = GatewayHTTPServer(app, body_timeout=config.body_timeout / 1000.0)
    sockets = bind_sockets(0, "127.0.0.1")
    io_loop.run_sync(lambda: server.start(sockets))

    records: List[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    keep = Keep(logging.ERROR)
    root = logging.getLogger()
    root.addHandler(keep)
    try:
        yield sockets[0].getsockname()[1], bridge, records
    finally:
        root.removeHandler(keep)
        server.stop()
        io_loop.run_sync(server.close_all_connections)


def _client_upload(port: int, declared: int, send: int, timeout: float = 20.0) -> dict:
    """A blocking client (run in a thread: the gateway is on this process's loop): sends the
    head declaring ``declared`` body bytes and ``send`` of them from a second thread while it
    reads the answer. Returns the answer, when it came, and whether the gateway then closed."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    head = ("POST /api/deepfake/analyze HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\n"
            "Content-Length: %d\r\n\r\n" % declared).encode()
    started = time.monotonic()

    def sender() -> None:
        piece = b"u" * 65536
        try:
            sock.sendall(head)
            left = send
            while left > 0:
                sock.sendall(piece[:left])
                left -= len(piece)
        except OSError:
            pass  # the gateway stopped reading: expected once it answered

    thread = threading.Thread(target=sender, daemon=True)
    thread.start()
    data = b""
    answered = None
    closed = False
    try:
        while True:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                closed = True
                break
            except socket.timeout:
                break
            if not chunk:
                closed = True
                break
            data += chunk
            if answered is None and b"\r\n\r\n" in data:
                answered = time.monotonic() - started
    finally:
        sock.close()
        thread.join(5)
    head_bytes, _, body = data.partition(b"\r\n\r\n")
    lines = head_bytes.decode("latin-1").split("\r\n")
    return {"status": int(lines[0].split(" ")[1]) if lines[0] else None,
            "headers": httputil.HTTPHeaders.parse("\r\n".join(lines[1:])),
            "body": body, "answered": answered, "closed": closed,
            "ended": time.monotonic() - started}


async def _after_refusal_all_is_well(port: int, bridge: FakeBridge, records: list) -> None:
    assert bridge.failures == []  # no report_upstream_failure: nothing failed
    assert [r.getMessage() for r in records] == []  # no ERROR line (a 502 logs one)
    client = SimpleAsyncHTTPClient(force_instance=True)
    try:
        response = await client.fetch("http://127.0.0.1:%d/api/deepfake/analyze" % port,
                                      method="POST", body=b"x" * 1000, raise_error=False)
    finally:
        client.close()
    assert (response.code, response.body) == (200, b'{"received": 1000}')


@pytest.mark.parametrize("close_mode", ["rst", "fin"])
async def test_early_413_reaches_a_client_that_keeps_sending(production_stack):
    port, bridge, records = production_stack
    loop = asyncio.get_running_loop()
    for _ in range(5):
        got = await loop.run_in_executor(None, _client_upload, port, 60_000_000, 60_000_000)
        assert got["status"] == 413, got
        assert json.loads(got["body"])["error"] == "Request Entity Too Large"  # the child's
        assert got["headers"]["Connection"] == "close"
        assert got["closed"]
    assert bridge.upstream.get().idle_count() == 0  # the refused connections were not pooled
    await _after_refusal_all_is_well(port, bridge, records)


@pytest.mark.parametrize("close_mode", ["rst", "fin"])
async def test_early_413_reaches_a_stalled_client_at_once(production_stack):
    """Declares 60 MB, sends 1 MB, stops: the child's 413 arrives at once (measured: a few
    ms; before the fix, the gateway's 408 after its 60 s body stall timeout), then the
    gateway closes the connection (after at most its 2 s linger)."""
    port, bridge, records = production_stack
    loop = asyncio.get_running_loop()
    got = await loop.run_in_executor(None, _client_upload, port, 60_000_000, 1 << 20, 15.0)
    assert got["status"] == 413, got
    assert json.loads(got["body"])["error"] == "Request Entity Too Large"
    assert got["headers"]["Connection"] == "close"
    assert got["answered"] < 10, got
    assert got["closed"] and got["ended"] < 10, got
    await _after_refusal_all_is_well(port, bridge, records)


@pytest.mark.parametrize("proxy_client", [
    "tornado.simple_httpclient.SimpleAsyncHTTPClient", None], ids=["simple", "default"])
async def test_no_user_agent_is_invented_for_the_child(gw_port, config, proxy_client):
    """A request without User-Agent reaches the child without one (Tornado's clients would
    add 'Tornado/x.y'); one the client sent passes unchanged."""
    for extra, expected in ((b"", None), (b"User-Agent: curl/8.0\r\n", "curl/8.0")):
        code, _, _, body = await raw_response(
            gw_port, b"GET /api/deepfake/echo HTTP/1.1\r\nHost: t\r\n" + extra +
            b"Connection: close\r\n\r\n")
        assert code == 200
        sent = {k.lower(): v for k, v in json.loads(body)["headers"]}
        assert sent.get("user-agent") == expected, sent


@pytest.mark.parametrize("proxy_client", [None], ids=["default"])
async def test_the_proxy_uses_its_own_client_and_leaves_the_applications_alone(gw_port, app):
    """The proxy's client is its own instance (the gateway's default: the keep-alive pool);
    the process-wide AsyncHTTPClient stays Tornado's, with redirects and decompression."""
    from tornado_gateway.http.client import UpstreamHTTPClient

    code, _, _, _ = await raw_response(
        gw_port, b"GET /api/deepfake/echo HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
    assert code == 200
    [rule] = app.wildcard_router.rules  # proxy_routes' one route (tornado.routing.Rule)
    own = rule.target_kwargs["upstream"].get()
    assert isinstance(own, UpstreamHTTPClient) and own.idle_count() == 1  # it served the GET
    assert AsyncHTTPClient.configured_class() is SimpleAsyncHTTPClient
    assert not isinstance(AsyncHTTPClient(), UpstreamHTTPClient)


def test_the_old_configure_functions_warn_and_change_nothing(config):
    from tornado_gateway.proxy import configure_http_client
    from tornado_gateway.server import configure_upstream_client

    before = AsyncHTTPClient._save_configuration()
    with pytest.warns(DeprecationWarning, match="no longer needed"):
        configure_http_client(config, impl="tornado_gateway.http.client.UpstreamHTTPClient")
    with pytest.warns(DeprecationWarning, match="no longer needed"):
        configure_upstream_client(config)
    assert AsyncHTTPClient._save_configuration() == before


class SilentServer(TCPServer):
    """An upstream that accepts connections and never reads a byte: the upload can only wait."""

    def __init__(self) -> None:
        super().__init__()
        self.streams: List[Any] = []

    async def handle_stream(self, stream, address) -> None:
        self.streams.append(stream)  # held open, never read


async def test_an_upload_the_child_does_not_read_is_held_back_not_buffered(io_loop, config):
    """Upload back-pressure, fast: against an upstream that reads nothing, a client can get
    no further than the kernel's socket buffers plus the proxy's bounded queue
    (QUEUE_CHUNKS pieces), far short of a 64 MiB body (unbounded, it would all be read)."""
    import tornado.httpserver

    from tornado.netutil import bind_sockets

    from tornado_gateway.http.server import GatewayHTTPServer
    from tornado_gateway.proxy import QUEUE_CHUNKS

    upstream = SilentServer()
    up_port = free_port()
    upstream.listen(up_port, "127.0.0.1")
    big = GatewayConfig(max_body=256 << 20, proxy_timeout=30000, connect_timeout=2000,
                        ready_wait=2000)
    app = tornado.web.Application(proxy_routes(FakeBridge("http://127.0.0.1:%d" % up_port), big))
    server = GatewayHTTPServer(app)
    sockets = bind_sockets(0, "127.0.0.1")
    await server.start(sockets)
    port = sockets[0].getsockname()[1]
    total = 64 << 20

    def push() -> int:
        sent = 0
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(b"POST /api/deepfake/up HTTP/1.1\r\nHost: t\r\nContent-Length: %d"
                         b"\r\n\r\n" % total)
            sock.settimeout(1.5)
            chunk = b"u" * 65536
            try:
                while sent < total:
                    sent += sock.send(chunk)
            except socket.timeout:
                pass  # blocked: nobody reads further
        return sent

    try:
        sent = await asyncio.get_running_loop().run_in_executor(None, push)
    finally:
        server.stop()
        await server.close_all_connections()
        upstream.stop()
    # kernel buffers on loopback are a few MiB each way; the queue adds QUEUE_CHUNKS x 64 KiB
    assert sent < 24 << 20, "%d of %d bytes were taken in" % (sent, total)
    assert QUEUE_CHUNKS * 65536 <= 1 << 20


def test_the_request_handler_state_the_proxy_replaces_is_where_tornado_keeps_it():
    """proxy._replace_response_head sets RequestHandler's private ``_headers`` and
    ``_write_buffer``: this fails the day Tornado keeps them elsewhere."""
    from unittest import mock

    from tornado_gateway.proxy import _replace_response_head

    app = tornado.web.Application()
    request = httputil.HTTPServerRequest(
        start_line=httputil.RequestStartLine("GET", "/", "HTTP/1.1"),
        headers=httputil.HTTPHeaders({"Host": "t"}), connection=mock.Mock())
    handler = tornado.web.RequestHandler(app, request)
    handler.clear()
    assert isinstance(handler._headers, httputil.HTTPHeaders)
    assert handler._write_buffer == []
    handler.write(b"buffered")
    headers = httputil.HTTPHeaders({"X-Child": "1"})
    _replace_response_head(handler, headers)
    assert handler._headers is headers and handler._write_buffer == []
    assert handler._headers.get("X-Child") == "1" and "Content-Type" not in handler._headers
