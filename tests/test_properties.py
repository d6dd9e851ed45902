"""Hypothesis property tests for the gateway core: design properties 1, 2, 3, 6, 7, 8, 9, 10,
11, 13 and 14 (4, 5 and 12 are the proxy's, in its own tests). Everything runs on fakes: a fake
ProcessControl/ChildHandle, a scripted health checker, a fake clock, injected platform, PATH and
process functions. Async code runs in ``asyncio.run`` inside sync tests (``@given`` refuses
async tests)."""
import asyncio
import io
import json
import logging
import os
import re
import signal
import string
import types

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tornado.httpclient import AsyncHTTPClient
from tornado.httpserver import HTTPServer
from tornado.netutil import bind_sockets
from tornado.simple_httpclient import SimpleAsyncHTTPClient

from tornado_gateway.app import make_app
from tornado_gateway.supervisor.child import (detect_python, path_candidates,
                                   process_control_for, resolve_script, stop_description)
from tornado_gateway.config import (DEVELOPMENT, MAX_MS, PRODUCTION, FlaskConfig,
                                    GatewayConfig, load_config)
from tornado_gateway.supervisor.logpump import PREFIX, LogPump, log_sink
from tornado_gateway.server import configure_logging, log_level_for, serve
from tornado_gateway.supervisor.state import BridgeState

S = BridgeState
FIXTURES = dict(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

# lines a child could print: no newline, no trailing CR (a CR before LF is a line ending);
# a CR inside a line (a progress bar) stays in it
line_text = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\n"),
                    max_size=60).filter(lambda l: not l.endswith("\r"))


async def until(predicate, timeout=5.0):
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not predicate():
        assert loop.time() < end, "condition not reached in time"
        await asyncio.sleep(0.001)


@pytest.fixture
def keep_process_state():
    """serve() configures the shared HTTP client and installs signal handlers: put both back."""
    saved_client = AsyncHTTPClient._save_configuration()
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    yield
    AsyncHTTPClient._restore_configuration(saved_client)
    for s, h in saved.items():
        signal.signal(s, h)


# --- Property 1 ------------------------------------------------------------------------------

@pytest.mark.timeout(60)
@settings(max_examples=100, **FIXTURES)
@given(host=st.sampled_from(["127.0.0.1", "localhost", "::1", "0.0.0.0"]),
       port=st.integers(1, 65535), retries=st.integers(1, 6), data=st.data(),
       interval=st.integers(1, 3), mode=st.sampled_from([DEVELOPMENT, PRODUCTION]))
def test_property_1_process_lifecycle_consistency(gw_fakes, host, port, retries, data, interval,
                                                  mode):
    """Feature: python-backend-integration, Property 1: Process lifecycle consistency"""
    failures = data.draw(st.integers(0, retries - 1), label="failed checks before healthy")
    control = gw_fakes.FakeControl(pid=data.draw(st.integers(4_500_000, 4_900_000)))
    checker = gw_fakes.FakeChecker([False] * failures + [True])
    bridge = gw_fakes.make_bridge(control, checker, host=host, port=port, health_retries=retries,
                                  health_interval=interval, mode=mode)

    async def main():
        with gw_fakes.capture_logs() as logs:
            assert not bridge.is_flask_ready()
            ok = await bridge.start()
            seen = (ok, bridge.is_flask_ready(), bridge.state, control.handle.running,
                    bridge.pid, bridge.status()["pid"])
            await bridge.stop()
        return seen, logs

    (ok, ready, state, running, pid, status_pid), logs = asyncio.run(main())
    assert ok is True and ready is True and state is S.READY
    assert running and pid == control.pid == status_pid
    assert checker.calls == failures + 1
    argv = control.spawned[0][0]
    assert argv[-4:] == ["--host", host, "--port", str(port)]
    confirmations = [r for r in logs.records if r.levelno == logging.INFO
                     and r.getMessage().startswith("Flask server ready at %s (pid %d"
                                                   % (bridge.flask_url, control.pid))]
    assert len(confirmations) == 1
    assert bridge.state is S.STOPPED and not bridge.is_flask_ready()


# --- Property 2 ------------------------------------------------------------------------------

@pytest.mark.timeout(60)
@settings(max_examples=150, **FIXTURES)
@given(retries=st.integers(1, 8), failures=st.integers(0, 10),
       timeout_ms=st.integers(1, 400), check_ms=st.integers(1, 100))
def test_property_2_health_check_convergence(gw_fakes, retries, failures, timeout_ms, check_ms):
    """Feature: python-backend-integration, Property 2: Health check convergence"""
    # the child answers healthy from check number failures+1; every check takes check_ms on a
    # fake clock, so the timeout is exact and the test does not wait for it
    checks = {"n": 0}

    def clock():
        return checks["n"] * check_ms / 1000.0

    def advance(n):
        checks["n"] = n

    checker = gw_fakes.FakeChecker([False] * failures + [True], on_check=advance)
    control = gw_fakes.FakeControl()
    bridge = gw_fakes.make_bridge(control, checker, clock=clock, health_retries=retries,
                                  health_timeout=timeout_ms, health_interval=1)

    async def main():
        with gw_fakes.capture_logs() as logs:
            ok = await bridge.start()
            state = bridge.state
            calls = checker.calls
            bridge._monitor.stop()
            await bridge.stop()
        return ok, state, calls, logs

    ok, state, calls, logs = asyncio.run(main())
    # it converges iff every failed check still left retries and time for the next one
    converges = failures < retries and failures * check_ms < timeout_ms
    if converges:
        assert ok and state is S.READY and calls == failures + 1
        assert not logs.messages(logging.WARNING)
    else:
        gave_up_after = min(retries, -(-timeout_ms // check_ms))  # ceil: checks within the time
        assert not ok and state is S.FAILED and calls == gave_up_after
        warnings = logs.messages(logging.WARNING)
        assert len(warnings) == 1
        assert "did not become healthy within %g s (%d checks" % (
            timeout_ms / 1000.0, retries) in warnings[0]
        assert "requests get 503" in warnings[0]
    assert control.handle.running is False  # stopped at the end either way


# --- Property 3 ------------------------------------------------------------------------------

@pytest.mark.timeout(90)
@settings(max_examples=100, **FIXTURES)
@given(how=st.sampled_from(["SIGINT", "SIGTERM", "stop_event"]), obey=st.booleans(),
       timeout_ms=st.integers(1, 25), custom_previous=st.booleans())
def test_property_3_graceful_shutdown_completeness(gw_fakes, keep_process_state, how, obey,
                                                   timeout_ms, custom_previous):
    """Feature: python-backend-integration, Property 3: Graceful shutdown completeness"""
    def previous_handler(signum, frame):
        pass

    signal.signal(signal.SIGTERM, previous_handler if custom_previous else signal.SIG_DFL)
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    control = gw_fakes.FakeControl(obey_stop=obey)
    bridge = gw_fakes.make_bridge(control, shutdown_timeout=timeout_ms)

    async def main():
        stop = asyncio.Event()

        async def trigger():
            await asyncio.wait_for(bridge.wait_until_ready(None), 5)
            if how == "stop_event":
                stop.set()
            else:
                signal.raise_signal(getattr(signal, how))

        asyncio.ensure_future(trigger())
        return await asyncio.wait_for(
            serve(GatewayConfig(port=0), bridge=bridge, install_signals=how != "stop_event",
                  stop_event=stop), 10)

    code = asyncio.run(main())
    assert code == 0
    assert bridge.state is S.STOPPED
    if obey:
        assert control.calls == ["spawn", "request_stop"]
        assert control.handle.returncode == -15
    else:
        assert control.calls == ["spawn", "request_stop", "kill_tree"]
        waited = control.times[1] - control.times[0]
        assert waited >= timeout_ms / 1000.0 - 0.002  # the timeout is respected
        assert waited < timeout_ms / 1000.0 + 1.0
        assert control.handle.returncode == -9
    assert control.cleaned
    assert {s: signal.getsignal(s) for s in before} == before


# --- Property 6 ------------------------------------------------------------------------------

@settings(max_examples=200, deadline=None)
@given(platform=st.sampled_from(["win32", "linux", "darwin", "cygwin", "freebsd13"]),
       on_path=st.sets(st.sampled_from(["python", "python3", "py"])),
       own=st.sampled_from([None, "/venv/bin/python"]), own_exists=st.booleans(),
       configured=st.sampled_from([None, "", "pypy3", "/opt/py/bin/python"]),
       configured_exists=st.booleans())
def test_property_6_cross_platform_command_detection(platform, on_path, own, own_exists,
                                                     configured, configured_exists):
    """Feature: python-backend-integration, Property 6: Cross-platform command detection"""
    path = {name: "/PATH/%s" % name for name in on_path}
    looked_up = []

    def which(name):
        looked_up.append(name)
        return path.get(name)

    def exists(p):
        return (p == own and own_exists) or (p == configured and configured_exists)

    got = detect_python(configured, platform=platform, own=own, which=which, exists=exists)
    windows = platform.startswith("win")
    if configured:
        expected = configured if configured_exists else path.get(configured)
    elif own and own_exists:
        expected = own
    elif windows:
        expected = path.get("python") or path.get("py")
    else:
        expected = path.get("python3") or path.get("python")
    assert got == expected
    if not configured and not (own and own_exists):
        # PATH was searched with the platform's names only, in order
        order = ["python", "py"] if windows else ["python3", "python"]
        assert path_candidates(platform) == order
        assert looked_up == order[:len(looked_up)] and looked_up
        if windows:
            assert "python3" not in looked_up


# --- Property 7 ------------------------------------------------------------------------------

def chunked(data, cuts):
    points = sorted({c % (len(data) + 1) for c in cuts})
    pieces, last = [], 0
    for p in points + [len(data)]:
        pieces.append(data[last:p])
        last = p
    return [p for p in pieces if p]


@pytest.mark.timeout(60)
@settings(max_examples=100, deadline=None)
@given(out_lines=st.lists(line_text, max_size=12), err_lines=st.lists(line_text, max_size=12),
       crlf=st.booleans(), final_newline=st.booleans(),
       cuts=st.lists(st.integers(0, 10_000), max_size=8), chunk_size=st.integers(1, 64))
def test_property_7_log_forwarding_with_prefix(out_lines, err_lines, crlf, final_newline, cuts,
                                               chunk_size):
    """Feature: python-backend-integration, Property 7: Log forwarding with prefix"""
    eol = "\r\n" if crlf else "\n"

    def encode(lines):
        text = eol.join(lines) + (eol if final_newline and lines else "")
        return text.encode("utf-8")

    def expected(lines):
        # without a final newline, a last empty line is no output at all
        if lines and not final_newline and lines[-1] == "":
            return lines[:-1]
        return lines

    logger_name = "tornado_gateway.python"
    handler_records = []

    class Grab(logging.Handler):
        def emit(self, record):
            handler_records.append(record)

    grab = Grab(logging.DEBUG)
    logger = logging.getLogger(logger_name)
    old_level = logger.level
    logger.addHandler(grab)
    logger.setLevel(logging.INFO)
    try:
        pumps = []
        writers = []
        for stream, lines in (("stdout", out_lines), ("stderr", err_lines)):
            r, w = os.pipe()
            pumps.append(LogPump(os.fdopen(r, "rb"), stream, log_sink,
                                 chunk_size=chunk_size).start())
            writers.append((w, encode(lines)))
        for w, data in writers:
            with os.fdopen(w, "wb") as wf:
                for piece in chunked(data, cuts):
                    wf.write(piece)
                    wf.flush()
        assert all(p.join(5.0) for p in pumps)
    finally:
        logger.removeHandler(grab)
        logger.setLevel(old_level)
    messages = [r.getMessage() for r in handler_records]
    assert all(m.startswith(PREFIX) for m in messages)
    assert all(r.levelno == logging.INFO for r in handler_records)
    # both streams are forwarded completely, each in its own order (they interleave freely)
    assert sorted(messages) == sorted(PREFIX + l for l in expected(out_lines) + expected(err_lines))
    assert list(pumps[0].tail) == expected(out_lines)[-50:]
    assert list(pumps[1].tail) == expected(err_lines)[-50:]


# --- Property 8 ------------------------------------------------------------------------------

letters = st.text(st.sampled_from(string.ascii_letters + " .,-"), min_size=1, max_size=8).filter(
    lambda s: s.strip() and not s.strip().isdigit())


def int_setting(low, high=None):
    """(kind, raw, parsed) for an integer setting valid in [low, high] (no upper bound: None)."""
    top = 10 ** 7 if high is None else high
    return st.one_of(
        st.integers(low, top).map(lambda n: ("valid", str(n), n)),
        st.integers(low, min(top, 10 ** 7)).map(lambda n: ("valid", " %d " % n, n)),
        st.integers(-10 ** 6, low - 1).map(lambda n: ("invalid", str(n), None)),
        # beyond the range, up to numbers no float can hold (they overflowed timers once)
        (st.integers(high + 1, high * 10 ** 400).map(lambda n: ("invalid", str(n), None))
         if high is not None else st.nothing()),
        letters.map(lambda s: ("invalid", s, None)),
        st.floats(0.1, 1e5).filter(lambda f: not f.is_integer()).map(
            lambda f: ("invalid", repr(f), None)),
        st.just(("missing", None, None)),
        st.just(("missing", "", None)),
        st.text(max_size=6).map(lambda s: ("any", s, None)),
    )


hostname = st.from_regex(r"\A[a-z][a-z0-9]{0,10}(\.[a-z][a-z0-9]{0,10}){0,2}\Z")
host_setting = st.one_of(
    st.ip_addresses(v=4).map(lambda a: ("valid", str(a), str(a))),
    st.ip_addresses(v=6).map(lambda a: ("valid", "[%s]" % a, str(a))),
    hostname.map(lambda h: ("valid", h, h)),
    st.text(st.sampled_from("!@#$%^&*()_ /\\?"), min_size=1, max_size=6).filter(
        lambda s: s.strip()).map(lambda s: ("invalid", s, None)),
    st.just(("missing", None, None)),
    st.text(max_size=8).map(lambda s: ("any", s, None)),
)

PROP8 = {
    # var: (strategy, path to the value, default)
    "FLASK_PORT": (int_setting(1, 65535), ("flask", "port"), 5001),
    "FLASK_HOST": (host_setting, ("flask", "host"), "127.0.0.1"),
    "FLASK_HEALTH_TIMEOUT": (int_setting(1, MAX_MS), ("flask", "health_timeout"), 10000),
    "FLASK_HEALTH_INTERVAL": (int_setting(1, MAX_MS), ("flask", "health_interval"), 500),
    "FLASK_HEALTH_RETRIES": (int_setting(1), ("flask", "health_retries"), 10),
    "FLASK_SHUTDOWN_TIMEOUT": (int_setting(1, MAX_MS), ("flask", "shutdown_timeout"), 5000),
    "GATEWAY_PORT": (int_setting(0, 65535), ("port",), 8080),
}


def value_at(cfg, path):
    for part in path:
        cfg = getattr(cfg, part)
    return cfg


@settings(max_examples=300, deadline=None)
@given(choice=st.fixed_dictionaries({var: spec[0] for var, spec in PROP8.items()}),
       noise=st.dictionaries(st.sampled_from(["HOME", "PATH", "FLASK_UNKNOWN"]), st.text()))
def test_property_8_configuration_loading_with_defaults(choice, noise):
    """Feature: python-backend-integration, Property 8: Configuration loading with defaults"""
    env = dict(noise)
    for var, (kind, raw, _parsed) in choice.items():
        if raw is not None:
            env[var] = raw
    warnings = []
    cfg = load_config(env, warn=warnings.append)  # never raises
    for var, (kind, raw, parsed) in choice.items():
        _strategy, path, default = PROP8[var]
        got = value_at(cfg, path)
        mine = [w for w in warnings if w.startswith("Invalid %s=" % var)]
        if kind == "valid":
            assert got == parsed and not mine
        elif kind == "missing":
            assert got == default and not mine
        elif kind == "invalid":
            assert got == default
            assert len(mine) == 1
            assert repr(raw) in mine[0] and "using the default %r" % default in mine[0]
        else:  # arbitrary text: either a usable value, or the default with exactly one warning
            if mine:
                assert len(mine) == 1 and got == default and repr(raw) in mine[0]
            elif var.endswith("HOST"):
                assert isinstance(got, str) and got
            else:
                low = 0 if var == "GATEWAY_PORT" else 1
                assert isinstance(got, int) and got >= low
                if var.endswith("PORT"):
                    assert got <= 65535
                got / 1000.0  # every accepted number is usable as float seconds
    # one warning per invalid value, and none for anything else
    assert len(warnings) == sum(1 for w in warnings if re.match(r"Invalid [A-Z_]+=", w))
    assert all(any(w.startswith("Invalid %s=" % v) for v in PROP8) for w in warnings)


# --- Property 9 ------------------------------------------------------------------------------

@pytest.mark.timeout(60)
@settings(max_examples=120, **FIXTURES)
@given(python_found=st.booleans(), configured=st.sampled_from([None, "/opt/py/python3"]),
       script_exists=st.booleans(), port=st.sampled_from(["free", "busy", "unbindable"]),
       spawn_fails=st.booleans(),
       script_name=st.text(st.sampled_from(string.ascii_lowercase + "_-"), min_size=1,
                           max_size=10))
def test_property_9_environment_validation_and_error_messaging(
        gw_fakes, python_found, configured, script_exists, port, spawn_fails, script_name):
    """Feature: python-backend-integration, Property 9: Environment validation and error messaging"""
    script = gw_fakes.script if script_exists else os.path.join(
        os.path.dirname(gw_fakes.script), "missing-" + script_name + ".py")
    control = gw_fakes.FakeControl(
        spawn_error=FileNotFoundError(2, "No such file or directory") if spawn_fails else None)
    bridge = gw_fakes.make_bridge(control, python="/usr/bin/python3" if python_found else None,
                                  script=script, port_busy=port == "busy")
    if port == "unbindable":
        def cannot_bind(host, number):
            raise OSError(99, "Cannot assign requested address")

        bridge._port_in_use = cannot_bind
    if configured:
        bridge.config = FlaskConfig(**{**bridge.config.__dict__, "python": configured})

    async def main():
        with gw_fakes.capture_logs() as logs:
            ok = await bridge.start()
            status = bridge.status()
            await bridge.stop()
        return ok, status, logs

    ok, status, logs = asyncio.run(main())
    if not python_found:
        problem = ("%r (FLASK_PYTHON) was not found" % configured if configured
                   else "No Python interpreter found")
        fix = "FLASK_PYTHON"
    elif not script_exists:
        problem, fix = "The Flask script %r was not found" % script, "FLASK_SCRIPT"
    elif port == "busy":
        problem, fix = "Port 5999 on 127.0.0.1 is already in use", "FLASK_PORT"
    elif port == "unbindable":
        problem = "cannot listen on 127.0.0.1 port 5999: [Errno 99] Cannot assign"
        fix = "FLASK_HOST"
    elif spawn_fails:
        problem, fix = "Could not start /usr/bin/python3: [Errno 2]", "FLASK_PYTHON"
    else:
        problem = None
    if problem is None:
        assert ok and status["state"] == "ready" and status["last_error"] is None
        return
    assert ok is False and status["state"] == "failed" and status["ready"] is False
    # validation comes before spawning: only a spawn failure got as far as spawning
    assert control.calls == (["spawn"] if problem.startswith("Could not start") else [])
    assert problem in status["last_error"]["message"]
    assert fix in status["last_error"]["suggestion"]
    assert problem in status["message"]  # the status endpoint explains it too
    warnings = logs.messages(logging.WARNING)
    assert len(warnings) == 1 and problem in warnings[0] and fix in warnings[0]
    assert "The gateway keeps serving" in warnings[0]
    assert bridge.state is S.STOPPED  # and it can still be shut down cleanly


# --- Property 10 -----------------------------------------------------------------------------

@pytest.mark.timeout(90)
@settings(max_examples=100, **FIXTURES)
@given(exit_how=st.one_of(st.integers(1, 255).map(lambda c: ("code", c)),
                          st.sampled_from([signal.SIGKILL, signal.SIGSEGV, signal.SIGABRT,
                                           signal.SIGTERM]).map(lambda s: ("signal", s))),
       stderr_lines=st.lists(line_text.filter(lambda l: l.strip()), max_size=30),
       phase=st.sampled_from(["startup", "running"]))
def test_property_10_comprehensive_error_logging(gw_fakes, exit_how, stderr_lines, phase):
    """Feature: python-backend-integration, Property 10: Comprehensive error logging"""
    returncode = exit_how[1] if exit_how[0] == "code" else -int(exit_how[1])
    data = "".join(l + "\n" for l in stderr_lines).encode("utf-8")
    control = gw_fakes.FakeControl(stderr=data)
    script = [False, False, False] if phase == "startup" else [True]
    checker = gw_fakes.FakeChecker(
        script, on_check=(lambda n: n == 2 and control.exit(returncode)) if phase == "startup"
        else None)
    bridge = gw_fakes.make_bridge(control, checker, health_retries=50)

    async def main():
        with gw_fakes.capture_logs() as logs:
            ok = await bridge.start()
            if phase == "running":
                assert ok
                control.exit(returncode)
            await until(lambda: any(r.levelno >= logging.ERROR for r in logs.records))
            await bridge.stop()
        return logs

    logs = asyncio.run(main())
    errors = logs.messages(logging.ERROR)
    assert len(errors) == 1
    report = errors[0]
    if exit_how[0] == "code":
        assert "exited with code %d" % returncode in report
        assert bridge.last_exit["code"] == returncode and bridge.last_exit["signal"] is None
    else:
        name = signal.Signals(exit_how[1]).name
        assert "was killed by signal %s" % name in report
        assert bridge.last_exit["signal"] == name and bridge.last_exit["code"] is None
    tail = stderr_lines[-20:]
    assert bridge.last_exit["stderr_tail"] == tail
    body = report.split("Last stderr lines:\n", 1)[1]
    if tail:
        assert body.startswith("\n".join("    " + l for l in tail) + "\n")
    else:
        assert body.startswith("    (no stderr output)\n")
    assert "Troubleshooting:" in report and "pip install" in report
    assert "port 5999" in report


# --- Property 11 -----------------------------------------------------------------------------

env_value = st.one_of(st.none(), st.sampled_from(["", "development", "production", "prod",
                                                  "PRODUCTION", " Prod ", "test", "staging"]),
                      st.text(max_size=8))


@pytest.mark.timeout(60)
@settings(max_examples=100, **FIXTURES)
@given(gateway_env=env_value, node_env=env_value)
def test_property_11_mode_based_configuration(gw_fakes, gateway_env, node_env):
    """Feature: python-backend-integration, Property 11: Mode-based configuration"""
    env = {k: v for k, v in (("GATEWAY_ENV", gateway_env), ("NODE_ENV", node_env))
           if v is not None}
    deciding = gateway_env or node_env or ""
    expected = PRODUCTION if deciding.strip().lower() in ("production", "prod") else DEVELOPMENT
    cfg = load_config(env, warn=lambda m: None)
    assert cfg.mode == cfg.flask.mode == expected
    assert cfg.is_development is (expected == DEVELOPMENT)

    control = gw_fakes.FakeControl()
    bridge = gw_fakes.make_bridge(control, mode=cfg.flask.mode)

    async def main():
        await bridge.start()
        await bridge.stop()

    asyncio.run(main())
    child_env = control.spawned[0][1]
    assert child_env["FLASK_DEBUG"] == ("1" if expected == DEVELOPMENT else "0")
    assert child_env["GATEWAY_ENV"] == expected

    # the gateway's log verbosity: everything in development, warnings and errors in production
    assert log_level_for(expected) == (logging.DEBUG if expected == DEVELOPMENT
                                       else logging.WARNING)
    root = logging.getLogger()
    names = ["tornado_gateway", "tornado_gateway.python", "asyncio"]
    saved = (root.handlers[:], root.level, {n: logging.getLogger(n).level for n in names})
    stream = io.StringIO()
    try:
        configure_logging(expected, stream)
        log = logging.getLogger("tornado_gateway.bridge")
        log.debug("detail-line")
        log.info("info-line")
        log.warning("warning-line")
        log.error("error-line")
        out = stream.getvalue()
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
        for n, level in saved[2].items():
            logging.getLogger(n).setLevel(level)
    assert "warning-line" in out and "error-line" in out
    assert ("detail-line" in out) is (expected == DEVELOPMENT)
    assert ("info-line" in out) is (expected == DEVELOPMENT)


# --- Property 13 -----------------------------------------------------------------------------

segment = st.text(st.sampled_from(string.ascii_letters + string.digits + "-_."), min_size=1,
                  max_size=8).filter(lambda s: s not in (".", ".."))


@pytest.mark.timeout(90)
@settings(max_examples=100, **FIXTURES)
@given(returncode=st.one_of(st.integers(1, 255), st.sampled_from([-9, -11, -6])),
       path=st.lists(segment, min_size=1, max_size=3),
       method=st.sampled_from(["GET", "POST", "DELETE"]))
def test_property_13_graceful_degradation_on_flask_crash(gw_fakes, returncode, path, method):
    """Feature: python-backend-integration, Property 13: Graceful degradation on Flask crash"""
    control = gw_fakes.FakeControl(stderr=b"RuntimeError: boom\n")
    checker = gw_fakes.FakeChecker([True])
    bridge = gw_fakes.make_bridge(control, checker)
    config = GatewayConfig(port=0, ready_wait=5000)

    async def main():
        with gw_fakes.capture_logs() as logs:
            assert await bridge.start()
            sockets = bind_sockets(0, "127.0.0.1")
            http = HTTPServer(make_app(bridge, config))
            http.add_sockets(sockets)
            base = "http://127.0.0.1:%d" % sockets[0].getsockname()[1]
            client = SimpleAsyncHTTPClient(force_instance=True)
            try:
                control.exit(returncode)  # the child crashes while serving
                resp = await client.fetch(
                    base + "/api/deepfake/" + "/".join(path), method=method,
                    body=b"x" if method == "POST" else None, raise_error=False,
                    allow_nonstandard_methods=True)
                await until(lambda: any(r.levelno >= logging.ERROR for r in logs.records))
                status = await client.fetch(base + "/api/gateway/status", raise_error=False)
            finally:
                client.close()
                http.stop()
                await bridge.stop()
        return resp, status, logs

    resp, status, logs = asyncio.run(main())
    assert resp.code == 503
    body = json.loads(resp.body)
    assert set(body) == {"error", "message", "suggestion", "timestamp"}
    assert "state: exited" in body["message"]
    assert status.code == 200  # the gateway itself goes on serving
    service = json.loads(status.body)["service"]
    assert service["state"] == "exited" and service["ready"] is False
    assert service["last_exit"]["stderr_tail"] == ["RuntimeError: boom"]
    errors = logs.messages(logging.ERROR)
    assert len(errors) == 1 and "RuntimeError: boom" in errors[0]
    assert ("exited with code %d" % returncode in errors[0] if returncode > 0
            else "killed by signal %s" % signal.Signals(-returncode).name in errors[0])
    assert control.calls == ["spawn"]  # an exited child is not stopped again
    assert bridge.state is S.STOPPED


# --- Property 14 -----------------------------------------------------------------------------

class WinPopen:
    def __init__(self, pid):
        self.pid = pid
        self.signals = []

    def send_signal(self, sig):
        self.signals.append(sig)

    def kill(self):
        self.signals.append("kill")


@pytest.mark.timeout(60)
@settings(max_examples=100, **FIXTURES)
@given(platform=st.sampled_from(["win32", "linux", "darwin"]),
       parts=st.lists(segment, min_size=1, max_size=4), in_cwd=st.booleans(),
       obey=st.booleans(), pid=st.integers(4_500_000, 4_900_000))
def test_property_14_platform_specific_path_resolution(gw_fakes, tmp_path, platform, parts,
                                                       in_cwd, obey, pid):
    """Feature: python-backend-integration, Property 14: Platform-specific path resolution"""
    # path resolution: built with os.path only, absolute, from the working directory first,
    # then from the project checkout
    relative = os.path.join(*parts)
    cwd, project = str(tmp_path / "cwd"), str(tmp_path / "project")
    target = os.path.normpath(os.path.join(cwd if in_cwd else project, relative))
    got = resolve_script(relative, cwd=cwd, project_dir=project, exists=lambda p: p == target)
    assert got == target and os.path.isabs(got)
    assert resolve_script(relative, cwd=cwd, project_dir=project, exists=lambda p: False) is None

    # termination: the platform's own ProcessControl, driven by the bridge's stop()
    events = []
    if platform.startswith("win"):
        real = process_control_for(
            platform, popen=None, start_thread=lambda f: None,
            run=lambda argv, **kw: events.append(("run", argv)) or types.SimpleNamespace(
                returncode=0),
            kill_processes=lambda procs: 0)
    else:
        real = process_control_for(
            platform, getpgid=lambda p: p, kill=lambda p, s: events.append(("kill", p, s)),
            killpg=lambda g, s: events.append(("killpg", g, s)), kill_processes=lambda procs: 0)

    class PlatformBacked(gw_fakes.FakeControl):
        """Spawns a fake child; stopping goes through the real platform control."""

        def spawn(self, argv, env, cwd, on_exit):
            handle = super().spawn(argv, env, cwd, on_exit)
            handle.popen = WinPopen(handle.pid)
            return handle

        def request_stop(self, handle):
            done = real.request_stop(handle)
            super().request_stop(handle)
            return done

        def kill_tree(self, handle, descendants):
            done = real.kill_tree(handle, descendants)
            super().kill_tree(handle, descendants)
            return done

    control = PlatformBacked(obey_stop=obey, pid=pid)
    bridge = gw_fakes.make_bridge(control, shutdown_timeout=2)

    async def main():
        await bridge.start()
        await bridge.stop()

    asyncio.run(main())
    assert bridge.state is S.STOPPED
    if platform.startswith("win"):
        assert real.name == "windows" and "taskkill /T /F" in stop_description(platform)
        assert control.handle.popen.signals[0] == getattr(signal, "CTRL_BREAK_EVENT", 1)
        expected = [] if obey else [("run", ["taskkill", "/PID", str(pid), "/T", "/F"])]
        assert events == expected
    else:
        assert real.name == "posix" and "SIGTERM" in stop_description(platform)
        expected = [("killpg", pid, signal.SIGTERM)]
        if not obey:
            expected.append(("killpg", pid, signal.SIGKILL))
        assert events == expected
        assert control.handle.popen.signals == []
