"""Upstream HTTP client with a keep-alive connection pool.

Tornado's ``SimpleAsyncHTTPClient`` sends ``Connection: close`` on every request, so a
proxy built on it pays a TCP connect (and the backend an accept) per request: measured at
~0.55x of direct throughput for a tiny GET. :class:`KeepAliveHTTPClient` is a drop-in
``AsyncHTTPClient`` implementation that keeps upstream connections open and reuses them.

Each connection is an asyncio ``Protocol`` with an incremental HTTP/1.1 response parser:
bytes are parsed as the event loop hands them over, and a request on a pooled connection
is written and answered without a task, a coroutine or an ``IOStream`` read future. The
same pool built on Tornado's ``IOStream`` + ``HTTP1Connection`` made the gateway run 1690
Python calls per proxied tiny GET instead of 1114, and cost 1398 instead of 1106 us of CPU
at one connection (``bench/proxy_cpu.py``). The parser applies ``HTTP1Connection``'s client
rules: the same framing checks (Content-Length vs Transfer-Encoding, 204/304/HEAD, 1xx),
limits and gzip decoding.

Select it by configuration::

    AsyncHTTPClient.configure(
        "tornado_gateway.pool.KeepAliveHTTPClient",
        max_clients=64,            # concurrent requests; more are queued
        max_body_size=2 << 30,     # largest accepted response body (also when streaming)
        max_idle_per_host=64,      # idle connections kept per (scheme, host, port)
        idle_timeout=4.0,          # seconds an idle connection is kept; keep this below
                                   # the backend's own keep-alive timeout
    )

Semantics follow ``SimpleAsyncHTTPClient`` for everything a streaming proxy uses
(``body_producer``, ``header_callback``, async ``streaming_callback`` awaited for
back-pressure, ``request_timeout``/``connect_timeout``, ``max_body_size``, HEAD/204/304,
``raise_error=False`` still raising 599 errors for connection failures and timeouts,
queueing beyond ``max_clients``), redirects included (``follow_redirects``, on by default, and
``max_redirects``, with the simple client's rules); the gateway's proxy turns them off and
passes 3xx answers on.

Connection reuse rules
----------------------
A connection goes back to the idle pool only when the exchange ended cleanly: the
request body was fully sent, the response was read to its end with known framing
(Content-Length, chunked, or no body by definition: HEAD/204/304), the response allows
keep-alive (HTTP/1.1 without ``Connection: close``, or HTTP/1.0 with
``Connection: keep-alive``), no bytes beyond the response are buffered, and the request
was neither timed out nor aborted. Everything else closes the socket. A server that
answers HTTP/1.0 or ``Connection: close`` every time simply gets a new connection per
request (the simple client's behaviour).

An idle connection is checked before reuse (closed flag, unsolicited buffered bytes, and
a non-blocking ``MSG_PEEK`` for EOF). If a reused connection still turns out to be dead
-- it closes before any byte of a response arrived -- the request is retried once on a
new connection (never on another idle one), but only when that cannot duplicate an
effect: the method is idempotent (GET, HEAD, OPTIONS, PUT, DELETE, TRACE) and the body is
not a ``body_producer`` (a producer cannot be replayed). POST/PATCH and streamed bodies fail
with the error: a server that closes a connection just as a request goes out on it is a
race no HTTP/1.1 client can win for them, which is why ``idle_timeout`` should stay below
the server's own keep-alive timeout.

Answers that come before the request body is sent
-------------------------------------------------
The response is read and parsed while the request body is still going out, as it arrives:
a server may answer early (a 413 to a body over its limit, as waitress does as soon as it
has read the head) and close. The head reaches the ``header_callback`` and the body the
``streaming_callback`` at once, while the upload goes on; once that answer is complete it is
the request's answer, the body producer is cancelled (its ``write`` fails from then on), and
the connection is closed, never pooled. A complete answer wins over the upload's write
error: when a write fails (``EPIPE``, reset) before the loop read what the server had
sent, the bytes still in the socket are read and parsed before the error counts, so the
answer is delivered if it arrived complete, and the error only if it did not. A connection
that ends without a complete answer while the producer runs fails the request when the
producer next writes, or when it ends.

Timeouts
--------
``request_timeout`` counts from :meth:`fetch`; all running requests share one loop timer
(armed for the earliest deadline) rather than one timer each. ``connect_timeout`` bounds
resolving and connecting.

Aborting a request (client went away)
-------------------------------------
Either cancel the future returned by :meth:`fetch` (``future.cancel()``, or cancel the
asyncio task awaiting it), or let the ``streaming_callback`` / ``header_callback``
raise (or return an awaitable that raises). Both close the upstream socket at once; it is
never pooled. A raising callback makes the fetch fail with ``HTTPStreamClosedError``
(599, like the simple client), the callback's exception as ``__cause__``. A body
producer that raises also closes the socket. A body producer still running when its
exchange ends (an abort, a timeout, an early answer) is cancelled.

Parsed head
-----------
A ``header_callback`` object with a ``head_received(start_line, headers)`` method is given
the parsed head in that one call instead of the raw lines (other clients keep calling the
object itself with lines): a caller that would parse the lines again saves that work.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import copy
import functools
import heapq
import itertools
import re
import socket
import time
import urllib.parse
import zlib
from collections.abc import Callable
from io import BytesIO
from typing import Any

from tornado import httputil, version
from tornado.concurrent import (
    Future,
    future_set_exception_unless_cancelled,
    future_set_result_unless_cancelled,
)
from tornado.escape import _unicode
from tornado.http1connection import is_transfer_encoding_chunked, parse_hex_int, parse_int
from tornado.httpclient import AsyncHTTPClient, HTTPRequest, HTTPResponse, _RequestProxy
from tornado.iostream import StreamClosedError
from tornado.log import app_log, gen_log
from tornado.util import GzipDecompressor

from .http.headers import copy_headers, field_lines, get_field, parse_header_block
from tornado.netutil import OverrideResolver, Resolver, is_valid_ip, ssl_options_to_context
from tornado.simple_httpclient import (
    HTTPStreamClosedError,
    HTTPTimeoutError,
    _HTTPConnection,
)

__all__ = ["KeepAliveHTTPClient", "HTTPStreamClosedError", "HTTPTimeoutError"]

#: Methods whose repetition has no additional effect (RFC 9110 9.2.2); only these are
#: retried after a reused connection was found dead.
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})
_SUPPORTED_METHODS = {"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"}

_PoolKey = tuple  # (scheme, host, port, address family, source ip, tls settings)


def _header_tokens(value: str | None) -> set[str]:
    """Comma-separated tokens of a header such as ``Connection``, lower-cased."""
    if not value:
        return set()
    return {t.strip().lower() for t in value.split(",") if t.strip()}


class KeepAliveHTTPClient(AsyncHTTPClient):
    """``AsyncHTTPClient`` that reuses upstream connections (HTTP/1.1 keep-alive).

    Constructor / ``configure()`` options (besides those of ``SimpleAsyncHTTPClient``:
    ``max_clients``, ``hostname_mapping``, ``max_buffer_size``, ``resolver``,
    ``defaults``, ``max_header_size``, ``max_body_size``):

    ``max_idle_per_host``
        Idle connections kept per (scheme, host, port); default ``max_clients``. When
        the pool is full the oldest idle connection is closed.
    ``idle_timeout``
        Seconds an idle connection is kept before it is closed (default 4.0). Keep it
        below the backend's keep-alive timeout, so that the proxy, not the backend,
        closes idle connections and the race "request sent on a connection the backend
        is closing" (fatal for a POST) stays rare.
    """

    def initialize(  # type: ignore[override]
        self,
        max_clients: int = 10,
        hostname_mapping: dict[str, str] | None = None,
        max_buffer_size: int = 104857600,
        resolver: Resolver | None = None,
        defaults: dict[str, Any] | None = None,
        max_header_size: int | None = None,
        max_body_size: int | None = None,
        max_idle_per_host: int | None = None,
        idle_timeout: float = 4.0,
    ) -> None:
        super().initialize(defaults=defaults)
        self.max_clients = max_clients
        self.max_buffer_size = max_buffer_size
        self.max_header_size = max_header_size
        self.max_body_size = max_body_size
        self.max_idle_per_host = (
            max_clients if max_idle_per_host is None else max_idle_per_host
        )
        self.idle_timeout = idle_timeout
        # Requests not started yet (beyond max_clients), in order, and the running ones.
        self.queue: collections.deque[
            tuple[object, HTTPRequest, Callable[[HTTPResponse], None]]
        ] = collections.deque()
        self.active: dict[object, _PooledConnection] = {}
        # key -> (request, callback, queue timeout handle, IOLoop time of fetch())
        self.waiting: dict[
            object, tuple[HTTPRequest, Callable[[HTTPResponse], None], object, float]
        ] = {}
        # Idle (connection, IOLoop time it became idle) per pool key. The right end is the
        # most recently used: LIFO reuse keeps few connections hot and lets the others
        # time out, and the left end is always the first to expire.
        self._idle: dict[_PoolKey, collections.deque[tuple[_Upstream, float]]] = {}
        # One timer for the whole pool (not one per idle connection, which would be two
        # timer operations per request): it fires when the oldest idle connection expires.
        self._sweeper: object = None
        # request_timeout deadlines of started requests, (deadline, seq, exchange) in a heap
        # watched by one loop timer (see _watch_deadline).
        self._deadlines: list[tuple[float, int, _PooledConnection]] = []
        self._deadline_seq = itertools.count()
        self._deadline_timer: object = None
        self._deadline_due = 0.0
        self._pool_closed = False
        self._last_key: object = None
        # Counters for tests and diagnostics.
        self.stats = collections.Counter()  # type: collections.Counter[str]
        if resolver:
            self.resolver = resolver
            self.own_resolver = False
        else:
            self.resolver = Resolver()
            self.own_resolver = True
        # With the default resolver and no mapping, an IP literal needs no look-up (the
        # default resolver would still hand it to a thread for getaddrinfo()).
        self._literal_ips = resolver is None and hostname_mapping is None
        if hostname_mapping is not None:
            self.resolver = OverrideResolver(
                resolver=self.resolver, mapping=hostname_mapping
            )

    # ------------------------------------------------------------------ public API

    def fetch(  # type: ignore[override]
        self,
        request: str | HTTPRequest,
        raise_error: bool = True,
        **kwargs: Any,
    ) -> Future[HTTPResponse]:
        """Start a request; same contract as ``AsyncHTTPClient.fetch``.

        The future resolves to the response. Like ``SimpleAsyncHTTPClient`` it raises,
        even with ``raise_error=False``, when no HTTP answer was had: the socket error
        itself (e.g. ``ConnectionRefusedError``), ``HTTPStreamClosedError`` (599) when
        the connection closed early, ``HTTPTimeoutError`` (599) when ``connect_timeout``
        or ``request_timeout`` expires. ``request_timeout`` counts from this call, time
        waiting for a ``max_clients`` slot included; on timeout the upstream socket is
        closed, never pooled.

        Cancelling the returned future aborts the request: it leaves the queue, or its
        upstream connection is closed (never pooled) and its ``max_clients`` slot freed.
        """
        # AsyncHTTPClient.fetch() as Tornado writes it, except that the request's headers
        # are copied without validating every field again (HTTPHeaders checked them when
        # they were added): the copy protects the caller's object from the Host,
        # User-Agent... this client adds.
        if self._closed:
            raise RuntimeError("fetch() called on closed AsyncHTTPClient")
        if not isinstance(request, HTTPRequest):
            request = HTTPRequest(url=request, **kwargs)
        elif kwargs:
            raise ValueError("kwargs can't be used if request is an HTTPRequest object")
        headers = request.headers
        request.headers = (copy_headers(headers) if isinstance(headers, httputil.HTTPHeaders)
                           else httputil.HTTPHeaders(headers))
        future: Future[HTTPResponse] = Future()

        def handle_response(response: HTTPResponse) -> None:
            if response.error:
                if raise_error or not response._error_is_response_code:
                    future_set_exception_unless_cancelled(future, response.error)
                    return
            future_set_result_unless_cancelled(future, response)

        self.fetch_impl(_RequestProxy(request, self.defaults), handle_response)  # type: ignore[arg-type]
        key = self._last_key
        self._last_key = None
        if key is not None and not future.done():
            watch = functools.partial(self._on_future_done, key)
            future.add_done_callback(watch)
            running = self.active.get(key)
            if running is not None:
                # Taken off again when the answer is delivered: a done callback left on
                # the future would cost a loop callback per request only to see it was
                # not cancelled.
                running._cancel_watch = (future, watch)
        return future

    def close(self) -> None:
        """Close all idle connections and release the resolver.

        Requests in flight complete, but their connections are closed afterwards
        instead of being pooled.
        """
        super().close()
        self._pool_closed = True
        for dq in self._idle.values():
            while dq:
                conn, _since = dq.pop()
                conn.close()
        self._idle.clear()
        if self._sweeper is not None:
            self.io_loop.remove_timeout(self._sweeper)
            self._sweeper = None
        if self.own_resolver:
            self.resolver.close()

    def idle_count(self, key: _PoolKey | None = None) -> int:
        """Number of idle pooled connections (for one pool key, or in total)."""
        if key is not None:
            return len(self._idle.get(key, ()))
        return sum(len(dq) for dq in self._idle.values())

    # ------------------------------------------------------------------ queueing

    def fetch_impl(
        self, request: HTTPRequest, callback: Callable[[HTTPResponse], None]
    ) -> None:
        key = object()
        self._last_key = key
        assert request.connect_timeout is not None
        assert request.request_timeout is not None
        if not self.queue and len(self.active) < self.max_clients:
            # A free slot and nobody waiting: start at once, what _process_queue() would
            # do with this request right away (without the queue and timeout bookkeeping).
            self._start(key, request, callback, self.io_loop.time())
            return
        self.queue.append((key, request, callback))
        timeout_handle = None
        if len(self.active) >= self.max_clients:
            # As the simple client: a queued request waits at most its connect or
            # request timeout (the smaller non-zero one).
            timeout = (
                min(request.connect_timeout, request.request_timeout)
                or request.connect_timeout
                or request.request_timeout
            )
            if timeout:
                timeout_handle = self.io_loop.add_timeout(
                    self.io_loop.time() + timeout,
                    functools.partial(self._on_queue_timeout, key),
                )
        self.waiting[key] = (request, callback, timeout_handle, self.io_loop.time())
        self._process_queue()
        if self.queue:
            gen_log.debug(
                "max_clients limit reached, request queued. %d active, %d queued",
                len(self.active),
                len(self.queue),
            )

    def _process_queue(self) -> None:
        while self.queue and len(self.active) < self.max_clients:
            key, request, callback = self.queue.popleft()
            if key not in self.waiting:
                continue
            queued_at = self.waiting[key][3]
            self._remove_queue_timeout(key)
            self._start(key, request, callback, queued_at)

    def _start(
        self,
        key: object,
        request: HTTPRequest,
        callback: Callable[[HTTPResponse], None],
        queued_at: float,
    ) -> None:
        conn = _PooledConnection(
            self,
            request,
            functools.partial(self._release_fetch, key),
            callback,
            queued_at,
        )
        self.active[key] = conn
        conn.start()

    def _release_fetch(self, key: object) -> None:
        self.active.pop(key, None)
        self._process_queue()

    def _remove_queue_timeout(self, key: object) -> None:
        if key in self.waiting:
            _request, _callback, timeout_handle, _queued_at = self.waiting.pop(key)
            if timeout_handle is not None:
                self.io_loop.remove_timeout(timeout_handle)

    def _drop_queued(self, key: object, error: BaseException | None) -> None:
        """Take a request out of the queue; answer it with ``error`` unless None."""
        request, callback, _handle, queued_at = self.waiting[key]
        self._remove_queue_timeout(key)
        try:
            self.queue.remove((key, request, callback))
        except ValueError:
            pass
        if error is None:
            return
        response = HTTPResponse(
            request,
            599,
            error=error,
            request_time=self.io_loop.time() - queued_at,
        )
        self.io_loop.add_callback(callback, response)

    def _on_queue_timeout(self, key: object) -> None:
        if key in self.waiting:
            self._drop_queued(key, HTTPTimeoutError("Timeout in request queue"))

    def _on_future_done(self, key: object, future: Future[HTTPResponse]) -> None:
        if not future.cancelled():
            return
        # The caller gave up (e.g. its own client disconnected): free everything now.
        # Nobody is waiting for an answer (and answering a cancelled future only logs
        # "Exception after Future was cancelled"), so none is sent.
        if key in self.waiting:
            self._drop_queued(key, None)
        conn = self.active.get(key)
        if conn is not None:
            conn.abort()

    # ------------------------------------------------------------------ deadlines

    def _watch_deadline(self, exchange: "_PooledConnection", deadline: float) -> None:
        """Time ``exchange`` out at ``deadline`` (IOLoop time) unless it is over by then.

        One timer serves the whole client, armed for the earliest deadline: a timer per
        request (a loop TimerHandle pushed on the loop's heap with Python-level comparisons,
        then cancelled) cost measurable CPU on every request. Finished exchanges are dropped
        lazily, and the heap is rebuilt once it holds more of them than running ones.
        """
        heap = self._deadlines
        heapq.heappush(heap, (deadline, next(self._deadline_seq), exchange))
        if self._deadline_timer is None or deadline < self._deadline_due:
            self._arm_deadline_timer(deadline)
        if len(heap) > 2 * len(self.active) + 64:
            heap[:] = [entry for entry in heap if not entry[2]._done]
            heapq.heapify(heap)

    def _arm_deadline_timer(self, due: float) -> None:
        if self._deadline_timer is not None:
            self.io_loop.remove_timeout(self._deadline_timer)
        self._deadline_due = due
        self._deadline_timer = self.io_loop.call_at(due, self._on_deadline)

    def _on_deadline(self) -> None:
        self._deadline_timer = None
        heap = self._deadlines
        now = self.io_loop.time()
        expired = []
        while heap and (heap[0][0] <= now or heap[0][2]._done):
            _due, _seq, exchange = heapq.heappop(heap)
            if not exchange._done:
                expired.append(exchange)
        for exchange in expired:
            exchange._on_timeout("during request")
        while heap and heap[0][2]._done:
            heapq.heappop(heap)
        if heap and self._deadline_timer is None:
            self._arm_deadline_timer(heap[0][0])

    # ------------------------------------------------------------------ the pool

    def _checkout(self, key: _PoolKey) -> "_Upstream | None":
        """An idle, apparently live connection for ``key``, or None."""
        dq = self._idle.get(key)
        while dq:
            conn, since = dq.pop()
            conn.on_idle_close = None
            if self.io_loop.time() - since < self.idle_timeout and conn.alive():
                self.stats["reused"] += 1
                return conn
            self.stats["dead_on_checkout"] += 1
            conn.close()
        return None

    def _checkin(self, key: _PoolKey, conn: "_Upstream") -> None:
        """Keep ``conn`` idle for reuse, or close it if the pool can't take it."""
        if self._pool_closed or self.max_idle_per_host <= 0 or conn.closed:
            conn.close()
            return
        dq = self._idle.get(key)
        if dq is None:
            dq = self._idle[key] = collections.deque()
        while len(dq) >= self.max_idle_per_host:
            old, _since = dq.popleft()
            old.close()
        now = self.io_loop.time()
        dq.append((conn, now))
        if self._sweeper is None:
            self._sweeper = self.io_loop.call_at(now + self.idle_timeout, self._sweep)
        # The transport keeps reading while the connection is idle: a server closing it (or
        # sending anything) is noticed and the connection leaves the pool.
        conn.on_idle_close = functools.partial(self._discard_idle, key)
        self.stats["pooled"] += 1

    def _discard_idle(self, key: _PoolKey, conn: "_Upstream") -> None:
        dq = self._idle.get(key)
        if dq:
            for item in dq:
                if item[0] is conn:
                    dq.remove(item)
                    break
            if not dq:
                self._idle.pop(key, None)
        conn.close()

    def _sweep(self) -> None:
        """Close connections idle for ``idle_timeout``; re-arm for the next to expire."""
        self._sweeper = None
        now = self.io_loop.time()
        next_due: float | None = None
        for key in list(self._idle):
            dq = self._idle[key]
            while dq and now - dq[0][1] >= self.idle_timeout:
                conn, _since = dq.popleft()
                conn.close()
                self.stats["idle_timeout"] += 1
            if dq:
                due = dq[0][1] + self.idle_timeout
                next_due = due if next_due is None else min(next_due, due)
            else:
                del self._idle[key]
        if next_due is not None:
            self._sweeper = self.io_loop.call_at(next_due, self._sweep)


def _log_run_failure(task: "asyncio.Future[None]") -> None:
    # run() turns every Exception into the request's answer; anything else is a bug.
    if not task.cancelled() and task.exception() is not None:
        app_log.error("Exception in KeepAliveHTTPClient request", exc_info=task.exception())


def _closed_future(error: BaseException | None = None) -> "Future[None]":
    future: Future[None] = Future()
    future.set_exception(StreamClosedError(real_error=error))
    future.exception()  # retrieved: a writer that stopped caring must not log it
    return future


class _Upstream(asyncio.Protocol):
    """One upstream connection: an asyncio transport, and the exchange using it (if any).

    What is written leaves at once (Nagle's algorithm is off on the TCP socket).

    Bytes go straight to the exchange's parser as the loop delivers them. While the
    connection is idle in the pool the transport keeps reading, so a server closing it, or
    sending anything at all, takes it out of the pool.
    """

    def __init__(self, tls: bool) -> None:
        self.transport: asyncio.Transport | None = None
        # The socket _open() made and handed to create_connection(sock=...), for the MSG_PEEK
        # check and the salvage: a real socket on every loop. Never the transport's
        # get_extra_info("socket"): uvloop's is a PseudoSocket whose recv() raises TypeError.
        # uvloop uses this socket's fd as it is and detaches it only after connection_lost(),
        # as asyncio closes it only then: both reads work under both loops (tests/test_loops.py).
        self.sock: socket.socket | None = None
        self.tls = tls
        self.closed = False
        self.exchange: _PooledConnection | None = None
        self.on_idle_close: Callable[[_Upstream], None] | None = None
        self._write_paused = False
        self._drain: Future[None] | None = None

    # -- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        # A request goes out as several writes (head, then each body piece). With Nagle's
        # algorithm a short segment is held while an earlier short one is unacknowledged, and
        # a server on a kept-alive connection delays that ACK (40 ms on Linux): the last piece
        # of an upload sat in this socket that long before the server could answer. asyncio
        # sets TCP_NODELAY only on sockets made with proto=IPPROTO_TCP, which _open()'s are
        # not; under TLS, "socket" is the TCP socket beneath.
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass  # already reset by the peer: the first write reports it

    def data_received(self, data: bytes) -> None:
        exchange = self.exchange
        if exchange is None:
            # Bytes nobody asked for (e.g. a "408 Request Timeout" sent just before the
            # server closes): they would be read as the next request's response.
            self.close()
            return
        exchange._on_data(data)

    def eof_received(self) -> bool:
        exchange = self.exchange
        if exchange is not None:
            exchange._on_eof(None)
        return False  # close the transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        drain, self._drain = self._drain, None
        if drain is not None and not drain.done():
            drain.set_exception(StreamClosedError(real_error=exc))
            drain.exception()
        exchange = self.exchange
        if exchange is not None and exc is not None:
            self._salvage(exchange)
            exchange = self.exchange
        if exchange is not None:
            exchange._on_eof(exc)
        else:
            callback, self.on_idle_close = self.on_idle_close, None
            if callback is not None:
                callback(self)

    def _salvage(self, exchange: "_PooledConnection") -> None:
        """Hand the exchange what the server sent that the transport never read.

        A failed write (the server answered early and closed: ``EPIPE``, or a reset from it)
        makes the transport close at once, without reading what is waiting in the socket:
        typically that very answer, a 413. The socket is still open here (the transport
        closes it after ``connection_lost``), so it is read now, without blocking, until it
        is empty, at its end, or failing. Linux keeps received bytes readable after a reset
        arrives; ``recv`` reports the reset only once they are read.
        """
        sock = self.sock
        if sock is None or self.tls or exchange._done:
            return
        taken = 0
        try:
            while taken < _SALVAGE_LIMIT and self.exchange is exchange and not exchange._done:
                data = sock.recv(65536)
                if not data:
                    return
                taken += len(data)
                exchange._on_data(data)
        except (BlockingIOError, InterruptedError, OSError):
            return

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        drain, self._drain = self._drain, None
        if drain is not None and not drain.done():
            drain.set_result(None)

    # -- used by the pool and the exchange

    def write(self, data: bytes) -> "Future[None]":
        """Send ``data``; the future resolves once the transport's buffer is below its
        high-water mark again (at once when it is): the upload back-pressure."""
        transport = self.transport
        if self.closed or transport is None or transport.is_closing():
            # A transport that failed (its connection_lost comes on the next loop
            # iteration) would only count the write and warn "socket.send() raised
            # exception." for each one past the fifth.
            return _closed_future()
        transport.write(data)
        if self._write_paused:
            if self._drain is None:
                self._drain = Future()
            return self._drain
        future: Future[None] = Future()
        future.set_result(None)
        return future

    def alive(self) -> bool:
        """Is this idle connection still usable (not closed, nothing unread, no EOF)?"""
        if self.closed or self.transport is None or self.transport.is_closing():
            return False
        if self.tls or self.sock is None:
            return True  # MSG_PEEK would see TLS records; the idle reader catches closes
        # connection_lost runs only when the loop gets to the socket's event; a FIN that
        # arrived just now is seen by peeking (non-blocking).
        try:
            self.sock.recv(1, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            return True
        except OSError:
            return False
        return False  # b"" is EOF; any data is unsolicited: either way unusable

    def close(self) -> None:
        """Close now, discarding anything not yet sent (never pooled again)."""
        self.on_idle_close = None
        if not self.closed:
            self.closed = True
            if self.transport is not None:
                self.transport.abort()


# Parser states.
_HEAD, _FIXED, _CHUNK_SIZE, _CHUNK_DATA, _CHUNK_END, _TRAILER, _UNTIL_CLOSE = range(7)
_HEAD_END = re.compile(rb"\r?\n\r?\n")
_MAX_1XX_RESPONSES = 10
_MAX_CHUNK_LINE = 64
_MAX_TRAILER = 64 * 1024
#: Largest piece handed to the streaming callback when decompressing.
_GZIP_PIECE = 64 * 1024
#: Most bytes read from a socket whose transport failed (see _Upstream._salvage).
_SALVAGE_LIMIT = 4 << 20


class _Resolved:
    """A request's attributes, each resolved against the client's defaults."""

    def __getattr__(self, name: str) -> Any:
        return None  # neither the request nor the defaults have it (as _RequestProxy)


def _resolve(request: Any) -> Any:
    """``_RequestProxy(request, defaults)``'s answers for every attribute, computed once."""
    real = getattr(request, "request", request)
    defaults = getattr(request, "defaults", None)
    resolved = _Resolved()
    values = resolved.__dict__
    values.update(vars(real))
    if defaults:
        for name, value in defaults.items():
            if values.get(name) is None:
                values[name] = value
    values["headers"] = real.headers
    body = real.body
    values["body"] = body if body is not None else values.get("body")
    return resolved


class _MalformedResponse(Exception):
    """The response broke HTTP/1.1 framing or a limit: the exchange fails with it."""


class _PooledConnection:
    """One request: get a connection (pooled or new), exchange, then pool or close it."""

    def __init__(
        self,
        client: KeepAliveHTTPClient,
        request: HTTPRequest,
        release_callback: Callable[[], None],
        final_callback: Callable[[HTTPResponse], None],
        start_time: float,
    ) -> None:
        self.io_loop = client.io_loop
        self.client = client
        self.request = request
        # Every attribute resolved against the client's defaults once, as _RequestProxy does
        # on each read (two look-ups and a call per read, a few dozen reads per request).
        opts = self._opts = _resolve(request)
        # IOLoop time of fetch(): time spent in the max_clients queue counts against
        # request_timeout, as AsyncHTTPClient documents.
        self.start_time = start_time
        self.start_wall_time = time.time()
        # Resolved once: every attribute read on the _RequestProxy costs a lookup on
        # the request and then on the defaults, and the hot path reads these often.
        self._method: str = opts.method
        self._url: str = opts.url
        self._req_headers: httputil.HTTPHeaders = opts.headers
        self._body: bytes | None = opts.body
        self._body_producer = opts.body_producer
        self._streaming_callback = opts.streaming_callback
        self._header_callback = opts.header_callback
        # A header_callback with a ``head_received(start_line, headers)`` method gets the
        # parsed head in one call instead of one formatted line per header, which it would
        # only parse again (the gateway's proxy does this).
        self._head_received = getattr(self._header_callback, "head_received", None)
        self._expect_100 = bool(opts.expect_100_continue)
        self._decompress = bool(opts.decompress_response)
        self._max_body = client.max_body_size or client.max_buffer_size
        self._max_header = client.max_header_size or 65536
        self.release_callback: Callable[[], None] | None = release_callback
        self.final_callback: Callable[[HTTPResponse], None] | None = final_callback
        self.stream: _Upstream | None = None
        # (fetch() future, its cancellation watch): see KeepAliveHTTPClient.fetch()
        self._cancel_watch: tuple[Any, Any] | None = None
        self._pool_key: _PoolKey = ()
        self._chunking = False  # the request body goes chunked (set by _format_head)
        self._length_out: int | None = None
        self._head_bytes = b""
        self._may_retry = False
        self._attempt = 0
        self._reset_exchange()

    def _reset_exchange(self) -> None:
        self.code: int | None = None
        self.reason: str | None = None
        self.headers: httputil.HTTPHeaders | None = None
        self.version: str | None = None
        self.chunks = bytearray()
        self._buf = bytearray()
        self._state = _HEAD
        self._remaining = 0
        self._total = 0
        self._n1xx = 0
        self._got_bytes = False
        self._blocked = False  # waiting for the streaming callback's awaitable
        self._eof = False
        self._eof_error: BaseException | None = None
        self._body_sent = False
        self._continued = False  # the body went out after a 100 (Continue)
        # The task awaiting the body producer, while it does: cancelled when the exchange
        # ends first (an early answer, a timeout, an abort). No task of its own per upload.
        self._producing: asyncio.Task[Any] | None = None
        self._producer_stopped = False
        self._out_remaining: int | None = None
        self._decompressor: GzipDecompressor | None = None
        self._gzip_pending = b""
        self._redirect = False  # this response is a redirect being followed

    # ---------------------------------------------------------------- lifecycle

    def start(self) -> None:
        request_timeout = self._opts.request_timeout
        if request_timeout:
            self.client._watch_deadline(self, self.start_time + request_timeout)
        try:
            self._setup()
        except Exception as e:
            # Answered from the loop: fetch() has not returned its future yet.
            self.io_loop.add_callback(self._finish_error, e)
            return
        if self._body_producer is None and not self._expect_100:
            conn = self.client._checkout(self._pool_key)
            if conn is not None:
                # The common case: a pooled connection and the whole request in hand. It
                # is written now; the parser answers from the connection's data callback.
                self._begin(conn, True)
                return
        # A task with its own done callback: IOLoop.add_future would add a loop iteration
        # per request just to look at the result.
        asyncio.ensure_future(self.run()).add_done_callback(_log_run_failure)

    def abort(self) -> None:
        """Stop now without answering: close the connection (never pooled), free the slot."""
        self.final_callback = None
        if self.stream is not None:
            self.stream.close()
        self._stop_producer()
        self._release()

    def _on_timeout(self, info: str) -> None:
        self._finish_error(HTTPTimeoutError(f"Timeout {info}"))

    def _release(self) -> None:
        if self.release_callback is not None:
            release_callback = self.release_callback
            self.release_callback = None
            release_callback()

    def _stop_producer(self) -> None:
        """The exchange is over: a body producer still running is cancelled (its writes
        could only fail; one waiting for data that will never come would wait forever)."""
        producing, self._producing = self._producing, None
        if producing is not None and not producing.done():
            self._producer_stopped = True
            producing.cancel()

    def _run_callback(self, response: HTTPResponse) -> None:
        self._stop_producer()
        self._release()
        if self._cancel_watch is not None:
            future, watch = self._cancel_watch
            self._cancel_watch = None
            future.remove_done_callback(watch)
        if self.final_callback is not None:
            final_callback = self.final_callback
            self.final_callback = None
            # Called directly, not through add_callback (which costs an event-loop iteration
            # per request): it is fetch()'s handle_response, which only resolves the future
            # (whose waiters run later anyway), and this never runs inside fetch() itself.
            try:
                final_callback(response)
            except Exception:
                app_log.error("Exception in callback %r", final_callback, exc_info=True)

    def _finish_error(self, error: BaseException) -> None:
        if self.final_callback is None:
            return
        if isinstance(error, StreamClosedError):
            error = error.real_error or HTTPStreamClosedError("Stream closed")
        # Close first: a timed-out or aborted exchange may be half-way through.
        if self.stream is not None:
            self.stream.close()
        self._run_callback(
            HTTPResponse(
                self.request,
                599,
                error=error,
                request_time=self.io_loop.time() - self.start_time,
                start_time=self.start_wall_time,
            )
        )

    @property
    def _done(self) -> bool:
        return self.final_callback is None

    # ---------------------------------------------------------------- the request

    def _setup(self) -> None:
        """Parse the URL, fill in the headers, format the request head."""
        request = self._opts
        parsed = urllib.parse.urlsplit(_unicode(self._url))
        if parsed.scheme not in ("http", "https"):
            raise ValueError("Unsupported url scheme: %s" % self._url)
        netloc = parsed.netloc
        if "@" in netloc:
            _userpass, _, netloc = netloc.rpartition("@")
        host, port = httputil.split_host_and_port(netloc)
        if port is None:
            port = 443 if parsed.scheme == "https" else 80
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        self.parsed = parsed
        self.parsed_hostname = host
        self._host, self._port = host, port
        self._af = socket.AF_INET if request.allow_ipv6 is False else socket.AF_UNSPEC
        self._ssl_options: Any = None
        tls_key = None
        if parsed.scheme == "https":
            # Reuse the simple client's TLS defaults (shared default context, or one
            # built from validate_cert / ca_certs / client_cert).
            self._ssl_options = _HTTPConnection._get_ssl_options(self, "https")  # type: ignore[arg-type]
            tls_key = (
                request.validate_cert,
                request.ca_certs,
                request.client_cert,
                request.client_key,
                id(request.ssl_options) if request.ssl_options is not None else None,
            )
        self._source_ip = None
        if request.network_interface:
            if is_valid_ip(request.network_interface):
                self._source_ip = request.network_interface
            else:
                raise ValueError(
                    "Unrecognized IPv4 or IPv6 address for network_interface, got %r"
                    % (request.network_interface,)
                )
        self._pool_key = (parsed.scheme, host, port, self._af, self._source_ip, tls_key)
        self._prepare_headers(parsed)
        req_path = (parsed.path or "/") + (("?" + parsed.query) if parsed.query else "")
        self._head_bytes = self._format_head(req_path)
        self._may_retry = (
            self._method in IDEMPOTENT_METHODS
            and self._body_producer is None
            and not self._expect_100
        )

    def _format_head(self, path: str) -> bytes:
        """The request line and headers, as ``HTTP1Connection.write_headers`` writes them."""
        headers = self._req_headers
        method = self._method
        # A body of unknown length goes chunked (the simple client's rule).
        self._chunking = method in ("POST", "PUT", "PATCH") and "Content-Length" not in headers
        if self._chunking:
            headers["Transfer-Encoding"] = "chunked"
        length = get_field(headers, "Content-Length")
        self._length_out = parse_int(length) if length is not None else None
        lines = ["%s %s HTTP/1.1" % (method, path)]
        lines.extend(field_lines(headers))
        head = "\r\n".join(lines)
        # The separators account for len(lines) - 1 of each; any other CR or LF is in a line.
        if head.count("\n") != len(lines) - 1 or head.count("\r") != len(lines) - 1:
            for line in lines:
                if "\r" in line or "\n" in line:
                    raise ValueError("Illegal characters (CR or LF) in header: %r" % line)
        if path.isascii():
            return head.encode("latin1") + b"\r\n\r\n"
        # As HTTP1Connection: the request line in UTF-8, the header lines in Latin-1.
        first, _, rest = head.partition("\r\n")
        return first.encode("utf-8") + b"\r\n" + rest.encode("latin1") + b"\r\n\r\n"

    async def run(self) -> None:
        try:
            await self._run()
        except Exception as e:
            if self._done:
                # Already answered (timeout, abort): the connection was closed under
                # the exchange, which is what raised here.
                if self.stream is not None:
                    self.stream.close()
                if not isinstance(e, (StreamClosedError, HTTPStreamClosedError)):
                    gen_log.debug("error after request finished", exc_info=True)
                return
            self._finish_error(e)

    async def _run(self) -> None:
        # The retry (attempt 1) always uses a new connection: other idle ones may be
        # just as dead (the server restarted, or timed them all out at once).
        conn = self.client._checkout(self._pool_key) if self._attempt == 0 else None
        reused = conn is not None
        if conn is None:
            conn = await self._connect()
            if conn is None:
                return  # finished while connecting (timeout/abort)
            self.client.stats["connected"] += 1
        self._begin(conn, reused)
        if self._body_producer is not None and not self._expect_100:
            await self._write_body()

    def _begin(self, conn: _Upstream, reused: bool) -> None:
        """Start the exchange on ``conn``: write the head (and a body in hand)."""
        self.stream = conn
        conn.exchange = self
        self._reused = reused
        self._reset_exchange()
        self._out_remaining = self._length_out
        if conn.closed:
            # The server closed the new connection before anything was asked (it accepted,
            # then hung up): its connection_lost had no exchange to tell, so nothing would
            # ever end this one but the request timeout.
            self._on_eof(ConnectionResetError("the server closed the connection before the "
                                              "request was sent"))
            return
        body = self._body
        if self._expect_100 or self._body_producer is not None:
            # The body follows (after a 100, or as the producer makes it); any answer that
            # comes meanwhile is parsed as it arrives.
            conn.write(self._head_bytes)
        else:
            if body:
                if len(body) <= 65536:
                    conn.write(self._head_bytes + body)
                else:
                    conn.write(self._head_bytes)
                    conn.write(body)
            else:
                conn.write(self._head_bytes)
            self._body_sent = True

    async def _connect(self) -> "_Upstream | None":
        req = self._opts
        if req.connect_timeout and req.request_timeout:
            timeout = min(req.connect_timeout, req.request_timeout)
        else:
            timeout = req.connect_timeout or req.request_timeout or 0
        try:
            if timeout:
                remaining = self.start_time + timeout - self.io_loop.time()
                conn = await asyncio.wait_for(self._open(), max(remaining, 0))
            else:
                conn = await self._open()
        except (TimeoutError, asyncio.TimeoutError):
            raise HTTPTimeoutError("Timeout while connecting") from None
        if self._done:
            conn.close()
            return None
        return conn

    async def _open(self) -> _Upstream:
        """A new connection: resolve, connect (each address in turn), wrap in TLS."""
        loop = asyncio.get_running_loop()
        host, port = self._host, self._port
        if self.client._literal_ips and is_valid_ip(host):
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            addresses: list[tuple[int, Any]] = [(family, (host, port))]
        else:
            addresses = await self.client.resolver.resolve(host, port, self._af)
        ssl_context = (
            ssl_options_to_context(self._ssl_options, server_side=False)
            if self._ssl_options is not None else None
        )
        error: BaseException | None = None
        for family, address in addresses:
            sock = socket.socket(family, socket.SOCK_STREAM)
            try:
                sock.setblocking(False)
                if self._source_ip:
                    sock.bind((self._source_ip, 0))
                await loop.sock_connect(sock, address)
                conn = _Upstream(tls=ssl_context is not None)
                await loop.create_connection(
                    lambda: conn, sock=sock, ssl=ssl_context,
                    server_hostname=host if ssl_context is not None else None,
                )
                conn.sock = sock
                return conn
            except OSError as e:
                sock.close()
                error = e
            except BaseException:
                sock.close()
                raise
        assert error is not None
        raise error

    def _prepare_headers(self, parsed: urllib.parse.SplitResult) -> None:
        """Fill in request headers as the simple client does, minus ``Connection``."""
        request = self._opts
        method = self._method
        if method not in _SUPPORTED_METHODS and not request.allow_nonstandard_methods:
            raise KeyError("unknown method %s" % method)
        for key in (
            "proxy_host",
            "proxy_port",
            "proxy_username",
            "proxy_password",
            "proxy_auth_mode",
        ):
            if getattr(request, key, None):
                raise NotImplementedError("%s not supported" % key)
        headers = self._req_headers
        if "Host" not in headers:
            headers["Host"] = parsed.netloc.rpartition("@")[-1]
        username = password = None
        if parsed.username is not None:
            username, password = parsed.username, parsed.password
        elif request.auth_username is not None:
            username = request.auth_username
            password = request.auth_password or ""
        if username is not None:
            assert password is not None
            if request.auth_mode not in (None, "basic"):
                raise ValueError("unsupported auth_mode %s" % request.auth_mode)
            headers["Authorization"] = "Basic " + _unicode(
                base64.b64encode(httputil.encode_username_password(username, password))
            )
        if request.user_agent:
            headers["User-Agent"] = request.user_agent
        elif get_field(headers, "User-Agent") is None and "User-Agent" not in headers:
            # (the second test lets headers that must be sent exactly, the proxy's, say no)
            headers["User-Agent"] = f"Tornado/{version}"
        if not request.allow_nonstandard_methods:
            body_expected = method in ("POST", "PATCH", "PUT")
            body_present = self._body is not None or self._body_producer is not None
            if body_expected != body_present:
                raise ValueError(
                    "Body must %sbe None for method %s (unless "
                    "allow_nonstandard_methods is true)"
                    % ("not " if body_expected else "", method)
                )
        if self._expect_100:
            headers["Expect"] = "100-continue"
        if self._body is not None:
            # With a body_producer the caller sets Content-Length (else chunked).
            headers["Content-Length"] = str(len(self._body))
        if method == "POST" and "Content-Type" not in headers:
            headers["Content-Type"] = "application/x-www-form-urlencoded"
        if self._decompress:
            headers["Accept-Encoding"] = "gzip"

    # ---------------------------------------------------------------- request body

    def write(self, chunk: bytes) -> "Future[None]":
        """The ``write`` given to a ``body_producer``: frames (if chunked) and sends a
        piece of the body; the future is the back-pressure. After the exchange is over it
        touches nothing (the connection may already serve another request)."""
        conn = self.stream
        if conn is None or conn.exchange is not self or self._done or self._body_sent:
            return _closed_future()
        if self._out_remaining is not None:
            self._out_remaining -= len(chunk)
            if self._out_remaining < 0:
                conn.close()
                raise httputil.HTTPOutputError("Tried to write more data than Content-Length")
        if self._chunking:
            if not chunk:
                future: Future[None] = Future()
                future.set_result(None)
                return future
            # One write, as HTTP1Connection frames it: with TCP_NODELAY each write leaves as
            # a segment of its own, and size line and CRLF alone would be two tiny ones.
            return conn.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        return conn.write(chunk)

    async def _write_body(self) -> None:
        """Run the body producer (or send the body after a 100), then parse the answer."""
        conn = self.stream
        assert conn is not None
        if self._body is not None:
            conn.write(self._body)
            self._out_remaining = 0  # Content-Length is len(body)
        elif self._body_producer is not None:
            fut = self._body_producer(self.write)
            if fut is not None:
                self._producing = asyncio.current_task()
                try:
                    await fut
                except asyncio.CancelledError:
                    self._producing = None
                    if not (self._done and self._producer_stopped):
                        raise
                    # _stop_producer(): the exchange ended first; nobody else cancelled.
                    task = asyncio.current_task()
                    uncancel = getattr(task, "uncancel", None)
                    if uncancel is not None:
                        uncancel()
                    return
                except Exception:
                    self._producing = None  # (answered now: nothing left to cancel)
                    if self._answered_anyway(conn):
                        return
                    raise
                finally:
                    self._producing = None
        if self._done or conn.exchange is not self:
            return
        if self._out_remaining and not conn.closed:
            conn.close()
            raise httputil.HTTPOutputError(
                "Tried to write %d bytes less than Content-Length" % self._out_remaining
            )
        if self._chunking and not conn.closed:
            conn.write(b"0\r\n\r\n")
        self._body_sent = True
        if self._eof and not self._blocked:
            self._parse()  # the connection ended while the body went out: now it counts

    def _answered_anyway(self, conn: _Upstream) -> bool:
        """The body producer failed: has the exchange an outcome anyway (an answer that came
        complete before the connection failed, or a timeout or abort)?

        A write that fails (the server answered early and closed) closes the transport at
        once and the producer's next write fails, possibly before ``connection_lost`` has run
        and read what the socket still holds: that is read now, so a complete answer wins
        over the write error in any order of events.
        """
        transport = conn.transport
        if (not self._done and conn.exchange is self and not conn.closed
                and transport is not None and transport.is_closing()):
            conn._salvage(self)
        return self._done

    def _send_body_after_continue(self) -> None:
        self._continued = True
        task = asyncio.ensure_future(self._write_body())
        task.add_done_callback(self._body_task_done)

    def _body_task_done(self, task: "asyncio.Future[None]") -> None:
        if task.cancelled():
            return
        error = task.exception()
        if error is not None:
            self._finish_error(error)

    # ---------------------------------------------------------------- the response

    def _on_data(self, data: bytes) -> None:
        if self._done:
            return
        self._got_bytes = True
        self._buf += data
        if not self._blocked:
            self._parse()

    def _on_eof(self, error: BaseException | None) -> None:
        if self._done or self._eof:
            return
        self._eof = True
        self._eof_error = error
        conn = self.stream
        if (
            not self._got_bytes
            and self._attempt == 0
            and self._reused
            and self._may_retry
        ):
            # A pooled connection the server had closed: nothing of the response arrived
            # and the request is idempotent and replayable: once more, on a new connection.
            self.client.stats["retried"] += 1
            gen_log.debug("retrying %s %s on a new connection (%r)", self._method,
                          self._url, error)
            if conn is not None:
                conn.exchange = None
                conn.close()
            self.stream = None
            self._attempt = 1
            asyncio.ensure_future(self.run()).add_done_callback(_log_run_failure)
            return
        if not self._blocked:
            # A complete answer was delivered as it arrived; else this fails the exchange
            # (with the socket error itself when nothing at all came back), or leaves that
            # to a body producer still running (see _lost_mid_message).
            self._parse()
        # else: the parser sees the end when the streaming callback's awaitable is done

    def _parse(self) -> None:
        try:
            self._parse_inner()
        except (_MalformedResponse, httputil.HTTPInputError) as e:
            gen_log.info("Malformed HTTP response from %s: %s", self._url, e)
            message = str(e) if isinstance(e, _MalformedResponse) else "Connection closed"
            self._finish_error(HTTPStreamClosedError(message))

    def _parse_inner(self) -> None:
        buf = self._buf
        while not self._blocked and self.final_callback is not None:
            state = self._state
            if self._gzip_pending:
                self._inflate()
                continue
            if state == _FIXED:
                if not self._remaining:
                    self._message_done()
                    return
                if not buf:
                    if self._eof:
                        self._lost_mid_message()
                    return
                self._emit(self._take_counted())
            elif state == _HEAD:
                match = _HEAD_END.search(buf)
                if match is None:
                    if len(buf) > self._max_header:
                        raise _MalformedResponse("Response head larger than max_header_size")
                    if self._eof:
                        self._lost_mid_message()
                    return
                if match.end() > self._max_header:
                    raise _MalformedResponse("Response head larger than max_header_size")
                head = bytes(buf[: match.start()])
                del buf[: match.end()]
                self._on_head(head)
            elif state == _CHUNK_SIZE:
                line = self._take_line(_MAX_CHUNK_LINE, "invalid chunk size")
                if line is None:
                    return
                try:
                    size = parse_hex_int(line.decode("latin1"))
                except ValueError:
                    raise httputil.HTTPInputError("invalid chunk size") from None
                if size == 0:
                    self._state = _TRAILER
                    self._remaining = 0
                    continue
                if self._total + size > self._max_body:
                    raise _MalformedResponse(self._too_large())
                self._remaining = size
                self._state = _CHUNK_DATA
            elif state == _CHUNK_DATA:
                if not self._remaining:
                    self._state = _CHUNK_END
                    continue
                if not buf:
                    if self._eof:
                        self._lost_mid_message()
                    return
                self._emit(self._take_counted())
            elif state == _CHUNK_END:
                if len(buf) < 2:
                    if self._eof:
                        self._lost_mid_message()
                    return
                if buf[:2] != b"\r\n":
                    raise httputil.HTTPInputError("improperly terminated chunk")
                del buf[:2]
                self._state = _CHUNK_SIZE
            elif state == _TRAILER:
                line = self._take_line(_MAX_TRAILER, "trailer section too large")
                if line is None:
                    return
                if not line:  # the empty line after the last chunk (trailers are dropped)
                    self._message_done()
                    return
                self._remaining += len(line)
                if self._remaining > _MAX_TRAILER:
                    raise httputil.HTTPInputError("trailer section too large")
            else:  # _UNTIL_CLOSE
                if buf:
                    chunk = bytes(buf)
                    buf.clear()
                    if self._total + len(chunk) > self._max_body:
                        raise _MalformedResponse(self._too_large())
                    self._emit(chunk)
                    continue
                if self._eof:
                    self._message_done()
                return

    def _take_line(self, limit: int, error: str) -> bytes | None:
        """The next CRLF-terminated line (without the CRLF), or None while it is incomplete
        (having failed the exchange if the connection is over, or the line past ``limit``)."""
        buf = self._buf
        end = buf.find(b"\r\n")
        if end < 0:
            if len(buf) > limit:
                raise httputil.HTTPInputError(error)
            if self._eof:
                self._lost_mid_message()
            return None
        line = bytes(buf[:end])
        del buf[: end + 2]
        return line

    def _take_counted(self) -> bytes:
        """Up to ``_remaining`` bytes of the (non-empty) buffer, counted off."""
        buf = self._buf
        if len(buf) <= self._remaining:
            chunk = bytes(buf)
            buf.clear()
        else:
            chunk = bytes(buf[: self._remaining])
            del buf[: self._remaining]
        self._remaining -= len(chunk)
        return chunk

    def _too_large(self) -> str:
        return f"Response body larger than max_body_size ({self._max_body} bytes)"

    def _lost_mid_message(self) -> None:
        if self._producing is not None:
            # The connection ended without a complete answer while the body producer runs:
            # its next write fails (or its end finds the EOF) and that is the outcome, as
            # it always was; a producer waiting for more body (say, for a stalled client)
            # keeps its caller's own timeouts in charge.
            return
        if self._state == _HEAD and not self._got_bytes:
            # Nothing answered at all: the socket error itself, as the simple client.
            self._finish_error(StreamClosedError(real_error=self._eof_error))
        else:
            self._finish_error(HTTPStreamClosedError("Connection closed"))

    def _on_head(self, head: bytes) -> None:
        text = head.decode("latin1").lstrip("\r\n")
        eol = text.find("\n")
        if eol < 0:
            start_line_text, header_text = text, ""
        else:
            start_line_text, header_text = text[:eol].rstrip("\r"), text[eol:]
        start_line = httputil.parse_response_start_line(start_line_text)
        headers = parse_header_block(header_text)
        code = start_line.code
        if 100 <= code < 200:
            if "Content-Length" in headers or "Transfer-Encoding" in headers:
                raise httputil.HTTPInputError("Response code %d cannot have body" % code)
            self._n1xx += 1
            if self._n1xx > _MAX_1XX_RESPONSES:
                raise httputil.HTTPInputError("Too many 1xx responses")
            if self._expect_100 and code == 100 and not self._continued:
                self._send_body_after_continue()
                return
            self._headers_received(start_line, headers)
            return  # the real response follows
        self._headers_received(start_line, headers)
        if self._done:
            return
        if self._method == "HEAD" or code == 304:
            self._state, self._remaining = _FIXED, 0
            return
        length = get_field(headers, "Content-Length")
        content_length: int | None = None
        if length is not None:
            if "," in length:
                pieces = re.split(r",[ \t]*", length)
                if any(piece != pieces[0] for piece in pieces):
                    raise httputil.HTTPInputError("Multiple unequal Content-Lengths: %r" % length)
                length = headers["Content-Length"] = pieces[0]
            try:
                content_length = parse_int(length)
            except ValueError:
                raise httputil.HTTPInputError(
                    "Only integer Content-Length is allowed: %s" % length
                ) from None
            if content_length > self._max_body:
                raise _MalformedResponse(self._too_large())
        chunked = is_transfer_encoding_chunked(headers)
        if code == 204:
            if chunked or content_length not in (None, 0):
                raise httputil.HTTPInputError("Response with code %d should not have body" % code)
            content_length = 0
        if chunked:
            self._state = _CHUNK_SIZE
        elif content_length is not None:
            self._state, self._remaining = _FIXED, content_length
        else:
            self._state = _UNTIL_CLOSE
        if (self._decompress and not self._redirect
                and (get_field(headers, "Content-Encoding") or "").lower() == "gzip"):
            self._decompressor = GzipDecompressor()
            # The caller only sees decompressed data (HTTP1Connection's renaming).
            headers.add("X-Consumed-Content-Encoding", headers["Content-Encoding"])
            del headers["Content-Encoding"]

    def _headers_received(
        self, start_line: httputil.ResponseStartLine, headers: httputil.HTTPHeaders
    ) -> None:
        self.code = start_line.code
        self.reason = start_line.reason
        self.version = start_line.version
        self.headers = headers
        self._redirect = self._should_follow_redirect()
        header_callback = self._header_callback
        if header_callback is not None and not self._redirect:
            try:
                if self._head_received is not None:
                    self._head_received(start_line, headers)
                else:
                    header_callback("%s %s %s\r\n" % start_line)
                    for k, v in headers.get_all():
                        header_callback(f"{k}: {v}\r\n")
                    header_callback("\r\n")
            except Exception as e:
                self._callback_failed("header_callback", e)

    def _emit(self, chunk: bytes) -> None:
        """One piece of the body, for the caller (decompressed first if asked)."""
        self._total += len(chunk)
        if self._redirect:
            return  # the body of a redirect that is followed: nobody sees it
        if self._decompressor is not None:
            self._gzip_pending = chunk
            self._inflate()
            return
        self._deliver_piece(chunk)

    def _inflate(self) -> None:
        assert self._decompressor is not None
        data = self._gzip_pending
        try:
            piece = self._decompressor.decompress(data, _GZIP_PIECE)
        except zlib.error as e:
            raise httputil.HTTPInputError("invalid gzip data: %s" % e) from None
        tail = self._decompressor.unconsumed_tail
        if not piece and len(tail) >= len(data):
            raise httputil.HTTPInputError(
                "encountered unconsumed gzip data without making progress")
        self._gzip_pending = tail
        if piece:
            self._deliver_piece(piece)

    def _deliver_piece(self, piece: bytes) -> None:
        streaming_callback = self._streaming_callback
        if streaming_callback is None:
            if len(self.chunks) + len(piece) > self._max_body:
                raise _MalformedResponse(self._too_large())
            self.chunks += piece
            return
        try:
            ret = streaming_callback(piece)
        except Exception as e:
            self._callback_failed("streaming_callback", e)
            return
        if ret is None:
            return
        if isinstance(ret, asyncio.Future) and ret.done():
            error = ret.exception()  # also marks it retrieved
            if error is not None:
                self._callback_failed("streaming_callback", error)
            return
        # The callback's awaitable is awaited before anything more is read: that is the
        # download back-pressure a streaming proxy relies on.
        self._blocked = True
        conn = self.stream
        if conn is not None and conn.transport is not None and not conn.closed:
            conn.transport.pause_reading()
        asyncio.ensure_future(ret).add_done_callback(self._callback_done)

    def _callback_done(self, future: "asyncio.Future[Any]") -> None:
        self._blocked = False
        if future.cancelled():
            self._callback_failed("streaming_callback", asyncio.CancelledError())
            return
        error = future.exception()
        if error is not None:
            self._callback_failed("streaming_callback", error)
            return
        if self._done:
            return
        conn = self.stream
        if conn is not None and conn.transport is not None and not conn.closed:
            conn.transport.resume_reading()
        self._parse()

    def _callback_failed(self, name: str, e: BaseException) -> None:
        error = HTTPStreamClosedError(f"Request aborted by {name}: {e!r}")
        error.__cause__ = e
        self._finish_error(error)

    def _message_done(self) -> None:
        """The response is complete: answer, and pool the connection if it may be reused."""
        if self._decompressor is not None:
            try:
                self._decompressor.flush()
            except zlib.error as e:
                raise httputil.HTTPInputError("invalid gzip data: %s" % e) from None
        conn = self.stream
        assert conn is not None and self.code is not None
        if self._redirect:
            self._hand_back(conn)
            self._follow_redirect()
            return
        response = HTTPResponse(
            getattr(self._opts, "original_request", None) or self.request,
            self.code,
            reason=self.reason,
            headers=self.headers,
            request_time=self.io_loop.time() - self.start_time,
            start_time=self.start_wall_time,
            buffer=BytesIO() if self._streaming_callback else BytesIO(self.chunks),
            effective_url=self._url,
        )
        self.chunks = bytearray()
        # Pool before releasing the max_clients slot, so that a queued request started
        # by the release finds this connection idle.
        self._hand_back(conn)
        self._run_callback(response)

    def _hand_back(self, conn: _Upstream) -> None:
        """The exchange is done with ``conn``: back to the pool if reusable, else closed."""
        self.stream = None
        conn.exchange = None
        if self._reusable(conn):
            self.client._checkin(self._pool_key, conn)
        else:
            conn.close()

    def _should_follow_redirect(self) -> bool:
        opts = self._opts
        return bool(
            opts.follow_redirects
            and self.code in (301, 302, 303, 307, 308)
            and (opts.max_redirects or 0) > 0
            and self.headers is not None
            and self.headers.get("Location") is not None
        )

    def _follow_redirect(self) -> None:
        """Fetch the redirect's target and answer with that (SimpleAsyncHTTPClient's rules:
        cross-origin redirects drop credentials and cookies; 303, and 301/302 after a POST,
        become a bodiless GET; ``max_redirects`` counts down)."""
        assert self.headers is not None
        request: Any = self.request
        original = getattr(self._opts, "original_request", None) or getattr(
            request, "request", request)
        new_request = copy.copy(getattr(request, "request", request))
        new_request.url = urllib.parse.urljoin(self._url, self.headers["Location"])
        new_request.headers = self._req_headers.copy()
        old_url = urllib.parse.urlsplit(original.url)
        new_url = urllib.parse.urlsplit(new_request.url)
        if old_url.scheme != new_url.scheme or old_url.netloc != new_url.netloc:
            new_request.auth_username = None
            new_request.auth_password = None
            if "@" in new_url.netloc:
                host = new_url.hostname or ""
                netloc = host if new_url.port is None else "%s:%d" % (host, new_url.port)
                new_request.url = urllib.parse.urlunsplit(new_url._replace(netloc=netloc))
            for name in ("Authorization", "Cookie"):
                new_request.headers.pop(name, None)
        new_request.max_redirects = (self._opts.max_redirects or 0) - 1
        new_request.headers.pop("Host", None)
        if (self.code == 303 and self._method != "HEAD") or (
            self.code in (301, 302) and self._method == "POST"
        ):
            new_request.method = "GET"
            new_request.body = None
            new_request.body_producer = None
            for name in ("Content-Length", "Content-Type", "Content-Encoding",
                         "Transfer-Encoding"):
                new_request.headers.pop(name, None)
        new_request.original_request = original
        final_callback, self.final_callback = self.final_callback, None
        self._stop_producer()
        self._release()
        start = self.start_wall_time
        began = self.start_time

        def on_redirect_done(future: "Future[HTTPResponse]") -> None:
            try:
                response = future.result()
            except Exception as e:  # e.g. a Location with an unsupported scheme
                response = HTTPResponse(new_request, 599, error=e, start_time=start,
                                        request_time=self.io_loop.time() - began)
            if final_callback is not None:
                final_callback(response)

        self.client.fetch(new_request, raise_error=False).add_done_callback(on_redirect_done)

    def _reusable(self, conn: _Upstream) -> bool:
        """May ``conn`` carry another request after this complete exchange?"""
        assert self.headers is not None and self.code is not None
        if conn.closed or self._eof or not self._body_sent or self._buf:
            return False
        if self._state == _UNTIL_CLOSE:
            return False  # the end of the body was found by EOF, not by framing
        if "close" in _header_tokens(get_field(self._req_headers, "Connection")):
            return False
        tokens = _header_tokens(get_field(self.headers, "Connection"))
        if self.version == "HTTP/1.1":
            return "close" not in tokens
        if self.version == "HTTP/1.0":
            return "keep-alive" in tokens
        return False
