"""GatewayHTTPServer: a Tornado ``Application`` served over HTTP/1.1 by asyncio protocols,
requests parsed by llhttp (through ``httptools``).

Tornado's ``HTTPServer`` reads each request through an ``IOStream`` and an
``HTTP1Connection``: read futures, a coroutine per request, the stream's read interest
dropped and re-added on the selector for every request. A protocol-based connection
answering the same ``RequestHandler`` costs about half the CPU per request (measured on
this project's machine: 155-195 µs against 300-390 µs for a tiny GET); the gateway forwards
every request of the application behind it, so this is the floor of what it costs.

What stays Tornado's: the ``Application``, its routing, ``RequestHandler`` (including
``@stream_request_body`` with its flow control), ``HTTPServerRequest``, ``HTTPHeaders``.
What llhttp owns: every byte of a request — the request line, the header fields, where the
head ends, ``Content-Length`` and chunked bodies, the ``Connection`` token list and the
keep-alive verdict. What this module owns is what ``HTTP1Connection`` and
``HTTP1ServerConnection`` do for a server around the parser:

* one exchange at a time per connection: llhttp parses ahead (pipelined requests, body
  bytes that arrive while the handler is busy), what it parsed waits here, and reading
  pauses when that backlog grows;
* the handler's calls in Tornado's order: ``headers_received`` (its awaitable, the end of
  ``prepare()`` for a streaming handler, is waited for), then ``Expect: 100-continue`` is
  answered, then body pieces of at most ``chunk_size`` through ``data_received`` (each
  awaitable waited for: the upload back-pressure), then ``finish()`` only once the last of
  them is done;
* limits: ``max_header_size`` (431), ``max_body_size`` (413; ``set_max_body_size`` per
  request), ``body_timeout`` for the whole body, ``head_timeout`` for an idle connection or
  an incomplete head (one sweep per server);
* the answer: a body framed by :func:`.framing.response_framing` (chunked for HTTP/1.1
  without a ``Content-Length``, delimited by the connection's end for HTTP/1.0), the
  connection kept by :func:`.framing.keeps_alive_after`, ``Connection: close`` added to an
  HTTP/1.1 answer when the connection will close, ``Connection: Keep-Alive`` to an HTTP/1.0
  one that keeps it; writing more or less than the declared ``Content-Length`` closes the
  connection;
* an answer written before its request body was read closes the connection afterwards (it
  says ``Connection: close`` as soon as its head is written) and the rest of the body never
  reaches the handler;
* write futures resolve at once while the socket keeps up and only when the transport's
  buffer drains below its low-water mark otherwise (the download back-pressure).

Differences from Tornado's ``HTTPServer``, on purpose (``tests/http/test_http_server.py``
checks everything else against it on random request streams;
``tests/http/test_tornado_server_suites.py`` runs Tornado's own server and web test suites
against this class, each test that fails listed with its reason):

* llhttp is stricter than Tornado: bare LF line ends, bare CRs, repeated or comma-listed
  ``Content-Length`` values (even equal), methods llhttp does not know (a 400, not the
  application's 405), lower-case methods, ``HTTP/1.2``-``HTTP/1.9`` and non-ASCII bytes in
  the target are refused, as is any ``Transfer-Encoding`` but a single ``chunked``; chunk
  extensions and trailer fields, which Tornado refuses, are accepted (the trailers are
  dropped);
* every refusal is the gateway's JSON error (400, 431, 413) with ``Connection: close``
  instead of a bare 400 or a silent close;
* keep-alive is the parser's verdict on the ``Connection`` token list (``close, foo``
  closes; an HTTP/1.0 request asking for keep-alive keeps it whatever its method), except
  that an HTTP/1.0 request with a ``Transfer-Encoding`` always closes (RFC 9112 6.1), and an
  answer without a ``Content-Length`` to an HTTP/1.0 client is ended by closing;
* an Upgrade or CONNECT request is answered as an ordinary request and the connection
  closes after it: ``detach()`` (WebSocket) is not supported;
* a request without body framing fields is complete as soon as its head is: a streaming
  handler that answers it before its ``prepare()`` is over (a 405, the proxy's 503) keeps
  the connection, where Tornado closes it;
* a connection closed after an answer first sends the FIN and drops what the client still
  sends (up to ``_LINGER_S``), so the answer is not lost to a reset;
* no TLS, no ``xheaders``/``protocol``, no ``decompress_request``, no plain-callable
  ``request_callback``; llhttp also takes ``RTSP/1.0`` and ``ICE/1.0`` for the protocol name
  of a GET/POST/OPTIONS/SOURCE request line and ``httptools`` does not say which it saw, so
  such a request is served as HTTP/1.0.
"""
from __future__ import annotations

import asyncio
import re
import collections
import socket
import time
from typing import Any, Callable, Deque, Dict, List, Optional, Set

import httptools
from tornado import httputil
from tornado.http1connection import parse_int
from tornado.httputil import HTTPInputError, HTTPOutputError, RequestStartLine
from tornado.iostream import StreamClosedError
from tornado.log import app_log, gen_log

from .. import errors
from . import framing
from .headers import field_lines, get_field, headers_from_fields

__all__ = ["GatewayHTTPServer"]

_DEFAULT_MAX_HEADER = 65536
_DEFAULT_MAX_BODY = 100 * 1024 * 1024  # Tornado's default (its streams' max_buffer_size)
_DEFAULT_CHUNK = 65536
#: Parsed but undelivered body bytes, or parsed requests waiting for their turn, beyond
#: which reading pauses.
_READ_PAUSE = 64 * 1024
_QUEUE_PAUSE = 32
#: A handler's flush() waits while more than this is unsent, until a quarter is left.
#: Measured: with 64/16 KiB the RSS stayed 12-18 MiB above its baseline after 200 concurrent
#: clients (Tornado's HTTPServer: 8-11 MiB), with 32/8 KiB 5-10 MiB; a 1 GiB download to
#: curl took 1.2 s with 64/16 KiB, 1.4 s with 32/8, 1.8 s with 0/0.
_WRITE_HIGH = 32 * 1024

#: How long a connection closed with request bytes still unread keeps reading (and dropping)
#: them after its last answer, so that the client sees the answer rather than a reset.
_LINGER_S = 2.0

#: Fields whose presence means the body's framing must be looked at after the handler took
#: the head (the limit it sets, a 100 Continue to send).
_MAY_HAVE_BODY = frozenset(["Content-Length", "Transfer-Encoding", "Expect"])

#: The versions served, as Tornado spells them (llhttp also reads 0.9 and 2.0 heads).
_VERSIONS = {"1.1": "HTTP/1.1", "1.0": "HTTP/1.0"}

# phases of a connection
_OPEN, _LINGER, _CLOSED = range(3)
# stages of an exchange
_QUEUED, _PREPARING, _BODY, _HANDLING = range(4)

_methods: Dict[bytes, str] = {}
_names: Dict[bytes, str] = {}


def _method(raw: bytes) -> str:
    method = _methods.get(raw)
    if method is None:
        method = _methods[raw] = raw.decode("ascii")  # llhttp's fixed list: bounded
    return method


def _field_name(raw: bytes) -> str:
    """``Content-Type`` for ``content-type``, as HTTPHeaders normalizes names (cached)."""
    name = _names.get(raw)
    if name is None:
        name = "-".join([w.capitalize() for w in raw.decode("latin1").split("-")])
        if len(_names) < 1000:
            _names[raw] = name
    return name


class _Quiet(Exception):
    """A handler raised: logged already; the connection is closed."""


class _Refused(Exception):
    """A request the server answers itself (400, 413, 431), then closes."""

    def __init__(self, error: errors.GatewayError, detail: Optional[str] = None) -> None:
        super().__init__(error.message)
        self.error = error
        self.detail = detail or error.message  # for the log


# a request line (after empty lines) whose method is a token (RFC 9110 5.6.2): anything else
# llhttp refuses is a malformed request (400)
_REQUEST_LINE_START = re.compile(
    rb"(?:\r?\n)*([!#$%&'*+\-.^_`|~0-9A-Za-z]{1,32}) [\x21-\x7e]+ HTTP/[0-9]\.[0-9]\r\n")


class _NoCallbacks:
    """Parser callbacks of a probe parser: none."""


def _malformed(detail: str) -> _Refused:
    return _Refused(errors.malformed_request(detail), detail)


class _StopParsing(Exception):
    """Raised in a parser callback: what follows a request that closes the connection is
    not read."""


class _Context:
    """``request.connection.context``: what ``HTTPServerRequest`` reads (as Tornado's)."""

    __slots__ = ("address", "remote_ip", "protocol")

    def __init__(self, address: Any, family: int) -> None:
        self.address = address
        # as tornado.httpserver._HTTPRequestContext: an IP for TCP peers, else a placeholder
        if family in (socket.AF_INET, socket.AF_INET6) and address:
            self.remote_ip = address[0]
        else:
            self.remote_ip = "0.0.0.0"
        self.protocol = "http"

    def __str__(self) -> str:
        return self.remote_ip


def _closed_future() -> "asyncio.Future[None]":
    future = asyncio.get_running_loop().create_future()
    future.set_exception(StreamClosedError())
    future.exception()  # retrieved: nobody has to look at it
    return future


class _Exchange(httputil.HTTPConnection):
    """One request and its answer: the ``HTTPConnection`` a handler writes to. A handler
    that holds on to it after its answer finished writes nowhere (StreamClosedError)."""

    __slots__ = ("_conn", "context", "start_line", "headers", "keep_alive", "delegate",
                 "disconnect_on_finish", "stage", "pieces", "complete", "received",
                 "_chunking", "_remaining", "write_finished", "read_finished",
                 "max_body_size", "body_timeout", "close_callback", "started")

    def __init__(self, conn: "_Connection", start_line: RequestStartLine,
                 headers: httputil.HTTPHeaders, keep_alive: bool) -> None:
        self._conn = conn
        self.context = conn.context
        self.start_line = start_line
        self.headers = headers
        self.keep_alive = keep_alive  # the request's verdict (parser, RFC 9112 6.1, server)
        self.delegate: Optional[httputil.HTTPMessageDelegate] = None
        self.disconnect_on_finish = not keep_alive
        self.stage = _QUEUED
        self.pieces: Optional[Deque[bytes]] = None  # body bytes parsed, not yet delivered
        self.complete = False  # the parser saw the end of the message
        self.received = 0  # body bytes delivered
        self._chunking = False
        self._remaining: Optional[int] = None
        self.write_finished = False
        self.read_finished = False
        server = conn.server
        self.max_body_size = server.max_body_size
        self.body_timeout = server.body_timeout
        self.close_callback: Optional[Callable[[], None]] = None
        self.started = False  # response head written

    # -- HTTPConnection ----------------------------------------------------------------

    def write_headers(self, start_line: Any, headers: httputil.HTTPHeaders,
                      chunk: Optional[bytes] = None) -> "asyncio.Future[None]":
        conn = self._conn
        if not conn.serving(self):
            return _closed_future()
        request = self.start_line
        code = start_line.code
        self.started = True
        how = framing.response_framing(request.method, request.version, code, headers)
        self._chunking = how is framing.Framing.CHUNKED
        if not self.read_finished:
            # Answered before the request's body was read: the rest of it will not be read,
            # so the connection ends with this answer (Tornado closes it too, without saying).
            self.disconnect_on_finish = True
        if not framing.keeps_alive_after(not self.disconnect_on_finish, how, headers):
            self.disconnect_on_finish = True
        if request.version == "HTTP/1.1":
            if self.disconnect_on_finish:
                headers["Connection"] = "close"
        elif not self.disconnect_on_finish:
            headers["Connection"] = "Keep-Alive"  # an HTTP/1.0 client that asked for it
        if self._chunking:
            headers["Transfer-Encoding"] = "chunked"
        if request.method == "HEAD" or code == 304:
            self._remaining = 0
        elif "Content-Length" in headers:
            self._remaining = parse_int(headers["Content-Length"])
        else:
            self._remaining = None
        lines = ["HTTP/1.1 %d %s" % (code, start_line.reason)]
        lines += field_lines(headers)
        head = "\r\n".join(lines)
        # each line joined by exactly one CRLF: no CR or LF inside a line
        if head.count("\n") != len(lines) - 1 or head.count("\r") != len(lines) - 1:
            for line in lines:
                if "\r" in line or "\n" in line:
                    raise ValueError("Illegal characters (CR or LF) in header: %r" % line)
        data = head.encode("latin1") + b"\r\n\r\n"
        if chunk:
            data += self._format_chunk(chunk)
        conn.transport.write(data)
        return conn.flushed()

    def _format_chunk(self, chunk: bytes) -> bytes:
        if self._remaining is not None:
            self._remaining -= len(chunk)
            if self._remaining < 0:
                self._conn.abort()  # stop further framing errors
                raise HTTPOutputError("Tried to write more data than Content-Length")
        if self._chunking and chunk:
            # an empty chunk would mean the end of the stream
            return b"%x\r\n%s\r\n" % (len(chunk), chunk)
        return chunk

    def write(self, chunk: bytes) -> "asyncio.Future[None]":
        conn = self._conn
        if not conn.serving(self):
            return _closed_future()
        data = self._format_chunk(chunk)
        if data:
            conn.transport.write(data)
        return conn.flushed()

    def finish(self) -> None:
        conn = self._conn
        live = conn.serving(self)
        if self._remaining and live:
            conn.abort()
            raise HTTPOutputError("Tried to write %d bytes less than Content-Length"
                                  % self._remaining)
        if self._chunking and live:
            conn.transport.write(b"0\r\n\r\n")
        self.write_finished = True
        self.close_callback = None
        if not self.read_finished:
            # the rest of the body is never read: closing is the only way past it
            self.disconnect_on_finish = True
        else:
            # Read and written: the exchange is over. The delegate (Tornado's routing
            # delegate, which refers back to this exchange) is let go, so that the request,
            # its handler and everything they hold are freed by reference counting now, not
            # left as a cycle for the garbage collector (~45 objects per request).
            self.delegate = None
        if live:
            conn.exchange_done(self)

    def set_close_callback(self, callback: Optional[Callable[[], None]]) -> None:
        self.close_callback = callback

    def set_max_body_size(self, max_body_size: int) -> None:
        self.max_body_size = max_body_size

    def set_body_timeout(self, timeout: Optional[float]) -> None:
        self.body_timeout = timeout

    def close(self) -> None:
        """Close the client connection now (what was not sent yet is dropped)."""
        self.close_callback = None
        if self._conn.exchange is self:
            self._conn.abort()

    def detach(self) -> Any:
        raise NotImplementedError(
            "GatewayHTTPServer does not hand its connections over (no WebSocket); serve such "
            "routes with tornado.httpserver.HTTPServer")


class _Connection(asyncio.BufferedProtocol):
    """One client connection: feeds what arrives to llhttp, runs one exchange at a time.

    llhttp's callbacks only record (the URL, the raw fields, body pieces, the end of a
    message) into exchanges queued here; the handler is called from ``_drive()`` once the
    parser returned. A buffered protocol: the transport reads into the server's one receive
    buffer, which is handed to the parser as it is (the callbacks copy what they keep). A
    plain protocol gets a new bytes object of up to 256 KiB per read; with many connections
    uploading at once those large short-lived allocations left the gateway's RSS about
    12 MiB higher after 200 concurrent clients (measured: 82 MiB against 70)."""

    def __init__(self, server: "GatewayHTTPServer") -> None:
        self.server = server
        self.transport: Any = None
        self.context: Any = None
        self.exchange: Optional[_Exchange] = None  # the one the handler is serving
        self.phase = _OPEN
        self._parser = httptools.HttpRequestParser(self)
        self._queue: Deque[_Exchange] = collections.deque()  # parsed, not yet started
        self._parsing: Optional[_Exchange] = None  # head parsed, body still coming
        self._refusal: Optional[errors.GatewayError] = None  # after the queue: then close
        self._stopped = False  # nothing more is parsed
        self._last_closes = False  # the last request parsed ends the connection
        self._held = 0  # body bytes parsed and not yet delivered
        # the head being parsed
        self._in_head = False
        self._url = b""
        self._fields: List[Any] = []
        self._read_size = 0  # bytes of the read being parsed
        self._read_at_boundary = True  # the read being parsed began between two requests
        self._begun_in_read = 0  # requests llhttp began in the read being parsed
        self._head_span = 0  # bytes of the reads the head spans: at least its size
        self._head_full = 0  # bytes of the reads wholly inside the head: at most its size
        self._blocked = False  # a handler's awaitable is pending
        self._scheduled = False  # a _drive() is queued
        self._reading_paused = False
        self._write_paused = False
        self._write_waiters: List["asyncio.Future[None]"] = []
        self._flushed: Optional["asyncio.Future[None]"] = None
        self._body_timer: Optional[asyncio.TimerHandle] = None
        self._linger_timer: Optional[asyncio.TimerHandle] = None

    # -- asyncio.Protocol ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # a stream transport, but not necessarily an asyncio.Transport subclass: uvloop's
        # TCPTransport implements the same interface without deriving from it
        self.transport = transport
        sock = transport.get_extra_info("socket")
        family = sock.family if sock is not None else socket.AF_INET
        self.context = _Context(transport.get_extra_info("peername"), family)
        flushed = asyncio.get_running_loop().create_future()
        flushed.set_result(None)
        self._flushed = flushed
        transport.set_write_buffer_limits(high=_WRITE_HIGH, low=_WRITE_HIGH // 4)
        self.server.connection_opened(self)

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.server.receive_buffer

    def buffer_updated(self, nbytes: int) -> None:
        if self._stopped:
            return  # refused, closing, or past a request that ends the connection: dropped
        if self._in_head:
            self._head_span += nbytes
            self._head_full += nbytes
        self._read_size = nbytes
        self._read_at_boundary = not self._in_head and self._parsing is None
        self._begun_in_read = 0
        try:
            self._parser.feed_data(self.server.receive_buffer[:nbytes])
        except httptools.HttpParserUpgrade:
            self._upgraded()
        except httptools.HttpParserError as e:
            self._parse_failed(e)
        else:
            if self._in_head and self._head_full > self.server.max_header_size:
                self._parse_failed(None, _Refused(errors.request_head_too_large(
                    self.server.max_header_size)))
        if self._held > _READ_PAUSE or len(self._queue) > _QUEUE_PAUSE:
            self._pause_reading()
        if not self._blocked:
            self._drive()

    def eof_received(self) -> bool:
        return False  # a half-closed client cannot read an answer: close (as Tornado)

    def connection_lost(self, exc: Optional[Exception]) -> None:
        self.phase = _CLOSED
        self._stopped = True
        self.transport = None
        self._queue.clear()
        self._cancel_body_timer()
        if self._linger_timer is not None:
            self._linger_timer.cancel()
            self._linger_timer = None
        self.server.connection_closed(self)
        waiters, self._write_waiters = self._write_waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_exception(StreamClosedError())
                waiter.exception()
        exchange = self.exchange
        if exchange is None:
            return
        if not exchange.read_finished and exchange.delegate is not None:
            exchange.read_finished = True
            self._call_quietly(exchange.delegate.on_connection_close)
        elif not exchange.write_finished and exchange.close_callback is not None:
            callback, exchange.close_callback = exchange.close_callback, None
            self._call_quietly(callback)

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        waiters, self._write_waiters = self._write_waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)
        if self.exchange is None and (self._queue or self._refusal is not None):
            self._schedule()

    # -- llhttp's callbacks: they only record -------------------------------------------

    def on_message_begin(self) -> None:
        if self._last_closes:
            raise _StopParsing()
        self._begun_in_read += 1
        self._in_head = True
        self._url = b""
        self._fields = []
        self._head_span = self._read_size
        self._head_full = 0

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._in_head:
            self._fields.append((name, value))
        # else a trailer field: dropped

    def on_headers_complete(self) -> None:
        self._in_head = False
        parser = self._parser
        server = self.server
        version = _VERSIONS.get(parser.get_http_version())
        if version is None:
            raise _malformed("Malformed HTTP request line: HTTP/%s is not served"
                             % parser.get_http_version())
        method = _method(parser.get_method())
        url = self._url
        fields = self._fields
        if self._head_span > server.max_header_size:
            # the reads this head spans are larger than the limit: measure the head itself
            size = len(method) + len(url) + 14 + sum(len(n) + len(v) + 4 for n, v in fields)
            if size > server.max_header_size:
                raise _Refused(errors.request_head_too_large(server.max_header_size))
        # llhttp checked the names (tokens) and the values (no controls but HTAB) and took
        # the leading whitespace off the values; the trailing whitespace is left.
        headers = headers_from_fields([
            (_field_name(name), value.rstrip(b" \t").decode("latin1")) for name, value in fields])
        if get_field(headers, "Transfer-Encoding") is not None:
            # llhttp refused every Content-Length case already; it reads "gzip, chunked" as
            # chunked, and the gateway decodes no other coding: refused here
            refused = framing.check_framing(headers)
            if refused is not None:
                raise _Refused(refused)
        keep_alive = (parser.should_keep_alive() and not server.no_keep_alive
                      and not parser.should_upgrade()
                      and not framing.request_must_close(version, headers))
        exchange = _Exchange(self, RequestStartLine(method, url.decode("latin1"), version),
                             headers, keep_alive)
        self._parsing = exchange
        self._queue.append(exchange)
        if not keep_alive:
            self._last_closes = True
        server.head_received(self)

    def on_body(self, body: bytes) -> None:
        exchange = self._parsing
        assert exchange is not None
        if exchange.pieces is None:
            exchange.pieces = collections.deque()
        exchange.pieces.append(body)
        self._held += len(body)

    def on_message_complete(self) -> None:
        exchange = self._parsing
        assert exchange is not None
        exchange.complete = True
        self._parsing = None

    # -- what the parser could not take ---------------------------------------------------

    def _upgraded(self) -> None:
        """An Upgrade or CONNECT request: parsed up to the end of its head and complete for
        llhttp, which reads nothing after it. It is answered as an ordinary request, and the
        connection closes after the answer."""
        self._stop_parsing()

    def _parse_failed(self, exc: Optional[Exception],
                      refused: Optional[_Refused] = None) -> None:
        self._stop_parsing()
        cause = exc.__context__ if isinstance(exc, httptools.HttpParserCallbackError) else None
        if isinstance(cause, _StopParsing):
            return
        if refused is None:
            if isinstance(cause, _Refused):
                refused = cause
            elif cause is not None:
                app_log.error("Uncaught exception parsing a request", exc_info=(
                    type(cause), cause, cause.__traceback__))
                self.abort()
                return
            elif self._last_closes and self._parsing is None and not self._in_head:
                return  # bytes after a request that ends the connection: not read (llhttp)
            elif isinstance(exc, httptools.HttpParserInvalidMethodError) and \
                    self._unknown_method() is not None:
                method = self._unknown_method()
                refused = _Refused(errors.method_not_supported(method),
                                   "Request method %r is not one llhttp knows" % method)
            elif isinstance(exc, (httptools.HttpParserInvalidMethodError,
                                  httptools.HttpParserInvalidURLError)):
                refused = _malformed("Malformed HTTP request line: %s" % exc)
            else:
                refused = _malformed(str(exc))
        self._log_refusal(refused)
        error = refused.error
        exchange = self._parsing
        if exchange is not None:
            self._parsing = None
            if exchange is self.exchange:
                self._refuse(error)  # its body is broken: now
                return
            self._queue.remove(exchange)
        self._refusal = error  # once the requests parsed before it are answered
        if self.exchange is None and not self._queue:
            self._refuse(error)

    def _unknown_method(self) -> Optional[str]:
        """The method token of the request line llhttp refused as an unknown method, when it
        is a well-formed request line (then RFC 9110 9.1 says 501, not 400); else None.
        Known only when that request is the first one this read began, at the read's start
        (llhttp does not say where in a read it stopped); otherwise the answer stays 400."""
        if not self._read_at_boundary or self._begun_in_read != 1:
            return None
        data = bytes(self.server.receive_buffer[:self._read_size])
        match = _REQUEST_LINE_START.match(data)
        if match is None:
            return None
        probe = httptools.HttpRequestParser(_NoCallbacks())
        try:
            probe.feed_data(match.group(1) + b" / HTTP/1.1\r\n\r\n")
        except httptools.HttpParserInvalidMethodError:
            return match.group(1).decode("ascii")
        except httptools.HttpParserError:
            pass
        return None

    def _stop_parsing(self) -> None:
        self._stopped = True
        self._pause_reading()

    # -- for _Exchange ----------------------------------------------------------------------

    def serving(self, exchange: _Exchange) -> bool:
        """Whether ``exchange`` may still write (the current one, on an open connection that
        is not closing after a refusal)."""
        return self.exchange is exchange and self.phase == _OPEN and self.transport is not None

    def flushed(self) -> "asyncio.Future[None]":
        """Resolved now while the transport keeps up; else when its buffer drains."""
        if not self._write_paused:
            assert self._flushed is not None
            return self._flushed
        waiter = asyncio.get_running_loop().create_future()
        self._write_waiters.append(waiter)
        return waiter

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def exchange_done(self, exchange: _Exchange) -> None:
        """The answer is complete: close, or go on with the next request."""
        if exchange.disconnect_on_finish:
            self._linger()  # the client may still be sending: the body, the next request
            return
        self.exchange = None
        if self._queue or self._refusal is not None:
            self._schedule()
        else:
            self.server.waiting_for_head(self)
            self._maybe_resume_reading()

    # -- driving the handler ----------------------------------------------------------------

    def _schedule(self) -> None:
        # Not from inside the handler's finish(): the next request starts on a fresh call.
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._scheduled_drive)

    def _scheduled_drive(self) -> None:
        self._scheduled = False
        if not self._blocked and self.phase == _OPEN:
            self._drive()

    def _drive(self) -> None:
        try:
            self._advance()
        except _Refused as e:
            self._log_refusal(e)
            self._refuse(e.error)
        except _Quiet:
            self.abort()

    def _log_refusal(self, refused: _Refused) -> None:
        if refused.error.status == 400:  # in Tornado's words
            gen_log.info("Malformed HTTP message from %s: %s", self.context, refused.detail)
        else:
            gen_log.info("Refused a request from %s: %s", self.context, refused.detail)

    def _advance(self) -> None:
        while not self._blocked and self.phase == _OPEN:
            exchange = self.exchange
            if exchange is None:
                if not self._queue:
                    if self._refusal is not None:
                        self._refuse(self._refusal)
                    else:
                        self._maybe_resume_reading()
                    return
                if self._write_paused:  # the last answer is still being sent: wait
                    return
                self._start(self._queue.popleft())
            elif exchange.stage == _PREPARING:
                self._begin_body(exchange)
            elif exchange.stage == _BODY:
                if exchange.pieces:
                    self._deliver(exchange)
                elif exchange.complete:
                    self._body_complete(exchange)
                else:
                    self._maybe_resume_reading()
                    return
            else:
                return  # _HANDLING: the answer is the handler's to write

    def _start(self, exchange: _Exchange) -> None:
        self.exchange = exchange
        exchange.stage = _PREPARING
        delegate = self.server.start_request(self, exchange)
        exchange.delegate = delegate
        self._call(delegate.headers_received, exchange.start_line, exchange.headers)
        if self._blocked and exchange.complete and not exchange.pieces \
                and _MAY_HAVE_BODY.isdisjoint(exchange.headers):
            # Nothing to read and nothing to decide: the body (none) is complete now, while
            # the handler is still preparing. A streaming handler then goes from prepare()
            # to its method without waiting for another turn of the event loop.
            self._body_complete(exchange)

    def _begin_body(self, exchange: _Exchange) -> None:
        """The handler took the head: answer ``Expect: 100-continue``, check the declared
        length against the handler's limit, start the body's timer."""
        exchange.stage = _BODY
        headers = exchange.headers
        if _MAY_HAVE_BODY.isdisjoint(headers):
            return
        if get_field(headers, "Expect") == "100-continue" and not exchange.write_finished:
            self.transport.write(b"HTTP/1.1 100 (Continue)\r\n\r\n")
        length = framing.declared_length(headers)
        if length is not None and length > exchange.max_body_size:
            raise _Refused(errors.request_body_too_large(length, exchange.max_body_size))
        if not exchange.complete and exchange.body_timeout:
            self._body_timer = asyncio.get_running_loop().call_later(
                exchange.body_timeout, self._body_timed_out)

    def _deliver(self, exchange: _Exchange) -> None:
        """Hand the handler the next piece of body: what was parsed, at most chunk_size."""
        pieces = exchange.pieces
        assert pieces
        limit = self.server.chunk_size
        piece = pieces.popleft()
        if len(piece) > limit:
            pieces.appendleft(piece[limit:])
            piece = piece[:limit]
        elif pieces and len(piece) + len(pieces[0]) <= limit:
            # chunk boundaries mean nothing: coalesce what is here, as Tornado does
            parts = [piece]
            size = len(piece)
            while pieces and size + len(pieces[0]) <= limit:
                part = pieces.popleft()
                parts.append(part)
                size += len(part)
            piece = b"".join(parts)
        self._held -= len(piece)
        exchange.received += len(piece)
        if exchange.received > exchange.max_body_size:
            raise _Refused(errors.request_body_too_large(None, exchange.max_body_size))
        if not exchange.write_finished:  # an answered request's body goes nowhere
            assert exchange.delegate is not None
            self._call(exchange.delegate.data_received, piece)

    def _body_complete(self, exchange: _Exchange) -> None:
        self._cancel_body_timer()
        exchange.read_finished = True
        exchange.stage = _HANDLING
        if not exchange.write_finished:
            assert exchange.delegate is not None
            self._call(exchange.delegate.finish)
        if exchange.write_finished:
            exchange.delegate = None  # over: no cycle left for the GC (see _Exchange.finish)

    def _body_timed_out(self) -> None:
        self._body_timer = None
        gen_log.info("Timeout reading body from %s", self.context)
        self.abort()

    def _cancel_body_timer(self) -> None:
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None

    # -- calling the handler --------------------------------------------------------------

    def _call(self, method: Callable[..., Any], *args: Any) -> None:
        """Call a delegate method; an awaitable it returns blocks the exchange until done."""
        try:
            result = method(*args)
        except HTTPInputError as e:
            raise _malformed(str(e)) from None
        except Exception:
            app_log.error("Uncaught exception", exc_info=True)
            raise _Quiet() from None
        if result is None:
            return
        if asyncio.isfuture(result):
            if result.done():
                self._check(result)
                return
            future = result
        else:
            future = asyncio.ensure_future(result)
        self._blocked = True
        future.add_done_callback(self._unblocked)

    def _check(self, future: "asyncio.Future[Any]") -> None:
        if future.cancelled():
            return
        error = future.exception()
        if error is None:
            return
        if isinstance(error, HTTPInputError):
            raise _malformed(str(error))
        app_log.error("Uncaught exception", exc_info=(type(error), error, error.__traceback__))
        raise _Quiet()

    def _unblocked(self, future: "asyncio.Future[Any]") -> None:
        self._blocked = False
        if self.phase != _OPEN:
            future.cancelled() or future.exception()  # retrieved
            return
        try:
            self._check(future)
        except _Refused as e:
            self._log_refusal(e)
            self._refuse(e.error)
            return
        except _Quiet:
            self.abort()
            return
        self._drive()

    def _call_quietly(self, callback: Callable[[], Any]) -> None:
        try:
            callback()
        except Exception:
            app_log.error("Uncaught exception", exc_info=True)

    # -- flow control and refusals --------------------------------------------------------

    def _pause_reading(self) -> None:
        if not self._reading_paused and self.transport is not None:
            self._reading_paused = True
            self.transport.pause_reading()

    def _maybe_resume_reading(self) -> None:
        if self._reading_paused and not self._stopped and self.transport is not None \
                and self._held <= _READ_PAUSE and len(self._queue) <= _QUEUE_PAUSE:
            self._reading_paused = False
            self.transport.resume_reading()

    def _refuse(self, error: errors.GatewayError) -> None:
        """Answer a request the server itself cannot take, then close."""
        exchange = self.exchange
        transport = self.transport
        if transport is None or self.phase != _OPEN:
            return
        if exchange is not None and (exchange.started or exchange.write_finished):
            self.abort()  # an answer is under way: only closing can say something broke
            return
        if exchange is not None:
            exchange.write_finished = True  # the handler's own answer goes nowhere now
            exchange.close_callback = None
        self._blocked = False
        body = error.body()
        head = ("HTTP/1.1 %d %s\r\nContent-Type: application/json; charset=utf-8\r\n"
                "Cache-Control: no-store\r\nContent-Length: %d\r\nConnection: close\r\n\r\n"
                % (error.status, httputil.responses.get(error.status, "Error"), len(body)))
        transport.write(head.encode("latin1") + body)
        self._linger()

    def _linger(self) -> None:
        """Close after the answer, without a reset: send what is buffered and the FIN, then
        read and drop what the client still sends until it closes too (at most
        ``_LINGER_S``). Closing a socket with unread bytes, or receiving bytes after closing
        it, makes the kernel send a reset, which can destroy the answer before the client
        reads it (a 413 to a big upload would show as "connection reset")."""
        transport = self.transport
        assert transport is not None
        self.phase = _LINGER
        self._stopped = True
        self._queue.clear()
        self._cancel_body_timer()
        if not transport.can_write_eof():
            transport.close()
            return
        transport.write_eof()
        self._reading_paused = False
        transport.resume_reading()
        self._linger_timer = asyncio.get_running_loop().call_later(_LINGER_S, self.abort)


class GatewayHTTPServer(httputil.HTTPServerConnectionDelegate):
    """Serves a Tornado ``Application`` (any ``HTTPServerConnectionDelegate``) over HTTP/1.1.

    ``max_body_size`` (default 100 MiB), ``max_header_size`` (64 KiB), ``body_timeout``
    (seconds, whole body; a handler may change both per request), ``head_timeout`` (seconds
    an idle connection or an incomplete head may wait), ``no_keep_alive``, ``chunk_size``
    (largest body piece handed to a handler, 64 KiB). Start it with ``await
    server.start(sockets)`` (or ``add_sockets``, as Tornado's); ``stop()`` stops accepting;
    ``await close_all_connections()``.
    """

    def __init__(self, request_callback: httputil.HTTPServerConnectionDelegate, *,
                 max_body_size: Optional[int] = None, max_header_size: Optional[int] = None,
                 body_timeout: Optional[float] = None, head_timeout: Optional[float] = None,
                 no_keep_alive: bool = False, chunk_size: Optional[int] = None) -> None:
        if not isinstance(request_callback, httputil.HTTPServerConnectionDelegate):
            raise TypeError("GatewayHTTPServer serves an HTTPServerConnectionDelegate such as "
                            "tornado.web.Application, not %r" % (request_callback,))
        self.request_callback = request_callback
        self.max_body_size = max_body_size if max_body_size is not None else _DEFAULT_MAX_BODY
        self.max_header_size = max_header_size or _DEFAULT_MAX_HEADER
        self.body_timeout = body_timeout
        self.head_timeout = head_timeout
        self.no_keep_alive = no_keep_alive
        self.chunk_size = chunk_size or _DEFAULT_CHUNK
        # where every connection's reads land (one loop, one read at a time), then parsed
        self.receive_buffer = memoryview(bytearray(max(self.chunk_size, _DEFAULT_CHUNK)))
        self._servers: List[asyncio.AbstractServer] = []
        self._starting: List["asyncio.Task[None]"] = []
        self._connections: Set[_Connection] = set()
        self._waiting: Dict[_Connection, float] = {}  # connection -> waiting for a head since
        self._sweeper: Optional[asyncio.TimerHandle] = None
        self._all_closed: Optional["asyncio.Future[None]"] = None

    async def start(self, sockets: List[socket.socket]) -> None:
        """Accept connections on these listening sockets (from ``tornado.netutil``)."""
        loop = asyncio.get_running_loop()
        for sock in sockets:
            self._servers.append(await loop.create_server(lambda: _Connection(self), sock=sock))

    def add_sockets(self, sockets: List[socket.socket]) -> None:
        """``start()`` for callers that cannot await, as ``TCPServer.add_sockets``: run to
        completion when the event loop is not running, else started on it (connections
        wait in the listening socket's backlog until then)."""
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            asyncio.get_event_loop().run_until_complete(self.start(sockets))
            return
        task = asyncio.ensure_future(self.start(sockets))
        self._starting.append(task)
        task.add_done_callback(self._started)

    def _started(self, task: "asyncio.Task[None]") -> None:
        self._starting.remove(task)
        if not task.cancelled() and task.exception() is not None:
            app_log.error("GatewayHTTPServer could not start", exc_info=task.exception())

    def stop(self) -> None:
        """Stop accepting connections (those open are served on)."""
        for task in self._starting:
            task.cancel()
        for server in self._servers:
            server.close()
        self._servers = []
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None

    async def close_all_connections(self) -> None:
        """Close every open connection (at once) and wait until they are gone."""
        if not self._connections:
            return
        self._all_closed = asyncio.get_running_loop().create_future()
        for conn in list(self._connections):
            conn.abort()
        await self._all_closed

    def start_request(self, server_conn: object,
                      request_conn: httputil.HTTPConnection) -> httputil.HTTPMessageDelegate:
        return self.request_callback.start_request(server_conn, request_conn)

    # -- connection bookkeeping --------------------------------------------------------

    def connection_opened(self, conn: _Connection) -> None:
        self._connections.add(conn)
        self.waiting_for_head(conn)

    def connection_closed(self, conn: _Connection) -> None:
        self._connections.discard(conn)
        self._waiting.pop(conn, None)
        self.request_callback.on_close(conn)
        if not self._connections and self._all_closed is not None \
                and not self._all_closed.done():
            self._all_closed.set_result(None)

    def waiting_for_head(self, conn: _Connection) -> None:
        if not self.head_timeout:
            return
        self._waiting[conn] = time.monotonic()
        if self._sweeper is None:
            self._sweeper = asyncio.get_running_loop().call_later(
                self.head_timeout / 4, self._sweep)

    def head_received(self, conn: _Connection) -> None:
        if self._waiting:
            self._waiting.pop(conn, None)

    def _sweep(self) -> None:
        """Close connections that waited for a request head longer than ``head_timeout``:
        between 1 and 1.25 times the timeout after they started waiting."""
        self._sweeper = None
        assert self.head_timeout
        now = time.monotonic()
        for conn, since in list(self._waiting.items()):
            if now - since >= self.head_timeout:
                del self._waiting[conn]
                conn.abort()
        if self._waiting:
            self._sweeper = asyncio.get_running_loop().call_later(
                self.head_timeout / 4, self._sweep)
