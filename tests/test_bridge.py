"""PythonBridge on fakes: lifecycle, environment validation, health, crashes, stop."""
import asyncio
import logging
import os

import pytest

from tornado_gateway.supervisor import child as child_mod
from tornado_gateway.supervisor.bridge import PythonBridge
from tornado_gateway.config import FlaskConfig, GatewayConfig
from tornado_gateway.supervisor.health import HealthResult
from tornado_gateway.supervisor.state import BridgeState

S = BridgeState
pytestmark = pytest.mark.timeout(30)


async def until(predicate, timeout=5.0):
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not predicate():
        assert loop.time() < end, "condition not reached in time"
        await asyncio.sleep(0.002)


def test_start_success_then_stop(gw_fakes):
    control = gw_fakes.FakeControl()
    bridge = gw_fakes.make_bridge(control, environ={"PATH": "/bin", "KEEP": "me"})

    async def main():
        with gw_fakes.capture_logs() as logs:
            ok = await bridge.start()
            status = bridge.status()
            assert ok and bridge.is_flask_ready() and bridge.state is S.READY
            assert bridge.pid == control.pid and control.handle.running
            await bridge.stop()
        return status, logs

    status, logs = asyncio.run(main())
    argv, env, cwd = control.spawned[0]
    assert argv == ["/usr/bin/python3-fake", gw_fakes.script, "--host", "127.0.0.1",
                    "--port", "5999"]
    assert env["KEEP"] == "me" and env["PYTHONUNBUFFERED"] == "1"
    assert env["PYTHONIOENCODING"] == "utf-8" and env["TORNADO_GATEWAY_PID"] == str(os.getpid())
    assert status["state"] == "ready" and status["ready"] is True and status["pid"] == control.pid
    assert status["external"] is False and status["url"] == "http://127.0.0.1:5999"
    assert status["last_health_check"]["ok"] is True and status["ready_after_ms"] is not None
    assert status["message"] == "The deepfake service is running and healthy."
    assert any("Flask server ready at http://127.0.0.1:5999" in m
               for m in logs.messages(logging.INFO))
    assert control.calls == ["spawn", "request_stop"]
    assert bridge.state is S.STOPPED and not bridge.is_flask_ready() and bridge.pid is None
    assert [h[1] for h in bridge.history] == [S.STARTING, S.READY, S.STOPPING, S.STOPPED]


def test_accepts_a_gateway_config(gw_fakes):
    bridge = PythonBridge(GatewayConfig(flask=FlaskConfig(port=6111)),
                          control=gw_fakes.FakeControl(), checker=gw_fakes.FakeChecker())
    assert bridge.config.port == 6111 and bridge.flask_url == "http://127.0.0.1:6111"
    assert bridge.state is S.IDLE and bridge.pid is None and not bridge.is_flask_ready()


@pytest.mark.parametrize("case", ["no_python", "no_configured_python", "no_script", "port_busy"])
def test_environment_problems_fail_without_spawning(gw_fakes, case):
    control = gw_fakes.FakeControl()
    kwargs = {
        "no_python": dict(python=None),
        "no_configured_python": dict(python=None),
        "no_script": dict(script="/does/not/exist/api_server.py"),
        "port_busy": dict(port_busy=True),
    }[case]
    bridge = gw_fakes.make_bridge(control, **kwargs)
    if case == "no_configured_python":  # FLASK_PYTHON set, but detection finds nothing
        bridge.config = FlaskConfig(**{**bridge.config.__dict__, "python": "/opt/missing/python"})

    async def main():
        with gw_fakes.capture_logs() as logs:
            ok = await bridge.start()
        return ok, logs

    ok, logs = asyncio.run(main())
    assert ok is False and bridge.state is S.FAILED and control.calls == []
    err = bridge.last_error
    expected = {
        "no_python": ("No Python interpreter found", "FLASK_PYTHON"),
        "no_configured_python": ("'/opt/missing/python' (FLASK_PYTHON) was not found",
                                 "FLASK_PYTHON"),
        "no_script": ("'/does/not/exist/api_server.py' was not found", "FLASK_SCRIPT"),
        "port_busy": ("Port 5999 on 127.0.0.1 is already in use", "FLASK_PORT"),
    }[case]
    assert expected[0] in err["message"] and expected[1] in err["suggestion"]
    warnings = logs.messages(logging.WARNING)
    assert any(expected[0] in w and "keeps serving" in w for w in warnings)
    assert expected[0] in bridge.describe_state() and bridge.status()["state"] == "failed"


def test_spawn_error_fails(gw_fakes):
    control = gw_fakes.FakeControl(spawn_error=PermissionError(13, "Permission denied"))
    bridge = gw_fakes.make_bridge(control)
    assert asyncio.run(bridge.start()) is False
    assert bridge.state is S.FAILED
    assert "Could not start /usr/bin/python3-fake" in bridge.last_error["message"]
    assert "Permission denied" in bridge.last_error["message"]


def test_health_timeout_fails_then_recovers_through_the_monitor(gw_fakes):
    checker = gw_fakes.FakeChecker([False])
    control = gw_fakes.FakeControl()
    bridge = gw_fakes.make_bridge(control, checker, health_retries=3)

    async def main():
        with gw_fakes.capture_logs() as logs:
            ok = await bridge.start()
            assert ok is False and bridge.state is S.FAILED and checker.calls == 3
            assert control.handle.running  # a failed start does not kill a slow child
            checker.script = [True]
            await until(lambda: bridge.state is S.READY)
            await bridge.stop()
        return logs

    logs = asyncio.run(main())
    text = logs.text(logging.WARNING)
    assert "did not become healthy within 5 s (3 checks; last: health check answered HTTP 500)" \
        in text
    assert "became healthy after its startup wait" in text


def test_unhealthy_after_consecutive_failures_and_recovery(gw_fakes):
    checker = gw_fakes.FakeChecker([True])
    bridge = gw_fakes.make_bridge(checker=checker, unhealthy_after=3)

    async def main():
        with gw_fakes.capture_logs() as logs:
            assert await bridge.start()
            checker.script = [False]
            await until(lambda: bridge.state is S.UNHEALTHY)
            failed_checks = bridge._failures
            assert not bridge.is_flask_ready()
            checker.script = [True]
            await until(lambda: bridge.state is S.READY)
            await bridge.stop()
        return logs, failed_checks

    logs, failed_checks = asyncio.run(main())
    assert failed_checks == 3
    assert "failed 3 health checks in a row" in logs.text(logging.WARNING)
    assert "recovered" in logs.text(logging.WARNING)


def test_child_exits_during_startup(gw_fakes):
    control = gw_fakes.FakeControl(stderr=b"ModuleNotFoundError: No module named 'flask'\n")
    checker = gw_fakes.FakeChecker([False], on_check=lambda n: n == 2 and control.exit(1))
    bridge = gw_fakes.make_bridge(control, checker, health_retries=100)

    async def main():
        with gw_fakes.capture_logs() as logs:
            ok = await bridge.start()
            await until(lambda: bridge.last_exit and bridge.last_exit["stderr_tail"])
            await bridge.stop()
        return ok, logs

    ok, logs = asyncio.run(main())
    assert ok is False and checker.calls == 2
    assert bridge.last_exit["code"] == 1
    assert bridge.last_exit["stderr_tail"] == ["ModuleNotFoundError: No module named 'flask'"]
    text = logs.text(logging.ERROR)
    assert "exited with code 1" in text and "No module named 'flask'" in text
    assert (S.STARTING, S.EXITED) in [(a, b) for a, b, _ in bridge.history]


def test_crash_while_ready_logs_details_and_stops_serving(gw_fakes):
    control = gw_fakes.FakeControl(stderr=b"line 1\nTraceback\nKeyError: 'x'\n",
                                   stdout=b"Running on http://127.0.0.1:5999\n")
    lines = []
    bridge = gw_fakes.make_bridge(control)
    bridge._sink = lines.append

    async def main():
        with gw_fakes.capture_logs() as logs:
            assert await bridge.start()
            control.exit(-11)
            assert bridge.state is S.EXITED and not bridge.is_flask_ready()
            await until(lambda: bridge.last_exit["stderr_tail"])
            await asyncio.sleep(0.02)
            status = bridge.status()
            await bridge.stop()
        return logs, status

    logs, status = asyncio.run(main())
    assert bridge.last_exit["signal"] == "SIGSEGV" and bridge.last_exit["code"] is None
    text = logs.text(logging.ERROR)
    assert "was killed by signal SIGSEGV" in text
    assert "    KeyError: 'x'" in text and "Troubleshooting" in text
    assert "python %s --port 5999" % gw_fakes.script in text
    assert status["state"] == "exited" and status["pid"] is None and status["uptime_s"] is None
    assert "signal SIGSEGV" in status["message"]
    assert {(l.stream, l.text) for l in lines} >= {("stdout", "Running on http://127.0.0.1:5999"),
                                                   ("stderr", "KeyError: 'x'")}
    assert control.calls == ["spawn"]  # nothing left to stop
    assert bridge.state is S.STOPPED


def test_auto_restart_restarts_an_exited_child(gw_fakes, monkeypatch):
    control = gw_fakes.FakeControl()
    bridge = gw_fakes.make_bridge(control, auto_restart=1)
    real_sleep = asyncio.sleep
    monkeypatch.setattr("tornado_gateway.supervisor.bridge.asyncio.sleep",
                        lambda d: real_sleep(0))

    async def main():
        assert await bridge.start()
        control.exit(3)
        await until(lambda: bridge.state is S.READY and bridge.restarts == 1)
        control.exit(4)
        await asyncio.sleep(0.05)
        state = bridge.state
        await bridge.stop()
        return state

    assert asyncio.run(main()) is S.EXITED  # only one restart allowed
    assert control.calls.count("spawn") == 2


def test_stop_kills_the_tree_when_the_child_ignores_the_request(gw_fakes):
    control = gw_fakes.FakeControl(obey_stop=False)
    bridge = gw_fakes.make_bridge(control, shutdown_timeout=30)

    async def main():
        with gw_fakes.capture_logs() as logs:
            await bridge.start()
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            await bridge.stop()
            return loop.time() - t0, logs

    took, logs = asyncio.run(main())
    assert control.calls == ["spawn", "request_stop", "kill_tree"]
    assert 0.025 <= took < 2.0
    assert "did not exit within 0.03 s; killing its process tree" in logs.text(logging.WARNING)
    assert bridge.state is S.STOPPED and control.handle.returncode == -9


def test_stop_explicit_timeout_overrides_config(gw_fakes):
    control = gw_fakes.FakeControl(obey_stop=False)
    bridge = gw_fakes.make_bridge(control, shutdown_timeout=60000)

    async def main():
        await bridge.start()
        await asyncio.wait_for(bridge.stop(timeout_s=0.01), 2.0)

    asyncio.run(main())
    assert control.calls[-1] == "kill_tree"


def test_stop_is_idempotent_and_closes_the_checker(gw_fakes):
    control = gw_fakes.FakeControl()
    checker = gw_fakes.FakeChecker()
    bridge = gw_fakes.make_bridge(control, checker)

    async def main():
        await bridge.start()
        await asyncio.gather(bridge.stop(), bridge.stop())
        await bridge.stop()

    asyncio.run(main())
    assert control.calls == ["spawn", "request_stop"] and checker.closed
    assert bridge.state is S.STOPPED


def test_stop_before_start(gw_fakes):
    bridge = gw_fakes.make_bridge()
    asyncio.run(bridge.stop())
    assert bridge.state is S.STOPPED


def test_stop_during_startup(gw_fakes):
    control = gw_fakes.FakeControl()
    bridge = gw_fakes.make_bridge(control, gw_fakes.FakeChecker([False]), health_retries=10 ** 6,
                                  health_timeout=60000)

    async def main():
        start = asyncio.ensure_future(bridge.start())
        await until(lambda: bridge.state is S.STARTING and control.handle is not None)
        await bridge.stop()
        return await asyncio.wait_for(start, 2.0)

    assert asyncio.run(main()) is False
    assert bridge.state is S.STOPPED and control.calls == ["spawn", "request_stop"]


def test_restart_after_stop(gw_fakes):
    control = gw_fakes.FakeControl()
    bridge = gw_fakes.make_bridge(control)

    async def main():
        await bridge.start()
        await bridge.stop()
        assert await bridge.start()
        await bridge.stop()

    asyncio.run(main())
    assert control.calls == ["spawn", "request_stop", "spawn", "request_stop"]


def test_force_stop_kills_at_once(gw_fakes):
    control = gw_fakes.FakeControl(obey_stop=False)
    bridge = gw_fakes.make_bridge(control, shutdown_timeout=60000)

    async def main():
        await bridge.start()
        await asyncio.wait_for(bridge.force_stop(), 2.0)

    asyncio.run(main())
    assert control.calls[:2] == ["spawn", "kill_tree"]
    assert bridge.state is S.STOPPED


def test_async_with_stops_on_exception(gw_fakes):
    control = gw_fakes.FakeControl()
    bridge = gw_fakes.make_bridge(control)

    async def main():
        with pytest.raises(RuntimeError):
            async with bridge as b:
                assert b.is_flask_ready()
                raise RuntimeError("boom")

    asyncio.run(main())
    assert bridge.state is S.STOPPED and control.calls == ["spawn", "request_stop"]


def test_external_server_spawns_nothing(gw_fakes):
    control = gw_fakes.FakeControl()
    bridge = gw_fakes.make_bridge(control, url="http://127.0.0.1:7001")

    async def main():
        assert await bridge.start()
        status = bridge.status()
        await bridge.stop()
        return status

    status = asyncio.run(main())
    assert control.calls == [] and status["external"] is True
    assert status["url"] == "http://127.0.0.1:7001" and status["uptime_s"] is not None


def test_external_server_not_answering_fails_with_advice(gw_fakes):
    bridge = gw_fakes.make_bridge(checker=gw_fakes.FakeChecker([False]), health_retries=2,
                                  url="http://127.0.0.1:7001")

    async def main():
        ok = await bridge.start()
        await bridge.stop()
        return ok

    assert asyncio.run(main()) is False
    assert "http://127.0.0.1:7001 did not answer" in bridge.last_error["message"]
    assert "FLASK_URL" in bridge.last_error["suggestion"]


def test_report_upstream_failure_checks_now_without_changing_state(gw_fakes):
    checker = gw_fakes.FakeChecker([True])
    bridge = gw_fakes.make_bridge(checker=checker, health_interval=60000)

    async def main():
        await bridge.start()
        before = checker.calls
        checker.script = [False]
        bridge.report_upstream_failure("connection refused")
        await until(lambda: checker.calls > before)
        await asyncio.sleep(0)
        state = bridge.state
        await bridge.stop()
        return state

    assert asyncio.run(main()) is S.READY  # one failure < unhealthy_after
    assert bridge.last_health.ok is False


def test_output_during_startup_pokes_an_immediate_check(gw_fakes):
    control = gw_fakes.FakeControl(stdout=b"Running on http://127.0.0.1:5999\n")
    checker = gw_fakes.FakeChecker([False, True])
    bridge = gw_fakes.make_bridge(control, checker, health_interval=60000, health_retries=5)

    async def main():
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        ok = await asyncio.wait_for(bridge.start(), 5.0)
        took = loop.time() - t0
        await bridge.stop()
        return ok, took

    ok, took = asyncio.run(main())
    assert ok and took < 5.0


def test_describe_state_covers_every_state(gw_fakes):
    bridge = gw_fakes.make_bridge()
    assert "not been started" in bridge.describe_state()
    bridge._machine._state = S.STARTING
    assert "starting" in bridge.describe_state()
    bridge._machine._state = S.UNHEALTHY
    assert "503" in bridge.describe_state()
    bridge._machine._state = S.EXITED
    bridge.last_exit = {"code": 2, "signal": None}
    assert "exit code 2" in bridge.describe_state()
    bridge._machine._state = S.STOPPING
    assert "shutting" in bridge.describe_state()


def test_health_status_snapshot_is_iso_utc(gw_fakes):
    bridge = gw_fakes.make_bridge()
    bridge.last_health = HealthResult(False, "x", 12.345, at=0.0)
    assert bridge.status()["last_health_check"] == {
        "at": "1970-01-01T00:00:00.000Z", "ok": False, "latency_ms": 12.35, "detail": "x"}


@pytest.mark.parametrize("before", ["stopped", "exited"])
def test_start_again_with_a_bad_environment_fails_cleanly(gw_fakes, before):
    # a restart (after stop(), or after the child exited) that finds the port taken must end in
    # "failed" with advice, like a first start, not raise InvalidTransition
    control = gw_fakes.FakeControl()
    bridge = gw_fakes.make_bridge(control)
    busy = {"now": False}
    bridge._port_in_use = lambda host, port: busy["now"]

    async def main():
        assert await bridge.start()
        if before == "stopped":
            await bridge.stop()
        else:
            control.exit(1)
        busy["now"] = True
        ok = await bridge.start()
        await bridge.stop()
        return ok

    assert asyncio.run(main()) is False
    assert bridge.last_error and "already in use" in bridge.last_error["message"]
    assert (S.STOPPED if before == "stopped" else S.EXITED, S.FAILED) in [
        (a, b) for a, b, _ in bridge.history]


def test_no_health_checks_against_an_exited_child(gw_fakes):
    control = gw_fakes.FakeControl()
    checker = gw_fakes.FakeChecker([True])
    bridge = gw_fakes.make_bridge(control, checker, health_interval=1)

    async def main():
        assert await bridge.start()
        await until(lambda: checker.calls >= 3)  # the monitor is checking
        control.exit(1)
        await asyncio.sleep(0.01)
        after_exit = checker.calls
        await asyncio.sleep(0.05)
        later, state = checker.calls, bridge.state
        await bridge.stop()
        return after_exit, later, state

    after_exit, later, state = asyncio.run(main())
    assert later == after_exit and state is S.EXITED


def test_start_again_after_a_health_timeout_does_not_orphan_the_live_child(gw_fakes):
    # a start that timed out leaves its (slow) child running and watched; a second start()
    # must not spawn another one over it, which stop() would then never reach
    control = gw_fakes.FakeControl()
    checker = gw_fakes.FakeChecker([False])
    bridge = gw_fakes.make_bridge(control, checker, health_retries=2)
    handles = []
    spawn = control.spawn

    def recording_spawn(*args):
        handles.append(spawn(*args))
        return handles[-1]

    control.spawn = recording_spawn

    async def main():
        assert await bridge.start() is False
        assert bridge.state is S.FAILED and handles[0].running
        again = await bridge.start()
        await bridge.stop()
        return again

    assert asyncio.run(main()) is False
    assert all(not h.running for h in handles), "a child was left running after stop()"
    assert control.calls.count("spawn") == 1


def test_flask_host_that_cannot_be_bound_is_not_reported_as_a_port_in_use(gw_fakes):
    control = gw_fakes.FakeControl()
    bridge = gw_fakes.make_bridge(control, host="192.0.2.1")
    bridge._port_in_use = child_mod.port_in_use  # the real check

    async def main():
        with gw_fakes.capture_logs() as logs:
            ok = await bridge.start()
        return ok, logs

    ok, logs = asyncio.run(main())
    assert ok is False and bridge.state is S.FAILED and control.calls == []
    err = bridge.last_error
    assert "cannot listen on 192.0.2.1 port 5999" in err["message"]
    assert "already in use" not in err["message"] and "FLASK_HOST" in err["suggestion"]
    assert "cannot listen on 192.0.2.1" in logs.text(logging.WARNING)


def test_a_sigkill_crash_names_the_likely_causes(gw_fakes):
    """SIGKILL leaves no stderr to explain it: the report says what usually sends it."""
    control = gw_fakes.FakeControl(stderr=b"", stdout=b"Running\n")
    bridge = gw_fakes.make_bridge(control)

    async def main():
        with gw_fakes.capture_logs() as logs:
            assert await bridge.start()
            control.exit(-9)
            await until(lambda: bridge.last_exit and "stderr_tail" in bridge.last_exit
                        and bridge.state is S.EXITED)
            await asyncio.sleep(0.05)
            message = bridge.describe_state()
            await bridge.stop()
        return logs, message

    logs, message = asyncio.run(main())
    text = logs.text(logging.ERROR)
    assert "was killed by signal SIGKILL" in text and "out-of-memory killer" in text
    assert "dmesg" in text and "kill -9" in text
    assert "out-of-memory" in message


@pytest.mark.parametrize("name,auto_restart,says", [
    (None, 0, "/api/deepfake requests get 503 until it is restarted."),
    ("worker 2", 0, "The other workers keep serving; this one stays down"),
    ("worker 2", 1, "It is restarted by itself (FLASK_AUTO_RESTART)."),
])
def test_the_crash_report_says_what_happens_next(gw_fakes, name, auto_restart, says):
    control = gw_fakes.FakeControl(stderr=b"boom\n", stdout=b"Running\n")
    bridge = gw_fakes.make_bridge(control, auto_restart=auto_restart)
    bridge.name = name

    async def main():
        with gw_fakes.capture_logs() as logs:
            assert await bridge.start()
            control.exit(1)
            await until(lambda: bridge.last_exit and "stderr_tail" in bridge.last_exit)
            await asyncio.sleep(0.05)
            await bridge.stop()
        return logs

    text = asyncio.run(main()).text(logging.ERROR)
    assert "exited with code 1" in text and says in text, text
