"""The streaming proxy: ``/api/deepfake`` and everything below it, forwarded to the Flask child.

Mount it with one line::

    app = tornado.web.Application(proxy_routes(bridge, config) + other_routes)

The proxy brings its own HTTP client (:class:`UpstreamClient`: the keep-alive pool of
``http/client.py`` unless ``GATEWAY_UPSTREAM=simple``), sized so that large downloads are not
cut at Tornado's default 100 MiB client limit; it never touches the process-wide
``AsyncHTTPClient`` configuration, so the application's own HTTP calls keep Tornado's client.

What the handler promises (``docs/ARCHITECTURE.md`` follows a request through it):

* Any method, and the raw request target (path and query), are forwarded byte for byte;
  targets that try to leave the prefix after percent-decoding are refused with a JSON 400,
  anything naming Werkzeug's ``__debugger__`` with a JSON 404, neither reaching the child.
* Bodies stream both ways with back-pressure: at most :data:`QUEUE_CHUNKS` request chunks
  (Tornado delivers <= 64 KiB each) wait between client and child, and a response chunk is
  written and flushed to the client before the next one is read from the child.
* Hop-by-hop headers are dropped both ways, ``Expect`` is dropped, ``X-Forwarded-For/-Proto/
  -Host`` are added; every other header (repeats included), the status and the reason phrase
  are kept, and none is invented (Tornado's clients would add a form Content-Type to a POST).
* The bridge's state gates every request: ready -> proxied; starting/unhealthy -> a bounded
  wait for readiness; anything else -> JSON 503 without touching the network.
* With a :class:`~tornado_gateway.supervisor.group.WorkerGroup` as the bridge, a request first takes a
  place on a worker (the least busy ready one, under its in-flight limit) and otherwise waits
  for one in the group's queue before ``prepare()`` returns, so none of its body is read while
  it waits; a full queue or a wait past the queue timeout is a JSON 503 ``overloaded``. The
  place is given back exactly once, when the exchange is over or the client has gone.
* Errors the gateway makes itself are JSON (``errors.py``): 400, 404, 408, 413, 501, 502, 503,
  504. Ambiguous body framing (Content-Length with Transfer-Encoding, conflicting lengths)
  is refused (400) before the child is contacted; a body that stalls for ``body_timeout``
  gets 408.
  Once the response head has gone out, an upstream failure closes the client connection, so a
  truncated body is never presented as complete.
* An answer the child sends before the request body is complete (waitress's 413 to a body over
  its ``max_request_body_size``, sent as soon as it has read the head, before it closes) is
  relayed as it arrives: its status, headers and body, never a 502 made of the upload's failing
  writes, and no ``report_upstream_failure()``. The rest of the client's body is not forwarded;
  the upstream connection is closed, not reused; the client connection closes after the answer
  (the gateway's server says ``Connection: close`` and reads and drops what the client still
  sends for up to 2 s, so that the answer is not lost to a reset). The keep-alive pool does
  this (it reads the response while the body goes out); ``SimpleAsyncHTTPClient`` only reads
  the answer once the body is sent.
* A client that goes away aborts the upstream exchange: the child sees an incomplete request,
  never a truncated body that looks complete.

The handler only reads the bridge (``state``, ``is_flask_ready()``, ``flask_url``,
``wait_until_ready()``) and tells it about refused connections
(``report_upstream_failure()``); it never changes the bridge's state.
"""
from __future__ import annotations

import asyncio
import logging
import re
import time
import urllib.parse
import warnings
from typing import Any, Awaitable, Callable, Dict, Iterable, List, Optional, Tuple

import tornado.web
from tornado import httputil
from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPRequest, HTTPResponse
from tornado.ioloop import IOLoop
from tornado.iostream import StreamClosedError
from tornado.log import access_log
from tornado.queues import Queue
from tornado.simple_httpclient import SimpleAsyncHTTPClient
from tornado.util import import_object

from . import errors
from .config import GatewayConfig
from .errors import GatewayError, write_error_response
from .http.headers import (copy_headers, empty_headers, get_field, get_fields,
                      headers_from_fields)
from .http.headers import fields as header_fields
from .http.framing import check_framing, declared_length, has_request_body
from .auth import OPEN, Access, access_for, redact

log = logging.getLogger("tornado_gateway.proxy")

PREFIX = "/api/deepfake"

#: Request chunks buffered per request between the client and the child (the back-pressure
#: bound). Tornado hands the handler chunks of at most 64 KiB, so this is <= 1 MiB.
QUEUE_CHUNKS = 16

#: How far past ``max_body`` the server connection's own limit is set. Tornado's limit check
#: closes the connection with a bare 400; ours answers a JSON 413. The slack lets a chunked
#: body cross our limit (and get the JSON answer) before Tornado's check fires.
BODY_LIMIT_SLACK = 1 << 20

#: The client's ``max_body_size``: applies to streamed downloads too, so it is effectively
#: "no limit" (1 PiB); the memory bound comes from streaming, not from this number.
DOWNLOAD_LIMIT = 1 << 50

#: Default upper bound of concurrent upstream requests (Tornado's default is 10).
DEFAULT_MAX_CLIENTS = 128

# Hop-by-hop headers (RFC 9110 7.6.1) plus the historical ones; never forwarded either way.
HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "te", "trailer", "trailers", "transfer-encoding", "upgrade",
    "proxy-connection", "proxy-authenticate", "proxy-authorization",
})
# Request headers never forwarded as they are: hop-by-hop, Expect, and the two X-Forwarded-*
# headers the gateway sets itself.
_NOT_FORWARDED_UP = HOP_BY_HOP | {"expect", "x-forwarded-proto", "x-forwarded-host"}
# A Connection header may name other headers as hop-by-hop; these never: dropping them would
# break the framing of the forwarded message.
_NEVER_CONNECTION_TOKENS = frozenset({"content-length", "host"})

STANDARD_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")
# Requests that are reads, not work: never held back by the per-worker limit (dispatch.py)
_READS = frozenset({"GET", "HEAD", "OPTIONS"})
_STANDARD_LOWER = frozenset(m.lower() for m in STANDARD_METHODS)
# Methods whose upstream request Tornado frames as chunked by itself when no Content-Length is
# given; a chunked body under any other method is framed by the proxy.
_SELF_CHUNKING_METHODS = frozenset({"POST", "PUT", "PATCH"})

_TOKEN = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
_SUSPICIOUS_ENCODED = re.compile(r"%(?:2e|2f|5c|00)", re.IGNORECASE)
# Anything but visible ASCII (0x21-0x7E): one regex search, not a Python loop per character.
_NOT_VISIBLE_ASCII = re.compile(r"[^\x21-\x7e]")


# --- plain functions: what is forwarded, what is refused ---------------------------------------

#: Request targets (path, query) check_target() found fine: the same few URLs come again and
#: again (a UI polling its stats), and checking one costs several regular-expression searches
#: and decodings. Only the verdict None is kept (an error carries its own timestamp); the
#: cache is emptied when full.
_TARGETS_OK: Dict[Tuple[str, str], bool] = {}
_TARGETS_OK_MAX = 1024


def check_target(path: str, query: str = "") -> Optional[GatewayError]:
    """The error to answer for a request target the proxy must not forward, or None
    (remembered for targets seen before: :data:`_TARGETS_OK`)."""
    key = (path, query)
    if key in _TARGETS_OK:
        return None
    error = _check_target(path, query)
    if error is None:
        if len(_TARGETS_OK) >= _TARGETS_OK_MAX:
            _TARGETS_OK.clear()
        _TARGETS_OK[key] = True
    return error


def _check_target(path: str, query: str = "") -> Optional[GatewayError]:
    """The error to answer for a request target the proxy must not forward, or None.

    ``path`` is the raw (still percent-encoded) path, ``query`` the raw query. Refused:
    anything mentioning ``__debugger__`` at any decoding depth (404: Werkzeug's interactive
    debugger answers ``?__debugger__=yes`` on every URL, so it must never be reachable); a path
    outside the prefix, with ``.``/``..`` segments, empty segments (``//``), backslashes,
    encoded slashes or dots (also double-encoded), control or non-ASCII characters (400).
    """
    shown = path if len(path) <= 200 else path[:200] + "..."
    if "__debugger__" in _decode_fully(path + "?" + query).lower():
        return errors.not_found(PREFIX + "/...__debugger__")
    if _NOT_VISIBLE_ASCII.search(path) or _NOT_VISIBLE_ASCII.search(query):
        return errors.bad_request_path(shown, "control, space or non-ASCII characters")
    if not (path == PREFIX or path.startswith(PREFIX + "/")):
        return errors.bad_request_path(shown, "it is outside %s" % PREFIX)
    if "\\" in path or "%5c" in path.lower():
        return errors.bad_request_path(shown, "backslashes are not allowed")
    if "%2f" in path.lower():
        return errors.bad_request_path(shown, "encoded slashes are not allowed")
    decoded = urllib.parse.unquote(path, encoding="latin-1")
    if "\\" in decoded or "\x00" in decoded or _encoded_at_any_depth(decoded):
        return errors.bad_request_path(shown, "double-encoded characters are not allowed")
    segments = decoded.split("/")[1:]  # the path starts with "/"
    if "." in segments or ".." in segments:
        return errors.bad_request_path(shown, "'.' and '..' segments are not allowed")
    if "" in segments[:-1]:  # a trailing slash is fine, "//" is not
        return errors.bad_request_path(shown, "empty path segments ('//') are not allowed")
    return None


def _encoded_at_any_depth(text: str, rounds: int = 5) -> bool:
    """True if ``text`` hides an encoded dot, slash, backslash or NUL under any number of
    further percent-decodings (``%2e``, ``%252e``, ``%25252e``...)."""
    if "%" not in text:  # the common case: nothing encoded, nothing to decode
        return False
    for _ in range(rounds):
        if _SUSPICIOUS_ENCODED.search(text):
            return True
        decoded = urllib.parse.unquote(text, encoding="latin-1")
        if decoded == text:
            return False
        text = decoded
    return "%" in text  # still decoding after that many rounds: refuse


def _decode_fully(text: str, rounds: int = 5) -> str:
    """Percent- and plus-decode until stable (bounded), for deny-list checks only."""
    if "%" not in text and "+" not in text:  # the common case: already stable
        return text
    for _ in range(rounds):
        decoded = urllib.parse.unquote_plus(text, encoding="latin-1")
        if decoded == text:
            break
        text = decoded
    return text


def connection_tokens(headers: httputil.HTTPHeaders) -> set[str]:
    """Lower-case header names listed in the ``Connection`` header(s) (hop-by-hop by naming)."""
    tokens: set[str] = set()
    values = get_fields(headers, "Connection")
    if not values:  # the common case
        return tokens
    for value in values:
        tokens.update(t.strip().lower() for t in value.split(",") if t.strip())
    return tokens - _NEVER_CONNECTION_TOKENS


def is_hop_by_hop(name: str, named: Iterable[str] = ()) -> bool:
    """True for a header a proxy must not forward (fixed list, ``Proxy-*``, or named)."""
    lname = name.lower()
    return lname in HOP_BY_HOP or lname.startswith("proxy-") or lname in named


def upstream_request_headers(headers: httputil.HTTPHeaders, remote_ip: Optional[str],
                             proto: str, host: str,
                             cls: type = httputil.HTTPHeaders) -> httputil.HTTPHeaders:
    """The headers to send upstream: the client's minus hop-by-hop and ``Expect``, in order,
    repeats kept, with ``X-Forwarded-For`` appended to (or created) and
    ``X-Forwarded-Proto``/``X-Forwarded-Host`` set."""
    named = connection_tokens(headers)
    fields: List[Tuple[str, str]] = []
    forwarded_for: List[str] = []
    for name, value in header_fields(headers):
        lname = name.lower()
        # is_hop_by_hop() inlined (a call per header line shows in the CPU per request);
        # X-Forwarded-Proto/-Host are replaced below: this gateway is the edge that knows them
        if lname in _NOT_FORWARDED_UP or lname.startswith("proxy-") or lname in named:
            continue
        if lname == "x-forwarded-for":
            forwarded_for.append(value.strip())
            continue
        fields.append((name, value))
    if remote_ip:
        forwarded_for.append(remote_ip)
    if forwarded_for:
        fields.append(("X-Forwarded-For", ", ".join(v for v in forwarded_for if v)))
    fields.append(("X-Forwarded-Proto", proto))
    if host:
        fields.append(("X-Forwarded-Host", host))
    # The client's fields were checked when Tornado parsed the request: not again per field.
    return headers_from_fields(fields, cls)


def client_response_headers(headers: httputil.HTTPHeaders) -> List[Tuple[str, str]]:
    """The upstream response headers to pass to the client: all but hop-by-hop, repeats kept."""
    named = connection_tokens(headers)
    out = []
    for name, value in header_fields(headers):
        lname = name.lower()  # is_hop_by_hop() inlined: it runs for every header line
        if lname in HOP_BY_HOP or lname.startswith("proxy-") or lname in named:
            continue
        out.append((name, value))
    return out


_DIGITS = re.compile(r"^[0-9]+$")
# What RequestHandler.add_header() refuses in a value (it raises ValueError).
_UNSENDABLE = re.compile(r"[\x00-\x1f]")


#: The proxy's HTTP client to the workers, by ``GATEWAY_UPSTREAM`` (``config.upstream``).
UPSTREAM_CLIENTS = {
    # upstream keep-alive: no new TCP connection (and TIME_WAIT socket) per proxied request
    "keepalive": "tornado_gateway.http.client.UpstreamHTTPClient",
    "simple": "tornado.simple_httpclient.SimpleAsyncHTTPClient",
}
# below waitress's default channel_timeout (120 s) and werkzeug's, so the gateway closes an
# idle upstream connection before the child does
UPSTREAM_IDLE_TIMEOUT_S = 4.0


class UpstreamClient:
    """The proxy's own HTTP client: an instance of the chosen ``AsyncHTTPClient`` class per
    IOLoop, made with ``force_instance=True``.

    Never ``AsyncHTTPClient.configure``: that is process-wide, and an embedding application's
    own ``AsyncHTTPClient()`` calls keep Tornado's client with its defaults (redirects,
    decompression, auth) whatever the proxy uses. ``impl`` is a class or its dotted name;
    by default the one ``config.upstream`` names (:data:`UPSTREAM_CLIENTS`), sized for
    streaming: ``max_body_size`` beyond any download (it also caps streamed ones),
    ``max_clients`` :data:`DEFAULT_MAX_CLIENTS`. ``kwargs`` override those.
    """

    def __init__(self, config: GatewayConfig, impl: Any = None, **kwargs: Any) -> None:
        name = impl if impl is not None else UPSTREAM_CLIENTS[config.upstream]
        self.impl = import_object(name) if isinstance(name, str) else name
        settings: Dict[str, Any] = {"max_body_size": max(DOWNLOAD_LIMIT, config.max_body),
                                    "max_clients": DEFAULT_MAX_CLIENTS}
        if impl is None and config.upstream == "keepalive":
            settings["idle_timeout"] = UPSTREAM_IDLE_TIMEOUT_S
        settings.update(kwargs)
        self.settings = settings
        self._by_loop: Dict[IOLoop, AsyncHTTPClient] = {}
        # The running asyncio loop get() last answered for, and its instance: every request
        # asks, and IOLoop.current() costs more than comparing the running loop.
        self._last: Tuple[Any, Optional[AsyncHTTPClient]] = (None, None)

    def get(self) -> AsyncHTTPClient:
        """This IOLoop's instance (made on first use; an AsyncHTTPClient is bound to its
        loop). Instances of loops that have been closed are dropped."""
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        last_loop, last_client = self._last
        if running is not None and running is last_loop:
            assert last_client is not None
            return last_client
        loop = IOLoop.current()
        client = self._by_loop.get(loop)
        if client is None:
            for old in [old for old in self._by_loop if old.asyncio_loop.is_closed()]:
                del self._by_loop[old]
            client = self.impl(force_instance=True, **self.settings)
            self._by_loop[loop] = client
        if running is not None:
            self._last = (running, client)
        return client

    def close(self) -> None:
        """Close this IOLoop's instance (its pooled connections); call on shutdown."""
        self._last = (None, None)
        client = self._by_loop.pop(IOLoop.current(), None)
        if client is not None:
            client.close()


def _replace_response_head(handler: tornado.web.RequestHandler,
                           headers: httputil.HTTPHeaders) -> None:
    """Give ``handler`` these response headers and an empty write buffer, as
    ``RequestHandler.clear()`` would (without its default headers, a formatted Date among
    them, that the proxy replaces at once). The proxy's one use of RequestHandler's private
    state (``_headers``, ``_write_buffer``): ``tests/test_proxy.py`` fails the day Tornado
    renames them."""
    handler._headers = headers  # type: ignore[attr-defined]
    handler._write_buffer = []  # type: ignore[attr-defined]


def access_log_level(status: int) -> int:
    """The level ``Application.log_request`` logs a request of this status at."""
    return logging.INFO if status < 400 else logging.WARNING if status < 500 else logging.ERROR


_DEFAULT_UPSTREAMS: Dict[GatewayConfig, UpstreamClient] = {}


def _default_upstream(config: GatewayConfig) -> UpstreamClient:
    """One client per configuration, for routes built by hand without :func:`proxy_routes`."""
    client = _DEFAULT_UPSTREAMS.get(config)
    if client is None:
        client = _DEFAULT_UPSTREAMS[config] = UpstreamClient(config)
    return client


def configure_http_client(config: GatewayConfig, impl: Any = None, **kwargs: Any) -> None:
    """Deprecated, and does nothing: the proxy has its own client (:class:`UpstreamClient`),
    chosen by ``config.upstream`` or the ``client`` argument of :func:`proxy_routes`."""
    warnings.warn("configure_http_client() is no longer needed and does nothing: the proxy "
                  "has its own HTTP client (proxy_routes(..., client=...) chooses another)",
                  DeprecationWarning, stacklevel=2)


def proxy_routes(bridge: Any, config: GatewayConfig, access: Optional[Access] = None,
                 client: Any = None) -> List[Any]:
    """The route(s) serving ``/api/deepfake`` and everything below it, to add to an
    Application: ``Application(proxy_routes(bridge, config) + ...)``. ``access`` is who may
    use it (``auth.py``); by default what ``config`` says (``auth.access_for``). ``client``
    is the proxy's :class:`UpstreamClient`, or the ``AsyncHTTPClient`` class (or dotted name)
    to make one of; by default the one ``config.upstream`` names."""
    if access is None:
        access = access_for(config)
    if not isinstance(client, UpstreamClient):
        client = UpstreamClient(config, client)
    return [(r"%s(?:/.*)?" % re.escape(PREFIX), DeepfakeProxyHandler,
             dict(bridge=bridge, config=config, access=access, upstream=client))]


# --- internals -------------------------------------------------------------------------------

class _AnyMethod(tuple):
    """``SUPPORTED_METHODS`` that admits every method token (WebDAV, PURGE, ...)."""

    def __contains__(self, method: object) -> bool:
        # the standard ones (the tuple itself) without a regular expression
        return tuple.__contains__(self, method) or (
            isinstance(method, str) and bool(_TOKEN.match(method)))


class ProxyAborted(Exception):
    """Raised inside the upstream exchange to abort it on purpose (client gone, body too
    large). Expected: never logged with a traceback."""


class _QuietAbortFilter(logging.Filter):
    """Drops Tornado's "Uncaught exception" records caused by a deliberate :class:`ProxyAborted`
    raised from a client callback (simple_httpclient logs whatever a callback raises)."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        while exc is not None:
            if isinstance(exc, ProxyAborted):
                return False
            exc = exc.__cause__ or exc.__context__
        return True


_filter = _QuietAbortFilter()
if not any(isinstance(f, _QuietAbortFilter) for f in logging.getLogger("tornado.application").filters):
    logging.getLogger("tornado.application").addFilter(_filter)

# Headers Tornado's HTTP clients (and the keep-alive pool, which follows them) add when a
# request lacks them: a form Content-Type on every POST, "User-Agent: Tornado/x.y".
_CLIENT_DEFAULTS = frozenset({"content-type", "user-agent"})


class _ExactRequestHeaders(httputil.HTTPHeaders):
    """Upstream request headers that claim to hold a ``Content-Type`` and a ``User-Agent``
    once sealed.

    Tornado's clients add what :data:`_CLIENT_DEFAULTS` names when ``name in headers`` is
    false: the child would see a form, or a User-Agent, the client never sent. A proxy must
    not invent headers, so after sealing those tests are true and only the client's own
    headers are sent.
    """

    _sealed = False

    def __contains__(self, name: object) -> bool:
        if self._sealed and isinstance(name, str) and name.lower() in _CLIENT_DEFAULTS:
            return True
        return super().__contains__(name)

    def get(self, name: str, default: Any = None) -> Any:  # type: ignore[override]
        value = super().get(name, default)
        if value is None and self._sealed and name.lower() in _CLIENT_DEFAULTS:
            return ""  # present, for a client deciding whether to add its default (simple)
        return value


class _UpstreamRequest(HTTPRequest):
    """An HTTPRequest whose headers stay :class:`_ExactRequestHeaders` (``fetch()`` copies
    them into a new object through this setter)."""

    @property  # type: ignore[override]
    def headers(self) -> httputil.HTTPHeaders:
        return self._headers  # type: ignore[return-value]

    @headers.setter
    def headers(self, value: Any) -> None:
        if isinstance(value, _ExactRequestHeaders):
            # Already the right kind: built for this request by _start_fetch(), or fetch()'s
            # own private copy. Sealed in place, not copied once more.
            value._sealed = True
            self._headers = value
            return
        if isinstance(value, httputil.HTTPHeaders):
            # The fields were checked when they were added: copied as they are.
            exact = copy_headers(value, _ExactRequestHeaders)
        else:
            exact = _ExactRequestHeaders()
            for name, item in (value or {}).items():
                exact.add(name, item)
        exact._sealed = True
        self._headers = exact


_END = object()  # request body complete
_ABORT = object()  # request body will never complete: the producer must fail the upload


class _HeadCallback:
    """The upstream request's ``header_callback``.

    Any AsyncHTTPClient calls it with each raw header line. The keep-alive pool calls
    ``head_received`` instead, once, with the start line and headers it has already parsed:
    formatting every line only for the proxy to parse it again cost measurable CPU per request.
    """

    __slots__ = ("_handler",)

    def __init__(self, handler: "DeepfakeProxyHandler") -> None:
        self._handler = handler

    def __call__(self, line: str) -> None:
        self._handler._on_header_line(line)

    def head_received(self, start_line: httputil.ResponseStartLine,
                      headers: httputil.HTTPHeaders) -> None:
        self._handler._on_head(start_line, headers)


def _is_timeout(exc: BaseException) -> bool:
    return (isinstance(exc, HTTPClientError) and exc.code == 599
            and "timeout" in (exc.message or "").lower()) or isinstance(exc, TimeoutError)


@tornado.web.stream_request_body
class DeepfakeProxyHandler(tornado.web.RequestHandler):
    """Streams one request to the Flask child and its response back (see the module doc)."""

    SUPPORTED_METHODS = _AnyMethod(STANDARD_METHODS)  # type: ignore[assignment]

    def initialize(self, bridge: Any, config: GatewayConfig,  # type: ignore[override]
                   access: Access = OPEN, upstream: Optional[UpstreamClient] = None) -> None:
        self.bridge = bridge
        self.config = config
        self.access = access
        self.upstream = upstream if upstream is not None else _default_upstream(config)
        self._t0 = time.monotonic()
        # Only a request with a body gets a queue and a separate exchange task (see prepare()).
        self._queue: Optional[Queue] = None
        self._task: Optional[asyncio.Future] = None
        self._inline = False  # a bodiless exchange, completed in the method handler itself
        self._responding = False  # the method handler was called: the request body is in
        self._fetch: Optional[asyncio.Future] = None
        self._has_body = False
        self._self_framed = False
        self._received = 0
        self._sent_down = 0
        self._discard = False  # further request chunks are dropped (exchange over or refused)
        self._aborted = False  # we cancelled the exchange on purpose
        self._client_gone = False
        self._upstream_write: Optional[Callable[[bytes], Awaitable[None]]] = None
        self._resp_start: Optional[httputil.ResponseStartLine] = None
        self._resp_headers: Optional[httputil.HTTPHeaders] = None  # from _on_header_line()
        self._head_applied = False
        self._upstream_length_known = False
        self._down_length: Optional[int] = None  # the response's Content-Length
        self._stall_timer: Optional[object] = None  # the client stopped sending its body
        # Dispatch (a WorkerGroup bridge): the worker this request holds a place on, until
        # its exchange is over; a plain bridge has one URL and no places to hold.
        self._worker: Any = bridge
        self._slot: Optional[int] = None
        self._upstream_base: Optional[str] = None
        self._waiting: Optional[asyncio.Future] = None  # the wait for a worker, cancellable
        self._work = True  # counted against the per-worker limit (see dispatch.py)
        self._claim_refused = False

    # Nonstandard methods: Tornado dispatches to getattr(self, method.lower()).
    def __getattr__(self, name: str) -> Any:
        request = self.__dict__.get("request")
        if request is not None and name == (request.method or "").lower():
            return self._respond
        raise AttributeError(name)

    def clear(self) -> None:
        """Tornado's clear(), minus its default headers on the first call (from ``__init__``).

        A proxied response replaces Server, Content-Type and Date with the child's headers
        (``_apply_head``), so formatting a Date for every request only to drop it is waste;
        the gateway's own answers (``write_error_response``, ``send_error``) clear again and
        get Tornado's defaults.
        """
        if "_cleared" in self.__dict__:
            super().clear()
            return
        self._cleared = True
        _replace_response_head(self, empty_headers())
        self.set_default_headers()
        self._status_code = 200
        self._reason = httputil.responses[200]

    def compute_etag(self) -> Optional[str]:
        return None  # never turn a proxied 200 into our own 304

    def check_etag_header(self) -> bool:
        """Tornado's check (``finish()`` calls it on every 200 to a GET), skipped when it
        cannot match: no ``If-None-Match`` in the request, or no ``Etag`` in the response.
        Tornado's own version looks both up through ``Mapping.get`` (an exception raised
        and caught for an absent field) and runs a regular expression first."""
        if (get_field(self.request.headers, "If-None-Match") is None
                or get_field(self._headers, "Etag") is None):
            return False
        return super().check_etag_header()

    def check_xsrf_cookie(self) -> None:
        return None  # the service behind the proxy owns its CSRF policy

    def _log(self) -> None:
        """Tornado's access log line, skipped when its logger would drop it anyway:
        ``Application.log_request`` formats the line before the logger decides (and the
        gateway keeps ``tornado.access`` at WARNING), a cost on every request."""
        application = self.application
        if ("log_function" not in application.settings
                and type(application).log_request is tornado.web.Application.log_request):
            if not access_log.isEnabledFor(access_log_level(self.get_status())):
                return
        super()._log()

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        """Tornado's own errors (an unexpected exception: 500) as JSON too."""
        self._discard = True
        write_error_response(self, errors.internal_error(status_code, self._reason))

    # -- request phase ---------------------------------------------------------------------

    def prepare(self) -> Optional[Awaitable[None]]:
        # Not a coroutine: Tornado awaits what prepare() returns only when it is not None, and
        # the common case (the child ready) has nothing to wait for.
        request = self.request
        method = request.method or ""
        error = (self.access.check(request.headers.get("Authorization"))
                 or check_target(request.path, request.query) or check_framing(request.headers))
        if error is None and method.lower() not in _STANDARD_LOWER \
                and hasattr(DeepfakeProxyHandler, method.lower()):
            error = errors.method_not_supported(method)  # would dispatch to a handler method
        if error is not None:
            self._refuse(error)
            return None
        length = declared_length(request.headers)
        if length is not None and length > self.config.max_body:
            # Answer before reading anything; Tornado closes the connection after the answer
            # instead of reading the body (and must not refuse it with its own bare 400 first).
            request.connection.set_max_body_size(length)
            self._refuse(errors.payload_too_large(length, self.config.max_body))
            return None
        request.connection.set_max_body_size(self.config.max_body + BODY_LIMIT_SLACK)
        if self.bridge.is_flask_ready():
            if self._claim_worker():
                self._open_exchange(length)
                return None
            if self._claim_refused:
                return None
            return self._open_exchange_when_dispatched(length)
        return self._open_exchange_when_usable(length)

    async def _open_exchange_when_usable(self, length: Optional[int]) -> None:
        # Waiting here, before prepare() is over, means Tornado reads none of the body yet:
        # the upload stays in the client's socket (nothing buffered) while the child starts.
        if await self._usable():
            if self._claim_worker():
                self._open_exchange(length)
            elif not self._claim_refused:
                await self._open_exchange_when_dispatched(length)

    def _claim_worker(self) -> bool:
        """Take a place on a worker now: True, or False when the request must queue. A
        bridge without dispatch (a single PythonBridge) has its one URL. Reads (GET, HEAD,
        OPTIONS) are never held back by the per-worker limit; everything else is work."""
        try_acquire = getattr(self.bridge, "try_acquire", None)
        if try_acquire is None:
            self._upstream_base = self.bridge.flask_url
            return True
        self._work = work = self.request.method not in _READS
        index = try_acquire(work)
        if index is None:
            if not work:  # no worker ready at all (between the gate and here)
                self._refuse(self._unavailable(str(self.bridge.state)))
                self._claim_refused = True
            return False
        self._hold(index)
        return True

    def _hold(self, index: int) -> None:
        self._slot = index
        self._worker = worker = self.bridge.worker(index)
        self._upstream_base = worker.flask_url

    async def _open_exchange_when_dispatched(self, length: Optional[int]) -> None:
        # Queued in the gateway (every ready worker is at its limit). As above, nothing of the
        # body is read while waiting: back-pressure reaches the client, memory stays bounded.
        from .supervisor.group import NoWorker, Overloaded, QueueTimeout

        try:
            self._waiting = waiting = self.bridge.request_worker()
            index = await waiting
        except asyncio.CancelledError:
            if self._client_gone:
                return  # on_connection_close() gave up the place
            raise
        except Overloaded as exc:
            self._refuse(errors.overloaded("%d requests are already waiting for a worker "
                                           "(GATEWAY_QUEUE_LIMIT=%d)" % (exc.queued,
                                                                         exc.queue_limit)))
            return
        except QueueTimeout:
            self._refuse(errors.overloaded("no worker was free within %g s "
                                           "(GATEWAY_QUEUE_TIMEOUT)"
                                           % self.bridge.queue_timeout_s))
            return
        except NoWorker:
            self._refuse(self._unavailable(str(self.bridge.state)))
            return
        finally:
            self._waiting = None
        if self._client_gone:
            self.bridge.release(index, True)
            return
        self._hold(index)
        self._open_exchange(length)

    def _release_worker(self) -> None:
        """The exchange is over (or never started): give the worker's place back, once."""
        index = self._slot
        if index is not None:
            self._slot = None
            self.bridge.release(index, self._work)

    def _open_exchange(self, length: Optional[int]) -> None:
        """Start the upstream exchange (the child is ready)."""
        request = self.request
        method = request.method or ""
        self._has_body = has_request_body(request.headers)
        self._self_framed = (self._has_body and length is None
                             and method not in _SELF_CHUNKING_METHODS)
        # Tornado's body timeout covers the whole body, which would cut long uploads: here the
        # body may take as long as the exchange (proxy_timeout) but may not stall longer than
        # body_timeout while the gateway is ready to read it (the stall timer below).
        set_body_timeout = getattr(request.connection, "set_body_timeout", None)
        if set_body_timeout is not None:
            set_body_timeout(None)
        if self._has_body:
            self._queue = Queue(maxsize=QUEUE_CHUNKS)
            self._task = asyncio.ensure_future(self._exchange())
            self._arm_stall_timer()
        else:
            # Nothing to stream up: the request goes out now (the HTTP client sends it while
            # Tornado finishes reading the request) and the method handler, called as soon as
            # prepare() returns, awaits the answer in the handler's own task. A task and a
            # queue per request cost measurable CPU on the common tiny GET.
            self._start_fetch()
            self._inline = True

    async def _usable(self) -> bool:
        """Gate on the bridge's state; answers 503 itself and returns False when not usable."""
        if self.bridge.is_flask_ready():
            return True
        state = str(self.bridge.state)
        if state in ("starting", "unhealthy"):
            ready = await self.bridge.wait_until_ready(self.config.ready_wait / 1000.0)
            if self._client_gone:
                return False
            if ready and self.bridge.is_flask_ready():
                return True
            state = str(self.bridge.state)
        self._refuse(self._unavailable(state))
        return False

    def _unavailable(self, state: str) -> GatewayError:
        """The 503 for ``state``, with the cause the bridge recorded (a failed start's reason,
        an exit's code or signal)."""
        bridge = self.bridge
        return errors.service_unavailable(state, last_error=getattr(bridge, "last_error", None),
                                          last_exit=getattr(bridge, "last_exit", None))

    async def data_received(self, chunk: bytes) -> None:
        if self._discard or self._finished or self._queue is None:
            return
        self._disarm_stall_timer()
        self._received += len(chunk)
        if self._received > self.config.max_body:
            self._abort_exchange("request body over the limit")
            if not self._headers_written and not self._finished:
                self._refuse(errors.payload_too_large(None, self.config.max_body))
            else:
                self.request.connection.close()
            return
        await self._queue.put(chunk)  # blocks while the child is slower: back-pressure
        self._arm_stall_timer()  # not while blocked above: a slow child is not a slow client

    def _respond(self, *args: Any, **kwargs: Any) -> Optional[Awaitable[None]]:
        """Every method: the body is complete; let the producer finish, await the exchange.
        (What it returns, if anything, Tornado awaits: no coroutine layer of its own.)"""
        self._disarm_stall_timer()
        self._responding = True
        if self._inline:
            self._inline = False
            return self._complete_exchange()
        if self._task is None:
            return None
        return self._finish_upload()

    async def _finish_upload(self) -> None:
        if self._has_body and not self._discard:
            assert self._queue is not None
            await self._queue.put(_END)
        await self._task

    get = head = post = put = patch = delete = options = _respond  # type: ignore[assignment]

    def on_finish(self) -> None:
        self._disarm_stall_timer()
        if self._slot is not None:
            self._release_worker()

    def on_connection_close(self) -> None:
        super().on_connection_close()
        self._disarm_stall_timer()
        if self._finished:
            return
        self._client_gone = True
        waiting = self._waiting
        if waiting is not None and not waiting.done():
            waiting.cancel()  # gives up its place in the queue
        self._abort_exchange("client went away")
        # The aborted exchange closes its upstream connection at once: the place is free
        # (the worker may still finish computing an answer nobody reads).
        self._release_worker()

    # -- the upstream exchange -------------------------------------------------------------

    async def _produce(self, write: Callable[[bytes], Awaitable[None]]) -> None:
        """body_producer: drains the queue into the upstream connection."""
        self._upstream_write = write
        while True:
            item = await self._queue.get()
            if item is _END:
                if self._self_framed:
                    await write(b"0\r\n\r\n")
                return
            if item is _ABORT:
                # Raising makes the client close the upstream socket mid-body: the child sees
                # an incomplete request, never a complete-looking truncated one.
                raise ProxyAborted("upload aborted")
            if self._self_framed:
                item = b"%x\r\n%s\r\n" % (len(item), item)
            await write(item)

    def _cancel_hook(self, client: Any = None) -> Optional[Callable[[Any], None]]:
        """For a bodiless request on ``SimpleAsyncHTTPClient`` (which ignores ``cancel()``),
        a body producer that writes nothing and only keeps the upstream connection's
        ``write``, so that a client who leaves while the child is still thinking closes the
        upstream connection at once. Other clients (the keep-alive pool) get None: they
        cancel on ``future.cancel()``, and may retry a bodiless request on a stale connection,
        which they must not do for a body producer."""
        if not isinstance(client if client is not None else self.upstream.get(),
                          SimpleAsyncHTTPClient):
            return None

        def capture(write: Any) -> None:
            self._upstream_write = write
        return capture

    def _on_header_line(self, line: str) -> None:
        if self._aborted:
            raise ProxyAborted("client went away")
        text = line.rstrip("\r\n")
        if text.startswith("HTTP/"):
            self._resp_start = httputil.parse_response_start_line(text)
            self._resp_headers = httputil.HTTPHeaders()
        elif text == "":
            if self._resp_start is not None and not 100 <= self._resp_start.code < 200:
                self._apply_head(self._resp_start.code, self._resp_start.reason,
                                 self._resp_headers)
        else:
            if self._resp_headers is None:
                self._resp_headers = httputil.HTTPHeaders()
            self._resp_headers.parse_line(line)

    def _on_head(self, start_line: httputil.ResponseStartLine,
                 headers: httputil.HTTPHeaders) -> None:
        """The parsed response head (from the keep-alive pool): as the lines above would be."""
        if self._aborted:
            raise ProxyAborted("client went away")
        self._resp_start = start_line
        self._resp_headers = headers
        if not 100 <= start_line.code < 200:
            self._apply_head(start_line.code, start_line.reason, headers)

    def _on_chunk(self, chunk: bytes) -> Optional[Awaitable[None]]:
        if self._aborted or self._finished:
            raise ProxyAborted("client went away")
        self.write(chunk)
        self._sent_down += len(chunk)
        if self._down_length is not None and self._sent_down >= self._down_length:
            # The whole declared body is in hand and nothing more will be read from the
            # child: finish() sends it (with the head, for a small response) in one write.
            # A flush here would only add a write and a wait per response.
            if self._responding and not self._has_body:
                # A bodiless request whose method handler is awaiting this answer: finished
                # now, from the child's read, instead of once the handler's task has been
                # woken on the next loop iteration (a loop iteration less of latency on
                # every small GET). _finish_response() then finds it finished.
                self._finish_now()
            return None
        return self._flush_down()

    async def _flush_down(self) -> None:
        try:
            await self.flush()  # waits until the client took it: download back-pressure
        except StreamClosedError:
            self._client_gone = True
            self._abort_exchange("client went away")
            raise ProxyAborted("client went away") from None

    def _apply_head(self, code: int, reason: Optional[str], headers: httputil.HTTPHeaders) -> None:
        """Status, reason and headers from upstream replace Tornado's defaults."""
        # What clear() and clear_header() of the defaults (Server, Content-Type, Date) would
        # leave, without formatting a Date only to drop it: the headers below, nothing
        # buffered (nothing is written before the head), the status set just below.
        self.set_status(code, reason if reason is not None else None)
        fields = client_response_headers(headers)
        for name, value in fields:
            if _UNSENDABLE.search(value):  # a control character Tornado will not send
                log.debug("dropped response header %s with an unsendable value", name)
                fields = [(n, v) for n, v in fields if not _UNSENDABLE.search(v)]
                break
        # Checked when the head was parsed (and just above): not again per field by add_header
        _replace_response_head(self, headers_from_fields(fields))
        self._upstream_length_known = "Content-Length" in headers
        length = get_field(headers, "Content-Length")
        self._down_length = int(length) if length is not None and _DIGITS.match(length) else None
        self._head_applied = True

    async def _exchange(self) -> None:
        self._start_fetch()
        await self._complete_exchange()

    def _start_fetch(self) -> None:
        """Build the upstream request and start it: ``self._fetch`` is its future."""
        request = self.request
        headers = upstream_request_headers(request.headers, request.remote_ip,
                                           request.protocol, request.host, _ExactRequestHeaders)
        method = request.method or "GET"
        if self.access.token is not None and "Authorization" in headers:
            del headers["Authorization"]  # the gateway's token is not the service's business
        if self._self_framed:
            headers["Transfer-Encoding"] = "chunked"
        elif not self._has_body and method in _SELF_CHUNKING_METHODS \
                and "Content-Length" not in headers:
            headers["Content-Length"] = "0"  # else Tornado would announce a chunked body
        client = self.upstream.get()  # one look-up of the per-loop instance, not two
        upstream = _UpstreamRequest(
            (self._upstream_base or self.bridge.flask_url) + request.uri,
            method=method,
            headers=headers,
            body_producer=self._produce if self._has_body else self._cancel_hook(client),
            header_callback=_HeadCallback(self),
            streaming_callback=self._on_chunk,
            decompress_response=False,
            follow_redirects=False,
            allow_nonstandard_methods=True,
            request_timeout=self.config.proxy_timeout / 1000.0,
            connect_timeout=self.config.connect_timeout / 1000.0,
        )
        try:
            self._fetch = client.fetch(upstream, raise_error=False)
        except Exception as exc:  # answered as an upstream failure by _complete_exchange()
            self._fetch = asyncio.get_running_loop().create_future()
            self._fetch.set_exception(exc)

    async def _complete_exchange(self) -> None:
        """Await the upstream answer started by _start_fetch() and finish the response."""
        assert self._fetch is not None
        response: Optional[HTTPResponse] = None
        failure: Optional[BaseException] = None
        try:
            response = await self._fetch
            # The future holds the response, which holds the upstream request and its
            # callbacks (bound to this handler): a cycle the GC would have to find.
            self._fetch = None
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and getattr(task, "cancelling", lambda: 0)():
                raise  # our own task is being cancelled (shutdown): let it go
            failure = ProxyAborted("cancelled")
        except Exception as exc:  # connection errors and timeouts arrive as exceptions
            failure = exc
        finally:
            self._stop_upload()
            if self._slot is not None:
                self._release_worker()
        # 599 is also a status a child may really send: only an error the client made up
        # (not built from the child's response) is a failure
        if (response is not None and response.code == 599 and response.error is not None
                and getattr(response.error, "response", None) is not response):
            failure, response = response.error, None
        try:
            if response is not None:
                self._finish_response(response)
            else:
                assert failure is not None
                self._fail(failure)
        finally:
            self._log_request(response, failure)

    def _finish_response(self, response: HTTPResponse) -> None:
        if self._finished:
            return
        if not self._head_applied:  # a client implementation without header_callback
            self._apply_head(response.code, response.reason, response.headers)
        try:
            if (not self._headers_written and not self._upstream_length_known
                    and response.code not in (204, 304)):
                # Send the head as is; otherwise finish() would invent a Content-Length
                # (wrong for HEAD, and a framing change for an empty chunked body).
                self.flush()
        except Exception as exc:  # client gone
            log.debug("could not finish %s %s: %s", self.request.method, self.request.uri, exc)
            self._close_client()
            return
        self._finish_now()

    def _finish_now(self) -> None:
        try:
            self.finish()
        except Exception as exc:  # client gone, or the child's body did not match its length
            log.debug("could not finish %s %s: %s", self.request.method, self.request.uri, exc)
            self._close_client()

    def _fail(self, failure: BaseException) -> None:
        if self._finished:
            return
        if self._aborted or isinstance(failure, ProxyAborted) or isinstance(
                failure.__cause__, ProxyAborted):
            self._close_client()
            return
        if self._headers_written:
            # The head (and maybe part of the body) is out: closing is the only honest signal.
            log.debug("upstream failed mid-response for %s %s: %s", self.request.method,
                      self.request.uri, failure)
            self._close_client()
            return
        if _is_timeout(failure):
            self._refuse(errors.gateway_timeout(self.config.proxy_timeout / 1000.0))
            return
        detail = _describe(failure)
        try:
            self._worker.report_upstream_failure(detail)
        except Exception:  # the bridge's problem must not turn a 502 into a 500
            log.exception("report_upstream_failure failed")
        self._refuse(errors.bad_gateway(detail))

    # -- helpers ---------------------------------------------------------------------------

    def _arm_stall_timer(self) -> None:
        self._disarm_stall_timer()
        if self._discard or self._finished:
            return
        self._stall_timer = IOLoop.current().call_later(self.config.body_timeout / 1000.0,
                                                        self._on_body_stalled)

    def _disarm_stall_timer(self) -> None:
        if self._stall_timer is not None:
            IOLoop.current().remove_timeout(self._stall_timer)
            self._stall_timer = None

    def _on_body_stalled(self) -> None:
        """The client sent no body bytes for body_timeout: refuse (408) and drop it."""
        self._stall_timer = None
        if self._discard or self._finished:
            return
        timeout_s = self.config.body_timeout / 1000.0
        log.info("%s %s: request body stalled for %g s after %d bytes; closing", self.request.method,
                 self.request.uri, timeout_s, self._received)
        self._abort_exchange("request body stalled")
        if not self._headers_written:
            self._refuse(errors.request_timeout(timeout_s))
        else:
            self._close_client()

    def _refuse(self, error: GatewayError) -> None:
        """Answer ``error`` (headers not sent yet). When the request body has not been read to
        its end, Tornado closes the connection after this answer instead of reading the rest."""
        if self._finished:
            return
        self._discard = True
        try:
            write_error_response(self, error)
        except Exception as exc:
            log.debug("could not answer %d: %s", error.status, exc)
            self._close_client()

    def _stop_upload(self) -> None:
        """The exchange is over: drop request chunks from now on and free the queue (which
        also releases a data_received blocked on a full queue)."""
        self._discard = True
        queue = self._queue
        if queue is not None:
            while queue.qsize():
                queue.get_nowait()

    def _abort_exchange(self, reason: str) -> None:
        """Make the upstream exchange fail now, whatever phase it is in."""
        if self._aborted:
            return
        self._aborted = True
        log.debug("aborting %s %s: %s", self.request.method, self.request.uri, reason)
        self._stop_upload()
        if self._task is None and self._fetch is None:
            return  # no exchange started
        if self._queue is not None:
            self._queue.put_nowait(_ABORT)  # uploading: the producer raises
        if self._fetch is not None and not self._fetch.done():
            self._fetch.cancel()  # the keep-alive pool closes the upstream socket at once
        # simple_httpclient ignores cancel(): close its connection ourselves (best effort).
        connection = getattr(self._upstream_write, "__self__", None)
        stream = getattr(connection, "stream", None)
        if stream is not None and hasattr(stream, "close"):
            stream.close()

    def _close_client(self) -> None:
        self._discard = True
        connection = self.request.connection
        if connection is not None:
            connection.close()
        if not self._finished:
            try:
                self.finish()  # on a closed connection: only marks the handler finished
            except Exception:
                pass

    def _log_request(self, response: Optional[HTTPResponse], failure: Optional[BaseException]) -> None:
        if not self.config.is_development or not log.isEnabledFor(logging.DEBUG):
            return
        outcome = str(response.code) if response is not None else (
            "aborted" if self._aborted else "failed (%s)" % _describe(failure))
        log.debug("%s %s -> %s, %d bytes up, %d bytes down, %.1f ms", self.request.method,
                  redact(self.request.uri or ""), outcome, self._received, self._sent_down,
                  (time.monotonic() - self._t0) * 1000.0)


def _describe(exc: Optional[BaseException]) -> str:
    if exc is None:
        return "unknown error"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, ConnectionResetError):
        return "connection reset"
    if isinstance(exc, HTTPClientError):
        return exc.message or "HTTP %d" % exc.code
    return str(exc) or type(exc).__name__
