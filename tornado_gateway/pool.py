"""Upstream HTTP client with a keep-alive connection pool.

Tornado's ``SimpleAsyncHTTPClient`` sends ``Connection: close`` on every request, so a
proxy built on it pays a TCP connect (and the backend an accept) per request: measured at
~0.55x of direct throughput for a tiny GET. :class:`KeepAliveHTTPClient` is a drop-in
``AsyncHTTPClient`` implementation built on the same pieces (``TCPClient`` +
``HTTP1Connection``) that keeps upstream connections open and reuses them.

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
queueing beyond ``max_clients``). Redirects are *not* followed (a proxy passes them on);
a request with ``follow_redirects=True`` gets the 3xx response as is.

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
new connection (never on another idle one), but only when that cannot duplicate an effect: the method is idempotent
(GET, HEAD, OPTIONS, PUT, DELETE, TRACE) and the body is not a ``body_producer`` (a
producer cannot be replayed). POST/PATCH and streamed bodies fail with the error.

Aborting a request (client went away)
-------------------------------------
Either cancel the future returned by :meth:`fetch` (``future.cancel()``, or cancel the
asyncio task awaiting it), or let the ``streaming_callback`` / ``header_callback``
raise (or return an awaitable that raises). Both close the upstream socket at once; it is
never pooled. A raising callback makes the fetch fail with ``HTTPStreamClosedError``
(599, like the simple client), the callback's exception as ``__cause__``. A body
producer that raises also closes the socket.

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
import functools
import re
import socket
import time
import urllib.parse
from collections.abc import Awaitable, Callable
from io import BytesIO
from typing import Any, Optional

from tornado import httputil, version
from tornado.concurrent import Future
from tornado.escape import _unicode
from tornado.http1connection import HTTP1Connection, HTTP1ConnectionParameters
from tornado.httpclient import AsyncHTTPClient, HTTPRequest, HTTPResponse
from tornado.ioloop import IOLoop
from tornado.iostream import IOStream, SSLIOStream, StreamClosedError
from tornado.log import app_log, gen_log
from tornado.netutil import OverrideResolver, Resolver, is_valid_ip
from tornado.simple_httpclient import (
    HTTPStreamClosedError,
    HTTPTimeoutError,
    _HTTPConnection,
)
from tornado.tcpclient import TCPClient

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
        # Idle (stream, IOLoop time it became idle) per pool key. The right end is the
        # most recently used: LIFO reuse keeps few connections hot and lets the others
        # time out, and the left end is always the first to expire.
        self._idle: dict[_PoolKey, collections.deque[tuple[IOStream, float]]] = {}
        # One timer for the whole pool (not one per idle stream, which would be two
        # timer operations per request): it fires when the oldest idle stream expires.
        self._sweeper: object = None
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
        if hostname_mapping is not None:
            self.resolver = OverrideResolver(
                resolver=self.resolver, mapping=hostname_mapping
            )
        self.tcp_client = TCPClient(resolver=self.resolver)

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
        future = super().fetch(request, raise_error=raise_error, **kwargs)
        key = self._last_key
        self._last_key = None
        if key is not None and not future.done():
            future.add_done_callback(functools.partial(self._on_future_done, key))
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
                stream, _since = dq.pop()
                stream.set_close_callback(None)
                stream.close()
        self._idle.clear()
        if self._sweeper is not None:
            self.io_loop.remove_timeout(self._sweeper)
            self._sweeper = None
        if self.own_resolver:
            self.resolver.close()
        self.tcp_client.close()

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

    # ------------------------------------------------------------------ the pool

    def _checkout(self, key: _PoolKey) -> IOStream | None:
        """An idle, apparently live stream for ``key``, or None."""
        dq = self._idle.get(key)
        while dq:
            stream, since = dq.pop()
            stream.set_close_callback(None)
            if (
                self.io_loop.time() - since < self.idle_timeout
                and self._stream_alive(stream)
            ):
                self.stats["reused"] += 1
                return stream
            self.stats["dead_on_checkout"] += 1
            stream.close()
        return None

    @staticmethod
    def _stream_alive(stream: IOStream) -> bool:
        if stream.closed():
            return False
        # Bytes received while idle (e.g. a "408 Request Timeout" sent before the
        # server closes) would otherwise be read as the next request's response.
        if getattr(stream, "_read_buffer_size", 0):
            return False
        if isinstance(stream, SSLIOStream):
            # MSG_PEEK is not available on TLS sockets; the close callback registered
            # while idle catches most closes.
            return True
        # The close callback runs only when the IOLoop gets to the socket's event; a
        # FIN that arrived just now is seen by peeking (non-blocking).
        try:
            stream.socket.recv(1, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            return True
        except OSError:
            return False
        # b"" is EOF; any data is unsolicited: either way the stream is unusable.
        return False

    def _checkin(self, key: _PoolKey, stream: IOStream) -> None:
        """Keep ``stream`` idle for reuse, or close it if the pool can't take it."""
        if self._pool_closed or self.max_idle_per_host <= 0 or stream.closed():
            stream.close()
            return
        dq = self._idle.setdefault(key, collections.deque())
        while len(dq) >= self.max_idle_per_host:
            old, _since = dq.popleft()
            old.set_close_callback(None)
            old.close()
        now = self.io_loop.time()
        dq.append((stream, now))
        if self._sweeper is None:
            self._sweeper = self.io_loop.call_at(now + self.idle_timeout, self._sweep)
        # With a close callback the stream watches the socket while idle, so a server
        # closing it is noticed and the stream leaves the pool.
        stream.set_close_callback(functools.partial(self._discard_idle, key, stream))
        self.stats["pooled"] += 1

    def _discard_idle(self, key: _PoolKey, stream: IOStream) -> None:
        dq = self._idle.get(key)
        if not dq:
            return
        for item in dq:
            if item[0] is stream:
                dq.remove(item)
                break
        if not dq:
            self._idle.pop(key, None)
        stream.set_close_callback(None)
        stream.close()

    def _sweep(self) -> None:
        """Close streams idle for ``idle_timeout``; re-arm for the next to expire."""
        self._sweeper = None
        now = self.io_loop.time()
        next_due: float | None = None
        for key in list(self._idle):
            dq = self._idle[key]
            while dq and now - dq[0][1] >= self.idle_timeout:
                stream, _since = dq.popleft()
                stream.set_close_callback(None)
                stream.close()
                self.stats["idle_timeout"] += 1
            if dq:
                due = dq[0][1] + self.idle_timeout
                next_due = due if next_due is None else min(next_due, due)
            else:
                del self._idle[key]
        if next_due is not None:
            self._sweeper = self.io_loop.call_at(next_due, self._sweep)


def _nodelay_pinned(value: bool) -> None:
    """``set_nodelay`` of a pooled stream: TCP_NODELAY stays on (set once in _connect)."""


def _log_run_failure(task: "asyncio.Future[None]") -> None:
    # run() turns every Exception into the request's answer; anything else is a bug.
    if not task.cancelled() and task.exception() is not None:
        app_log.error("Exception in KeepAliveHTTPClient request", exc_info=task.exception())


class _PooledConnection(httputil.HTTPMessageDelegate):
    """One request: get a stream (pooled or new), exchange, then pool or close it."""

    def __init__(
        self,
        client: KeepAliveHTTPClient,
        request: HTTPRequest,
        release_callback: Callable[[], None],
        final_callback: Callable[[HTTPResponse], None],
        start_time: float,
    ) -> None:
        self.io_loop = IOLoop.current()
        self.client = client
        self.request = request
        # IOLoop time of fetch(): time spent in the max_clients queue counts against
        # request_timeout, as AsyncHTTPClient documents.
        self.start_time = start_time
        self.start_wall_time = time.time()
        # Resolved once: every attribute read on the _RequestProxy costs a lookup on
        # the request and then on the defaults, and the hot path reads these often.
        self._method: str = request.method
        self._url: str = request.url
        self._req_headers: httputil.HTTPHeaders = request.headers
        self._body: bytes | None = request.body
        self._body_producer = request.body_producer
        self._streaming_callback = request.streaming_callback
        self._header_callback = request.header_callback
        # A header_callback with a ``head_received(start_line, headers)`` method gets the
        # parsed head in one call instead of one formatted line per header, which it would
        # only parse again (the gateway's proxy does this).
        self._head_received = getattr(self._header_callback, "head_received", None)
        self._expect_100 = bool(request.expect_100_continue)
        self._decompress = bool(request.decompress_response)
        self.release_callback: Callable[[], None] | None = release_callback
        self.final_callback: Callable[[HTTPResponse], None] | None = final_callback
        self.stream: IOStream | None = None
        self.connection: HTTP1Connection | None = None
        self._timeout: object = None
        self._reset_exchange()

    def _reset_exchange(self) -> None:
        self.code: int | None = None
        self.reason: str | None = None
        self.headers: httputil.HTTPHeaders | None = None
        self.version: str | None = None
        self.chunks = bytearray()
        self._response_started = False
        self._body_sent = False
        self._complete = False
        self._received = 0
        self._error: BaseException | None = None

    # ---------------------------------------------------------------- lifecycle

    def start(self) -> None:
        request_timeout = self.request.request_timeout
        if request_timeout:
            self._timeout = self.io_loop.add_timeout(
                self.start_time + request_timeout,
                functools.partial(self._on_timeout, "during request"),
            )
        # A task with its own done callback: IOLoop.add_future would add a loop iteration
        # per request just to look at the result.
        asyncio.ensure_future(self.run()).add_done_callback(_log_run_failure)

    def abort(self) -> None:
        """Stop now without answering: close the stream (never pooled), free the slot."""
        self.final_callback = None
        if self.stream is not None:
            self.stream.close()
        self._remove_timeout()
        self._release()

    def _on_timeout(self, info: str) -> None:
        self._timeout = None
        self._finish_error(HTTPTimeoutError(f"Timeout {info}"))

    def _remove_timeout(self) -> None:
        if self._timeout is not None:
            self.io_loop.remove_timeout(self._timeout)
            self._timeout = None

    def _release(self) -> None:
        if self.release_callback is not None:
            release_callback = self.release_callback
            self.release_callback = None
            release_callback()

    def _run_callback(self, response: HTTPResponse) -> None:
        self._remove_timeout()
        self._release()
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

    async def run(self) -> None:
        try:
            await self._run()
        except Exception as e:
            if self._done:
                # Already answered (timeout, abort): the stream was closed under
                # the exchange, which is what raised here.
                if self.stream is not None:
                    self.stream.close()
                if not isinstance(e, (StreamClosedError, HTTPStreamClosedError)):
                    gen_log.debug("error after request finished", exc_info=True)
                return
            self._finish_error(e)

    async def _run(self) -> None:
        request = self.request
        parsed = urllib.parse.urlsplit(_unicode(self._url))
        if parsed.scheme not in ("http", "https"):
            raise ValueError("Unsupported url scheme: %s" % self._url)
        netloc = parsed.netloc
        if "@" in netloc:
            _userpass, _, netloc = netloc.rpartition("@")
        host, port = httputil.split_host_and_port(netloc)
        if port is None:
            port = 443 if parsed.scheme == "https" else 80
        if re.match(r"^\[.*\]$", host):
            host = host[1:-1]
        self.parsed = parsed
        self.parsed_hostname = host
        af = socket.AF_INET if request.allow_ipv6 is False else socket.AF_UNSPEC
        ssl_options = None
        tls_key = None
        if parsed.scheme == "https":
            # Reuse the simple client's TLS defaults (shared default context, or one
            # built from validate_cert / ca_certs / client_cert).
            ssl_options = _HTTPConnection._get_ssl_options(self, "https")  # type: ignore[arg-type]
            tls_key = (
                request.validate_cert,
                request.ca_certs,
                request.client_cert,
                request.client_key,
                id(request.ssl_options) if request.ssl_options is not None else None,
            )
        source_ip = None
        if request.network_interface:
            if is_valid_ip(request.network_interface):
                source_ip = request.network_interface
            else:
                raise ValueError(
                    "Unrecognized IPv4 or IPv6 address for network_interface, got %r"
                    % (request.network_interface,)
                )
        pool_key = (parsed.scheme, host, port, af, source_ip, tls_key)
        self._prepare_headers(parsed)
        req_path = (parsed.path or "/") + (("?" + parsed.query) if parsed.query else "")
        start_line = httputil.RequestStartLine(self._method, req_path, "")
        may_retry = (
            self._method in IDEMPOTENT_METHODS
            and self._body_producer is None
            and not self._expect_100
        )

        for attempt in (0, 1):
            # The retry always uses a new connection: other idle ones may be just as
            # dead (the server restarted, or timed them all out at once).
            stream = self.client._checkout(pool_key) if attempt == 0 else None
            reused = stream is not None
            if stream is None:
                stream = await self._connect(host, port, af, ssl_options, source_ip)
                if stream is None:
                    return  # finished while connecting (timeout/abort)
                self.client.stats["connected"] += 1
            self.stream = stream
            self._reset_exchange()
            try:
                await self._exchange(stream, start_line)
            except StreamClosedError as e:
                if self._done:
                    raise
                stream.close()
                if self._error is not None:
                    raise self._error from e
                if (
                    attempt == 0
                    and reused
                    and may_retry
                    and not self._response_started
                    # not even part of a status line: the server answered nothing
                    and not getattr(stream, "_read_buffer_size", 0)
                ):
                    # A pooled connection the server had closed: nothing of the
                    # response arrived and the request is idempotent and replayable.
                    self.client.stats["retried"] += 1
                    gen_log.debug("retrying %s %s on a new connection (%r)",
                                  self._method, self._url, e)
                    continue
                raise
            if self._done:
                stream.close()
                return
            if self._error is not None:
                raise self._error
            if not self._complete:
                raise HTTPStreamClosedError("Connection closed")
            self._deliver(stream, pool_key)
            return

    async def _connect(
        self, host: str, port: int, af: int, ssl_options: Any, source_ip: str | None
    ) -> IOStream | None:
        req = self.request
        if req.connect_timeout and req.request_timeout:
            timeout = min(req.connect_timeout, req.request_timeout)
        else:
            timeout = req.connect_timeout or req.request_timeout or 0
        try:
            stream = await self.client.tcp_client.connect(
                host,
                port,
                af=af,
                ssl_options=ssl_options,
                max_buffer_size=self.client.max_buffer_size,
                source_ip=source_ip,
                timeout=(
                    self.start_time + timeout - self.io_loop.time() if timeout else None
                ),
            )
        except TimeoutError as e:
            raise HTTPTimeoutError(str(e) or "Timeout while connecting") from None
        if self._done:
            stream.close()
            return None
        # Upstream writes are whole request heads and body chunks: none should wait for
        # Nagle + delayed ACK. HTTP1Connection turns TCP_NODELAY on and off again around
        # every message (three setsockopt calls per request, each a Python call chain and a
        # system call); set it once for the connection's life and make those calls no-ops.
        stream.set_nodelay(True)
        stream.set_nodelay = _nodelay_pinned  # type: ignore[method-assign]
        return stream

    def _prepare_headers(self, parsed: urllib.parse.SplitResult) -> None:
        """Fill in request headers as the simple client does, minus ``Connection``."""
        request = self.request
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
        elif headers.get("User-Agent") is None:
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

    async def _exchange(
        self, stream: IOStream, start_line: httputil.RequestStartLine
    ) -> None:
        # TCP_NODELAY is on for the whole life of the connection (see _connect).
        self.connection = HTTP1Connection(
            stream,
            True,
            HTTP1ConnectionParameters(
                no_keep_alive=False,
                max_header_size=self.client.max_header_size,
                max_body_size=self.client.max_body_size,
                decompress=self._decompress,
            ),
            None,
        )
        self.connection.write_headers(start_line, self._req_headers)
        if self._expect_100:
            await self.connection.read_response(self)
        else:
            await self._write_body()
            await self.connection.read_response(self)

    async def _write_body(self) -> None:
        assert self.connection is not None
        if self._body is not None:
            self.connection.write(self._body)
        elif self._body_producer is not None:
            fut = self._body_producer(self.connection.write)
            if fut is not None:
                await fut
        if self._done:
            return
        self.connection.finish()
        self._body_sent = True

    def _reusable(self, stream: IOStream) -> bool:
        """May ``stream`` carry another request after this complete exchange?"""
        assert self.headers is not None and self.code is not None
        if stream.closed() or not self._body_sent or getattr(
            stream, "_read_buffer_size", 0
        ):
            return False
        if "close" in _header_tokens(self._req_headers.get("Connection")):
            return False
        tokens = _header_tokens(self.headers.get("Connection"))
        if self.version == "HTTP/1.1":
            if "close" in tokens:
                return False
        elif self.version == "HTTP/1.0":
            if "keep-alive" not in tokens:
                return False
        else:
            return False
        # The end of the body must have been found by framing, not by EOF.
        return (
            self._method == "HEAD"
            or self.code in (204, 304)
            or "Content-Length" in self.headers
            or "chunked" in _header_tokens(self.headers.get("Transfer-Encoding"))
        )

    def _deliver(self, stream: IOStream, pool_key: _PoolKey) -> None:
        assert self.code is not None
        response = HTTPResponse(
            self.request,
            self.code,
            reason=self.reason,
            headers=self.headers,
            request_time=self.io_loop.time() - self.start_time,
            start_time=self.start_wall_time,
            buffer=BytesIO() if self._streaming_callback else BytesIO(self.chunks),
            effective_url=self._url,
        )
        self.chunks = bytearray()
        self.stream = None
        # Pool before releasing the max_clients slot, so that a queued request started
        # by the release finds this connection idle.
        if self._reusable(stream):
            # Cut this exchange's HTTP1Connection off the stream: a caller holding it
            # (e.g. through the ``write`` given to its body_producer) must not be able
            # to write to or close a stream that now serves other requests.
            if self.connection is not None:
                self.connection.detach()
                self.connection = None
            self.client._checkin(pool_key, stream)
        else:
            stream.close()
        self._run_callback(response)

    # ------------------------------------------------------ HTTPMessageDelegate API

    async def headers_received(  # type: ignore[override]
        self,
        first_line: httputil.ResponseStartLine | httputil.RequestStartLine,
        headers: httputil.HTTPHeaders,
    ) -> None:
        assert isinstance(first_line, httputil.ResponseStartLine)
        self._response_started = True
        if self._done:
            return
        if self._expect_100 and first_line.code == 100:
            await self._write_body()
            return
        self.code = first_line.code
        self.reason = first_line.reason
        self.version = first_line.version
        self.headers = headers
        header_callback = self._header_callback
        if header_callback is not None:
            try:
                if self._head_received is not None:
                    self._head_received(first_line, headers)
                else:
                    header_callback("%s %s %s\r\n" % first_line)
                    for k, v in headers.get_all():
                        header_callback(f"{k}: {v}\r\n")
                    header_callback("\r\n")
            except Exception as e:
                self._callback_failed("header_callback", e)

    def data_received(self, chunk: bytes) -> Optional[Awaitable[None]]:
        if self._done:
            return None
        self._received += len(chunk)
        streaming_callback = self._streaming_callback
        if streaming_callback is None:
            self.chunks += chunk
            return None
        try:
            ret = streaming_callback(chunk)
        except Exception as e:
            self._callback_failed("streaming_callback", e)
            return None
        if ret is not None:
            # The callback's awaitable is awaited before the next read: that is the
            # download back-pressure a streaming proxy relies on.
            return self._await_callback(ret)
        return None

    async def _await_callback(self, ret: Awaitable[None]) -> None:
        try:
            await ret
        except Exception as e:
            self._callback_failed("streaming_callback", e)

    def _callback_failed(self, name: str, e: BaseException) -> None:
        error = HTTPStreamClosedError(f"Request aborted by {name}: {e!r}")
        error.__cause__ = e
        self._finish_error(error)

    def finish(self) -> None:
        self._complete = True

    def on_connection_close(self) -> None:
        # Called by HTTP1Connection when the message ends abnormally (stream closed
        # mid-body, malformed response, body over max_body_size).
        if self._error is None and not self._complete:
            max_body = self.client.max_body_size or self.client.max_buffer_size
            try:
                declared = int(self.headers.get("Content-Length", "0")) if self.headers else 0
            except ValueError:
                declared = 0
            if declared > max_body:
                self._error = HTTPStreamClosedError(
                    f"Response body larger than max_body_size ({max_body} bytes)"
                )
            else:
                self._error = HTTPStreamClosedError("Connection closed")
