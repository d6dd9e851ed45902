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
import socket
import sys
import threading
import warnings
from typing import Any, Callable, Dict, List, Optional, Tuple

from tornado.netutil import bind_sockets

from .app import make_app
from .auth import Access, TokenFileError, access_for, is_loopback
from .supervisor.group import WorkerGroup
from .config import GatewayConfig, PRODUCTION
from .http.server import GatewayHTTPServer
from .proxy import UPSTREAM_CLIENTS, UpstreamClient  # noqa: F401 (UPSTREAM_CLIENTS: re-export)

log = logging.getLogger("tornado_gateway")
# where the gateway listens, and that it stopped: shown in every mode (as uvicorn and Flask do)
announce = logging.getLogger("tornado_gateway.announce")

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


def loop_signal_handler(loop: asyncio.AbstractEventLoop,
                        sig: int) -> Tuple[bool, Optional[Tuple[Callable[..., Any], tuple]]]:
    """The callback and arguments ``loop.add_signal_handler(sig, ...)`` registered, so that
    they can be put back: ``(True, (callback, args))``, ``(True, None)`` when none is, and
    ``(False, None)`` when the loop does not say (uvloop).

    asyncio has no public way to read a registered handler: this is the project's one use of
    its private table (``_signal_handlers``, ``Handle._callback``/``_args``), kept here, and
    ``tests/test_server.py`` fails the day asyncio changes it.
    """
    handlers = getattr(loop, "_signal_handlers", None)
    if not isinstance(handlers, dict):
        return False, None
    handle = handlers.get(sig)
    if handle is None:
        return True, None
    return True, (handle._callback, tuple(handle._args or ()))


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
        self._lost: List[int] = []  # the host's loop handlers that cannot be read back

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
                readable, host = loop_signal_handler(self._loop, sig)
                if readable:  # asyncio's loops
                    if host is not None:
                        self._loop_previous[sig] = host
                elif getattr(self._previous[sig], "__self__", None) is self._loop:
                    # uvloop keeps its handlers out of reach; the Python-level handler being
                    # the loop's own says one is registered, but not which
                    self._lost.append(sig)
                    log.warning("This %s event loop already has a handler for %s: the "
                                "gateway's replaces it and cannot give it back afterwards "
                                "(the loop does not expose it); register it again after "
                                "serve() returns.", type(self._loop).__module__.split(".")[0],
                                signal.Signals(sig).name)
                self._loop.add_signal_handler(sig, self._on_signal, sig)
                self._loop_handlers.append(sig)
        return True

    def restore(self) -> None:
        for sig in self._loop_handlers:
            self._loop.remove_signal_handler(sig)
        self._loop_handlers.clear()
        for sig, previous in self._previous.items():
            # a lost loop handler: the loop's own wake-up function would now swallow the
            # signal; remove_signal_handler() left the default action instead
            if previous is not None and sig not in self._lost:
                signal.signal(sig, previous)
        self._previous.clear()
        self._lost.clear()
        for sig, (callback, args) in self._loop_previous.items():
            self._loop.add_signal_handler(sig, callback, *args)
        self._loop_previous.clear()


def configure_upstream_client(config: GatewayConfig) -> None:
    """Deprecated, and does nothing: the proxy has its own HTTP client, chosen by
    ``config.upstream`` (:class:`~tornado_gateway.proxy.UpstreamClient`); the process-wide
    ``AsyncHTTPClient`` configuration is left alone."""
    warnings.warn("configure_upstream_client() is no longer needed and does nothing: the "
                  "proxy has its own HTTP client (GATEWAY_UPSTREAM chooses it)",
                  DeprecationWarning, stacklevel=2)


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
    announce.setLevel(logging.INFO)
    # the child's own output is shown in both modes: its verbosity is the child's to choose
    logging.getLogger("tornado_gateway.python").setLevel(logging.INFO)
    logging.getLogger("asyncio").setLevel(logging.WARNING)
    # the proxy logs each exchange itself (with sizes); the web page polls the status
    # endpoint every few seconds: Tornado's per-request access lines would only be noise
    logging.getLogger("tornado.access").setLevel(logging.WARNING)


async def serve(config: GatewayConfig, *, bridge: Optional[Any] = None,
                install_signals: bool = True,
                stop_event: Optional[asyncio.Event] = None,
                on_listening: Optional[Callable[[int], None]] = None) -> int:
    """Run the gateway until a shutdown signal (or ``stop_event``); return the exit code.

    Listens first, then starts the bridge, so the status endpoint and the web page answer at
    once and deepfake requests wait (bounded) while the child starts. Returns 1 without
    starting the child when the gateway's own port cannot be bound. ``bridge`` defaults to
    the :class:`WorkerGroup` that ``config`` describes (``FLASK_WORKERS`` workers); a
    :class:`PythonBridge` of your own serves as a single child without dispatch.
    """
    loop = asyncio.get_running_loop()
    bridge = bridge or WorkerGroup.from_config(config)
    stop_event = stop_event or asyncio.Event()
    try:
        access = access_for(config)
    except TokenFileError as exc:
        log.error("%s Fix the file, or set GATEWAY_TOKEN instead.", exc)
        return 2
    upstream = UpstreamClient(config)  # the proxy's own; AsyncHTTPClient's defaults untouched
    app = make_app(bridge, config, access, client=upstream)
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
    await server.start(sockets)
    port = sockets[0].getsockname()[1]
    base = "http://%s:%d" % (config.host if ":" not in config.host else "[%s]" % config.host,
                             port)
    announce.info("Gateway listening on %s (%s mode, %s): the web page at %s/, the "
                  "API at %s/api/deepfake/", base, config.mode,
                  _workers(len(getattr(bridge, "workers", ())) or 1), base, base)
    _announce_access(access, config, base)
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
        start_task.add_done_callback(lambda task: _announce_ready(task, bridge, base))
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
        bridge.cleanup()
        upstream.close()
    announce.info("Gateway stopped.")
    return 0


def loop_factory(name: str) -> Optional[Callable[[], asyncio.AbstractEventLoop]]:
    """What makes the event loop ``name`` ("asyncio" or "uvloop", ``GatewayConfig.loop``);
    None for asyncio's default. Raises RuntimeError when uvloop cannot be used here."""
    if name == "asyncio":
        return None
    if name != "uvloop":
        raise ValueError("unknown event loop %r (asyncio or uvloop)" % name)
    from .config import uvloop_problem

    problem = uvloop_problem()
    if problem:
        raise RuntimeError("loop='uvloop': " + problem)
    import uvloop

    return uvloop.new_event_loop


def run_in_new_loop(make_main: Callable[[], Any],
                    factory: Optional[Callable[[], asyncio.AbstractEventLoop]] = None,
                    version: tuple = sys.version_info[:2]) -> Any:
    """``asyncio.run(make_main())`` in a loop made by ``factory`` (asyncio's default when
    None): ``asyncio.Runner(loop_factory=...)`` from Python 3.11, the same steps as
    asyncio.run by hand before it (3.9, 3.10)."""
    if factory is None:
        return asyncio.run(make_main())
    if version >= (3, 11):
        with asyncio.Runner(loop_factory=factory) as runner:  # type: ignore[attr-defined]
            return runner.run(make_main())
    loop = factory()
    try:
        asyncio.set_event_loop(loop)
        return loop.run_until_complete(make_main())
    finally:
        try:
            _cancel_all_tasks(loop)
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.run_until_complete(loop.shutdown_default_executor())
        finally:
            asyncio.set_event_loop(None)
            loop.close()


def _cancel_all_tasks(loop: asyncio.AbstractEventLoop) -> None:
    # what asyncio.run does with the tasks left when its coroutine returns
    tasks = [t for t in asyncio.all_tasks(loop) if not t.done()]
    for task in tasks:
        task.cancel()
    if not tasks:
        return
    loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
    for task in tasks:
        if not task.cancelled() and task.exception() is not None:
            loop.call_exception_handler({"message": "unhandled exception during shutdown",
                                         "exception": task.exception(), "task": task})


def _announce_access(access: Access, config: GatewayConfig, base: str) -> None:
    """Say who may use the API; print a generated token's URL once (as Jupyter does)."""
    if access.generated:
        page = base
        if not is_loopback(config.host):
            page = page.replace("//%s:" % config.host, "//%s:" % socket.gethostname(), 1)
        announce.info("The API requires a token. Open this URL to use the web page (API "
                      "clients send 'Authorization: Bearer <token>'):\n    %s/?token=%s",
                      page, access.token)
    elif access.token is not None:
        announce.info("The API requires the token from %s.", access.source)
    elif not is_loopback(config.host):
        log.warning("GATEWAY_AUTH=none: the gateway listens on %s without authentication; "
                    "anyone who can reach this machine can label samples and retrain the model. "
                    "Keep it so only behind authentication of your own.", config.host)


def _announce_ready(task: "asyncio.Future[bool]", bridge: Any, base: str) -> None:
    """Say, in every mode, when the service first serves (the listening line comes before)."""
    if task.cancelled() or task.exception() is not None:
        return
    total = len(getattr(bridge, "workers", ())) or 1
    ready = getattr(bridge, "ready_count", None)
    if ready is None:  # a PythonBridge of the embedder's: one child
        ready = int(bridge.is_flask_ready())
    if ready:
        announce.info("Deepfake service ready (%d of %s): %s/api/deepfake/", ready,
                      _workers(total), base)


def _workers(count: int) -> str:
    return "%d worker%s" % (count, "" if count == 1 else "s")


def run(config: GatewayConfig) -> int:
    """Run the gateway in a fresh event loop (``config.loop``: asyncio's, or uvloop's) until
    Ctrl+C / SIGTERM; return the exit code."""
    factory = loop_factory(config.loop)
    try:
        return run_in_new_loop(lambda: serve(config), factory)
    except KeyboardInterrupt:
        # a Ctrl+C before serve() installed its handlers (no child yet; serve() stops one it
        # has started) or after it gave them back (the child is stopped by then)
        announce.info("Gateway stopped.")
        return 0
