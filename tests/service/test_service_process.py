"""The real entry point: start-up time, both servers, the debugger guard, the parent watch,
and several worker processes on one data directory."""
from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest

from service_images import PYTHON_DIR, encode, nearest_upsampled, pink_noise

SCRIPT = os.path.join(PYTHON_DIR, "api_server.py")
pytestmark = pytest.mark.integration


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def request(url: str, data: bytes | None = None, content_type: str = "image/png",
            timeout: float = 10):
    req = urllib.request.Request(url, data=data, method="POST" if data is not None else "GET")
    if data is not None:
        req.add_header("Content-Type", content_type)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as response:
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


# --- worker processes on one data directory --------------------------------------------------

WORKER_ENV = {"DEEPFAKE_MIN_FEEDBACK_PER_LABEL": "2"}


def label(service: Service, seed: int, name: str) -> None:
    image = pink_noise(256, seed=seed)
    data = encode(image if name == "real" else nearest_upsampled(image))
    status, body = request(service.url + "/feedback?label=" + name, data)
    assert status == 201, body


@pytest.mark.timeout(120)
def test_worker_processes_share_feedback_and_one_model(tmp_path) -> None:
    # started together on a new data directory, as the gateway starts its workers
    a, b = (Service(tmp_path, "production", WORKER_ENV) for _ in range(2))
    try:
        a.wait_ready()
        b.wait_ready()
        status, analysed = request(b.url + "/analyze", encode(pink_noise(256, seed=1)))
        assert status == 200 and analysed["model_version"] == "baseline-1"
        status, body = request(a.url + "/feedback", json.dumps(
            {"analysis_id": analysed["analysis_id"], "label": "real"}).encode(),
            "application/json")
        assert status == 201, body  # a labels what b analysed
        for seed, (worker, name) in enumerate([(a, "fake"), (b, "fake"), (b, "real")], 2):
            label(worker, seed, name)
        counts = {"real": 2, "fake": 2}
        assert request(a.url + "/stats")[1]["samples_per_label"] == counts
        assert request(b.url + "/stats")[1]["samples_per_label"] == counts
        status, retrained = request(a.url + "/retrain", b"", timeout=60)
        assert status == 200 and retrained["replaced"] is True, retrained
        version = retrained["model_version"]
        # at once, on the worker that did not train
        status, stats = request(b.url + "/stats")
        assert (stats["model"]["version"], stats["model"]["source"]) == (version, "current")
        status, body = request(b.url + "/analyze", encode(pink_noise(256, seed=9)))
        assert status == 200 and body["model_version"] == version
    finally:
        a.stop()
        log = b.stop()
    assert "model %s (current) is active in process %d" % (version, b.proc.pid) in log


@pytest.mark.timeout(120)
def test_a_worker_killed_mid_retrain_does_not_block_retraining(tmp_path) -> None:
    a, b = (Service(tmp_path, "production", WORKER_ENV) for _ in range(2))
    try:
        a.wait_ready()
        b.wait_ready()
        for seed, name in enumerate(["real", "fake"] * 2):
            label(b, seed, name)
        outcome: dict = {}

        def retrain_on_a() -> None:
            try:
                outcome["answer"] = request(a.url + "/retrain", b"", timeout=60)
            except (OSError, http.client.HTTPException) as exc:
                outcome["cut"] = exc  # what the kill below should do to it
        # a's first retrain imports scikit-learn under the lock: about a second to catch it in
        trainer = threading.Thread(target=retrain_on_a, daemon=True)
        trainer.start()
        deadline = time.monotonic() + 30
        while not request(b.url + "/stats")[1]["retrain"]["running"]:
            assert time.monotonic() < deadline and not outcome, outcome
            time.sleep(0.01)
        status, refused = request(b.url + "/retrain", b"")
        assert status == 409 and refused["holder"]["pid"] == a.proc.pid, refused
        assert "process %d on " % a.proc.pid in refused["message"]
        a.proc.kill()  # SIGKILL: no finally, no release
        a.proc.wait()
        trainer.join(10)
        assert "cut" in outcome, "the retrain finished before the kill: nothing was tested"
        status, stats = request(b.url + "/stats")
        assert stats["retrain"] == {"running": False, "holder": None,
                                    "min_feedback_per_label": 2}
        status, body = request(b.url + "/retrain", b"", timeout=60)
        assert status == 200, body
        status, stats = request(b.url + "/stats")
        assert stats["model"]["version"] == body["model_version"]
    finally:
        a.stop()
        log = b.stop()
    assert "taking over the retrain lock of process %d" % a.proc.pid in log
