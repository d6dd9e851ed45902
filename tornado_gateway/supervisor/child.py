"""The platform layer: finding the interpreter, spawning the child, stopping its process tree.

Every difference between POSIX and Windows lives here, behind one small interface
(:class:`ProcessControl`), so the rest of the package never asks "am I on Windows?".
The process functions (``killpg``, ``run``, ``process_ctor``...) are constructor arguments so
tests can drive each platform's logic on any machine.

POSIX: ``tornado.process.Subprocess`` in its own session (process group), exit through
Subprocess's exit callback; stop = SIGTERM to the group, wait, then SIGKILL the group and every
descendant seen before (psutil), which also reaches a Werkzeug reloader's grandchild. Under
uvloop, which keeps SIGCHLD for itself (Subprocess's callback cannot be installed), and
wherever else installing it fails, ``subprocess.Popen`` in its own session and a waiter thread
(:func:`watch_exit_in_thread`, the Windows mechanism) report the exit instead; stopping is the
same.

Windows: Subprocess's exit callback does not work there, so ``subprocess.Popen`` with
``CREATE_NEW_PROCESS_GROUP`` and a waiter thread; stop = ``CTRL_BREAK_EVENT`` to the group
(the only console signal a child in its own group receives), wait, then
``taskkill /PID n /T /F``, which kills the whole tree. ``Popen.terminate()`` would be
TerminateProcess of the parent alone: not graceful and not the tree.
"""
from __future__ import annotations

import asyncio
import errno
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
from dataclasses import dataclass
from typing import IO, Any, Callable, List, Optional, Sequence

import psutil

log = logging.getLogger("tornado_gateway.child")

PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # tornado_gateway/
PROJECT_DIR = os.path.dirname(PACKAGE_DIR)


# --- finding things before spawning ---------------------------------------------------------

def path_candidates(platform: str) -> List[str]:
    """Interpreter names to look up on PATH, in order, for ``platform`` (a ``sys.platform``)."""
    if platform.startswith("win"):
        return ["python", "py"]
    return ["python3", "python"]


def detect_python(
    configured: Optional[str],
    platform: str = sys.platform,
    own: Optional[str] = sys.executable,
    which: Callable[[str], Optional[str]] = shutil.which,
    exists: Callable[[str], bool] = os.path.isfile,
) -> Optional[str]:
    """The interpreter to run the child with, or None when none can be found.

    Order: ``configured`` (FLASK_PYTHON: a path, or a name looked up on PATH); else the
    gateway's own interpreter, whose packages were installed with it; else PATH detection for
    the platform (``python`` on Windows, ``python3`` then ``python`` elsewhere).
    """
    if configured:
        if exists(configured):
            return configured
        return which(configured)
    if own and exists(own):
        return own
    for name in path_candidates(platform):
        found = which(name)
        if found:
            return found
    return None


def resolve_script(script: str, cwd: Optional[str] = None, project_dir: str = PROJECT_DIR,
                   exists: Callable[[str], bool] = os.path.isfile) -> Optional[str]:
    """The absolute path of the Flask script, or None if it does not exist.

    A relative path is taken from the working directory first, then from the project
    checkout this package lives in, so ``python -m tornado_gateway`` works from anywhere in a
    source checkout. ``os.path`` keeps it right on every platform (design property 14).
    """
    script = os.path.expanduser(script)
    if os.path.isabs(script):
        # check the path that is returned (and run), as for a relative one below
        script = os.path.normpath(script)
        return script if exists(script) else None
    for base in (cwd or os.getcwd(), project_dir):
        candidate = os.path.normpath(os.path.join(base, script))
        if exists(candidate):
            return candidate
    return None


def port_in_use(host: str, port: int) -> bool:
    """True if something already listens on (host, port), so the child could not bind it.

    Raises OSError when (host, port) cannot be bound for another reason (a host name that does
    not resolve, an address this machine does not have): that is not a port in use."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        if os.name != "nt":
            # what the child's server will do too: TIME_WAIT leftovers must not count as "in use"
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            # WSAEACCES: Windows' answer for a port another socket holds exclusively
            if exc.errno in (errno.EADDRINUSE, errno.EACCES, getattr(errno, "WSAEACCES", 10013)):
                return True
            raise
    return False


# --- the running child ----------------------------------------------------------------------

@dataclass
class ChildHandle:
    """A spawned child: its pid, its output pipes, and an awaitable exit."""

    pid: int
    stdout: Optional[IO[bytes]]
    stderr: Optional[IO[bytes]]
    popen: Any = None  # subprocess.Popen
    returncode: Optional[int] = None
    _exited: Optional[asyncio.Event] = None

    def mark_exited(self, returncode: int) -> None:
        self.returncode = returncode
        if self._exited is not None:
            self._exited.set()

    @property
    def running(self) -> bool:
        return self.returncode is None

    async def wait(self, timeout: Optional[float]) -> bool:
        """Wait up to ``timeout`` seconds for the exit; True if it has exited."""
        if self.returncode is not None:
            return True
        assert self._exited is not None
        try:
            await asyncio.wait_for(self._exited.wait(), timeout)
        except asyncio.TimeoutError:
            return False
        return True


def describe_returncode(returncode: Optional[int], platform: str = sys.platform) -> tuple:
    """(exit code, signal name) for a returncode; negative codes are signals on POSIX."""
    if returncode is None:
        return None, None
    if returncode < 0 and not platform.startswith("win"):
        try:
            return None, signal.Signals(-returncode).name
        except ValueError:
            return None, "signal %d" % -returncode
    return returncode, None


def snapshot_descendants(pid: int) -> List[psutil.Process]:
    """Every live descendant of ``pid`` now. Taken before killing the parent, because its
    orphans are re-parented and can no longer be found from it afterwards."""
    try:
        return psutil.Process(pid).children(recursive=True)
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return []


def kill_processes(processes: Sequence[psutil.Process]) -> int:
    """SIGKILL (TerminateProcess) each process still alive; returns how many were killed."""
    killed = 0
    for proc in processes:
        try:
            proc.kill()
            killed += 1
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return killed


def daemon_thread(target: Callable[[], None]) -> None:
    threading.Thread(target=target, name="child-waiter", daemon=True).start()


def watch_exit_in_thread(popen: Any, exited: Callable[[int], None],
                         start_thread: Callable[[Callable[[], None]], None] = daemon_thread
                         ) -> None:
    """Report ``popen``'s exit: a thread blocks in ``popen.wait()`` and hands the returncode
    to ``exited`` on the current IOLoop. Needs no SIGCHLD handler: Windows has none, uvloop
    keeps it for itself. (A loop already closed when the child exits drops the callback.)"""
    from tornado.ioloop import IOLoop

    loop = IOLoop.current()

    def waiter() -> None:
        loop.add_callback(exited, popen.wait())

    start_thread(waiter)


def loop_keeps_sigchld(loop: Optional[asyncio.AbstractEventLoop]) -> bool:
    """True for an event loop that refuses other SIGCHLD handlers (uvloop: it tracks its own
    subprocesses with it), so Subprocess's exit callback cannot be installed."""
    return loop is not None and type(loop).__module__.split(".")[0] == "uvloop"


def _running_loop() -> Optional[asyncio.AbstractEventLoop]:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


class ProcessControl:
    """Spawn and stop a child. One subclass per platform family."""

    name = "abstract"

    def spawn(self, argv: Sequence[str], env: dict, cwd: Optional[str],
              on_exit: Callable[[int], None]) -> ChildHandle:
        raise NotImplementedError

    def request_stop(self, handle: ChildHandle) -> str:
        """Ask the child (and its group) to exit gracefully; returns what was sent."""
        raise NotImplementedError

    def kill_tree(self, handle: ChildHandle, descendants: Sequence[psutil.Process]) -> str:
        """Kill the child and its whole tree now; returns what was done."""
        raise NotImplementedError

    def kill_leftovers(self, handle: ChildHandle) -> str:
        """Once the child itself has exited: kill what it left running (a Werkzeug reloader's
        grandchild still serving the port); returns what was done, "" if nothing was left."""
        return ""

    def cleanup(self) -> None:
        """Release anything global the spawn set up (called when the loop is done)."""


class PosixProcessControl(ProcessControl):
    """``exit_watch``: how the child's exit is observed. "auto" (default): Subprocess's
    SIGCHLD exit callback, or a waiter thread when the running loop keeps SIGCHLD (uvloop) or
    the callback cannot be installed (a loop outside the main thread); "sigchld" / "thread":
    always that one."""

    name = "posix"

    def __init__(self, killpg: Callable[[int, int], None] = getattr(os, "killpg", None),
                 getpgid: Callable[[int], int] = getattr(os, "getpgid", None),
                 kill: Callable[[int, int], None] = os.kill,
                 kill_processes: Callable[[Sequence[Any]], int] = kill_processes,
                 exit_watch: str = "auto",
                 popen: Callable[..., Any] = subprocess.Popen,
                 subprocess_factory: Optional[Callable[..., Any]] = None,
                 start_thread: Callable[[Callable[[], None]], None] = daemon_thread,
                 keeps_sigchld: Callable[[Any], bool] = loop_keeps_sigchld) -> None:
        if exit_watch not in ("auto", "sigchld", "thread"):
            raise ValueError("exit_watch must be 'auto', 'sigchld' or 'thread'")
        self._killpg = killpg
        self._getpgid = getpgid
        self._kill = kill
        self._kill_processes = kill_processes
        self._exit_watch = exit_watch
        self._popen = popen
        self._subprocess = subprocess_factory
        self._start_thread = start_thread
        self._keeps_sigchld = keeps_sigchld

    def spawn(self, argv, env, cwd, on_exit):
        # own process group: Ctrl+C in the terminal reaches only the gateway, which stops the
        # child in order; killpg reaches the grandchildren
        kwargs = dict(stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                      env=env, cwd=cwd, start_new_session=True)
        thread = self._exit_watch == "thread" or (
            self._exit_watch == "auto" and self._keeps_sigchld(_running_loop()))
        if thread:
            popen = self._popen(list(argv), **kwargs)
        else:
            factory = self._subprocess
            if factory is None:
                from tornado.process import Subprocess as factory  # type: ignore[no-redef]
            proc = factory(list(argv), **kwargs)
            popen = proc.proc
        handle = ChildHandle(pid=popen.pid, stdout=popen.stdout, stderr=popen.stderr,
                             popen=popen, _exited=asyncio.Event())

        def exited(returncode: int) -> None:
            handle.mark_exited(returncode)
            on_exit(returncode)

        if not thread:
            try:
                proc.set_exit_callback(exited)
                return handle
            except RuntimeError as exc:
                if self._exit_watch == "sigchld":
                    raise
                # the child runs already: watch it the other way rather than orphan it
                log.debug("Subprocess's exit callback is unavailable (%s)", exc)
        log.debug("a thread waits for the exit of pid %d", popen.pid)
        watch_exit_in_thread(popen, exited, self._start_thread)
        return handle

    def _signal_group(self, handle: ChildHandle, sig: int) -> str:
        try:
            # the child leads its own session, so its pgid is its pid; ask anyway in case a
            # user-supplied script moved itself
            pgid = self._getpgid(handle.pid)
            self._killpg(pgid, sig)
            return "%s to process group %d" % (signal.Signals(sig).name, pgid)
        except ProcessLookupError:
            return "nothing (process already gone)"
        except PermissionError:
            self._kill(handle.pid, sig)
            return "%s to pid %d" % (signal.Signals(sig).name, handle.pid)

    def request_stop(self, handle):
        return self._signal_group(handle, signal.SIGTERM)

    def kill_tree(self, handle, descendants):
        done = self._signal_group(handle, signal.SIGKILL)
        extra = self._kill_processes(descendants)
        return done + (" and %d descendant(s)" % extra if extra else "")

    def kill_leftovers(self, handle):
        # the child led its own process group; the group's id cannot be reused while a member
        # lives, so once the child is gone this reaches exactly what it left behind
        try:
            self._killpg(handle.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            return ""
        return "SIGKILL to process group %d" % handle.pid

    def cleanup(self):
        from tornado.process import Subprocess

        # Subprocess's SIGCHLD handling is global and bound to the first event loop
        Subprocess.uninitialize()


class WindowsProcessControl(ProcessControl):
    name = "windows"

    CREATE_NEW_PROCESS_GROUP = 0x00000200
    CTRL_BREAK_EVENT = 1

    def __init__(self, popen: Callable[..., Any] = subprocess.Popen,
                 run: Callable[..., Any] = subprocess.run,
                 start_thread: Callable[[Callable[[], None]], None] = None,
                 kill_processes: Callable[[Sequence[Any]], int] = kill_processes) -> None:
        self._popen = popen
        self._run = run
        self._start_thread = start_thread or daemon_thread
        self._kill_processes = kill_processes

    def spawn(self, argv, env, cwd, on_exit):
        popen = self._popen(list(argv), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env, cwd=cwd,
                            creationflags=self.CREATE_NEW_PROCESS_GROUP)
        handle = ChildHandle(pid=popen.pid, stdout=popen.stdout, stderr=popen.stderr,
                             popen=popen, _exited=asyncio.Event())

        def exited(returncode: int) -> None:
            handle.mark_exited(returncode)
            on_exit(returncode)

        # Subprocess's exit callback relies on SIGCHLD, which Windows does not have
        watch_exit_in_thread(popen, exited, self._start_thread)
        return handle

    def request_stop(self, handle):
        try:
            handle.popen.send_signal(getattr(signal, "CTRL_BREAK_EVENT", self.CTRL_BREAK_EVENT))
            return "CTRL_BREAK_EVENT to process group %d" % handle.pid
        except OSError:
            return "nothing (process already gone)"

    def kill_tree(self, handle, descendants):
        try:
            returncode = self._run(["taskkill", "/PID", str(handle.pid), "/T", "/F"],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE).returncode
        except OSError as exc:  # taskkill not on PATH: at least kill the child itself
            returncode = "not run: %s" % exc
        done = "taskkill /PID %d /T /F (exit %s)" % (handle.pid, returncode)
        if returncode != 0:
            # taskkill fails if the parent is already gone; its orphans still need killing
            try:
                handle.popen.kill()
            except OSError:
                pass
        extra = self._kill_processes(descendants)
        return done + (" and %d descendant(s)" % extra if extra else "")


def process_control_for(platform: str = sys.platform, **kwargs: Any) -> ProcessControl:
    """The ProcessControl for ``platform`` (a ``sys.platform`` value)."""
    if platform.startswith("win"):
        return WindowsProcessControl(**kwargs)
    return PosixProcessControl(**kwargs)


def stop_description(platform: str) -> str:
    """How the child is asked to stop on ``platform``: SIGTERM on Unix, taskkill on Windows."""
    if platform.startswith("win"):
        return "CTRL_BREAK_EVENT, then taskkill /T /F"
    return "SIGTERM to the process group, then SIGKILL to the process tree"
