"""server: shutdown signals, SignalCatcher install/restore, logging by mode, serve() and run()
with a bridge on fakes (no real child)."""
import asyncio
import logging
import signal
import socket
import threading

import pytest
from tornado.httpclient import AsyncHTTPClient

from tornado_gateway import server
from tornado_gateway.config import DEVELOPMENT, PRODUCTION, GatewayConfig
from tornado_gateway.server import (SignalCatcher, configure_logging, log_level_for, serve,
                                    shutdown_signals)
from tornado_gateway.supervisor.state import BridgeState

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def keep_http_client_config():
    saved = AsyncHTTPClient._save_configuration()
    yield
    AsyncHTTPClient._restore_configuration(saved)


@pytest.fixture
def keep_signals():
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    yield saved
    for s, h in saved.items():
        signal.signal(s, h)


def custom_handler(signum, frame):  # a host program's own handler
    pass


def test_shutdown_signals_per_platform():
    assert shutdown_signals("linux") == [signal.SIGINT, signal.SIGTERM]
    assert shutdown_signals("darwin") == [signal.SIGINT, signal.SIGTERM]
    win = shutdown_signals("win32")
    assert win[0] == signal.SIGINT and signal.SIGTERM not in win
    assert win[1:] == ([signal.SIGBREAK] if hasattr(signal, "SIGBREAK") else [])


@pytest.mark.parametrize("platform", ["linux", "win32"])
def test_signal_catcher_restores_exactly_the_previous_handlers(keep_signals, platform):
    signal.signal(signal.SIGTERM, custom_handler)
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

    async def main():
        got = []
        catcher = SignalCatcher(asyncio.get_running_loop(), got.append, platform=platform)
        assert catcher.install() is True
        assert signal.getsignal(signal.SIGINT) is not before[signal.SIGINT]
        signal.raise_signal(signal.SIGINT)
        await asyncio.sleep(0.05)
        catcher.restore()
        catcher.restore()  # twice is harmless
        return got

    got = asyncio.run(main())
    assert got == [signal.SIGINT]
    assert {s: signal.getsignal(s) for s in before} == before
    assert signal.getsignal(signal.SIGTERM) is custom_handler


def test_signal_catcher_gives_back_the_host_loop_signal_handler(keep_signals):
    # an embedding program that registered its own loop.add_signal_handler keeps it after the
    # gateway's serve() returns: a SIGTERM still reaches it
    async def main():
        loop = asyncio.get_running_loop()
        host, gateway = [], []
        loop.add_signal_handler(signal.SIGTERM, host.append, "host")
        try:
            before = signal.getsignal(signal.SIGTERM)
            catcher = SignalCatcher(loop, gateway.append, platform="linux")
            catcher.install()
            signal.raise_signal(signal.SIGTERM)
            await asyncio.sleep(0.05)
            catcher.restore()
            assert signal.getsignal(signal.SIGTERM) is before
            signal.raise_signal(signal.SIGTERM)
            await asyncio.sleep(0.05)
        finally:
            loop.remove_signal_handler(signal.SIGTERM)
        return host, gateway

    host, gateway = asyncio.run(main())
    assert gateway == [signal.SIGTERM] and host == ["host"]


def test_signal_catcher_does_nothing_outside_the_main_thread(keep_signals):
    before = signal.getsignal(signal.SIGINT)
    result = []

    def worker():
        loop = asyncio.new_event_loop()
        try:
            catcher = SignalCatcher(loop, lambda s: None)
            result.append(catcher.install())
            catcher.restore()
        finally:
            loop.close()

    t = threading.Thread(target=worker)
    t.start()
    t.join(5)
    assert result == [False] and signal.getsignal(signal.SIGINT) is before


def test_log_level_for_mode():
    assert log_level_for(DEVELOPMENT) == logging.DEBUG
    assert log_level_for(PRODUCTION) == logging.WARNING


@pytest.mark.parametrize("mode", [DEVELOPMENT, PRODUCTION])
def test_configure_logging_by_mode(mode):
    import io

    root = logging.getLogger()
    names = ["tornado_gateway", "tornado_gateway.python", "asyncio"]
    saved = (root.handlers[:], root.level, {n: logging.getLogger(n).level for n in names})
    stream = io.StringIO()
    try:
        configure_logging(mode, stream)
        logging.getLogger("tornado_gateway.bridge").debug("debug detail")
        logging.getLogger("tornado_gateway.bridge").warning("a warning")
        logging.getLogger("tornado_gateway.python").info("[Python] child line")
        out = stream.getvalue()
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
        for n, level in saved[2].items():
            logging.getLogger(n).setLevel(level)
    assert "a warning" in out and "WARNING" in out
    assert "[Python] child line" in out  # the child's output is shown in both modes
    assert ("debug detail" in out) is (mode == DEVELOPMENT)




def test_serve_with_stop_event_returns_zero_and_stops_the_child(gw_fakes, keep_http_client_config,
                                                                 keep_signals):
    control = gw_fakes.FakeControl()
    bridge = gw_fakes.make_bridge(control)
    before = {s: signal.getsignal(s) for s in keep_signals}

    async def main():
        stop = asyncio.Event()
        ports = []

        async def stopper():
            await asyncio.wait_for(bridge.wait_until_ready(None), 5)
            stop.set()

        asyncio.ensure_future(stopper())
        code = await serve(GatewayConfig(port=0), bridge=bridge, install_signals=False,
                           stop_event=stop, on_listening=ports.append)
        return code, ports

    code, ports = asyncio.run(main())
    assert code == 0 and ports and ports[0] > 0
    assert bridge.state is BridgeState.STOPPED
    assert control.calls == ["spawn", "request_stop"] and control.cleaned
    assert {s: signal.getsignal(s) for s in before} == before


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_serve_shuts_down_on_a_signal_and_restores_handlers(gw_fakes, keep_http_client_config,
                                                             keep_signals, sig):
    signal.signal(signal.SIGTERM, custom_handler)
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    control = gw_fakes.FakeControl(obey_stop=False)
    bridge = gw_fakes.make_bridge(control, shutdown_timeout=20)

    async def main():
        async def signaller():
            await asyncio.wait_for(bridge.wait_until_ready(None), 5)
            signal.raise_signal(sig)

        asyncio.ensure_future(signaller())
        with gw_fakes.capture_logs() as logs:
            code = await serve(GatewayConfig(port=0), bridge=bridge)
        return code, logs

    code, logs = asyncio.run(main())
    assert code == 0
    assert control.calls == ["spawn", "request_stop", "kill_tree"]
    assert bridge.state is BridgeState.STOPPED
    assert "Received %s: shutting down" % signal.Signals(sig).name in logs.text()
    assert {s: signal.getsignal(s) for s in before} == before


def test_second_signal_kills_the_tree_at_once(gw_fakes, keep_http_client_config, keep_signals):
    control = gw_fakes.FakeControl(obey_stop=False)
    bridge = gw_fakes.make_bridge(control, shutdown_timeout=60000)

    async def main():
        async def signaller():
            await asyncio.wait_for(bridge.wait_until_ready(None), 5)
            signal.raise_signal(signal.SIGINT)
            await asyncio.sleep(0.05)
            assert control.calls == ["spawn", "request_stop"]  # waiting for the child
            signal.raise_signal(signal.SIGINT)

        asyncio.ensure_future(signaller())
        return await asyncio.wait_for(serve(GatewayConfig(port=0), bridge=bridge), 10)

    assert asyncio.run(main()) == 0
    assert "kill_tree" in control.calls and bridge.state is BridgeState.STOPPED


def test_serve_returns_one_when_the_port_is_taken(gw_fakes, keep_http_client_config, caplog):
    control = gw_fakes.FakeControl()
    bridge = gw_fakes.make_bridge(control)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with caplog.at_level(logging.ERROR, logger="tornado_gateway"):
            code = asyncio.run(serve(GatewayConfig(port=port), bridge=bridge,
                                     install_signals=False, stop_event=asyncio.Event()))
    assert code == 1 and control.calls == [] and bridge.state is BridgeState.IDLE
    assert any("Cannot listen on 127.0.0.1:%d" % port in r.getMessage() and "GATEWAY_PORT"
               in r.getMessage() for r in caplog.records)


def test_serve_answers_status_while_running(gw_fakes, keep_http_client_config):
    import json

    bridge = gw_fakes.make_bridge(gw_fakes.FakeControl())

    async def main():
        stop = asyncio.Event()
        ports = []
        task = asyncio.ensure_future(serve(GatewayConfig(port=0), bridge=bridge,
                                           install_signals=False, stop_event=stop,
                                           on_listening=ports.append))
        await asyncio.wait_for(bridge.wait_until_ready(None), 5)
        client = AsyncHTTPClient(force_instance=True)
        try:
            resp = await client.fetch("http://127.0.0.1:%d/api/gateway/status" % ports[0])
        finally:
            client.close()
        stop.set()
        return json.loads(resp.body), await task

    body, code = asyncio.run(main())
    assert body["service"]["state"] == "ready" and code == 0


def test_run_runs_serve_in_a_fresh_loop(monkeypatch):
    seen = []

    async def fake_serve(config):
        seen.append((config, asyncio.get_running_loop()))
        return 0

    monkeypatch.setattr(server, "serve", fake_serve)
    cfg = GatewayConfig(port=0)
    assert server.run(cfg) == 0
    assert seen[0][0] is cfg


def test_run_returns_zero_on_a_ctrl_c_outside_the_handlers(monkeypatch):
    async def interrupted(config):
        raise KeyboardInterrupt

    monkeypatch.setattr(server, "serve", interrupted)
    assert server.run(GatewayConfig(port=0)) == 0


async def _head_timeout_server(timeout: float):
    import tornado.web
    from tornado.netutil import bind_sockets

    from tornado_gateway.http.server import GatewayHTTPServer

    class Hello(tornado.web.RequestHandler):
        def get(self) -> None:
            self.write("hi")

    srv = GatewayHTTPServer(tornado.web.Application([(r"/", Hello)]), head_timeout=timeout)
    sockets = bind_sockets(0, "127.0.0.1")
    await srv.start(sockets)
    return srv, sockets[0].getsockname()[1]


async def _closed_after(reader: asyncio.StreamReader, limit: float) -> float:
    loop = asyncio.get_running_loop()
    started = loop.time()
    assert await asyncio.wait_for(reader.read(100), limit) == b""
    return loop.time() - started


@pytest.mark.timeout(20)
async def test_head_timeout_closes_idle_and_slow_head_connections():
    srv, port = await _head_timeout_server(0.4)
    try:
        _r, w = await asyncio.open_connection("127.0.0.1", port)  # says nothing
        took = await _closed_after(_r, 3)
        assert 0.35 < took < 1.0, took
        w.close()
        r, w = await asyncio.open_connection("127.0.0.1", port)  # a head that never ends
        w.write(b"GET / HTTP/1.1\r\nHost: t\r\n")

        async def trickle() -> None:
            for _ in range(20):
                await asyncio.sleep(0.1)
                w.write(b"X")
        feeder = asyncio.ensure_future(trickle())
        took = await _closed_after(r, 3)
        feeder.cancel()
        assert 0.35 < took < 1.0, took
        w.close()
        assert not srv._waiting  # closed connections are forgotten
    finally:
        srv.stop()


@pytest.mark.timeout(20)
async def test_head_timeout_counts_from_each_request_not_the_connection():
    srv, port = await _head_timeout_server(0.4)
    try:
        r, w = await asyncio.open_connection("127.0.0.1", port)
        for _ in range(5):  # 5 x 0.2 s on one connection: longer than the timeout in all
            w.write(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
            head = await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 2)
            assert head.startswith(b"HTTP/1.1 200")
            assert await r.readexactly(2) == b"hi"
            await asyncio.sleep(0.2)
        w.close()
    finally:
        srv.stop()


# --- the event loop: asyncio (default) or uvloop --------------------------------------------

def _uvloop():
    return pytest.importorskip("uvloop", reason="uvloop is not installed (or Windows)")


@pytest.mark.parametrize("name", ["asyncio", "uvloop"])
def test_run_serves_in_the_configured_loop(monkeypatch, name):
    if name == "uvloop":
        _uvloop()
    seen = []

    async def fake_serve(config):
        seen.append(type(asyncio.get_running_loop()).__module__.split(".")[0])
        return 0

    monkeypatch.setattr(server, "serve", fake_serve)
    assert server.run(GatewayConfig(port=0, loop=name)) == 0
    assert seen == [name]


def test_loop_factory_names_and_refusals(monkeypatch):
    import sys

    assert server.loop_factory("asyncio") is None
    with pytest.raises(ValueError):
        server.loop_factory("trio")
    monkeypatch.setitem(sys.modules, "uvloop", None)  # as where it is not installed
    with pytest.raises(RuntimeError, match="loop='uvloop': uvloop is not installed"):
        server.loop_factory("uvloop")


# 3.9 and 3.10 have no asyncio.Runner: the steps by hand are checked on any Python, the
# Runner path where the running Python has it (the version the project is tested on)
_RUN_PATHS = [((3, 9), "by-hand")] + ([((3, 11), "Runner")] if hasattr(asyncio, "Runner")
                                     else [])


@pytest.mark.parametrize("version", [v for v, _ in _RUN_PATHS], ids=[i for _, i in _RUN_PATHS])
@pytest.mark.parametrize("name", ["asyncio", "uvloop"])
def test_run_in_new_loop_on_every_python(version, name):
    factory = asyncio.new_event_loop if name == "asyncio" else _uvloop().new_event_loop
    loops, left = [], []

    async def main():
        loops.append(asyncio.get_running_loop())

        async def forever():
            try:
                await asyncio.sleep(3600)
            finally:
                left.append("cancelled")
        asyncio.ensure_future(forever())
        await asyncio.sleep(0)
        return 42

    assert server.run_in_new_loop(main, factory, version=version) == 42
    assert type(loops[0]).__module__.split(".")[0] == name
    assert loops[0].is_closed() and left == ["cancelled"]  # leftovers cancelled, as asyncio.run


def test_signal_catcher_under_uvloop_restores_exactly_the_previous_handlers(keep_signals):
    uvloop = _uvloop()
    signal.signal(signal.SIGTERM, custom_handler)
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

    async def main():
        got = []
        catcher = SignalCatcher(asyncio.get_running_loop(), got.append, platform="linux")
        assert catcher.install() is True
        signal.raise_signal(signal.SIGINT)
        signal.raise_signal(signal.SIGTERM)
        await asyncio.sleep(0.05)
        catcher.restore()
        catcher.restore()
        return got

    got = server.run_in_new_loop(main, uvloop.new_event_loop)
    assert sorted(got) == [signal.SIGINT, signal.SIGTERM]
    assert {s: signal.getsignal(s) for s in before} == before
    assert signal.getsignal(signal.SIGTERM) is custom_handler


def test_signal_catcher_under_uvloop_warns_of_a_host_loop_handler_it_cannot_give_back(
        keep_signals, caplog):
    # uvloop does not expose its handlers: the host's SIGTERM callback on the loop is replaced
    # and cannot be put back. Said once, and SIGTERM is left at its default action afterwards
    # (not at the loop's wake-up function, which would now swallow it).
    uvloop = _uvloop()

    async def main():
        loop = asyncio.get_running_loop()
        host, gateway = [], []
        loop.add_signal_handler(signal.SIGTERM, host.append, "host")
        catcher = SignalCatcher(loop, gateway.append, platform="linux")
        with caplog.at_level(logging.WARNING, logger="tornado_gateway"):
            catcher.install()
        signal.raise_signal(signal.SIGTERM)
        await asyncio.sleep(0.05)
        catcher.restore()
        return host, gateway, signal.getsignal(signal.SIGTERM)

    host, gateway, after = server.run_in_new_loop(main, uvloop.new_event_loop)
    assert gateway == [signal.SIGTERM] and host == []
    assert after == signal.SIG_DFL
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and "uvloop event loop already has a handler for SIGTERM" in (
        warned[0])


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_serve_under_uvloop_shuts_down_on_a_signal_and_restores_handlers(
        gw_fakes, keep_http_client_config, keep_signals, sig):
    uvloop = _uvloop()
    signal.signal(signal.SIGTERM, custom_handler)
    control = gw_fakes.FakeControl(obey_stop=False)
    bridge = gw_fakes.make_bridge(control, shutdown_timeout=60000)

    async def main():
        before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

        async def signaller():
            await asyncio.wait_for(bridge.wait_until_ready(None), 5)
            signal.raise_signal(sig)
            await asyncio.sleep(0.05)
            assert control.calls == ["spawn", "request_stop"]
            signal.raise_signal(sig)  # the second one forces

        asyncio.ensure_future(signaller())
        with gw_fakes.capture_logs() as logs:
            code = await asyncio.wait_for(serve(GatewayConfig(port=0), bridge=bridge), 10)
        return code, logs, before, {s: signal.getsignal(s) for s in before}

    code, logs, before, after = server.run_in_new_loop(main, uvloop.new_event_loop)
    assert code == 0 and after == before
    assert control.calls == ["spawn", "request_stop", "kill_tree"]
    assert bridge.state is BridgeState.STOPPED
    name = signal.Signals(sig).name
    assert "Received %s: shutting down" % name in logs.text()
    assert "Received %s again: killing the Flask server now." % name in logs.text()


def test_loop_signal_handler_reads_what_asyncio_registered():
    """The one private asyncio API the gateway reads (server.loop_signal_handler): this fails
    the day asyncio stops keeping its handlers where the gateway looks."""
    from tornado_gateway.server import loop_signal_handler

    def host(*args):
        pass

    loop = asyncio.new_event_loop()
    try:
        assert loop_signal_handler(loop, signal.SIGUSR1) == (True, None)
        loop.add_signal_handler(signal.SIGUSR1, host, 1, "two")
        assert loop_signal_handler(loop, signal.SIGUSR1) == (True, (host, (1, "two")))
        loop.remove_signal_handler(signal.SIGUSR1)
    finally:
        loop.close()
