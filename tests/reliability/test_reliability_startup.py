"""Start-up faults: each gives its documented message and outcome (README "Troubleshooting"),
the gateway keeps serving its own routes, and Ctrl+C still exits 0 with no process left."""
from __future__ import annotations

import os
import socket
import time

import pytest

from rel_helpers import SCRIPTS, alive, tagged_processes, wait_until

pytestmark = pytest.mark.integration


def assert_degraded_but_serving(gw, state: str) -> None:
    """The gateway's own routes answer; the proxied ones get the JSON 503 naming the state."""
    status = gw.get("/api/gateway/status")
    assert status.status == 200
    page = gw.get("/")
    assert page.status == 200 and b"<html" in page.body.lower()
    missing = gw.get("/no/such/route")
    assert missing.is_gateway_error(404), missing
    resp = gw.get("/api/deepfake/stats")
    assert resp.is_gateway_error(503), resp
    assert "(state: %s)" % state in resp.json()["message"]


def ctrl_c_exits_clean(gw, within: float = 10.0) -> float:
    started = time.monotonic()
    code = gw.interrupt(timeout=within)
    took = time.monotonic() - started
    assert code == 0, gw.log()[-2000:]
    assert gw.leftovers() == [], "processes left: %s" % gw.leftovers()
    return took


@pytest.mark.timeout(30)
def test_gateway_port_in_use_exits_1_with_message_and_spawns_nothing(gateways):
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen(1)
    try:
        port = holder.getsockname()[1]
        gw = gateways(wait=None, port=port)
        code = gw.proc.wait(15)
        assert code == 1
        assert "Cannot listen on 127.0.0.1:%d" % port in gw.log()
        assert "Started the Flask server" not in gw.log()
        assert tagged_processes(gw.tag) == []
    finally:
        holder.close()


@pytest.mark.timeout(30)
def test_child_port_in_use_fails_with_message(gateways):
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen(1)
    try:
        port = holder.getsockname()[1]
        gw = gateways(wait="failed", flask_port=port)
        service = gw.status()["service"]
        assert "Port %d on 127.0.0.1 is already in use" % port in service["last_error"]["message"]
        assert "FLASK_PORT" in service["last_error"]["suggestion"]
        assert service["pid"] is None
        assert "already in use" in gw.log()
        assert_degraded_but_serving(gw, "failed")
        ctrl_c_exits_clean(gw)
    finally:
        holder.close()


@pytest.mark.timeout(30)
def test_script_missing_fails_with_message(gateways):
    gw = gateways(["--flask-script", "/nonexistent/dir/api_server.py"], wait="failed")
    error = gw.status()["service"]["last_error"]
    assert "The Flask script '/nonexistent/dir/api_server.py' was not found" in error["message"]
    assert "FLASK_SCRIPT" in error["suggestion"]
    assert_degraded_but_serving(gw, "failed")
    ctrl_c_exits_clean(gw)


@pytest.mark.timeout(30)
def test_interpreter_missing_fails_with_message(gateways):
    gw = gateways(["--python", "/nonexistent/bin/python3"], wait="failed")
    error = gw.status()["service"]["last_error"]
    assert ("The Python interpreter '/nonexistent/bin/python3' (FLASK_PYTHON) was not found"
            in error["message"])
    assert "FLASK_PYTHON" in error["suggestion"]
    assert_degraded_but_serving(gw, "failed")
    ctrl_c_exits_clean(gw)


CRASHES = [
    # a child whose dependency is missing: dies while importing
    (["--flask-script", os.path.join(SCRIPTS, "crash_on_import.py")], {}, "ModuleNotFoundError"),
    # the real service with a data directory it cannot create: dies while starting
    ([], {"DEEPFAKE_DATA_DIR": "/dev/null/data"}, "NotADirectoryError"),
]


@pytest.mark.timeout(30)
@pytest.mark.parametrize("args,env,error", CRASHES, ids=["import", "service-bad-data-dir"])
def test_child_crashing_on_startup_is_reported_as_exited(gateways, args, env, error):
    gw = gateways(args, env=env, wait="exited")

    def tail_reported():
        exit_ = gw.status()["service"]["last_exit"]
        return exit_ if exit_ and exit_["stderr_tail"] else None

    last_exit = wait_until(tail_reported, 5, "the crash's stderr in the status")
    assert last_exit["code"] == 1 and last_exit["signal"] is None
    assert any(error in line for line in last_exit["stderr_tail"])
    log = gw.log()
    assert "[Python] %s" % error in log
    assert "exited with code 1" in log
    assert_degraded_but_serving(gw, "exited")
    ctrl_c_exits_clean(gw)


@pytest.mark.timeout(30)
def test_child_that_never_becomes_healthy_fails_then_is_stopped(gateways):
    gw = gateways(["--flask-script", os.path.join(SCRIPTS, "never_healthy.py"),
                   "--health-timeout", "1500", "--health-interval", "200",
                   "--health-retries", "50"], wait="failed")
    service = gw.status()["service"]
    assert "did not become healthy within 1.5 s" in service["last_error"]["message"]
    assert "HTTP 500" in service["last_error"]["message"]
    child = service["pid"]
    assert child and alive(child), "the unhealthy child keeps running (it may recover)"
    assert_degraded_but_serving(gw, "failed")
    ctrl_c_exits_clean(gw)
    assert not alive(child)


@pytest.mark.timeout(30)
def test_child_ignoring_sigterm_is_killed_with_its_tree_after_the_timeout(gateways):
    gw = gateways(["--flask-script", os.path.join(SCRIPTS, "ignores_sigterm.py"),
                   "--shutdown-timeout", "700"])
    child = gw.child_pid()
    grandchild = gw.get("/api/deepfake/stats").json()["grandchild"]
    assert alive(child) and alive(grandchild)
    gw.track()
    took = ctrl_c_exits_clean(gw, within=10)
    assert 0.6 < took < 6.0, took
    assert "did not exit within 0.7 s; killing its process tree" in gw.log()
    assert not alive(child) and not alive(grandchild)
    # the listening port is free again
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", gw.flask_port))
