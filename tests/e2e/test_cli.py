"""End to end: ``python -m tornado_gateway`` run the way a user runs it, in its own session so
the test can signal it like Ctrl+C would; real child, real signals, real sockets on 127.0.0.1.
"""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from typing import List, Optional

import psutil
import pytest

# the shared real-process helpers (and the ``orphans`` fixture) live in tests/integration; a
# second conftest.py here would shadow the ``conftest`` module other test folders import from
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "integration"))
from gw_realproc import (PROJECT_DIR, orphans, pid_alive, port_is_free,  # noqa: E402,F401
                         wait_until)

pytestmark = pytest.mark.integration

try:
    import uvloop  # noqa: F401
    HAVE_UVLOOP = True
except ImportError:
    HAVE_UVLOOP = False
# each loop the gateway can run on (--loop): asyncio by default, uvloop where it is installed
LOOPS = pytest.mark.parametrize("loop", [
    "asyncio", pytest.param("uvloop", marks=pytest.mark.skipif(
        not HAVE_UVLOOP, reason="uvloop is not installed (or Windows)"))])


def loop_flag(loop: str) -> List[str]:
    return [] if loop == "asyncio" else ["--loop", loop]  # asyncio: the default, unnamed


def check_loop(gw: "Gateway", status: dict, loop: str) -> None:
    """The gateway runs on ``loop``, and under uvloop a thread waits for each child's exit
    (uvloop keeps SIGCHLD for itself); under asyncio Subprocess's exit callback does."""
    assert status["gateway"]["loop"] == loop
    assert ("a thread waits for the exit of pid" in gw.output()) is (loop == "uvloop")

CLEAN_ENV_PREFIXES = ("FLASK_", "GATEWAY_", "TORNADO_GATEWAY_", "NODE_ENV", "CRASH_AFTER",
                      "SLOW_START", "DEEPFAKE_")


class Gateway:
    """One ``python -m tornado_gateway`` process, its output in a file."""

    def __init__(self, tmp_path, orphans, args: List[str], env: Optional[dict] = None,
                 port: Optional[int] = None) -> None:
        self.port = port or orphans.port()
        self.flask_port = orphans.port(4)  # room for a worker per CPU
        environ = {k: v for k, v in os.environ.items() if not k.startswith(CLEAN_ENV_PREFIXES)}
        environ["PYTHONUNBUFFERED"] = "1"
        environ.update(env or {})
        self.log_path = tmp_path / ("gateway-%d.log" % self.port)
        self._log = open(self.log_path, "wb")
        self.argv = [sys.executable, "-m", "tornado_gateway", "--port", str(self.port),
                     "--flask-port", str(self.flask_port)] + list(args)
        self.launched = time.monotonic()
        self.proc = subprocess.Popen(self.argv, cwd=PROJECT_DIR, env=environ,
                                     stdin=subprocess.DEVNULL, stdout=self._log,
                                     stderr=subprocess.STDOUT, start_new_session=True)

    def url(self, path: str) -> str:
        return "http://127.0.0.1:%d%s" % (self.port, path)

    def get(self, path: str, timeout: float = 5.0) -> tuple:
        try:
            with urllib.request.urlopen(self.url(path), timeout=timeout) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read() or b"null")

    def status(self) -> Optional[dict]:
        try:
            code, body = self.get("/api/gateway/status", timeout=2)
        except (urllib.error.URLError, OSError, ValueError):
            return None
        return body if code == 200 else None

    def wait_ready(self, timeout: float = 15.0) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, "gateway exited %s:\n%s" % (self.proc.returncode,
                                                                         self.output())
            status = self.status()
            if status and status["service"]["state"] == "ready":
                self.ready_after = time.monotonic() - self.launched
                return status
            time.sleep(0.03)
        raise AssertionError("not ready in %g s: %s\n%s" % (timeout, self.status(),
                                                            self.output()))

    def send(self, sig: int, group: bool = False) -> float:
        """Signal the gateway; ``group``: its whole process group, as Ctrl+C in a terminal
        does (the child has its own session, so only the gateway gets it)."""
        if group:
            os.killpg(self.proc.pid, sig)
        else:
            self.proc.send_signal(sig)
        return time.monotonic()

    def wait(self, timeout: float) -> Optional[int]:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def output(self) -> str:
        self._log.flush()
        return self.log_path.read_bytes().decode("utf-8", "replace")

    def close(self) -> None:
        if self.proc.poll() is None:  # only this test's gateway: its own session
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)
        self._log.close()


@pytest.fixture
def gateway(tmp_path, orphans):
    started = []

    def start(*args: str, env: Optional[dict] = None, port: Optional[int] = None) -> Gateway:
        gw = Gateway(tmp_path, orphans, list(args), env, port)
        started.append(gw)
        return gw

    yield start
    for gw in started:
        gw.close()


def child_gone(pid: int, port: int, timeout: float = 3.0) -> bool:
    return wait_until(lambda: not pid_alive(pid) and port_is_free(port), timeout)


@pytest.mark.timeout(40)
@LOOPS
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_cli_serves_proxies_and_exits_0_on_signal(gateway, sig, loop):
    if sig == signal.SIGINT:
        gw = gateway("--flask-script", "tests/child_scripts/healthy.py", *loop_flag(loop))
    else:  # the same settings from the environment
        gw = gateway(env={"FLASK_SCRIPT": "tests/child_scripts/healthy.py",
                          **({"GATEWAY_LOOP": loop} if loop != "asyncio" else {})})
    status = gw.wait_ready()
    check_loop(gw, status, loop)
    child = status["service"]["pid"]
    assert pid_alive(child)
    assert status["gateway"]["pid"] == gw.proc.pid
    assert status["service"]["url"] == "http://127.0.0.1:%d" % gw.flask_port
    # the child was given the gateway's pid to watch, and its own session
    assert psutil.Process(child).environ()["TORNADO_GATEWAY_PID"] == str(gw.proc.pid)
    assert os.getsid(child) == child != os.getsid(gw.proc.pid)
    code, body = gw.get("/api/deepfake/stats")
    assert code == 200
    assert body == {"training_samples": 0, "model_loaded": True, "last_updated": None,
                    "pid": child}
    sent = gw.send(sig, group=sig == signal.SIGINT)  # SIGINT as Ctrl+C sends it
    assert gw.wait(3.0) == 0, gw.output()
    took = time.monotonic() - sent
    print("%s: launch -> ready %.2f s, signal -> exit 0 in %.2f s" % (
        sig.name, gw.ready_after, took))
    assert child_gone(child, gw.flask_port)
    assert port_is_free(gw.port)
    out = gw.output()
    assert "[Python] healthy: listening on 127.0.0.1:%d" % gw.flask_port in out
    assert "[Python] healthy: stderr line 3" in out
    assert "[Python] healthy: bad bytes \ufffd\ufffd end" in out
    assert "[Python] healthy: got SIGTERM" in out
    assert "[Python] healthy: partial last line" in out
    assert "Received %s: shutting down" % sig.name in out
    assert out.rstrip().endswith("Gateway stopped."), out[-500:]
    assert "Traceback" not in out


@pytest.mark.timeout(40)
def test_cli_child_that_ignores_sigterm_is_killed_and_exit_is_0(gateway):
    gw = gateway("--flask-script", "tests/child_scripts/ignores_sigterm.py",
                 "--shutdown-timeout", "500")
    child = gw.wait_ready()["service"]["pid"]
    sent = gw.send(signal.SIGINT)
    assert gw.wait(3.0) == 0, gw.output()
    took = time.monotonic() - sent
    print("ignores SIGTERM, --shutdown-timeout 500: SIGINT -> exit 0 in %.2f s" % took)
    assert took >= 0.5
    assert child_gone(child, gw.flask_port)
    assert port_is_free(gw.port)
    out = gw.output()
    assert "did not exit within 0.5 s; killing its process tree" in out
    assert "Traceback" not in out


@pytest.mark.timeout(40)
@LOOPS
def test_cli_second_sigint_forces_a_slow_shutdown(gateway, loop):
    gw = gateway("--flask-script", "tests/child_scripts/ignores_sigterm.py",
                 "--shutdown-timeout", "20000", *loop_flag(loop))
    child = gw.wait_ready()["service"]["pid"]
    gw.send(signal.SIGINT)
    assert wait_until(lambda: "Stopping the Flask server" in gw.output(), 3)
    assert gw.wait(0.3) is None  # waiting for a child that ignores SIGTERM
    sent = gw.send(signal.SIGINT)
    assert gw.wait(3.0) == 0, gw.output()
    took = time.monotonic() - sent
    print("second SIGINT -> exit 0 in %.2f s" % took)
    assert took < 2.0
    assert child_gone(child, gw.flask_port)
    out = gw.output()
    assert "Received SIGINT again: killing the Flask server now." in out
    assert "Traceback" not in out


@pytest.mark.timeout(30)
def test_cli_gateway_port_in_use_exits_1_with_a_clear_message(gateway, orphans):
    port = orphans.port()
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", port))
        blocker.listen(1)
        gw = gateway("--flask-script", "tests/child_scripts/healthy.py", port=port)
        assert gw.wait(10.0) == 1, gw.output()
    out = gw.output()
    assert "Cannot listen on 127.0.0.1:%d" % port in out
    assert "GATEWAY_PORT / --port" in out
    assert "[Python]" not in out  # the child was never started
    assert port_is_free(gw.flask_port)


@pytest.mark.timeout(30)
def test_cli_gateway_sigkilled_child_exits_by_itself(gateway):
    gw = gateway("--flask-script", "tests/child_scripts/healthy.py")
    child = gw.wait_ready()["service"]["pid"]
    gw.proc.kill()  # no chance to stop the child
    gw.proc.wait(5)
    killed = time.monotonic()
    assert child_gone(child, gw.flask_port, timeout=3.0), "child %d orphaned" % child
    print("gateway SIGKILLed: child gone after %.2f s" % (time.monotonic() - killed))
    assert gw.proc.returncode == -signal.SIGKILL


@pytest.mark.timeout(90)
@pytest.mark.parametrize("mode", ["development", "production"])
def test_cli_default_script_real_service(gateway, tmp_path, mode):
    service = os.path.join(PROJECT_DIR, "python", "api_server.py")
    assert os.path.isfile(service), "the default service script is part of the project"
    gw = gateway(*(["--production"] if mode == "production" else []),
                 env={"DEEPFAKE_DATA_DIR": str(tmp_path / "data")})
    status = gw.wait_ready(timeout=40)
    child = status["service"]["pid"]
    assert service in psutil.Process(child).cmdline()
    code, body = gw.get("/api/deepfake/stats")
    assert code == 200
    assert {"training_samples", "model_loaded", "last_updated"} <= set(body)
    sent = gw.send(signal.SIGINT)
    assert gw.wait(8.0) == 0, gw.output()
    print("default script (%s): launch -> ready %.2f s, SIGINT -> exit 0 in %.2f s" % (
        mode, gw.ready_after, time.monotonic() - sent))
    assert child_gone(child, gw.flask_port)
    assert port_is_free(gw.port)
    out = gw.output()
    assert "[Python] " in out
    assert "Traceback" not in out


@pytest.mark.timeout(40)
def test_cli_sigint_while_the_child_is_still_starting(gateway):
    gw = gateway("--flask-script", "tests/child_scripts/slow_start.py",
                 env={"SLOW_START": "5"})
    assert wait_until(lambda: (gw.status() or {}).get("service", {}).get("pid"), 10), gw.output()
    status = gw.status()
    assert status["service"]["state"] == "starting"
    child = status["service"]["pid"]
    sent = gw.send(signal.SIGINT)
    assert gw.wait(3.0) == 0, gw.output()
    print("SIGINT while starting -> exit 0 in %.2f s" % (time.monotonic() - sent))
    assert child_gone(child, gw.flask_port)
    assert "Traceback" not in gw.output()


@pytest.mark.timeout(40)
def test_cli_request_during_start_waits_for_ready(gateway):
    gw = gateway("--flask-script", "tests/child_scripts/slow_start.py",
                 env={"SLOW_START": "1.5"})
    assert wait_until(lambda: gw.status() is not None, 10), gw.output()
    assert gw.status()["service"]["state"] == "starting"
    began = time.monotonic()
    code, body = gw.get("/api/deepfake/stats", timeout=15)
    assert code == 200 and body["model_loaded"] is True
    assert gw.status()["service"]["state"] == "ready"
    print("request sent while starting answered after %.2f s" % (time.monotonic() - began))
    gw.send(signal.SIGINT)
    assert gw.wait(3.0) == 0, gw.output()


@pytest.mark.timeout(40)
@LOOPS
def test_cli_child_crash_gives_503_and_a_clean_exit(gateway, loop):
    gw = gateway("--flask-script", "tests/child_scripts/crasher.py", *loop_flag(loop))
    status = gw.wait_ready()
    check_loop(gw, status, loop)
    child = status["service"]["pid"]
    code, body = gw.get("/api/deepfake/crash")
    assert code == 200 and body == {"crashing": True}
    assert wait_until(lambda: gw.status()["service"]["state"] == "exited", 5)
    assert not pid_alive(child)
    service = gw.status()["service"]
    assert service["last_exit"]["code"] == 3 and service["ready"] is False
    assert wait_until(lambda: gw.status()["service"]["last_exit"]["stderr_tail"], 5)
    assert gw.status()["service"]["last_exit"]["stderr_tail"][-1] == (
        "RuntimeError: crashing on purpose (crash requested)")
    code, body = gw.get("/api/deepfake/stats")
    assert code == 503
    assert set(body) >= {"error", "message", "suggestion", "timestamp"}
    sent = gw.send(signal.SIGINT)
    assert gw.wait(3.0) == 0, gw.output()
    assert time.monotonic() - sent < 3.0
    out = gw.output()
    assert "[Python] RuntimeError: crashing on purpose (crash requested)" in out
    assert "Flask server exited with code 3." in out


@pytest.mark.timeout(40)
def test_cli_import_error_is_reported_and_the_gateway_keeps_serving(gateway):
    gw = gateway("--flask-script", "tests/child_scripts/import_error.py")
    assert wait_until(lambda: ((gw.status() or {}).get("service", {}).get("last_exit") or {})
                      .get("stderr_tail"), 10), gw.output()
    service = gw.status()["service"]
    assert service["state"] == "exited" and service["last_exit"]["code"] == 1
    assert "ModuleNotFoundError" in service["last_exit"]["stderr_tail"][-1]
    code, body = gw.get("/api/deepfake/stats")
    assert code == 503 and body["error"]
    gw.send(signal.SIGINT)
    assert gw.wait(3.0) == 0, gw.output()
    out = gw.output()
    assert "[Python] ModuleNotFoundError: No module named " in out
    assert "Troubleshooting:" in out and "pip install" in out


@pytest.mark.timeout(40)
def test_cli_flask_port_in_use_gateway_still_serves_and_exits_0(gateway, orphans):
    gw = None
    with socket.socket() as blocker:
        port = orphans.port()
        blocker.bind(("127.0.0.1", port))
        blocker.listen(1)
        gw = gateway("--flask-script", "tests/child_scripts/healthy.py", "--flask-port",
                     str(port))
        assert wait_until(lambda: (gw.status() or {}).get("service", {}).get("state")
                          == "failed", 10), gw.output()
        service = gw.status()["service"]
        assert service["pid"] is None
        assert "already in use" in service["last_error"]["message"]
        assert gw.get("/api/deepfake/stats")[0] == 503
        gw.send(signal.SIGTERM)
        assert gw.wait(3.0) == 0, gw.output()
    assert "[Python]" not in gw.output()


@pytest.mark.timeout(60)
@LOOPS
def test_cli_reloader_app_leaves_nothing_behind(gateway, loop):
    gw = gateway("--flask-script", "tests/child_scripts/reloader_app.py", *loop_flag(loop))
    reloader = gw.wait_ready(timeout=30)["service"]["pid"]
    assert wait_until(lambda: psutil.Process(reloader).children(), 5)
    server = psutil.Process(reloader).children()[0].pid
    assert gw.get("/api/deepfake/stats") == (200, {"training_samples": 0, "model_loaded": True,
                                                   "last_updated": None, "pid": server})
    sent = gw.send(signal.SIGINT)
    assert gw.wait(3.0) == 0, gw.output()
    print("reloader app: SIGINT -> exit 0 in %.2f s" % (time.monotonic() - sent))
    assert child_gone(reloader, gw.flask_port)
    assert wait_until(lambda: not pid_alive(server), 2)
    assert port_is_free(gw.port)


@pytest.mark.timeout(60)
def test_cli_default_script_exits_when_the_gateway_is_sigkilled(gateway, tmp_path):
    service = os.path.join(PROJECT_DIR, "python", "api_server.py")
    assert os.path.isfile(service), "the default service script is part of the project"
    gw = gateway(env={"DEEPFAKE_DATA_DIR": str(tmp_path / "data")})
    child = gw.wait_ready(timeout=40)["service"]["pid"]
    gw.proc.kill()
    gw.proc.wait(5)
    killed = time.monotonic()
    assert child_gone(child, gw.flask_port, timeout=5.0), "service %d orphaned" % child
    print("default script, gateway SIGKILLed: service gone after %.2f s"
          % (time.monotonic() - killed))


@pytest.mark.timeout(40)
def test_cli_production_mode_is_quiet_but_shows_the_child(gateway):
    gw = gateway("--flask-script", "tests/child_scripts/healthy.py", "--production")
    status = gw.wait_ready()
    deadline = time.monotonic() + 20
    while not all(w["state"] == "ready" for w in status["service"]["workers"]):
        assert time.monotonic() < deadline, status
        time.sleep(0.05)
        status = gw.status()
    assert status["gateway"]["mode"] == "production"
    child = status["service"]["pid"]
    env = psutil.Process(child).environ()
    assert env["GATEWAY_ENV"] == "production" and env["FLASK_DEBUG"] == "0"
    gw.send(signal.SIGINT)
    assert gw.wait(3.0) == 0, gw.output()
    out = gw.output()
    # production runs a worker per CPU; each child line says which worker printed it
    workers = len(status["service"]["workers"])
    assert workers == (os.cpu_count() or 1)
    for n in range(1, workers + 1):
        label = "[worker %d] " % n if workers > 1 else ""
        assert "[Python] %shealthy: listening on" % label in out
    # where it listens and that it stopped are shown in every mode; otherwise only the
    # child's lines
    assert re.search(r"INFO    Gateway listening on http://127\.0\.0\.1:%d \(production mode, "
                     r"%d workers?\): the web page at http://127\.0\.0\.1:%d/, the API at "
                     r"http://127\.0\.0\.1:%d/api/deepfake/" % (gw.port, workers, gw.port,
                                                                 gw.port), out), out
    assert out.rstrip().endswith("INFO    Gateway stopped.")
    assert re.search(r"INFO    Deepfake service ready \(\d of %d workers?\): "
                     r"http://127\.0\.0\.1:%d/api/deepfake/" % (workers, gw.port), out), out
    rest = "\n".join(line for line in out.splitlines()
                     if not re.search(r"Gateway listening on|Gateway stopped\.|"
                                      r"Deepfake service ready \(", line))
    assert " INFO " not in rest.replace("INFO    [Python]", "")
    assert "Flask server ready" not in out


@pytest.mark.timeout(40)
@LOOPS
def test_cli_ctrl_c_pressed_three_times_still_exits_0(gateway, loop):
    """Users press Ctrl+C repeatedly: the third one may arrive while the gateway has already
    given the previous signal handlers back; it must not turn a clean exit into 130."""
    gw = gateway("--flask-script", "tests/child_scripts/ignores_sigterm.py",
                 "--shutdown-timeout", "20000", *loop_flag(loop))
    child = gw.wait_ready()["service"]["pid"]
    for _ in range(3):
        gw.send(signal.SIGINT, group=True)
        time.sleep(0.05)
    assert gw.wait(3.0) == 0, gw.output()
    assert child_gone(child, gw.flask_port)
    assert "Traceback" not in gw.output()


SIGINT_DURING_SETUP = """
import os, signal, sys
import tornado_gateway.server as server
bind = server.bind_sockets
def bind_after_ctrl_c(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGINT)  # Ctrl+C before the gateway's handlers are installed
    return bind(*args, **kwargs)
server.bind_sockets = bind_after_ctrl_c
from tornado_gateway.__main__ import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.timeout(40)
@pytest.mark.parametrize("inherited", ["default", "ignored"])
def test_cli_ctrl_c_during_setup_exits_0_and_leaves_nothing(gateway, orphans, tmp_path,
                                                             inherited):
    """Also when started as a script's background job, which inherits SIGINT ignored."""
    port, flask_port = orphans.port(), orphans.port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(CLEAN_ENV_PREFIXES)}
    env["CHILD_NO_WATCH"] = "1"  # so a child left behind would really stay
    ignore = (lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) \
        if inherited == "ignored" else None
    proc = subprocess.run(
        [sys.executable, "-c", SIGINT_DURING_SETUP, "--port", str(port), "--flask-port",
         str(flask_port), "--flask-script", "tests/child_scripts/healthy.py"],
        cwd=PROJECT_DIR, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        timeout=20, start_new_session=True, preexec_fn=ignore)
    out = proc.stdout.decode("utf-8", "replace")
    assert proc.returncode == 0, out
    assert "Traceback" not in out
    assert port_is_free(port) and port_is_free(flask_port)


@pytest.mark.timeout(40)
@pytest.mark.parametrize("args, env, expected", [
    (["--flask-script", "tests/child_scripts/no_such_script.py"], {},
     "The Flask script 'tests/child_scripts/no_such_script.py' was not found"),
    (["--flask-script", "tests/child_scripts/healthy.py"], {"FLASK_PYTHON": "/nonexistent"},
     "The Python interpreter '/nonexistent' (FLASK_PYTHON) was not found."),
], ids=["missing-script", "missing-interpreter"])
def test_cli_bad_environment_is_failed_and_the_gateway_still_serves(gateway, args, env,
                                                                     expected):
    gw = gateway(*args, env=env)
    assert wait_until(lambda: (gw.status() or {}).get("service", {}).get("state") == "failed",
                      10), gw.output()
    service = gw.status()["service"]
    assert service["last_error"]["message"].startswith(expected)
    assert service["pid"] is None
    code, body = gw.get("/api/deepfake/stats")
    assert code == 503 and body["suggestion"]
    gw.send(signal.SIGINT)
    assert gw.wait(3.0) == 0, gw.output()
    out = gw.output()
    assert "WARNING" in out and expected in out
    assert "[Python]" not in out
