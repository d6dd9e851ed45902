"""PythonBridge.stop() against REAL children: a cooperative one, one that ignores SIGTERM, and
a Flask app under Werkzeug's reloader (the grandchild that serves the port must go too)."""
from __future__ import annotations

import asyncio
import logging
import os
import signal
import time

import psutil
import pytest

from gw_realproc import child_env, make_bridge, messages, pid_alive, port_is_free, wait_for
from tornado_gateway.supervisor.state import BridgeState as S

pytestmark = pytest.mark.integration


@pytest.mark.timeout(20)
async def test_stop_cooperative_child_is_fast(orphans, sink, gwlog):
    bridge = make_bridge(orphans, "healthy.py", sink, shutdown_timeout=5000)
    assert await bridge.start() is True
    pid = bridge.pid
    began = time.monotonic()
    await bridge.stop()
    took = time.monotonic() - began
    print("cooperative stop: %.0f ms" % (took * 1000))
    assert took < 1.0, took
    assert bridge.state is S.STOPPED and not bridge.is_flask_ready() and bridge.pid is None
    assert bridge.last_exit["code"] == 0 and bridge.last_exit["signal"] is None
    assert not pid_alive(pid)
    assert port_is_free(bridge.config.port)
    logged = messages(gwlog)
    assert "Stopping the Flask server (pid %d): SIGTERM to process group %d" % (pid, pid) in logged
    assert not any("killing" in m for m in logged)
    await bridge.stop()  # again: a no-op
    assert bridge.state is S.STOPPED


@pytest.mark.timeout(20)
async def test_stop_kills_a_child_that_ignores_sigterm_after_the_timeout(orphans, sink, gwlog):
    bridge = make_bridge(orphans, "ignores_sigterm.py", sink, shutdown_timeout=700)
    assert await bridge.start() is True
    pid = bridge.pid
    began = time.monotonic()
    await bridge.stop()
    took = time.monotonic() - began
    print("SIGTERM ignored: killed after %.0f ms (timeout 700 ms)" % (took * 1000))
    assert 0.7 <= took <= 2.7, took
    assert bridge.state is S.STOPPED
    assert bridge.last_exit["signal"] == "SIGKILL"
    assert not pid_alive(pid) and port_is_free(bridge.config.port)
    assert any(m.startswith("Flask server did not exit within 0.7 s; killing its process tree: "
                            "SIGKILL to process group %d" % pid)
               for m in messages(gwlog, level=logging.WARNING))


@pytest.mark.timeout(20)
async def test_concurrent_stops_share_one_shutdown(orphans, sink, gwlog):
    bridge = make_bridge(orphans, "ignores_sigterm.py", sink, shutdown_timeout=500)
    assert await bridge.start() is True
    began = time.monotonic()
    await asyncio.gather(bridge.stop(), bridge.stop(), bridge.stop())
    assert time.monotonic() - began < 2.5
    assert bridge.state is S.STOPPED
    assert sum(m.startswith("Stopping the Flask server") for m in messages(gwlog)) == 1


@pytest.mark.timeout(20)
async def test_stop_while_starting(orphans, sink, gwlog):
    bridge = make_bridge(orphans, "slow_start.py", sink, env=child_env(SLOW_START="3"))
    start = asyncio.ensure_future(bridge.start())
    assert await wait_for(lambda: bridge.pid is not None, 5)
    pid = bridge.pid
    await asyncio.sleep(0.3)
    began = time.monotonic()
    await bridge.stop()
    assert time.monotonic() - began < 1.5
    assert await asyncio.wait_for(start, 3) is False
    assert bridge.state is S.STOPPED and not pid_alive(pid)


def reloader_tree(pid: int) -> list:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []


async def start_reloader(orphans, sink):
    bridge = make_bridge(orphans, "reloader_app.py", sink, health_timeout=15000,
                         health_retries=200)
    assert await bridge.start() is True, bridge.status()
    reloader = bridge.pid
    assert await wait_for(lambda: reloader_tree(reloader), 5)
    grandchildren = reloader_tree(reloader)
    assert len(grandchildren) == 1
    server = grandchildren[0]
    assert server.environ().get("WERKZEUG_RUN_MAIN") == "true"
    assert str(bridge.config.port) in server.cmdline()
    # the grandchild is the one that serves the port
    assert any(c.laddr.port == bridge.config.port and c.status == psutil.CONN_LISTEN
               for c in server.net_connections(kind="tcp"))
    return bridge, reloader, server.pid


@pytest.mark.timeout(40)
async def test_stop_reloader_app_removes_reloader_and_grandchild(orphans, sink, gwlog):
    bridge, reloader, server = await start_reloader(orphans, sink)
    began = time.monotonic()
    await bridge.stop()
    print("reloader tree stopped in %.0f ms" % ((time.monotonic() - began) * 1000))
    assert bridge.state is S.STOPPED
    assert not pid_alive(reloader)
    assert await wait_for(lambda: not pid_alive(server), 2)
    assert port_is_free(bridge.config.port)


@pytest.mark.timeout(40)
async def test_reloader_killed_alone_leaves_no_orphan_after_stop(orphans, sink, gwlog):
    """SIGKILL of the reloader only (an OOM kill, a `kill -9` by hand) would leave its
    grandchild serving the port; the bridge kills it as soon as it sees the reloader exit, so
    the port is free for a restart, and stop() has nothing left to do."""
    bridge, reloader, server = await start_reloader(orphans, sink)
    os.kill(reloader, signal.SIGKILL)
    assert await wait_for(lambda: bridge.state is S.EXITED, 5)
    assert bridge.last_exit["signal"] == "SIGKILL"
    assert await wait_for(lambda: not pid_alive(server), 3), "grandchild %d orphaned" % server
    assert await wait_for(lambda: port_is_free(bridge.config.port), 2)
    assert ("Flask server (pid %d) exited but left processes running; killed them: SIGKILL "
            "to process group %d" % (reloader, reloader)) in messages(gwlog, level=logging.WARNING)
    await bridge.stop()
    assert bridge.state is S.STOPPED


@pytest.mark.timeout(40)
async def test_auto_restart_after_the_reloader_is_killed_gets_the_port_back(orphans, sink, gwlog):
    """The orphaned grandchild would keep the port and make the restart fail with "port in
    use"; killed at the reloader's exit, the restart binds the port and becomes ready."""
    bridge = make_bridge(orphans, "reloader_app.py", sink, health_timeout=15000,
                         health_retries=200, auto_restart=1)
    try:
        assert await bridge.start() is True
        first = bridge.pid
        assert await wait_for(lambda: reloader_tree(first), 5)
        old_server = reloader_tree(first)[0].pid
        os.kill(first, signal.SIGKILL)
        assert await wait_for(lambda: bridge.state is S.EXITED, 5)
        assert await wait_for(lambda: bridge.restarts == 1 and bridge.state is S.READY, 20), \
            bridge.status()
        assert bridge.pid != first and not pid_alive(old_server)
        assert bridge.last_error is None
    finally:
        await bridge.stop()
    assert bridge.state is S.STOPPED
    assert await wait_for(lambda: port_is_free(bridge.config.port), 2)


@pytest.mark.timeout(20)
async def test_stop_a_frozen_child(orphans, sink, gwlog):
    """SIGSTOPped: SIGTERM stays pending, so it is killed after the timeout; stop() never
    hangs."""
    bridge = make_bridge(orphans, "healthy.py", sink, shutdown_timeout=500)
    assert await bridge.start() is True
    pid = bridge.pid
    os.kill(pid, signal.SIGSTOP)
    began = time.monotonic()
    await bridge.stop()
    took = time.monotonic() - began
    assert 0.5 <= took <= 2.5, took
    assert bridge.state is S.STOPPED and bridge.last_exit["signal"] == "SIGKILL"
    assert not pid_alive(pid) and port_is_free(bridge.config.port)
