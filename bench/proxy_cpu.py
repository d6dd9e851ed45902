#!/usr/bin/env python
"""Gateway CPU per proxied request: the steadiest figure on a shared, noisy machine.

    python bench/proxy_cpu.py                         # this tree, ~1 minute
    python bench/proxy_cpu.py --variant base=/tmp/base --variant new=.  --rounds 5

Each variant is a directory holding a ``tornado_gateway`` package (put first on PYTHONPATH),
so an older version can be compared with the working tree (e.g. ``git archive HEAD
tornado_gateway | tar -x -C /tmp/base``). Every variant runs as shipped (``python -m
tornado_gateway --mode production``) with ``bench/backend.py`` (Flask on waitress) as child.
Per round, in an order that rotates from round to round, each variant gets a tiny GET load
with ``wrk`` (fixed duration) at 1 and at 32 keep-alive connections, directly on its child and
through the gateway. Reported per variant and connection count, as median (min..max) over the
rounds:

* ``cpu_us``: gateway process CPU (user + system, psutil) per request during the run;
* ``ratio``: gateway requests/s / direct requests/s (the adjacent direct run, same child);
* ``p50_ms``: gateway p50 latency (wrk).

``--calls N`` instead: each variant under cProfile (enabled only around the load) serves N
sequential keep-alive GETs; prints Python function calls per request, overall and for the
functions whose count differs most between variants. Deterministic: a check that a change
removes work, where CPU time on a busy machine is too noisy to show a few percent.

127.0.0.1 only; every process started here is stopped by PID at the end (also on error).
Results also go to ``bench/results/proxy_cpu.json``.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from typing import Any, Dict, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
BACKEND = os.path.join(HERE, "backend.py")
HOST = "127.0.0.1"
PATH = "/api/deepfake/tiny"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def cpu_s(pid: int) -> float:
    import psutil

    t = psutil.Process(pid).cpu_times()
    return t.user + t.system


def wrk(port: int, conns: int, duration: float) -> Dict[str, Any]:
    argv = ["wrk", "-t%d" % max(1, min(conns, 2)), "-c%d" % conns, "-d%ds" % duration,
            "--latency", "--timeout", "5s", "http://%s:%d%s" % (HOST, port, PATH)]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 20,
                         check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    n = int(re.search(r"(\d+) requests in", out).group(1))
    m = re.search(r"^\s+50%\s+([\d.]+)(us|ms|s)\b", out, re.M)
    p50 = float(m.group(1)) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[m.group(2)] if m else None
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if bad and int(bad.group(1)):
        raise RuntimeError("non-2xx responses:\n" + out)
    return {"rps": rps, "requests": n, "p50_ms": p50}


# The gateway's command line under cProfile, enabled by SIGUSR1, stopped and dumped by SIGUSR2.
PROFILE_BOOT = ("import cProfile, signal, sys\n"
                "prof = cProfile.Profile()\n"
                "signal.signal(signal.SIGUSR1, lambda *_: prof.enable())\n"
                "def stop(*_):\n"
                "    prof.disable()\n"
                "    prof.dump_stats(sys.argv[1])\n"
                "signal.signal(signal.SIGUSR2, stop)\n"
                "from tornado_gateway.__main__ import main\n"
                "sys.exit(main(sys.argv[2:]))\n")


def sequential_gets(port: int, n: int) -> None:
    """``n`` GETs one after the other on one keep-alive connection (Content-Length bodies)."""
    req = ("GET %s HTTP/1.1\r\nHost: %s:%d\r\n\r\n" % (PATH, HOST, port)).encode()
    with socket.create_connection((HOST, port), timeout=10) as s:
        buf = b""
        for _ in range(n):
            s.sendall(req)
            while b"\r\n\r\n" not in buf:
                buf += s.recv(65536)
            head, _, buf = buf.partition(b"\r\n\r\n")
            if not head.startswith(b"HTTP/1.1 200"):
                raise RuntimeError("unexpected answer: %r" % head[:200])
            length = int(re.search(rb"(?im)^content-length:\s*(\d+)", head).group(1))
            while len(buf) < length:
                buf += s.recv(65536)
            buf = buf[length:]


class Gateway:
    def __init__(self, name: str, src: str, env: Dict[str, str], log_dir: str,
                 profile_to: Optional[str] = None) -> None:
        self.name = name
        self.gport, self.fport = free_port(), free_port()
        # cwd too: "-m"/"-c" put the working directory first on sys.path, before PYTHONPATH
        env = dict(env, PYTHONPATH=os.path.abspath(src))
        self.log = open(os.path.join(log_dir, "proxy_cpu-%s.log" % name), "ab")
        boot = ["-m", "tornado_gateway"] if profile_to is None else ["-c", PROFILE_BOOT, profile_to]
        self.proc = subprocess.Popen(
            [sys.executable] + boot + ["--host", HOST, "--port", str(self.gport),
             "--flask-port", str(self.fport), "--flask-script", BACKEND, "--mode",
             "production"], cwd=os.path.abspath(src), env=env, stdin=subprocess.DEVNULL, stdout=self.log,
            stderr=subprocess.STDOUT, start_new_session=True)

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("gateway %s exited (%s)" % (self.name, self.proc.returncode))
            with contextlib.suppress(Exception):
                with urllib.request.urlopen("http://%s:%d%s" % (HOST, self.gport, PATH),
                                            timeout=2) as r:
                    if r.status == 200:
                        return
            time.sleep(0.1)
        raise RuntimeError("gateway %s not ready" % self.name)

    def stop(self) -> None:
        import psutil

        try:
            kids = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.Error:
            kids = []
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGINT)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        _gone, alive = psutil.wait_procs(kids, timeout=3)
        for p in alive:
            with contextlib.suppress(psutil.Error):
                p.kill()
        self.log.close()


def spread(vals: List[float]) -> Dict[str, float]:
    return {"median": statistics.median(vals), "min": min(vals), "max": max(vals)}


def count_calls(variants: List[List[str]], env: Dict[str, str], log_dir: str, n: int) -> int:
    import pstats

    per_func: Dict[str, Dict[str, float]] = {}
    for name, src in variants:
        out = os.path.join(tempfile.mkdtemp(prefix="proxy_cpu-prof-"), "gw.prof")
        gw = Gateway(name, src, env, log_dir, profile_to=out)
        try:
            gw.wait_ready()
            sequential_gets(gw.gport, 200)  # warm-up, not profiled
            os.kill(gw.proc.pid, signal.SIGUSR1)
            time.sleep(0.2)
            sequential_gets(gw.gport, n)
            time.sleep(0.2)
            os.kill(gw.proc.pid, signal.SIGUSR2)
            for _ in range(100):
                if os.path.exists(out) and os.path.getsize(out):
                    break
                time.sleep(0.05)
            time.sleep(0.3)
        finally:
            gw.stop()
        stats = pstats.Stats(out).stats  # type: ignore[attr-defined]
        total = 0
        loops = sum(v[1] for k, v in stats.items() if k[2] == "_run_once")
        for (filename, line, func), (_cc, nc, _tt, _ct, _callers) in stats.items():
            if "select" in func and ("epoll" in func or filename.endswith("selectors.py")):
                continue
            total += nc
            key = "%s:%d(%s)" % (filename.split("site-packages" + os.sep)[-1]
                                 .replace(os.path.abspath(src) + os.sep, ""),
                                 line if "tornado_gateway" not in filename else 0, func)
            per_func.setdefault(key, {})[name] = per_func.get(key, {}).get(name, 0) + nc / n
        print("%-9s %7.0f Python-level calls, %5.1f event-loop iterations per request"
              % (name, total / n, loops / n))
    names = [name for name, _ in variants]
    if len(names) > 1:
        diffs = sorted(per_func.items(), key=lambda kv: -abs(
            kv[1].get(names[-1], 0) - kv[1].get(names[0], 0)))
        print("\ncalls/request  %s" % "  ".join("%8s" % x for x in names))
        for key, counts in diffs[:40]:
            print("  %s  %s" % ("  ".join("%8.1f" % counts.get(x, 0) for x in names), key))
    return 0


def sequential_cpu(variants: List[List[str]], env: Dict[str, str], log_dir: str, n: int,
                   rounds: int) -> int:
    """Gateway CPU per request over ``n`` sequential GETs on one connection, variants
    alternating for ``rounds``; the minimum is the figure least inflated by other load."""
    gateways = [Gateway(name, src, env, log_dir) for name, src in variants]
    cpu: Dict[str, List[float]] = {gw.name: [] for gw in gateways}
    try:
        for gw in gateways:
            gw.wait_ready()
            sequential_gets(gw.gport, 200)
        for r in range(rounds):
            for gw in gateways[r % len(gateways):] + gateways[:r % len(gateways)]:
                before = cpu_s(gw.proc.pid)
                sequential_gets(gw.gport, n)
                cpu[gw.name].append((cpu_s(gw.proc.pid) - before) / n * 1e6)
                print("round %d %-8s %6.0f us/req" % (r, gw.name, cpu[gw.name][-1]),
                      file=sys.stderr, flush=True)
    finally:
        for gw in gateways:
            gw.stop()
    print("\nvariant   gateway CPU us/req, %d sequential GETs x %d rounds: min / median (max)"
          % (n, rounds))
    for name, vals in cpu.items():
        print("%-9s %5.0f / %5.0f (%5.0f)" % (name, min(vals), statistics.median(vals), max(vals)))
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--variant", action="append", default=[],
                    help="name=DIR (DIR holds a tornado_gateway package); default this tree")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", type=int, default=3, help="seconds per wrk run")
    ap.add_argument("--conns", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--calls", type=int, default=0, metavar="N",
                    help="count Python calls per request over N requests instead")
    ap.add_argument("--seq", type=int, default=0, metavar="N",
                    help="instead: CPU per request over N sequential GETs (own client), "
                         "--rounds times per variant, alternating")
    args = ap.parse_args(argv)
    variants = [v.split("=", 1) for v in args.variant] or [["tree", ROOT]]
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("GATEWAY_", "FLASK_", "DEEPFAKE_", "TORNADO_GATEWAY"))}
    data_dir = tempfile.mkdtemp(prefix="proxy_cpu-")
    env["DEEPFAKE_DATA_DIR"] = data_dir
    log_dir = os.path.join(HERE, "results", "logs")
    os.makedirs(log_dir, exist_ok=True)
    if args.calls:
        return count_calls(variants, env, log_dir, args.calls)
    if args.seq:
        return sequential_cpu(variants, env, log_dir, args.seq, args.rounds)
    gateways: List[Gateway] = []
    raw: Dict[str, Dict[int, List[Dict[str, float]]]] = {
        name: {c: [] for c in args.conns} for name, _ in variants}
    try:
        for name, src in variants:
            gateways.append(Gateway(name, src, env, log_dir))
        for gw in gateways:
            gw.wait_ready()
            wrk(gw.gport, 8, 1)  # warm-up: upstream pool, imports, caches
        for r in range(args.rounds):
            order = gateways[r % len(gateways):] + gateways[:r % len(gateways)]
            for conns in args.conns:
                for gw in order:
                    direct = wrk(gw.fport, conns, args.duration)
                    before = cpu_s(gw.proc.pid)
                    res = wrk(gw.gport, conns, args.duration)
                    used = cpu_s(gw.proc.pid) - before
                    row = {"cpu_us": used / res["requests"] * 1e6,
                           "ratio": res["rps"] / direct["rps"], "rps": res["rps"],
                           "direct_rps": direct["rps"], "p50_ms": res["p50_ms"],
                           "direct_p50_ms": direct["p50_ms"]}
                    raw[gw.name][conns].append(row)
                    print("round %d %-8s c=%-3d cpu %6.0f us/req  ratio %.2f  rps %6.0f "
                          "(direct %6.0f)  p50 %.2f ms (direct %.2f)"
                          % (r, gw.name, conns, row["cpu_us"], row["ratio"], row["rps"],
                             row["direct_rps"], row["p50_ms"] or 0, row["direct_p50_ms"] or 0),
                          file=sys.stderr, flush=True)
    finally:
        for gw in gateways:
            gw.stop()
    summary: Dict[str, Any] = {}
    print("\nvariant   conns  cpu_us/req          ratio gw/direct     p50 ms (gateway)")
    for name, _ in variants:
        for conns in args.conns:
            rows = raw[name][conns]
            s = {k: spread([row[k] for row in rows]) for k in ("cpu_us", "ratio", "p50_ms")}
            summary["%s/c%d" % (name, conns)] = s
            print("%-9s %5d  %4.0f (%4.0f..%4.0f)   %.2f (%.2f..%.2f)    %.2f (%.2f..%.2f)"
                  % (name, conns, *[s["cpu_us"][k] for k in ("median", "min", "max")],
                     *[s["ratio"][k] for k in ("median", "min", "max")],
                     *[s["p50_ms"][k] for k in ("median", "min", "max")]))
    with open(os.path.join(HERE, "results", "proxy_cpu.json"), "w") as f:
        json.dump({"summary": summary, "raw": raw, "args": vars(args)}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
