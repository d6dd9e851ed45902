#!/usr/bin/env python
"""Benchmark of the gateway: the Flask child directly vs the Tornado gateway in front of it.

    python bench/bench.py --quick      # ~4 minutes (the analyze section: 2.5 of them)
    python bench/bench.py              # full run (~15 minutes, the analyze section: 10)
    python bench/bench.py --quick --only analyze   # just the analyze section
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
* the analyze section: ``POST /api/deepfake/analyze`` of a realistic 1024x1024 JPEG (~260 KB)
  on the real service (``python/api_server.py``, production, each server with a fresh data
  directory), with keep-alive clients that each send one request after another for a fixed
  time after a warm-up (``--_postload``: every status, error and unanswered request counted):

  - phase ``analyze``: req/s, p50 and p99 at 1, 2, 4 and 8 clients of the service alone
    (``python python/api_server.py --env production``, row "direct"), the gateway with
    ``--workers 1`` and the gateway with its default workers in production (one per CPU),
    interleaved per repeat like the rest; the targets are ratios within the run (gateway vs
    direct at 1 client, gateway at 4 clients vs direct's best, 8 clients vs 2, p99 at 8
    clients vs (p50 at 1) x 8 / workers);
  - phase ``limits``: the default workers with each ``--worker-limit`` of ``--worker-limits``
    at 4 and 8 clients, to choose the per-worker in-flight limit by measurement;
  - phase ``overload``: 64 clients against the gateway with ``--queue-limit 16``, each sending
    its next request at once (Retry-After ignored): only 200 and 503 "overloaded" answers,
    every request answered, and the gateway's RSS (idle, peak, levelling off).

The throughput, transfer and launch figures use ``bench/backend.py`` (Flask on waitress, like the
service in production, but with cheap routes) as the child, so they measure the gateway. The
gateway is started as shipped (``python -m tornado_gateway --mode production``: row "gateway")
and, when it has the ``--upstream`` setting, once more with each other upstream client (row
"gw simple" = ``--upstream simple``), and, when it has the ``--loop`` setting and uvloop can
run here, once more on uvloop (row "gw uvloop" = ``--loop uvloop``; ``--no-uvloop`` leaves it
out). The tiny-GET table gives each row's CPU per request (gateway and child, psutil), and
each variant's gateway CPU per request against the shipped gateway's in the same repeat. On an
older gateway without the ``--upstream`` setting, the second row
is "gateway+pool": ``tornado_gateway.http.client.UpstreamHTTPClient`` selected through
``AsyncHTTPClient.configure`` before ``main()``. Every process is on 127.0.0.1 with free ports,
every load run has a fixed duration, and every process started here is stopped by PID at the
end, also on error or Ctrl+C. ``--only``/``--skip`` choose phases (launch, tiny, transfers,
analyze, limits, overload; "analyze" alone names the whole analyze section).
Results: a table on stdout and ``bench/results/latest.json``.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import errno
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
POOL_CLASS = "tornado_gateway.http.client.UpstreamHTTPClient"

# Starts the gateway's own command line after selecting an AsyncHTTPClient implementation,
# which configure_http_client() keeps (see tornado_gateway/proxy.py).
CLIENT_BOOT = ("import sys\n"
               "from tornado.httpclient import AsyncHTTPClient\n"
               "AsyncHTTPClient.configure(sys.argv[1])\n"
               "from tornado_gateway.__main__ import main\n"
               "sys.exit(main(sys.argv[2:]))\n")

PROFILES = {
    # duration: seconds per load run; repeats: pairs per load row; big_repeats: 1 GiB pairs per
    # direction; launches: launch/Ctrl+C trials per gateway; analyze_*: the analyze section's
    # seconds per load run, repeats, warm-up seconds before each run (same connections), and
    # seconds of the overload run
    "quick": dict(duration=2, repeats=3, big_repeats=1, launches=3, warmup=1,
                  analyze_duration=2, analyze_repeats=3, analyze_warmup=0.5,
                  overload_duration=5),
    "full": dict(duration=5, repeats=5, big_repeats=3, launches=5, warmup=2,
                 analyze_duration=5, analyze_repeats=5, analyze_warmup=1,
                 overload_duration=10),
}

TARGETS = {
    "tiny_32_ratio": 0.9,   # gateway >= 0.9x direct requests/s at 32 connections
    "tiny_1_ratio": 0.7,    # gateway >= 0.7x direct requests/s at 1 connection
    "peak_rss_mb": 64.0,    # gateway peak RSS < 64 MB during 1 GiB each way
    "ready_gap_ms": 100.0,  # gateway ready <= 100 ms after the child can answer
    "sigint_exit_ms": 1000.0,  # Ctrl+C to exit < 1 s
    # analyze, each a ratio within one run: gateway (default workers) vs the service alone at
    # 1 client; gateway at 4 clients vs the service alone's best at any client count; req/s at
    # 8 clients vs 2; p99 at 8 clients vs (p50 at 1 client) x 8 / workers
    "analyze_1_ratio": 0.95,
    "analyze_4_scaling": 1.7,
    "analyze_no_collapse": 1.0,
    "analyze_p99_factor": 3.0,
    # gateway RSS peak - idle under the overload < this x (clients x request size): holding
    # every client's whole upload at once would be 1x
    "overload_rss_uploads": 2.0,
    # and levelled off: the peak of the run's second half <= the first half's + this
    "overload_rss_creep_mb": 4.0,
}

PHASES = ("launch", "tiny", "transfers", "analyze", "limits", "overload")
# --only/--skip take these names too: the analyze section is three phases
SECTIONS = {"analyze": ("analyze", "limits", "overload")}
ANALYZE_CLIENTS = "1,2,4,8"
SWEEP_CLIENTS = (4, 8)  # the worker-limit sweep: as many clients as 2 workers x 2, and twice


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


def machine_busy_seconds() -> float:
    """CPU seconds every process of the machine has used so far (all cores; not idle, not
    waiting for I/O, not stolen by the hypervisor; guest time is inside user time already)."""
    import psutil

    t = psutil.cpu_times()
    return sum(t) - sum(getattr(t, k, 0.0) for k in ("idle", "iowait", "steal", "guest",
                                                      "guest_nice"))


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
    """Samples the RSS of some PIDs every ``interval`` s in a thread; keeps each one's peak
    (and with ``series``, every sample: (seconds since the start, {name: rss}))."""

    def __init__(self, pids: Dict[str, int], interval: float = 0.05,
                 series: bool = False) -> None:
        import psutil

        self._procs = {}
        for name, pid in pids.items():
            with contextlib.suppress(psutil.Error):
                self._procs[name] = psutil.Process(pid)
        self.interval = interval
        self.peak: Dict[str, int] = {name: 0 for name in self._procs}
        self.samples = 0
        self.series: Optional[List[Tuple[float, Dict[str, int]]]] = [] if series else None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def _run(self) -> None:
        t0 = time.monotonic()
        while not self._stop.is_set():
            sample = {}
            for name, proc in self._procs.items():
                try:
                    rss = proc.memory_info().rss
                except Exception:
                    continue
                sample[name] = rss
                if rss > self.peak[name]:
                    self.peak[name] = rss
            if self.series is not None:
                self.series.append((time.monotonic() - t0, sample))
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
        cpu_ratios: Dict[str, List[float]] = {}
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
            shipped_cpu = got[base.variant.name].get("gateway_cpu_us_per_req")
            for gw in gateways:
                g = got[gw.variant.name]
                ratio = g["rps"] / d["rps"] if d["rps"] else None
                ratios.setdefault(gw.variant.name, []).append(ratio)
                line += "  %s %6.0f (%.2fx)" % (gw.variant.name, g["rps"], ratio or 0)
                cpu = g.get("gateway_cpu_us_per_req")
                if gw is not base and cpu and shipped_cpu:
                    # the gateway's CPU per request vs the shipped gateway's, same repeat
                    cpu_ratios.setdefault(gw.variant.name, []).append(cpu / shipped_cpu)
                    line += " cpu %.2fx" % (cpu / shipped_cpu)
            log(line)
        out[str(conns)] = {"runs": rows, "ratios": ratios, "cpu_ratios": cpu_ratios}
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


def make_jpeg(side: int = 1024, quality: int = 95) -> Tuple[bytes, str]:
    """A realistic photo as JPEG: skimage's astronaut photo resized to side x side. The upscaled
    photo is smoother than a native one of that size, so it compresses better: quality 95 makes
    it ~260 KB, inside the 200-400 KB a 1024x1024 photo usually weighs (90: ~180 KB)."""
    from PIL import Image

    try:
        from skimage import data as skdata

        img = Image.fromarray(skdata.astronaut()).convert("RGB")
        source = "skimage.data.astronaut (512x512 photo) resized with Lanczos, quality %d" % quality
    except Exception:  # synthetic, photo-like: smooth gradients plus sensor-like noise
        import numpy as np

        rng = np.random.default_rng(1)
        y, x = np.mgrid[0:side, 0:side] / side
        base = np.stack([128 + 100 * np.sin(6 * x + 2 * y), 128 + 90 * np.cos(5 * y),
                         128 + 80 * np.sin(4 * (x + y))], -1)
        base += rng.normal(0, 12, base.shape)
        img = Image.fromarray(np.clip(base, 0, 255).astype("uint8"))
        source = "synthetic gradients + noise, quality %d" % quality
    img = img.resize((side, side), Image.LANCZOS)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return buf.getvalue(), source


def analyze_request(jpeg: bytes) -> Tuple[bytes, str]:
    """The multipart/form-data body of an upload of ``jpeg`` as the form field ``file``, and
    its Content-Type."""
    boundary = "benchboundary7d1f"
    body = (("--%s\r\nContent-Disposition: form-data; name=\"file\"; filename=\"photo.jpg\"\r\n"
             "Content-Type: image/jpeg\r\n\r\n" % boundary).encode() + jpeg
            + ("\r\n--%s--\r\n" % boundary).encode())
    return body, "multipart/form-data; boundary=%s" % boundary


def analyze_once(port: int, body: bytes, content_type: str) -> Dict[str, Any]:
    """One analyze on a new connection (http.client): status, latency, the service's own time."""
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


# ---------------------------------------------------------------- analyze load generator

class _Exchange(asyncio.Protocol):
    """One keep-alive client connection that keeps everything it receives. A gateway may answer
    before it has read the upload (503 overloaded, then it closes the connection): that answer
    must still count even when writing the rest of the body then fails, which asyncio's
    streams would turn into an exception before the buffered answer could be read."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.buf = bytearray()
        self.closed = False
        self.error: Optional[BaseException] = None
        self.transport: Any = None
        self._waiter: Optional[asyncio.Future] = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buf += data
        self._wake()

    def eof_received(self) -> bool:
        self.closed = True
        self._wake()
        return False

    def connection_lost(self, exc: Optional[BaseException]) -> None:
        self.closed = True
        self.error = self.error or exc
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def more(self) -> None:
        self._waiter = self.loop.create_future()
        await self._waiter


def parse_answer(buf: bytearray, closed: bool
                 ) -> Optional[Tuple[int, Dict[str, str], bytes, int]]:
    """(status, headers, body, bytes used) of the first complete HTTP response in ``buf``;
    None while incomplete. Content-Length, chunked, or (neither) up to the connection's end."""
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        return None
    lines = bytes(buf[:end]).decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            k, v = line.split(":", 1)
            headers[k.strip().lower()] = v.strip()
    start = end + 4
    if "content-length" in headers:
        n = int(headers["content-length"])
        if len(buf) - start < n:
            return None
        return status, headers, bytes(buf[start:start + n]), start + n
    if "chunked" in headers.get("transfer-encoding", "").lower():
        pos, body = start, bytearray()
        while True:
            eol = buf.find(b"\r\n", pos)
            if eol < 0:
                return None
            size = int(bytes(buf[pos:eol]).split(b";")[0], 16)
            if size == 0:
                fin = buf.find(b"\r\n\r\n", eol)  # "0\r\n", trailers, then an empty line
                return None if fin < 0 else (status, headers, bytes(body), fin + 4)
            if len(buf) < eol + 2 + size + 2:
                return None
            body += buf[eol + 2:eol + 2 + size]
            pos = eol + 2 + size + 2
    if 100 <= status < 200 or status in (204, 304):
        return status, headers, b"", start
    if not closed:
        return None
    return status, headers, bytes(buf[start:]), len(buf)


async def _read_answer(conn: _Exchange) -> Optional[Tuple[int, Dict[str, str], bytes, int]]:
    while True:
        got = parse_answer(conn.buf, conn.closed)
        if got is not None or conn.closed:
            return got
        await conn.more()


def _error_kind(exc: Optional[BaseException]) -> str:
    if exc is None:
        return "closed before the answer"
    code = getattr(exc, "errno", None)
    return type(exc).__name__ + (" " + errno.errorcode.get(code, str(code)) if code else "")


async def _post_client(port: int, head: bytes, body: bytes, clock: Dict[str, float],
                       timeout: float, st: Dict[str, Any]) -> None:
    """One client: requests one after another on a kept-alive connection (a new one when the
    server closes it) until ``clock["stop"]``; the request in flight then is finished and
    counted too (every request sent must be answered), but only answers completed inside
    [measure, stop] make the figures."""
    loop = asyncio.get_running_loop()
    conn: Optional[_Exchange] = None
    try:
        while time.monotonic() < clock["stop"]:
            if conn is None or conn.closed:
                if conn is not None:
                    conn.transport.close()
                try:
                    _t, conn = await asyncio.wait_for(loop.create_connection(
                        lambda: _Exchange(loop), HOST, port), timeout)
                    st["connections"] += 1
                except (OSError, asyncio.TimeoutError) as exc:
                    key = "connect: " + _error_kind(exc)
                    st["conn_errors"][key] = st["conn_errors"].get(key, 0) + 1
                    conn = None
                    await asyncio.sleep(0.05)  # do not spin on a refusing port
                    continue
            st["sent"] += 1
            t0 = time.perf_counter()
            conn.transport.write(head)
            conn.transport.write(body)
            try:
                answer = await asyncio.wait_for(_read_answer(conn), timeout)
            except asyncio.TimeoutError:
                st["timeouts"] += 1
                conn.transport.abort()
                conn = None
                continue
            if answer is None:
                key = _error_kind(conn.error)
                st["conn_errors"][key] = st["conn_errors"].get(key, 0) + 1
                conn = None
                continue
            ms = (time.perf_counter() - t0) * 1000.0
            now = time.monotonic()
            status, headers, data, used = answer
            del conn.buf[:used]
            key = str(status)
            st["statuses"][key] = st["statuses"].get(key, 0) + 1
            if conn.error is not None:  # answered, then writing the rest of the body failed
                st["answered_then_write_failed"] += 1
            if status == 200:
                service_ms = None
                with contextlib.suppress(ValueError, AttributeError):
                    service_ms = json.loads(data).get("elapsed_ms")
            else:
                error = "(no JSON error)"
                with contextlib.suppress(ValueError, AttributeError):
                    error = str(json.loads(data).get("error"))
                st["errors"][error] = st["errors"].get(error, 0) + 1
                if "retry-after" in headers:
                    st["retry_after"] += 1
            if clock["measure"] <= now <= clock["stop"]:
                st["window_lat"].setdefault(key, []).append(ms)
                if status == 200 and service_ms is not None:
                    st["service_ms"].append(service_ms)
            if headers.get("connection", "").lower() == "close":
                conn.transport.close()
                conn = None
    finally:
        if conn is not None:
            conn.transport.close()


def _pct(sorted_vals: List[float], p: float) -> Optional[float]:
    if not sorted_vals:
        return None
    return sorted_vals[min(len(sorted_vals) - 1, int(p / 100.0 * len(sorted_vals)))]


async def _postload(spec: Dict[str, Any]) -> Dict[str, Any]:
    cpu0 = time.process_time()  # the clients' own CPU, without this process's start-up
    with open(spec["body_file"], "rb") as f:
        body = f.read()
    port = spec["port"]
    head = ("POST %s HTTP/1.1\r\nHost: %s:%d\r\nContent-Type: %s\r\nContent-Length: %d\r\n\r\n"
            % (spec["path"], HOST, port, spec["content_type"], len(body))).encode()
    st: Dict[str, Any] = {"sent": 0, "connections": 0, "statuses": {}, "errors": {},
                          "retry_after": 0, "conn_errors": {}, "timeouts": 0,
                          "answered_then_write_failed": 0, "window_lat": {}, "service_ms": []}
    start = time.monotonic()
    clock = {"measure": start + spec["warmup"],
             "stop": start + spec["warmup"] + spec["duration"]}
    timeout = spec["timeout"]
    await asyncio.wait_for(asyncio.gather(*(
        _post_client(port, head, body, clock, timeout, st) for _ in range(spec["clients"]))),
        spec["warmup"] + spec["duration"] + timeout + 10)
    window = clock["stop"] - clock["measure"]
    client_cpu_s = time.process_time() - cpu0
    ok = sorted(st["window_lat"].get("200", []))
    rejected = sorted(st["window_lat"].get("503", []))
    answered = sum(st["statuses"].values())
    unanswered = sum(st["conn_errors"].values()) + st["timeouts"]
    return {
        "clients": spec["clients"], "warmup_s": spec["warmup"], "duration_s": window,
        "requests": len(ok), "rps": len(ok) / window,
        "answers_in_window": sum(len(v) for v in st["window_lat"].values()),
        "p50_ms": _pct(ok, 50), "p90_ms": _pct(ok, 90), "p99_ms": _pct(ok, 99),
        "max_ms": ok[-1] if ok else None,
        "rejected_rps": len(rejected) / window, "rejected_p50_ms": _pct(rejected, 50),
        "rejected_p99_ms": _pct(rejected, 99),
        "service_ms_p50": statistics.median(st["service_ms"]) if st["service_ms"] else None,
        "sent": st["sent"], "answered": answered, "unanswered": unanswered,
        "statuses": st["statuses"], "errors": st["errors"], "retry_after": st["retry_after"],
        "conn_errors": st["conn_errors"], "timeouts": st["timeouts"],
        "connections": st["connections"],
        "answered_then_write_failed": st["answered_then_write_failed"],
        "client_cpu_s": client_cpu_s,
    }


def post_load(port: int, body_file: str, content_type: str, clients: int, warmup: float,
              duration: float, timeout: float = 60.0) -> Dict[str, Any]:
    """``clients`` keep-alive clients POSTing /api/deepfake/analyze back to back for
    ``warmup`` + ``duration`` s, in a process of their own (bench.py --_postload) so that
    this process's threads (the RSS sampler) and its GIL stay out of the clients' way."""
    spec = {"port": port, "path": "/api/deepfake/analyze", "body_file": body_file,
            "content_type": content_type, "clients": clients, "warmup": warmup,
            "duration": duration, "timeout": timeout}
    argv = [PY, os.path.abspath(__file__), "--_postload", json.dumps(spec)]
    return json.loads(bounded_output(argv, warmup + duration + timeout + 30))


# ---------------------------------------------------------------- analyze targets

def free_port_block(n: int) -> int:
    """The first of ``n`` consecutive free ports (a gateway's workers listen on FLASK_PORT ..
    FLASK_PORT+n-1), picked below the kernel's ephemeral range so that no client socket of
    this benchmark takes one of them between this check and the workers' bind."""
    import random

    low = 32768
    with contextlib.suppress(OSError, ValueError, IndexError):
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low = int(f.read().split()[0])
    top = max(10000 + n, low - n)
    for _ in range(500):
        base = random.randrange(10000, top)
        try:
            for i in range(n):
                with socket.socket() as s:
                    s.bind((HOST, base + i))
        except OSError:
            continue
        return base
    raise RuntimeError("no %d consecutive free ports on %s" % (n, HOST))


def detect_dispatch() -> Dict[str, Any]:
    """The gateway's defaults in production, read from tornado_gateway itself: workers,
    in-flight limit per worker, queue limit and timeout."""
    code = ("import json\n"
            "from tornado_gateway import config\n"
            "c = config.load_config({}, {'mode': 'production'})\n"
            "print(json.dumps({'workers': c.flask.worker_count, 'worker_limit': "
            "getattr(c, 'worker_limit', None), 'queue_limit': getattr(c, 'queue_limit', None), "
            "'queue_timeout_ms': getattr(c, 'queue_timeout', None)}))\n")
    out = subprocess.run([PY, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    try:
        return json.loads(out.stdout)
    except ValueError:
        raise RuntimeError("cannot read the gateway's defaults: %s" % out.stderr.strip()[-500:])


class AnalyzeTarget:
    """A server of POST /api/deepfake/analyze under load, with a fresh data directory of its
    own (no target sees another's analyses, as on a fresh install): the service alone
    (``gateway_args`` None: ``python python/api_server.py --env production``, the original
    design's setup) or ``python -m tornado_gateway --production`` with ``gateway_args`` in
    front of ``workers`` worker processes."""

    def __init__(self, procs: Processes, name: str, env: Dict[str, str], data_root: str,
                 workers: int, gateway_args: Optional[List[str]] = None) -> None:
        self.name = name
        self.procs = procs
        self.workers = workers
        self.is_gateway = gateway_args is not None
        self.data_dir = tempfile.mkdtemp(prefix=slug(name) + "-", dir=data_root)
        env = dict(env, DEEPFAKE_DATA_DIR=self.data_dir)
        self.port = free_port()
        if gateway_args is None:
            self.argv = [PY, SERVICE, "--env", "production", "--host", HOST, "--port",
                         str(self.port)]
        else:
            self.fport = free_port_block(workers)
            self.argv = [PY, "-m", "tornado_gateway", "--host", HOST, "--port", str(self.port),
                         "--flask-port", str(self.fport), "--flask-script", SERVICE,
                         "--production"] + list(gateway_args)
        self.command = " ".join(["python"] + [os.path.relpath(a, ROOT) if a.startswith(ROOT)
                                              else a for a in self.argv[1:]])
        self.t_launch = time.monotonic()
        self.proc = procs.spawn(self.argv, "analyze-%s" % slug(name), env)
        self.worker_pids: List[int] = []
        self.ready_ms: Optional[float] = None
        self.exit_ms: Optional[float] = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def status(self) -> Optional[Dict[str, Any]]:
        """The gateway's GET /api/gateway/status (None for the service alone)."""
        if not self.is_gateway:
            return None
        code, body = asyncio.run(http_get(self.port, "/api/gateway/status", 5.0))
        return json.loads(body) if code == 200 else None

    def wait(self, timeout: float = 90.0) -> None:
        """Until every worker is ready (the gateway's status says so) or the service alone
        answers; the PIDs of the processes doing the work."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("%s exited (%s) while starting; see bench/results/logs/"
                                   "analyze-%s.log" % (self.name, self.proc.returncode,
                                                       slug(self.name)))
            with contextlib.suppress(OSError, asyncio.TimeoutError, ValueError, IndexError,
                                     KeyError, TypeError):
                if self.is_gateway:
                    service = (self.status() or {})["service"]
                    workers = service.get("workers") or []
                    if len(workers) == self.workers and all(
                            w["state"] == "ready" for w in workers):
                        self.worker_pids = [w["pid"] for w in workers]
                        break
                elif asyncio.run(http_get(self.port, "/api/deepfake/stats", 1.0))[0] == 200:
                    self.worker_pids = [self.pid]
                    break
            time.sleep(0.05)
        else:
            raise RuntimeError("%s not ready within %.0f s" % (self.name, timeout))
        self.ready_ms = (time.monotonic() - self.t_launch) * 1000.0
        self.procs.remember_children(self.proc)

    def cpu_pids(self) -> Dict[str, int]:
        pids = {"worker %d" % (i + 1): pid for i, pid in enumerate(self.worker_pids)}
        if self.is_gateway:
            pids["gateway"] = self.pid
        return pids

    def stop(self) -> None:
        """Ctrl+C (SIGINT) and the time to exit: the gateway stops its workers first."""
        t = time.monotonic()
        self.procs.stop(self.proc)
        self.exit_ms = (time.monotonic() - t) * 1000.0

    def describe(self) -> Dict[str, Any]:
        return {"command": self.command, "workers": self.workers, "pid": self.pid,
                "worker_pids": self.worker_pids, "ready_ms": self.ready_ms,
                "exit_ms": self.exit_ms}


def measure_analyze(target: AnalyzeTarget, body_file: str, ctype: str, clients: int,
                    warmup: float, duration: float) -> Dict[str, Any]:
    """One load run, with the CPU the gateway and the service's processes spent per request
    (less sensitive to the machine's other load than requests/s)."""
    pids = target.cpu_pids()
    before = cpu_seconds(pids)
    machine = machine_busy_seconds()
    t0 = time.monotonic()
    # the gateway's RSS under ordinary load: what the overload's figure compares with
    with RssSampler({"gateway": target.pid} if target.is_gateway else {}) as sampler:
        res = post_load(target.port, body_file, ctype, clients, warmup, duration)
    wall = time.monotonic() - t0
    after = cpu_seconds(pids)
    machine_after = machine_busy_seconds()
    if "gateway" in sampler.peak:
        res["gateway_peak_rss_mb"] = sampler.peak["gateway"] / MIB
    answered = res["answered"]
    if answered:
        spent = {k: after[k] - before[k] for k in after if k in before}
        if "gateway" in spent:
            res["gateway_cpu_us_per_req"] = spent.pop("gateway") / answered * 1e6
        res["service_cpu_us_per_req"] = sum(spent.values()) / answered * 1e6
        # the whole run's CPU over its wall time: 2.0 = both cores busy on this machine
        res["service_cores_busy"] = sum(spent.values()) / wall
    # beside the service, the gateway and the clients: what else ran on the machine (other
    # work there makes a run noisier)
    res["machine_cores_busy"] = (machine_after - machine) / wall
    return res


def start_targets(procs: Processes, specs: List[Tuple[str, int, Optional[List[str]]]],
                  env: Dict[str, str], data_root: str, body: bytes, body_file: str,
                  ctype: str, warmup: float, targets: List[AnalyzeTarget]) -> None:
    """Start each target, one after the other (launches do not compete), wait until ready and
    warm it up: 4 clients reach every worker (least in flight first), so each has imported
    and loaded what its first analyze needs before anything is measured. Every target is
    appended to ``targets`` as soon as it exists, so that the caller stops it whatever
    happens next."""
    for name, workers, gateway_args in specs:
        t = AnalyzeTarget(procs, name, env, data_root, workers, gateway_args)
        targets.append(t)
        t.wait()
        first = analyze_once(t.port, body, ctype)
        if not first["ok"]:
            raise RuntimeError("%s answered analyze with %s (is the service being changed? "
                               "retry later); log in bench/results/logs" % (name, first["status"]))
        res = post_load(t.port, body_file, ctype, 4, 0, warmup)
        log("analyze target %-13s ready %.0f ms after launch (pids %s), first analyze %.0f ms, "
            "warm-up %.1f req/s, statuses %s" % (name, t.ready_ms, t.cpu_pids(), first["ms"],
                                                res["rps"], res["statuses"]))


def load_matrix(targets: List[AnalyzeTarget], clients_list: List[int], repeats: int,
                warmup: float, duration: float, body_file: str, ctype: str, label: str,
                runs: Dict[str, Dict[str, List[Dict[str, Any]]]]) -> None:
    """Interleaved: each repeat runs every target at every client count, the targets in an
    order that rotates from one repeat to the next; runs[target][clients] gets one result per
    repeat as soon as it is measured (an interrupted run keeps what it has)."""
    for t in targets:
        runs[t.name] = {str(c): [] for c in clients_list}
    for r in range(repeats):
        for t in rotation(targets, r):
            line = "%s rep %d/%d %-13s" % (label, r + 1, repeats, t.name)
            for c in clients_list:
                res = measure_analyze(t, body_file, ctype, c, warmup, duration)
                res["repeat"] = r
                runs[t.name][str(c)].append(res)
                bad = res["answered"] - res["statuses"].get("200", 0) + res["unanswered"]
                line += "  c=%d %5.1f/s p50 %5.0f p99 %5.0f%s" % (
                    c, res["rps"], res["p50_ms"] or -1, res["p99_ms"] or -1,
                    " BAD x%d" % bad if bad else "")
            log(line)


def gateway_rss_mb(pid: int) -> Optional[float]:
    import psutil

    try:
        return psutil.Process(pid).memory_info().rss / MIB
    except psutil.Error:
        return None


def overload_run(procs: Processes, env: Dict[str, str], data_root: str, body: bytes,
                 body_file: str, ctype: str, workers: int, clients: int, queue_limit: int,
                 warmup: float, duration: float, targets: List[AnalyzeTarget]) -> Dict[str, Any]:
    """``clients`` clients against a gateway with a queue of ``queue_limit``: more than its
    workers and queue hold, so some must be refused. Each client sends its next request as
    soon as it has an answer, ignoring Retry-After (the worst case: the refused come straight
    back). The gateway's RSS is sampled every 50 ms: idle (after the warm-up), peak during
    the run, and after it."""
    name = "overload"
    start_targets(procs, [(name, workers, ["--queue-limit", str(queue_limit)])], env,
                  data_root, body, body_file, ctype, warmup, targets)
    t = targets[-1]
    time.sleep(1.0)  # let the warm-up's garbage go and the allocator settle
    idle = []
    for _ in range(10):
        idle.append(gateway_rss_mb(t.pid) or 0.0)
        time.sleep(0.05)
    before = cpu_seconds(t.cpu_pids())
    machine = machine_busy_seconds()
    t0 = time.monotonic()
    with RssSampler({"gateway": t.pid}, series=True) as sampler:
        res = post_load(t.port, body_file, ctype, clients, 0, duration)
    wall = time.monotonic() - t0
    res["machine_cores_busy"] = (machine_busy_seconds() - machine) / wall
    after_cpu = cpu_seconds(t.cpu_pids())
    res["gateway_cpu_s"] = after_cpu.get("gateway", 0) - before.get("gateway", 0)
    res["service_cpu_s"] = sum(v - before.get(k, v) for k, v in after_cpu.items()
                               if k != "gateway")
    # still growing at the end, or levelled off: the peak of each half of the run
    series = [(ts, smp["gateway"]) for ts, smp in sampler.series or [] if "gateway" in smp]
    for half, keep in (("first", lambda ts: ts < duration / 2),
                       ("second", lambda ts: ts >= duration / 2)):
        res["rss_peak_%s_half_mb" % half] = max(
            [rss for ts, rss in series if keep(ts)] or [0]) / MIB
    res["rss_bound_mb"] = TARGETS["overload_rss_uploads"] * clients * len(body) / MIB
    status = t.status() or {}
    time.sleep(1.0)
    res["rss_idle_mb"] = max(idle)
    res["rss_peak_mb"] = sampler.peak.get("gateway", 0) / MIB
    res["rss_after_mb"] = gateway_rss_mb(t.pid)
    res["rss_samples"] = sampler.samples
    res["queue_limit"] = queue_limit
    res["dispatch_after"] = status.get("service", {}).get("dispatch")
    res["served_per_worker"] = [w.get("served") for w in status.get("service", {}).get(
        "workers", [])]
    res["after"] = analyze_once(t.port, body, ctype)  # does it still serve, at once?
    res["target"] = t.describe()
    t.stop()
    res["target"]["exit_ms"] = t.exit_ms
    log("overload: %d clients, queue %d, %.0f s: statuses %s, errors %s, unanswered %d; "
        "200s %.1f/s p99 %.0f ms; gateway RSS idle %.1f MB, peak %.1f MB, after %.1f MB; "
        "then one analyze: %s in %.0f ms" % (
            clients, queue_limit, duration, res["statuses"], res["errors"], res["unanswered"],
            res["rps"], res["p99_ms"] or -1, res["rss_idle_mb"], res["rss_peak_mb"],
            res["rss_after_mb"] or -1, res["after"]["status"], res["after"]["ms"]))
    return res


def analyze_section(procs: Processes, env: Dict[str, str], data_root: str, p: Dict[str, Any],
                    phases: set, clients_list: List[int], limits: List[int],
                    overload_clients: int, overload_queue: int, out: Dict[str, Any]) -> None:
    """POST /api/deepfake/analyze on the real service: the service alone vs the gateway with
    one worker and with its default workers, at several client counts; the gateway's
    in-flight limit per worker; and an overload. Results go into ``out`` as they come."""
    jpeg, source = make_jpeg()
    body, ctype = analyze_request(jpeg)
    body_file = os.path.join(data_root, "analyze-request.bin")
    with open(body_file, "wb") as f:
        f.write(body)
    defaults = detect_dispatch()
    workers = defaults["workers"]
    out.update({
        "image": {"source": source, "width": 1024, "height": 1024, "jpeg_bytes": len(jpeg),
                  "request_bytes": len(body)},
        "defaults": defaults,
        "params": {k: p[k] for k in ("analyze_duration", "analyze_repeats", "analyze_warmup",
                                     "overload_duration")},
    })
    # after a start: long enough for every worker's first requests (imports, model, caches)
    warm = max(1.0, 2 * p["analyze_warmup"])
    for part in ("analyze", "limits"):
        if part not in phases:
            continue
        targets: List[AnalyzeTarget] = []
        try:
            if part == "analyze":
                specs = [("direct", 1, None), ("gw 1 worker", 1, ["--workers", "1"]),
                         ("gw default", workers, [])]
                cl = clients_list
            else:
                specs = [("limit %d" % n, workers, ["--worker-limit", str(n)]) for n in limits]
                cl = list(SWEEP_CLIENTS)
            log("analyze %s: %s at %s clients, %g s runs after %g s warm-up, %d repeats"
                % (part, ", ".join(s[0] for s in specs), cl, p["analyze_duration"],
                   p["analyze_warmup"], p["analyze_repeats"]))
            start_targets(procs, specs, env, data_root, body, body_file, ctype, warm, targets)
            section = out[part] = {"runs": {}, "targets": {t.name: t.describe() for t in targets},
                                   "served_per_worker": {}, "clients": cl}
            if part == "limits":
                section["limits"] = limits
            load_matrix(targets, cl, p["analyze_repeats"], p["analyze_warmup"],
                        p["analyze_duration"], body_file, ctype, part, section["runs"])
            for t in targets:  # how the gateway spread the work over its workers
                with contextlib.suppress(Exception):
                    st = t.status()
                    if st:
                        section["served_per_worker"][t.name] = [
                            w.get("served") for w in st["service"]["workers"]]
            for t in targets:
                t.stop()
            section["targets"] = {t.name: t.describe() for t in targets}
        finally:
            for t in targets:
                procs.stop(t.proc)
    if "overload" in phases:
        targets = []
        try:
            log("analyze overload: %d clients, --queue-limit %d, %g s"
                % (overload_clients, overload_queue, p["overload_duration"]))
            out["overload"] = overload_run(procs, env, data_root, body, body_file, ctype,
                                           workers, overload_clients, overload_queue, warm,
                                           p["overload_duration"], targets)
        finally:
            for t in targets:
                procs.stop(t.proc)


# ============================================================================ report

def summarize(raw: Dict[str, Any], names: List[str]) -> Dict[str, Any]:
    s: Dict[str, Any] = {"tiny_get": {}, "transfers": {}, "launch": {}}
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
        for target, ratios in block.get("cpu_ratios", {}).items():
            row[target]["cpu_ratio_vs_shipped"] = spread(ratios)
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
    if raw.get("analyze"):
        s["analyze_section"] = summarize_analyze(raw["analyze"])
    return s


def _by_repeat(runs: List[Dict[str, Any]]) -> Dict[int, Dict[str, Any]]:
    return {r["repeat"]: r for r in runs}


def _run_row(runs: List[Dict[str, Any]]) -> Dict[str, Any]:
    return {"rps": spread([r["rps"] for r in runs]),
            "p50_ms": spread([r["p50_ms"] for r in runs]),
            "p99_ms": spread([r["p99_ms"] for r in runs]),
            "service_ms": spread([r.get("service_ms_p50") for r in runs]),
            "gateway_cpu_us_per_req": spread([r.get("gateway_cpu_us_per_req") for r in runs]),
            "service_cpu_us_per_req": spread([r.get("service_cpu_us_per_req") for r in runs]),
            "cores_busy": spread([r.get("service_cores_busy") for r in runs]),
            "machine_busy": spread([r.get("machine_cores_busy") for r in runs]),
            "gateway_peak_rss_mb": spread([r.get("gateway_peak_rss_mb") for r in runs]),
            # every answer but a 200, and every request left unanswered
            "bad": sum(r["answered"] - r["statuses"].get("200", 0) + r["unanswered"]
                       for r in runs)}


def _paired(a: List[Dict[str, Any]], b: List[Dict[str, Any]],
            f: Callable[[Dict[str, Any], Dict[str, Any]], Optional[float]]) -> List[float]:
    """f(a's run, b's run) for every repeat both have (ratios of the same repeat)."""
    bb = _by_repeat(b)
    out = []
    for r, x in sorted(_by_repeat(a).items()):
        if r in bb:
            with contextlib.suppress(TypeError, ZeroDivisionError):
                v = f(x, bb[r])
                if v is not None:
                    out.append(v)
    return out


def summarize_analyze(an: Dict[str, Any]) -> Dict[str, Any]:
    s: Dict[str, Any] = {}
    main = an.get("analyze")
    if main:
        runs = main["runs"]
        direct = runs.get("direct", {})
        rows: Dict[str, Dict[str, Any]] = {}
        derived: Dict[str, Dict[str, Any]] = {}
        for name, by_c in runs.items():
            rows[name] = {}
            for c, rs in by_c.items():
                row = _run_row(rs)
                if name != "direct" and c in direct:
                    row["rps_ratio"] = spread(_paired(rs, direct[c],
                                                      lambda g, d: g["rps"] / d["rps"]))
                rows[name][c] = row
            workers = main["targets"][name]["workers"]
            d: Dict[str, Any] = {"workers": workers}
            peaks = [r["gateway_peak_rss_mb"] for rs in by_c.values() for r in rs
                     if r.get("gateway_peak_rss_mb")]
            d["gateway_peak_rss_mb"] = max(peaks) if peaks else None
            # the service alone's best throughput of each repeat, at whichever client count
            best = {}
            for rs in direct.values():
                for r in rs:
                    best[r["repeat"]] = max(best.get(r["repeat"], 0.0), r["rps"])
            d["rps_vs_direct_best"] = {c: spread([r["rps"] / best[r["repeat"]] for r in rs
                                                  if best.get(r["repeat"])])
                                       for c, rs in by_c.items()}
            if "8" in by_c and "2" in by_c:
                d["rps_8_over_2"] = spread(_paired(by_c["8"], by_c["2"],
                                                   lambda a, b: a["rps"] / b["rps"]))
            if "8" in by_c and "1" in by_c:
                # p99 at 8 clients against 8/workers requests' worth of queueing per worker
                # at the 1-client p50: below 3x that, the wait is about the work ahead of
                # a request, not a collapse
                d["p99_8_bound_ms"] = spread(_paired(by_c["8"], by_c["1"],
                                                     lambda a, b: b["p50_ms"] * 8 / workers))
                d["p99_8_over_bound"] = spread(_paired(
                    by_c["8"], by_c["1"], lambda a, b: a["p99_ms"] / (b["p50_ms"] * 8 / workers)))
            derived[name] = d
        s["analyze"] = {"rows": rows, "derived": derived}
    lim = an.get("limits")
    if lim:
        shipped = "limit %s" % an["defaults"].get("worker_limit")
        rows = {}
        for name, by_c in lim["runs"].items():
            rows[name] = {}
            for c, rs in by_c.items():
                row = _run_row(rs)
                if name != shipped and shipped in lim["runs"]:
                    row["rps_ratio"] = spread(_paired(rs, lim["runs"][shipped][c],
                                                      lambda a, b: a["rps"] / b["rps"]))
                rows[name][c] = row
        s["limits"] = {"rows": rows, "shipped": shipped}
    return s


def check_analyze_targets(an: Dict[str, Any], sa: Dict[str, Any]) -> Dict[str, Dict[str, Any]]:
    """The analyze targets, each a ratio within this one run (median over repeats of the ratio
    of each repeat), with the figures behind it."""
    t: Dict[str, Dict[str, Any]] = {}

    def put(key: str, value: Optional[float], ok: Optional[bool], goal: str,
            detail: str = "") -> None:
        t[key] = {"value": value, "met": ok, "goal": goal, "detail": detail}

    def med(x: Optional[Dict[str, float]]) -> Optional[float]:
        return x["median"] if x else None

    main = sa.get("analyze")
    if main:
        rows, derived = main["rows"], main["derived"]
        gw = rows.get("gw default", {})
        r1 = gw.get("1", {}).get("rps_ratio")
        v = med(r1)
        put("gw default c=1 vs direct", v, None if v is None else v >= TARGETS["analyze_1_ratio"],
            "gateway (default workers) >= %.2fx direct req/s at 1 client"
            % TARGETS["analyze_1_ratio"],
            "%s vs %s req/s; ratio %s" % (
                fmt_spread(gw.get("1", {}).get("rps"), "%.1f"),
                fmt_spread(rows.get("direct", {}).get("1", {}).get("rps"), "%.1f"),
                fmt_spread(r1, "%.3f")))
        sc = derived.get("gw default", {}).get("rps_vs_direct_best", {}).get("4")
        v = med(sc)
        put("gw default c=4 scaling", v, None if v is None else v >= TARGETS["analyze_4_scaling"],
            "gateway (default workers) at 4 clients >= %.1fx the service alone's best req/s"
            % TARGETS["analyze_4_scaling"],
            "%s req/s vs direct's best per repeat; ratio %s" % (
                fmt_spread(gw.get("4", {}).get("rps"), "%.1f"), fmt_spread(sc, "%.2f")))
        for name in ("gw 1 worker", "gw default"):
            d = derived.get(name)
            if not d:
                continue
            r = d.get("rps_8_over_2")
            v = med(r)
            put("%s no collapse" % name, v,
                None if v is None else v >= TARGETS["analyze_no_collapse"],
                "%s: req/s at 8 clients >= %.1fx req/s at 2" % (name,
                                                                 TARGETS["analyze_no_collapse"]),
                "%s vs %s req/s; ratio %s" % (
                    fmt_spread(rows[name].get("8", {}).get("rps"), "%.1f"),
                    fmt_spread(rows[name].get("2", {}).get("rps"), "%.1f"),
                    fmt_spread(r, "%.2f")))
            r = d.get("p99_8_over_bound")
            v = med(r)
            put("%s p99 at 8" % name, v,
                None if v is None else v < TARGETS["analyze_p99_factor"],
                "%s: p99 at 8 clients < %.0fx (p50 at 1 client) x 8 / %d workers"
                % (name, TARGETS["analyze_p99_factor"], d["workers"]),
                "p99 %s ms, (p50 at 1) x 8/%d = %s ms; ratio %s" % (
                    fmt_spread(rows[name].get("8", {}).get("p99_ms")), d["workers"],
                    fmt_spread(d.get("p99_8_bound_ms")), fmt_spread(r, "%.2f")))
    ov = an.get("overload")
    if ov:
        statuses = dict(ov["statuses"])
        ok200 = statuses.pop("200", 0)
        n503 = statuses.pop("503", 0)
        overloaded = ov["errors"].get("overloaded", 0)
        other = sum(statuses.values()) + (n503 - overloaded)
        put("overload statuses", other, other == 0,
            "overload: only 200 and 503 \"overloaded\" answers",
            "200 x %d, 503 x %d (\"overloaded\" x %d), other %s" % (
                ok200, n503, overloaded, statuses or 0))
        put("overload answered", ov["unanswered"], ov["unanswered"] == 0,
            "overload: every request answered",
            "%d sent, %d answered; connection errors %s, timeouts %d" % (
                ov["sent"], ov["answered"], ov["conn_errors"] or 0, ov["timeouts"]))
        growth = ov["rss_peak_mb"] - ov["rss_idle_mb"]
        put("overload gateway RSS", growth, growth < ov["rss_bound_mb"],
            "overload: gateway RSS peak - idle < %.1f MB (%gx %d clients x %d KB)" % (
                ov["rss_bound_mb"], TARGETS["overload_rss_uploads"], ov["clients"],
                an["image"]["request_bytes"] // 1024),
            "idle %.1f MB, peak %.1f MB, 1 s after %s MB" % (
                ov["rss_idle_mb"], ov["rss_peak_mb"], _num(ov.get("rss_after_mb"), "%.1f")))
        creep = ov["rss_peak_second_half_mb"] - ov["rss_peak_first_half_mb"]
        put("overload RSS levels off", creep, creep <= TARGETS["overload_rss_creep_mb"],
            "overload: gateway RSS peak of the 2nd half <= the 1st half's + %.0f MB"
            % TARGETS["overload_rss_creep_mb"],
            "first half %.1f MB, second half %.1f MB" % (ov["rss_peak_first_half_mb"],
                                                         ov["rss_peak_second_half_mb"]))
    return t


def print_analyze(result: Dict[str, Any]) -> None:
    an = result["analyze"]
    sa = result["summary"].get("analyze_section", {})
    w = sys.stdout.write
    img, prm, dflt = an["image"], an["params"], an["defaults"]
    w("\n-- POST /api/deepfake/analyze on the real service (production), %dx%d JPEG of %d KB "
      "(%s); keep-alive clients, each sending its next request when answered; %g s runs after "
      "%g s warm-up, %d repeats interleaved --\n" % (
          img["width"], img["height"], img["jpeg_bytes"] // 1024, img["source"],
          prm["analyze_duration"], prm["analyze_warmup"], prm["analyze_repeats"]))
    w("gateway defaults in production here: %s workers, --worker-limit %s, --queue-limit %s, "
      "--queue-timeout %s ms\n" % (dflt["workers"], dflt["worker_limit"], dflt["queue_limit"],
                                  dflt["queue_timeout_ms"]))
    head = "%-7s %-13s %-19s %-19s %-19s %-19s %-7s %-7s %-8s %-5s %-7s %s\n"
    cols = ("clients", "target", "req/s", "p50 ms", "p99 ms", "ratio", "svc ms", "gw us/r",
            "svc us/r", "cores", "machine", "bad")

    def table(section: Dict[str, Any], rows: Dict[str, Any], order: List[str]) -> None:
        w(head % cols)
        for c in section["clients"]:
            for name in order:
                r = rows.get(name, {}).get(str(c))
                if not r:
                    continue
                w(head % (c, name, fmt_spread(r["rps"], "%.1f"), fmt_spread(r["p50_ms"]),
                          fmt_spread(r["p99_ms"]), fmt_spread(r.get("rps_ratio"), "%.2f"),
                          _num(r["service_ms"]["median"] if r["service_ms"] else None),
                          _num(r["gateway_cpu_us_per_req"]["median"]
                               if r["gateway_cpu_us_per_req"] else None),
                          _num(r["service_cpu_us_per_req"]["median"]
                               if r["service_cpu_us_per_req"] else None),
                          _num(r["cores_busy"]["median"] if r["cores_busy"] else None, "%.2f"),
                          _num(r["machine_busy"]["median"] if r["machine_busy"] else None,
                               "%.2f"), r["bad"]))

    def commands(section: Dict[str, Any]) -> None:
        for name, t in section["targets"].items():
            served = section.get("served_per_worker", {}).get(name)
            w("  %-13s %s  [%d worker%s%s; ready %s ms after launch, Ctrl+C -> exit %s ms]\n" % (
                name, t["command"], t["workers"], "" if t["workers"] == 1 else "s",
                ", served per worker %s" % served if served else "", _num(t["ready_ms"]),
                _num(t["exit_ms"])))

    main = an.get("analyze")
    if main and sa.get("analyze"):
        commands(main)
        w("(ratio: vs direct at the same clients, same repeat; svc ms: the service's own time "
          "per analyze, median; gw/svc us/r: CPU per request of the gateway / of the service's "
          "processes; cores: the service's CPU over the run's wall time, machine: every "
          "process's, all medians; bad: non-200 answers + unanswered)\n")
        table(main, sa["analyze"]["rows"], ["direct", "gw 1 worker", "gw default"])
        for name, d in sa["analyze"]["derived"].items():
            vs = d.get("rps_vs_direct_best", {})
            w("  %-13s req/s / direct's best of the repeat: %s; req/s 8 vs 2 clients: %s; "
              "p99 at 8 / ((p50 at 1) x 8 / %d): %s%s\n" % (
                  name, ", ".join("c=%s %s" % (c, fmt_spread(v, "%.2f")) for c, v in vs.items()),
                  fmt_spread(d.get("rps_8_over_2"), "%.2f"), d["workers"],
                  fmt_spread(d.get("p99_8_over_bound"), "%.2f"),
                  "; gateway peak RSS %.1f MB" % d["gateway_peak_rss_mb"]
                  if d.get("gateway_peak_rss_mb") else ""))
    lim = an.get("limits")
    if lim and sa.get("limits"):
        w("\n-- in-flight limit per worker (--worker-limit) with %s workers, %g s runs, %d "
          "repeats interleaved; ratio: req/s vs %s (the shipped default) of the same repeat --\n"
          % (dflt["workers"], prm["analyze_duration"], prm["analyze_repeats"],
             sa["limits"]["shipped"]))
        commands(lim)
        table(lim, sa["limits"]["rows"], list(lim["runs"]))
    ov = an.get("overload")
    if ov:
        w("\n-- overload: %d clients against the gateway with --queue-limit %d (%s workers, "
          "--worker-limit %s), %g s; each client sends its next request as soon as it has an "
          "answer (Retry-After ignored) --\n" % (
              ov["clients"], ov["queue_limit"], ov["target"]["workers"],
              (ov.get("dispatch_after") or {}).get("worker_limit", "?"), ov["duration_s"]))
        w("  %s\n" % ov["target"]["command"])
        w("answers: %s; errors: %s; with Retry-After: %d; unanswered: %d (connection errors %s, "
          "timeouts %d); %d connections opened; answered then the rest of the upload refused: "
          "%d\n" % (ov["statuses"], ov["errors"], ov["retry_after"], ov["unanswered"],
                    ov["conn_errors"] or 0, ov["timeouts"], ov["connections"],
                    ov["answered_then_write_failed"]))
        w("200s: %.1f req/s, p50 %s ms, p99 %s ms, max %s ms; 503s: %.1f/s, p50 %s ms, p99 %s ms\n"
          % (ov["rps"], _num(ov["p50_ms"]), _num(ov["p99_ms"]), _num(ov["max_ms"]),
             ov["rejected_rps"], _num(ov["rejected_p50_ms"], "%.1f"),
             _num(ov["rejected_p99_ms"], "%.1f")))
        w("gateway RSS: idle %.1f MB, peak %.1f MB (+%.1f MB; peak of the first half %.1f MB, "
          "of the second %.1f MB; %d samples every 50 ms), 1 s after %s MB\n" % (
              ov["rss_idle_mb"], ov["rss_peak_mb"], ov["rss_peak_mb"] - ov["rss_idle_mb"],
              ov["rss_peak_first_half_mb"], ov["rss_peak_second_half_mb"], ov["rss_samples"],
              _num(ov["rss_after_mb"], "%.1f")))
        w("CPU: gateway %.1f s, workers %.1f s, clients %.1f s; machine %.2f cores busy; served "
          "per worker %s; dispatch after: %s; then one analyze: %s in %.0f ms\n" % (
              ov["gateway_cpu_s"], ov["service_cpu_s"], ov["client_cpu_s"],
              ov["machine_cores_busy"], ov["served_per_worker"], ov["dispatch_after"],
              ov["after"]["status"], ov["after"]["ms"]))


def check_targets(s: Dict[str, Any], names: List[str],
                  analyze: Optional[Dict[str, Any]] = None) -> Dict[str, Dict[str, Any]]:
    """Each gateway's targets of the phases that ran (a phase skipped has no figures to judge),
    then the analyze section's."""
    res: Dict[str, Dict[str, Any]] = {}
    for name in names:
        t: Dict[str, Any] = {}

        def put(key: str, value: Optional[float], ok: Optional[bool], goal: str) -> None:
            t[key] = {"value": value, "met": ok, "goal": goal}

        tiny = (("32", "tiny_32_ratio", ">= %.1fx direct req/s at 32 conns (median)"),
                ("1", "tiny_1_ratio", ">= %.1fx direct req/s at 1 conn (median)"))
        for conns, key, goal in tiny if s["tiny_get"] else ():
            r = s["tiny_get"].get(conns, {}).get(name, {}).get("rps_ratio")
            v = r["median"] if r else None
            put(key, v, None if v is None else v >= TARGETS[key], goal % TARGETS[key])
        peaks = []
        for direction in ("upload", "download") if s["transfers"] else ():
            row = s["transfers"].get(direction, {}).get(name)
            if row and row["gateway_peak_rss_mb"]:
                peaks.append(row["gateway_peak_rss_mb"]["max"])
            if row and row.get("gateway_vmhwm_mb"):
                peaks.append(row["gateway_vmhwm_mb"]["max"])
        v = max(peaks) if peaks else None
        if s["transfers"]:
            put("peak_rss_mb", v, None if v is None else v < TARGETS["peak_rss_mb"],
                "< %.0f MB gateway peak RSS, 1 GiB each way (max)" % TARGETS["peak_rss_mb"])
        if not s["launch"]:
            if t:
                res[name] = t
            continue
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
    if analyze:
        res["analyze"] = check_analyze_targets(analyze, s.get("analyze_section", {}))
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

    if s["tiny_get"]:
        w("\n-- tiny GET /api/deepfake/tiny, %d s per run, %d repeats --\n"
          % (result["params"]["duration"], result["params"]["repeats"]))
        kept = result.get("upstream_keepalive_after_warmup")
        if kept:
            w("gateway->child connections left open after the warm-up (keep-alive): %s\n"
              % ", ".join("%s %s" % kv for kv in kept.items()))
        w("%-6s %-13s %-20s %-20s %-23s %-18s %-18s %-18s %s\n" % (
            "conns", "target", "requests/s", "p50 ms", "p99 ms", "ratio vs direct",
            "gw CPU us/req", "child CPU us/req", "errors"))
        for conns, row in s["tiny_get"].items():
            for target in ["direct"] + names + [Reference.name]:
                if target not in row:
                    continue
                r = row[target]
                gcpu, ccpu = r["gateway_cpu_us_per_req"], r["child_cpu_us_per_req"]
                w("%-6s %-13s %-20s %-20s %-23s %-18s %-18s %-18s %d\n" % (
                    conns, target, fmt_spread(r["rps"]), fmt_spread(r["p50_ms"], "%.2f"),
                    fmt_spread(r["p99_ms"], "%.1f"), fmt_spread(r.get("rps_ratio"), "%.2f"),
                    fmt_spread(gcpu) if target != "direct" else "-", fmt_spread(ccpu),
                    r["errors"]))
        for conns, row in s["tiny_get"].items():
            for target in names:
                cr = row.get(target, {}).get("cpu_ratio_vs_shipped")
                if cr:
                    w("c=%s: %s spends %s the CPU per request of %s (same repeat)\n"
                      % (conns, target, fmt_spread(cr, "%.2fx"), names[0]))
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

    if result.get("analyze"):
        print_analyze(result)

    w("\n-- targets --\n")
    for name, checks in result["targets"].items():
        for key, c in checks.items():
            mark = "n/a " if c["met"] is None else ("PASS" if c["met"] else "FAIL")
            v = c["value"]
            w("%-13s %s %-55s value %s%s\n" % (name, mark, c["goal"],
                                               "-" if v is None else "%.2f" % v,
                                               "  (%s)" % c["detail"] if c.get("detail") else ""))
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
            "    try:  # the proxy's own client, by choice (configure_upstream_client is gone)\n"
            "        from tornado_gateway.proxy import UPSTREAM_CLIENTS\n"
            "        out['classes'] = dict(UPSTREAM_CLIENTS)\n"
            "    except ImportError:  # an older gateway: what its configure call selects\n"
            "        for choice in getattr(server, 'UPSTREAM_CLIENTS', {}):\n"
            "            server.configure_upstream_client(\n"
            "                config.load_config({}, {'upstream': choice}))\n"
            "            c = AsyncHTTPClient.configured_class()\n"
            "            out['classes'][choice] = c.__module__ + '.' + c.__name__\n"
            "print(json.dumps(out))\n")
    out = subprocess.run([PY, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    try:
        return json.loads(out.stdout)
    except ValueError:
        return {}


def detect_loops() -> Dict[str, Any]:
    """The gateway's own event-loop setting, if it has one: its CLI option, default, and why
    uvloop cannot be used here (None when it can)."""
    code = ("import json\n"
            "from tornado_gateway import config\n"
            "out = {}\n"
            "if 'loop' in config.SETTINGS and hasattr(config, 'uvloop_problem'):\n"
            "    out['option'] = config.SETTINGS['loop'][1]\n"
            "    out['default'] = config.GatewayConfig().loop\n"
            "    out['problem'] = config.uvloop_problem()\n"
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
    parser.add_argument("--quick", action="store_true", help="short runs (~4 minutes; "
                        "--only analyze: 2.5)")
    parser.add_argument("--duration", type=int, help="seconds per load run")
    parser.add_argument("--repeats", type=int, help="interleaved repeats per tiny-GET row")
    parser.add_argument("--big-repeats", type=int, help="interleaved repeats per 1 GiB direction")
    parser.add_argument("--launches", type=int, help="launch/Ctrl+C trials per gateway")
    parser.add_argument("--analyze-duration", type=float, help="seconds per analyze load run")
    parser.add_argument("--analyze-repeats", type=int, help="interleaved repeats of analyze runs")
    parser.add_argument("--analyze-clients", default=ANALYZE_CLIENTS,
                        help="client counts of the analyze runs (default %s)" % ANALYZE_CLIENTS)
    parser.add_argument("--worker-limits", default="1,2,3",
                        help="--worker-limit values the limits phase compares (default 1,2,3)")
    parser.add_argument("--overload-clients", type=int, default=64)
    parser.add_argument("--overload-duration", type=float, help="seconds of the overload run")
    parser.add_argument("--overload-queue", type=int, default=16,
                        help="--queue-limit of the gateway under overload (default 16)")
    parser.add_argument("--size", default=str(GIB), help="bytes each way (default 1 GiB)")
    parser.add_argument("--connections", default="1,32")
    parser.add_argument("--load", choices=("auto", "wrk", "asyncio"), default="auto")
    parser.add_argument("--no-pool", action="store_true",
                        help="measure only the gateway as shipped (not its other upstream "
                             "client too)")
    parser.add_argument("--no-uvloop", action="store_true",
                        help="do not measure the gateway under --loop uvloop too (row "
                             "'gw uvloop')")
    parser.add_argument("--skip", default="",
                        help="comma list of phases to skip: %s; analyze = the whole analyze "
                             "section (analyze,limits,overload)" % ",".join(PHASES))
    parser.add_argument("--only", default="",
                        help="comma list of the only phases to run (names as --skip), e.g. "
                             "--only analyze")
    parser.add_argument("--json", default=os.path.join(RESULTS_DIR, "latest.json"))
    parser.add_argument("--profile", metavar="GATEWAY",
                        help="instead of the benchmark: run this gateway under cProfile during "
                             "a tiny-GET load at the highest --connections for --duration s "
                             "(default 5) and print where its time goes")
    parser.add_argument("--_loadgen", nargs=4, help=argparse.SUPPRESS)
    parser.add_argument("--_postload", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args._loadgen:
        port, path, conns, duration = args._loadgen
        print(json.dumps(asyncio.run(_loadgen(int(port), path, int(conns), float(duration)))))
        return 0
    if args._postload:
        print(json.dumps(asyncio.run(_postload(json.loads(args._postload)))))
        return 0

    profile = "quick" if args.quick else "full"
    p = dict(PROFILES[profile])
    for key, val in (("duration", args.duration), ("repeats", args.repeats),
                     ("big_repeats", args.big_repeats), ("launches", args.launches),
                     ("analyze_duration", args.analyze_duration),
                     ("analyze_repeats", args.analyze_repeats),
                     ("overload_duration", args.overload_duration)):
        if val is not None:
            p[key] = val
    size = int(args.size)
    conns_list = [int(c) for c in args.connections.split(",") if c.strip()]

    def phase_set(text: str) -> set:
        out = set()
        for x in (x.strip() for x in text.split(",") if x.strip()):
            if x not in PHASES:
                parser.error("unknown phase %r (phases: %s)" % (x, ", ".join(PHASES)))
            out.update(SECTIONS.get(x, (x,)))
        return out
    skip = phase_set(args.skip)
    if args.only:
        skip |= set(PHASES) - phase_set(args.only)
    analyze_clients = [int(c) for c in args.analyze_clients.split(",") if c.strip()]
    worker_limits = [int(c) for c in args.worker_limits.split(",") if c.strip()]

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
    loops = {} if args.no_uvloop else detect_loops()
    if loops.get("option"):
        # the same gateway on the other event loop (the shipped default is asyncio)
        if loops.get("default") != "uvloop" and not loops.get("problem"):
            variants.append(Variant("gw uvloop", "python -m tornado_gateway as shipped, with "
                                    "%s uvloop" % loops["option"], None,
                                    [loops["option"], "uvloop"]))
        elif loops.get("problem"):
            notes.append("no 'gw uvloop' row: %s" % loops["problem"])
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

        analyze_phases = {"analyze", "limits", "overload"} - skip
        if analyze_phases:
            raw["analyze"] = {}
            analyze_section(procs, env, data_dir, p, analyze_phases, analyze_clients,
                            worker_limits, args.overload_clients, args.overload_queue,
                            raw["analyze"])
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
    result["targets"] = check_targets(result["summary"], names, raw.get("analyze"))
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
