"""The proxy's upstream HTTP client: a keep-alive pool whose responses llhttp parses.

:class:`UpstreamHTTPClient` is an ``AsyncHTTPClient`` implementation made for what the gateway's
proxy does with its upstream (the Flask child, or an external backend over http or https):
stream a request body up and a response body down, both with back-pressure, over connections
that are kept open and reused. Tornado's ``SimpleAsyncHTTPClient`` sends ``Connection: close``
on every request, so a proxy built on it pays a TCP connect (and the backend an accept) per
request.

What it owns
------------
* The connections: asyncio protocols (under asyncio's loop or uvloop's), TCP_NODELAY on every
  upstream socket (a request goes out as several writes: with Nagle's algorithm the last
  piece of an upload waited for the server's delayed ACK), TLS for ``https``.
* The request head: the caller's headers as given (``str`` values, or ``bytes`` values sent
  byte for byte, i.e. decoded as Latin-1, the encoding the head is written in), plus only what
  the wire needs: ``Host`` when absent, the body framing (``Content-Length`` of a body in hand;
  ``Transfer-Encoding: chunked`` for a streamed body without a length; ``Content-Length: 0`` for
  a POST, PUT or PATCH without a body: :func:`~.framing.request_body_framing`), ``Expect`` when
  ``expect_100_continue`` asks for it, and ``User-Agent`` only when the ``user_agent`` option
  names one. It invents no header: no User-Agent, no Content-Type, no Accept-Encoding.
* Response parsing: **all of it is llhttp's** (``httptools.HttpResponseParser``, strict, as it
  comes): status line, header fields, Content-Length and chunked bodies (trailers dropped).
  What llhttp refuses fails the exchange as a malformed response: bare CRs, a repeated or
  list-valued Content-Length, Content-Length with Transfer-Encoding, obsolete line folding,
  control characters. Left to this module, with the rules in :mod:`.framing`: a response to
  HEAD ends with its head (llhttp cannot be told it answers a HEAD; a fresh parser serves each
  exchange, there is no pipelining); a body that ends with the connection ends at its EOF
  (llhttp never ends it); 1xx interim responses are skipped, at most 10 (their heads reach a
  ``header_callback``); a 204 announcing a body and a 1xx with body headers are refused; the
  limits ``max_header_size`` and ``max_body_size`` (on the bytes received).
* Streaming both ways with back-pressure. Down: an awaitable returned by ``streaming_callback``
  is awaited before the next piece is delivered; meanwhile the transport stops reading
  (``pause_reading``), and the pieces llhttp already parsed from the last read wait in order.
  Up: the ``write`` given to ``body_producer`` returns a future that resolves once the
  transport's buffer is below its high-water mark again.
* The pool: idle connections per (scheme, host, port, address family, source address, TLS
  settings), reused most-recent first, closed after ``idle_timeout``; ``max_clients``
  concurrent requests, more are queued (a queued request waits at most its connect or request
  timeout); ``connect_timeout`` (resolving, connecting, TLS handshake) and ``request_timeout``
  (from :meth:`fetch`, queueing included); cancellation.

Not supported, on purpose (the proxy forwards exchanges, it does not browse)
----------------------------------------------------------------------------
* Redirects: ``follow_redirects`` and ``max_redirects`` are **ignored**; a 3xx answer is the
  response, as a proxy must pass it on. (``follow_redirects`` is on in ``HTTPRequest``'s
  defaults, so refusing it would refuse every request that did not say otherwise.)
* Decompression: ``decompress_response`` (``use_gzip``) is **ignored**; no ``Accept-Encoding``
  is sent, and the body is delivered as received, ``Content-Encoding`` and all.
* Authentication: ``auth_username`` (with ``auth_password``, ``auth_mode``) and credentials in
  the URL (``http://user:pass@host/``) are **refused** with a ``ValueError`` (silently dropping
  credentials would send an unauthenticated request); send an ``Authorization`` header instead.
* HTTP proxies (``proxy_host`` and the other ``proxy_*`` options) are refused with
  ``NotImplementedError``, as ``SimpleAsyncHTTPClient`` does; curl-only options
  (``prepare_curl_callback``...) are ignored, as it does.

Select it by configuration::

    AsyncHTTPClient.configure(
        "tornado_gateway.http.client.UpstreamHTTPClient",
        max_clients=64,            # concurrent requests; more are queued
        max_body_size=2 << 30,     # largest accepted response body (also when streaming)
        max_idle_per_host=64,      # idle connections kept per (scheme, host, port)
        idle_timeout=4.0,          # seconds an idle connection is kept; keep this below
                                   # the backend's own keep-alive timeout
    )

Errors follow ``SimpleAsyncHTTPClient``: with ``raise_error=False`` still raised when no HTTP
answer was had (the socket error itself, e.g. ``ConnectionRefusedError``;
``HTTPStreamClosedError`` (599) for a connection that closed early or a malformed response;
``HTTPTimeoutError`` (599) for ``connect_timeout``/``request_timeout``;
``UnsatisfiableReadError`` for a head over ``max_header_size``). A malformed response is logged
at INFO in the simple client's words (``Malformed HTTP message from None: <reason>``, then the
URL), so that log filters written for one client work for the other.

Connection reuse
----------------
A connection goes back to the idle pool only when the exchange ended cleanly: the request
body was sent, the response was read to its end with known framing (Content-Length, chunked,
or no body by definition), llhttp's keep-alive verdict holds (HTTP/1.1 without
``Connection: close``, HTTP/1.0 with ``Connection: keep-alive``), the request did not say
``Connection: close``, nothing followed the response, and the request was neither timed out
nor aborted. Everything else closes the socket.

An idle connection is checked before reuse (closed flag, and a non-blocking ``MSG_PEEK`` for an
EOF the loop has not read yet); while idle its transport keeps reading, so a server closing it
or sending anything takes it out of the pool. If a reused connection still turns out dead (it
closes before any byte of a response arrived), the request is retried once on a new
connection, but only when that cannot duplicate an effect: an idempotent method (GET, HEAD,
OPTIONS, PUT, DELETE, TRACE) and no ``body_producer``. POST/PATCH and streamed bodies fail with
the error: the race no HTTP/1.1 client can win for them, which is why ``idle_timeout`` should
stay below the server's own keep-alive timeout.

Answers that come before the request body is sent
-------------------------------------------------
The response is parsed while the request body is still going out, as it arrives: a server may
answer early (waitress answers 413 to a body over its limit as soon as it has read the head)
and close. Head and body reach the callbacks at once, while the upload goes on; once that
answer is complete it is the request's answer, the body producer is cancelled (its ``write``
fails from then on) and the connection is closed, never pooled. A complete answer wins over the
upload's write error: when a write fails (``EPIPE``, reset) before the loop read what the
server had sent, the bytes still in the socket are read and parsed before the error counts.
A connection that ends without a complete answer while the producer runs fails the request
when the producer next writes, or when it ends.

Aborting a request (client went away)
-------------------------------------
Cancel the future returned by :meth:`fetch` (or the task awaiting it), or let the
``streaming_callback`` / ``header_callback`` raise (or return an awaitable that fails). Both
close the upstream socket at once; it is never pooled. A raising callback is logged as an
uncaught exception (on ``tornado.application``) and makes the fetch fail with
``HTTPStreamClosedError`` (599), the callback's exception as ``__cause__``. A body producer that
raises also closes the socket; one still running when its exchange ends is cancelled.

Parsed head
-----------
A ``header_callback`` object with a ``head_received(start_line, headers)`` method is given the
parsed head in that one call instead of the raw lines (other callbacks are called with lines,
as by every ``AsyncHTTPClient``): a caller that would parse the lines again saves that work.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import heapq
import itertools
import os
import select
import socket
import ssl
import time
import urllib.parse
from collections.abc import Callable
from io import BytesIO
from typing import Any

from httptools import (HttpParserCallbackError, HttpParserError, HttpParserUpgrade,
                       HttpResponseParser)
from tornado import httputil
from tornado.concurrent import (
    Future,
    future_set_exception_unless_cancelled,
    future_set_result_unless_cancelled,
)
from tornado.escape import _unicode
from tornado.httpclient import AsyncHTTPClient, HTTPRequest, HTTPResponse, _RequestProxy
from tornado.iostream import StreamClosedError, UnsatisfiableReadError
from tornado.log import app_log, gen_log
from tornado.netutil import (OverrideResolver, Resolver, _client_ssl_defaults, is_valid_ip,
                             ssl_options_to_context)
from tornado.simple_httpclient import HTTPStreamClosedError, HTTPTimeoutError

from .framing import (Framing, connection_tokens, request_body_framing,
                      upstream_response_error, upstream_response_framing)
from .headers import copy_headers, fields, get_field, headers_from_fields

__all__ = ["UpstreamHTTPClient", "HTTPStreamClosedError", "HTTPTimeoutError"]

#: Methods whose repetition has no additional effect (RFC 9110 9.2.2); only these are
#: retried after a reused connection was found dead.
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})
_SUPPORTED_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"})
_PROXY_OPTIONS = ("proxy_host", "proxy_port", "proxy_username", "proxy_password",
                  "proxy_auth_mode")

_PoolKey = tuple  # (scheme, host, port, address family, source ip, tls settings)

#: Interim (1xx) responses accepted before the real one (as Tornado's clients).
_MAX_1XX_RESPONSES = 10
#: Default limit of a response head (status line and fields), as Tornado's clients.
_DEFAULT_MAX_HEADER = 65536
#: What _Upstream.alive() asks poll() about: readable (data or EOF), the peer's half-close,
#: errors and hang-ups (the last two are always reported). 0 where there is no poll().
_POLL_FLAGS = (select.POLLIN | getattr(select, "POLLRDHUP", 0) | select.POLLERR
               | select.POLLHUP) if hasattr(select, "poll") else 0
#: Most bytes read from a socket whose transport failed (see _Upstream._salvage).
_SALVAGE_LIMIT = 4 << 20
_HTTP_VERSIONS = {"1.1": "HTTP/1.1", "1.0": "HTTP/1.0"}

#: llhttp's reasons for refusing a head, in the words Tornado's clients use for the same thing.
_TORNADO_WORDS = {
    "Content-Length can't be present with Transfer-Encoding":
        "Message with both Transfer-Encoding and Content-Length",
    "Transfer-Encoding can't be present with Content-Length":
        "Message with both Transfer-Encoding and Content-Length",
    "Unexpected whitespace after header value":
        "header line cannot start with whitespace, folding not supported",
}

#: Header field names as llhttp hands them over -> HTTPHeaders' normalized form.
_NAMES: dict[bytes, str] = {}


def _normalized(name: bytes) -> str:
    norm = _NAMES.get(name)
    if norm is None:
        norm = "-".join(w.capitalize() for w in name.decode("latin-1").split("-"))
        if len(_NAMES) < 1000:
            _NAMES[name] = norm
    return norm


#: netloc -> httputil.split_host_and_port(netloc): a regular expression per request for the
#: same few upstream addresses otherwise.
_NETLOCS: dict[str, tuple[str, int | None]] = {}


def _split_netloc(netloc: str) -> tuple[str, int | None]:
    split = _NETLOCS.get(netloc)
    if split is None:
        split = httputil.split_host_and_port(netloc)
        if len(_NETLOCS) < 256:
            _NETLOCS[netloc] = split
    return split


class _Stop(Exception):
    """Raised in a parser callback to stop parsing: the exchange is already decided."""


class _Malformed(Exception):
    """The response broke HTTP/1.1 framing or a limit: the exchange fails with it.

    ``args``: the reason (in the words of Tornado's clients where they have some), and an
    optional detail for the error message."""


class _HeadTooLarge(Exception):
    """The response head is larger than ``max_header_size``."""


class UpstreamHTTPClient(AsyncHTTPClient):
    """``AsyncHTTPClient`` for the proxy's upstream: keep-alive pool, llhttp parsing.

    Constructor / ``configure()`` options (those of ``SimpleAsyncHTTPClient`` that apply:
    ``max_clients``, ``hostname_mapping``, ``max_buffer_size`` (the default of
    ``max_body_size``), ``resolver``, ``defaults``, ``max_header_size``, ``max_body_size``),
    and:

    ``max_idle_per_host``
        Idle connections kept per pool key; default ``max_clients``. When the pool is full
        the oldest idle connection is closed.
    ``idle_timeout``
        Seconds an idle connection is kept before it is closed (default 4.0). Keep it below
        the backend's keep-alive timeout, so that the proxy, not the backend, closes idle
        connections and the race "request sent on a connection the backend is closing"
        (fatal for a POST) stays rare.
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
        self.active: dict[object, _Exchange] = {}
        # key -> (request, callback, queue timeout handle, IOLoop time of fetch())
        self.waiting: dict[
            object, tuple[HTTPRequest, Callable[[HTTPResponse], None], object, float]
        ] = {}
        # Idle (connection, IOLoop time it became idle) per pool key. The right end is the
        # most recently used: LIFO reuse keeps few connections hot and lets the others time
        # out, and the left end is always the first to expire.
        self._idle: dict[_PoolKey, collections.deque[tuple[_Upstream, float]]] = {}
        # One timer for the whole pool (not one per idle connection, which would be two
        # timer operations per request): it fires when the oldest idle connection expires.
        self._sweeper: object = None
        # request_timeout deadlines of started requests, (deadline, seq, [exchange]) in a heap
        # watched by one loop timer (see _watch_deadline).
        self._deadlines: list[tuple[float, int, list[Any]]] = []
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

        Cancelling the returned future aborts the request: it leaves the queue, or its
        upstream connection is closed (never pooled) and its ``max_clients`` slot freed.
        """
        # AsyncHTTPClient.fetch() as Tornado writes it, except that the request's headers are
        # copied without validating every field again (HTTPHeaders checked them when they
        # were added): the copy protects the caller's object from the Host... added here.
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

        proxy = _RequestProxy(request, self.defaults)
        self.fetch_impl(proxy, handle_response)  # type: ignore[arg-type]
        key = self._last_key
        self._last_key = None
        if key is not None and not future.done():
            watch = functools.partial(self._on_future_done, key)
            future.add_done_callback(watch)
            running = self.active.get(key)
            if running is not None:
                # Taken off again when the answer is delivered: a done callback left on the
                # future would cost a loop callback per request only to see it was not
                # cancelled.
                running._cancel_watch = (future, watch)
        return future

    def close(self) -> None:
        """Close all idle connections and release the resolver.

        Requests in flight complete, but their connections are closed afterwards instead of
        being pooled.
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
            # A free slot and nobody waiting: start at once, what _process_queue() would do
            # with this request right away (without the queue and timeout bookkeeping).
            self._start(key, request, callback, self.io_loop.time())
            return
        self.queue.append((key, request, callback))
        timeout_handle = None
        if len(self.active) >= self.max_clients:
            # As the simple client: a queued request waits at most its connect or request
            # timeout (the smaller non-zero one).
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
        exchange = _Exchange(self, request, functools.partial(self._release_fetch, key),
                             callback, queued_at)
        self.active[key] = exchange
        exchange.start()

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
        response = HTTPResponse(request, 599, error=error,
                                request_time=self.io_loop.time() - queued_at)
        self.io_loop.add_callback(callback, response)

    def _on_queue_timeout(self, key: object) -> None:
        if key in self.waiting:
            self._drop_queued(key, HTTPTimeoutError("Timeout in request queue"))

    def _on_future_done(self, key: object, future: Future[HTTPResponse]) -> None:
        if not future.cancelled():
            return
        # The caller gave up (e.g. its own client disconnected): free everything now. Nobody
        # is waiting for an answer, so none is sent.
        if key in self.waiting:
            self._drop_queued(key, None)
        exchange = self.active.get(key)
        if exchange is not None:
            exchange.abort()

    # ------------------------------------------------------------------ deadlines

    def _watch_deadline(self, exchange: "_Exchange", deadline: float) -> None:
        """Time ``exchange`` out at ``deadline`` (IOLoop time) unless it is over by then.

        One timer serves the whole client, armed for the earliest deadline: a timer per
        request (pushed on the loop's heap, then cancelled) cost measurable CPU on every
        request. Finished exchanges are dropped lazily, and the heap is rebuilt once it holds
        more of them than running ones.

        The heap holds a one-item list per exchange (its ticket), which the exchange empties
        when it is over (``_release``): a finished exchange, and the request, callbacks and
        handler it refers to, is not kept alive by the heap until the next rebuild (tens of
        requests' objects living on into the garbage collector's older generations).
        """
        heap = self._deadlines
        ticket = [exchange]
        exchange._ticket = ticket
        heapq.heappush(heap, (deadline, next(self._deadline_seq), ticket))
        if self._deadline_timer is None or deadline < self._deadline_due:
            self._arm_deadline_timer(deadline)
        if len(heap) > 2 * len(self.active) + 64:
            heap[:] = [entry for entry in heap if entry[2][0] is not None]
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
        while heap and (heap[0][0] <= now or heap[0][2][0] is None):
            _due, _seq, (exchange,) = heapq.heappop(heap)
            if exchange is not None and not exchange._done:
                expired.append(exchange)
        for exchange in expired:
            exchange._finish_error(HTTPTimeoutError("Timeout during request"))
        while heap and heap[0][2][0] is None:
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
        app_log.error("Exception in UpstreamHTTPClient request", exc_info=task.exception())


def _closed_future(error: BaseException | None = None) -> "Future[None]":
    future: Future[None] = Future()
    future.set_exception(StreamClosedError(real_error=error))
    future.exception()  # retrieved: a writer that stopped caring must not log it
    return future


def _done_future() -> "Future[None]":
    future: Future[None] = Future()
    future.set_result(None)
    return future


class _Upstream(asyncio.Protocol):
    """One upstream connection: an asyncio transport, and the exchange using it (if any).

    What is written leaves at once (Nagle's algorithm is off on the TCP socket). Bytes go
    straight to the exchange as the loop delivers them. While the connection is idle in the
    pool the transport keeps reading, so a server closing it, or sending anything at all,
    takes it out of the pool.
    """

    def __init__(self, tls: bool) -> None:
        # Not asyncio.Transport: uvloop's transports are not its subclasses.
        self.transport: Any = None
        # The socket _open() made and handed to create_connection(sock=...), for the MSG_PEEK
        # check and the salvage: a real socket on every loop. Never the transport's
        # get_extra_info("socket"): uvloop's is a PseudoSocket whose recv() raises TypeError.
        # uvloop uses this socket's fd as it is and detaches it only after connection_lost(),
        # as asyncio closes it only then: both reads work under both loops.
        self.sock: socket.socket | None = None
        self.tls = tls
        self.closed = False
        self.exchange: _Exchange | None = None
        self.on_idle_close: Callable[[_Upstream], None] | None = None
        self._write_paused = False
        self._drain: Future[None] | None = None
        self._reading_paused = False
        self._poller: Any = None  # alive()'s poll object for self.sock, made on first use

    # -- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        # A request goes out as several writes (head, then each body piece). With Nagle's
        # algorithm a short segment is held while an earlier short one is unacknowledged, and
        # a server on a kept-alive connection delays that ACK (40 ms on Linux). asyncio sets
        # TCP_NODELAY only on sockets made with proto=IPPROTO_TCP, which _open()'s are not;
        # under TLS, "socket" is the TCP socket beneath.
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

    def _salvage(self, exchange: "_Exchange") -> None:
        """Hand the exchange what the server sent that the transport never read.

        A failed write (the server answered early and closed: ``EPIPE``, or a reset from it)
        makes the transport close at once, without reading what is waiting in the socket:
        typically that very answer, a 413. The socket is still open here (the transport closes
        it after ``connection_lost``), so it is read now, without blocking, until it is empty,
        at its end, or failing. Linux keeps received bytes readable after a reset arrives;
        ``recv`` reports the reset only once they are read.
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
            # A transport that failed (its connection_lost comes on the next loop iteration)
            # would only count the write and warn "socket.send() raised exception." for each
            # one past the fifth.
            return _closed_future()
        transport.write(data)
        if self._write_paused:
            if self._drain is None:
                self._drain = Future()
            return self._drain
        return _done_future()

    def send(self, data: bytes) -> None:
        """``write()`` for a caller that does not wait for the buffer to drain (the request
        head): no future made only to be dropped."""
        transport = self.transport
        if self.closed or transport is None or transport.is_closing():
            return
        transport.write(data)

    def alive(self) -> bool:
        """Is this idle connection still usable (not closed, nothing unread, no EOF)?"""
        if self.closed or self.transport is None or self.transport.is_closing():
            return False
        if self.tls or self.sock is None:
            return True  # MSG_PEEK would see TLS records; the idle reader catches closes
        # connection_lost runs only when the loop gets to the socket's event; a FIN that
        # arrived just now is seen by peeking (non-blocking). Where poll() exists, asking it
        # whether the socket is readable (data or EOF) or failed says the same without the
        # BlockingIOError that the peek raises (and Python builds) on every healthy check.
        poller = self._poller
        if poller is None and _POLL_FLAGS:
            try:
                poller = self._poller = select.poll()
                poller.register(self.sock.fileno(), _POLL_FLAGS)
            except (OSError, ValueError):
                poller = self._poller = None
        if poller is not None:
            try:
                return not poller.poll(0)
            except OSError:
                return False
        try:
            self.sock.recv(1, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            return True
        except OSError:
            return False
        return False  # b"" is EOF; any data is unsolicited: either way unusable

    def pause_reading(self) -> None:
        if not self._reading_paused and not self.closed and self.transport is not None:
            self._reading_paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self._reading_paused and not self.closed and self.transport is not None:
            self._reading_paused = False
            self.transport.resume_reading()

    def close(self) -> None:
        """Close now, discarding anything not yet sent (never pooled again)."""
        self.on_idle_close = None
        if not self.closed:
            self.closed = True
            if self.transport is not None:
                self.transport.abort()


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


def _field_line(name: str, value: Any) -> str:
    if isinstance(value, bytes):
        # Sent byte for byte: the head is written in Latin-1.
        return "%s: %s" % (name, value.decode("latin-1"))
    return "%s: %s" % (name, value)


def _ssl_options(opts: Any) -> Any:
    """The TLS settings of an https request, as ``SimpleAsyncHTTPClient`` makes them."""
    if opts.ssl_options is not None:
        return opts.ssl_options
    if (opts.validate_cert and opts.ca_certs is None and opts.client_cert is None
            and opts.client_key is None):
        return _client_ssl_defaults()  # shared: no new context per connection
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=opts.ca_certs)
    if not opts.validate_cert:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    if opts.client_cert is not None:
        context.load_cert_chain(opts.client_cert, opts.client_key)
    if hasattr(ssl, "OP_NO_COMPRESSION"):
        context.options |= ssl.OP_NO_COMPRESSION
    return context


def _address(family: int, address: Any) -> str:
    host, port = address[0], address[1]
    return "[%s]:%s" % (host, port) if family == socket.AF_INET6 else "%s:%s" % (host, port)


class _Exchange:
    """One request: get a connection (pooled or new), exchange, then pool or close it.

    It is also the llhttp parser's protocol object: the ``on_*`` methods below are the
    parser's callbacks, called from inside ``feed_data``.
    """

    def __init__(
        self,
        client: UpstreamHTTPClient,
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
        self._max_body = client.max_body_size or client.max_buffer_size
        self._max_header = client.max_header_size or _DEFAULT_MAX_HEADER
        self.release_callback: Callable[[], None] | None = release_callback
        self.final_callback: Callable[[HTTPResponse], None] | None = final_callback
        self.stream: _Upstream | None = None
        # (fetch() future, its cancellation watch): see UpstreamHTTPClient.fetch()
        self._cancel_watch: tuple[Any, Any] | None = None
        self._ticket: list[Any] | None = None  # its entry in the client's deadline heap
        self._pool_key: _PoolKey = ()
        self._chunking = False  # the client frames the streamed body as chunked (_setup)
        self._length_out: int | None = None
        self._head_bytes = b""
        self._may_retry = False
        self._attempt = 0
        self._phase = "Timeout while connecting"
        self._reset_exchange()

    def _reset_exchange(self) -> None:
        """State of one attempt on one connection (a retry starts again from here)."""
        self._parser: Any = HttpResponseParser(self)
        self.code: int | None = None
        self.reason: str | None = None
        self.headers: httputil.HTTPHeaders | None = None
        self.version: str | None = None
        self._chunks: list[bytes] = []
        self._fields: list[tuple[str, str]] = []  # the current head's fields
        self._reason_bytes = b""
        self._head_size = 0  # bytes of the current head (for max_header_size)
        self._head_fed = 0  # bytes fed before the final head was complete
        self._final_head = False  # the final (non-1xx) head is in
        self._interim = False  # the current message is a 1xx
        self._framing = Framing.NONE
        self._keep_alive = False  # may the connection carry another request (the response's say)
        self._complete = False  # the final response is complete (maybe not yet delivered)
        self._extra = False  # bytes followed the response: the connection is not reusable
        self._total = 0  # body bytes received
        self._n1xx = 0
        self._got_bytes = False
        self._feeding = False
        self._pending: collections.deque[bytes] = collections.deque()  # parsed, undelivered
        self._unfed: list[bytes] = []  # received while delivery waits, not parsed yet
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
                # The common case: a pooled connection and the whole request in hand. It is
                # written now; the parser answers from the connection's data callback.
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

    def _release(self) -> None:
        ticket = self._ticket
        if ticket is not None:  # over: the deadline heap lets go of it (_watch_deadline)
            self._ticket = None
            ticket[0] = None
        if self.release_callback is not None:
            release_callback = self.release_callback
            self.release_callback = None
            release_callback()

    def _stop_producer(self) -> None:
        """The exchange is over: a body producer still running is cancelled (its writes could
        only fail; one waiting for data that will never come would wait forever)."""
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
            # Called directly, not through add_callback (an event-loop iteration per
            # request): it is fetch()'s handle_response, which only resolves the future.
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
        """Check the request, parse the URL, format the request head."""
        opts = self._opts
        parsed = urllib.parse.urlsplit(_unicode(self._url))
        if parsed.scheme not in ("http", "https"):
            raise ValueError("Unsupported url scheme: %s" % self._url)
        netloc = parsed.netloc
        if "@" in netloc or opts.auth_username is not None:
            raise ValueError("UpstreamHTTPClient does not support HTTP authentication "
                             "(auth_username, or credentials in the URL): send an "
                             "Authorization header")
        for key in _PROXY_OPTIONS:
            if getattr(opts, key, None):
                raise NotImplementedError("%s not supported" % key)
        method = self._method
        if method not in _SUPPORTED_METHODS and not opts.allow_nonstandard_methods:
            raise KeyError("unknown method %s" % method)
        if not opts.allow_nonstandard_methods:
            body_expected = method in ("POST", "PATCH", "PUT")
            body_present = self._body is not None or self._body_producer is not None
            if body_expected != body_present:
                raise ValueError(
                    "Body must %sbe None for method %s (unless allow_nonstandard_methods "
                    "is true)" % ("not " if body_expected else "", method))
        host, port = _split_netloc(netloc)
        if port is None:
            port = 443 if parsed.scheme == "https" else 80
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        self._host, self._port = host, port
        self._af = socket.AF_INET if opts.allow_ipv6 is False else socket.AF_UNSPEC
        self._ssl: Any = None
        tls_key = None
        if parsed.scheme == "https":
            self._ssl = _ssl_options(opts)
            tls_key = (opts.validate_cert, opts.ca_certs, opts.client_cert, opts.client_key,
                       id(opts.ssl_options) if opts.ssl_options is not None else None)
        self._source_ip = None
        if opts.network_interface:
            if not is_valid_ip(opts.network_interface):
                raise ValueError(
                    "Unrecognized IPv4 or IPv6 address for network_interface, got %r"
                    % (opts.network_interface,))
            self._source_ip = opts.network_interface
        self._pool_key = (parsed.scheme, host, port, self._af, self._source_ip, tls_key)
        headers = self._req_headers
        if "Host" not in headers:
            headers["Host"] = netloc
        if opts.user_agent:
            headers["User-Agent"] = opts.user_agent
        if self._expect_100:
            headers["Expect"] = "100-continue"
        framing = request_body_framing(
            method, headers, len(self._body) if self._body is not None else None,
            self._body_producer is not None)
        if framing is not None:
            headers[framing[0]] = framing[1]
        if self._body_producer is not None:
            self._chunking = framing is not None and framing[0] == "Transfer-Encoding"
            length = get_field(headers, "Content-Length")
            self._length_out = int(length) if length is not None and length.isdigit() else None
        req_path = (parsed.path or "/") + (("?" + parsed.query) if parsed.query else "")
        self._head_bytes = self._format_head(req_path)
        self._may_retry = (method in IDEMPOTENT_METHODS and self._body_producer is None
                           and not self._expect_100)

    def _format_head(self, path: str) -> bytes:
        """The request line and header lines, as ``HTTP1Connection.write_headers`` writes
        them (``bytes`` values byte for byte)."""
        lines = ["%s %s HTTP/1.1" % (self._method, path)]
        lines.extend(["%s: %s" % (name, value) if value.__class__ is str
                      else _field_line(name, value)
                      for name, value in fields(self._req_headers)])
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
                # Already answered (timeout, abort): the connection was closed under the
                # exchange, which is what raised here.
                if self.stream is not None:
                    self.stream.close()
                if not isinstance(e, (StreamClosedError, HTTPStreamClosedError)):
                    gen_log.debug("error after request finished", exc_info=True)
                return
            self._finish_error(e)

    async def _run(self) -> None:
        # The retry (attempt 1) always uses a new connection: other idle ones may be just as
        # dead (the server restarted, or timed them all out at once).
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
        if self._attempt:
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
                    conn.send(self._head_bytes + body)
                else:
                    conn.send(self._head_bytes)
                    conn.send(body)
            else:
                conn.send(self._head_bytes)
            self._body_sent = True

    async def _connect(self) -> "_Upstream | None":
        opts = self._opts
        if opts.connect_timeout and opts.request_timeout:
            timeout = min(opts.connect_timeout, opts.request_timeout)
        else:
            timeout = opts.connect_timeout or opts.request_timeout or 0
        try:
            if timeout:
                remaining = self.start_time + timeout - self.io_loop.time()
                conn = await asyncio.wait_for(self._open(), max(remaining, 0))
            else:
                conn = await self._open()
        except (TimeoutError, asyncio.TimeoutError):
            # Which phase timed out, in the words of Tornado's TCPClient.
            raise HTTPTimeoutError(self._phase) from None
        if self._done:
            conn.close()
            return None
        return conn

    async def _open(self) -> _Upstream:
        """A new connection: resolve, connect (each address in turn), wrap in TLS."""
        loop = asyncio.get_running_loop()
        host, port = self._host, self._port
        literal = self.client._literal_ips and is_valid_ip(host)
        family = (socket.AF_INET6 if ":" in host else socket.AF_INET) if literal else 0
        if literal and self._af in (socket.AF_UNSPEC, family):
            addresses: list[tuple[int, Any]] = [(family, (host, port))]
        else:
            # (also an IPv6 literal with allow_ipv6=False: the resolver refuses it, as it
            # does for the simple client)
            self._phase = "Timeout while resolving %s" % host
            addresses = await self.client.resolver.resolve(host, port, self._af)
        ssl_context = (ssl_options_to_context(self._ssl, server_side=False)
                       if self._ssl is not None else None)
        error: BaseException | None = None
        for family, address in addresses:
            where = _address(family, address)
            self._phase = "Timeout while connecting to %s" % where
            sock = socket.socket(family, socket.SOCK_STREAM)
            try:
                sock.setblocking(False)
                if self._source_ip:
                    sock.bind((self._source_ip, 0))
                await loop.sock_connect(sock, address)
                if ssl_context is not None:
                    self._phase = "Timeout during TLS handshake with %s" % where
                conn = _Upstream(tls=ssl_context is not None)
                try:
                    await loop.create_connection(
                        lambda: conn, sock=sock, ssl=ssl_context,
                        server_hostname=host if ssl_context is not None else None)
                except ssl.SSLError as e:
                    # As Tornado's IOStream: one line, no traceback.
                    gen_log.warning("SSL Error on %s: %s", where, e)
                    raise
                conn.sock = sock
                return conn
            except OSError as e:
                sock.close()
                error = e
            except BaseException:
                sock.close()
                raise
        assert error is not None
        if not isinstance(error, ssl.SSLError) and error.errno and error.strerror and \
                error.strerror != os.strerror(error.errno):
            # asyncio's "Connect call failed (...)" for a refused connection: the system's
            # message, as the simple client reports it ("[Errno 111] Connection refused").
            error = type(error)(error.errno, os.strerror(error.errno))
        raise error

    # ---------------------------------------------------------------- request body

    def write(self, chunk: bytes) -> "Future[None]":
        """The ``write`` given to a ``body_producer``: frames (if chunked) and sends a piece
        of the body; the future is the back-pressure. After the exchange is over it touches
        nothing (the connection may already serve another request)."""
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
                return _done_future()
            # One write, as HTTP1Connection frames it: with TCP_NODELAY each write leaves as a
            # segment of its own, and size line and CRLF alone would be two tiny ones.
            return conn.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        return conn.write(chunk)

    async def _write_body(self) -> None:
        """Run the body producer (or send the body after a 100)."""
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
                "Tried to write %d bytes less than Content-Length" % self._out_remaining)
        if self._chunking and not conn.closed:
            conn.write(b"0\r\n\r\n")
        self._body_sent = True
        if self._eof and not self._blocked and not self._feeding:
            self._settle()  # the connection ended while the body went out: now it counts

    def _answered_anyway(self, conn: _Upstream) -> bool:
        """The body producer failed: has the exchange an outcome anyway (an answer that came
        complete before the connection failed, or a timeout or abort)?

        A write that fails (the server answered early and closed) closes the transport at
        once and the producer's next write fails, possibly before ``connection_lost`` has run
        and read what the socket still holds: that is read now, so a complete answer wins over
        the write error in any order of events.
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

    # ---------------------------------------------------------------- llhttp's callbacks

    def on_message_begin(self) -> None:
        if self._complete:
            self._extra = True  # a second response: not asked for (no pipelining)
            raise _Stop()
        self._fields = []
        self._reason_bytes = b""
        self._head_size = 0

    def on_status(self, reason: bytes) -> None:
        self._reason_bytes += reason  # (may come in pieces, split across reads)
        self._head_size += len(reason) + 15

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head_size += len(name) + len(value) + 4
        if self._final_head:
            # A trailer field (after the last chunk): dropped, as by Tornado, but counted
            # with the head against max_header_size.
            if self._head_size > self._max_header:
                raise _HeadTooLarge()
            return
        if self._head_size > self._max_header:
            raise _HeadTooLarge()
        # llhttp strips the whitespace before a value, not the whitespace after it.
        self._fields.append((_NAMES.get(name) or _normalized(name),
                             value.decode("latin-1").rstrip(" \t")))

    def on_headers_complete(self) -> None:
        parser = self._parser
        code = parser.get_status_code()
        version = parser.get_http_version()
        headers = headers_from_fields(self._fields)
        self._fields = []
        if code < 200 or code == 204:
            problem = upstream_response_error(code, headers)
            if problem is not None:
                raise _Malformed(problem)
        start_line = httputil.ResponseStartLine(
            _HTTP_VERSIONS.get(version) or "HTTP/" + version, code,
            self._reason_bytes.decode("latin-1"))
        if code < 200:
            self._interim = True
            self._n1xx += 1
            if self._n1xx > _MAX_1XX_RESPONSES:
                raise _Malformed("Too many 1xx responses")
            if self._expect_100 and code == 100 and not self._continued:
                self._send_body_after_continue()
            self._headers_received(start_line, headers)
            return  # the real response follows
        self._final_head = True
        self._framing = upstream_response_framing(self._method, code, headers)
        if self._framing is Framing.LENGTH:
            length = get_field(headers, "Content-Length")
            if length is not None and int(length) > self._max_body:
                raise _Malformed("Content-Length too long", self._too_large())
        self._headers_received(start_line, headers)
        if self._framing is Framing.NONE:
            # No body, whatever llhttp expects (it cannot be told the request was a HEAD, and
            # its keep-alive verdict on a HEAD answer without a length would be "until close").
            tokens = connection_tokens(headers)
            self._keep_alive = ("close" not in tokens if version == "1.1"
                                else "keep-alive" in tokens)
            self._complete = True

    def on_body(self, body: bytes) -> None:
        if self._complete:
            self._extra = True  # bytes after a HEAD answer's head
            raise _Stop()
        total = self._total + len(body)
        if total > self._max_body:
            raise _Malformed("Body too long", self._too_large())
        self._total = total
        if self._streaming_callback is None:
            self._chunks.append(body)
        elif self._blocked or self._pending:
            self._pending.append(body)
        else:
            self._deliver(body)

    def on_message_complete(self) -> None:
        if self._interim:
            self._interim = False  # a 1xx: the real response follows
            return
        if not self._complete:
            self._keep_alive = self._parser.should_keep_alive()
            self._complete = True

    # ---------------------------------------------------------------- the response

    def _headers_received(self, start_line: httputil.ResponseStartLine,
                          headers: httputil.HTTPHeaders) -> None:
        self.code = start_line.code
        self.reason = start_line.reason
        self.version = start_line.version
        self.headers = headers
        header_callback = self._header_callback
        if header_callback is not None:
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
        if self.final_callback is None:
            raise _Stop()

    def _on_data(self, data: bytes) -> None:
        if self.final_callback is None:  # (self._done, without a property call per read)
            return
        self._got_bytes = True
        if self._blocked or self._feeding:
            self._unfed.append(data)
            return
        self._feed(data)
        if self.final_callback is not None and not self._blocked:
            self._settle()

    def _feed(self, data: bytes) -> None:
        """Parse ``data`` (llhttp calls the ``on_*`` methods above from in here)."""
        if not self._final_head:
            self._head_fed += len(data)
        failure: BaseException | None = None
        self._feeding = True
        try:
            self._parser.feed_data(data)
        except HttpParserCallbackError as e:
            failure = e.__context__ or e  # what a callback above raised
        except HttpParserUpgrade:
            failure = _Malformed("Protocol upgrade (101) is not supported")
        except HttpParserError as e:
            if self._complete:
                self._extra = True  # garbage after a complete response: the response stands
            else:
                reason = str(e)
                failure = _Malformed(_TORNADO_WORDS.get(reason, reason))
        finally:
            self._feeding = False
        if failure is not None:
            self._failed(failure)
        elif not self._final_head and self._head_fed > self._max_header:
            self._head_too_large()

    def _failed(self, error: BaseException) -> None:
        """Parsing stopped with ``error``: end the exchange accordingly."""
        if isinstance(error, _Stop):
            return  # the exchange was decided already
        if isinstance(error, _Malformed):
            self._malformed(*error.args)
        elif isinstance(error, _HeadTooLarge):
            self._head_too_large()
        elif not self._done:  # a bug here: fail the exchange, with the traceback logged
            app_log.error("Error parsing the response from %s", self._url, exc_info=error)
            self._finish_error(HTTPStreamClosedError("Malformed HTTP response: %r" % error))

    def _malformed(self, reason: str, detail: str = "") -> None:
        if self._done:
            return
        if detail:
            reason = "%s (%s)" % (reason, detail)
        # Tornado's clients log this line (their connection's context is None); kept word for
        # word so that log filters written for them still match, the URL added after it.
        gen_log.info("Malformed HTTP message from None: %s, from %s", reason, self._url)
        self._finish_error(HTTPStreamClosedError("Malformed HTTP response: %s" % reason))

    def _too_large(self) -> str:
        return "over max_body_size, %d bytes" % self._max_body

    def _head_too_large(self) -> None:
        if self._done:
            return
        error = UnsatisfiableReadError(
            "Response head larger than max_header_size (%d bytes)" % self._max_header)
        # What Tornado's IOStream logs when the simple client's head read hits the limit.
        gen_log.info("Unsatisfiable read, closing connection: %s", error)
        self._finish_error(error)

    def _settle(self) -> None:
        """Nothing is being delivered: finish a complete response, or read on."""
        if self._pending:
            self._drain()
            return
        if self._complete:
            self._message_done()
        elif self._unfed:
            data = b"".join(self._unfed)
            self._unfed.clear()
            self._feed(data)
            if not self._done and not self._blocked:
                self._settle()
        elif self._eof:
            self._ended()

    def _deliver(self, piece: bytes) -> None:
        """One piece of the body to the streaming callback; an awaitable it returns is
        awaited before anything more is delivered (the download back-pressure)."""
        try:
            ret = self._streaming_callback(piece)  # type: ignore[misc]
        except Exception as e:
            self._callback_failed("streaming_callback", e)
            if self._feeding:
                raise _Stop()
            return
        if ret is None:
            return
        if isinstance(ret, asyncio.Future) and ret.done():
            error = None if ret.cancelled() else ret.exception()  # (marks it retrieved)
            if ret.cancelled() or error is not None:
                self._callback_failed("streaming_callback",
                                      error or asyncio.CancelledError())
                if self._feeding:
                    raise _Stop()
            return
        self._blocked = True
        conn = self.stream
        if conn is not None:
            conn.pause_reading()
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
        self._drain()

    def _drain(self) -> None:
        """Deliver the pieces parsed while the callback's awaitable was pending, then go on
        (finish, parse what came meanwhile, or read again)."""
        pending = self._pending
        while pending and not self._blocked and not self._done:
            self._deliver(pending.popleft())
        if self._blocked or self._done:
            return
        self._settle()
        if not self._done and not self._blocked and not self._complete:
            conn = self.stream
            if conn is not None:
                conn.resume_reading()

    def _callback_failed(self, name: str, e: BaseException) -> None:
        if self._done:
            return
        # As Tornado's clients: a callback that raises is a bug of the caller's, logged.
        app_log.error("Uncaught exception in %s", name, exc_info=e)
        error = HTTPStreamClosedError(f"Request aborted by {name}: {e!r}")
        error.__cause__ = e
        self._finish_error(error)

    def _on_eof(self, error: BaseException | None) -> None:
        if self._done or self._eof:
            return
        self._eof = True
        self._eof_error = error
        conn = self.stream
        if not self._got_bytes and self._attempt == 0 and self._reused and self._may_retry:
            # A pooled connection the server had closed: nothing of the response arrived and
            # the request is idempotent and replayable: once more, on a new connection.
            self.client.stats["retried"] += 1
            gen_log.debug("retrying %s %s on a new connection (%r)", self._method, self._url,
                          error)
            if conn is not None:
                conn.exchange = None
                conn.close()
            self.stream = None
            self._attempt = 1
            asyncio.ensure_future(self.run()).add_done_callback(_log_run_failure)
            return
        if not self._blocked and not self._feeding:
            self._settle()
        # else: the end counts once the pieces in hand are delivered

    def _ended(self) -> None:
        """The connection ended and everything received was delivered."""
        if self._done or self._complete:
            return
        if self._final_head and self._framing is Framing.UNTIL_CLOSE:
            self._complete = True  # the end of the body is the connection's end
            self._message_done()
            return
        if self._producing is not None:
            # The connection ended without a complete answer while the body producer runs:
            # its next write fails (or its end finds the EOF) and that is the outcome; a
            # producer waiting for more body keeps its caller's own timeouts in charge.
            return
        if not self._got_bytes:
            # Nothing answered at all: the socket error itself, as the simple client.
            self._finish_error(StreamClosedError(real_error=self._eof_error))
        else:
            self._finish_error(HTTPStreamClosedError("Connection closed"))

    def _message_done(self) -> None:
        """The response is complete: answer, and pool the connection if it may be reused."""
        conn = self.stream
        assert conn is not None and self.code is not None
        chunks = self._chunks
        if self._streaming_callback is not None or not chunks:
            buffer = BytesIO()
        else:
            buffer = BytesIO(chunks[0] if len(chunks) == 1 else b"".join(chunks))
        self._chunks = []
        self._parser = None  # (it holds this exchange's methods: no cycle left for the GC)
        response = HTTPResponse(
            self.request,
            self.code,
            reason=self.reason,
            headers=self.headers,
            request_time=self.io_loop.time() - self.start_time,
            start_time=self.start_wall_time,
            buffer=buffer,
            effective_url=self._url,
        )
        # Pool before releasing the max_clients slot, so that a queued request started by
        # the release finds this connection idle.
        self.stream = None
        conn.exchange = None
        if self._reusable(conn):
            conn.resume_reading()  # (paused if the last piece waited for the callback)
            self.client._checkin(self._pool_key, conn)
        else:
            conn.close()
        self._run_callback(response)

    def _reusable(self, conn: _Upstream) -> bool:
        """May ``conn`` carry another request after this complete exchange?"""
        if (conn.closed or self._eof or not self._body_sent or self._extra or self._unfed
                or not self._keep_alive or self._framing is Framing.UNTIL_CLOSE):
            return False
        connection = get_field(self._req_headers, "Connection")
        return connection is None or "close" not in connection.lower()
