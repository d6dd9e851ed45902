"""Quick figures: a tiny GET direct to waitress vs through a minimal Tornado proxy.

Compares the proxy on ``SimpleAsyncHTTPClient`` (a new upstream connection per request)
with :class:`tornado_gateway.http.client.UpstreamHTTPClient` (upstream keep-alive), at 1 and 32
concurrent keep-alive client connections, and prints requests/s and the ratio to direct.
127.0.0.1 only, bounded (~20 s with the defaults). Backend, proxy and load generator run as separate
processes so that they do not share one event loop (they do share the machine's cores,
so treat the figures as rough; the full benchmark is elsewhere).

    python bench/pool_quick.py [--duration 1] [--rounds 2] [--concurrency 1 32]
                               [--app wsgi|flask]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time

HERE = os.path.abspath(__file__)
ROOT = os.path.dirname(os.path.dirname(HERE))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------- backend


def run_backend(port: int, app_kind: str = "wsgi") -> None:
    import logging

    import waitress  # the child's production server, as in the gateway

    # waitress warns "Task queue depth is N" whenever requests wait for a thread.
    logging.getLogger("waitress.queue").setLevel(logging.ERROR)

    body = json.dumps({"ok": True, "score": 0.5}).encode()

    def wsgi_app(environ, start_response):  # type: ignore[no-untyped-def]
        start_response(
            "200 OK",
            [("Content-Type", "application/json"), ("Content-Length", str(len(body)))],
        )
        return [body]

    app = wsgi_app
    if app_kind == "flask":  # what the gateway's child really is
        from flask import Flask

        app = Flask("bench")
        app.route("/")(lambda: {"ok": True, "score": 0.5})
    waitress.serve(app, host="127.0.0.1", port=port, _quiet=True)


# ----------------------------------------------------------------------- proxy


def run_proxy(port: int, upstream_port: int, client: str) -> None:
    sys.path.insert(0, ROOT)
    from tornado.httpclient import AsyncHTTPClient
    from tornado.ioloop import IOLoop
    from tornado.web import Application, RequestHandler

    if client == "pool":
        AsyncHTTPClient.configure(
            "tornado_gateway.http.client.UpstreamHTTPClient", max_clients=64
        )
    else:
        AsyncHTTPClient.configure(
            "tornado.simple_httpclient.SimpleAsyncHTTPClient", max_clients=64
        )
    upstream = f"http://127.0.0.1:{upstream_port}/"

    class Proxy(RequestHandler):
        async def get(self) -> None:
            resp = await AsyncHTTPClient().fetch(
                upstream,
                raise_error=False,
                decompress_response=False,
                follow_redirects=False,
            )
            self.set_status(resp.code)
            self.set_header("Content-Type", resp.headers.get("Content-Type", ""))
            self.write(resp.body)

    Application([("/", Proxy)]).listen(port, "127.0.0.1")
    IOLoop.current().start()


# ----------------------------------------------------------------------- load


async def _worker(port: int, stop_at: float, counts: list[int]) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    req = b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    try:
        while time.monotonic() < stop_at:
            writer.write(req)
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                if line[:15].lower() == b"content-length:":
                    length = int(line[15:])
            await reader.readexactly(length)
            if not head.startswith(b"HTTP/1.1 200"):
                raise RuntimeError(head[:40])
            counts[0] += 1
    finally:
        writer.close()


async def _load(port: int, concurrency: int, duration: float) -> tuple[float, int]:
    """Requests/s after a short warm-up, and the number of requests including it."""
    warm = [0]
    await asyncio.gather(
        *(_worker(port, time.monotonic() + 0.3, warm) for _ in range(concurrency))
    )
    counts = [0]
    start = time.monotonic()
    await asyncio.gather(
        *(_worker(port, start + duration, counts) for _ in range(concurrency))
    )
    return counts[0] / (time.monotonic() - start), warm[0] + counts[0]


def run_load(port: int, concurrency: int, duration: float) -> None:
    print(json.dumps(asyncio.run(_load(port, concurrency, duration))))


# ----------------------------------------------------------------------- driver


def spawn(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, HERE, *args])


def wait_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listening on {port}")


def cpu_seconds(pid: int) -> float:
    import psutil  # already a gateway dependency (process trees)

    times = psutil.Process(pid).cpu_times()
    return times.user + times.system


def measure(port: int, concurrency: int, duration: float, pid: int) -> tuple[float, float]:
    """Requests/s, and CPU microseconds per request of the server process ``pid``.

    CPU per request hardly depends on what else the machine is doing, unlike r/s.
    """
    before = cpu_seconds(pid)
    out = subprocess.run(
        [sys.executable, HERE, "load", str(port), str(concurrency), str(duration)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    rps, total = json.loads(out)
    return rps, (cpu_seconds(pid) - before) / max(total, 1) * 1e6


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] in ("backend", "proxy", "load"):
        role, args = sys.argv[1], sys.argv[2:]
        if role == "backend":
            run_backend(int(args[0]), args[1])
        elif role == "proxy":
            run_proxy(int(args[0]), int(args[1]), args[2])
        else:
            run_load(int(args[0]), int(args[1]), float(args[2]))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=1.0, help="seconds per run")
    parser.add_argument(
        "--rounds",
        type=int,
        default=2,
        help="runs per figure, interleaved direct/simple/pool; the median is shown "
        "(interleaving keeps a load change on the machine from favouring one side)",
    )
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 32])
    parser.add_argument(
        "--app",
        choices=["wsgi", "flask"],
        default="wsgi",
        help="backend: a bare WSGI function or a Flask app (both on waitress)",
    )
    opts = parser.parse_args()

    backend_port, simple_port, pool_port = free_port(), free_port(), free_port()
    procs = [spawn("backend", str(backend_port), opts.app)]
    try:
        procs.append(spawn("proxy", str(simple_port), str(backend_port), "simple"))
        procs.append(spawn("proxy", str(pool_port), str(backend_port), "pool"))
        for p in (backend_port, simple_port, pool_port):
            wait_port(p)
        print(f"backend: waitress + {opts.app}; cpu = server process CPU us/request")
        print(f"{'conc':>4} {'direct r/s':>11} {'simple r/s':>11} {'pool r/s':>9}"
              f" {'simple/direct':>14} {'pool/direct':>12}"
              f" {'cpu backend':>12} {'cpu simple':>11} {'cpu pool':>9}")
        pids = {backend_port: procs[0].pid, simple_port: procs[1].pid,
                pool_port: procs[2].pid}
        for c in opts.concurrency:
            runs: dict[int, list[tuple[float, float]]] = {p: [] for p in pids}
            for _ in range(opts.rounds):
                for port, pid in pids.items():
                    runs[port].append(measure(port, c, opts.duration, pid))
            (direct, simple, pool), (cpu_b, cpu_s, cpu_p) = (
                [statistics.median(r[i] for r in runs[p]) for p in pids] for i in (0, 1)
            )
            print(f"{c:>4} {direct:>11.0f} {simple:>11.0f} {pool:>9.0f}"
                  f" {simple / direct:>14.2f} {pool / direct:>12.2f}"
                  f" {cpu_b:>12.0f} {cpu_s:>11.0f} {cpu_p:>9.0f}")
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


if __name__ == "__main__":
    main()
