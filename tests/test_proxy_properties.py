"""Hypothesis properties of the proxy: design properties 4, 5 and 12.

Each property is a sync test (``@given`` refuses ``async def``) that drives coroutines on the
test's IOLoop with ``io_loop.run_sync``; the proxy is pytest-tornasync's ``http_server`` for the
test function, shared by its examples.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import os
import sys
import urllib.parse
from typing import List, Tuple

import pytest
import tornado.web
from hypothesis import HealthCheck, given, settings, strategies as st
from tornado import httputil
from tornado.httpclient import AsyncHTTPClient
from tornado.httpserver import HTTPServer
from tornado.netutil import bind_sockets
from tornado.tcpserver import TCPServer

from tornado_gateway.config import GatewayConfig
from tornado_gateway.proxy import DeepfakeProxyHandler, proxy_routes
from tornado_gateway.supervisor.state import BridgeState

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "child_scripts"))
sys.path.insert(0, HERE)
from proxy_gateway import FakeBridge  # noqa: E402
from test_proxy import (  # noqa: E402  (shared helpers and the echo subprocess fixture)
    ERROR_KEYS, TIMESTAMP, echo_url, free_port, gw_port, hdrs,
)

PROPERTY_SETTINGS = settings(max_examples=100, deadline=None,
                             suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                    HealthCheck.too_slow])

# --- strategies ------------------------------------------------------------------------------

_UNRESERVED = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_~"
_SAFE_BYTES = [b for b in range(256) if b not in (0x2E, 0x2F, 0x5C, 0x00, 0x25)]


@st.composite
def path_segments(draw) -> List[str]:
    """Plain segments, some with percent-encoded bytes (never '.', '/', '\\', '%', NUL)."""
    segments = []
    for _ in range(draw(st.integers(0, 4))):
        plain = draw(st.text(_UNRESERVED, min_size=1, max_size=10))
        encoded = "".join("%%%02X" % b for b in draw(st.lists(st.sampled_from(_SAFE_BYTES),
                                                                max_size=3)))
        segment = plain + encoded
        if "debugger" in segment.lower():
            segment = "seg"
        segments.append(segment)
    return segments


_RESERVED_KEYS = {"reason", "pause", "n", "size", "delay", "after", "chunked"}
query_pairs = st.lists(
    st.tuples(st.text(_UNRESERVED, min_size=1, max_size=8).filter(
        lambda k: k.lower() not in _RESERVED_KEYS and "debugger" not in k.lower()),
        st.text(st.characters(min_codepoint=32, max_codepoint=0x2FF), max_size=12).filter(
            lambda v: "__debugger__" not in v.lower())),  # refused by design (404)
    max_size=5)

header_name = st.from_regex(r"\AX-[A-Za-z0-9]{1,12}\Z").filter(
    lambda n: not n.lower().startswith("x-forwarded"))
header_value = st.from_regex(r"\A[!-~]([ -~]{0,30}[!-~])?\Z")
header_lists = st.lists(st.tuples(header_name, header_value), max_size=6)

_NONSTANDARD = st.from_regex(r"\A[A-Z]{3,9}\Z").filter(
    lambda m: m not in ("HEAD", "CONNECT", "GET", "POST", "PUT", "PATCH")
    and not hasattr(DeepfakeProxyHandler, m.lower()))
methods = st.one_of(st.sampled_from(["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS",
                                     "PROPFIND", "REPORT", "PURGE", "MKCOL"]), _NONSTANDARD)


def server_refuses_method(method: str) -> bool:
    """True when the server under test refuses the method before the application sees it:
    the gateway's server (llhttp) knows a fixed registry of methods (the standard ones, WebDAV,
    PURGE...) and answers any other well-formed token with a JSON 501, as RFC 9110 9.1 asks;
    Tornado's HTTPServer (TEST_HTTP_SERVER=tornado) hands every token to the application."""
    if os.environ.get("TEST_HTTP_SERVER") == "tornado":
        return False
    import httptools
    try:
        httptools.HttpRequestParser(object()).feed_data(method.encode() + b" / HTTP/1.1\r\n\r\n")
    except httptools.HttpParserInvalidMethodError:
        return True
    return False


def assert_refused_method(response) -> None:
    assert response.code == 501, response.code
    payload = json.loads(response.body)
    assert set(payload) == ERROR_KEYS and payload["error"] == "Not implemented"


@st.composite
def bodies(draw) -> Tuple[bytes, str, bool]:
    """(body, content type, chunked?) -- raw bytes, or a multipart form with a file part."""
    if draw(st.booleans()):
        body = draw(st.binary(max_size=70_000))
        ctype = "application/octet-stream"
    else:
        boundary = "b" + draw(st.text(_UNRESERVED, min_size=8, max_size=30))
        fields = draw(st.lists(st.tuples(st.text(_UNRESERVED, min_size=1, max_size=8),
                                         st.binary(max_size=20_000)), min_size=1, max_size=3))
        parts = []
        for i, (name, data) in enumerate(fields):
            parts.append(("--%s\r\nContent-Disposition: form-data; name=\"%s\"; "
                          "filename=\"f%d.bin\"\r\nContent-Type: application/octet-stream"
                          "\r\n\r\n" % (boundary, name, i)).encode() + data + b"\r\n")
        body = b"".join(parts) + ("--%s--\r\n" % boundary).encode()
        ctype = "multipart/form-data; boundary=%s" % boundary
    return body, ctype, draw(st.booleans()) and len(body) > 0


# --- fixtures --------------------------------------------------------------------------------

@pytest.fixture
def config() -> GatewayConfig:
    return GatewayConfig(max_body=1 << 20, proxy_timeout=10000, connect_timeout=2000,
                         ready_wait=0)


@pytest.fixture
def bridge(echo_url) -> FakeBridge:
    return FakeBridge(echo_url)


@pytest.fixture
def app(bridge, config):
    # the gateway's default client; PROXY_TEST_CLIENT=tornado.simple_httpclient.
    # SimpleAsyncHTTPClient runs the suite on the alternative (GATEWAY_UPSTREAM=simple)
    return tornado.web.Application(proxy_routes(
        bridge, config, client=os.environ.get("PROXY_TEST_CLIENT") or None))


@pytest.fixture
def client(io_loop):
    client = AsyncHTTPClient(force_instance=True)
    yield client
    client.close()


class CountingServer(TCPServer):
    def __init__(self) -> None:
        super().__init__()
        self.connections = 0

    async def handle_stream(self, stream, address) -> None:
        self.connections += 1
        stream.close()


async def send(client: AsyncHTTPClient, port: int, method: str, target: str,
               headers: httputil.HTTPHeaders, body: bytes, chunked: bool):
    framed = chunked and method not in ("POST", "PUT", "PATCH")
    kwargs: dict = {}
    if chunked:
        async def producer(write):
            for i in range(0, len(body), 16384):
                piece = body[i:i + 16384]
                await write(b"%x\r\n%s\r\n" % (len(piece), piece) if framed else piece)
            if framed:
                await write(b"0\r\n\r\n")
        kwargs["body_producer"] = producer
        if framed:
            headers.add("Transfer-Encoding", "chunked")
    elif body or method in ("POST", "PUT", "PATCH"):
        kwargs["body"] = body
    return await client.fetch("http://127.0.0.1:%d%s" % (port, target), method=method,
                              headers=headers, raise_error=False,
                              allow_nonstandard_methods=True, decompress_response=False,
                              follow_redirects=False, request_timeout=20, **kwargs)


# --- Property 4 ------------------------------------------------------------------------------

# Headers the upstream may see beyond the client's own: the proxy's X-Forwarded-*, and what
# HTTP clients (the test's and the proxy's, both Tornado) add when absent: Host, User-Agent,
# Connection (per hop), framing headers, Content-Type for POST.
# What may reach the child beyond the client's own fields: framing and routing fields and the
# X-Forwarded-* the gateway adds. Not Content-Type or User-Agent: a client's clients invent
# those (a form type on every POST, "Tornado/x.y"), a proxy must not.
_ADDED = {"host", "connection", "content-length", "transfer-encoding",
          "x-forwarded-for", "x-forwarded-proto", "x-forwarded-host"}


@pytest.mark.timeout(120)
@PROPERTY_SETTINGS
@given(method=methods, segments=path_segments(), query=query_pairs, extra=header_lists,
       payload=bodies(), status=st.one_of(st.none(), st.integers(200, 599).filter(
           lambda c: c not in (204, 304))),
       reason=st.from_regex(r"\A[A-Za-z][A-Za-z ]{0,20}[A-Za-z]\Z"))
def test_property_4_proxy_request_preservation(io_loop, gw_port, client, bridge, method,
                                               segments, query, extra, payload, status, reason):
    """Feature: python-backend-integration, Property 4: Proxy request preservation.

    For random methods, paths, query strings, headers (repeats included) and bodies (raw,
    chunked, multipart), the upstream sees exactly the method, the raw target, the headers and
    the body bytes; the client sees the upstream's status, reason phrase and headers."""
    bridge.set_state(BridgeState.READY)
    body, ctype, chunked = payload
    if status is None:
        path = "/api/deepfake/" + "/".join(segments)
        pairs = query
    else:
        path = "/api/deepfake/status/%d" % status
        pairs = [("reason", reason)] + query
    target = path + ("?" + urllib.parse.urlencode(pairs) if pairs else "")
    headers = hdrs(extra)
    if body:
        headers["Content-Type"] = ctype

    response = io_loop.run_sync(lambda: send(client, gw_port, method, target, headers, body,
                                             chunked))
    if server_refuses_method(method):
        assert_refused_method(response)
        return
    assert response.code == (status or 200)
    if status is not None:
        assert response.reason == reason
    echo = json.loads(response.body)
    assert echo["method"] == method
    assert echo["target"] == target
    assert echo["body_length"] == len(body)
    assert echo["body_sha256"] == hashlib.sha256(body).hexdigest()
    seen = [(k.lower(), v) for k, v in echo["headers"]]
    sent_names = {n.lower() for n, _ in extra}
    # per name, every value in order (HTTPHeaders groups repeats by name, which HTTP allows:
    # only the order of the values of one field name is significant)
    for name in sent_names:
        assert [v for k, v in seen if k == name] == [v for n, v in extra if n.lower() == name]
    # what this test sends beyond `extra`: the body's Content-Type; and what its own client
    # (Tornado's simple client) adds on the wire: a User-Agent, a form Content-Type on a POST
    # that has none. Nothing else may appear.
    client_added = {"user-agent"} | ({"content-type"} if body or method == "POST" else set())
    assert {k for k, _ in seen} <= sent_names | client_added | _ADDED
    if body:
        assert dict(seen)["content-type"] == ctype
    # response headers: the echo's own, unchanged (Tornado's defaults replaced, not added)
    assert response.headers["Server"].startswith("echo")
    assert response.headers["Content-Type"] == "application/json"
    assert int(response.headers["Content-Length"]) == len(response.body)


# --- Property 5 ------------------------------------------------------------------------------

@pytest.mark.timeout(120)
@PROPERTY_SETTINGS
@given(state=st.sampled_from(["idle", "starting", "unhealthy", "failed", "exited", "stopping",
                              "stopped"]),
       method=methods, segments=path_segments(), query=query_pairs, extra=header_lists,
       payload=bodies())
def test_property_5_error_response_consistency(io_loop, gw_port, client, bridge, state, method,
                                               segments, query, extra, payload):
    """Feature: python-backend-integration, Property 5: Error response consistency.

    For random requests while the bridge is in a state where Flask is not usable (the wait
    for readiness being 0 here), the answer is a JSON 503 of the standard shape naming the
    state, and no connection to the upstream is ever attempted."""
    upstream = CountingServer()
    port = free_port()
    upstream.listen(port, "127.0.0.1")
    try:
        bridge.flask_url = "http://127.0.0.1:%d" % port
        bridge.set_state(BridgeState(state))
        body, ctype, chunked = payload
        target = "/api/deepfake/" + "/".join(segments) + (
            "?" + urllib.parse.urlencode(query) if query else "")
        response = io_loop.run_sync(lambda: send(client, gw_port, method, target, hdrs(extra),
                                                 body, chunked))
        io_loop.run_sync(lambda: asyncio.sleep(0))  # let a stray connect, if any, land
        if server_refuses_method(method):
            assert_refused_method(response)
            assert upstream.connections == 0
            return
        assert response.code == 503
        assert response.headers["Content-Type"].startswith("application/json")
        payload_json = json.loads(response.body)
        assert set(payload_json) == ERROR_KEYS
        assert TIMESTAMP.match(payload_json["timestamp"])
        assert "(state: %s)" % state in payload_json["message"]
        assert ("Retry-After" in response.headers) == (state in ("starting", "unhealthy"))
        assert upstream.connections == 0
    finally:
        upstream.stop()


# --- Property 12 -----------------------------------------------------------------------------

class _Recorder(tornado.web.RequestHandler):
    """Upstream that records whether the bridge was ready when each request arrived."""

    SUPPORTED_METHODS = ("GET", "POST")

    def initialize(self, bridge: FakeBridge, arrivals: list) -> None:
        self.bridge = bridge
        self.arrivals = arrivals

    def get(self) -> None:
        self.arrivals.append((self.request.uri, self.bridge.is_flask_ready()))
        self.write({"ok": True})

    post = get


READY_WAIT_MS = 60


@pytest.fixture
def timing_setup(io_loop, bridge):
    arrivals: list = []
    upstream_app = tornado.web.Application([(r"/.*", _Recorder,
                                             dict(bridge=bridge, arrivals=arrivals))])
    port = free_port()
    server = upstream_app.listen(port, "127.0.0.1")
    bridge.flask_url = "http://127.0.0.1:%d" % port
    yield arrivals
    server.stop()


@pytest.fixture
def timing_config() -> GatewayConfig:
    return GatewayConfig(proxy_timeout=5000, connect_timeout=1000, ready_wait=READY_WAIT_MS)


@pytest.mark.timeout(120)
@PROPERTY_SETTINGS
@given(delays=st.lists(st.integers(0, 80), min_size=1, max_size=5),
       outcome=st.sampled_from(["ready", "ready", "failed", "never"]),
       change_at=st.integers(0, 80))
def test_property_12_request_timing_and_readiness(io_loop, client, bridge, timing_setup,
                                                  timing_config, delays, outcome, change_at):
    """Feature: python-backend-integration, Property 12: Request timing and readiness.

    Requests fired at random times while Flask starts, with readiness (or failure) at a random
    time: none reaches the upstream before the state is ready; each either succeeds (after
    readiness) or gets a 503; one that arrives after readiness, or early enough to wait for it
    within the bounded wait, succeeds."""
    arrivals = timing_setup
    arrivals.clear()
    bridge.set_state(BridgeState.STARTING)
    app = tornado.web.Application(proxy_routes(bridge, timing_config))

    changed_at: List[float] = []

    async def scenario() -> List[Tuple[int, int, float, float]]:
        sockets = bind_sockets(0, "127.0.0.1")
        port = sockets[0].getsockname()[1]
        server = HTTPServer(app)
        server.add_sockets(sockets)
        loop = asyncio.get_running_loop()
        target = {"ready": BridgeState.READY, "failed": BridgeState.FAILED}.get(outcome)

        def change() -> None:
            changed_at.append(loop.time())
            bridge.set_state(target)

        # cancelled at the end: a change still pending when the requests are over must not
        # fire during the next example (it would make that example's bridge ready)
        timer = loop.call_later(change_at / 1000.0, change) if target is not None else None

        async def one(i: int, delay_ms: int) -> Tuple[int, int, float, float]:
            await asyncio.sleep(delay_ms / 1000.0)
            sent = loop.time()
            response = await client.fetch("http://127.0.0.1:%d/api/deepfake/r%d" % (port, i),
                                          raise_error=False, request_timeout=10)
            return i, response.code, sent, loop.time()

        try:
            return await asyncio.gather(*(one(i, d) for i, d in enumerate(delays)))
        finally:
            if timer is not None:
                timer.cancel()
            server.stop()

    results = io_loop.run_sync(scenario)
    assert all(ready for _, ready in arrivals), "a request reached Flask before it was ready"
    reached = {uri for uri, _ in arrivals}
    wait_s = READY_WAIT_MS / 1000.0
    for i, code, sent, answered in results:
        assert code in (200, 503)
        assert (code == 200) == ("/api/deepfake/r%d" % i in reached)
        if outcome != "ready":
            assert code == 503
        if code == 503:  # the wait is bounded
            assert answered - sent < wait_s + 1.0
        if not changed_at:  # every request was over before the state changed
            assert code == 503
        elif outcome == "ready" and sent + wait_s >= changed_at[0] + 0.02:
            # sent after readiness, or early enough to wait for it: must succeed
            assert code == 200
