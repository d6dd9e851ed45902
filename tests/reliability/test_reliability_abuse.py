"""Abuse through raw sockets: slow clients, oversized bodies, request smuggling, paths escaping
the prefix, Werkzeug's debugger, and the addresses both servers bind."""
from __future__ import annotations

import json
import posixpath
import re
import socket
import time
import urllib.parse
import uuid

import psutil
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rel_helpers import echo_args, read_http_response, request

pytestmark = pytest.mark.integration


def marker() -> str:
    return "m" + uuid.uuid4().hex[:12]


def events_for(gw, mark: str):
    return [e for e in gw.echo_events() if mark in e["target"]]


def settled_events_for(gw, mark: str, limit: float = 5.0):
    """What reached the child for ``mark``, once the child has caught up: a sentinel request
    sent through the gateway after the one under test must have been recorded first (an event
    to wait for, bounded by ``limit``, instead of a fixed sleep)."""
    sentinel = marker()
    resp = gw.request("GET", "/api/deepfake/settled-%s" % sentinel, timeout=limit)
    assert resp.status == 200, resp
    deadline = time.monotonic() + limit
    while True:
        events = gw.echo_events()
        if any(sentinel in e["target"] for e in events):
            return [e for e in events if mark in e["target"]]
        assert time.monotonic() < deadline, "the child never recorded the sentinel"
        time.sleep(0.01)


def closed_within(sock: socket.socket, limit: float, feed=None, every: float = 0.25):
    """Seconds until the server closes ``sock`` (feeding ``feed`` bytes every ``every`` s),
    and what it sent; fails if it is still open after ``limit``."""
    started = time.monotonic()
    received = b""
    sock.settimeout(every)
    while time.monotonic() - started < limit:
        if feed:
            try:
                sock.sendall(feed)
            except OSError:
                return time.monotonic() - started, received
        try:
            data = sock.recv(65536)
        except socket.timeout:
            continue
        except ConnectionResetError:
            return time.monotonic() - started, received
        if not data:
            return time.monotonic() - started, received
        received += data
    raise AssertionError("the gateway still holds the slow client after %.1f s" % limit)


# --- slow clients ---------------------------------------------------------------------------

@pytest.mark.timeout(20)
def test_idle_connection_is_closed(echo_gw):
    with socket.create_connection(("127.0.0.1", echo_gw.port)) as sock:
        took, data = closed_within(sock, 6)
    assert data == b"" and 1.5 < took < 4, took


@pytest.mark.timeout(20)
def test_slow_headers_cannot_hold_the_connection(echo_gw):
    with socket.create_connection(("127.0.0.1", echo_gw.port)) as sock:
        sock.sendall(b"GET /api/deepfake/stats HTTP/1.1\r\nHost: t\r\n")
        took, data = closed_within(sock, 6, feed=b"X")  # one header byte every 0.25 s
    assert data == b"" and 1.5 < took < 4, took


@pytest.mark.timeout(20)
def test_stalled_body_on_the_proxy_gets_408_and_never_completes_upstream(echo_gw):
    mark = marker()
    with socket.create_connection(("127.0.0.1", echo_gw.port)) as sock:
        sock.sendall(("POST /api/deepfake/%s HTTP/1.1\r\nHost: t\r\nContent-Length: 100000"
                      "\r\n\r\n" % mark).encode() + b"a" * 1000)
        took, data = closed_within(sock, 6)
    assert 1.2 < took < 4, took
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408"), data
    assert json.loads(body)["error"] == "Request timeout"
    assert [e["complete"] for e in settled_events_for(echo_gw, mark)] in ([], [False])


@pytest.mark.timeout(20)
def test_trickling_body_on_the_proxy_is_bounded_by_the_proxy_timeout(echo_gw):
    mark = marker()
    with socket.create_connection(("127.0.0.1", echo_gw.port)) as sock:
        sock.sendall(("POST /api/deepfake/%s HTTP/1.1\r\nHost: t\r\nContent-Length: 100000"
                      "\r\n\r\n" % mark).encode())
        took, data = closed_within(sock, 8, feed=b"abcde")  # 20 bytes/s, never stalls 1.5 s
    assert 2.5 < took < 5, took
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 504"), data
    assert json.loads(body)["error"] == "Gateway timeout"
    assert [e["complete"] for e in settled_events_for(echo_gw, mark)] in ([], [False])


@pytest.mark.timeout(20)
@pytest.mark.parametrize("feed", [None, b"ab"], ids=["stalled", "trickling"])
def test_slow_body_on_the_gateways_own_routes_is_cut(echo_gw, feed):
    with socket.create_connection(("127.0.0.1", echo_gw.port)) as sock:
        sock.sendall(b"POST /api/gateway/status HTTP/1.1\r\nHost: t\r\nContent-Length: 500000"
                     b"\r\n\r\n" + b"a" * 100)
        took, _ = closed_within(sock, 6, feed=feed)
    assert 1.2 < took < 4, took


@pytest.mark.timeout(20)
def test_slow_but_moving_upload_still_passes(echo_gw):
    """The stall limit is not a total limit: 1 MiB sent over ~2 s (longer than the 1.5 s body
    timeout) in small steps arrives whole."""
    body = b"z" * (1024 * 1024 - 10)
    with socket.create_connection(("127.0.0.1", echo_gw.port)) as sock:
        sock.sendall(b"POST /api/deepfake/upload HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n"
                     b"\r\n" % len(body))
        step = len(body) // 8
        for i in range(0, len(body), step):
            sock.sendall(body[i:i + step])
            time.sleep(0.25)
        result = read_http_response(sock, timeout=5)
    assert result["status"] == 200 and result["complete"], result
    assert json.loads(result["body"])["body_length"] == len(body)


# --- oversized bodies -----------------------------------------------------------------------

@pytest.mark.timeout(20)
def test_declared_oversized_body_gets_json_413_before_the_child_sees_it(echo_gw):
    mark = marker()
    with socket.create_connection(("127.0.0.1", echo_gw.port)) as sock:
        sock.sendall(("POST /api/deepfake/%s HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n"
                      % (mark, 2 * 1024 * 1024)).encode())  # nothing of the body is sent
        result = read_http_response(sock, timeout=3)
    assert result["status"] == 413 and result["complete"], result
    assert json.loads(result["body"])["error"] == "Payload too large"
    assert settled_events_for(echo_gw, mark) == []


@pytest.mark.timeout(20)
def test_chunked_oversized_body_gets_413_and_never_completes_upstream(echo_gw):
    mark = marker()
    chunk = b"%x\r\n%s\r\n" % (65536, b"q" * 65536)
    with socket.create_connection(("127.0.0.1", echo_gw.port)) as sock:
        sock.sendall(("POST /api/deepfake/%s HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked"
                      "\r\n\r\n" % mark).encode())
        try:
            for _ in range(40):  # 2.5 MiB, the limit is 1 MiB
                sock.sendall(chunk)
        except OSError:
            pass
        result = read_http_response(sock, timeout=5)
    assert result["status"] == 413, result
    assert json.loads(result["body"])["error"] == "Payload too large"
    assert [e["complete"] for e in settled_events_for(echo_gw, mark)] in ([], [False])


# --- request smuggling ----------------------------------------------------------------------

# (name, request with {m} for the marker, refused by the proxy's own JSON 400?)
SMUGGLING = [
    ("CL0+TE", "POST /api/deepfake/{m} HTTP/1.1\r\nHost: t\r\nContent-Length: 0\r\n"
               "Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n", True),
    ("TE+CL", "POST /api/deepfake/{m} HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n"
              "Content-Length: 4\r\n\r\n0\r\n\r\n", True),
    ("GET CL0+TE", "GET /api/deepfake/{m} HTTP/1.1\r\nHost: t\r\nContent-Length: 0\r\n"
                   "Transfer-Encoding: chunked\r\n\r\n", True),
    ("CL twice", "POST /api/deepfake/{m} HTTP/1.1\r\nHost: t\r\nContent-Length: 4\r\n"
                 "Content-Length: 0\r\n\r\nabcd", True),
    ("CL list", "POST /api/deepfake/{m} HTTP/1.1\r\nHost: t\r\nContent-Length: 0, 4\r\n\r\nabcd",
     True),
    ("CL sign", "POST /api/deepfake/{m} HTTP/1.1\r\nHost: t\r\nContent-Length: +4\r\n\r\nabcd",
     True),
    ("TE xchunked", "POST /api/deepfake/{m} HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: xchunked"
                    "\r\n\r\n0\r\n\r\n", True),
    ("TE list", "POST /api/deepfake/{m} HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked, "
                "identity\r\n\r\n0\r\n\r\n", True),
    ("TE twice", "POST /api/deepfake/{m} HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n"
                 "Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n", True),
    ("obs-fold", "GET /api/deepfake/{m} HTTP/1.1\r\nHost: t\r\nX-A: a\r\n b\r\n\r\n", False),
    ("obs-fold TE", "POST /api/deepfake/{m} HTTP/1.1\r\nHost: t\r\nTransfer-Encoding:\r\n "
                    "chunked\r\n\r\n0\r\n\r\n", False),
    ("space before colon", "POST /api/deepfake/{m} HTTP/1.1\r\nHost: t\r\nContent-Length : 4"
                           "\r\n\r\nabcd", False),
    ("bad chunk size", "POST /api/deepfake/{m} HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: "
                       "chunked\r\n\r\n0x4\r\nabcd\r\n0\r\n\r\n", None),
]


@pytest.mark.timeout(30)
@pytest.mark.parametrize("name,template,ours", SMUGGLING, ids=[c[0] for c in SMUGGLING])
def test_smuggling_attempt_is_refused_not_forwarded(echo_gw, name, template, ours):
    mark = marker()
    result = echo_gw.raw(template.format(m=mark).encode(), timeout=3)
    assert result.status == 400, result.data
    assert result.closed, "the connection must not be reused after an ambiguous request"
    if ours:
        assert result.is_gateway_error(400), result.data
    seen = settled_events_for(echo_gw, mark)
    if ours is None:  # refused while the body streams: the child may see a cut request only
        assert [e["complete"] for e in seen] in ([], [False])
    else:
        assert seen == [], seen


@pytest.mark.timeout(20)
def test_request_hidden_in_a_body_never_reaches_the_child_as_a_request(echo_gw):
    mark = marker()
    hidden = ("GET /api/deepfake/%s-smuggled HTTP/1.1\r\nHost: t\r\n\r\n" % mark).encode()
    payload = ("POST /api/deepfake/%s HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n"
               % (mark, len(hidden))).encode() + hidden
    # twice on one connection, then a normal request, to tempt any framing desync upstream
    with socket.create_connection(("127.0.0.1", echo_gw.port)) as sock:
        for _ in range(2):
            sock.sendall(payload)
            first = read_http_response(sock, timeout=5)
            assert first["status"] == 200 and first["complete"]
            assert json.loads(first["body"])["body_length"] == len(hidden)
    targets = [e["target"] for e in settled_events_for(echo_gw, mark)]
    assert targets == ["/api/deepfake/%s" % mark] * 2, targets


# --- paths ----------------------------------------------------------------------------------

ESCAPES = [
    "/api/deepfake/../gateway/status", "/api/deepfake/..", "/api/deepfake/%2e%2e/x",
    "/api/deepfake/%2E%2E/%2E%2E/etc/passwd", "/api/deepfake/.%2e/x", "/api/deepfake/%252e%252e/x",
    "/api/deepfake//x", "/api/deepfake/x//..//y", "/api/deepfake/..%2fx", "/api/deepfake/%2f..",
    "/api/deepfake/..\\x", "/api/deepfake/%5c..%5cx", "/api/deepfake/./stats",
    "/api/deepfake/%00", "/api/deepfake/%25252e%25252e/x", "/api/deepfake/stats/../../x",
]


@pytest.mark.timeout(30)
def test_paths_escaping_the_prefix_never_reach_the_child(echo_gw):
    mark = marker()
    for path in ESCAPES:
        target = path + ("&" if "?" in path else "?") + mark
        result = echo_gw.raw(("GET %s HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
                              % target).encode(), timeout=3)
        assert result.is_gateway_error(400) or result.is_gateway_error(404), (path, result.data)
    for path in ["/api/deepfakeX/stats", "/api/deepfake%2fstats", "//api/deepfake/stats",
                 "/x/../api/deepfake/stats"]:
        result = echo_gw.raw(("GET %s?%s HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
                              % (path, mark)).encode(), timeout=3)
        assert result.status in (400, 404) and result.is_gateway_error(result.status), (
            path, result.data)
    assert settled_events_for(echo_gw, mark) == []


def _normalised(target: str) -> str:
    path = target.split("?", 1)[0]
    for _ in range(5):
        path = urllib.parse.unquote(path).replace("\\", "/")
    return posixpath.normpath(path)


SEGMENTS = st.sampled_from(["..", ".", "%2e%2e", "%2E.", ".%2e", "%252e%252e", "", "x", "s",
                            "%2f", "%5c", "..%2f", "a%2e", "%2e", "__x__", "%41", "~", ";",
                            "..;", "%c0%ae%c0%ae", "%u002e"])


@pytest.mark.timeout(120)
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(segments=st.lists(SEGMENTS, min_size=1, max_size=6))
def test_property_no_target_leaves_the_prefix(echo_gw, segments):
    path = "/api/deepfake/" + "/".join(segments)
    result = echo_gw.raw(("GET %s HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
                          % path).encode(), timeout=5)
    if result.status == 200:
        seen = result.json_body()["target"]
        assert seen == path  # passed byte for byte...
        normal = _normalised(seen)  # ...and harmless however the child decodes it
        assert normal == "/api/deepfake" or normal.startswith("/api/deepfake/"), (path, normal)
    else:
        assert result.is_gateway_error(400) or result.is_gateway_error(404), (path, result.data)


# --- Werkzeug's debugger --------------------------------------------------------------------

DEBUGGER_TARGETS = [
    "/api/deepfake/stats?__debugger__=yes&cmd=resource&f=style.css",
    "/api/deepfake/stats?__debugger__=yes&cmd=printpin&s=x",
    "/api/deepfake/analyze?__debugger__=yes&cmd=exec&frm=0&s=x",
    "/api/deepfake/__debugger__",
    "/api/deepfake/stats?%5f%5fdebugger%5f%5f=yes&cmd=resource&f=debugger.js",
    "/api/deepfake/stats?%255f%255fdebugger%255f%255f=yes",
    "/api/deepfake/stats?x=1&__DEBUGGER__=yes",
    "/api/deepfake/%5F%5Fdebugger%5F%5F?cmd=resource",
    "/api/deepfake/stats?__debugger__+=yes",
]


@pytest.mark.timeout(30)
@pytest.mark.parametrize("mode", ["development", "production"])
def test_werkzeug_debugger_is_never_reachable(service_gw, service_prod_gw, mode):
    gw = service_gw if mode == "development" else service_prod_gw
    for target in DEBUGGER_TARGETS:
        for method in ("GET", "POST"):
            resp = gw.request(method, target, body=b"" if method == "POST" else None)
            assert resp.is_gateway_error(404), (method, target, resp)
            assert b"Werkzeug" not in resp.body and b"console" not in resp.body.lower()
    # the child never saw any of them (development logs every request it serves)
    served = [line for line in gw.log().splitlines() if "[Python]" in line]
    assert not [line for line in served if "debugger" in line.lower()], served[-5:]
    # and were one to reach it, its own guard answers 404 too (defence in depth)
    direct = request(gw.flask_port, "GET", DEBUGGER_TARGETS[0])
    assert direct.status == 404 and b"Werkzeug" not in direct.body


# --- bind addresses -------------------------------------------------------------------------

def listening(pid: int):
    return {(c.laddr.ip, c.laddr.port) for c in psutil.Process(pid).net_connections("inet")
            if c.status == psutil.CONN_LISTEN}


@pytest.mark.timeout(30)
def test_both_servers_bind_loopback_by_default(service_gw, service_prod_gw):
    for gw in (service_gw, service_prod_gw):
        assert listening(gw.pid) == {("127.0.0.1", gw.port)}
        assert listening(gw.child_pid()) == {("127.0.0.1", gw.flask_port)}


@pytest.mark.timeout(30)
def test_gateway_binds_all_interfaces_only_when_told_and_the_child_stays_on_loopback(gateways):
    gw = gateways(echo_args() + ["--host", "0.0.0.0"])
    assert listening(gw.pid) == {("0.0.0.0", gw.port)}
    # beyond loopback without a token: one is generated, its URL printed once, the API closed
    token = re.search(r"/\?token=([A-Za-z0-9_-]+)", gw.log()).group(1)
    assert gw.get("/api/deepfake/stats").status == 401
    assert "pid" not in gw.get("/api/gateway/status").json()["service"]
    auth = {"Authorization": "Bearer " + token}
    assert gw.get("/api/deepfake/stats", headers=auth).status == 200
    child = gw.get("/api/gateway/status", headers=auth).json()["service"]["pid"]
    assert listening(child) == {("127.0.0.1", gw.flask_port)}
    assert gw.interrupt() == 0
    assert gw.log().count(token) == 1  # printed once, never logged again


@pytest.mark.timeout(40)
def test_an_open_gateway_beyond_loopback_is_an_explicit_loud_choice(gateways):
    gw = gateways(echo_args() + ["--host", "0.0.0.0", "--auth", "none"])
    assert gw.get("/api/deepfake/stats").status == 200
    assert "GATEWAY_AUTH=none" in gw.log() and "without authentication" in gw.log()
    assert "?token=" not in gw.log()
    assert gw.interrupt() == 0


# --- header fidelity (found under load: Tornado's client invents a form Content-Type) --------

@pytest.mark.timeout(20)
def test_proxy_never_invents_a_content_type(echo_gw, service_gw):
    for body in (b"abc", b""):
        echo = echo_gw.request("POST", "/api/deepfake/ct", body).json()
        assert [v for k, v in echo["headers"] if k.lower() == "content-type"] == []
    echo = echo_gw.request("POST", "/api/deepfake/ct", b"abc", {"Content-Type": "text/plain"})
    assert [v for k, v in echo.json()["headers"] if k.lower() == "content-type"] == ["text/plain"]
    # the service judges what the client sent, not a form it never sent
    resp = service_gw.request("POST", "/api/deepfake/analyze", b"\x89PNG not really")
    assert resp.status == 415 and "'(none)'" in resp.json()["message"], resp
    form = service_gw.request("POST", "/api/deepfake/feedback", b"label=real&analysis_id=x")
    assert form.status == 400 and form.json()["error"] == "Invalid label", form


@pytest.mark.timeout(30)
def test_many_slow_clients_neither_block_others_nor_stay(echo_gw):
    """200 slow-header connections at once: a normal request is still answered at once, and
    the gateway drops every slow one after its idle timeout (2 s here)."""
    slow = []
    try:
        for _ in range(200):
            sock = socket.create_connection(("127.0.0.1", echo_gw.port), timeout=5)
            sock.sendall(b"GET /api/deepfake/stats HTTP/1.1\r\nHost: t\r\nX-Slow: ")
            slow.append(sock)
        started = time.monotonic()
        resp = echo_gw.get("/api/deepfake/stats", timeout=5)
        assert resp.status == 200 and time.monotonic() - started < 1.5
        deadline = time.monotonic() + 6
        for sock in slow:
            sock.settimeout(max(0.05, deadline - time.monotonic()))
            try:
                assert sock.recv(1024) == b""  # closed by the gateway, nothing sent
            except ConnectionResetError:
                pass
        assert time.monotonic() < deadline
    finally:
        for sock in slow:
            sock.close()
