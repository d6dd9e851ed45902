"""Runtime faults with real signals: the child killed mid-upload and mid-download, frozen and
resumed, and the gateway itself killed."""
from __future__ import annotations

import json
import os
import signal
import socket
import time

import pytest

from rel_helpers import (SCRIPTS, alive, echo_args, encode, noise_image, port_is_free,
                         read_http_response, wait_until)

pytestmark = pytest.mark.integration


def assert_child_exit_reported(gw, sig: str) -> None:
    service = gw.wait_state("exited", timeout=10)
    assert service["last_exit"]["signal"] == sig, service["last_exit"]
    assert service["pid"] is None
    # later requests: the JSON 503, without touching the network
    later = gw.get("/api/deepfake/stats")
    assert later.is_gateway_error(503), later
    assert "(state: exited)" in later.json()["message"]
    # the gateway's own routes keep working
    assert gw.get("/api/gateway/status").status == 200
    assert gw.get("/").status == 200
    assert gw.get("/nowhere").is_gateway_error(404)
    assert "was killed by signal %s" % sig in wait_until(
        lambda: gw.log() if "was killed by signal" in gw.log() else None, 5, "the crash log")


@pytest.mark.timeout(40)
def test_child_sigkilled_during_upload(gateways):
    gw = gateways()
    child = gw.child_pid()
    total = 24 * 1024 * 1024
    head = ("POST /api/deepfake/analyze HTTP/1.1\r\nHost: t\r\nContent-Type: image/png\r\n"
            "Content-Length: %d\r\n\r\n" % total).encode()
    sock = socket.create_connection(("127.0.0.1", gw.port), timeout=10)
    try:
        sock.sendall(head)
        block = b"\x89PNG" + os.urandom(65532)
        sent = 0
        while sent < 2 * 1024 * 1024:  # the child is reading the body now
            sock.sendall(block)
            sent += len(block)
        time.sleep(0.3)
        os.kill(child, signal.SIGKILL)
        try:
            while sent < total:
                sock.sendall(block)
                sent += len(block)
        except OSError:
            pass  # the gateway closed the connection: an acceptable signal
        result = read_http_response(sock, timeout=10)
    finally:
        sock.close()
    # an error or a closed connection, never a success
    if result["status"] is not None and result["complete"]:
        assert result["status"] in (502, 503), result
        assert result["headers"]["content-type"].startswith("application/json")
    else:
        assert result["closed"], result
    assert result["status"] != 200
    assert_child_exit_reported(gw, "SIGKILL")
    assert gw.interrupt() == 0


@pytest.mark.timeout(40)
@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_child_sigkilled_during_download(gateways, chunked):
    gw = gateways(echo_args())
    child = gw.child_pid()
    size = 512 * 1024 * 1024
    sock = socket.create_connection(("127.0.0.1", gw.port), timeout=10)
    try:
        sock.sendall(("GET /api/deepfake/download?size=%d%s HTTP/1.1\r\nHost: t\r\n\r\n"
                      % (size, "&chunked=1" if chunked else "")).encode())
        sock.settimeout(10)
        first = b""
        while len(first) < 1024 * 1024:  # the download is streaming
            data = sock.recv(65536)
            assert data, "connection closed before the kill"
            first += data
        assert first.startswith(b"HTTP/1.1 200")
        os.kill(child, signal.SIGKILL)
        rest = read_http_response(_Prefixed(sock, first), timeout=10)
    finally:
        sock.close()
    assert rest["status"] == 200
    assert ("content-length" in rest["headers"]) == (not chunked)
    # the truncated body is never presented as complete: the connection is closed early
    assert not rest["complete"], "a truncated download was framed as complete"
    assert rest["closed"]
    assert len(rest["body"]) < size
    assert_child_exit_reported(gw, "SIGKILL")
    assert gw.interrupt() == 0


class _Prefixed:
    """A socket whose first recv() returns bytes already read."""

    def __init__(self, sock: socket.socket, prefix: bytes) -> None:
        self.sock = sock
        self.prefix = prefix

    def settimeout(self, t: float) -> None:
        self.sock.settimeout(t)

    def recv(self, n: int) -> bytes:
        if self.prefix:
            data, self.prefix = self.prefix, b""
            return data
        return self.sock.recv(n)


@pytest.mark.timeout(40)
def test_child_frozen_then_resumed(gateways):
    # auto-restart on: "no restart" below means the gateway chose not to, not that it could not
    gw = gateways(["--health-interval", "250", "--unhealthy-after", "2",
                   "--proxy-timeout", "1500", "--ready-wait", "300", "--auto-restart", "2"])
    child = gw.child_pid()
    os.kill(child, signal.SIGSTOP)
    try:
        started = time.monotonic()
        resp = gw.get("/api/deepfake/stats", timeout=10)
        took = time.monotonic() - started
        assert resp.is_gateway_error(504), resp
        assert 1.3 < took < 4.0, took
        # an upload to the frozen child: back-pressure stalls it, the proxy timeout ends it
        sock = socket.create_connection(("127.0.0.1", gw.port), timeout=10)
        try:
            sock.sendall(b"POST /api/deepfake/analyze HTTP/1.1\r\nHost: t\r\nContent-Type: "
                         b"image/png\r\nContent-Length: 8388608\r\n\r\n")
            sock.settimeout(0.2)
            started = time.monotonic()
            try:
                while time.monotonic() - started < 6:
                    sock.send(b"\0" * 65536)
            except OSError:
                pass  # stalled (timeout) or closed by the gateway after its answer
            upload = read_http_response(sock, timeout=6)
        finally:
            sock.close()
        # 504 if it reached the frozen child; 503 if health checks had already marked it
        # unhealthy (a race with the checker): either way a JSON answer, never a hang
        assert upload["status"] in (503, 504) and upload["complete"], upload
        assert json.loads(upload["body"])["error"] in ("Gateway timeout",
                                                       "Flask server unavailable")
        assert time.monotonic() - started < 8
        service = gw.wait_state("unhealthy", timeout=10)
        assert service["pid"] == child
        during = gw.get("/api/deepfake/stats", timeout=10)
        assert during.is_gateway_error(503), during
        assert "(state: unhealthy)" in during.json()["message"]
        assert during.header("Retry-After")
    finally:
        os.kill(child, signal.SIGCONT)
    service = gw.wait_state("ready", timeout=10)
    assert service["pid"] == child and service["restarts"] == 0
    after = gw.get("/api/deepfake/stats")
    assert after.status == 200 and "model_loaded" in after.json()
    assert "recovered" in gw.log()
    assert gw.interrupt() == 0


@pytest.mark.timeout(40)
@pytest.mark.parametrize("args,processes,ports", [
    ([], 1, 1),
    (["--mode", "production", "--workers", "1"], 1, 1),
    (["--mode", "production", "--workers", "2"], 2, 2),
    (["--flask-script", os.path.join(SCRIPTS, "reloading_service.py")], 2, 1),
], ids=["service", "service-production", "service-production-2-workers",
        "service-under-reloader"])
def test_gateway_sigkilled_child_and_grandchild_exit_and_free_the_port(gateways, args, processes,
                                                                       ports):
    gw = gateways(args, timeout=30)
    tree = gw.track()
    assert len(tree) == processes, tree
    created = {p.pid: p.create_time() for p in tree}
    gw.proc.kill()
    gw.proc.wait(5)
    started = time.monotonic()
    wait_until(lambda: not any(alive(pid, c) for pid, c in created.items()), 5,
               "the orphaned service processes to exit by themselves")
    wait_until(lambda: all(port_is_free(gw.flask_port + i) for i in range(ports)), 5,
               "the workers' ports to be free")
    assert time.monotonic() - started < 5


@pytest.mark.timeout(40)
def test_sigterm_with_transfers_in_flight_exits_0_and_cuts_them_honestly(gateways):
    gw = gateways(echo_args())
    download = socket.create_connection(("127.0.0.1", gw.port), timeout=10)
    upload = socket.create_connection(("127.0.0.1", gw.port), timeout=10)
    try:
        download.sendall(b"GET /api/deepfake/download?size=536870912 HTTP/1.1\r\nHost: t\r\n\r\n")
        first = download.recv(65536)
        assert first.startswith(b"HTTP/1.1 200")
        upload.sendall(b"POST /api/deepfake/up HTTP/1.1\r\nHost: t\r\nContent-Length: 900000"
                       b"\r\n\r\n" + b"a" * 1000)
        time.sleep(0.3)
        gw.track()
        started = time.monotonic()
        assert gw.interrupt(signal.SIGTERM) == 0
        assert time.monotonic() - started < 5
        rest = read_http_response(_Prefixed(download, first), timeout=5)
        assert not rest["complete"] and rest["closed"]
        cut = read_http_response(upload, timeout=5)
        assert cut["status"] in (None, 502, 503) and cut["closed"], cut
    finally:
        download.close()
        upload.close()
    assert gw.leftovers() == []
    assert "Received SIGTERM: shutting down" in gw.log()


@pytest.mark.timeout(40)
@pytest.mark.parametrize("upstream", ["keepalive", "simple"])
def test_misbehaving_child_cannot_desync_responses(gateways, upstream):
    """A child that sends an unsolicited second response behind a body, or a body shorter than
    its Content-Length: no client ever receives bytes meant for no one, and a short body is
    never presented as complete (upstream connections are pooled with "keepalive")."""
    gw = gateways(["--flask-script", os.path.join(SCRIPTS, "desync_server.py"),
                   "--upstream", upstream, "--proxy-timeout", "2000"])
    for i in range(4):
        split = gw.get("/api/deepfake/split")
        assert (split.status, split.body) == (200, b"hello")
        other = gw.get("/api/deepfake/other%d" % i)
        assert (other.status, other.body) == (200, b"ok /api/deepfake/other%d" % i)
    sock = socket.create_connection(("127.0.0.1", gw.port), timeout=10)
    try:
        sock.sendall(b"GET /api/deepfake/short HTTP/1.1\r\nHost: t\r\n\r\n")
        short = read_http_response(sock, timeout=8)
    finally:
        sock.close()
    assert short["status"] == 200 and short["body"] == b"0123456789"
    assert not short["complete"] and short["closed"]
    for i in range(3):
        assert gw.get("/api/deepfake/after%d" % i).body == b"ok /api/deepfake/after%d" % i
    assert gw.interrupt() == 0
