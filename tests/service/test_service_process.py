"""The real entry point: start-up time, both servers, the debugger guard, the parent watch."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from service_images import PYTHON_DIR, encode, pink_noise

SCRIPT = os.path.join(PYTHON_DIR, "api_server.py")
pytestmark = pytest.mark.integration


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def request(url: str, data: bytes | None = None, content_type: str = "image/png"):
    req = urllib.request.Request(url, data=data, method="POST" if data is not None else "GET")
    if data is not None:
        req.add_header("Content-Type", content_type)
    try:
        with urllib.request.urlopen(req, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


class Service:
    """One api_server.py process on a free port, stopped (and reaped) by ``stop``."""

    def __init__(self, tmp_path, env_mode: str, extra_env: dict | None = None) -> None:
        self.port = free_port()
        self.url = "http://127.0.0.1:%d/api/deepfake" % self.port
        env = {k: v for k, v in os.environ.items() if k != "TORNADO_GATEWAY_PID"}
        env.update(PYTHONUNBUFFERED="1", GATEWAY_ENV=env_mode,
                   DEEPFAKE_DATA_DIR=str(tmp_path / "data"), **(extra_env or {}))
        self.started = time.monotonic()
        # run from an unrelated directory: the script must find its package itself
        self.proc = subprocess.Popen([sys.executable, SCRIPT, "--port", str(self.port)],
                                     cwd=str(tmp_path), env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)

    def wait_ready(self, timeout: float = 15.0) -> float:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                status, body = request(self.url + "/stats")
                if status == 200:
                    return time.monotonic() - self.started
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            assert self.proc.poll() is None, self.proc.stdout.read()
            time.sleep(0.02)
        raise AssertionError("service not ready in %.0f s" % timeout)

    def stop(self) -> str:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.stdout.read()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode", ["development", "production"])
def test_the_service_starts_fast_and_serves(tmp_path, mode) -> None:
    service = Service(tmp_path, mode)
    try:
        ready_after = service.wait_ready()
        assert ready_after < 5.0  # typically ~0.5 s; generous for loaded CI machines
        status, body = request(service.url + "/stats")
        assert status == 200 and body["model_loaded"] is True
        status, body = request(service.url + "/analyze", encode(pink_noise(256, seed=1)))
        assert status == 200 and body["regions_examined"] == 16
        status, body = request(service.url + "/stats?__debugger__=yes&cmd=resource&f=x.js")
        assert status == 404 and body["error"] == "Not found"
        status, body = request(service.url + "/analyze", b"garbage")
        assert status == 415 and "Traceback" not in json.dumps(body)
    finally:
        log = service.stop()
    assert "listening on http://127.0.0.1:%d (%s" % (service.port, mode) in log
    assert ("waitress" in log) == (mode == "production")


@pytest.mark.timeout(60)
def test_production_refuses_a_body_over_the_limit_with_json(tmp_path) -> None:
    service = Service(tmp_path, "production", {"DEEPFAKE_MAX_UPLOAD": "20000"})
    try:
        service.wait_ready()
        status, body = request(service.url + "/analyze", b"\0" * 30000)
        assert status == 413 and body["error"] == "File too large"  # the app's own check
        # over waitress's own limit: refused from the headers alone (a client that sent the
        # whole body first would race the close, so only the headers are sent here)
        with socket.create_connection(("127.0.0.1", service.port), timeout=10) as sock:
            sock.sendall(b"POST /api/deepfake/analyze HTTP/1.1\r\nHost: x\r\n"
                         b"Content-Type: image/png\r\nContent-Length: %d\r\n\r\n" % 2**30)
            raw = b""
            while chunk := sock.recv(65536):
                raw += chunk
        head, _, payload = raw.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 413") and b"application/json" in head
        assert set(json.loads(payload)) == {"error", "message", "suggestion", "timestamp"}
    finally:
        service.stop()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode", ["development", "production"])
def test_the_service_exits_when_its_gateway_is_gone(tmp_path, mode) -> None:
    gateway = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    service = Service(tmp_path, mode, {"TORNADO_GATEWAY_PID": str(gateway.pid)})
    try:
        service.wait_ready()
        gateway.kill()
        gateway.wait()
        service.proc.wait(timeout=10)  # the watch checks every 0.5 s
        assert service.proc.returncode == 0
    finally:
        gateway.kill()
        gateway.wait()
        log = service.stop()
    assert "gateway process %d is gone" % gateway.pid in log


@pytest.mark.timeout(60)
def test_development_log_omits_the_gateways_health_checks_only(tmp_path) -> None:
    service = Service(tmp_path, "development")
    try:
        service.wait_ready()
        for agent in ["tornado_gateway-health"] * 3 + ["curl/8"]:
            req = urllib.request.Request(service.url + "/stats?probe=marked",
                                         headers={"User-Agent": agent})
            with urllib.request.urlopen(req, timeout=10) as response:
                assert response.status == 200
    finally:
        output = service.stop()
    # the three health checks leave no line; the same request from anyone else does
    assert output.count("/stats?probe=marked") == 1, output
