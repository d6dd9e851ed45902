"""Helpers for the fault-and-abuse suite: the real gateway as a subprocess, raw HTTP, images.

Everything here talks to 127.0.0.1 only, bounds every wait, and ends only processes it
started: the gateway by its Popen, anything below it by the pids it saw (descendant
snapshots) or by a marker environment variable that only its own descendants inherit.
"""
from __future__ import annotations

import http.client
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

import psutil

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
PYTHON = sys.executable
ECHO_SERVER = os.path.join(REPO, "tests", "child_scripts", "echo_server.py")
SCRIPTS = os.path.join(HERE, "child_scripts")
SERVICE_SCRIPT = os.path.join(REPO, "python", "api_server.py")
MARKER = "TG_RELIABILITY_TAG"
ERROR_KEYS = {"error", "message", "suggestion", "timestamp"}


if os.path.join(REPO, "tests") not in sys.path:
    sys.path.append(os.path.join(REPO, "tests"))

# the project's shared picker: never the same port twice in a run, across every suite
from ports import free_port, free_ports  # noqa: E402,F401


def port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def wait_until(predicate: Callable[[], Any], timeout: float, what: str,
               interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError("timed out after %.1f s waiting for %s (last: %r)" % (timeout, what, last))


def alive(pid: int, created: Optional[float] = None) -> bool:
    try:
        proc = psutil.Process(pid)
        if created is not None and abs(proc.create_time() - created) > 0.05:
            return False
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def tagged_processes(tag: str) -> List[psutil.Process]:
    """Live processes whose environment carries ``MARKER=tag``: only what one gateway spawned."""
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.pid == os.getpid() or proc.status() == psutil.STATUS_ZOMBIE:
                continue
            if proc.environ().get(MARKER) == tag:
                found.append(proc)
        except psutil.Error:
            continue
    return found


# --- HTTP ----------------------------------------------------------------------------------

class Response:
    def __init__(self, status: int, reason: str, headers: List[Tuple[str, str]], body: bytes):
        self.status = status
        self.reason = reason
        self.headers = headers
        self.body = body

    def header(self, name: str) -> Optional[str]:
        for key, value in self.headers:
            if key.lower() == name.lower():
                return value
        return None

    def json(self) -> Any:
        return json.loads(self.body.decode("utf-8"))

    def is_gateway_error(self, status: int) -> bool:
        """The gateway's own JSON error shape with that status."""
        if self.status != status:
            return False
        try:
            data = self.json()
        except ValueError:
            return False
        return isinstance(data, dict) and ERROR_KEYS <= set(data)

    def __repr__(self) -> str:
        return "<Response %d %s %r>" % (self.status, self.reason, self.body[:300])


def request(port: int, method: str, path: str, body: Optional[bytes] = None,
            headers: Optional[Dict[str, str]] = None, timeout: float = 10.0) -> Response:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        data = resp.read()
        return Response(resp.status, resp.reason, resp.getheaders(), data)
    finally:
        conn.close()


def multipart(fields: Dict[str, str], files: Dict[str, Tuple[str, bytes, str]],
              boundary: Optional[str] = None) -> Tuple[bytes, str]:
    boundary = boundary or "----rel" + uuid.uuid4().hex
    out = io.BytesIO()
    for name, value in fields.items():
        out.write(("--%s\r\nContent-Disposition: form-data; name=\"%s\"\r\n\r\n%s\r\n"
                   % (boundary, name, value)).encode())
    for name, (filename, data, ctype) in files.items():
        out.write(("--%s\r\nContent-Disposition: form-data; name=\"%s\"; filename=\"%s\"\r\n"
                   "Content-Type: %s\r\n\r\n" % (boundary, name, filename, ctype)).encode())
        out.write(data)
        out.write(b"\r\n")
    out.write(("--%s--\r\n" % boundary).encode())
    return out.getvalue(), "multipart/form-data; boundary=%s" % boundary


class RawResult:
    """What a raw-socket client saw: the bytes, whether the server closed, and the parse."""

    def __init__(self, data: bytes, closed: bool, timed_out: bool):
        self.data = data
        self.closed = closed
        self.timed_out = timed_out

    @property
    def status(self) -> Optional[int]:
        if not self.data.startswith(b"HTTP/"):
            return None
        try:
            return int(self.data.split(b" ", 2)[1])
        except (IndexError, ValueError):
            return None

    @property
    def head_and_body(self) -> Tuple[bytes, bytes]:
        head, _, body = self.data.partition(b"\r\n\r\n")
        return head, body

    def json_body(self) -> Any:
        head, body = self.head_and_body
        return json.loads(body.decode("utf-8"))

    def is_gateway_error(self, status: int) -> bool:
        if self.status != status:
            return False
        try:
            data = self.json_body()
        except ValueError:
            return False
        return isinstance(data, dict) and ERROR_KEYS <= set(data)


def raw_exchange(port: int, payload: bytes, timeout: float = 5.0,
                 read_for: Optional[float] = None) -> RawResult:
    """Send ``payload`` as is, read until the server closes or ``timeout`` passes."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    data = b""
    closed = timed_out = False
    deadline = time.monotonic() + (read_for if read_for is not None else timeout)
    try:
        sock.sendall(payload)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                timed_out = True
                break
            sock.settimeout(left)
            try:
                chunk = sock.recv(65536)
            except socket.timeout:
                timed_out = True
                break
            except ConnectionResetError:
                closed = True
                break
            if not chunk:
                closed = True
                break
            data += chunk
    finally:
        sock.close()
    return RawResult(data, closed, timed_out)


def read_http_response(sock: socket.socket, timeout: float) -> Dict[str, Any]:
    """Read one response off ``sock`` honestly: report whether its framing completed.

    Returns ``{"status", "headers", "body", "complete", "closed"}``; ``complete`` is True only
    if the body reached its announced Content-Length or the chunked terminator.
    """
    sock.settimeout(timeout)
    buf = b""
    closed = False

    def fill() -> bool:
        nonlocal buf, closed
        try:
            chunk = sock.recv(262144)
        except (ConnectionResetError, BrokenPipeError):
            chunk = b""
        if not chunk:
            closed = True
            return False
        buf += chunk
        return True

    while b"\r\n\r\n" not in buf:
        if not fill():
            return {"status": None, "headers": {}, "body": buf, "complete": False,
                    "closed": True}
    head, _, rest = buf.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    buf = rest
    if "content-length" in headers:
        want = int(headers["content-length"])
        while len(buf) < want and fill():
            pass
        return {"status": status, "headers": headers, "body": buf[:want],
                "complete": len(buf) >= want, "closed": closed}
    if headers.get("transfer-encoding", "").lower() == "chunked":
        body = b""
        while True:
            while b"\r\n" not in buf:
                if not fill():
                    return {"status": status, "headers": headers, "body": body,
                            "complete": False, "closed": True}
            line, _, buf = buf.partition(b"\r\n")
            size = int(line.split(b";")[0], 16)
            while len(buf) < size + 2:
                if not fill():
                    return {"status": status, "headers": headers, "body": body + buf[:size],
                            "complete": False, "closed": True}
            body += buf[:size]
            buf = buf[size + 2:]
            if size == 0:
                return {"status": status, "headers": headers, "body": body, "complete": True,
                        "closed": closed}
    while fill():  # read until close: a proxy must never use this framing for these tests
        pass
    return {"status": status, "headers": headers, "body": buf, "complete": False,
            "closed": True}


# --- the gateway process -------------------------------------------------------------------

class Gateway:
    """``python -m tornado_gateway`` on free ports, its output in a log file."""

    def __init__(self, workdir: str, args: Iterable[str] = (), env: Optional[Dict[str, str]] = None,
                 port: Optional[int] = None, flask_port: Optional[int] = None,
                 data_dir: Optional[str] = None) -> None:
        self.workdir = workdir
        os.makedirs(workdir, exist_ok=True)
        self.port = port or free_port()
        self.flask_port = flask_port or free_ports(4)  # room for up to 4 workers
        self.data_dir = data_dir or os.path.join(workdir, "data")
        self.tag = uuid.uuid4().hex
        self.log_path = os.path.join(workdir, "gateway-%s.log" % self.tag[:8])
        self.args = ["--port", str(self.port), "--flask-port", str(self.flask_port)] + list(args)
        self.env = {k: v for k, v in os.environ.items()
                    if k not in ("TORNADO_GATEWAY_PID",) and not k.startswith(("GATEWAY_", "FLASK_"))}
        self.env.update({"DEEPFAKE_DATA_DIR": self.data_dir, MARKER: self.tag,
                         "PYTHONUNBUFFERED": "1", "NODE_ENV": ""})
        self.env.update(env or {})
        self.seen: Dict[int, float] = {}  # every descendant pid ever observed -> create_time
        self.proc: Optional[subprocess.Popen] = None
        self.returncode: Optional[int] = None

    # lifecycle --------------------------------------------------------------------------
    def start(self) -> "Gateway":
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([PYTHON, "-m", "tornado_gateway"] + self.args, cwd=REPO,
                                     env=self.env, stdin=subprocess.DEVNULL, stdout=self._log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def track(self) -> List[psutil.Process]:
        """Remember every current descendant (so it can be checked and cleaned up later)."""
        if not self.running():
            return []
        try:
            kids = psutil.Process(self.pid).children(recursive=True)
        except psutil.Error:
            return []
        for kid in kids:
            try:
                self.seen.setdefault(kid.pid, kid.create_time())
            except psutil.Error:
                pass
        return kids

    def wait_listening(self, timeout: float = 15.0) -> None:
        def up() -> bool:
            assert self.running(), "gateway exited early (%s):\n%s" % (self.proc.poll(),
                                                                         self.log()[-3000:])
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return True
            except OSError:
                return False
        wait_until(up, timeout, "the gateway to listen")

    def wait_state(self, *states: str, timeout: float = 20.0) -> Dict[str, Any]:
        def reached() -> Optional[Dict[str, Any]]:
            assert self.running(), "gateway exited (%s):\n%s" % (self.proc.poll(),
                                                                   self.log()[-3000:])
            try:
                service = self.status()["service"]
            except (OSError, http.client.HTTPException, ValueError):
                return None
            self.track()
            return service if service["state"] in states else None
        return wait_until(reached, timeout, "service state in %s" % (states,))

    def status(self) -> Dict[str, Any]:
        return request(self.port, "GET", "/api/gateway/status", timeout=5).json()

    def child_pid(self) -> int:
        pid = self.status()["service"]["pid"]
        assert pid, "no child pid in status"
        return pid

    def interrupt(self, sig: int = signal.SIGINT, timeout: float = 15.0) -> int:
        """Ctrl+C (or ``sig``): wait for the gateway to exit, return its exit code."""
        self.track()
        assert self.proc is not None
        self.proc.send_signal(sig)
        try:
            self.returncode = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError("gateway did not exit within %.0f s of %s:\n%s" % (
                timeout, signal.Signals(sig).name, self.log()[-3000:]))
        return self.returncode

    def leftovers(self) -> List[int]:
        """Pids this gateway started that are still alive (descendants seen, or tagged)."""
        pids = {pid for pid, created in self.seen.items() if alive(pid, created)}
        pids.update(p.pid for p in tagged_processes(self.tag))
        if self.running():
            pids.add(self.pid)
        return sorted(pids)

    def cleanup(self) -> List[int]:
        """Kill whatever of ours is left (by pid), return what had to be killed."""
        left = []
        if self.running():  # a test that failed midway: stop it the documented way first
            self.track()
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                left.append(self.pid)
                self.proc.kill()
                try:
                    self.proc.wait(5)
                except subprocess.TimeoutExpired:
                    pass
        for pid in self.leftovers():
            left.append(pid)
            try:
                psutil.Process(pid).kill()
            except psutil.Error:
                pass
        if self.proc is not None and self.proc.poll() is None:
            self.proc.wait(5)
        if getattr(self, "_log", None) is not None:
            self._log.close()
        return sorted(set(left))

    def log(self) -> str:
        try:
            with open(self.log_path, "rb") as f:
                return f.read().decode("utf-8", "replace")
        except OSError:
            return ""

    # HTTP ---------------------------------------------------------------------------------
    def request(self, method: str, path: str, body: Optional[bytes] = None,
                headers: Optional[Dict[str, str]] = None, timeout: float = 10.0) -> Response:
        return request(self.port, method, path, body, headers, timeout)

    def get(self, path: str, **kw: Any) -> Response:
        return self.request("GET", path, **kw)

    def raw(self, payload: bytes, timeout: float = 5.0, read_for: Optional[float] = None
            ) -> RawResult:
        return raw_exchange(self.port, payload, timeout, read_for)

    def echo_events(self) -> List[Dict[str, Any]]:
        """The echo child's record of what reached it (asked directly, not through the proxy)."""
        return request(self.flask_port, "GET", "/api/deepfake/_events", timeout=5).json()


def echo_args() -> List[str]:
    return ["--flask-script", ECHO_SERVER]


# --- images --------------------------------------------------------------------------------

def noise_image(size: int, seed: int, rgb: bool = False):
    """A 1/f-noise texture (photo-like spectrum): enough detail to be a training sample."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    fy, fx = np.meshgrid(np.fft.fftfreq(size), np.fft.fftfreq(size), indexing="ij")
    amplitude = 1.0 / np.maximum(np.hypot(fx, fy), 1.0 / size)
    channels = []
    for _ in range(3 if rgb else 1):
        noise = np.real(np.fft.ifft2(np.fft.fft2(rng.normal(size=(size, size))) * amplitude))
        channels.append((noise - noise.mean()) / noise.std() * 40 + 128)
    array = np.stack(channels, axis=-1) if rgb else channels[0]
    return Image.fromarray(np.clip(array, 0, 255).astype(np.uint8))


def encode(image: Any, fmt: str = "PNG", **options: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()
