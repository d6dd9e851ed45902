"""child: interpreter detection, script resolution, port check, and both ProcessControls with
injected process functions (no real child is spawned)."""
import asyncio
import errno
import os
import signal
import socket
import subprocess
import types

import pytest

from tornado_gateway.supervisor import child
from tornado_gateway.supervisor.child import (ChildHandle, PosixProcessControl, WindowsProcessControl,
                                   describe_returncode, detect_python, path_candidates,
                                   port_in_use, process_control_for, resolve_script,
                                   stop_description)


def which_from(found):
    calls = []

    def which(name):
        calls.append(name)
        return found.get(name)

    which.calls = calls
    return which


# --- detect_python ---------------------------------------------------------------------------

def test_path_candidates_per_platform():
    assert path_candidates("win32") == ["python", "py"]
    assert path_candidates("linux") == ["python3", "python"]
    assert path_candidates("darwin") == ["python3", "python"]


def test_windows_detects_python_on_path():
    which = which_from({"python": r"C:\Python311\python.exe", "python3": "/never"})
    got = detect_python(None, platform="win32", own=None, which=which, exists=lambda p: False)
    assert got == r"C:\Python311\python.exe"
    assert which.calls == ["python"]


def test_windows_falls_back_to_py_launcher():
    which = which_from({"py": r"C:\Windows\py.exe"})
    assert detect_python(None, platform="win32", own=None, which=which) == r"C:\Windows\py.exe"
    assert which.calls == ["python", "py"]


@pytest.mark.parametrize("platform", ["linux", "darwin"])
def test_unix_prefers_python3_then_python(platform):
    both = which_from({"python3": "/usr/bin/python3", "python": "/usr/bin/python"})
    assert detect_python(None, platform=platform, own=None, which=both) == "/usr/bin/python3"
    only = which_from({"python": "/usr/bin/python"})
    assert detect_python(None, platform=platform, own=None, which=only) == "/usr/bin/python"
    assert only.calls == ["python3", "python"]


def test_none_found_returns_none():
    assert detect_python(None, platform="linux", own=None, which=which_from({})) is None


def test_own_interpreter_comes_before_path():
    which = which_from({"python3": "/usr/bin/python3"})
    got = detect_python(None, platform="linux", own="/venv/bin/python",
                        which=which, exists=lambda p: p == "/venv/bin/python")
    assert got == "/venv/bin/python" and which.calls == []


def test_own_interpreter_missing_falls_back_to_path():
    which = which_from({"python3": "/usr/bin/python3"})
    got = detect_python(None, platform="linux", own="/gone/python", which=which,
                        exists=lambda p: False)
    assert got == "/usr/bin/python3"


def test_configured_path_or_name():
    assert detect_python("/opt/py/bin/python", own="/venv/python", which=which_from({}),
                         exists=lambda p: p == "/opt/py/bin/python") == "/opt/py/bin/python"
    assert detect_python("pypy3", own="/venv/python", which=which_from({"pypy3": "/usr/bin/pypy3"}),
                         exists=lambda p: False) == "/usr/bin/pypy3"
    # a configured interpreter that is not found is not silently replaced by another one
    assert detect_python("nope", own="/venv/python", which=which_from({}),
                         exists=lambda p: True if p == "/venv/python" else False) is None


# --- resolve_script --------------------------------------------------------------------------

def test_resolve_relative_from_cwd_then_project(tmp_path):
    cwd = str(tmp_path / "cwd")
    proj = str(tmp_path / "proj")
    in_proj = os.path.join(proj, "python", "api_server.py")
    assert resolve_script("python/api_server.py", cwd=cwd, project_dir=proj,
                          exists=lambda p: p == in_proj) == in_proj
    in_cwd = os.path.join(cwd, "python", "api_server.py")
    assert resolve_script("python/api_server.py", cwd=cwd, project_dir=proj,
                          exists=lambda p: p in (in_cwd, in_proj)) == in_cwd


def test_resolve_absolute_and_missing(tmp_path):
    f = tmp_path / "a" / ".." / "srv.py"
    (tmp_path / "srv.py").write_text("")
    assert resolve_script(str(f)) == str(tmp_path / "srv.py")
    assert resolve_script(str(tmp_path / "missing.py")) is None
    assert resolve_script("missing.py", cwd=str(tmp_path), project_dir=str(tmp_path)) is None


def test_resolve_real_project_script():
    got = resolve_script("python/api_server.py", cwd="/")
    assert got == os.path.join(child.PROJECT_DIR, "python", "api_server.py")
    assert os.path.isabs(got)


def test_resolve_expands_user(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "s.py").write_text("")
    assert resolve_script("~/s.py") == str(tmp_path / "s.py")


# --- port_in_use -----------------------------------------------------------------------------

def test_port_in_use_sees_a_listener_and_a_free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert port_in_use("127.0.0.1", port) is True
    assert port_in_use("127.0.0.1", port) is False


@pytest.mark.parametrize("host", ["192.0.2.1", "no-such-host.invalid"])
def test_port_in_use_raises_for_an_address_that_cannot_be_bound(host):
    # not "in use": the address is not this machine's (TEST-NET) or does not resolve
    with pytest.raises(OSError) as info:
        port_in_use(host, 5001)
    assert info.value.errno not in (errno.EADDRINUSE, errno.EACCES)


# --- describe_returncode ---------------------------------------------------------------------

def test_describe_returncode():
    assert describe_returncode(None) == (None, None)
    assert describe_returncode(0, "linux") == (0, None)
    assert describe_returncode(3, "linux") == (3, None)
    assert describe_returncode(-9, "linux") == (None, "SIGKILL")
    assert describe_returncode(-15, "darwin") == (None, "SIGTERM")
    assert describe_returncode(-200, "linux") == (None, "signal 200")
    assert describe_returncode(-1, "win32") == (-1, None)


# --- ChildHandle -----------------------------------------------------------------------------

def test_child_handle_wait():
    async def main():
        h = ChildHandle(pid=1, stdout=None, stderr=None, _exited=asyncio.Event())
        assert h.running
        assert await h.wait(0.01) is False
        asyncio.get_running_loop().call_later(0.01, h.mark_exited, 7)
        assert await h.wait(5) is True
        assert h.returncode == 7 and not h.running
        assert await h.wait(0) is True

    asyncio.run(main())


# --- POSIX control with fake killpg ----------------------------------------------------------

class Recorder:
    def __init__(self, killpg_error=None, getpgid_result=None):
        self.calls = []
        self.killpg_error = killpg_error
        self.getpgid_result = getpgid_result

    def killpg(self, pgid, sig):
        self.calls.append(("killpg", pgid, sig))
        if self.killpg_error:
            raise self.killpg_error

    def getpgid(self, pid):
        self.calls.append(("getpgid", pid))
        return self.getpgid_result if self.getpgid_result is not None else pid

    def kill(self, pid, sig):
        self.calls.append(("kill", pid, sig))

    def kill_processes(self, procs):
        self.calls.append(("kill_processes", list(procs)))
        return len(procs)


def posix(rec):
    return PosixProcessControl(killpg=rec.killpg, getpgid=rec.getpgid, kill=rec.kill,
                               kill_processes=rec.kill_processes)


def handle(pid=4321, popen=None):
    return ChildHandle(pid=pid, stdout=None, stderr=None, popen=popen)


def test_posix_request_stop_is_sigterm_to_the_group():
    rec = Recorder(getpgid_result=4321)
    done = posix(rec).request_stop(handle())
    assert rec.calls == [("getpgid", 4321), ("killpg", 4321, signal.SIGTERM)]
    assert done == "SIGTERM to process group 4321"


def test_posix_kill_tree_is_sigkill_to_group_and_descendants():
    rec = Recorder()
    done = posix(rec).kill_tree(handle(), ["a", "b"])
    assert ("killpg", 4321, signal.SIGKILL) in rec.calls
    assert ("kill_processes", ["a", "b"]) in rec.calls
    assert done == "SIGKILL to process group 4321 and 2 descendant(s)"


def test_posix_process_gone():
    rec = Recorder(killpg_error=ProcessLookupError())
    assert posix(rec).request_stop(handle()) == "nothing (process already gone)"


def test_posix_permission_error_falls_back_to_the_pid():
    rec = Recorder(killpg_error=PermissionError())
    done = posix(rec).request_stop(handle())
    assert rec.calls[-1] == ("kill", 4321, signal.SIGTERM)
    assert done == "SIGTERM to pid 4321"


# --- Windows control with fake Popen, run and thread ------------------------------------------

class FakePopen:
    def __init__(self, argv, **kwargs):
        self.argv = argv
        self.kwargs = kwargs
        self.pid = 777
        self.stdout = object()
        self.stderr = object()
        self.signals = []
        self.killed = False
        self.code = 0

    def send_signal(self, sig):
        self.signals.append(sig)

    def kill(self):
        self.killed = True

    def wait(self):
        return self.code


class FakeRun:
    def __init__(self, returncode=0):
        self.calls = []
        self.returncode = returncode

    def __call__(self, argv, **kwargs):
        self.calls.append((argv, kwargs))
        return types.SimpleNamespace(returncode=self.returncode)


def windows(run=None, threads=None, killed=None):
    threads = [] if threads is None else threads
    return WindowsProcessControl(
        popen=FakePopen, run=run or FakeRun(), start_thread=threads.append,
        kill_processes=lambda procs: (killed.extend(procs) if killed is not None else None)
        or len(procs))


def test_windows_spawn_uses_new_process_group_and_a_waiter():
    async def main():
        threads = []
        exits = []
        ctl = windows(threads=threads)
        h = ctl.spawn(["py", "s.py"], {"A": "1"}, "/w", exits.append)
        popen = h.popen
        assert isinstance(popen, FakePopen)
        assert popen.argv == ["py", "s.py"]
        assert popen.kwargs["creationflags"] == 0x00000200
        assert popen.kwargs["stdout"] == subprocess.PIPE and popen.kwargs["stderr"] == subprocess.PIPE
        assert popen.kwargs["stdin"] == subprocess.DEVNULL
        assert popen.kwargs["env"] == {"A": "1"} and popen.kwargs["cwd"] == "/w"
        assert (h.pid, h.stdout, h.stderr) == (777, popen.stdout, popen.stderr)
        assert len(threads) == 1 and h.running
        popen.code = 3
        threads[0]()  # the waiter: popen.wait() returned 3
        assert await h.wait(5)
        assert h.returncode == 3 and exits == [3]

    asyncio.run(main())


def test_windows_request_stop_is_ctrl_break():
    p = FakePopen([])
    done = windows().request_stop(handle(777, p))
    assert p.signals == [getattr(signal, "CTRL_BREAK_EVENT", 1)]
    assert done == "CTRL_BREAK_EVENT to process group 777"


def test_windows_request_stop_process_gone():
    p = FakePopen([])
    p.send_signal = lambda sig: (_ for _ in ()).throw(OSError("gone"))
    assert windows().request_stop(handle(777, p)) == "nothing (process already gone)"


def test_windows_kill_tree_is_taskkill_tree_force():
    run = FakeRun(0)
    killed = []
    p = FakePopen([])
    done = windows(run=run, killed=killed).kill_tree(handle(777, p), ["d1"])
    assert run.calls[0][0] == ["taskkill", "/PID", "777", "/T", "/F"]
    assert not p.killed
    assert killed == ["d1"]
    assert done == "taskkill /PID 777 /T /F (exit 0) and 1 descendant(s)"


def test_windows_kill_tree_failed_taskkill_kills_the_parent():
    run = FakeRun(128)
    p = FakePopen([])
    done = windows(run=run).kill_tree(handle(777, p), [])
    assert p.killed and "(exit 128)" in done


def test_process_control_for_platform():
    assert isinstance(process_control_for("win32", popen=FakePopen), WindowsProcessControl)
    assert isinstance(process_control_for("linux"), PosixProcessControl)
    assert isinstance(process_control_for("darwin"), PosixProcessControl)
    assert "taskkill /T /F" in stop_description("win32")
    assert "SIGTERM" in stop_description("linux") and "SIGKILL" in stop_description("linux")


def test_kill_processes_counts_only_the_killed():
    import psutil

    class P:
        def __init__(self, exc=None):
            self.exc = exc
            self.killed = False

        def kill(self):
            if self.exc:
                raise self.exc
            self.killed = True

    procs = [P(), P(psutil.NoSuchProcess(1)), P(psutil.AccessDenied(2)), P()]
    assert child.kill_processes(procs) == 2
    assert procs[0].killed and procs[3].killed


def test_snapshot_descendants_of_missing_pid_is_empty():
    assert child.snapshot_descendants(2 ** 22 + 12345) == []


def test_posix_kill_leftovers_kills_the_exited_childs_group():
    rec = Recorder()
    assert posix(rec).kill_leftovers(handle()) == "SIGKILL to process group 4321"
    assert rec.calls == [("killpg", 4321, signal.SIGKILL)]
    gone = Recorder(killpg_error=ProcessLookupError())
    assert posix(gone).kill_leftovers(handle()) == ""


def test_windows_kill_leftovers_is_nothing():
    # taskkill /T already took the tree; an exited parent leaves nothing to name on Windows
    assert windows().kill_leftovers(handle(777, FakePopen([]))) == ""


def test_windows_kill_tree_without_taskkill_still_kills_the_child_and_descendants():
    def no_taskkill(argv, **kwargs):
        raise FileNotFoundError(2, "The system cannot find the file specified", "taskkill")

    killed = []
    p = FakePopen([])
    ctl = WindowsProcessControl(popen=FakePopen, run=no_taskkill, start_thread=lambda f: None,
                                kill_processes=lambda procs: killed.extend(procs) or len(procs))
    done = ctl.kill_tree(handle(777, p), ["d1", "d2"])  # used to raise: stop() never ended
    assert p.killed and killed == ["d1", "d2"]
    assert "not run" in done and done.endswith("and 2 descendant(s)")


# --- POSIX: how the child's exit is observed (SIGCHLD callback, or a waiter thread) ----------

class FakeSubprocess:
    """tornado.process.Subprocess as PosixProcessControl uses it: .proc, .pid and
    set_exit_callback (which raises ``refuse``, as it does under uvloop)."""

    made = []

    def __init__(self, argv, refuse=None, **kwargs):
        self.proc = FakePopen(argv, **kwargs)
        self.pid = self.proc.pid
        self.refuse = refuse
        self.callback = None
        FakeSubprocess.made.append(self)

    def set_exit_callback(self, callback):
        if self.refuse is not None:
            raise self.refuse
        self.callback = callback


SIGCHLD_TAKEN = RuntimeError("cannot add a signal handler for SIGCHLD: it is used by the event "
                             "loop to track subprocesses")


def posix_watch(threads, exit_watch="auto", keeps=False, refuse=None, rec=None):
    rec = rec or Recorder()
    FakeSubprocess.made = []
    return PosixProcessControl(
        killpg=rec.killpg, getpgid=rec.getpgid, kill=rec.kill,
        kill_processes=rec.kill_processes, exit_watch=exit_watch, popen=FakePopen,
        subprocess_factory=lambda argv, **kw: FakeSubprocess(argv, refuse=refuse, **kw),
        start_thread=threads.append, keeps_sigchld=lambda loop: keeps)


def check_posix_spawn_kwargs(popen):
    assert popen.argv == ["py", "s.py"]
    assert popen.kwargs == dict(stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, env={"A": "1"}, cwd="/w",
                                start_new_session=True)


def test_posix_spawn_under_asyncio_uses_subprocess_exit_callback():
    async def main():
        threads, exits = [], []
        h = posix_watch(threads).spawn(["py", "s.py"], {"A": "1"}, "/w", exits.append)
        (proc,) = FakeSubprocess.made
        check_posix_spawn_kwargs(proc.proc)
        assert (h.pid, h.popen, h.stdout) == (777, proc.proc, proc.proc.stdout)
        assert threads == [] and proc.callback is not None
        proc.callback(-15)  # Subprocess's SIGCHLD handler saw the exit
        assert await h.wait(5) and h.returncode == -15 and exits == [-15]

    asyncio.run(main())


def test_posix_spawn_on_a_loop_that_keeps_sigchld_uses_a_waiter_thread():
    # uvloop: Subprocess's exit callback would raise, so none is made; Popen in its own
    # session and a thread blocked in wait(), whose result is handed to the loop
    async def main():
        threads, exits = [], []
        h = posix_watch(threads, keeps=True).spawn(["py", "s.py"], {"A": "1"}, "/w",
                                                   exits.append)
        assert FakeSubprocess.made == [] and isinstance(h.popen, FakePopen)
        check_posix_spawn_kwargs(h.popen)
        assert len(threads) == 1 and h.running
        h.popen.code = 3
        threads[0]()
        assert await h.wait(5) and h.returncode == 3 and exits == [3]

    asyncio.run(main())


def test_posix_spawn_falls_back_to_a_thread_when_the_exit_callback_is_refused():
    # the child already runs when set_exit_callback raises: it is watched, not orphaned
    async def main():
        threads, exits = [], []
        h = posix_watch(threads, refuse=SIGCHLD_TAKEN).spawn(["py", "s.py"], {"A": "1"}, "/w",
                                                             exits.append)
        (proc,) = FakeSubprocess.made
        assert h.popen is proc.proc and len(threads) == 1
        proc.proc.code = -9
        threads[0]()
        assert await h.wait(5) and h.returncode == -9 and exits == [-9]

    asyncio.run(main())


def test_posix_exit_watch_forced_either_way():
    async def main():
        threads = []
        posix_watch(threads, exit_watch="thread").spawn(["py", "s.py"], {"A": "1"}, "/w",
                                                        lambda code: None)
        assert FakeSubprocess.made == [] and len(threads) == 1
        with pytest.raises(RuntimeError, match="SIGCHLD"):
            posix_watch([], exit_watch="sigchld", keeps=True, refuse=SIGCHLD_TAKEN).spawn(
                ["py", "s.py"], {"A": "1"}, "/w", lambda code: None)
        assert len(FakeSubprocess.made) == 1  # "sigchld" ignores the loop's say

    asyncio.run(main())
    with pytest.raises(ValueError):
        PosixProcessControl(exit_watch="poll")


def test_posix_stop_and_kill_are_the_same_with_a_waiter_thread():
    rec = Recorder()
    ctl = posix_watch([], exit_watch="thread", rec=rec)
    assert ctl.request_stop(handle()) == "SIGTERM to process group 4321"
    assert ctl.kill_tree(handle(), ["a"]) == "SIGKILL to process group 4321 and 1 descendant(s)"
    assert ctl.kill_leftovers(handle()) == "SIGKILL to process group 4321"
    assert [c[0] for c in rec.calls] == ["getpgid", "killpg", "getpgid", "killpg",
                                         "kill_processes", "killpg"]


def test_loop_keeps_sigchld_only_for_uvloop():
    loop = asyncio.new_event_loop()
    try:
        assert child.loop_keeps_sigchld(loop) is False
    finally:
        loop.close()
    assert child.loop_keeps_sigchld(None) is False
    uvloop = pytest.importorskip("uvloop")
    loop = uvloop.new_event_loop()
    try:
        assert child.loop_keeps_sigchld(loop) is True
    finally:
        loop.close()
