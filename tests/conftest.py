"""Shared pytest fixtures."""
import signal as _gw_signal

# A test run started in the background by a script inherits SIGINT ignored, and so would every
# gateway and child the tests start: the Ctrl+C tests need it back to its default.
if _gw_signal.getsignal(_gw_signal.SIGINT) is _gw_signal.SIG_IGN:
    _gw_signal.signal(_gw_signal.SIGINT, _gw_signal.default_int_handler)

# === BEGIN core-unit-test fakes (tests/test_{config,state,child,logpump,health,bridge,server,properties}.py)
# Fakes for the gateway core: no real child process, no real health endpoint. Tests get them
# through the ``gw_fakes`` fixture, which also disarms psutil so a fake pid never reaches a real
# process (the bridge snapshots and kills descendants by pid).
import asyncio as _gw_asyncio
import contextlib as _gw_contextlib
import logging as _gw_logging
import os as _gw_os
import types as _gw_types

import pytest as _gw_pytest


class _GwFakeChecker:
    """Health checks scripted by a list of booleans (or HealthResults); the last one repeats."""

    def __init__(self, script=(True,), on_check=None):
        self.script = list(script) or [True]
        self.calls = 0
        self.closed = False
        self.on_check = on_check

    async def check(self):
        from tornado_gateway.supervisor.health import HealthResult

        item = self.script[min(self.calls, len(self.script) - 1)]
        self.calls += 1
        if self.on_check is not None:
            self.on_check(self.calls)
        if isinstance(item, HealthResult):
            return item
        return HealthResult(bool(item), "ok" if item else "health check answered HTTP 500",
                            1.0, refused=False)

    def close(self):
        self.closed = True


class _GwFakeControl:
    """A ProcessControl whose child is a ChildHandle driven by the test.

    ``obey_stop``: the child exits (``stop_code``) when asked to stop gracefully; otherwise only
    ``kill_tree`` ends it (``kill_code``). ``stdout``/``stderr``: bytes the child "printed"
    before exiting (real OS pipes, write end closed, so the pumps reach EOF). ``spawn_error``:
    an OSError to raise from spawn.
    """

    name = "fake"

    def __init__(self, obey_stop=True, stop_code=-15, kill_code=-9, stdout=None, stderr=None,
                 spawn_error=None, pid=4_999_999):
        self.obey_stop = obey_stop
        self.stop_code = stop_code
        self.kill_code = kill_code
        self.stdout_data = stdout
        self.stderr_data = stderr
        self.spawn_error = spawn_error
        self.pid = pid
        self.calls = []
        self.times = []  # loop time of each call, to check the waits between them
        self.spawned = []
        self.handle = None
        self.on_exit = None
        self.cleaned = False

    @staticmethod
    def _pipe(data):
        if data is None:
            return None
        r, w = _gw_os.pipe()
        with _gw_os.fdopen(w, "wb") as wf:
            wf.write(data)
        return _gw_os.fdopen(r, "rb")

    def spawn(self, argv, env, cwd, on_exit):
        from tornado_gateway.supervisor.child import ChildHandle

        self.calls.append("spawn")
        if self.spawn_error is not None:
            raise self.spawn_error
        self.spawned.append((list(argv), dict(env), cwd))
        self.on_exit = on_exit
        self.handle = ChildHandle(pid=self.pid, stdout=self._pipe(self.stdout_data),
                                  stderr=self._pipe(self.stderr_data),
                                  _exited=_gw_asyncio.Event())
        return self.handle

    def exit(self, returncode):
        """The child exits now (as the exit callback would report it on the IOLoop)."""
        if self.handle is not None and self.handle.running:
            self.handle.mark_exited(returncode)
            self.on_exit(returncode)

    def request_stop(self, handle):
        self.calls.append("request_stop")
        self.times.append(_gw_asyncio.get_running_loop().time())
        if self.obey_stop:
            _gw_asyncio.get_running_loop().call_soon(self.exit, self.stop_code)
        return "SIGTERM to process group %d" % handle.pid

    def kill_tree(self, handle, descendants):
        self.calls.append("kill_tree")
        self.times.append(_gw_asyncio.get_running_loop().time())
        _gw_asyncio.get_running_loop().call_soon(self.exit, self.kill_code)
        return "SIGKILL to process group %d" % handle.pid

    def cleanup(self):
        self.cleaned = True


class _GwLogCapture(_gw_logging.Handler):
    def __init__(self):
        super().__init__(_gw_logging.DEBUG)
        self.records = []

    def emit(self, record):
        self.records.append(record)

    def messages(self, level=_gw_logging.DEBUG):
        return [r.getMessage() for r in self.records if r.levelno >= level]

    def text(self, level=_gw_logging.DEBUG):
        return "\n".join(self.messages(level))


@_gw_contextlib.contextmanager
def _gw_capture_logs(name="tornado_gateway"):
    """Every record of logger ``name`` (and its children) at DEBUG and above, in a list."""
    logger = _gw_logging.getLogger(name)
    handler = _GwLogCapture()
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(_gw_logging.DEBUG)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)


@_gw_pytest.fixture
def gw_fakes(monkeypatch, tmp_path):
    """Fakes for bridge/child/health tests; psutil snapshots and kills are disarmed."""
    from tornado_gateway.supervisor import child as child_mod

    killed = []
    monkeypatch.setattr(child_mod, "snapshot_descendants", lambda pid: [])
    monkeypatch.setattr(child_mod, "kill_processes", lambda procs: killed.extend(procs) or 0)
    script = tmp_path / "api_server.py"
    script.write_text("# a stand-in: never run\n")

    def make_bridge(control=None, checker=None, environ=None, python="/usr/bin/python3-fake",
                    port_busy=False, clock=None, **config):
        """A PythonBridge on fakes: fast health settings, the stand-in script, a fake python."""
        from tornado_gateway.supervisor.bridge import PythonBridge
        from tornado_gateway.config import FlaskConfig

        settings = dict(script=str(script), port=5999, health_interval=1, health_retries=5,
                        health_timeout=5000, shutdown_timeout=50)
        settings.update(config)
        return PythonBridge(FlaskConfig(**settings), control=control or _GwFakeControl(),
                            checker=checker or _GwFakeChecker(),
                            environ={"PATH": "/bin"} if environ is None else environ,
                            detect_python=lambda configured: python,
                            port_in_use=lambda host, port: port_busy,
                            **({} if clock is None else {"clock": clock}))

    return _gw_types.SimpleNamespace(FakeControl=_GwFakeControl, FakeChecker=_GwFakeChecker,
                                     capture_logs=_gw_capture_logs, script=str(script),
                                     killed=killed, make_bridge=make_bridge)
# === END core-unit-test fakes


# === A private PostgreSQL cluster, once per test run, for the tests that run on both stores
@_gw_pytest.fixture(scope="session")
def postgres_server():
    """The URL of a private PostgreSQL cluster's maintenance database (tests/servers.py)."""
    from servers import postgres_bin, postgres_cluster, require

    require("postgresql", postgres_bin("initdb"))
    with postgres_cluster("tests") as url:
        yield url


@_gw_pytest.fixture
def postgres_url(postgres_server):
    """A fresh, empty database on the test run's cluster (dropped afterwards)."""
    import uuid

    import psycopg

    name = "t_" + uuid.uuid4().hex[:12]
    base, _, _ = postgres_server.rpartition("/")
    with psycopg.connect(postgres_server, autocommit=True) as conn:
        conn.execute('CREATE DATABASE "%s"' % name)
    yield "%s/%s" % (base, name)
    with psycopg.connect(postgres_server, autocommit=True) as conn:
        conn.execute('DROP DATABASE IF EXISTS "%s" WITH (FORCE)' % name)


# === The HTTP server pytest-tornasync's fixtures serve `app` with: the gateway's own (what
# `python -m tornado_gateway` runs), so the tests guard what users run; TEST_HTTP_SERVER=tornado
# serves it with Tornado's HTTPServer instead (what `app.listen()` in an embedding app runs).
@_gw_pytest.fixture
def http_server(request, io_loop, http_server_port):
    import tornado.httpserver

    from tornado_gateway.http.server import GatewayHTTPServer

    app = request.getfixturevalue(request.config.option.app_fixture)
    if _gw_os.environ.get("TEST_HTTP_SERVER") == "tornado":
        server = tornado.httpserver.HTTPServer(app)
        server.add_socket(http_server_port[0])
    else:
        server = GatewayHTTPServer(app)
        io_loop.run_sync(lambda: server.start([http_server_port[0]]))
    server.test_port = http_server_port[1]
    yield server
    server.stop()
    io_loop.run_sync(server.close_all_connections, timeout=10)


@_gw_pytest.fixture
def http_server_client(http_server):
    """A client of `http_server` whose fetch() takes a path (pytest-tornasync's, for any
    server: it finds the port without reading the server's private attributes)."""
    import tornado.simple_httpclient

    class Client(tornado.simple_httpclient.SimpleAsyncHTTPClient):
        def fetch(self, path, **kwargs):
            return super().fetch("http://127.0.0.1:%d%s" % (http_server.test_port, path),
                                 **kwargs)

    client = Client(force_instance=True)
    yield client
    client.close()


def pytest_terminal_summary(terminalreporter):
    """A test that needed PostgreSQL or nginx and could not run is impossible to miss."""
    from servers import NOT_RUN

    if not NOT_RUN:
        return
    terminalreporter.section("REAL-SERVER TESTS NOT RUN", sep="!", red=True, bold=True)
    for reason in sorted(set(NOT_RUN)):
        terminalreporter.write_line("Not tested against a real server: " + reason, red=True,
                                    bold=True)
    terminalreporter.write_line("CI installs them (.ci/run) and sets SERVERS_TEST_REQUIRED=1, "
                                "which makes this a failure.", red=True)
