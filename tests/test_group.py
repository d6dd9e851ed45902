"""WorkerGroup: the group's state and status from its workers', and the proxy dispatching real
requests to real upstream servers through it (least in flight, the per-worker limit, the FIFO
queue, 503 ``overloaded``, places given back on every path).

The workers here are external ones (``FLASK_URL`` with several URLs) pointing at
``tests/child_scripts/echo_server.py`` processes: real PythonBridges with real health checks.
Spawned workers are covered in ``tests/integration/test_workers_real.py``.
"""
from __future__ import annotations

import asyncio
import json
import socket
import time
from typing import Any, List

import pytest
import tornado.web
from tornado.httpclient import AsyncHTTPClient, HTTPClientError
from tornado.netutil import bind_sockets

from tornado_gateway.config import FlaskConfig, GatewayConfig, load_config
from tornado_gateway.http.server import GatewayHTTPServer
from tornado_gateway.supervisor.group import NoWorker, QueueTimeout, WorkerGroup
from tornado_gateway.supervisor.dispatch import Overloaded
from tornado_gateway.proxy import proxy_routes
from tornado_gateway.supervisor.state import BridgeState

from test_proxy import fetch, free_port, start_script, stop_script

S = BridgeState


# --- the group's view of its workers (fake workers: states set by hand) -----------------------

class FakeWorker:
    def __init__(self, state: BridgeState = S.READY, port: int = 5001) -> None:
        self._state = state
        self.name = None
        self.config = FlaskConfig(port=port)
        self.flask_url = "http://127.0.0.1:%d" % port
        self.external = False
        self._listeners: List[Any] = []
        self.failures: List[str] = []

    @property
    def state(self) -> BridgeState:
        return self._state

    def set_state(self, state: BridgeState) -> None:
        old, self._state = self._state, state
        for listener in list(self._listeners):
            listener(old, state, "test")

    def is_flask_ready(self) -> bool:
        return self._state is S.READY

    def add_state_listener(self, listener: Any) -> None:
        self._listeners.append(listener)

    def report_upstream_failure(self, reason: str) -> None:
        self.failures.append(reason)

    def status(self) -> dict:
        return {"state": self._state.value, "ready": self.is_flask_ready(), "pid": 1,
                "url": self.flask_url, "message": "m", "last_error": None}

    def describe_state(self) -> str:
        return "state %s" % self._state.value


@pytest.mark.parametrize("states,expected", [
    ((S.READY, S.EXITED), S.READY),
    ((S.FAILED, S.STARTING), S.STARTING),
    ((S.UNHEALTHY, S.EXITED), S.UNHEALTHY),
    ((S.EXITED, S.FAILED), S.FAILED),
    ((S.STOPPED, S.STOPPED), S.STOPPED),
])
def test_group_state_is_the_most_hopeful_worker_state(states, expected):
    group = WorkerGroup([FakeWorker(s, 5001 + i) for i, s in enumerate(states)])
    assert group.state is expected
    assert group.is_flask_ready() is (expected is S.READY)


def test_one_worker_status_is_that_workers_plus_workers_and_dispatch():
    worker = FakeWorker()
    status = WorkerGroup([worker]).status()
    assert {k: status[k] for k in worker.status()} == worker.status()
    assert status["workers"][0]["port"] == 5001 and status["workers"][0]["in_flight"] == 0
    assert status["dispatch"]["worker_limit"] == 2 and status["dispatch"]["queued"] == 0


def test_several_workers_status_names_each():
    group = WorkerGroup([FakeWorker(S.READY, 5001), FakeWorker(S.EXITED, 5002)])
    status = group.status()
    assert status["state"] == "ready" and status["ready"] is True
    assert [w["state"] for w in status["workers"]] == ["ready", "exited"]
    assert [w["port"] for w in status["workers"]] == [5001, 5002]
    assert "1 of 2 workers" in status["message"]


def test_from_config_gives_each_worker_its_port_and_name():
    config = load_config({"FLASK_WORKERS": "3", "FLASK_PORT": "6001"})
    group = WorkerGroup.from_config(config)
    assert [w.config.port for w in group.workers] == [6001, 6002, 6003]
    assert [w.name for w in group.workers] == ["worker 1", "worker 2", "worker 3"]
    assert [w.flask_url for w in group.workers] == [
        "http://127.0.0.1:600%d" % i for i in (1, 2, 3)]
    single = WorkerGroup.from_config(load_config({}))
    assert len(single.workers) == 1 and single.workers[0].name is None


def test_from_config_external_urls_are_one_worker_each():
    config = load_config({"FLASK_URL": "http://127.0.0.1:7001, http://127.0.0.1:7002/",
                          "FLASK_WORKERS": "5"})
    group = WorkerGroup.from_config(config)
    assert [w.flask_url for w in group.workers] == ["http://127.0.0.1:7001",
                                                   "http://127.0.0.1:7002"]
    assert all(w.external for w in group.workers)


async def test_waiters_get_no_worker_when_every_worker_goes_down():
    a, b = FakeWorker(S.READY, 5001), FakeWorker(S.READY, 5002)
    group = WorkerGroup([a, b], worker_limit=1, queue_limit=4)
    held = [group.try_acquire(), group.try_acquire()]
    assert held == [0, 1]
    waiter = asyncio.ensure_future(group.acquire())
    await asyncio.sleep(0)
    assert group.dispatcher.queued == 1
    a.set_state(S.EXITED)
    assert group.dispatcher.queued == 1  # b may still free a place
    b.set_state(S.EXITED)
    with pytest.raises(NoWorker):
        await waiter
    assert group.dispatcher.queued == 0


async def test_acquire_times_out_and_cancels_cleanly():
    group = WorkerGroup([FakeWorker()], worker_limit=1, queue_limit=2, queue_timeout_s=0.05)
    assert group.try_acquire() == 0
    with pytest.raises(QueueTimeout):
        await group.acquire()
    assert group.dispatcher.queued == 0 and group.timed_out == 1
    waiter = asyncio.ensure_future(group.acquire())
    await asyncio.sleep(0)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    group.release(0)
    assert group.dispatcher.in_flight == [0] and group.dispatcher.queued == 0


async def test_a_worker_becoming_ready_takes_the_queue():
    a, b = FakeWorker(S.READY, 5001), FakeWorker(S.STARTING, 5002)
    group = WorkerGroup([a, b], worker_limit=1, queue_limit=4)
    group.try_acquire()
    waiter = asyncio.ensure_future(group.acquire())
    await asyncio.sleep(0)
    b.set_state(S.READY)
    assert await asyncio.wait_for(waiter, 1) == 1


async def test_full_queue_raises_overloaded():
    group = WorkerGroup([FakeWorker()], worker_limit=1, queue_limit=0)
    group.try_acquire()
    with pytest.raises(Overloaded):
        await group.acquire()


# --- the proxy dispatching through a group of real upstream servers ---------------------------

@pytest.fixture(scope="module")
def echo_urls():
    procs = [start_script("echo_server.py", "--host", "127.0.0.1", "--port", "0")
             for _ in range(2)]
    yield ["http://127.0.0.1:%d" % port for _, port in procs]
    for proc, _ in procs:
        stop_script(proc)


@pytest.fixture
def dispatch() -> dict:
    return dict(worker_limit=1, queue_limit=4, queue_timeout=5000)


@pytest.fixture
def urls(request, echo_urls) -> List[str]:
    if getattr(request, "param", None) == "dead-first":
        return ["http://127.0.0.1:%d" % free_port(), echo_urls[0]]  # nothing listens there
    return echo_urls


@pytest.fixture
def config(urls, dispatch) -> GatewayConfig:
    flask = FlaskConfig(url=urls[0], urls=tuple(urls), health_interval=100, health_retries=3,
                        health_timeout=1000)
    return GatewayConfig(max_body=256 << 20, proxy_timeout=10000, connect_timeout=2000,
                         ready_wait=2000, flask=flask, **dispatch)


@pytest.fixture
def group(config) -> WorkerGroup:
    return WorkerGroup.from_config(config)


@pytest.fixture
def app(group, config):
    return tornado.web.Application(proxy_routes(group, config))


class GatewayClient:
    """Fetches from the gateway's own HTTP server (the one ``python -m tornado_gateway`` runs:
    it notices a client that leaves while its request waits for a worker)."""

    def __init__(self, port: int) -> None:
        self.base = "http://127.0.0.1:%d" % port

    def fetch(self, path: str, **kwargs: Any):
        return AsyncHTTPClient().fetch(self.base + path, **kwargs)


@pytest.fixture
def gateway_server(app, io_loop):
    server = GatewayHTTPServer(app)
    sockets = bind_sockets(0, "127.0.0.1")
    io_loop.run_sync(lambda: server.start(sockets))
    yield server, sockets[0].getsockname()[1]
    server.stop()
    io_loop.run_sync(server.close_all_connections)


@pytest.fixture
def gw_port(gateway_server) -> int:
    return gateway_server[1]


@pytest.fixture
def client(gw_port) -> GatewayClient:
    return GatewayClient(gw_port)


def work(client: Any, path: str, **kwargs: Any):
    """A work request (POST): the kind the per-worker limit and the queue are for."""
    return fetch(client, path, method="POST", body=b"", **kwargs)


async def started(group: WorkerGroup) -> WorkerGroup:
    await group.start()
    return group


async def settle(group: WorkerGroup, timeout: float = 5.0) -> None:
    """Wait until no request holds or waits for a place (released asynchronously)."""
    deadline = time.monotonic() + timeout
    while sum(group.dispatcher.in_flight) or group.dispatcher.queued:
        assert time.monotonic() < deadline, (group.dispatcher.in_flight,
                                             group.dispatcher.queued)
        await asyncio.sleep(0.01)


async def test_concurrent_requests_go_to_the_least_busy_worker(group, client):
    await started(group)
    try:
        slow = [work(client, "/api/deepfake/slow?delay=0.4") for _ in range(2)]
        responses = await asyncio.gather(*slow)
        assert [r.code for r in responses] == [200, 200]
        assert group.dispatcher.served == [1, 1]  # one each, limit 1: neither queued
        await settle(group)
        assert (await work(client, "/api/deepfake/x")).code == 200
        assert group.dispatcher.served == [2, 1]  # idle: the first worker
    finally:
        await group.stop()


@pytest.mark.parametrize("dispatch", [dict(worker_limit=1, queue_limit=1, queue_timeout=5000)])
async def test_a_full_queue_answers_503_overloaded_at_once(echo_urls, client, group):
    await started(group)
    try:
        # two workers, one place each, one waiting place: the fourth request is refused
        slow = [asyncio.ensure_future(work(client, "/api/deepfake/slow?delay=0.8"))
                for _ in range(3)]
        while group.dispatcher.queued < 1:
            await asyncio.sleep(0.01)
        t0 = time.monotonic()
        refused = await work(client, "/api/deepfake/x")
        assert time.monotonic() - t0 < 0.5  # at once, not after a place freed (0.8 s)
        assert refused.code == 503
        body = json.loads(refused.body)
        assert body["error"] == "overloaded"
        assert set(body) == {"error", "message", "suggestion", "timestamp"}
        assert "GATEWAY_QUEUE_LIMIT=1" in body["message"]
        assert refused.headers["Retry-After"] == "1"
        assert [r.code for r in await asyncio.gather(*slow)] == [200, 200, 200]
        await settle(group)
        assert group.dispatcher.refused == 1
    finally:
        await group.stop()


@pytest.mark.parametrize("dispatch", [dict(worker_limit=1, queue_limit=8, queue_timeout=200)])
async def test_waiting_longer_than_the_queue_timeout_is_503_overloaded(client,
                                                                       group):
    await started(group)
    try:
        slow = [asyncio.ensure_future(work(client, "/api/deepfake/slow?delay=1"))
                for _ in range(2)]
        while sum(group.dispatcher.working) < 2:
            await asyncio.sleep(0.01)
        late = await work(client, "/api/deepfake/x")
        assert late.code == 503 and json.loads(late.body)["error"] == "overloaded"
        assert "within 0.2 s" in json.loads(late.body)["message"]
        assert [r.code for r in await asyncio.gather(*slow)] == [200, 200]
        await settle(group)
        assert group.timed_out == 1
    finally:
        await group.stop()


def _fill_until_stuck(sock: socket.socket, total: int, stuck_s: float = 0.5) -> int:
    """Send up to ``total`` bytes without blocking; stop when nothing moves for ``stuck_s``."""
    sock.setblocking(False)
    block = b"u" * 65536
    sent, last_progress = 0, time.monotonic()
    while sent < total and time.monotonic() - last_progress < stuck_s:
        try:
            n = sock.send(block[:min(len(block), total - sent)])
        except BlockingIOError:
            time.sleep(0.005)
            continue
        sent += n
        last_progress = time.monotonic()
    return sent


@pytest.mark.parametrize("dispatch", [dict(worker_limit=1, queue_limit=4, queue_timeout=10000)])
async def test_a_queued_upload_is_not_read_until_it_has_a_worker(echo_urls, client,
                                                                  group, gw_port):
    await started(group)
    loop = asyncio.get_running_loop()
    total = 128 << 20
    sock = socket.create_connection(("127.0.0.1", gw_port))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)
    try:
        slow = [asyncio.ensure_future(work(client, "/api/deepfake/slow?delay=1.5"))
                for _ in range(2)]
        while sum(group.dispatcher.in_flight) < 2:
            await asyncio.sleep(0.01)
        sock.sendall(b"POST /api/deepfake/up HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n"
                     % total)
        while group.dispatcher.queued < 1:
            await asyncio.sleep(0.01)
        sent = await loop.run_in_executor(None, _fill_until_stuck, sock, total)
        # only the kernel's buffers took bytes: the gateway read none of the body
        assert sent < 16 << 20, sent
        assert group.dispatcher.queued == 1
        await asyncio.gather(*slow)
        # now it has a worker: the rest of the body flows
        rest = await loop.run_in_executor(None, _fill_until_stuck, sock, total - sent, 5.0)
        assert sent + rest == total
        sock.setblocking(True)
        sock.settimeout(10)

        def read_head() -> bytes:  # in a thread: the gateway runs on this test's loop
            answer = b""
            while b"\r\n\r\n" not in answer:
                answer += sock.recv(65536)
            return answer
        answer = await loop.run_in_executor(None, read_head)
        assert answer.startswith(b"HTTP/1.1 200")
    finally:
        sock.close()
        await settle(group)
        await group.stop()


@pytest.mark.parametrize("dispatch", [dict(worker_limit=1, queue_limit=4, queue_timeout=10000)])
async def test_a_client_leaving_the_queue_gives_up_its_place(client, group, gw_port):
    await started(group)
    try:
        slow = [asyncio.ensure_future(work(client, "/api/deepfake/slow?delay=0.8"))
                for _ in range(2)]
        while sum(group.dispatcher.in_flight) < 2:
            await asyncio.sleep(0.01)
        sock = socket.create_connection(("127.0.0.1", gw_port))
        sock.sendall(b"POST /api/deepfake/gone HTTP/1.1\r\nHost: t\r\nContent-Length: 0\r\n\r\n")
        while group.dispatcher.queued < 1:
            await asyncio.sleep(0.01)
        sock.close()
        deadline = time.monotonic() + 2
        while group.dispatcher.queued:
            assert time.monotonic() < deadline, "the departed client still holds its place"
            await asyncio.sleep(0.01)
        await asyncio.gather(*slow)
        await settle(group)
        assert sum(group.dispatcher.served) == 2  # the departed request never reached a worker
    finally:
        await group.stop()


async def test_places_come_back_after_502_and_aborted_uploads(client, group,
                                                              gw_port):
    await started(group)
    try:
        try:
            died = await fetch(client, "/api/deepfake/die?after=1000")
            assert died.code == 502
        except HTTPClientError:  # the head was out: the gateway closed the connection
            pass
        sock = socket.create_connection(("127.0.0.1", gw_port))
        sock.sendall(b"POST /api/deepfake/up?pause=0.3 HTTP/1.1\r\nHost: t\r\n"
                     b"Content-Length: 1000000\r\n\r\n" + b"a" * 1000)
        await asyncio.sleep(0.1)
        sock.close()  # mid-upload
        await settle(group)
        assert group.dispatcher.in_flight == [0, 0]
        ok = await asyncio.gather(*(fetch(client, "/api/deepfake/x")
                                    for _ in range(4)))
        assert [r.code for r in ok] == [200] * 4
    finally:
        await settle(group)
        await group.stop()


@pytest.mark.parametrize("urls", ["dead-first"], indirect=True)
async def test_a_worker_that_is_not_ready_gets_no_requests(client, group):
    await started(group)
    try:
        assert [w.state for w in group.workers] == [S.FAILED, S.READY]
        assert group.state is S.READY
        responses = await asyncio.gather(*(fetch(client, "/api/deepfake/x")
                                           for _ in range(5)))
        assert [r.code for r in responses] == [200] * 5
        assert group.dispatcher.served == [0, 5]
        status = group.status()
        assert status["workers"][0]["state"] == "failed" and status["ready"] is True
        assert status["workers"][1]["served"] == 5
    finally:
        await settle(group)
        await group.stop()


@pytest.mark.parametrize("dispatch", [dict(worker_limit=1, queue_limit=0, queue_timeout=5000)])
async def test_reads_are_never_held_back_by_work(client, group):
    """Both workers at their limit of work and no queue: a read (GET) is still served at once,
    on the worker with the fewest requests in flight, while work is refused 503."""
    await started(group)
    try:
        slow = [asyncio.ensure_future(work(client, "/api/deepfake/slow?delay=1"))
                for _ in range(2)]
        while sum(group.dispatcher.working) < 2:
            await asyncio.sleep(0.01)
        t0 = time.monotonic()
        reads = await asyncio.gather(*(fetch(client, "/api/deepfake/x") for _ in range(3)))
        assert [r.code for r in reads] == [200] * 3
        assert time.monotonic() - t0 < 0.9  # not behind the 1 s of work
        refused = await work(client, "/api/deepfake/x")
        assert refused.code == 503 and json.loads(refused.body)["error"] == "overloaded"
        await asyncio.gather(*slow)
        await settle(group)
        assert group.dispatcher.working == [0, 0] and group.dispatcher.in_flight == [0, 0]
        status = group.status()
        assert [w["work_in_flight"] for w in status["workers"]] == [0, 0]
    finally:
        await group.stop()
