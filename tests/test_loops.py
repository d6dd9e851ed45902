"""The gateway's loop-sensitive parts under both event loops (asyncio's and uvloop's), with real
sockets and real processes: its HTTP/1.1 server, the upstream pool's MSG_PEEK liveness check
and its salvage of an answer left in the socket after a failed write, and the POSIX child
whose exit uvloop reports through a waiter thread (uvloop keeps SIGCHLD for itself).

Each test runs once per loop (the ``io_loop`` fixture below replaces pytest-tornasync's); the
uvloop runs are skipped where uvloop is not installed (Windows, PyPy).
"""
from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import threading
import time
from typing import Any, Callable, List

import pytest
import tornado.web
from tornado.ioloop import IOLoop
from tornado.netutil import bind_sockets

from tornado_gateway.http import client as pool_mod
from tornado_gateway.supervisor.child import PosixProcessControl
from tornado_gateway.http.server import GatewayHTTPServer
from tornado_gateway.http.client import UpstreamHTTPClient

pytestmark = pytest.mark.timeout(30)

EARLY_ANSWER_SERVER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "child_scripts",
                                   "early_answer_server.py")


@pytest.fixture(params=["asyncio", "uvloop"])
def io_loop(request: Any) -> Any:
    if request.param == "uvloop":
        uvloop = pytest.importorskip("uvloop", reason="uvloop is not installed (or Windows)")
        aloop = uvloop.new_event_loop()
    else:
        aloop = asyncio.new_event_loop()
    loop = IOLoop(asyncio_loop=aloop)
    loop.make_current()
    loop.loop_name = request.param  # type: ignore[attr-defined]
    yield loop
    loop.clear_current()
    loop.close(all_fds=True)


def running_loop_name() -> str:
    return type(asyncio.get_running_loop()).__module__.split(".")[0]


# --------------------------------------------------------------------- the gateway's server

class Echo(tornado.web.RequestHandler):
    def get(self) -> None:
        self.write("hello")

    def post(self) -> None:
        self.write({"received": len(self.request.body)})


async def test_gateway_http_server_serves_keepalive_and_bodies(io_loop):
    assert running_loop_name() == io_loop.loop_name
    srv = GatewayHTTPServer(tornado.web.Application([(r"/", Echo)]))
    sockets = bind_sockets(0, "127.0.0.1")
    await srv.start(sockets)
    port = sockets[0].getsockname()[1]
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        for _ in range(2):  # the same connection twice: kept alive
            writer.write(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            assert head.startswith(b"HTTP/1.1 200") and b"Content-Length: 5" in head
            assert await reader.readexactly(5) == b"hello"
        body = b"x" * 300000
        writer.write(b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n" % len(body))
        writer.write(body)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        length = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
        assert json.loads(await reader.readexactly(length)) == {"received": len(body)}
        writer.close()
    finally:
        srv.stop()
        await srv.close_all_connections()


# --------------------------------------------------------------------- the upstream pool

class OneShotServer:
    """A plain-socket HTTP server in a thread: answers one request keep-alive on one
    connection, then closes it when told to, while the test's loop is blocked."""

    def __init__(self) -> None:
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(4)
        self.url = "http://127.0.0.1:%d" % self.listener.getsockname()[1]
        self.close_now = threading.Event()
        self.closed = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        conn, _ = self.listener.accept()
        with conn:
            data = b""
            while b"\r\n\r\n" not in data:
                data += conn.recv(4096)
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            self.close_now.wait(10)
        self.closed.set()

    def stop(self) -> None:
        self.close_now.set()
        self.listener.close()
        self.thread.join(5)


async def test_pool_peek_sees_a_close_the_loop_has_not_read_yet(io_loop):
    server = OneShotServer()
    client = UpstreamHTTPClient(force_instance=True)
    try:
        assert (await client.fetch(server.url + "/a")).body == b"ok"
        [(conn, _since)] = [item for dq in client._idle.values() for item in dq]
        # the socket the pool made, not the transport's (uvloop's is a PseudoSocket, no recv)
        assert type(conn.sock) is socket.socket
        assert conn.alive() is True  # nothing to read: EAGAIN
        server.close_now.set()
        assert server.closed.wait(5)
        time.sleep(0.1)  # the FIN is in; the loop is blocked here and has not seen it
        assert not conn.closed
        assert conn.alive() is False  # MSG_PEEK read the EOF
    finally:
        client.close()
        server.stop()


async def test_pool_salvages_the_answer_left_in_the_socket_after_a_failed_write(
        io_loop, monkeypatch):
    """test_http_client's deterministic early-answer race, under both loops: the 413 and the reset
    arrive while the loop is blocked, the next write fails before the transport read the
    answer, and what _salvage reads from the socket is the request's answer."""
    salvaged: List[int] = []
    original = pool_mod._Upstream._salvage

    def counting_salvage(self: Any, exchange: Any) -> None:
        real = self.sock

        class Counting:
            def recv(self, n: int, *flags: int) -> bytes:
                data = real.recv(n, *flags)
                salvaged.append(len(data))
                return data
        self.sock = Counting() if real is not None else None
        try:
            original(self, exchange)
        finally:
            self.sock = real

    monkeypatch.setattr(pool_mod._Upstream, "_salvage", counting_salvage)
    proc = subprocess.Popen([sys.executable, EARLY_ANSWER_SERVER, "--port", "0", "--limit", "10",
                             "--close", "rst"], stdout=subprocess.PIPE, text=True)
    client = UpstreamHTTPClient(force_instance=True)
    try:
        line = proc.stdout.readline() if proc.stdout is not None else ""
        assert line.startswith("LISTENING"), line
        url = "http://127.0.0.1:%s" % line.split()[1]

        async def produce(write: Callable[[bytes], Any]) -> None:
            for _ in range(5):
                await write(b"a" * 1000)
                time.sleep(0.2)  # the loop does not run: the answer stays unread

        resp = await client.fetch(url + "/up", method="POST",
                                  headers={"Content-Length": "5000"}, body_producer=produce,
                                  raise_error=False, request_timeout=10)
        assert resp.code == 413, resp.error
        assert json.loads(resp.body)["error"] == "Request Entity Too Large"
        assert sum(salvaged) > 0  # the answer came from the salvage, on this loop too
    finally:
        client.close()
        proc.terminate()
        proc.wait(5)


# --------------------------------------------------------------------- the child's exit

posix_only = pytest.mark.skipif(os.name == "nt", reason="the POSIX process control")


@pytest.fixture
def spawned() -> Any:
    """Children started by a test; any still running afterwards is killed by its pid."""
    handles: List[Any] = []
    yield handles
    for handle in handles:
        if handle.popen.poll() is None:
            handle.popen.kill()
            handle.popen.wait(5)


@posix_only
async def test_posix_child_exit_and_stop_are_seen_on_either_loop(io_loop, spawned,
                                                                  monkeypatch):
    from tornado.process import Subprocess

    monkeypatch.setattr(Subprocess, "_initialized", False)  # whatever an earlier test left
    control = PosixProcessControl()
    exits: List[int] = []
    crash = [sys.executable, "-c", "import sys; sys.stderr.write('bye\\n'); sys.exit(3)"]
    handle = control.spawn(crash, dict(os.environ), None, exits.append)
    spawned.append(handle)
    # uvloop keeps SIGCHLD: a waiter thread instead of Subprocess's handler
    assert Subprocess._initialized is (io_loop.loop_name == "asyncio")
    assert await handle.wait(10) and handle.returncode == 3 and exits == [3]
    assert handle.stderr.read() == b"bye\n"

    sleeper = [sys.executable, "-c", "import time; print('up', flush=True); time.sleep(60)"]
    handle = control.spawn(sleeper, dict(os.environ), None, exits.append)
    spawned.append(handle)
    assert handle.stdout.readline() == b"up\n"
    assert os.getsid(handle.pid) == handle.pid  # its own session: the group can be signalled
    assert control.request_stop(handle) == "SIGTERM to process group %d" % handle.pid
    assert await handle.wait(10) and handle.returncode == -15 and exits == [3, -15]
    control.cleanup()
    assert Subprocess._initialized is False
