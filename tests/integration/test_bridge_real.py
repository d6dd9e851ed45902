"""PythonBridge against REAL child processes on 127.0.0.1: start-up, log forwarding, start-up
failures, and what happens while it runs (crash, SIGKILL, SIGSTOP/SIGCONT, auto-restart).

Every child script lives in tests/child_scripts and misbehaves on purpose; every port is a free
one owned by the test (the ``orphans`` fixture fails the test if a process using it is left).
"""
from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import time

import psutil
import pytest

from gw_realproc import (FAST, child_env, fetch_json, make_bridge, messages, pid_alive,
                         port_is_free, script, wait_for)
from tornado_gateway.supervisor.bridge import PythonBridge
from tornado_gateway.config import FlaskConfig, load_config
from tornado_gateway.supervisor.state import BridgeState as S

pytestmark = pytest.mark.integration

# --- property 1: a healthy child becomes ready ---------------------------------------------

@pytest.mark.timeout(30)
async def test_start_real_child_becomes_ready(orphans, sink, gwlog):
    bridge = make_bridge(orphans, "healthy.py", sink)
    try:
        launched = time.monotonic()
        assert await bridge.start() is True
        took = time.monotonic() - launched
        assert bridge.is_flask_ready()
        assert bridge.state is S.READY
        pid = bridge.pid
        assert pid is not None and pid_alive(pid)
        proc = psutil.Process(pid)
        assert script("healthy.py") in proc.cmdline()
        assert "--port" in proc.cmdline() and str(bridge.config.port) in proc.cmdline()
        assert os.getpgid(pid) == pid  # its own process group
        status = bridge.status()
        assert status["state"] == "ready" and status["ready"] is True and status["pid"] == pid
        assert status["last_health_check"]["ok"] is True
        assert 0 < status["ready_after_ms"] <= took * 1000 + 1
        ready = [m for m in messages(gwlog) if m.startswith("Flask server ready at")]
        assert ready == ["Flask server ready at http://127.0.0.1:%d (pid %d, %.0f ms after launch)"
                         % (bridge.config.port, pid, status["ready_after_ms"])]
        # the child answers the health contract itself
        code, body = await fetch_json(bridge.flask_url + "/api/deepfake/stats")
        assert code == 200 and body["pid"] == pid
        print("launch -> ready: %.0f ms (bridge says %.0f ms)" % (took * 1000,
                                                                  status["ready_after_ms"]))
    finally:
        await bridge.stop()
    assert bridge.state is S.STOPPED
    assert not pid_alive(pid)


@pytest.mark.timeout(30)
async def test_log_forwarding_prefix_invalid_utf8_and_partial_last_line(orphans, sink, gwlog):
    bridge = make_bridge(orphans, "healthy.py", sink)
    try:
        assert await bridge.start() is True
        port = bridge.config.port
        assert await wait_for(lambda: len(sink.texts("stderr")) >= 4, 5)
    finally:
        await bridge.stop()  # SIGTERM: the child prints two more lines, the last one partial
    assert bridge.last_exit["code"] == 0 and bridge.last_exit["signal"] is None
    assert sink.texts("stdout") == [
        "healthy: listening on 127.0.0.1:%d" % port,
        "healthy: stdout line 1", "healthy: stdout line 2", "healthy: stdout line 3",
        "healthy: got SIGTERM",
        "healthy: partial last line",  # no newline: flushed at EOF
    ]
    assert sink.texts("stderr") == [
        "healthy: stderr line 1", "healthy: stderr line 2", "healthy: stderr line 3",
        "healthy: bad bytes \ufffd\ufffd end",  # \xff\xfe replaced, the line kept
    ]
    forwarded = [r for r in gwlog.records if r.name == "tornado_gateway.python"]
    # every line forwarded once, in its own stream's order (the two pump threads may
    # interleave their lines with each other: no order across streams is promised)
    messages = [r.getMessage() for r in forwarded]
    assert sorted(messages) == sorted("[Python] " + t for t in sink.texts())
    for stream in ("stdout", "stderr"):
        expected = ["[Python] " + t for t in sink.texts(stream)]
        assert [m for m in messages if m in expected] == expected
    assert all(r.levelno == logging.INFO for r in forwarded)


# --- start-up failures ------------------------------------------------------------------------

@pytest.mark.timeout(20)
async def test_missing_script_fails_with_the_fix(orphans, sink, gwlog):
    bridge = PythonBridge(FlaskConfig(**dict(FAST, script="/nonexistent/dir/api_server.py",
                                             port=orphans.port())), sink=sink)
    try:
        assert await bridge.start() is False
        assert bridge.state is S.FAILED and not bridge.is_flask_ready()
        assert bridge.pid is None and sink.lines == []
        error = bridge.status()["last_error"]
        assert error["message"].startswith("The Flask script '/nonexistent/dir/api_server.py' "
                                           "was not found")
        assert "FLASK_SCRIPT" in error["suggestion"]
        warnings = messages(gwlog, level=logging.WARNING)
        assert any("was not found" in m and "FLASK_SCRIPT" in m for m in warnings)
    finally:
        await bridge.stop()
    assert bridge.state is S.STOPPED


@pytest.mark.timeout(20)
async def test_missing_interpreter_from_flask_python(orphans, sink, gwlog):
    config = load_config({"FLASK_PYTHON": "/nonexistent/python3",
                          "FLASK_SCRIPT": script("healthy.py"),
                          "FLASK_PORT": str(orphans.port())})
    bridge = PythonBridge(config, sink=sink)
    try:
        assert await bridge.start() is False
        assert bridge.state is S.FAILED and bridge.pid is None
        error = bridge.last_error
        assert error["message"] == ("The Python interpreter '/nonexistent/python3' "
                                    "(FLASK_PYTHON) was not found.")
        assert "FLASK_PYTHON" in error["suggestion"]
        assert any("FLASK_PYTHON" in m for m in messages(gwlog, level=logging.WARNING))
    finally:
        await bridge.stop()


@pytest.mark.timeout(20)
async def test_flask_port_already_in_use(orphans, sink, gwlog):
    bridge = make_bridge(orphans, "healthy.py", sink)
    port = bridge.config.port
    blocker = socket.socket()
    try:
        blocker.bind(("127.0.0.1", port))
        blocker.listen(1)
        assert await bridge.start() is False
        assert bridge.state is S.FAILED and bridge.pid is None and sink.lines == []
        assert bridge.last_error["message"] == (
            "Port %d on 127.0.0.1 is already in use, so the Flask server cannot bind it." % port)
        assert "FLASK_PORT" in bridge.last_error["suggestion"]
        assert any("already in use" in m for m in messages(gwlog, level=logging.WARNING))
    finally:
        blocker.close()
        await bridge.stop()


@pytest.mark.timeout(20)
async def test_import_error_exits_1_with_the_traceback(orphans, sink, gwlog):
    bridge = make_bridge(orphans, "import_error.py", sink)
    try:
        assert await bridge.start() is False
        assert bridge.state is S.EXITED and not bridge.is_flask_ready()
        # the crash report waits for the pumps to reach EOF before filling stderr_tail
        assert await wait_for(lambda: bridge.status()["last_exit"]["stderr_tail"], 5)
        last_exit = bridge.status()["last_exit"]
        assert last_exit["code"] == 1 and last_exit["signal"] is None
        assert last_exit["stderr_tail"][-1] == ("ModuleNotFoundError: No module named "
                                                "'deepfake_dependency_that_is_not_installed'")
        assert last_exit["stderr_tail"][0] == "Traceback (most recent call last):"
        errors = messages(gwlog, level=logging.ERROR)
        assert len(errors) == 1
        assert errors[0].startswith("Flask server exited with code 1. Last stderr lines:")
        assert "ModuleNotFoundError" in errors[0]
        assert "Troubleshooting:" in errors[0] and "pip install" in errors[0]
        assert "exit code 1" in bridge.status()["message"]
    finally:
        await bridge.stop()
    assert bridge.state is S.STOPPED


@pytest.mark.timeout(20)
async def test_never_healthy_fails_after_the_retries(orphans, sink, gwlog):
    bridge = make_bridge(orphans, "never_healthy.py", sink, health_retries=3,
                         health_timeout=10000)
    try:
        began = time.monotonic()
        assert await bridge.start() is False
        took = time.monotonic() - began
        assert bridge.state is S.FAILED
        assert took < 5.0  # 3 checks 100 ms apart (+ start-up), far below the 10 s timeout
        # on a loaded machine the interpreter may still be starting at the 3rd check
        assert bridge.last_error["message"] in [
            "The Flask server did not become healthy within 10 s (3 checks; last: %s)." % d
            for d in ("health check answered HTTP 500",
                      "connection refused (nothing listening yet)")]
        assert any("did not become healthy" in m
                   for m in messages(gwlog, level=logging.WARNING))
        assert pid_alive(bridge.pid)  # not killed: health checks go on, and see the 500
        assert await wait_for(
            lambda: bridge.last_health.detail == "health check answered HTTP 500", 5)
        assert bridge.state is S.FAILED
    finally:
        await bridge.stop()
    assert bridge.state is S.STOPPED
    assert await wait_for(lambda: port_is_free(bridge.config.port), 2)


@pytest.mark.timeout(20)
async def test_never_healthy_fails_at_the_timeout(orphans, sink, gwlog):
    bridge = make_bridge(orphans, "never_healthy.py", sink, health_retries=1000,
                         health_timeout=800)
    try:
        began = time.monotonic()
        assert await bridge.start() is False
        took = time.monotonic() - began
        assert bridge.state is S.FAILED
        assert 0.8 <= took < 3.0, took
        assert bridge.last_error["message"].startswith(
            "The Flask server did not become healthy within 0.8 s")
        assert any("did not become healthy" in m
                   for m in messages(gwlog, level=logging.WARNING))
    finally:
        await bridge.stop()


@pytest.mark.timeout(20)
async def test_slow_start_is_ready_within_the_timeout(orphans, sink, gwlog):
    bridge = make_bridge(orphans, "slow_start.py", sink, env=child_env(SLOW_START="1.5"),
                         health_timeout=5000, health_retries=100)
    try:
        assert await bridge.start() is True
        assert bridge.state is S.READY
        assert 1500 <= bridge.ready_after_ms < 5000, bridge.ready_after_ms
        print("slow start ready after %.0f ms" % bridge.ready_after_ms)
    finally:
        await bridge.stop()


# --- while it runs ---------------------------------------------------------------------------

@pytest.mark.timeout(20)
async def test_crash_is_exited_code_3_with_report_and_no_restart(orphans, sink, gwlog):
    bridge = make_bridge(orphans, "crasher.py", sink)
    try:
        assert await bridge.start() is True
        pid = bridge.pid
        code, body = await fetch_json(bridge.flask_url + "/api/deepfake/crash")
        assert code == 200 and body == {"crashing": True}
        assert await wait_for(lambda: bridge.state is S.EXITED, 5)
        assert not bridge.is_flask_ready() and bridge.pid is None
        assert bridge.last_exit["code"] == 3 and bridge.last_exit["signal"] is None
        assert bridge.last_exit["pid"] == pid
        assert await wait_for(lambda: bridge.last_exit["stderr_tail"], 5)
        assert bridge.last_exit["stderr_tail"][-1] == (
            "RuntimeError: crashing on purpose (crash requested)")
        errors = messages(gwlog, level=logging.ERROR)
        assert len(errors) == 1 and errors[0].startswith("Flask server exited with code 3.")
        assert "RuntimeError: crashing on purpose" in errors[0]
        # no automatic restart by default
        await asyncio.sleep(1.5)
        assert bridge.state is S.EXITED and bridge.restarts == 0 and bridge.pid is None
        assert not pid_alive(pid)
    finally:
        await bridge.stop()


@pytest.mark.timeout(20)
async def test_sigkill_of_the_child_is_exited_with_signal(orphans, sink, gwlog):
    bridge = make_bridge(orphans, "healthy.py", sink)
    try:
        assert await bridge.start() is True
        os.kill(bridge.pid, signal.SIGKILL)
        assert await wait_for(lambda: bridge.state is S.EXITED, 5)
        assert bridge.last_exit["signal"] == "SIGKILL" and bridge.last_exit["code"] is None
        assert not bridge.is_flask_ready()
        assert "signal SIGKILL" in bridge.status()["message"]
        assert await wait_for(lambda: any("was killed by signal SIGKILL" in m for m in
                                          messages(gwlog, level=logging.ERROR)), 5)
    finally:
        await bridge.stop()


@pytest.mark.timeout(30)
async def test_sigstop_makes_it_unhealthy_and_sigcont_ready_again(orphans, sink, gwlog):
    bridge = make_bridge(orphans, "healthy.py", sink, unhealthy_after=2)
    pid = None
    try:
        assert await bridge.start() is True
        pid = bridge.pid
        os.kill(pid, signal.SIGSTOP)
        stopped_at = time.monotonic()
        # each check times out after max(1 s, 2 x interval); 2 in a row -> unhealthy
        assert await wait_for(lambda: bridge.state is S.UNHEALTHY, 8)
        took = time.monotonic() - stopped_at
        assert 1.0 <= took < 6.0, took
        assert not bridge.is_flask_ready()
        assert "timed out" in bridge.last_health.detail
        assert any("failed 2 health checks in a row" in m
                   for m in messages(gwlog, level=logging.WARNING))
        os.kill(pid, signal.SIGCONT)
        resumed_at = time.monotonic()
        assert await wait_for(lambda: bridge.state is S.READY, 5)
        print("SIGSTOP -> unhealthy %.2f s, SIGCONT -> ready %.2f s"
              % (took, time.monotonic() - resumed_at))
        assert bridge.is_flask_ready() and bridge.pid == pid
        assert any("recovered" in m for m in messages(gwlog, level=logging.WARNING))
    finally:
        if pid is not None and pid_alive(pid):
            os.kill(pid, signal.SIGCONT)
        await bridge.stop()


@pytest.mark.timeout(30)
async def test_auto_restart_once(orphans, sink, gwlog):
    bridge = make_bridge(orphans, "crasher.py", sink, env=child_env(CRASH_AFTER="0.8"),
                         auto_restart=1)
    pids = []
    try:
        assert await bridge.start() is True
        pids.append(bridge.pid)
        assert await wait_for(lambda: bridge.state is S.EXITED, 5)
        # restart 1 of 1 after 0.5 s: ready again with a new process
        assert await wait_for(lambda: bridge.state is S.READY, 8)
        assert bridge.restarts == 1
        pids.append(bridge.pid)
        assert pids[1] != pids[0]
        # it crashes again; no second restart
        assert await wait_for(lambda: bridge.state is S.EXITED, 5)
        await asyncio.sleep(1.5)
        assert bridge.state is S.EXITED and bridge.restarts == 1 and bridge.pid is None
        assert bridge.last_exit["code"] == 3
        assert sum("Restarting the Flask server" in m
                   for m in messages(gwlog, level=logging.WARNING)) == 1
    finally:
        await bridge.stop()
    assert not any(pid_alive(p) for p in pids)


# --- reuse ---------------------------------------------------------------------------------

@pytest.mark.timeout(30)
async def test_start_again_after_stop(orphans, sink, gwlog):
    bridge = make_bridge(orphans, "healthy.py", sink)
    try:
        assert await bridge.start() is True
        first = bridge.pid
        await bridge.stop()
        assert bridge.state is S.STOPPED and not pid_alive(first)
        assert await bridge.start() is True
        second = bridge.pid
        assert second != first and pid_alive(second)
        code, body = await fetch_json(bridge.flask_url + "/api/deepfake/stats")
        assert code == 200 and body["pid"] == second
        # health monitoring works again too: a SIGKILL is seen as an exit
        os.kill(second, signal.SIGKILL)
        assert await wait_for(lambda: bridge.state is S.EXITED, 5)
    finally:
        await bridge.stop()
    assert bridge.state is S.STOPPED


@pytest.mark.timeout(30)
async def test_async_with_stops_the_child_on_an_exception(orphans, sink):
    bridge = make_bridge(orphans, "healthy.py", sink)
    pid = None
    with pytest.raises(RuntimeError, match="boom"):
        async with bridge:
            assert bridge.is_flask_ready()
            pid = bridge.pid
            raise RuntimeError("boom")
    assert bridge.state is S.STOPPED
    assert pid is not None and not pid_alive(pid)
    assert port_is_free(bridge.config.port)


@pytest.mark.timeout(30)
async def test_start_after_stop_with_the_port_taken_fails_cleanly(orphans, sink, gwlog):
    """start() never raises for an environment problem, also on a second start (stopped ->
    failed): it used to raise InvalidTransition("stopped -> failed")."""
    bridge = make_bridge(orphans, "healthy.py", sink)
    blocker = socket.socket()
    blocker.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT leftovers
    try:
        assert await bridge.start() is True
        await bridge.stop()
        blocker.bind(("127.0.0.1", bridge.config.port))
        blocker.listen(1)
        assert await bridge.start() is False
        assert bridge.state is S.FAILED and bridge.pid is None
        assert "already in use" in bridge.last_error["message"]
    finally:
        blocker.close()
        await bridge.stop()
    assert bridge.state is S.STOPPED


@pytest.mark.timeout(30)
async def test_auto_restart_that_finds_the_port_taken_is_failed(orphans, sink, gwlog):
    """The restart (0.5 s after the crash) finds the port taken by someone else: ``failed``
    with the reason, not an InvalidTransition("exited -> failed") in a background task."""
    bridge = make_bridge(orphans, "crasher.py", sink, auto_restart=1)
    blocker = socket.socket()
    blocker.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        assert await bridge.start() is True
        code, _ = await fetch_json(bridge.flask_url + "/api/deepfake/crash")
        assert code == 200
        assert await wait_for(lambda: bridge.state is S.EXITED, 5)
        blocker.bind(("127.0.0.1", bridge.config.port))
        blocker.listen(1)
        assert await wait_for(lambda: bridge.state is S.FAILED, 5), bridge.status()
        assert bridge.restarts == 1 and bridge.pid is None
        assert "already in use" in bridge.last_error["message"]
        assert not any(r.exc_info for r in gwlog.records)
        assert not any("InvalidTransition" in m for m in messages(gwlog, "")), \
            messages(gwlog, "")
    finally:
        blocker.close()
        await bridge.stop()
