"""PythonBridge: runs the Flask child (or watches an external one) as one state machine.

``start()`` validates the environment, spawns the child, pumps its logs, waits until it is
healthy and keeps checking; ``stop()`` stops it and its whole process tree. Readers ask
``is_flask_ready()`` / ``state``; only this class moves the state (see :mod:`.state`).
"""
from __future__ import annotations

import asyncio
import collections
import logging
import os
import sys
import time
from typing import Any, Callable, Deque, Dict, List, Optional

from . import child as child_mod
from .. import errors
from .child import ChildHandle, ProcessControl
from ..config import FlaskConfig, GatewayConfig
from ..errors import utc_timestamp
from .health import HealthChecker, HealthMonitor, HealthResult, wait_until_healthy
from .logpump import LogLine, LogPump, log_sink
from .state import BridgeState, StateMachine

S = BridgeState
log = logging.getLogger("tornado_gateway.bridge")

TROUBLESHOOTING = (
    "Troubleshooting: run the service alone to see its full output: "
    "python {script} --port {port} ; install the service and its dependencies with: "
    "pip install -e ./python (from the repository's root, in the gateway's environment) ; "
    "check that port {port} is free (or set FLASK_PORT)."
)


class EnvironmentProblem(Exception):
    """A reason the child cannot be spawned, with the fix."""

    def __init__(self, message: str, suggestion: str) -> None:
        super().__init__(message)
        self.message = message
        self.suggestion = suggestion


class PythonBridge:
    """The Flask child's lifecycle.

    ``config`` is a :class:`FlaskConfig` (or a :class:`GatewayConfig`, whose ``flask`` part is
    used). Seams for tests: ``control`` (spawning and killing), ``checker`` (health checks),
    ``sink`` (where child log lines go), ``clock``, ``environ``, ``detect_python``.
    """

    def __init__(self, config: Any = None, *, control: Optional[ProcessControl] = None,
                 checker: Optional[HealthChecker] = None,
                 sink: Callable[[LogLine], None] = log_sink,
                 clock: Callable[[], float] = time.monotonic,
                 environ: Optional[Dict[str, str]] = None,
                 detect_python: Callable[[Optional[str]], Optional[str]] = child_mod.detect_python,
                 port_in_use: Callable[[str, int], bool] = child_mod.port_in_use,
                 name: Optional[str] = None) -> None:
        if isinstance(config, GatewayConfig):
            config = config.flask
        self.config: FlaskConfig = config or FlaskConfig()
        #: which worker of a group this is ("worker 2"); None for a bridge on its own. Its log
        #: lines (and its child's) then say so.
        self.name = name
        self._log: Any = log if name is None else _NamedLog(log, name)
        self._control = control or child_mod.process_control_for()
        self._checker = checker or HealthChecker(
            self.config.base_url, timeout_s=self._check_timeout_s())
        self._sink = sink
        self._clock = clock
        self._environ = dict(os.environ if environ is None else environ)
        self._detect_python = detect_python
        self._port_in_use = port_in_use
        self._machine = StateMachine(clock)
        self._machine.add_listener(self._log_transition)
        self._handle: Optional[ChildHandle] = None
        self._pumps: List[LogPump] = []
        self._stderr_tail: Deque[str] = collections.deque(maxlen=40)
        self._monitor = HealthMonitor(self._checker.check, self.config.health_interval / 1000.0,
                                      self._on_monitor_result)
        self._poke: Optional[asyncio.Event] = None
        self._failures = 0
        self._stop_task: Optional[asyncio.Task] = None
        self._restart_task: Optional[asyncio.Task] = None
        self.restarts = 0
        self.started_at: Optional[float] = None  # monotonic, of the current child
        self.last_health: Optional[HealthResult] = None
        self.last_exit: Optional[Dict[str, Any]] = None
        self.last_error: Optional[Dict[str, str]] = None  # why it failed, with the fix
        self.ready_after_ms: Optional[float] = None
        self._ioloop: Any = None

    def _check_timeout_s(self) -> float:
        # one check may take twice the interval, within [1 s, 5 s]: long enough for a busy
        # child, short enough that a frozen one turns unhealthy in seconds
        return min(5.0, max(1.0, 2 * self.config.health_interval / 1000.0))

    async def __aenter__(self) -> "PythonBridge":
        """``async with PythonBridge(config) as bridge:`` starts it (waiting for readiness, or
        ``failed``) and stops the child's whole tree on the way out, even on an exception."""
        await self.start()
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.stop()

    # --- what readers see -------------------------------------------------------------------

    @property
    def state(self) -> BridgeState:
        return self._machine.state

    def is_flask_ready(self) -> bool:
        """True only while the child is ``ready`` (healthy and serving)."""
        return self._machine.is_ready

    @property
    def flask_url(self) -> str:
        return self.config.base_url

    @property
    def external(self) -> bool:
        return bool(self.config.url)

    @property
    def pid(self) -> Optional[int]:
        handle = self._handle
        return handle.pid if handle is not None and handle.running else None

    @property
    def history(self) -> list:
        return list(self._machine.history)

    async def wait_until_ready(self, timeout_s: Optional[float]) -> bool:
        """Wait (bounded) while the child can still become ready by itself: True once
        ``ready``; False after ``timeout_s`` or when it reaches a state it cannot leave alone."""
        return await self._machine.wait_until_ready(timeout_s)

    def add_state_listener(self, listener: Callable[[BridgeState, BridgeState, str], None]) -> None:
        """Call ``listener(old, new, reason)`` on every state change (on the event loop)."""
        self._machine.add_listener(listener)

    def cleanup(self) -> None:
        """Release what spawning needed process-wide (Tornado's SIGCHLD handling); call once
        the event loop that ran the child is done with it."""
        self._control.cleanup()

    def report_upstream_failure(self, reason: str) -> None:
        """The proxy saw a refused/reset connection: check health now rather than at the next
        tick. Never changes the state by itself."""
        self._log.debug("upstream failure reported: %s", reason)
        if self._monitor.running:
            asyncio.ensure_future(self._monitor.check_now())

    def status(self) -> Dict[str, Any]:
        """A JSON-ready snapshot for ``GET /api/gateway/status``."""
        uptime = None
        if self.started_at is not None and (self.pid is not None or self.external):
            uptime = round(self._clock() - self.started_at, 3)
        health = None
        if self.last_health is not None:
            health = {"at": _iso(self.last_health.at), "ok": self.last_health.ok,
                      "latency_ms": round(self.last_health.latency_ms, 2),
                      "detail": self.last_health.detail}
        return {
            "state": self.state.value,
            "ready": self.is_flask_ready(),
            "external": self.external,
            "url": self.flask_url,
            "pid": self.pid,
            "uptime_s": uptime,
            "restarts": self.restarts,
            "auto_restart": self.config.auto_restart,
            "ready_after_ms": self.ready_after_ms,
            "last_health_check": health,
            "last_exit": self.last_exit,
            "last_error": self.last_error,
            "message": self.describe_state(),
        }

    def describe_state(self) -> str:
        """One sentence on the state and, when it is not serving, what to do."""
        s = self.state
        if s is S.READY:
            return "The deepfake service is running and healthy."
        if s is S.STARTING:
            return "The deepfake service is starting; requests wait for it briefly."
        if s is S.UNHEALTHY:
            return ("The deepfake service is running but failing its health checks; requests "
                    "get 503 until it recovers.")
        if s is S.FAILED:
            why = self.last_error["message"] if self.last_error else "it did not start"
            fix = self.last_error["suggestion"] if self.last_error else ""
            return ("The deepfake service is unavailable: %s %s" % (why, fix)).strip()
        if s is S.EXITED:
            code = self.last_exit or {}
            how = ("signal %s" % code.get("signal")) if code.get("signal") else (
                "exit code %s" % code.get("code"))
            why = (" " + errors.killed_by_sigkill_advice()) if code.get("signal") == "SIGKILL" \
                else ""
            return ("The deepfake service exited (%s).%s Check the gateway log lines prefixed "
                    "[Python], fix the cause and restart the gateway." % (how, why))
        if s is S.IDLE:
            return "The deepfake service has not been started."
        return "The gateway is shutting the deepfake service down."

    # --- starting ---------------------------------------------------------------------------

    async def start(self) -> bool:
        """Start the child (or connect to the external server) and wait until it is healthy.

        Returns True when ``ready``. Never raises for an environment problem or a child that
        does not come up: the state becomes ``failed`` and a warning explains the fix, so the
        gateway keeps serving its own routes (design property 9). Health checks go on after a
        failed startup wait, so a slow child still becomes ``ready`` later.
        """
        if self.state in (S.STARTING, S.READY, S.UNHEALTHY, S.STOPPING):
            return self.is_flask_ready()
        if self.pid is not None:
            # failed after a health timeout, but the child still runs and is being watched:
            # a second one would fight it for the port and orphan it (stop() reaches only one)
            self._log.warning("The Flask server (pid %d) is still running and its health is being "
                        "checked; not starting another. Call stop() first to restart it.",
                        self.pid)
            return self.is_flask_ready()
        from tornado.ioloop import IOLoop

        self._ioloop = IOLoop.current()  # the pump threads hand events over through it
        self._stop_task = None
        self.last_error = None
        self._failures = 0
        if self.external:
            return await self._start_external()
        try:
            argv, env = self._prepare()
        except EnvironmentProblem as problem:
            self._fail(problem.message, problem.suggestion)
            return False
        return await self._spawn_and_wait(argv, env)

    def _prepare(self) -> tuple:
        cfg = self.config
        python = self._detect_python(cfg.python)
        if python is None:
            if cfg.python:
                raise EnvironmentProblem(
                    "The Python interpreter %r (FLASK_PYTHON) was not found." % cfg.python,
                    "Set FLASK_PYTHON to the full path of a Python 3.9+ interpreter, or unset "
                    "it to use the gateway's own interpreter.")
            raise EnvironmentProblem(
                "No Python interpreter found: the gateway's own is unavailable and none of %s "
                "is on PATH." % ", ".join(child_mod.path_candidates(sys.platform)),
                "Install Python 3.9+ and run: pip install -e ./python ; or set "
                "FLASK_PYTHON to an interpreter's full path.")
        script = child_mod.resolve_script(cfg.script)
        if script is None:
            raise EnvironmentProblem(
                "The Flask script %r was not found (looked in %s and %s)." % (
                    cfg.script, os.getcwd(), child_mod.PROJECT_DIR),
                "Run the gateway from the project folder, or set FLASK_SCRIPT (--flask-script) "
                "to the path of api_server.py.")
        try:
            busy = self._port_in_use(cfg.host, cfg.port)
        except OSError as exc:
            raise EnvironmentProblem(
                "The Flask server cannot listen on %s port %d: %s." % (cfg.host, cfg.port, exc),
                "Set FLASK_HOST (--flask-host) to an address of this machine, such as "
                "127.0.0.1.") from None
        if busy:
            raise EnvironmentProblem(
                "Port %d on %s is already in use, so the Flask server cannot bind it." % (
                    cfg.port, cfg.host),
                "Stop the other process using port %d (another gateway or Flask server?) or "
                "set FLASK_PORT / --flask-port to a free port." % cfg.port)
        env = dict(self._environ)
        env.update({
            "PYTHONUNBUFFERED": "1",  # or the child's log lines arrive late, in blocks
            "PYTHONIOENCODING": "utf-8",
            "GATEWAY_ENV": cfg.mode,
            "FLASK_DEBUG": "1" if cfg.is_development else "0",
            "TORNADO_GATEWAY_PID": str(os.getpid()),  # the child exits if the gateway dies
        })
        argv = [python, script, "--host", cfg.host, "--port", str(cfg.port)]
        return argv, env

    async def _spawn_and_wait(self, argv: List[str], env: Dict[str, str]) -> bool:
        cfg = self.config
        self._machine.move(S.STARTING, "spawning %s" % " ".join(argv[1:2]))
        self._poke = asyncio.Event()
        self._stderr_tail.clear()
        launched = self._clock()
        try:
            handle = self._control.spawn(argv, env, None, self._on_exit)
        except OSError as exc:
            self._fail("Could not start %s: %s." % (argv[0], exc),
                       "Check that FLASK_PYTHON points to a working Python interpreter.")
            return False
        self._handle = handle
        self.started_at = launched
        self._log.info("Started the Flask server (pid %d): %s", handle.pid, " ".join(argv))
        self._pumps = [
            LogPump(pipe, name, self._pump_sink, tail=self._stderr_tail if name == "stderr"
                    else None).start()
            for name, pipe in (("stdout", handle.stdout), ("stderr", handle.stderr))
            if pipe is not None
        ]
        result = await wait_until_healthy(
            self._checker.check, cfg.health_interval / 1000.0, cfg.health_retries,
            cfg.health_timeout / 1000.0, alive=lambda: handle.running and self.state is S.STARTING,
            poked=self._poke, clock=self._clock, on_result=self._record_health)
        if self._handle is not handle or self.state is not S.STARTING:
            return self.is_flask_ready()  # exited or stopped meanwhile
        if result is not None:
            self.ready_after_ms = round((self._clock() - launched) * 1000.0, 1)
            self._machine.move(S.READY, "health check passed")
            self._log.info("Flask server ready at %s (pid %d, %.0f ms after launch)",
                     self.flask_url, handle.pid, self.ready_after_ms)
        else:
            detail = self.last_health.detail if self.last_health else "no answer"
            self._fail("The Flask server did not become healthy within %g s (%d checks; last: "
                       "%s)." % (cfg.health_timeout / 1000.0, cfg.health_retries, detail),
                       "Check the [Python] log lines above for errors; make sure its "
                       "dependencies are installed (pip install -e .). Health checks continue: "
                       "it becomes ready if it recovers.")
        self._monitor.start()
        return self.is_flask_ready()

    async def _start_external(self) -> bool:
        cfg = self.config
        self._machine.move(S.STARTING, "external server at %s" % cfg.url)
        self.started_at = self._clock()
        self._log.info("Using the external Flask server at %s (nothing is spawned)", cfg.url)
        result = await wait_until_healthy(
            self._checker.check, cfg.health_interval / 1000.0, cfg.health_retries,
            cfg.health_timeout / 1000.0, alive=lambda: self.state is S.STARTING,
            clock=self._clock, on_result=self._record_health)
        if self.state is not S.STARTING:
            return self.is_flask_ready()
        if result is not None:
            self.ready_after_ms = round((self._clock() - self.started_at) * 1000.0, 1)
            self._machine.move(S.READY, "health check passed")
            self._log.info("External Flask server ready at %s", cfg.url)
        else:
            self._fail("The external Flask server at %s did not answer its health check "
                       "(last: %s)." % (cfg.url, self.last_health.detail if self.last_health
                                        else "no answer"),
                       "Start it (python python/api_server.py --port %d) or fix FLASK_URL. "
                       "Health checks continue: it becomes ready when it answers." % cfg.port)
        self._monitor.start()
        return self.is_flask_ready()

    def _fail(self, message: str, suggestion: str) -> None:
        self.last_error = {"message": message, "suggestion": suggestion, "at": utc_timestamp()}
        self._machine.move(S.FAILED, message)
        self._log.warning("%s %s The gateway keeps serving; /api/deepfake requests get 503.",
                    message, suggestion)

    def _pump_sink(self, line: LogLine) -> None:
        self._sink(line)
        poke = self._poke
        if poke is not None and self.state is S.STARTING:
            # the child said something (often "Running on ..."): check health now
            self._ioloop.add_callback(poke.set)

    # --- watching ---------------------------------------------------------------------------

    def _record_health(self, result: HealthResult) -> None:
        self.last_health = result

    def _on_monitor_result(self, result: HealthResult) -> None:
        self.last_health = result
        state = self.state
        if result.ok:
            self._failures = 0
            if state in (S.UNHEALTHY, S.FAILED):
                self._machine.move(S.READY, "health check passed again")
                if state is S.UNHEALTHY:
                    self._log.warning("Flask server recovered: health check passed again.")
                else:
                    self._log.warning("Flask server became healthy after its startup wait; it is "
                                "now ready.")
            return
        if state is S.READY:
            self._failures += 1
            if self._failures >= self.config.unhealthy_after:
                self._machine.move(S.UNHEALTHY, result.detail)
                self._log.warning("Flask server failed %d health checks in a row (%s); marked "
                            "unhealthy. Requests get 503 until it recovers.",
                            self._failures, result.detail)

    def _on_exit(self, returncode: int) -> None:
        # runs on the IOLoop (Subprocess exit callback / waiter thread via add_callback)
        code, sig = child_mod.describe_returncode(returncode)
        handle = self._handle
        self.last_exit = {"code": code, "signal": sig, "at": utc_timestamp(),
                          "pid": handle.pid if handle else None, "stderr_tail": []}
        kill_leftovers = getattr(self._control, "kill_leftovers", None)
        done = kill_leftovers(handle) if handle is not None and kill_leftovers else ""
        if done:
            # e.g. the reloader died and its grandchild still holds the port: an orphan
            self._log.log(logging.INFO if self.state in (S.STOPPING, S.STOPPED) else logging.WARNING,
                    "Flask server (pid %d) exited but left processes running; killed them: %s",
                    handle.pid, done)
        if self.state in (S.STOPPING, S.STOPPED):
            self._log.info("Flask server (pid %s) exited: %s", handle.pid if handle else "?",
                     "signal %s" % sig if sig else "code %s" % code)
            return
        self._monitor.stop()
        self._machine.move(S.EXITED, "exit code %s signal %s" % (code, sig))
        asyncio.ensure_future(self._report_crash(code, sig))

    async def _report_crash(self, code: Optional[int], sig: Optional[str]) -> None:
        # the pumps may still hold the child's last words: let them reach EOF first
        loop = asyncio.get_running_loop()
        for pump in self._pumps:
            await loop.run_in_executor(None, pump.join, 1.0)
        tail = list(self._stderr_tail)[-20:]
        if self.last_exit is not None:
            self.last_exit["stderr_tail"] = tail
        how = "was killed by signal %s" % sig if sig else "exited with code %s" % code
        lines = "\n".join("    " + t for t in tail) or "    (no stderr output)"
        advice = TROUBLESHOOTING.format(script=self.config.script, port=self.config.port)
        if sig == "SIGKILL":  # no stderr to explain it: what usually sends it comes first
            advice = errors.killed_by_sigkill_advice() + " " + advice
        if self.restarts < self.config.auto_restart:
            after = "It is restarted by itself (FLASK_AUTO_RESTART)."
        elif self.name is not None:
            after = ("The other workers keep serving; this one stays down until the gateway "
                     "is restarted (FLASK_AUTO_RESTART restarts it by itself).")
        else:
            after = "/api/deepfake requests get 503 until it is restarted."
        self._log.error("Flask server %s. Last stderr lines:\n%s\n%s %s", how, lines, advice,
                        after)
        if self.restarts < self.config.auto_restart and self.state is S.EXITED:
            self.restarts += 1
            delay = min(30.0, 0.5 * 2 ** (self.restarts - 1))
            self._log.warning("Restarting the Flask server in %.1f s (restart %d of %d, "
                        "FLASK_AUTO_RESTART).", delay, self.restarts, self.config.auto_restart)
            await asyncio.sleep(delay)
            if self.state is S.EXITED:
                await self.start()

    # --- stopping ---------------------------------------------------------------------------

    async def stop(self, timeout_s: Optional[float] = None) -> None:
        """Stop the child and its whole process tree; safe to call any number of times.

        Asks it to exit (SIGTERM to its process group; CTRL_BREAK_EVENT on Windows), waits up
        to ``timeout_s`` (default: the configured shutdown timeout), then kills the whole tree
        (SIGKILL to the group and every descendant seen before; ``taskkill /T /F`` on Windows).
        Descendants that outlive their parent (a reloader's orphaned grandchild) are killed
        too. Ends in ``stopped``.
        """
        if self._stop_task is None:
            self._stop_task = asyncio.ensure_future(self._stop(timeout_s))
        await asyncio.shield(self._stop_task)

    async def force_stop(self) -> None:
        """Kill the child's tree now without waiting (the second Ctrl+C)."""
        handle = self._handle
        if handle is not None and handle.running:
            descendants = child_mod.snapshot_descendants(handle.pid)
            self._log.warning("Killing the Flask server now: %s",
                        self._control.kill_tree(handle, descendants))
        await self.stop()

    async def _stop(self, timeout_s: Optional[float]) -> None:
        timeout = self.config.shutdown_timeout / 1000.0 if timeout_s is None else timeout_s
        if self.state is not S.STOPPED:
            self._machine.move(S.STOPPING, "stop() called")
        self._monitor.stop()
        handle = self._handle
        if handle is not None and handle.running:
            descendants = child_mod.snapshot_descendants(handle.pid)
            self._log.info("Stopping the Flask server (pid %d): %s", handle.pid,
                     self._control.request_stop(handle))
            if not await handle.wait(timeout):
                self._log.warning("Flask server did not exit within %g s; killing its process tree: "
                            "%s", timeout, self._control.kill_tree(handle, descendants))
                if not await handle.wait(5.0):
                    self._log.error("Flask server (pid %d) is still running after SIGKILL.",
                              handle.pid)
            leftovers = [p for p in descendants if _alive(p)]
            if leftovers:
                self._log.warning("Killing %d process(es) the Flask server left behind: %s",
                            len(leftovers), ", ".join(str(p.pid) for p in leftovers))
                child_mod.kill_processes(leftovers)
        loop = asyncio.get_running_loop()
        for pump in self._pumps:
            await loop.run_in_executor(None, pump.join, 1.0)
        self._checker.close()
        if self.state is not S.STOPPED:
            self._machine.move(S.STOPPED, "stopped")
        self._log.info("Flask server stopped.")

    # --- logging ---------------------------------------------------------------------------

    def _log_transition(self, old: BridgeState, new: BridgeState, reason: str) -> None:
        self._log.debug("state %s -> %s (%s)", old, new, reason)


class _NamedLog(logging.LoggerAdapter):
    """The bridge's logger, each message prefixed with the worker's name."""

    def process(self, msg: Any, kwargs: Any) -> Any:
        return "[%s] %s" % (self.extra, msg), kwargs


def _alive(proc: Any) -> bool:
    try:
        return proc.is_running() and proc.status() != "zombie"
    except Exception:
        return False


def _iso(wall: float) -> str:
    return errors.utc_timestamp(wall)
