#!/usr/bin/env python
"""Benchmark of the gateway: the Flask child directly vs the Tornado gateway in front of it.

    python bench/bench.py --quick      # < 2 minutes
    python bench/bench.py              # full run (~5 minutes)
    python bench/bench.py --profile gateway   # where the gateway's CPU goes (cProfile)

One run measures, interleaving direct and gateway runs so that the machine's noise hits both
(each repeat runs direct and each gateway variant, in an order that rotates from one repeat
to the next), each figure as min / median / max over the repeats, each ratio per repeat against the
direct run of the same repeat:

* tiny GET (``/api/deepfake/tiny``): requests/s, p50 and p99 latency at 1 and 32 keep-alive
  client connections, with ``wrk`` if installed (Debian: ``apt-get install wrk``), else a bounded
  asyncio load generator (``--load asyncio``); ratio gateway / direct per adjacent pair;
* a 1 GiB upload and a 1 GiB download, streamed by the benchmark (never held in memory): wall
  time direct vs through the gateway, and the gateway process's peak RSS (psutil, every 50 ms,
  plus the kernel's high-water mark VmHWM);
* launch to the first successful proxied request vs launch to the child's first answer (both
  polled every 5 ms), and SIGINT (Ctrl+C) to process exit;
* ``POST /api/deepfake/analyze`` of a realistic 1024x1024 JPEG on the real service
  (``python/api_server.py``, production mode) directly vs through the gateway.

The throughput, transfer and launch figures use ``bench/backend.py`` (Flask on waitress, like the
service in production, but with cheap routes) as the child, so they measure the gateway. The
gateway is started as shipped (``python -m tornado_gateway --mode production``: row "gateway")
and, when it has the ``--upstream`` setting, once more with each other upstream client (row
"gw simple" = ``--upstream simple``). On an older gateway without that setting, the second row
is "gateway+pool": ``tornado_gateway.pool.KeepAliveHTTPClient`` selected through
``AsyncHTTPClient.configure`` before ``main()``. Every process is on 127.0.0.1 with free ports,
every load run has a fixed duration, and every process started here is stopped by PID at the
end, also on error or Ctrl+C.
Results: a table on stdout and ``bench/results/latest.json``.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import io
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RESULTS_DIR = os.path.join(HERE, "results")
BACKEND = os.path.join(HERE, "backend.py")
FLOOR = os.path.join(HERE, "tornado_floor.py")
SERVICE = os.path.join(ROOT, "python", "api_server.py")
PY = sys.executable
HOST = "127.0.0.1"
GIB = 1024 ** 3
MIB = 1024 ** 2
POOL_CLASS = "tornado_gateway.pool.KeepAliveHTTPClient"

# Starts the gateway's own command line after selecting an AsyncHTTPClient implementation,
# which configure_http_client() keeps (see tornado_gateway/proxy.py).
CLIENT_BOOT = ("import sys\n"
               "from tornado.httpclient import AsyncHTTPClient\n"
               "AsyncHTTPClient.configure(sys.argv[1])\n"
               "from tornado_gateway.__main__ import main\n"
               "sys.exit(main(sys.argv[2:]))\n")

PROFILES = {
    # duration: seconds per load run; repeats: pairs per load row; big_repeats: 1 GiB pairs per
    # direction; launches: launch/Ctrl+C trials per gateway; analyze: requests per target
    "quick": dict(duration=2, repeats=3, big_repeats=1, launches=3, analyze=5, warmup=1),
    "full": dict(duration=5, repeats=5, big_repeats=3, launches=5, analyze=11, warmup=2),
}

TARGETS = {
    "tiny_32_ratio": 0.9,   # gateway >= 0.9x direct requests/s at 32 connections
    "tiny_1_ratio": 0.7,    # gateway >= 0.7x direct requests/s at 1 connection
    "peak_rss_mb": 64.0,    # gateway peak RSS < 64 MB during 1 GiB each way
    "ready_gap_ms": 100.0,  # gateway ready <= 100 ms after the child can answer
    "sigint_exit_ms": 1000.0,  # Ctrl+C to exit < 1 s
}


# ============================================================================ small helpers

def log(msg: str) -> None:
    print("[bench %s] %s" % (time.strftime("%H:%M:%S"), msg), file=sys.stderr, flush=True)


def slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name)


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def spread(values: Sequence[float]) -> Optional[Dict[str, float]]:
    """min / median / max (and n) of ``values``; None when empty."""
    vals = [float(v) for v in values if v is not None]
    if not vals:
        return None
    return {"min": min(vals), "median": statistics.median(vals), "max": max(vals), "n": len(vals)}


def fmt_spread(s: Optional[Dict[str, float]], fmt: str = "%.0f") -> str:
    if not s:
        return "-"
    return "%s (%s..%s)" % (fmt % s["median"], fmt % s["min"], fmt % s["max"])


def _num(v: Optional[float], fmt: str = "%.0f") -> str:
    return "-" if v is None else fmt % v


def cpu_seconds(pids: Dict[str, Optional[int]]) -> Dict[str, float]:
    """user + system CPU seconds used so far by each process."""
    import psutil

    out = {}
    for name, pid in pids.items():
        if pid is None:
            continue
        try:
            t = psutil.Process(pid).cpu_times()
            out[name] = t.user + t.system
        except psutil.Error:
            pass
    return out


def vm_hwm_kib(pid: int) -> Optional[int]:
    """The kernel's peak-RSS high-water mark of ``pid`` (Linux), in KiB."""
    try:
        with open("/proc/%d/status" % pid) as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


class RssSampler:
    """Samples the RSS of some PIDs every ``interval`` s in a thread; keeps each one's peak."""

    def __init__(self, pids: Dict[str, int], interval: float = 0.05) -> None:
        import psutil

        self._procs = {}
        for name, pid in pids.items():
            with contextlib.suppress(psutil.Error):
                self._procs[name] = psutil.Process(pid)
        self.interval = interval
        self.peak: Dict[str, int] = {name: 0 for name in self._procs}
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for name, proc in self._procs.items():
                try:
                    rss = proc.memory_info().rss
                except Exception:
                    continue
                if rss > self.peak[name]:
                    self.peak[name] = rss
            self.samples += 1
            self._stop.wait(self.interval)

    def __enter__(self) -> "RssSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(2)


# ============================================================================ processes

class Processes:
    """Every process this benchmark starts; all are ended by PID in ``cleanup()``."""

    def __init__(self, log_dir: str) -> None:
        self.log_dir = log_dir
        self.started: List[subprocess.Popen] = []
        # pid -> (pid of the process started here it was seen under, psutil.Process)
        self.descendants: Dict[int, Tuple[int, Any]] = {}
        self._logs: List[Any] = []

    def spawn(self, argv: List[str], name: str, env: Dict[str, str]) -> subprocess.Popen:
        logf = open(os.path.join(self.log_dir, "%s.log" % name), "ab")
        self._logs.append(logf)
        logf.write(("\n=== %s %s\n" % (datetime.datetime.now().isoformat(), " ".join(argv))).encode())
        logf.flush()
        proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=logf,
                                stderr=subprocess.STDOUT, start_new_session=True)
        self.started.append(proc)
        return proc

    def remember_children(self, proc: subprocess.Popen) -> List[Any]:
        import psutil

        try:
            kids = psutil.Process(proc.pid).children(recursive=True)
        except psutil.Error:
            return []
        for kid in kids:
            self.descendants[kid.pid] = (proc.pid, kid)
        return kids

    def stop(self, proc: subprocess.Popen, timeout: float = 8.0) -> Optional[int]:
        """SIGINT (the gateway's Ctrl+C), then SIGKILL after ``timeout``; then its remembered
        descendants by PID (only its own: other gateways' children keep running)."""
        self.remember_children(proc)
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGINT)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(5)
        self._reap_descendants(proc.pid)
        return proc.returncode

    def _reap_descendants(self, owner: Optional[int] = None) -> None:
        """Stop remembered descendants (of ``owner`` only, or all), by PID."""
        import psutil

        alive = []
        for pid, (seen_under, p) in list(self.descendants.items()):
            if owner is not None and seen_under != owner:
                continue
            try:
                if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                    alive.append(p)
                else:
                    del self.descendants[pid]
            except psutil.Error:
                del self.descendants[pid]
        if not alive:
            return
        for p in alive:
            with contextlib.suppress(psutil.Error):
                p.terminate()
        _gone, still = psutil.wait_procs(alive, timeout=3)
        for p in still:
            with contextlib.suppress(psutil.Error):
                p.kill()
        psutil.wait_procs(still, timeout=3)
        for p in alive:
            self.descendants.pop(p.pid, None)

    def cleanup(self) -> None:
        for proc in self.started:
            if proc.poll() is None:
                self.stop(proc, timeout=5)
        self._reap_descendants()
        for f in self._logs:
            with contextlib.suppress(Exception):
                f.close()


def clean_env(data_dir: str) -> Dict[str, str]:
    """Our environment without gateway/child settings (so the CLI flags alone decide)."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("GATEWAY_", "FLASK_", "DEEPFAKE_", "TORNADO_GATEWAY"))
           and k != "NODE_ENV"}
    env["DEEPFAKE_DATA_DIR"] = data_dir
    env["PYTHONUNBUFFERED"] = "1"
    return env


class Variant:
    """One way of starting the gateway."""

    def __init__(self, name: str, label: str, client: Optional[str] = None,
                 extra: Sequence[str] = ()) -> None:
        self.name = name      # "gateway" (as shipped), "gw simple", "gateway+pool", ...
        self.label = label    # human description
        self.client = client  # None: as shipped; else an AsyncHTTPClient class to select
        self.extra = list(extra)  # more gateway CLI options, e.g. ["--upstream", "simple"]

    def argv(self, gport: int, fport: int, script: str) -> List[str]:
        cli = ["--host", HOST, "--port", str(gport), "--flask-port", str(fport),
               "--flask-script", script, "--mode", "production"] + self.extra
        if self.client is None:
            return [PY, "-m", "tornado_gateway"] + cli
        return [PY, "-c", CLIENT_BOOT, self.client] + cli


class Gateway:
    """A running gateway and its child's port."""

    def __init__(self, procs: Processes, variant: Variant, script: str, env: Dict[str, str],
                 tag: str) -> None:
        self.variant = variant
        self.gport = free_port()
        self.fport = free_port()
        self.t_launch = time.monotonic()
        self.proc = procs.spawn(variant.argv(self.gport, self.fport, script),
                                "%s-%s" % (slug(variant.name), tag), env)
        self.procs = procs

    @property
    def pid(self) -> int:
        return self.proc.pid

    def child_pid(self) -> Optional[int]:
        kids = self.procs.remember_children(self.proc)
        return kids[0].pid if kids else None


class Reference:
    """``bench/tornado_floor.py``: a bare RequestHandler on the gateway's HTTP server
    answering the tiny GET itself."""

    name = "handler floor"

    def __init__(self, procs: Processes, env: Dict[str, str]) -> None:
        self.port = free_port()
        self.proc = procs.spawn([PY, FLOOR, "--host", HOST, "--port", str(self.port)],
                                "tornado-floor", env)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def child_pid(self) -> Optional[int]:
        return None

    def wait(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(Exception):
                if asyncio.run(http_get(self.port, "/api/deepfake/tiny", 1.0))[0] == 200:
                    return
            time.sleep(0.05)
        raise RuntimeError("bench/tornado_floor.py did not answer within %.0f s" % timeout)


# ============================================================================ HTTP clients

async def http_get(port: int, path: str, timeout: float) -> Tuple[int, bytes]:
    """One GET on a new connection (Connection: close): (status, body)."""
    async def go() -> Tuple[int, bytes]:
        reader, writer = await asyncio.open_connection(HOST, port)
        try:
            writer.write(("GET %s HTTP/1.1\r\nHost: %s:%d\r\nConnection: close\r\n\r\n"
                          % (path, HOST, port)).encode())
            data = await reader.read()
        finally:
            writer.close()
        head, _, body = data.partition(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1]) if head.startswith(b"HTTP/") else 0
        return status, body
    return await asyncio.wait_for(go(), timeout)


async def read_head(reader: asyncio.StreamReader) -> Tuple[int, Dict[str, str]]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            k, v = line.split(":", 1)
            headers[k.strip().lower()] = v.strip()
    return status, headers


async def upload(port: int, size: int, block: bytes) -> Dict[str, Any]:
    """POST ``size`` bytes to /api/deepfake/sink, streamed in ``block`` pieces."""
    t0 = time.monotonic()
    reader, writer = await asyncio.open_connection(HOST, port)
    try:
        writer.write(("POST /api/deepfake/sink HTTP/1.1\r\nHost: %s:%d\r\n"
                      "Content-Type: application/octet-stream\r\nContent-Length: %d\r\n"
                      "Connection: close\r\n\r\n" % (HOST, port, size)).encode())
        left = size
        while left > 0:
            piece = block if left >= len(block) else block[:left]
            writer.write(piece)
            await writer.drain()
            left -= len(piece)
        t_sent = time.monotonic()
        status, headers = await read_head(reader)
        body = await reader.read()
    finally:
        writer.close()
    t1 = time.monotonic()
    try:
        received = json.loads(body.decode()).get("received")
    except ValueError:
        received = None
    return {"status": status, "ok": status == 200 and received == size, "seconds": t1 - t0,
            "send_seconds": t_sent - t0, "received": received}


async def download(port: int, size: int) -> Dict[str, Any]:
    """GET /api/deepfake/download?size=N, reading and discarding the body."""
    t0 = time.monotonic()
    reader, writer = await asyncio.open_connection(HOST, port)
    got = 0
    try:
        writer.write(("GET /api/deepfake/download?size=%d HTTP/1.1\r\nHost: %s:%d\r\n"
                      "Connection: close\r\n\r\n" % (size, HOST, port)).encode())
        status, headers = await read_head(reader)
        t_head = time.monotonic()
        while True:
            chunk = await reader.read(1 << 20)
            if not chunk:
                break
            got += len(chunk)
    finally:
        writer.close()
    t1 = time.monotonic()
    chunked = headers.get("transfer-encoding", "").lower() == "chunked"
    return {"status": status, "ok": status == 200 and (got == size or chunked and got > size),
            "seconds": t1 - t0, "first_byte_seconds": t_head - t0, "bytes": got,
            "chunked": chunked}


# ============================================================================ load generators

_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m|h)", text.strip())
    if not m:
        raise ValueError(text)
    return float(m.group(1)) * _UNITS[m.group(2)]


def parse_wrk(out: str) -> Dict[str, Any]:
    res: Dict[str, Any] = {}
    m = re.search(r"Requests/sec:\s+([\d.]+)", out)
    res["rps"] = float(m.group(1)) if m else None
    for pct in ("50", "75", "90", "99"):
        m = re.search(r"^\s+%s%%\s+(\S+)" % pct, out, re.M)
        res["p%s_ms" % pct] = _ms(m.group(1)) if m else None
    m = re.search(r"(\d+) requests in ([\d.]+)(\w+)", out)
    res["requests"] = int(m.group(1)) if m else None
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    res["non_2xx"] = int(m.group(1)) if m else 0
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    res["socket_errors"] = sum(int(g) for g in m.groups()) if m else 0
    return res


def bounded_output(argv: List[str], timeout: float) -> str:
    """Run a load generator for at most ``timeout`` s; its stdout. Killed and reaped on any
    exit path (timeout, Ctrl+C)."""
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if proc.returncode != 0:
        raise RuntimeError("%s failed (%s): %s" % (argv[0], proc.returncode, err[-2000:]))
    return out


def run_wrk(port: int, path: str, conns: int, duration: int) -> Dict[str, Any]:
    threads = max(1, min(conns, 2))
    argv = ["wrk", "-t%d" % threads, "-c%d" % conns, "-d%ds" % duration, "--latency",
            "--timeout", "5s", "http://%s:%d%s" % (HOST, port, path)]
    out = bounded_output(argv, duration + 20)
    res = parse_wrk(out)
    if res["rps"] is None:
        raise RuntimeError("wrk output not understood:\n" + out)
    return res


async def _loadgen_worker(port: int, path: str, stop_at: float, lat: List[float],
                          errors: List[int]) -> None:
    req = ("GET %s HTTP/1.1\r\nHost: %s:%d\r\n\r\n" % (path, HOST, port)).encode()
    reader, writer = await asyncio.open_connection(HOST, port)
    try:
        while time.monotonic() < stop_at:
            t = time.perf_counter()
            writer.write(req)
            status, headers = await read_head(reader)
            await reader.readexactly(int(headers.get("content-length", "0")))
            lat.append((time.perf_counter() - t) * 1000.0)
            if status != 200:
                errors[0] += 1
    except (OSError, asyncio.IncompleteReadError):
        errors[0] += 1
    finally:
        writer.close()


async def _loadgen(port: int, path: str, conns: int, duration: float) -> Dict[str, Any]:
    lat: List[float] = []
    errors = [0]
    start = time.monotonic()
    await asyncio.wait_for(asyncio.gather(*(
        _loadgen_worker(port, path, start + duration, lat, errors) for _ in range(conns))),
        duration + 15)
    elapsed = time.monotonic() - start
    lat.sort()

    def pct(p: float) -> Optional[float]:
        return lat[min(len(lat) - 1, int(p / 100.0 * len(lat)))] if lat else None
    return {"rps": len(lat) / elapsed, "requests": len(lat), "p50_ms": pct(50),
            "p75_ms": pct(75), "p90_ms": pct(90), "p99_ms": pct(99), "non_2xx": errors[0],
            "socket_errors": 0}


def run_asyncio_load(port: int, path: str, conns: int, duration: int) -> Dict[str, Any]:
    """The fallback load generator, in its own process (not this process's event loop)."""
    argv = [PY, os.path.abspath(__file__), "--_loadgen", str(port), path, str(conns),
            str(duration)]
    return json.loads(bounded_output(argv, duration + 30))


# ============================================================================ phases

async def probe_launch(gw: Gateway, timeout: float = 30.0) -> Dict[str, Any]:
    """Poll the child's and the gateway's /api/deepfake/stats (and the gateway's own status
    endpoint) every 5 ms from launch; the time of each first 200, in ms after launch."""
    t0 = gw.t_launch
    first: Dict[str, Optional[float]] = {"child": None, "gateway": None, "gateway_listening": None}
    deadline = t0 + timeout

    async def poll(key: str, port: int, path: str) -> None:
        while time.monotonic() < deadline and gw.proc.poll() is None:
            try:
                status, _ = await http_get(port, path, timeout=max(0.1, deadline - time.monotonic()))
                if status == 200:
                    first[key] = (time.monotonic() - t0) * 1000.0
                    return
            except (OSError, asyncio.TimeoutError, ValueError, IndexError):
                pass
            await asyncio.sleep(0.005)

    await asyncio.gather(poll("child", gw.fport, "/api/deepfake/stats"),
                         poll("gateway", gw.gport, "/api/deepfake/stats"),
                         poll("gateway_listening", gw.gport, "/api/gateway/status"))
    res: Dict[str, Any] = {"child_ms": first["child"], "gateway_ms": first["gateway"],
                           "gateway_listening_ms": first["gateway_listening"]}
    if first["child"] is not None and first["gateway"] is not None:
        res["gap_ms"] = first["gateway"] - first["child"]
    return res


def sigint_exit(procs: Processes, gw: Gateway) -> Dict[str, Any]:
    """SIGINT the gateway; ms until it exits, its exit code, and whether its child is gone."""
    import psutil

    kids = procs.remember_children(gw.proc)
    t = time.monotonic()
    os.kill(gw.pid, signal.SIGINT)
    try:
        gw.proc.wait(15)
        ms = (time.monotonic() - t) * 1000.0
    except subprocess.TimeoutExpired:
        ms = None
    child_alive = False
    for k in kids:
        with contextlib.suppress(psutil.Error):
            if k.is_running() and k.status() != psutil.STATUS_ZOMBIE:
                child_alive = True
    return {"exit_ms": ms, "returncode": gw.proc.returncode, "child_left_running": child_alive}


def launch_trials(procs: Processes, variants: List[Variant], env: Dict[str, str],
                  n: int) -> Dict[str, List[Dict[str, Any]]]:
    out: Dict[str, List[Dict[str, Any]]] = {v.name: [] for v in variants}
    for i in range(n):
        for v in variants:
            gw = Gateway(procs, v, BACKEND, env, "launch")
            try:
                res = asyncio.run(probe_launch(gw))
                if res.get("gateway_ms") is None:
                    raise RuntimeError("%s never answered a proxied request (see %s)"
                                       % (v.name, procs.log_dir))
                time.sleep(0.1)  # let it settle (health monitor started) before Ctrl+C
                res.update(sigint_exit(procs, gw))
            finally:
                procs.stop(gw.proc)
            out[v.name].append(res)
            log("launch %d/%d %-13s child %.0f ms, gateway %.0f ms (gap %+.0f ms), "
                "Ctrl+C->exit %s ms" % (i + 1, n, v.name, res["child_ms"] or -1,
                                         res["gateway_ms"], res.get("gap_ms") or 0,
                                         "%.0f" % res["exit_ms"] if res["exit_ms"] else "?"))
    return out


def wait_ready(gw: Gateway, timeout: float = 60.0) -> Dict[str, Any]:
    res = asyncio.run(probe_launch(gw, timeout))
    if res.get("gateway_ms") is None:
        raise RuntimeError("gateway %s did not become ready (log in bench/results/logs)"
                           % gw.variant.name)
    return res


def upstream_connections(gw: Gateway) -> Optional[int]:
    """Established TCP connections from the gateway to its child (kept-alive upstream)."""
    import psutil

    try:
        conns = psutil.Process(gw.pid).net_connections(kind="tcp")
    except (psutil.Error, AttributeError):
        try:
            conns = psutil.Process(gw.pid).connections(kind="tcp")
        except psutil.Error:
            return None
    return sum(1 for c in conns if c.raddr and c.raddr.port == gw.fport
               and c.status == psutil.CONN_ESTABLISHED)


def rotation(items: List[Any], r: int) -> List[Any]:
    """``items`` rotated by ``r``: repeat r of direct, gateway, gateway+pool starts elsewhere,
    so no target always runs first (right after a phase change) or last."""
    k = r % len(items)
    return items[k:] + items[:k]


def throughput(gateways: List[Gateway], conns_list: List[int], repeats: int, duration: int,
               loader: Callable[..., Dict[str, Any]],
               reference: Optional[Reference] = None) -> Dict[str, Any]:
    """Interleaved: each repeat runs direct (the first gateway's child), each gateway (and the
    bare-handler reference), in a rotating order; each gateway's ratio is against the direct
    run of the same repeat."""
    path = "/api/deepfake/tiny"
    base = gateways[0]
    targets: List[Tuple[str, int, Any]] = [("direct", base.fport, base)] + [
        (gw.variant.name, gw.gport, gw) for gw in gateways]
    if reference is not None:
        targets.append((reference.name, reference.port, reference))
    out: Dict[str, Any] = {}
    for conns in conns_list:
        rows: Dict[str, List[Dict[str, Any]]] = {name: [] for name, _, _ in targets}
        ratios: Dict[str, List[float]] = {}
        for r in range(repeats):
            got: Dict[str, Dict[str, Any]] = {}
            for name, port, owner in rotation(targets, r):
                # CPU seconds the gateway and its child spent during the run, per request:
                # less sensitive to the machine's other load than requests/s
                pids = {"gateway": owner.pid, "child": owner.child_pid()}
                before = cpu_seconds(pids)
                res = loader(port, path, conns, duration)
                after = cpu_seconds(pids)
                if res.get("requests"):
                    for k in after:
                        if k in before:
                            res["%s_cpu_us_per_req" % k] = \
                                (after[k] - before[k]) / res["requests"] * 1e6
                res["repeat"] = r
                got[name] = res
                rows[name].append(res)
            d = got["direct"]
            line = "tiny GET c=%-2d rep %d/%d  direct %6.0f rps" % (conns, r + 1, repeats, d["rps"])
            for gw in gateways:
                g = got[gw.variant.name]
                ratio = g["rps"] / d["rps"] if d["rps"] else None
                ratios.setdefault(gw.variant.name, []).append(ratio)
                line += "  %s %6.0f (%.2fx)" % (gw.variant.name, g["rps"], ratio or 0)
            log(line)
        out[str(conns)] = {"runs": rows, "ratios": ratios}
    return out


def one_transfer(direction: str, port: int, size: int, block: bytes,
                 pids: Dict[str, int]) -> Dict[str, Any]:
    with RssSampler(pids) as sampler:
        coro = upload(port, size, block) if direction == "upload" else download(port, size)
        try:
            res = asyncio.run(asyncio.wait_for(coro, 300))
        except Exception as exc:  # keep going; record the failure
            res = {"ok": False, "seconds": None, "error": repr(exc)}
    for name, peak in sampler.peak.items():
        res["%s_peak_rss_mb" % name] = peak / MIB
    res["rss_samples"] = sampler.samples
    return res


def big_transfers(gateways: List[Gateway], size: int, repeats: int) -> Dict[str, Any]:
    """1 GiB up and down: direct (the first gateway's child) and each gateway, in a rotating
    order per repeat; the peak RSS of the gateway under test is sampled every 50 ms."""
    block = b"\xa5" * MIB
    base = gateways[0]
    targets: List[Tuple[str, int, Optional[Gateway]]] = [("direct", base.fport, None)] + [
        (gw.variant.name, gw.gport, gw) for gw in gateways]
    out: Dict[str, Any] = {}
    for direction in ("upload", "download"):
        rows: Dict[str, List[Dict[str, Any]]] = {name: [] for name, _, _ in targets}
        ratios: Dict[str, List[float]] = {}
        for r in range(repeats):
            got: Dict[str, Dict[str, Any]] = {}
            for name, port, gw in rotation(targets, r):
                owner = gw or base
                pids = {"gateway": owner.pid}
                child = owner.child_pid()
                if child:
                    pids["child"] = child
                res = one_transfer(direction, port, size, block, pids)
                hwm = vm_hwm_kib(owner.pid)
                res["gateway_vmhwm_mb"] = hwm / 1024.0 if hwm else None
                res["repeat"] = r
                rows[name].append(res)
                got[name] = res
                log("%-8s rep %d/%d %-13s %s %6.2f s  gateway peak RSS %.1f MB, child %.1f MB"
                    % (direction, r + 1, repeats, name, "ok " if res.get("ok") else "BAD",
                       res["seconds"] or -1, res.get("gateway_peak_rss_mb", 0),
                       res.get("child_peak_rss_mb", 0)))
            d = got["direct"]
            for gw in gateways:
                g = got[gw.variant.name]
                if d.get("ok") and g.get("ok"):
                    ratios.setdefault(gw.variant.name, []).append(g["seconds"] / d["seconds"])
        out[direction] = {"runs": rows, "time_ratios": ratios}
    return out


def make_jpeg(side: int = 1024) -> Tuple[bytes, str]:
    """A realistic photo as JPEG: skimage's astronaut photo resized to side x side."""
    from PIL import Image

    try:
        from skimage import data as skdata

        img = Image.fromarray(skdata.astronaut()).convert("RGB")
        source = "skimage.data.astronaut (512x512 photo) resized with Lanczos"
    except Exception:  # synthetic, photo-like: smooth gradients plus sensor-like noise
        import numpy as np

        rng = np.random.default_rng(1)
        y, x = np.mgrid[0:side, 0:side] / side
        base = np.stack([128 + 100 * np.sin(6 * x + 2 * y), 128 + 90 * np.cos(5 * y),
                         128 + 80 * np.sin(4 * (x + y))], -1)
        base += rng.normal(0, 12, base.shape)
        img = Image.fromarray(np.clip(base, 0, 255).astype("uint8"))
        source = "synthetic gradients + noise"
    img = img.resize((side, side), Image.LANCZOS)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    return buf.getvalue(), source


def analyze_once(port: int, body: bytes, content_type: str) -> Dict[str, Any]:
    import http.client

    t = time.perf_counter()
    conn = http.client.HTTPConnection(HOST, port, timeout=60)
    try:
        conn.request("POST", "/api/deepfake/analyze", body=body,
                     headers={"Content-Type": content_type})
        resp = conn.getresponse()
        data = resp.read()
    finally:
        conn.close()
    ms = (time.perf_counter() - t) * 1000.0
    ok = resp.status == 200
    service_ms = None
    if ok:
        with contextlib.suppress(ValueError):
            service_ms = json.loads(data).get("elapsed_ms")
    return {"status": resp.status, "ok": ok, "ms": ms, "service_ms": service_ms}


def analyze_phase(procs: Processes, variants: List[Variant], env: Dict[str, str],
                  runs: int) -> Dict[str, Any]:
    jpeg, source = make_jpeg()
    boundary = "benchboundary7d1f"
    body = (("--%s\r\nContent-Disposition: form-data; name=\"file\"; filename=\"photo.jpg\"\r\n"
             "Content-Type: image/jpeg\r\n\r\n" % boundary).encode() + jpeg
            + ("\r\n--%s--\r\n" % boundary).encode())
    ctype = "multipart/form-data; boundary=%s" % boundary
    out: Dict[str, Any] = {"image": {"source": source, "width": 1024, "height": 1024,
                                     "jpeg_bytes": len(jpeg), "request_bytes": len(body)},
                           "runs": {"direct": []}, "ratios": {}, "overhead_ms": {},
                           "service_launch": {}}
    gws: List[Gateway] = []
    try:
        for v in variants:  # one after the other, so the launches do not compete
            gw = Gateway(procs, v, SERVICE, env, "service")
            gws.append(gw)
            ready = wait_ready(gw, 90)
            out["service_launch"][v.name] = ready
            log("real service under %-13s child answers %.0f ms, gateway proxies %.0f ms "
                "after launch" % (v.name, ready["child_ms"] or -1, ready["gateway_ms"]))
            for port in (gw.fport, gw.gport):  # warm-up (first request imports, caches)
                analyze_once(port, body, ctype)
        for i in range(runs):
            for gw in gws:
                d = analyze_once(gw.fport, body, ctype)
                g = analyze_once(gw.gport, body, ctype)
                d["child_of"] = gw.variant.name
                out["runs"]["direct"].append(d)
                out["runs"].setdefault(gw.variant.name, []).append(g)
                if d["ok"] and g["ok"]:
                    out["ratios"].setdefault(gw.variant.name, []).append(g["ms"] / d["ms"])
                    out["overhead_ms"].setdefault(gw.variant.name, []).append(g["ms"] - d["ms"])
        log("analyze: %d runs done" % runs)
        for gw in gws:
            out["service_launch"][gw.variant.name].update(sigint_exit(procs, gw))
    finally:
        for gw in gws:
            procs.stop(gw.proc)
    return out


# ============================================================================ report

def summarize(raw: Dict[str, Any], names: List[str]) -> Dict[str, Any]:
    s: Dict[str, Any] = {"tiny_get": {}, "transfers": {}, "launch": {}, "analyze": {}}
    for conns, block in raw.get("tiny_get", {}).items():
        row = {}
        for target, runs in block["runs"].items():
            row[target] = {"rps": spread([r["rps"] for r in runs]),
                           "p50_ms": spread([r["p50_ms"] for r in runs]),
                           "p99_ms": spread([r["p99_ms"] for r in runs]),
                           "gateway_cpu_us_per_req": spread([r.get("gateway_cpu_us_per_req")
                                                             for r in runs]),
                           "child_cpu_us_per_req": spread([r.get("child_cpu_us_per_req")
                                                           for r in runs]),
                           "errors": sum((r.get("non_2xx") or 0) + (r.get("socket_errors") or 0)
                                         for r in runs)}
        for target, ratios in block["ratios"].items():
            row[target]["rps_ratio"] = spread(ratios)
        floor, direct = row.get(Reference.name), row.get("direct")
        if conns == "1" and floor and direct and floor["rps"] and direct["rps"]:
            # serial at one connection: time(gateway) >= time(direct) + time(bare handler)
            t_direct, t_floor = 1.0 / direct["rps"]["median"], 1.0 / floor["rps"]["median"]
            floor["gateway_ratio_ceiling"] = t_direct / (t_direct + t_floor)
        s["tiny_get"][conns] = row
    for direction, block in raw.get("transfers", {}).items():
        row = {}
        for target, runs in block["runs"].items():
            good = [r for r in runs if r.get("ok")]
            row[target] = {"seconds": spread([r["seconds"] for r in good]),
                           "mib_per_s": spread([raw["size"] / MIB / r["seconds"] for r in good]),
                           "gateway_peak_rss_mb": spread([r.get("gateway_peak_rss_mb") for r in runs]),
                           "child_peak_rss_mb": spread([r.get("child_peak_rss_mb") for r in runs]),
                           "gateway_vmhwm_mb": spread([r["gateway_vmhwm_mb"] for r in runs
                                                       if r.get("gateway_vmhwm_mb")]),
                           "failures": len(runs) - len(good)}
        for target, ratios in block["time_ratios"].items():
            row[target]["time_ratio"] = spread(ratios)
        s["transfers"][direction] = row
    launch_names = set(raw.get("launch", {})) | set(raw.get("load_gateway_launch", {}))
    for name in [n for n in names if n in launch_names]:
        trials = [dict(t, trial="dedicated") for t in raw.get("launch", {}).get(name, [])]
        extra = raw.get("load_gateway_launch", {}).get(name)
        if extra is not None:  # the load gateway: launched like the others, Ctrl+C after load
            extra = dict(extra)
            extra.update(raw.get("stop_after_load", {}).get(name) or
                         {"exit_ms": None, "returncode": None, "child_left_running": False})
            trials.append(extra)
        s["launch"][name] = {
            "trials": len(trials),
            "child_ready_ms": spread([t["child_ms"] for t in trials]),
            "gateway_listening_ms": spread([t["gateway_listening_ms"] for t in trials]),
            "gateway_ready_ms": spread([t["gateway_ms"] for t in trials]),
            "gap_ms": spread([t.get("gap_ms") for t in trials]),
            "sigint_exit_ms": spread([t["exit_ms"] for t in trials]),
            "nonzero_exits": sum(1 for t in trials if t["returncode"] not in (0, None)),
            "child_left_running": sum(1 for t in trials if t["child_left_running"]),
        }
    for name, stops in raw.get("stop_after_load", {}).items():
        s["launch"].setdefault(name, {})["sigint_exit_after_load_ms"] = stops.get("exit_ms")
    an = raw.get("analyze")
    if an:
        for target, runs in an["runs"].items():
            good = [r for r in runs if r["ok"]]
            s["analyze"][target] = {
                "ms": spread([r["ms"] for r in good]),
                "service_ms": spread([r["service_ms"] for r in good]),
                # what the request cost beyond the service's own handler time: transport,
                # waitress, Flask, and the gateway when there is one (robust to model noise)
                "outside_handler_ms": spread([r["ms"] - r["service_ms"] for r in good
                                              if r["service_ms"] is not None]),
                "failures": len(runs) - len(good)}
        for target, ratios in an["ratios"].items():
            s["analyze"][target]["ratio"] = spread(ratios)
            s["analyze"][target]["overhead_ms"] = spread(an["overhead_ms"][target])
    return s


def check_targets(s: Dict[str, Any], names: List[str]) -> Dict[str, Dict[str, Any]]:
    res: Dict[str, Dict[str, Any]] = {}
    for name in names:
        t: Dict[str, Any] = {}

        def put(key: str, value: Optional[float], ok: Optional[bool], goal: str) -> None:
            t[key] = {"value": value, "met": ok, "goal": goal}

        for conns, key, goal in (("32", "tiny_32_ratio", ">= %.1fx direct req/s at 32 conns (median)"),
                                 ("1", "tiny_1_ratio", ">= %.1fx direct req/s at 1 conn (median)")):
            r = s["tiny_get"].get(conns, {}).get(name, {}).get("rps_ratio")
            v = r["median"] if r else None
            put(key, v, None if v is None else v >= TARGETS[key], goal % TARGETS[key])
        peaks = []
        for direction in ("upload", "download"):
            row = s["transfers"].get(direction, {}).get(name)
            if row and row["gateway_peak_rss_mb"]:
                peaks.append(row["gateway_peak_rss_mb"]["max"])
            if row and row.get("gateway_vmhwm_mb"):
                peaks.append(row["gateway_vmhwm_mb"]["max"])
        v = max(peaks) if peaks else None
        put("peak_rss_mb", v, None if v is None else v < TARGETS["peak_rss_mb"],
            "< %.0f MB gateway peak RSS, 1 GiB each way (max)" % TARGETS["peak_rss_mb"])
        la = s["launch"].get(name, {})
        g = la.get("gap_ms")
        v = g["max"] if g else None
        put("ready_gap_ms", v, None if v is None else v <= TARGETS["ready_gap_ms"],
            "gateway ready <= %.0f ms after the child answers (max)"
            % TARGETS["ready_gap_ms"])
        e = la.get("sigint_exit_ms")
        v = e["max"] if e else None
        put("sigint_exit_ms", v, None if v is None else v < TARGETS["sigint_exit_ms"],
            "Ctrl+C to exit < %.0f ms (max)" % TARGETS["sigint_exit_ms"])
        res[name] = t
    return res


def print_report(result: Dict[str, Any]) -> None:
    s = result["summary"]
    names = result["gateways"]
    w = sys.stdout.write
    env = result["environment"]
    w("\n=== tornado_gateway benchmark (%s, %s; %d CPUs; load %s; %s) ===\n"
      % (result["profile"], result["started_utc"], env["cpus"],
         " ".join("%.2f" % x for x in env["loadavg_before"]), result["load_generator"]))
    if env.get("git"):
        w("code: commit %s%s\n" % (env["git"], "; uncommitted changes in: " + ", ".join(
            x[3:] for x in env.get("uncommitted", [])) if env.get("uncommitted") else ""))
    w("figures: median (min..max) over repeats; ratio = gateway / direct of the same repeat "
      "(direct and gateways interleaved, order rotating)\n")
    for name in names:
        w("  %-13s %s\n" % (name, result["variants"][name]))

    w("\n-- tiny GET /api/deepfake/tiny, %d s per run, %d repeats --\n"
      % (result["params"]["duration"], result["params"]["repeats"]))
    kept = result.get("upstream_keepalive_after_warmup")
    if kept:
        w("gateway->child connections left open after the warm-up (keep-alive): %s\n"
          % ", ".join("%s %s" % kv for kv in kept.items()))
    w("%-6s %-13s %-20s %-20s %-23s %-18s %-15s %-15s %s\n" % (
        "conns", "target", "requests/s", "p50 ms", "p99 ms", "ratio vs direct",
        "gw CPU us/req", "child CPU us/req", "errors"))
    for conns, row in s["tiny_get"].items():
        for target in ["direct"] + names + [Reference.name]:
            if target not in row:
                continue
            r = row[target]
            gcpu, ccpu = r["gateway_cpu_us_per_req"], r["child_cpu_us_per_req"]
            w("%-6s %-13s %-20s %-20s %-23s %-18s %-15s %-15s %d\n" % (
                conns, target, fmt_spread(r["rps"]), fmt_spread(r["p50_ms"], "%.2f"),
                fmt_spread(r["p99_ms"], "%.1f"), fmt_spread(r.get("rps_ratio"), "%.2f"),
                "%.0f" % gcpu["median"] if gcpu and target != "direct" else "-",
                "%.0f" % ccpu["median"] if ccpu else "-", r["errors"]))
    for conns, row in s["tiny_get"].items():
        ceiling = row.get(Reference.name, {}).get("gateway_ratio_ceiling")
        if ceiling is not None:
            w("c=%s: a request through a gateway on this server and RequestHandler takes at "
              "least the direct time plus the bare handler's (%s): at most %.2fx direct\n"
              % (conns, Reference.name, ceiling))

    if s["transfers"]:
        w("\n-- %.0f MiB streamed each way, %d repeats --\n"
          % (result["size"] / MIB, result["params"]["big_repeats"]))
        w("%-9s %-13s %-20s %-16s %-20s %-14s %-20s %s\n" % (
            "direction", "target", "seconds", "MiB/s", "time ratio", "gw peak RSS",
            "gw VmHWM MB", "child peak RSS"))
        for direction, row in s["transfers"].items():
            for target in ["direct"] + names:
                if target not in row:
                    continue
                r = row[target]
                peak, hwm, child = (r["gateway_peak_rss_mb"], r["gateway_vmhwm_mb"],
                                    r["child_peak_rss_mb"])
                gw_cols = ("%.1f MB" % peak["max"] if peak else "-",
                           fmt_spread(hwm, "%.1f")) if target != "direct" else (
                    "(idle %.0f)" % peak["max"] if peak else "-", "")
                w("%-9s %-13s %-20s %-16s %-20s %-14s %-20s %s%s\n" % (
                    direction, target, fmt_spread(r["seconds"], "%.2f"),
                    fmt_spread(r["mib_per_s"]), fmt_spread(r.get("time_ratio"), "%.2f"),
                    gw_cols[0], gw_cols[1], "%.0f MB" % child["max"] if child else "-",
                    "  FAILED x%d" % r["failures"] if r["failures"] else ""))

    if s["launch"]:
        w("\n-- launch and Ctrl+C, ms after launch / after SIGINT (child = bench/backend.py; "
          "trials: dedicated launches + the load gateway, whose Ctrl+C comes after all the "
          "load) --\n")
        w("%-17s %-20s %-20s %-20s %-18s %-18s %s\n" % (
            "gateway (n)", "gw listening", "child answers", "gw proxies (ready)", "gap gw-child",
            "SIGINT->exit", "after load"))
        for name in names:
            la = s["launch"].get(name)
            if not la:
                continue
            w("%-17s %-20s %-20s %-20s %-18s %-18s %s\n" % (
                "%s (%d)" % (name, la.get("trials", 0)), fmt_spread(la.get("gateway_listening_ms")),
                fmt_spread(la.get("child_ready_ms")), fmt_spread(la.get("gateway_ready_ms")),
                fmt_spread(la.get("gap_ms")), fmt_spread(la.get("sigint_exit_ms")),
                "%.0f" % la["sigint_exit_after_load_ms"]
                if la.get("sigint_exit_after_load_ms") else "-"))
            if la.get("nonzero_exits") or la.get("child_left_running"):
                w("  !! %d non-zero exits, %d children left running\n"
                  % (la.get("nonzero_exits", 0), la.get("child_left_running", 0)))

    if s["analyze"]:
        img = result["analyze"]["image"]
        w("\n-- POST /api/deepfake/analyze, real service (production), %dx%d JPEG %d KB (%s), "
          "%d runs --\n" % (img["width"], img["height"], img["jpeg_bytes"] // 1024,
                            img["source"], result["params"]["analyze"]))
        w("%-13s %-22s %-22s %-22s %-22s %s\n" % (
            "target", "latency ms", "service's own ms", "outside handler ms",
            "ratio vs direct", "gw - direct ms"))
        for target in ["direct"] + names:
            r = s["analyze"].get(target)
            if not r:
                continue
            w("%-13s %-22s %-22s %-22s %-22s %s\n" % (
                target, fmt_spread(r["ms"], "%.1f"), fmt_spread(r["service_ms"], "%.1f"),
                fmt_spread(r["outside_handler_ms"], "%.1f"), fmt_spread(r.get("ratio"), "%.3f"),
                fmt_spread(r.get("overhead_ms"), "%.1f")))
        for name, la in result["analyze"].get("service_launch", {}).items():
            w("%-13s launch with the real service: gateway listening %s ms, child answers %s "
              "ms, gateway proxies %s ms (gap %s ms); Ctrl+C -> exit %s ms\n" % (
                  name, _num(la.get("gateway_listening_ms")), _num(la.get("child_ms")),
                  _num(la.get("gateway_ms")), _num(la.get("gap_ms")), _num(la.get("exit_ms"))))

    w("\n-- targets --\n")
    for name, checks in result["targets"].items():
        for key, c in checks.items():
            mark = "n/a " if c["met"] is None else ("MET " if c["met"] else "MISS")
            v = c["value"]
            w("%-13s %s %-55s value %s\n" % (name, mark, c["goal"],
                                             "-" if v is None else "%.2f" % v))
    for note in result.get("notes", []):
        w("note: %s\n" % note)
    w("\nJSON: %s   (elapsed %.0f s)\n" % (result["json_path"], result["elapsed_s"]))


# ============================================================================ main

# The gateway's command line under cProfile, profiling only between SIGUSR1 (start) and SIGUSR2
# (stop and write the stats), so start-up and shutdown stay out of the figures.
PROFILE_BOOT = ("import cProfile, signal, sys\n"
                "from tornado.httpclient import AsyncHTTPClient\n"
                "if sys.argv[2] != '-':\n"
                "    AsyncHTTPClient.configure(sys.argv[2])\n"
                "prof = cProfile.Profile()\n"
                "def start(*_):\n"
                "    prof.enable()\n"
                "def stop(*_):\n"
                "    prof.disable()\n"
                "    prof.dump_stats(sys.argv[1])\n"
                "signal.signal(signal.SIGUSR1, start)\n"
                "signal.signal(signal.SIGUSR2, stop)\n"
                "from tornado_gateway.__main__ import main\n"
                "sys.exit(main(sys.argv[3:]))\n")


def _profile_group(filename: str, func: str) -> str:
    if filename == "~":
        if "select.epoll" in func:
            return "waiting in epoll (idle)"
        if "socket" in func:
            return "socket calls (send/recv/connect)"
        return "builtins"
    f = filename.replace(os.sep, "/")
    for part in ("tornado_gateway/", "tornado/", "asyncio/", "concurrent/"):
        if part in f:
            tail = f[f.index(part):]
            return tail if part == "tornado_gateway/" else part.rstrip("/")
    return "stdlib/other"


def profile_gateway(procs: Processes, variant: Variant, env: Dict[str, str], conns: int,
                    duration: int, loader: Callable[..., Dict[str, Any]], out_path: str,
                    top: int = 20) -> Dict[str, Any]:
    """Run ``variant`` under cProfile while the tiny GET load runs; the hottest functions."""
    import pstats

    gport, fport = free_port(), free_port()
    cli = ["--host", HOST, "--port", str(gport), "--flask-port", str(fport), "--flask-script",
           BACKEND, "--mode", "production"]
    proc = procs.spawn([PY, "-c", PROFILE_BOOT, out_path, variant.client or "-"] + cli
                       + variant.extra,
                       "profile-%s" % slug(variant.name), env)
    gw = Gateway.__new__(Gateway)  # the same probing as the benchmark
    gw.variant, gw.gport, gw.fport, gw.proc, gw.procs = variant, gport, fport, proc, procs
    gw.t_launch = time.monotonic()
    if os.path.exists(out_path):
        os.unlink(out_path)
    try:
        wait_ready(gw)
        loader(gport, "/api/deepfake/tiny", 8, 1)  # warm-up, not profiled
        before = cpu_seconds({"gateway": proc.pid})
        os.kill(proc.pid, signal.SIGUSR1)
        res = loader(gport, "/api/deepfake/tiny", conns, duration)
        os.kill(proc.pid, signal.SIGUSR2)
        after = cpu_seconds({"gateway": proc.pid})
        for _ in range(100):
            if os.path.exists(out_path):
                break
            time.sleep(0.05)
        time.sleep(0.2)
    finally:
        procs.stop(proc)
    stats = pstats.Stats(out_path)
    total = sum(v[2] for v in stats.stats.values())  # tottime  # type: ignore[attr-defined]
    groups: Dict[str, float] = {}
    rows = []
    for (filename, line, func), (cc, nc, tt, ct, _callers) in stats.stats.items():  # type: ignore[attr-defined]
        groups[_profile_group(filename, func)] = groups.get(
            _profile_group(filename, func), 0.0) + tt
        rows.append((tt, nc, ct, "%s:%d(%s)" % (filename.replace(ROOT + os.sep, "")
                                                 .split("site-packages" + os.sep)[-1], line, func)))
    rows.sort(reverse=True)
    busy = total - groups.get("waiting in epoll (idle)", 0.0)
    return {
        "variant": variant.name, "connections": conns, "duration_s": duration,
        "requests": res.get("requests"), "rps_under_profiler": res.get("rps"),
        "gateway_cpu_us_per_req_under_profiler":
            (after["gateway"] - before["gateway"]) / res["requests"] * 1e6
            if res.get("requests") and "gateway" in after and "gateway" in before else None,
        "profiled_seconds": total, "busy_fraction": busy / total if total else None,
        "groups_pct_of_busy": {k: 100.0 * v / busy for k, v in sorted(
            groups.items(), key=lambda kv: -kv[1]) if k != "waiting in epoll (idle)"} if busy else {},
        "top_self_time": [{"pct_of_busy": 100.0 * tt / busy if busy else None, "calls": nc,
                           "per_req_us": tt / res["requests"] * 1e6 if res.get("requests") else None,
                           "function": name} for tt, nc, ct, name in rows[:top]],
        "stats_file": out_path,
    }


def print_profile(prof: Dict[str, Any]) -> None:
    w = sys.stdout.write
    w("\n=== cProfile of %s under tiny GET at %d connections, %d s: %d requests "
      "(%.0f req/s under the profiler), gateway main thread busy %.0f%% of the time, "
      "%.0f us CPU per request ===\n" % (
          prof["variant"], prof["connections"], prof["duration_s"], prof["requests"] or 0,
          prof["rps_under_profiler"] or 0, 100 * (prof["busy_fraction"] or 0),
          prof["gateway_cpu_us_per_req_under_profiler"] or 0))
    w("self time by module (%% of busy time):\n")
    for k, v in prof["groups_pct_of_busy"].items():
        if v >= 0.5:
            w("  %5.1f%%  %s\n" % (v, k))
    w("hottest functions (self time):\n")
    for r in prof["top_self_time"]:
        w("  %5.1f%%  %6.1f us/req  %8d calls  %s\n" % (r["pct_of_busy"] or 0,
                                                     r["per_req_us"] or 0, r["calls"],
                                                     r["function"][:110]))
    w("stats: %s (python -m pstats)\n" % prof["stats_file"])


def detect_upstream() -> Dict[str, Any]:
    """The gateway's own upstream-client setting, if it has one: its CLI option, default and
    the AsyncHTTPClient class each choice configures (read from tornado_gateway itself)."""
    code = ("import json\n"
            "from tornado.httpclient import AsyncHTTPClient\n"
            "from tornado_gateway import config, server\n"
            "out = {}\n"
            "if 'upstream' in config.SETTINGS and hasattr(server, 'configure_upstream_client'):\n"
            "    out['option'] = config.SETTINGS['upstream'][1]\n"
            "    out['default'] = config.GatewayConfig().upstream\n"
            "    out['classes'] = {}\n"
            "    for choice in getattr(server, 'UPSTREAM_CLIENTS', {}):\n"
            "        server.configure_upstream_client(config.load_config({}, {'upstream': choice}))\n"
            "        c = AsyncHTTPClient.configured_class()\n"
            "        out['classes'][choice] = c.__module__ + '.' + c.__name__\n"
            "print(json.dumps(out))\n")
    out = subprocess.run([PY, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    try:
        return json.loads(out.stdout)
    except ValueError:
        return {}


def detect_client(preselect: Optional[str]) -> str:
    """The AsyncHTTPClient class the gateway's configure_http_client() leaves configured."""
    code = ("import sys\n"
            "from tornado.httpclient import AsyncHTTPClient\n"
            "if len(sys.argv) > 1: AsyncHTTPClient.configure(sys.argv[1])\n"
            "from tornado_gateway.config import load_config\n"
            "from tornado_gateway.proxy import configure_http_client\n"
            "configure_http_client(load_config({}))\n"
            "c = AsyncHTTPClient.configured_class()\n"
            "print(c.__module__ + '.' + c.__name__)\n")
    argv = [PY, "-c", code] + ([preselect] if preselect else [])
    out = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=60)
    if out.returncode != 0:
        return "error: " + (out.stderr.strip().splitlines() or ["?"])[-1]
    return out.stdout.strip()


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="short runs, < 2 minutes")
    parser.add_argument("--duration", type=int, help="seconds per load run")
    parser.add_argument("--repeats", type=int, help="interleaved repeats per tiny-GET row")
    parser.add_argument("--big-repeats", type=int, help="interleaved repeats per 1 GiB direction")
    parser.add_argument("--launches", type=int, help="launch/Ctrl+C trials per gateway")
    parser.add_argument("--analyze-runs", type=int, help="analyze requests per target")
    parser.add_argument("--size", default=str(GIB), help="bytes each way (default 1 GiB)")
    parser.add_argument("--connections", default="1,32")
    parser.add_argument("--load", choices=("auto", "wrk", "asyncio"), default="auto")
    parser.add_argument("--no-pool", action="store_true",
                        help="measure only the gateway as shipped (not its other upstream "
                             "client too)")
    parser.add_argument("--skip", default="",
                        help="comma list of phases to skip: launch,tiny,transfers,analyze")
    parser.add_argument("--json", default=os.path.join(RESULTS_DIR, "latest.json"))
    parser.add_argument("--profile", metavar="GATEWAY",
                        help="instead of the benchmark: run this gateway under cProfile during "
                             "a tiny-GET load at the highest --connections for --duration s "
                             "(default 5) and print where its time goes")
    parser.add_argument("--_loadgen", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args._loadgen:
        port, path, conns, duration = args._loadgen
        print(json.dumps(asyncio.run(_loadgen(int(port), path, int(conns), float(duration)))))
        return 0

    profile = "quick" if args.quick else "full"
    p = dict(PROFILES[profile])
    for key, val in (("duration", args.duration), ("repeats", args.repeats),
                     ("big_repeats", args.big_repeats), ("launches", args.launches),
                     ("analyze", args.analyze_runs)):
        if val is not None:
            p[key] = val
    size = int(args.size)
    conns_list = [int(c) for c in args.connections.split(",") if c.strip()]
    skip = {x.strip() for x in args.skip.split(",") if x.strip()}

    if args.load == "wrk" or (args.load == "auto" and shutil.which("wrk")):
        if not shutil.which("wrk"):
            parser.error("wrk is not installed (apt-get install wrk), use --load asyncio")
        loader, load_name = run_wrk, "wrk (%s)" % subprocess.run(
            ["wrk", "--version"], capture_output=True, text=True).stdout.split("[")[0].strip()
    else:
        loader, load_name = run_asyncio_load, "asyncio load generator (bench.py --_loadgen)"

    # Ctrl+C / SIGTERM of the benchmark: unwind through the finally below
    def on_term(_sig: int, _frame: Any) -> None:
        raise KeyboardInterrupt()
    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started with it ignored

    os.makedirs(RESULTS_DIR, exist_ok=True)
    log_dir = os.path.join(RESULTS_DIR, "logs")
    os.makedirs(log_dir, exist_ok=True)
    data_dir = tempfile.mkdtemp(prefix="bench-deepfake-data-")
    env = clean_env(data_dir)
    started = time.monotonic()
    started_utc = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    notes: List[str] = []

    upstream = detect_upstream()
    variants: List[Variant] = []
    if upstream.get("option"):
        # the gateway selects its upstream client itself: the default as shipped, and the
        # other choice(s) through its own option
        option, default = upstream["option"], upstream["default"]
        variants.append(Variant("gateway", "python -m tornado_gateway as shipped (default %s "
                                "%s: %s)" % (option, default, upstream["classes"].get(default)),
                                None))
        if not args.no_pool:
            for choice, cls in upstream["classes"].items():
                if choice != default:
                    variants.append(Variant("gw %s" % choice, "same with %s %s: %s"
                                            % (option, choice, cls), None, [option, choice]))
        shipped_client = upstream["classes"].get(default, "?")
    else:
        shipped_client = detect_client(None)
        variants.append(Variant("gateway", "python -m tornado_gateway as shipped (upstream "
                                "client: %s)" % shipped_client, None))
    if not args.no_pool and not upstream.get("option"):
        if shipped_client == POOL_CLASS:
            notes.append("the shipped gateway already uses %s; no second variant" % POOL_CLASS)
        else:
            pooled = detect_client(POOL_CLASS)
            if pooled == POOL_CLASS:
                variants.append(Variant(
                    "gateway+pool", "same, with AsyncHTTPClient.configure(%r) before main() "
                    "(not a shipped setting)" % POOL_CLASS, POOL_CLASS))
                notes.append("the gateway has no setting to select %s; 'gateway+pool' selects "
                             "it with AsyncHTTPClient.configure() before main() (what "
                             "configure_http_client() keeps)" % POOL_CLASS)
            else:
                notes.append("%s not usable (%s): measured only the shipped gateway"
                             % (POOL_CLASS, pooled))
    names = [v.name for v in variants]
    if args.profile:
        chosen = [v for v in variants if v.name == args.profile]
        if not chosen:
            parser.error("%s is not available here (see the notes: %s)" % (args.profile, notes))
        procs = Processes(log_dir)
        try:
            prof = profile_gateway(procs, chosen[0], env, max(conns_list),
                                   args.duration or 5, loader,
                                   os.path.join(RESULTS_DIR, "profile-%s.prof" % slug(args.profile)))
        finally:
            procs.cleanup()
            shutil.rmtree(data_dir, ignore_errors=True)
        prof["load_generator"] = load_name
        with open(os.path.join(RESULTS_DIR, "profile-%s.json" % slug(args.profile)),
                  "w") as f:
            json.dump(prof, f, indent=1)
        print_profile(prof)
        return 0
    log("profile %s, %s; gateways: %s" % (profile, load_name, ", ".join(names)))

    result: Dict[str, Any] = {
        "profile": profile, "started_utc": started_utc, "params": p, "size": size,
        "load_generator": load_name, "gateways": names,
        "variants": {v.name: v.label for v in variants},
        "environment": {"cpus": os.cpu_count(), "loadavg_before": list(os.getloadavg()),
                        "python": platform.python_version(), "platform": platform.platform()},
        "json_path": os.path.relpath(args.json, ROOT) if args.json.startswith(ROOT) else args.json,
    }
    with contextlib.suppress(Exception):
        import tornado
        result["environment"]["tornado"] = tornado.version
        result["environment"]["git"] = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
            text=True).stdout.strip()
        # the gateway is measured from the working tree: note uncommitted changes to it
        result["environment"]["uncommitted"] = subprocess.run(
            ["git", "status", "--porcelain", "--", "tornado_gateway", "python"], cwd=ROOT,
            capture_output=True, text=True).stdout.split("\n")[:-1]

    procs = Processes(log_dir)
    gateways: List[Gateway] = []
    raw: Dict[str, Any] = {"size": size}
    interrupted = False
    failure: Optional[str] = None
    try:
        load_phase = not {"tiny", "transfers"} <= skip
        if "launch" not in skip:
            # the long-lived load gateways' own launch and final Ctrl+C are trials too
            n = p["launches"] - (1 if load_phase else 0)
            log("launch / Ctrl+C trials (%d dedicated per gateway%s)"
                % (n, " + the load gateway's" if load_phase else ""))
            raw["launch"] = launch_trials(procs, variants, env, n)

        if load_phase:
            for v in variants:  # one after the other: launches do not compete
                gw = Gateway(procs, v, BACKEND, env, "load")
                gateways.append(gw)
                ready = wait_ready(gw)
                ready["trial"] = "load gateway"
                raw.setdefault("load_gateway_launch", {})[v.name] = ready
                log("load gateway %-13s child %.0f ms, gateway %.0f ms after launch"
                    % (v.name, ready["child_ms"] or -1, ready["gateway_ms"]))
            for gw in gateways:  # warm-up: imports, first connections, caches
                loader(gw.gport, "/api/deepfake/tiny", 8, p["warmup"])
                time.sleep(0.1)
                raw.setdefault("upstream_keepalive_after_warmup", {})[gw.variant.name] = \
                    upstream_connections(gw)
            log("established gateway->child connections after warm-up: %s"
                % raw["upstream_keepalive_after_warmup"])

        if "tiny" not in skip:
            reference = Reference(procs, env)
            reference.wait()
            loader(reference.port, "/api/deepfake/tiny", 8, p["warmup"])
            log("tiny GET: %s connections, %d s runs, %d repeats (and %s for reference)"
                % (conns_list, p["duration"], p["repeats"], Reference.name))
            raw["tiny_get"] = throughput(gateways, conns_list, p["repeats"], p["duration"],
                                         loader, reference)
            procs.stop(reference.proc)

        if "transfers" not in skip:
            log("%.0f MiB up and down, %d repeats" % (size / MIB, p["big_repeats"]))
            raw["transfers"] = big_transfers(gateways, size, p["big_repeats"])

        raw["stop_after_load"] = {}
        for gw in gateways:  # Ctrl+C after all the load: still fast?
            raw["stop_after_load"][gw.variant.name] = sigint_exit(procs, gw)

        if "analyze" not in skip:
            log("analyze on the real service, %d runs" % p["analyze"])
            raw["analyze"] = analyze_phase(procs, variants, env, p["analyze"])
    except KeyboardInterrupt:
        interrupted = True
        log("interrupted: stopping everything")
    except Exception as exc:  # report what was measured, then fail
        import traceback

        failure = "%s: %s" % (type(exc).__name__, exc)
        traceback.print_exc()
        log("failed: %s; stopping everything" % failure)
    finally:
        procs.cleanup()
        shutil.rmtree(data_dir, ignore_errors=True)

    result.update(raw)
    result["environment"]["loadavg_after"] = list(os.getloadavg())
    result["summary"] = summarize(raw, names)
    result["targets"] = check_targets(result["summary"], names)
    result["notes"] = notes + (["INTERRUPTED: partial results"] if interrupted else []) + (
        ["FAILED (%s): partial results" % failure] if failure else [])
    result["elapsed_s"] = time.monotonic() - started
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(result, f, indent=1, default=str)
    print_report(result)
    return 130 if interrupted else (1 if failure else 0)


if __name__ == "__main__":
    sys.exit(main())
