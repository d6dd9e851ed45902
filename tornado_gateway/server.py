"""run(): start the bridge, listen, handle signals, shut down gracefully, exit 0.

Shutdown on the first SIGINT/SIGTERM (Ctrl+Break on Windows): stop accepting connections,
stop the child (SIGTERM to its group, wait up to the shutdown timeout, kill the whole tree),
close the remaining connections, restore the signal handlers that were there before, return 0.
A second signal kills the child's tree at once.
"""
from __future__ import annotations

import asyncio
import logging
import signal
import sys
import threading
import time
from typing import Any, Callable, Dict, List, Optional

from tornado import httputil
from tornado.httpclient import AsyncHTTPClient
from tornado.httpserver import HTTPServer
from tornado.netutil import bind_sockets

from .app import make_app
from .bridge import PythonBridge
from .config import GatewayConfig, PRODUCTION
from .proxy import configure_http_client

log = logging.getLogger("tornado_gateway")

# bodies of the gateway's own (non-proxied) routes are small; the proxy raises its own limit
OWN_ROUTES_MAX_BODY = 1024 * 1024
IDLE_CONNECTION_TIMEOUT_S = 60.0
CLOSE_CONNECTIONS_TIMEOUT_S = 1.0


def shutdown_signals(platform: str = sys.platform) -> List[int]:
    """The signals that mean "shut down" on ``platform``: SIGINT and SIGTERM; on Windows
    SIGINT and SIGBREAK (Ctrl+Break), since SIGTERM cannot be sent to a process there."""
    if platform.startswith("win"):
        return [s for s in (getattr(signal, "SIGINT", None), getattr(signal, "SIGBREAK", None))
                if s is not None]
    return [signal.SIGINT, signal.SIGTERM]


class SignalCatcher:
    """Routes shutdown signals to ``on_signal`` on the event loop and, on ``restore()``, puts
    back exactly the handlers that were there, so an embedding program is left as it was."""

    def __init__(self, loop: asyncio.AbstractEventLoop, on_signal: Callable[[int], None],
                 platform: str = sys.platform) -> None:
        self._loop = loop
        self._on_signal = on_signal
        self._platform = platform
        self._previous: Dict[int, Any] = {}
        self._loop_handlers: List[int] = []
        self._loop_previous: Dict[int, Any] = {}  # the host's own loop.add_signal_handler

    def install(self) -> bool:
        if threading.current_thread() is not threading.main_thread():
            log.debug("not in the main thread: signal handlers left to the host program")
            return False
        for sig in shutdown_signals(self._platform):
            self._previous[sig] = signal.getsignal(sig)
            if self._platform.startswith("win"):
                # no add_signal_handler on Windows' event loops
                signal.signal(sig, lambda s, _f: self._loop.call_soon_threadsafe(
                    self._on_signal, s))
            else:
                # add_signal_handler replaces a callback the host program registered on this
                # loop, and remove_signal_handler would drop it: keep it to put it back
                host = getattr(self._loop, "_signal_handlers", {}).get(sig)
                if host is not None:
                    self._loop_previous[sig] = host
                self._loop.add_signal_handler(sig, self._on_signal, sig)
                self._loop_handlers.append(sig)
        return True

    def restore(self) -> None:
        for sig in self._loop_handlers:
            self._loop.remove_signal_handler(sig)
        self._loop_handlers.clear()
        for sig, previous in self._previous.items():
            if previous is not None:
                signal.signal(sig, previous)
        self._previous.clear()
        for sig, host in self._loop_previous.items():
            self._loop.add_signal_handler(sig, host._callback, *host._args)
        self._loop_previous.clear()


UPSTREAM_CLIENTS = {
    # upstream keep-alive: no new TCP connection (and TIME_WAIT socket) per proxied request
    "keepalive": "tornado_gateway.pool.KeepAliveHTTPClient",
    "simple": "tornado.simple_httpclient.SimpleAsyncHTTPClient",
}
# below waitress's default channel_timeout (120 s) and werkzeug's, so the gateway closes an
# idle upstream connection before the child does
UPSTREAM_IDLE_TIMEOUT_S = 4.0


def configure_upstream_client(config: GatewayConfig) -> None:
    """Select the proxy's HTTP client from ``config.upstream`` (the keep-alive pool unless
    ``GATEWAY_UPSTREAM=simple``) and size it for streaming; call once, before the first
    request. This is what ``python -m tornado_gateway`` does, and what an embedding
    application should do too.

    ``AsyncHTTPClient.configure`` is process-wide: the application's own ``AsyncHTTPClient()``
    fetches use the pool as well (it follows redirects, decompresses gzip and streams like
    Tornado's default client). To keep a client of your own choosing for the proxy, call
    :func:`~tornado_gateway.proxy.configure_http_client` instead.
    """
    impl = UPSTREAM_CLIENTS[config.upstream]
    AsyncHTTPClient.configure(None)  # drop settings meant for another implementation
    extra = {"idle_timeout": UPSTREAM_IDLE_TIMEOUT_S} if config.upstream == "keepalive" else {}
    configure_http_client(config, impl=impl, **extra)


def log_level_for(mode: str) -> int:
    """Verbose in development; warnings and errors only in production (design property 11)."""
    return logging.WARNING if mode == PRODUCTION else logging.DEBUG


def configure_logging(mode: str, stream: Any = None) -> None:
    """The command line's logging: timestamps, level, message; the child's lines carry
    ``[Python] ``. Library users keep their own logging (``run()`` does not call this)."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s.%(msecs)03d %(levelname)-7s %(message)s",
                                           "%H:%M:%S"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO if mode != PRODUCTION else logging.WARNING)
    logging.getLogger("tornado_gateway").setLevel(log_level_for(mode))
    # the child's own output is shown in both modes: its verbosity is the child's to choose
    logging.getLogger("tornado_gateway.python").setLevel(logging.INFO)
    logging.getLogger("asyncio").setLevel(logging.WARNING)
    # the proxy logs each exchange itself (with sizes); the web page polls the status
    # endpoint every few seconds: Tornado's per-request access lines would only be noise
    logging.getLogger("tornado.access").setLevel(logging.WARNING)


def _nodelay_pinned(value: bool) -> None:
    """A connection's ``set_nodelay``: TCP_NODELAY stays on (set once when accepted)."""


class _HeadWatch(httputil.HTTPMessageDelegate):
    """Passes a request through; the moment its head is complete, the connection stops
    counting as waiting for one (see :class:`GatewayHTTPServer`)."""

    __slots__ = ("_delegate", "_waiting", "_conn")

    def __init__(self, delegate: httputil.HTTPMessageDelegate, waiting: Dict[Any, float],
                 conn: Any) -> None:
        self._delegate = delegate
        self._waiting = waiting
        self._conn = conn

    def headers_received(self, start_line: Any, headers: httputil.HTTPHeaders) -> Any:
        self._waiting.pop(self._conn, None)
        return self._delegate.headers_received(start_line, headers)

    def data_received(self, chunk: bytes) -> Any:
        return self._delegate.data_received(chunk)

    def finish(self) -> None:
        self._delegate.finish()

    def on_connection_close(self) -> None:
        self._waiting.pop(self._conn, None)
        self._delegate.on_connection_close()


class GatewayHTTPServer(HTTPServer):
    """Tornado's HTTPServer, cheaper per request on two counts.

    * TCP_NODELAY is on for each client connection's whole life. HTTP1Connection turns
      Nagle's algorithm off when it finishes a response and on again right after (two
      ``setsockopt`` calls and their Python layers per request); the gateway writes whole
      heads and body chunks, none of which should wait for Nagle.
    * ``head_timeout``: a connection waiting for a request head (idle keep-alive, or a head
      still incomplete) longer than this is closed, as Tornado's ``idle_connection_timeout``
      does, but checked by one sweep every quarter of the timeout instead of a
      ``gen.with_timeout`` (a future, a chained future, a loop timer and two callbacks)
      around every head read. Tornado applies that wrapper even without the setting (with
      3600 s), so it is switched off here. A connection is closed between 1 and 1.25 times
      the timeout after it started waiting.
    """

    def initialize(self, *args: Any, head_timeout: Optional[float] = None,  # type: ignore[override]
                   **kwargs: Any) -> None:
        super().initialize(*args, **kwargs)
        self._head_timeout = head_timeout
        if head_timeout:
            self.conn_params.header_timeout = None
        self._waiting: Dict[Any, float] = {}  # server connection -> waiting since
        self._sweeper: Optional[asyncio.TimerHandle] = None

    def handle_stream(self, stream: Any, address: Any) -> None:
        stream.set_nodelay(True)
        stream.set_nodelay = _nodelay_pinned
        super().handle_stream(stream, address)

    def start_request(self, server_conn: Any, request_conn: Any) -> httputil.HTTPMessageDelegate:
        delegate = super().start_request(server_conn, request_conn)
        if not self._head_timeout:
            return delegate
        self._waiting[server_conn] = time.monotonic()
        if self._sweeper is None:
            self._sweeper = asyncio.get_running_loop().call_later(
                self._head_timeout / 4, self._sweep)
        return _HeadWatch(delegate, self._waiting, server_conn)

    def on_close(self, server_conn: Any) -> None:
        self._waiting.pop(server_conn, None)
        super().on_close(server_conn)

    def _sweep(self) -> None:
        self._sweeper = None
        assert self._head_timeout
        now = time.monotonic()
        for conn, since in list(self._waiting.items()):
            if now - since >= self._head_timeout:
                del self._waiting[conn]
                conn.stream.close()  # its request loop ends and on_close() runs
        if self._waiting:
            self._sweeper = asyncio.get_running_loop().call_later(
                self._head_timeout / 4, self._sweep)

    def stop(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        super().stop()


async def serve(config: GatewayConfig, *, bridge: Optional[PythonBridge] = None,
                install_signals: bool = True,
                stop_event: Optional[asyncio.Event] = None,
                on_listening: Optional[Callable[[int], None]] = None) -> int:
    """Run the gateway until a shutdown signal (or ``stop_event``); return the exit code.

    Listens first, then starts the bridge, so the status endpoint and the web page answer at
    once and deepfake requests wait (bounded) while the child starts. Returns 1 without
    starting the child when the gateway's own port cannot be bound.
    """
    loop = asyncio.get_running_loop()
    bridge = bridge or PythonBridge(config.flask)
    stop_event = stop_event or asyncio.Event()
    configure_upstream_client(config)
    app = make_app(bridge, config)
    try:
        sockets = bind_sockets(config.port, config.host)
    except OSError as exc:
        log.error("Cannot listen on %s:%d: %s. Stop the other process using the port, or choose "
                  "another with GATEWAY_PORT / --port.", config.host, config.port, exc.strerror
                  or exc)
        return 1
    # Slow clients cannot hold a connection forever: an idle connection, and a request head
    # still incomplete, are closed after idle_timeout; a body must arrive within body_timeout
    # (the proxy turns this into an inactivity limit, so long uploads that keep moving pass).
    server = GatewayHTTPServer(app, max_body_size=OWN_ROUTES_MAX_BODY,
                        head_timeout=config.idle_timeout / 1000.0,
                        body_timeout=config.body_timeout / 1000.0)
    server.add_sockets(sockets)
    port = sockets[0].getsockname()[1]
    log.info("Gateway listening on http://%s:%d (%s mode); the deepfake API is at /api/deepfake/",
             config.host if ":" not in config.host else "[%s]" % config.host, port, config.mode)
    if config.host not in ("127.0.0.1", "::1", "localhost"):
        log.warning("The gateway listens on %s: anyone who can reach this machine can use it. "
                    "It has no authentication.", config.host)
    if on_listening is not None:
        on_listening(port)

    signals_seen = []

    def on_signal(sig: int) -> None:
        signals_seen.append(sig)
        name = signal.Signals(sig).name
        if len(signals_seen) == 1:
            log.info("Received %s: shutting down (press Ctrl+C again to force).", name)
            stop_event.set()
        else:
            log.warning("Received %s again: killing the Flask server now.", name)
            asyncio.ensure_future(bridge.force_stop())

    catcher = SignalCatcher(loop, on_signal)
    if install_signals:
        catcher.install()
    try:
        start_task = asyncio.ensure_future(bridge.start())
        await stop_event.wait()
        server.stop()
        await bridge.stop()
        if not start_task.done():
            start_task.cancel()
        try:
            await asyncio.wait_for(server.close_all_connections(), CLOSE_CONNECTIONS_TIMEOUT_S)
        except asyncio.TimeoutError:
            log.debug("some connections were still open at exit")
    finally:
        # stop the child before giving the handlers back: a Ctrl+C meanwhile still forces it
        if bridge.state.value not in ("stopped",):
            await bridge.stop()
        catcher.restore()
        bridge._control.cleanup()
    log.info("Gateway stopped.")
    return 0


def run(config: GatewayConfig) -> int:
    """Run the gateway in a fresh event loop until Ctrl+C / SIGTERM; return the exit code."""
    try:
        return asyncio.run(serve(config))
    except KeyboardInterrupt:
        # a Ctrl+C before serve() installed its handlers (no child yet; serve() stops one it
        # has started) or after it gave them back (the child is stopped by then)
        log.info("Gateway stopped.")
        return 0
