"""GatewayHTTPServer: a Tornado ``Application`` served by an HTTP/1.1 server on asyncio
protocols.

Tornado's ``HTTPServer`` reads each request through an ``IOStream`` and an
``HTTP1Connection``: read futures, a coroutine per request, the stream's read interest
dropped and re-added on the selector for every request. Measured on this project's machine,
a bare ``RequestHandler`` answering a tiny GET on one connection costs 300-390 µs of CPU per
request on ``HTTPServer`` and 155-195 µs on a protocol-based connection like this one (the
handler and the routing being the same ``tornado.web`` code). The gateway forwards every
request of the application behind it, so this is the floor of what it costs.

What stays Tornado's: the ``Application``, its routing, ``RequestHandler`` (including
``@stream_request_body`` with its flow control), ``HTTPServerRequest``, ``HTTPHeaders``, and
the request-line and header parsers. What this module does is what ``HTTP1Connection`` and
``HTTP1ServerConnection`` do for a server, with the same rules:

* request heads end at the first empty line (CRLF or bare LF), at most ``max_header_size``;
  leading empty lines are skipped; the start line and the fields are parsed by Tornado's own
  functions (or the equivalent fast path of :func:`headers.parse_header_block`);
* bodies: ``Content-Length`` (repeats must be equal, digits only), ``Transfer-Encoding:
  chunked`` (hex sizes only, no extensions, no trailers, as Tornado), never both; at most
  ``max_body_size`` (``set_max_body_size`` per request); ``Expect: 100-continue`` answered
  after the handler accepted the head; the handler's ``data_received`` awaitable is the
  back-pressure (reading pauses while it is pending);
* keep-alive by the HTTP/1.0 and 1.1 rules, ``Connection: close`` added when the connection
  will close, chunked responses without a ``Content-Length``, none for HEAD/1xx/204/304;
  writing more or less than the declared ``Content-Length`` closes the connection;
* an answer finished before its request body was read closes the connection afterwards, and
  the rest of the body never reaches the handler (here the answer says ``Connection: close``
  as soon as its head is written before the body was read);
* write futures resolve at once while the socket keeps up and only when the transport's
  buffer drains below its low-water mark otherwise (the download back-pressure);
* requests on a connection are handled one at a time (pipelined ones wait in the buffer, and
  reading pauses when that buffer or the unsent answer grows).

Differences, on purpose (``tests/test_h1server.py`` checks everything else against Tornado's
``HTTPServer`` on random request streams):

* a malformed request, an oversized head or body is answered with the gateway's JSON error
  (400, 431, 413) instead of a bare 400 or a silent close;
* a request without body framing fields is complete as soon as its head is: a streaming
  handler that answers it before its ``prepare()`` is over (a 405, the proxy's 503) keeps
  the connection, where Tornado closes it;
* a connection closed after an answer first sends the FIN and drops what the client still
  sends (up to ``_LINGER_S``), so the answer is not lost to a reset;
* ``detach()`` (WebSocket) is not supported; no TLS, no ``xheaders``;
* an idle connection, or one whose head is incomplete, is closed after ``head_timeout``,
  checked by one sweep per server.
"""
from __future__ import annotations

import asyncio
import re
import socket
import time
from typing import Any, Callable, Dict, List, Optional, Set

from tornado import httputil
from tornado.http1connection import is_transfer_encoding_chunked, parse_hex_int, parse_int
from tornado.httputil import HTTPInputError, HTTPOutputError, parse_request_start_line
from tornado.iostream import StreamClosedError
from tornado.log import app_log, gen_log

from . import errors
from .http.headers import field_lines, get_field, parse_header_block

__all__ = ["GatewayHTTPServer"]

_HEAD_END = re.compile(rb"\r?\n\r?\n")
_DEFAULT_MAX_HEADER = 65536
_DEFAULT_MAX_BODY = 100 * 1024 * 1024  # Tornado's default (its streams' max_buffer_size)
_DEFAULT_CHUNK = 65536
_MAX_CHUNK_LINE = 64
#: Unread bytes (pipelined requests, a body the handler is not taking) that pause reading.
_READ_PAUSE = 64 * 1024
_CONTENT_LENGTH_SPLIT = re.compile(r",[ \t]*")

#: How long a connection closed with request bytes still unread keeps reading (and dropping)
#: them after its last answer, so that the client sees the answer rather than a reset.
_LINGER_S = 2.0

#: Fields whose presence means the body's framing must be decided after the handler took the
#: head (the limit it sets, a 100 Continue to send, a framing error to answer).
_MAY_HAVE_BODY = frozenset(["Content-Length", "Transfer-Encoding", "Expect"])

# phases of a connection
_HEAD, _BODY, _HANDLING, _LINGER, _CLOSED = range(5)
# body framings
_FIXED, _CHUNK_SIZE, _CHUNK_DATA, _CHUNK_END, _LAST_CRLF = range(5)


class _Quiet(Exception):
    """A handler raised: logged already; the connection is closed."""


class _TooLarge(HTTPInputError):
    """A request head or body over its limit (answered 431 / 413, not 400)."""

    def __init__(self, error: errors.GatewayError) -> None:
        super().__init__(error.message)
        self.error = error


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

    __slots__ = ("_conn", "context", "start_line", "headers", "delegate", "disconnect_on_finish",
                 "_chunking", "_remaining", "write_finished", "read_finished", "max_body_size",
                 "body_timeout", "close_callback", "started")

    def __init__(self, conn: "_Connection", start_line: httputil.RequestStartLine,
                 headers: httputil.HTTPHeaders) -> None:
        self._conn = conn
        self.context = conn.context
        self.start_line = start_line
        self.headers = headers
        self.delegate: Optional[httputil.HTTPMessageDelegate] = None
        self.disconnect_on_finish = False
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
        self._chunking = (
            request.version == "HTTP/1.1"
            and request.method != "HEAD"
            and code not in (204, 304)
            and not 100 <= code < 200
            and "Content-Length" not in headers
        )
        if not self.read_finished:
            # Answered before the request's body was read: the rest of it will not be read,
            # so the connection ends with this answer (Tornado closes it too, without saying).
            self.disconnect_on_finish = True
        if request.version == "HTTP/1.1" and self.disconnect_on_finish:
            headers["Connection"] = "close"
        if request.version == "HTTP/1.0" and \
                (get_field(self.headers, "Connection") or "").lower() == "keep-alive":
            headers["Connection"] = "Keep-Alive"
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
    """One client connection: parses requests, runs one exchange at a time.

    A buffered protocol: the transport reads into the server's one receive buffer
    (``chunk_size``), from which what arrived is appended to this connection's buffer. A
    plain protocol gets a new bytes object of up to 256 KiB per read; with many connections
    uploading at once those large short-lived allocations left the gateway's RSS about
    12 MiB higher after 200 concurrent clients (measured: 82 MiB against 70)."""

    def __init__(self, server: "GatewayHTTPServer") -> None:
        self.server = server
        self.transport: Optional[asyncio.Transport] = None
        self.context: Any = None
        self.exchange: Optional[_Exchange] = None
        self.phase = _HEAD
        self._buf = bytearray()
        self._blocked = False  # a handler's awaitable is pending
        self._scheduled = False  # a _drive() is queued
        self._reading_paused = False
        self._write_paused = False
        self._write_waiters: List["asyncio.Future[None]"] = []
        self._flushed: Optional["asyncio.Future[None]"] = None
        self._framing = _FIXED
        self._remaining = 0
        self._body_total = 0
        self._body_timer: Optional[asyncio.TimerHandle] = None
        self._linger_timer: Optional[asyncio.TimerHandle] = None

    # -- asyncio.Protocol ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # a stream transport, but not necessarily an asyncio.Transport subclass: uvloop's
        # TCPTransport implements the same interface without deriving from it
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        family = sock.family if sock is not None else socket.AF_INET
        self.context = _Context(transport.get_extra_info("peername"), family)
        flushed = asyncio.get_running_loop().create_future()
        flushed.set_result(None)
        self._flushed = flushed
        # A handler's flush() waits while more than 32 KiB are unsent, until 8 KiB are left.
        # Measured: with 64/16 KiB the RSS stayed 12-18 MiB above its baseline after 200
        # concurrent clients (Tornado's HTTPServer: 8-11 MiB), with 32/8 KiB 5-10 MiB; a 1 GiB
        # download to curl took 1.2 s with 64/16 KiB, 1.4 s with 32/8, 1.8 s with 0/0.
        high = self.server.chunk_size // 2
        transport.set_write_buffer_limits(high=high, low=high // 4)
        self.server.connection_opened(self)

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.server.receive_buffer

    def buffer_updated(self, nbytes: int) -> None:
        if self.phase == _LINGER:
            return  # closing: what the client still sends is dropped
        self._buf += self.server.receive_buffer[:nbytes]
        if self._blocked or self.phase == _HANDLING:
            if len(self._buf) > _READ_PAUSE:
                self._pause_reading()
            return
        self._drive()

    def eof_received(self) -> bool:
        return False  # a half-closed client cannot read an answer: close (as Tornado)

    def connection_lost(self, exc: Optional[Exception]) -> None:
        self.phase = _CLOSED
        self.transport = None
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
        if self.phase == _HEAD and self._buf:
            self._schedule()
        self._maybe_resume_reading()

    # -- for _Exchange ----------------------------------------------------------------------

    def serving(self, exchange: _Exchange) -> bool:
        """Whether ``exchange`` may still write (the current one, on an open connection that
        is not closing after a refusal)."""
        return self.exchange is exchange and self.phase < _LINGER and self.transport is not None

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
        self.phase = _HEAD
        self.server.waiting_for_head(self)
        if self._buf:
            self._schedule()
        else:
            self._maybe_resume_reading()

    # -- the request side ---------------------------------------------------------------

    def _schedule(self) -> None:
        # Not from inside the handler's finish(): the next request starts on a fresh call.
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._scheduled_drive)

    def _scheduled_drive(self) -> None:
        self._scheduled = False
        if not self._blocked and self.phase in (_HEAD, _BODY) and not self._write_paused:
            self._drive()

    def _drive(self) -> None:
        try:
            self._drive_inner()
        except _TooLarge as e:
            gen_log.info("Refused a request from %s: %s", self.context, e)
            self._refuse(e.error)
        except HTTPInputError as e:
            gen_log.info("Malformed HTTP message from %s: %s", self.context, e)
            self._refuse(errors.malformed_request(str(e)))
        except _Quiet:
            self.abort()

    def _drive_inner(self) -> None:
        while not self._blocked:
            phase = self.phase
            if phase == _HEAD:
                if self._write_paused:  # the last answer is still being sent: wait
                    return
                if not self._read_head():
                    return
            elif phase == _BODY:
                if not self._read_body():
                    return
            else:
                return

    def _read_head(self) -> bool:
        buf = self._buf
        match = _HEAD_END.search(buf)
        limit = self.server.max_header_size
        if match is None:
            if len(buf) > limit:
                raise _TooLarge(errors.request_head_too_large(limit))
            self._maybe_resume_reading()
            return False
        if match.end() > limit:
            raise _TooLarge(errors.request_head_too_large(limit))
        text = buf[: match.end()].decode("latin1").lstrip("\r\n")
        del buf[: match.end()]
        eol = text.find("\n")
        start_line = parse_request_start_line(text[:eol].rstrip("\r"))
        headers = parse_header_block(text[eol:])
        exchange = _Exchange(self, start_line, headers)
        exchange.disconnect_on_finish = not self._can_keep_alive(start_line, headers)
        self.server.head_received(self)
        self.exchange = exchange
        self.phase = _BODY
        self._framing = -1  # decided once the handler accepted the head
        delegate = self.server.start_request(self, exchange)
        exchange.delegate = delegate
        self._call(delegate.headers_received, start_line, headers)
        if self._blocked and not _MAY_HAVE_BODY.intersection(headers):
            # Nothing to read and nothing to decide: the body (none) is complete now, while
            # the handler is still preparing. A streaming handler then goes from prepare()
            # to its method without waiting for another turn of the event loop.
            self._body_complete(exchange)
        return True

    def _can_keep_alive(self, start_line: httputil.RequestStartLine,
                        headers: httputil.HTTPHeaders) -> bool:
        if self.server.no_keep_alive:
            return False
        connection = get_field(headers, "Connection")
        if connection is not None:
            connection = connection.lower()
        if start_line.version == "HTTP/1.1":
            return connection != "close"
        if ("Content-Length" in headers or is_transfer_encoding_chunked(headers)
                or start_line.method in ("HEAD", "GET")):
            return connection == "keep-alive"
        return False

    def _start_body(self, exchange: _Exchange) -> bool:
        """After the handler took the head: decide the body's framing. False: no body."""
        headers = exchange.headers
        if get_field(headers, "Expect") == "100-continue" and not exchange.write_finished:
            assert self.transport is not None
            self.transport.write(b"HTTP/1.1 100 (Continue)\r\n\r\n")
        length: Optional[int] = None
        if "Content-Length" in headers:
            value = headers["Content-Length"]
            if "," in value:
                # duplicated by a proxy: usable only when all the values are the same
                pieces = _CONTENT_LENGTH_SPLIT.split(value)
                if any(piece != pieces[0] for piece in pieces):
                    raise HTTPInputError("Multiple unequal Content-Lengths: %r" % value)
                headers["Content-Length"] = value = pieces[0]
            try:
                length = parse_int(value)
            except ValueError:
                raise HTTPInputError(
                    "Only integer Content-Length is allowed: %s" % value) from None
            if length > exchange.max_body_size:
                raise _TooLarge(errors.request_body_too_large(length, exchange.max_body_size))
        chunked = is_transfer_encoding_chunked(headers)
        if chunked:
            self._framing = _CHUNK_SIZE
        elif length:
            self._framing = _FIXED
            self._remaining = length
        else:
            return False
        self._body_total = 0
        if exchange.body_timeout:
            self._body_timer = asyncio.get_running_loop().call_later(
                exchange.body_timeout, self._body_timed_out)
        return True

    def _read_body(self) -> bool:
        """Advance the current request's body; False when waiting for the client."""
        exchange = self.exchange
        assert exchange is not None
        if self._framing < 0:
            if not self._start_body(exchange):
                self._body_complete(exchange)
                return True
        buf = self._buf
        chunk_size = self.server.chunk_size
        if self._framing == _FIXED:
            if not buf:
                self._maybe_resume_reading()
                return False
            take = min(self._remaining, chunk_size)
            if len(buf) <= take:
                piece = bytes(buf)
                buf.clear()
            else:
                piece = bytes(buf[:take])
                del buf[:take]
            self._remaining -= len(piece)
            self._deliver(exchange, piece)
            if not self._remaining:
                self._body_complete(exchange)
            return True
        # chunked: coalesce what this buffer holds (chunk boundaries mean nothing)
        pending = bytearray()
        done = False
        while len(pending) < chunk_size:
            framing = self._framing
            if framing == _CHUNK_DATA:
                if not buf:
                    break
                take = min(self._remaining, chunk_size - len(pending))
                piece = buf[:take]
                del buf[: len(piece)]
                pending += piece
                self._remaining -= len(piece)
                if not self._remaining:
                    self._framing = _CHUNK_END
            elif framing == _CHUNK_SIZE:
                end = buf.find(b"\r\n")
                if end < 0:
                    if len(buf) > _MAX_CHUNK_LINE:
                        raise HTTPInputError("invalid chunk size")
                    break
                if end + 2 > _MAX_CHUNK_LINE:
                    raise HTTPInputError("invalid chunk size")
                line = buf[:end].decode("latin1")
                del buf[: end + 2]
                try:
                    size = parse_hex_int(line)
                except ValueError:
                    raise HTTPInputError("invalid chunk size") from None
                if size == 0:
                    self._framing = _LAST_CRLF
                    continue
                self._body_total += size
                if self._body_total > exchange.max_body_size:
                    raise _TooLarge(errors.request_body_too_large(None, exchange.max_body_size))
                self._remaining = size
                self._framing = _CHUNK_DATA
            else:  # _CHUNK_END or _LAST_CRLF: a CRLF
                if len(buf) < 2:
                    break
                if buf[:2] != b"\r\n":
                    raise HTTPInputError("improperly terminated chunk" if framing == _CHUNK_END
                                         else "improperly terminated chunked request")
                del buf[:2]
                if framing == _LAST_CRLF:
                    done = True
                    break
                self._framing = _CHUNK_SIZE
        if pending:
            self._deliver(exchange, bytes(pending))
        if done:
            self._body_complete(exchange)
            return True
        if not pending:
            self._maybe_resume_reading()
            return False
        return True

    def _deliver(self, exchange: _Exchange, piece: bytes) -> None:
        if not exchange.write_finished:  # an answered request's body goes nowhere
            assert exchange.delegate is not None
            self._call(exchange.delegate.data_received, piece)

    def _body_complete(self, exchange: _Exchange) -> None:
        self._cancel_body_timer()
        exchange.read_finished = True
        self.phase = _HANDLING
        if not exchange.write_finished:
            assert exchange.delegate is not None
            self._call(exchange.delegate.finish)
        elif exchange.disconnect_on_finish and self.transport is not None:
            self._linger()

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
        """Call a delegate method; an awaitable it returns blocks reading until done."""
        try:
            result = method(*args)
        except HTTPInputError:
            raise
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
            raise error
        app_log.error("Uncaught exception", exc_info=(type(error), error, error.__traceback__))
        raise _Quiet()

    def _unblocked(self, future: "asyncio.Future[Any]") -> None:
        self._blocked = False
        if self.phase == _CLOSED:
            future.cancelled() or future.exception()  # retrieved
            return
        try:
            self._check(future)
        except HTTPInputError as e:
            gen_log.info("Malformed HTTP message from %s: %s", self.context, e)
            self._refuse(errors.malformed_request(str(e)))
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
        if self._reading_paused and self.transport is not None and len(self._buf) <= _READ_PAUSE:
            self._reading_paused = False
            self.transport.resume_reading()

    def _refuse(self, error: errors.GatewayError) -> None:
        """Answer a request the server itself cannot take, then close."""
        exchange = self.exchange
        transport = self.transport
        if transport is None or self.phase >= _LINGER:
            return
        if exchange is not None and (exchange.started or exchange.write_finished):
            self.abort()  # an answer is under way: only closing can say something broke
            return
        if exchange is not None:
            exchange.write_finished = True  # the handler's own answer goes nowhere now
            exchange.close_callback = None
        self.phase = _HANDLING
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
        self._buf.clear()
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
    server.start(sockets)``; ``stop()`` stops accepting; ``await close_all_connections()``.
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
        # where every connection's reads land (one loop, one read at a time), then copied out
        self.receive_buffer = memoryview(bytearray(self.chunk_size))
        self._servers: List[asyncio.AbstractServer] = []
        self._connections: Set[_Connection] = set()
        self._waiting: Dict[_Connection, float] = {}  # connection -> waiting for a head since
        self._sweeper: Optional[asyncio.TimerHandle] = None
        self._all_closed: Optional["asyncio.Future[None]"] = None

    async def start(self, sockets: List[socket.socket]) -> None:
        """Accept connections on these listening sockets (from ``tornado.netutil``)."""
        loop = asyncio.get_running_loop()
        for sock in sockets:
            self._servers.append(await loop.create_server(lambda: _Connection(self), sock=sock))

    def stop(self) -> None:
        """Stop accepting connections (those open are served on)."""
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

