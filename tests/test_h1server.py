"""GatewayHTTPServer (``tornado_gateway/h1server.py``), the HTTP/1.1 server the gateway runs on.

The property: for any byte stream a client sends, the server lets the same requests reach the
application and writes the same answers as Tornado's own ``HTTPServer``, and both stop at the
same point (a refusal, a close, or waiting for more). The differences allowed are how a
refusal looks (Tornado: a bare 400 or a silent close; here: a JSON 400/413/431) and one
deliberate one, kept out of the random streams and tested on its own: a request without a
body that a streaming handler answers before its prepare() is over (a 405 for an unknown
method, the proxy's 503) leaves the connection open here, where Tornado closes it. The other
tests cover what the property cannot: flow control both ways, limits, early answers,
disconnects.
"""
from __future__ import annotations

import asyncio
import json
import re
import socket
from typing import Any, List, Tuple

import pytest
import tornado.httputil
import tornado.web
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tornado.httpserver import HTTPServer
from tornado.iostream import StreamClosedError
from tornado.netutil import bind_sockets

from tornado_gateway.h1server import GatewayHTTPServer


def _observed(handler: tornado.web.RequestHandler, body: bytes) -> bytes:
    r = handler.request
    return repr((r.method, r.uri, r.version, sorted(r.headers.get_all()), body)).encode()


class Echo(tornado.web.RequestHandler):
    """Answers with what it received (body read whole by the server)."""

    SUPPORTED_METHODS = ("GET", "HEAD", "POST", "DELETE", "PATCH", "PUT", "OPTIONS")

    def _echo(self, *_args: Any) -> None:
        self.set_header("Content-Type", "text/plain")
        self.write(_observed(self, self.request.body))

    get = head = post = delete = patch = put = options = _echo  # type: ignore[assignment]


@tornado.web.stream_request_body
class StreamEcho(Echo):
    """The same, with the body streamed through an awaiting data_received, answered in
    three flushed pieces (a chunked response)."""

    def prepare(self) -> None:
        self.chunks: List[bytes] = []

    async def data_received(self, chunk: bytes) -> None:
        self.chunks.append(chunk)
        await asyncio.sleep(0)

    async def _stream(self, *_args: Any) -> None:
        text = _observed(self, b"".join(self.chunks))
        for i in range(3):
            self.write(text[i::3])
            await self.flush()

    get = head = post = delete = patch = put = options = _stream  # type: ignore[assignment]


class Status(tornado.web.RequestHandler):
    def get(self, code: str) -> None:
        self.set_status(int(code))
        if int(code) not in (204, 304):
            self.write("status %s" % code)


class Declared(tornado.web.RequestHandler):
    def get(self) -> None:
        self.set_header("Content-Length", "5")
        self.write(b"12345")


def _app() -> tornado.web.Application:
    return tornado.web.Application([
        (r"/echo", Echo), (r"/stream", StreamEcho), (r"/status/(\d+)", Status),
        (r"/len", Declared),
    ])


# -- the request streams ------------------------------------------------------------------

_METHODS = st.sampled_from(["GET", "POST", "PUT", "HEAD", "DELETE", "OPTIONS", "PATCH"])
_ODD_METHODS = st.sampled_from(["get", "FOO", "G ET", "", "GET\x00"])
_TARGETS = st.sampled_from([
    "/echo", "/stream", "/echo?a=1&b=%20", "/status/204", "/status/304", "/status/200",
    "/len", "/missing", "*", "http://h/echo", "/e cho", "/stream?x=%2F",
])
_VERSIONS = st.sampled_from(["HTTP/1.1"] * 6 + ["HTTP/1.0", "HTTP/1.2", "HTTP/2.0",
                                                "http/1.1", "HTTP/1.1 ", "HTTP/1"])
_FIELDS = st.sampled_from([
    "Host: h", "X-A: 1", "X-A: 2", "Connection: keep-alive", "Connection: close",
    "Connection: Keep-Alive", "Expect: 100-continue", "Content-Type: text/plain",
    "Accept: */*", "X-Tab:\tv\t", "x-lower: v", "X-Empty:",
])
_ODD_FIELDS = st.sampled_from([
    " folded", "\tfolded", "No-Colon", "Bad Name: x", "X-Nul: a\x00b", "X-Sp : v",
    "X-Del: \x7f", "X-Cr: a\rb", ": empty", "X-Utf: \xe9",
])
_LENGTH_FORMS = st.sampled_from(["%d", "%d", "%d", "%d,%d", "%d, %d", "+%d", " %d", "0x%x",
                                 "%d.0", "%d,%d9", "%d, 1%d", "-%d", "%d%d"])
_CHUNK_FORMS = st.sampled_from(["%x", "%x", "%X", "0%x", "%x;ext=1", "0x%x", " %x", "+%x",
                                "%x " , "%x" + "0" * 70])
_CHUNK_ENDS = st.sampled_from([b"\n", b"", b"XX", b"X-Trailer: 1\r\n\r\n", b"\r\r\n"])
_TE_FORMS = st.sampled_from(["chunked", "chunked", "Chunked", "chunked, chunked",
                             "gzip, chunked", "identity", "chunked\x0b", " chunked"])


@st.composite
def _request(draw: Any, last: bool = False) -> bytes:
    if last:
        return b"GET /echo HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n"
    eol = draw(st.sampled_from(["\r\n"] * 5 + ["\n"]))
    target = draw(_TARGETS)
    odd = not draw(st.integers(0, 9)) and not target.startswith("/stream")  # see below
    method = draw(_ODD_METHODS if odd else _METHODS)
    lines = ["%s %s %s" % (method, target, draw(_VERSIONS))]
    if draw(st.integers(0, 9)):  # HTTP/1.1 requires it: most requests have one
        lines.append("Host: h")
    lines += draw(st.lists(_FIELDS, max_size=3))
    if not draw(st.integers(0, 7)):
        lines.append(draw(_ODD_FIELDS))
    body = draw(st.binary(max_size=40))
    framing = draw(st.sampled_from(["none", "length", "length", "chunked", "both"]))
    payload = b""
    if framing in ("length", "both"):
        form = draw(_LENGTH_FORMS)
        n = len(body)
        lines.append("Content-Length: " + (form % ((n,) * form.count("%"))))
        payload = body
    if framing in ("chunked", "both"):
        lines.append("Transfer-Encoding: " + draw(_TE_FORMS))
        pieces = []
        rest = body
        while rest:
            size = draw(st.integers(1, max(1, len(rest))))
            form = draw(_CHUNK_FORMS) if not draw(st.integers(0, 5)) else "%x"
            end = b"\r\n" if draw(st.integers(0, 9)) else draw(_CHUNK_ENDS)
            pieces.append((form % size).encode("latin1") + b"\r\n" + rest[:size] + end)
            rest = rest[size:]
        pieces.append(b"0\r\n" + (b"\r\n" if draw(st.integers(0, 9)) else draw(_CHUNK_ENDS)))
        payload = b"".join(pieces)
    lead = draw(st.sampled_from(["", "", "", "\r\n"]))
    head = lead + eol.join(lines) + eol + eol
    return head.encode("latin1") + payload


@st.composite
def _stream(draw: Any) -> Tuple[bytes, List[int]]:
    data = b"".join(draw(st.lists(_request(), min_size=1, max_size=4))) + draw(_request(True))
    cuts = sorted(draw(st.lists(st.integers(1, max(1, len(data) - 1)), max_size=4)))
    return data, cuts


# -- running a stream against a server ---------------------------------------------------

_OURS_REFUSED = re.compile(
    rb"HTTP/1\.1 (400|413|431) [^\r]*\r\nContent-Type: application/json; charset=utf-8\r\n"
    rb"Cache-Control: no-store\r\nContent-Length: \d+\r\nConnection: close\r\n\r\n\{.*\}\Z",
    re.S)
_TORNADO_REFUSED = re.compile(rb"HTTP/1\.1 400 Bad Request\r\n\r\n\Z")


async def _exchange(port: int, data: bytes, cuts: List[int],
                    wait: float = 0.5) -> Tuple[bytes, str]:
    """Send ``data`` cut at ``cuts`` while reading; what came back, and how it ended:
    ``closed`` by the server, ``reset`` (the kernel may have dropped some of what came
    back), or still ``waiting`` for more after ``wait`` seconds of silence."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    out = bytearray()

    async def read() -> str:
        try:
            while True:
                piece = await asyncio.wait_for(reader.read(65536), wait)
                if not piece:
                    return "closed"
                out.extend(piece)
        except asyncio.TimeoutError:
            return "waiting"
        except (ConnectionResetError, BrokenPipeError):
            return "reset"

    reading = asyncio.ensure_future(read())
    try:
        start = 0
        for cut in cuts + [len(data)]:
            if cut > start:
                writer.write(data[start:cut])
                await writer.drain()
                await asyncio.sleep(0.001)
                start = cut
    except (ConnectionResetError, BrokenPipeError):
        pass  # the server closed: what it answered is still read
    try:
        end = await reading
    finally:
        writer.close()
    return bytes(out), end


def _normalized(out: bytes, end: str) -> Tuple[bytes, str]:
    out = re.sub(rb"\r\nDate: [^\r]*", b"\r\nDate: -", out)
    for refused in (_OURS_REFUSED, _TORNADO_REFUSED):
        match = refused.search(out)
        if match:
            return out[: match.start()], "closed"  # a refusal is a close, said politely
    return out, end


@pytest.fixture(scope="module")
def both_servers() -> Any:
    """Tornado's HTTPServer and GatewayHTTPServer on one loop, serving the same app."""
    loop = asyncio.new_event_loop()

    async def start() -> Tuple[Any, Any, int, int]:
        app = _app()
        theirs = HTTPServer(app)
        t_socks = bind_sockets(0, "127.0.0.1")
        theirs.add_sockets(t_socks)
        ours = GatewayHTTPServer(app)
        o_socks = bind_sockets(0, "127.0.0.1")
        await ours.start(o_socks)
        return theirs, ours, t_socks[0].getsockname()[1], o_socks[0].getsockname()[1]

    theirs, ours, t_port, o_port = loop.run_until_complete(start())
    yield loop, t_port, o_port
    theirs.stop()
    ours.stop()
    loop.run_until_complete(ours.close_all_connections())
    loop.close()


@pytest.mark.timeout(600)
@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_stream())
def test_property_same_requests_answers_and_refusals_as_tornado(both_servers, stream):
    """Property (gateway server): a byte stream of requests, valid and malformed, split at
    random points, gets the same answers from GatewayHTTPServer as from Tornado's
    HTTPServer, and both stop at the same point."""
    loop, t_port, o_port = both_servers
    data, cuts = stream

    async def both() -> Tuple[Tuple[bytes, str], Tuple[bytes, str]]:
        theirs, ours = await asyncio.gather(_exchange(t_port, data, cuts),
                                            _exchange(o_port, data, cuts))
        return _normalized(*theirs), _normalized(*ours)

    theirs, ours = loop.run_until_complete(both())
    if theirs[1] == "reset":
        # Tornado closed with request bytes unread: the kernel's reset may have destroyed
        # the end of its answers. GatewayHTTPServer lingers so that it does not.
        assert ours[1] == "closed" and ours[0].startswith(theirs[0]), data
    else:
        assert ours == theirs, data


# -- what the property does not reach -------------------------------------------------------

async def _serve(app: tornado.web.Application, **kwargs: Any) -> Tuple[GatewayHTTPServer, int]:
    server = GatewayHTTPServer(app, **kwargs)
    sockets = bind_sockets(0, "127.0.0.1")
    await server.start(sockets)
    return server, sockets[0].getsockname()[1]


async def _raw(port: int, data: bytes, wait: float = 3.0) -> bytes:
    out, _end = await _exchange(port, data, [], wait=wait)
    return out


def _json_error(out: bytes) -> Tuple[int, dict]:
    head, _, body = out.partition(b"\r\n\r\n")
    assert b"Connection: close" in head
    return int(head.split()[1]), json.loads(body)


@pytest.mark.timeout(20)
async def test_malformed_requests_get_json_errors_not_bare_400s():
    server, port = await _serve(_app(), max_body_size=100, max_header_size=200)
    try:
        status, err = _json_error(await _raw(port, b"GET /echo HTTP/9\r\n\r\n"))
        assert status == 400 and "Malformed HTTP request line" in err["message"]
        assert set(err) == {"error", "message", "suggestion", "timestamp"}
        status, err = _json_error(await _raw(
            port, b"POST /echo HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\n"
                  b"Transfer-Encoding: chunked\r\n\r\n"))
        assert status == 400 and "both Transfer-Encoding and Content-Length" in err["message"]
        status, err = _json_error(await _raw(
            port, b"GET /echo HTTP/1.1\r\nX-Big: " + b"x" * 300 + b"\r\n\r\n"))
        assert status == 431 and "200 bytes" in err["message"]
        status, err = _json_error(await _raw(
            port, b"POST /echo HTTP/1.1\r\nHost: h\r\nContent-Length: 101\r\n\r\n" + b"x" * 101))
        assert status == 413 and "101 bytes" in err["message"]
        chunked = b"POST /echo HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n" + \
            b"40\r\n" + b"x" * 64 + b"\r\n" + b"40\r\n" + b"x" * 64 + b"\r\n0\r\n\r\n"
        status, err = _json_error(await _raw(port, chunked))
        assert status == 413 and "limit of 100 bytes" in err["message"]
        status, err = _json_error(await _raw(
            port, b"POST /echo HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"))
        assert status == 400 and "invalid chunk size" in err["message"]
    finally:
        server.stop()
        await server.close_all_connections()


@pytest.mark.timeout(20)
async def test_a_refused_request_leaves_its_handler_writing_nowhere():
    """A body over the limit is refused by the server while the handler is reading it: the
    client gets the 413, and the handler's own writes fail as on a closed connection."""
    held: List[Any] = []
    closed: List[str] = []

    @tornado.web.stream_request_body
    class Reader(tornado.web.RequestHandler):
        def prepare(self) -> None:
            held.append(self.request.connection)

        def data_received(self, chunk: bytes) -> None:
            pass

        def on_connection_close(self) -> None:
            closed.append("closed")

    server, port = await _serve(tornado.web.Application([(r"/r", Reader)]), max_body_size=100)
    try:
        body = b"80\r\n" + b"x" * 128 + b"\r\n0\r\n\r\n"
        status, err = _json_error(await _raw(
            port, b"POST /r HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n" + body))
        assert status == 413
        with pytest.raises(StreamClosedError):
            await held[0].write_headers(
                tornado.httputil.ResponseStartLine("HTTP/1.1", 200, "OK"),
                tornado.httputil.HTTPHeaders())
        for _ in range(50):
            if closed:
                break
            await asyncio.sleep(0.02)
        assert closed == ["closed"]  # told once the connection is gone
    finally:
        server.stop()


@pytest.mark.timeout(20)
async def test_early_answer_to_a_request_without_body_keeps_the_connection():
    """The deliberate difference from Tornado: nothing of the request is left unread, so
    the connection stays usable (Tornado's HTTPServer closes it)."""
    server, port = await _serve(_app())
    try:
        out, end = await _exchange(
            port, b"FOO /stream HTTP/1.1\r\nHost: h\r\n\r\n"
                  b"GET /echo HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n", [], wait=3.0)
        assert out.startswith(b"HTTP/1.1 405 ") and end == "closed"
        assert b"\r\n\r\nHTTP/1.1 200 OK\r\n" in out or b"</html>HTTP/1.1 200 OK" in out
        assert out.endswith(b"'GET', '/echo', 'HTTP/1.1', [('Connection', 'close'), "
                            b"('Host', 'h')], b'')")
    finally:
        server.stop()


@pytest.mark.timeout(20)
async def test_pipelined_requests_answered_in_order_on_one_connection():
    server, port = await _serve(_app())
    try:
        reqs = b"".join(b"GET /echo?n=%d HTTP/1.1\r\nHost: h\r\n\r\n" % i for i in range(5))
        out = await _raw(port, reqs + b"GET /echo?n=last HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
        assert [int(n) for n in re.findall(rb"/echo\?n=(\d+)", out)] == [0, 1, 2, 3, 4]
        assert out.count(b"HTTP/1.1 200 OK") == 6 and out.rstrip().endswith(b"'')")
    finally:
        server.stop()


@pytest.mark.timeout(30)
async def test_download_back_pressure_bounds_what_is_buffered_for_a_slow_client():
    """A handler that awaits flush() stops producing while the client does not read."""
    produced = []
    piece = b"z" * 65536

    class Big(tornado.web.RequestHandler):
        async def get(self) -> None:
            for _ in range(800):  # 50 MiB
                self.write(piece)
                await self.flush()
                produced.append(len(piece))

    server, port = await _serve(tornado.web.Application([(r"/big", Big)]))
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=2 ** 20)
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        writer.write(b"GET /big HTTP/1.1\r\nHost: h\r\n\r\n")
        await asyncio.sleep(1.0)  # not reading
        stalled_at = sum(produced)
        assert stalled_at < 16 * 2 ** 20, stalled_at  # socket buffers + 64 KiB, not 50 MiB
        got = 0
        while got < 800 * 65536:
            data = await asyncio.wait_for(reader.read(2 ** 20), 10)
            assert data
            got += len(data)
        assert sum(produced) == 800 * 65536
        writer.close()
    finally:
        server.stop()
        await server.close_all_connections()


@pytest.mark.timeout(30)
async def test_upload_back_pressure_pauses_reading_while_the_handler_waits():
    gate = asyncio.Event()
    seen = []

    @tornado.web.stream_request_body
    class Slow(tornado.web.RequestHandler):
        async def data_received(self, chunk: bytes) -> None:
            seen.append(len(chunk))
            await gate.wait()

        def put(self) -> None:
            self.write({"got": sum(seen)})

    server, port = await _serve(tornado.web.Application([(r"/up", Slow)]),
                                max_body_size=2 ** 30)
    try:
        size = 64 * 2 ** 20
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"PUT /up HTTP/1.1\r\nHost: h\r\nContent-Length: %d\r\n\r\n" % size)
        sender = asyncio.ensure_future(_send_zeros(writer, size))
        await asyncio.sleep(1.0)
        (conn,) = server._connections
        assert len(seen) == 1 and seen[0] <= 65536  # pieces of at most chunk_size
        assert len(conn._buf) <= 2 * 256 * 1024, len(conn._buf)  # paused, not buffering
        assert not sender.done()  # the client is held back by TCP
        gate.set()
        await asyncio.wait_for(sender, 20)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert head.startswith(b"HTTP/1.1 200")
        assert b'"got": %d' % size in await reader.read(100)
        writer.close()
    finally:
        server.stop()
        await server.close_all_connections()


async def _send_zeros(writer: asyncio.StreamWriter, size: int) -> None:
    block = bytes(2 ** 20)
    for _ in range(size // len(block)):
        writer.write(block)
        await writer.drain()


@pytest.mark.timeout(20)
async def test_answer_before_the_body_closes_after_it_and_skips_the_body():
    bodies = []

    @tornado.web.stream_request_body
    class Early(tornado.web.RequestHandler):
        def prepare(self) -> None:
            self.set_status(413)
            self.finish("no")

        def data_received(self, chunk: bytes) -> None:
            bodies.append(chunk)

    server, port = await _serve(tornado.web.Application([(r"/e", Early)]))
    try:
        out, end = await _exchange(
            port, b"POST /e HTTP/1.1\r\nHost: h\r\nContent-Length: 10\r\n\r\n0123456789"
                  b"GET /e HTTP/1.1\r\nHost: h\r\n\r\n", [60], wait=3.0)
        assert out.startswith(b"HTTP/1.1 413") and end == "closed"
        assert b"\r\nConnection: close" in out.partition(b"\r\n\r\n")[0]
        assert out.endswith(b"no") and out.count(b"HTTP/1.1") == 1
        assert bodies == []
    finally:
        server.stop()


@pytest.mark.timeout(20)
async def test_client_gone_mid_answer_tells_the_handler_and_fails_its_writes():
    events: List[Any] = []
    stale: List[Any] = []

    class Hang(tornado.web.RequestHandler):
        async def get(self) -> None:
            self.write("first")
            await self.flush()
            stale.append(self.request.connection)
            await asyncio.sleep(0.5)
            try:
                self.write("second")
                await self.flush()
            except StreamClosedError:
                events.append("write failed")

        def on_connection_close(self) -> None:
            events.append("closed")

    server, port = await _serve(tornado.web.Application([(r"/h", Hang)]))
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /h HTTP/1.1\r\nHost: h\r\n\r\n")
        await reader.readuntil(b"first")
        writer.close()
        await asyncio.sleep(1.0)
        assert events == ["closed", "write failed"]
        with pytest.raises(StreamClosedError):
            await stale[0].write(b"x")  # an exchange that is over writes nowhere
        with pytest.raises(NotImplementedError):
            stale[0].detach()
        assert not server._connections
    finally:
        server.stop()


@pytest.mark.timeout(20)
async def test_close_all_connections_and_stop():
    server, port = await _serve(_app())
    readers = []
    for _ in range(3):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /status/200 HTTP/1.1\r\nHost: h\r\n\r\n")
        await reader.readuntil(b"status 200")
        readers.append((reader, writer))
    assert len(server._connections) == 3
    server.stop()
    with pytest.raises(OSError):
        await asyncio.open_connection("127.0.0.1", port)
    await asyncio.wait_for(server.close_all_connections(), 5)
    for reader, writer in readers:
        assert await reader.read() == b""
        writer.close()


def test_only_serves_connection_delegates():
    with pytest.raises(TypeError):
        GatewayHTTPServer(lambda request: None)  # type: ignore[arg-type]

