#!/usr/bin/env python
"""The service's store engines compared through the real gateway: SQLite vs PostgreSQL.

    python bench/store_bench.py                  # full run, ~3-4 minutes
    python bench/store_bench.py --repeats 1 --requests 50 --trials 1   # smoke run, ~1 minute
    python bench/store_bench.py --pg-fsync off   # PostgreSQL as tests/servers.py runs it

One run starts a private PostgreSQL cluster (Debian's initdb/pg_ctl, as the ``postgres`` user
when run as root, on a free 127.0.0.1 port, in a temporary directory) and two gateways, one
per engine, each ``python -m tornado_gateway`` in production with two workers, configured by
environment only (``GATEWAY_ENV=production``, ``FLASK_WORKERS=2``, ``GATEWAY_PORT``,
``FLASK_PORT``, ``FLASK_SCRIPT=python/api_server.py``, ``DEEPFAKE_DATA_DIR`` a fresh
directory, ``DEEPFAKE_MIN_FEEDBACK_PER_LABEL=2``; the PostgreSQL one also
``DEEPFAKE_DATABASE_URL=postgresql://...`` naming a fresh database of that cluster). Then,
interleaved (each repeat runs both engines, in an order that rotates from one repeat to the
next, so the machine's noise hits both), each figure min / median / max over the repeats:

1. analyze: ``POST /api/deepfake/analyze`` through the gateway, keep-alive clients sending one
   request after another, cycling through the same 8 realistic 1024x1024 JPEGs (the astronaut
   photo of ``bench.py``, 4 orientations x quality 90/95, ~200-260 KB) on both engines; at 1 and
   4 clients, ``--requests`` (default 200) answers per run counted after a warm-up of 2 per
   client; p50/p99 per run and pooled over the repeats, the service's own ``elapsed_ms``
   (decode, pointer read, analysis, insert), and PostgreSQL - SQLite p50 per repeat (the
   target: PostgreSQL within +3 ms p50);
2. promotion: fresh separable labels (2 real ``pink_noise`` + 2 generated
   ``nearest_upsampled`` 256x256 PNGs of ``tests/service/service_images.py``, new seeds each
   trial) through the gateway, then ``POST /api/deepfake/retrain``; meanwhile both workers are
   polled directly on their own ports (FLASK_PORT, FLASK_PORT+1) with ``GET /stats`` every
   5 ms; the time from the retrain's answer (new model_version) until every worker has answered
   with that version (a poll answered before the retrain's answer counts as 0), and whether
   any poll *sent* after the answer still named the old version (must never happen);
3. feedback writes/s through the gateway at 4 clients: labels by ``analysis_id`` (JSON, the
   analyses made in step 1, labels alternating) and by upload (distinct 256x256 PNGs, new
   ones each run, so every one is an insert);
4. in-process (this process, gateways stopped, same databases): ``Store.current_model_id()``
   (the per-request model-version check), and, to see where PostgreSQL's time goes, a pool
   checkout alone (``db.read()``), ``SELECT 1``, ``add_analysis`` (the analyze's write) and
   ``counts()``: microseconds min / median / p99.

PostgreSQL runs with ``fsync=on`` by default (``--pg-fsync on``), durable like the SQLite
engine's ``synchronous=FULL``; ``tests/servers.py`` runs it with ``fsync=off`` (``--pg-fsync
off`` does the same here). Every process is on 127.0.0.1 with free ports, every load run is
bounded (count and time), the whole run by ``--max-seconds``; every process started here is
stopped by PID at the end (the cluster by ``pg_ctl stop``), also on error or Ctrl+C.
Results: a table on stdout and ``bench/results/store-<UTC timestamp>.json``; the gateways'
logs in ``bench/results/logs/store-*.log``.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import datetime
import io
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict, Iterator, List, Optional, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for _p in (HERE, os.path.join(ROOT, "tests"), os.path.join(ROOT, "tests", "service"),
           os.path.join(ROOT, "python")):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import bench as B  # noqa: E402  bench/bench.py: processes, ports, the HTTP client pieces

PY = sys.executable
HOST = B.HOST
RESULTS_DIR = B.RESULTS_DIR
ENGINES = ("sqlite", "postgresql")
TARGET_P50_DIFF_MS = 3.0
API = "/api/deepfake"


def log(msg: str) -> None:
    print("[store %s] %s" % (time.strftime("%H:%M:%S"), msg), file=sys.stderr, flush=True)


def pct(vals: List[float], p: float) -> Optional[float]:
    return B._pct(sorted(vals), p)


def dist(vals: List[float]) -> Optional[Dict[str, float]]:
    if not vals:
        return None
    s = sorted(vals)
    return {"n": len(s), "min": s[0], "p50": B._pct(s, 50), "p90": B._pct(s, 90),
            "p99": B._pct(s, 99), "max": s[-1]}


class BudgetExceeded(Exception):
    pass


# ============================================================================ PostgreSQL

@contextlib.contextmanager
def pg_cluster(fsync: bool) -> Iterator[str]:
    """A private cluster (tests/servers.py's), fsync as asked; yields the admin URL (database
    ``postgres``). fsync is a command-line setting there: ALTER SYSTEM could not switch it."""
    import servers

    with servers.postgres_cluster("bench_unused", fsync=fsync) as url:
        yield url.rsplit("/", 1)[0] + "/postgres"


def pg_settings(admin_url: str) -> Dict[str, str]:
    import psycopg

    with psycopg.connect(admin_url, autocommit=True) as conn:
        out = {}
        for name in ("server_version", "fsync", "synchronous_commit", "wal_sync_method",
                     "shared_buffers"):
            out[name] = conn.execute("SHOW %s" % name).fetchone()[0]
        return out


# ============================================================================ inputs

def analyze_images() -> Tuple[List[bytes], str]:
    """8 realistic 1024x1024 JPEGs of similar cost: bench.py's astronaut photo in 4
    orientations x JPEG quality 90 / 95."""
    from PIL import Image

    jpeg, source = B.make_jpeg(1024, 95)
    base = Image.open(io.BytesIO(jpeg)).convert("RGB")
    out = []
    for rot in (0, 90, 180, 270):
        img = base.rotate(rot) if rot else base
        for q in (90, 95):
            buf = io.BytesIO()
            img.save(buf, "JPEG", quality=q)
            out.append(buf.getvalue())
    return out, source + "; x4 orientations x quality 90/95"


def label_png(seed: int, fake: bool) -> bytes:
    from service_images import encode, nearest_upsampled, pink_noise

    img = pink_noise(256, seed=seed)
    return encode(nearest_upsampled(img) if fake else img)


def multipart(data: bytes, filename: str, ctype: str) -> Tuple[bytes, str]:
    boundary = "storebench5c1e"
    body = (("--%s\r\nContent-Disposition: form-data; name=\"file\"; filename=\"%s\"\r\n"
             "Content-Type: %s\r\n\r\n" % (boundary, filename, ctype)).encode() + data
            + ("\r\n--%s--\r\n" % boundary).encode())
    return body, "multipart/form-data; boundary=%s" % boundary


# ============================================================================ the gateways

class Target:
    """``python -m tornado_gateway`` configured by environment only, with its own data
    directory (and, for PostgreSQL, its own database)."""

    def __init__(self, procs: B.Processes, engine: str, env: Dict[str, str], data_dir: str,
                 database_url: Optional[str], workers: int) -> None:
        self.engine = engine
        self.procs = procs
        self.workers = workers
        self.data_dir = data_dir
        self.database_url = database_url
        self.port = B.free_port()
        self.fport = B.free_port_block(workers)
        self.env = dict(env, GATEWAY_ENV="production", FLASK_WORKERS=str(workers),
                        GATEWAY_HOST=HOST, GATEWAY_PORT=str(self.port), FLASK_HOST=HOST,
                        FLASK_PORT=str(self.fport), FLASK_SCRIPT=B.SERVICE,
                        DEEPFAKE_DATA_DIR=data_dir, DEEPFAKE_MIN_FEEDBACK_PER_LABEL="2")
        if database_url:
            self.env["DEEPFAKE_DATABASE_URL"] = database_url
        self.t_launch = time.monotonic()
        self.proc = procs.spawn([PY, "-m", "tornado_gateway"], "store-%s" % engine, self.env)
        self.worker_pids: List[int] = []
        self.ready_ms: Optional[float] = None

    @property
    def worker_ports(self) -> List[int]:
        return [self.fport + i for i in range(self.workers)]

    def wait(self, timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("the %s gateway exited (%s) while starting; see "
                                   "bench/results/logs/store-%s.log"
                                   % (self.engine, self.proc.returncode, self.engine))
            with contextlib.suppress(OSError, asyncio.TimeoutError, ValueError, IndexError,
                                     KeyError, TypeError):
                code, body = asyncio.run(B.http_get(self.port, "/api/gateway/status", 2.0))
                workers = json.loads(body)["service"].get("workers") or [] if code == 200 else []
                if len(workers) == self.workers and all(w["state"] == "ready" for w in workers):
                    self.worker_pids = [w["pid"] for w in workers]
                    break
            time.sleep(0.05)
        else:
            raise RuntimeError("the %s gateway was not ready within %.0f s" % (self.engine,
                                                                              timeout))
        self.ready_ms = (time.monotonic() - self.t_launch) * 1000.0
        self.procs.remember_children(self.proc)

    def analyses_stored(self) -> int:
        """Rows in the engine's own analyses table: proof that this gateway's workers use
        the engine they were told to."""
        if self.database_url:
            import psycopg

            with psycopg.connect(self.database_url) as conn:
                return int(conn.execute("SELECT COUNT(*) FROM analyses").fetchone()[0])
        import sqlite3

        with contextlib.closing(sqlite3.connect(os.path.join(self.data_dir,
                                                             "deepfake.sqlite3"))) as c:
            return int(c.execute("SELECT COUNT(*) FROM analyses").fetchone()[0])

    def describe(self) -> Dict[str, Any]:
        return {"engine": self.engine, "pid": self.proc.pid, "worker_pids": self.worker_pids,
                "gateway_port": self.port, "worker_ports": self.worker_ports,
                "ready_ms": self.ready_ms, "data_dir": self.data_dir,
                "database_url": self.database_url,
                "env": {k: v for k, v in self.env.items()
                        if k.startswith(("GATEWAY_", "FLASK_", "DEEPFAKE_"))}}


# ============================================================================ load generator

async def _load(spec: Dict[str, Any]) -> Dict[str, Any]:
    """``clients`` keep-alive clients, each sending the next of ``requests_file``'s requests
    (a shared cycle) as soon as its previous one is answered, until ``count`` answers after
    the first ``warmup`` requests are in (or ``max_seconds``)."""
    with open(spec["requests_file"]) as f:
        reqs = []
        for r in json.load(f):
            body = base64.b64decode(r["body"])
            head = ("POST %s HTTP/1.1\r\nHost: %s:%d\r\nContent-Type: %s\r\n"
                    "Content-Length: %d\r\n\r\n" % (r["path"], HOST, spec["port"], r["ctype"],
                                                    len(body))).encode()
            reqs.append(head + body)
    loop = asyncio.get_running_loop()
    st: Dict[str, Any] = {"next": 0, "measured": 0, "lat": [], "service_ms": [],
                          "statuses": {}, "errors": {}, "ids": [], "t_first": None,
                          "t_last": None, "conn_errors": 0}
    deadline = time.monotonic() + spec["max_seconds"]
    warmup, count, timeout = spec["warmup"], spec["count"], spec["timeout"]
    want_ids = spec.get("collect_ids", 0)

    async def client() -> None:
        conn: Optional[B._Exchange] = None
        try:
            while st["measured"] < count and time.monotonic() < deadline:
                if conn is None or conn.closed:
                    if conn is not None:
                        conn.transport.close()
                    try:
                        _t, conn = await asyncio.wait_for(loop.create_connection(
                            lambda: B._Exchange(loop), HOST, spec["port"]), timeout)
                    except (OSError, asyncio.TimeoutError):
                        st["conn_errors"] += 1
                        conn = None
                        await asyncio.sleep(0.05)
                        continue
                i = st["next"]
                st["next"] += 1
                measured = i >= warmup
                t0 = time.perf_counter()
                if measured and st["t_first"] is None:
                    st["t_first"] = t0
                conn.transport.write(reqs[i % len(reqs)])
                try:
                    answer = await asyncio.wait_for(B._read_answer(conn), timeout)
                except asyncio.TimeoutError:
                    answer = None
                if answer is None:
                    st["conn_errors"] += 1
                    conn.transport.abort()
                    conn = None
                    continue
                t1 = time.perf_counter()
                status, headers, data, used = answer
                del conn.buf[:used]
                st["statuses"][str(status)] = st["statuses"].get(str(status), 0) + 1
                ok = status in (200, 201)
                doc: Dict[str, Any] = {}
                if ok and (want_ids or spec.get("service_ms")):
                    with contextlib.suppress(ValueError):
                        doc = json.loads(data)
                if not ok:
                    with contextlib.suppress(ValueError, AttributeError):
                        err = str(json.loads(data).get("error"))
                        st["errors"][err] = st["errors"].get(err, 0) + 1
                if ok and len(st["ids"]) < want_ids and doc.get("analysis_id"):
                    st["ids"].append(doc["analysis_id"])
                if measured and ok:
                    st["measured"] += 1
                    st["lat"].append((t1 - t0) * 1000.0)
                    st["t_last"] = t1
                    if doc.get("elapsed_ms") is not None:
                        st["service_ms"].append(float(doc["elapsed_ms"]))
                if headers.get("connection", "").lower() == "close":
                    conn.transport.close()
                    conn = None
        finally:
            if conn is not None:
                conn.transport.close()

    await asyncio.gather(*(client() for _ in range(spec["clients"])))
    window = ((st["t_last"] - st["t_first"]) if st["t_first"] and st["t_last"] else 0.0)
    lat = sorted(st["lat"])
    return {"clients": spec["clients"], "requests": len(lat), "warmup": warmup,
            "window_s": window, "rps": len(lat) / window if window else None,
            "p50_ms": B._pct(lat, 50), "p90_ms": B._pct(lat, 90), "p99_ms": B._pct(lat, 99),
            "max_ms": lat[-1] if lat else None, "lat_ms": lat,
            "service_ms": st["service_ms"],
            "service_p50_ms": statistics.median(st["service_ms"]) if st["service_ms"] else None,
            "statuses": st["statuses"], "errors": st["errors"],
            "conn_errors": st["conn_errors"], "ids": st["ids"],
            "complete": len(lat) >= count}


def write_requests(path: str, reqs: List[Tuple[str, bytes, str]]) -> str:
    with open(path, "w") as f:
        json.dump([{"path": p, "body": base64.b64encode(b).decode(), "ctype": c}
                   for p, b, c in reqs], f)
    return path


def run_load(port: int, requests_file: str, clients: int, warmup: int, count: int,
             max_seconds: float, collect_ids: int = 0, service_ms: bool = False,
             timeout: float = 60.0) -> Dict[str, Any]:
    """The load generator in a process of its own (not this one's GIL), bounded."""
    spec = {"port": port, "requests_file": requests_file, "clients": clients, "warmup": warmup,
            "count": count, "max_seconds": max_seconds, "collect_ids": collect_ids,
            "service_ms": service_ms, "timeout": timeout}
    argv = [PY, os.path.abspath(__file__), "--_load", json.dumps(spec)]
    return json.loads(B.bounded_output(argv, max_seconds + timeout + 30))


# ============================================================================ HTTP helpers

async def http_request(port: int, method: str, path: str, body: bytes = b"",
                       ctype: str = "application/json", timeout: float = 30.0
                       ) -> Tuple[int, bytes]:
    """One request on a new connection (Connection: close): (status, body)."""
    async def go() -> Tuple[int, bytes]:
        reader, writer = await asyncio.open_connection(HOST, port)
        try:
            head = ("%s %s HTTP/1.1\r\nHost: %s:%d\r\nConnection: close\r\n"
                    "Content-Type: %s\r\nContent-Length: %d\r\n\r\n"
                    % (method, path, HOST, port, ctype, len(body))).encode()
            writer.write(head + body)
            data = await reader.read()
        finally:
            writer.close()
        got = B.parse_answer(bytearray(data), True)
        if got is None:
            return 0, b""
        return got[0], got[2]
    return await asyncio.wait_for(go(), timeout)


def stats_version(port: int) -> Optional[str]:
    code, body = asyncio.run(http_request(port, "GET", API + "/stats", timeout=10))
    if code != 200:
        raise RuntimeError("GET stats on %d: %s" % (port, code))
    return ((json.loads(body).get("model") or {}).get("version"))


# ============================================================================ phases

def analyze_phase(targets: Dict[str, Target], reqfile: str, clients_list: List[int],
                  repeats: int, count: int, runs: Dict[str, Dict[str, List[Dict[str, Any]]]],
                  ids: Dict[str, List[str]]) -> None:
    for e in targets:
        runs[e] = {str(c): [] for c in clients_list}
    for r in range(repeats):
        for e in B.rotation(list(targets), r):
            t = targets[e]
            line = "analyze rep %d/%d %-10s" % (r + 1, repeats, e)
            for c in clients_list:
                res = run_load(t.port, reqfile, c, 2 * c, count, max_seconds=120,
                               collect_ids=2000, service_ms=True)
                ids[e].extend(res.pop("ids"))
                res["repeat"] = r
                runs[e][str(c)].append(res)
                bad = sum(v for k, v in res["statuses"].items() if k != "200")
                line += "  c=%d n=%d %5.1f/s p50 %5.1f p99 %5.1f svc %5.1f%s" % (
                    c, res["requests"], res["rps"] or 0, res["p50_ms"] or -1,
                    res["p99_ms"] or -1, res["service_p50_ms"] or -1,
                    " BAD %s" % res["statuses"] if bad or res["conn_errors"] else "")
            log(line)


async def _promotion(target: Target, old_version: Optional[str],
                     timeout: float) -> Dict[str, Any]:
    """POST retrain through the gateway while polling every worker's own /stats every 5 ms."""
    polls: Dict[int, List[Tuple[float, float, Optional[str]]]] = {p: []
                                                                  for p in target.worker_ports}
    state: Dict[str, Any] = {"answer_t": None, "new": None, "done": False}

    async def poll(port: int) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end and not state["done"]:
            t0 = time.monotonic()
            try:
                code, body = await http_request(port, "GET", API + "/stats", timeout=10)
                version = (json.loads(body).get("model") or {}).get("version") \
                    if code == 200 else None
            except (OSError, asyncio.TimeoutError, ValueError):
                version = None
            polls[port].append((t0, time.monotonic(), version))
            if state["new"] is not None and all(
                    any(v == state["new"] for _, _, v in polls[p]) for p in polls):
                # every worker has named it: a little more for the "sent after" check
                if all(any(s >= state["answer_t"] for s, _, _ in polls[p]) for p in polls):
                    state["done"] = True
                    return
            await asyncio.sleep(0.005)

    async def retrain() -> Tuple[int, bytes]:
        try:
            t0 = time.monotonic()
            code, body = await http_request(target.port, "POST", API + "/retrain",
                                            timeout=timeout)
            state["answer_t"] = time.monotonic()
            state["retrain_s"] = state["answer_t"] - t0
            doc = json.loads(body) if body else {}
            if code == 200 and doc.get("replaced") and doc.get("model_version") != old_version:
                state["new"] = doc["model_version"]
            else:
                state["done"] = True
            return code, body
        except BaseException:
            state["done"] = True
            raise

    results = await asyncio.gather(retrain(), *(poll(p) for p in polls))
    code, body = results[0]
    doc = json.loads(body) if body else {}
    out: Dict[str, Any] = {"status": code, "replaced": doc.get("replaced"),
                           "old_version": old_version, "new_version": state["new"],
                           "retrain_s": state.get("retrain_s"), "reason": doc.get("reason"),
                           "polls": {str(p): len(v) for p, v in polls.items()}}
    if state["new"] is None:
        return out
    ta = state["answer_t"]
    per_worker = {}
    stale_after = 0
    for p, samples in polls.items():
        first = next((done for _, done, v in samples if v == state["new"]), None)
        # a poll sent after the retrain's answer must name the new version
        stale_after += sum(1 for sent, _, v in samples if sent >= ta and v != state["new"])
        seen_before = first is not None and first <= ta
        per_worker[str(p)] = {
            "visible_ms_after_answer": None if first is None else max(0.0, (first - ta) * 1e3),
            "raw_ms": None if first is None else (first - ta) * 1e3,
            "seen_before_answer": seen_before}
    vals = [w["visible_ms_after_answer"] for w in per_worker.values()]
    out.update(per_worker=per_worker, stale_polls_after_answer=stale_after,
               all_workers_ms=None if None in vals else max(vals))
    return out


def promotion_phase(targets: Dict[str, Target], trials: int,
                    out: Dict[str, List[Dict[str, Any]]]) -> None:
    for e in targets:
        out[e] = []
    seed = 5000
    for r in range(trials):
        for e in B.rotation(list(targets), r):
            t = targets[e]
            old = stats_version(t.worker_ports[0])
            res: Dict[str, Any] = {}
            for attempt in range(2):  # a kept model (not replaced): label more, once
                for k in range(2):  # distinct images: real seed s, generated seed s + 1000
                    for fake in (False, True):
                        data = label_png(seed + k + (1000 if fake else 0), fake)
                        code, body = asyncio.run(http_request(
                            t.port, "POST", API + "/feedback?label=%s"
                            % ("fake" if fake else "real"), data, "image/png"))
                        if code != 201:
                            raise RuntimeError("%s feedback: %s %s" % (e, code, body[:300]))
                seed += 2
                res = asyncio.run(_promotion(t, old, 120.0))
                res["attempt"] = attempt + 1
                if res.get("new_version"):
                    break
            res["trial"] = r
            out[e].append(res)
            log("promotion %d/%d %-10s retrain %.2f s, %s -> %s; every worker after %s ms %s"
                "%s" % (r + 1, trials, e, res.get("retrain_s") or -1, old, res["new_version"],
                        "%.1f" % res["all_workers_ms"] if res.get("all_workers_ms") is not None
                        else "?", {p: "%.1f%s" % (w["raw_ms"], " (before answer)"
                                                  if w["seen_before_answer"] else "")
                                   for p, w in (res.get("per_worker") or {}).items()},
                        " STALE x%d" % res["stale_polls_after_answer"]
                        if res.get("stale_polls_after_answer") else ""))


def feedback_phase(targets: Dict[str, Target], ids: Dict[str, List[str]], tmp: str,
                   repeats: int, count: int, clients: int,
                   out: Dict[str, Dict[str, List[Dict[str, Any]]]]) -> None:
    warm = 2 * clients
    per_run = count + warm + 2 * clients  # every upload of a run a new image
    log("feedback: making %d distinct 256x256 PNGs for the upload runs" % (per_run * repeats))
    uploads = [label_png(20000 + i, bool(i % 2)) for i in range(per_run * repeats)]
    files: Dict[str, Dict[int, str]] = {"by_id": {}, "upload": {}}
    for e in targets:
        out[e] = {"by_id": [], "upload": []}
        reqs = [(API + "/feedback", json.dumps({"analysis_id": a, "label": ("real", "fake")[
            i % 2]}).encode(), "application/json") for i, a in enumerate(ids[e])]
        if not reqs:
            raise RuntimeError("no analysis_id from the analyze phase on %s" % e)
        files["by_id"][hash(e)] = write_requests(os.path.join(tmp, "fb-id-%s.json" % e), reqs)
    for r in range(repeats):
        chunk = uploads[r * per_run:(r + 1) * per_run]
        up = write_requests(os.path.join(tmp, "fb-up-%d.json" % r), [
            (API + "/feedback?label=%s" % ("fake" if i % 2 else "real"), d, "image/png")
            for i, d in enumerate(chunk)])
        for e in B.rotation(list(targets), r):
            t = targets[e]
            line = "feedback rep %d/%d %-10s" % (r + 1, repeats, e)
            for kind, reqfile in (("by_id", files["by_id"][hash(e)]), ("upload", up)):
                res = run_load(t.port, reqfile, clients, warm, count, max_seconds=90)
                res.pop("ids")
                res.pop("service_ms")
                res["repeat"] = r
                out[e][kind].append(res)
                bad = sum(v for k, v in res["statuses"].items() if k != "201")
                line += "  %s %6.1f/s p50 %5.1f p99 %5.1f%s" % (
                    kind, res["rps"] or 0, res["p50_ms"] or -1, res["p99_ms"] or -1,
                    " BAD %s %s" % (res["statuses"], res["errors"]) if bad else "")
            log(line)


def inprocess_phase(targets: Dict[str, Target], rounds: int, n: int) -> Dict[str, Any]:
    """Store operations timed in this process, on each engine's database, interleaved."""
    import numpy as np
    from deepfake import features
    from deepfake.store import ImageRecord, Store

    stores: Dict[str, Any] = {}
    tmp_dirs = []
    for e, t in targets.items():
        if t.database_url:
            d = tempfile.mkdtemp(prefix="store-bench-inproc-")
            tmp_dirs.append(d)
            stores[e] = Store(d, t.database_url)
        else:
            stores[e] = Store(t.data_dir, None)
    rng = np.random.default_rng(7)
    record = ImageRecord("0" * 64, 1024, 1024, "JPEG", 250000,
                         rng.random((64, features.N_FEATURES), dtype=np.float32),
                         "near-hash-placeholder")
    def checkout(s: Any) -> None:
        with s.db.read():
            pass

    def select1(s: Any) -> None:
        with s.db.read() as conn:
            conn.execute("SELECT 1").fetchone()

    counter = [0]

    def add(s: Any) -> None:
        counter[0] += 1
        s.add_analysis("bench-%d-%d" % (os.getpid(), counter[0]), record, 0.5, "inconclusive",
                       "bench")

    ops: Dict[str, Any] = {
        "current_model_id": lambda s: s.current_model_id(),  # the per-request version check
        "pool_checkout": checkout,  # db.read() alone: SQLite's thread connection, a pool's
        "select_1": select1,        # checkout + one round trip
        "add_analysis": add,        # analyze's write transaction
        "counts": lambda s: s.counts(),  # feedback's and stats' GROUP BY
    }
    times: Dict[str, Dict[str, List[float]]] = {e: {k: [] for k in ops} for e in stores}
    try:
        for e, s in stores.items():  # warm-up: connections open, statements cached
            for fn in ops.values():
                for _ in range(20):
                    fn(s)
        for r in range(rounds):
            for e in B.rotation(list(stores), r):
                s = stores[e]
                for name, fn in ops.items():
                    reps = n if name != "add_analysis" else max(50, n // 10)
                    for _ in range(reps):
                        t0 = time.perf_counter_ns()
                        fn(s)
                        times[e][name].append((time.perf_counter_ns() - t0) / 1000.0)
        pool_stats = {}
        for e, s in stores.items():
            pool = getattr(s.db, "_pool", None)
            if pool is not None:
                with contextlib.suppress(Exception):
                    pool_stats[e] = pool.get_stats()
    finally:
        for s in stores.values():
            with contextlib.suppress(Exception):
                s.close()
        for d in tmp_dirs:
            shutil.rmtree(d, ignore_errors=True)
    return {"us": {e: {k: dist(v) for k, v in d.items()} for e, d in times.items()},
            "pool_stats": pool_stats, "rounds": rounds, "n": n}


def breakdown_phase(pg_admin_url: str, images: List[bytes], n: int,
                    rounds: int) -> Dict[str, Any]:
    """Where an analyze's time goes, per engine: the service's Flask app in this process (its
    own create_app, production settings, a fresh data directory; PostgreSQL a fresh database),
    ``n`` analyses per engine per round through Flask's test client, with this process's
    Store, database and pool methods wrapped in timers (the service's code is not changed).
    Per request: the handler's wall time, the pointer read (current_model_id), the insert
    (add_analysis, of which the pool checkout and the COMMIT), in ms."""
    import servers
    from deepfake import database as dbm
    from deepfake.app import create_app
    from deepfake.config import ServiceConfig
    from deepfake.store import Store

    acc: Dict[str, float] = {}

    def timed(name: str, fn: Any) -> Any:
        def wrapper(*a: Any, **k: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                acc[name] = acc.get(name, 0.0) + (time.perf_counter() - t0) * 1000.0
        return wrapper

    def timed_cm(name: str, fn: Any) -> Any:
        """A context manager whose entry (the checkout, BEGIN) and exit (COMMIT) are timed."""
        @contextlib.contextmanager
        def wrapper(*a: Any, **k: Any) -> Iterator[Any]:
            t0 = time.perf_counter()
            cm = fn(*a, **k)
            value = cm.__enter__()
            acc[name + ":enter"] = acc.get(name + ":enter", 0.0) + (time.perf_counter() - t0) * 1e3
            try:
                yield value
            except BaseException:
                if not cm.__exit__(*sys.exc_info()):
                    raise
            else:
                t1 = time.perf_counter()
                cm.__exit__(None, None, None)
                acc[name + ":exit"] = acc.get(name + ":exit", 0.0) + (time.perf_counter() - t1) * 1e3
        return wrapper

    patches = [(Store, "current_model_id"), (Store, "add_analysis"), (Store, "model")]
    saved = [(cls, attr, getattr(cls, attr)) for cls, attr in patches]
    saved += [(cls, attr, getattr(cls, attr)) for cls in (dbm.SQLiteDatabase,
                                                         dbm.PostgresDatabase)
              for attr in ("read", "write")]
    for cls, attr in patches:
        setattr(cls, attr, timed(attr, getattr(cls, attr)))
    for cls in (dbm.SQLiteDatabase, dbm.PostgresDatabase):
        setattr(cls, "read", timed_cm("db.read", cls.read))
        setattr(cls, "write", timed_cm("db.write", cls.write))
    tmp = tempfile.mkdtemp(prefix="store-bench-breakdown-")
    servers._create_database(pg_admin_url, "deepfake_breakdown")
    urls = {"sqlite": None,
            "postgresql": pg_admin_url.rsplit("/", 1)[0] + "/deepfake_breakdown"}
    apps: Dict[str, Any] = {}
    per: Dict[str, Dict[str, List[float]]] = {e: {} for e in ENGINES}
    pool_stats: Dict[str, Any] = {}
    try:
        for e in ENGINES:
            cfg = ServiceConfig(data_dir=os.path.join(tmp, e), env="production",
                                min_feedback_per_label=2, database_url=urls[e])
            apps[e] = create_app(cfg)
        bodies = [multipart(img, "p.jpg", "image/jpeg") for img in images]
        for e in ENGINES:  # warm-up: first-analysis imports, connections
            client = apps[e].test_client()
            for body, ctype in bodies[:4]:
                client.post(API + "/analyze", data=body, content_type=ctype)
        for r in range(rounds):
            for e in B.rotation(list(ENGINES), r):
                client = apps[e].test_client()
                for i in range(n):
                    body, ctype = bodies[i % len(bodies)]
                    acc.clear()
                    t0 = time.perf_counter()
                    resp = client.post(API + "/analyze", data=body, content_type=ctype)
                    wall = (time.perf_counter() - t0) * 1000.0
                    if resp.status_code != 200:
                        raise RuntimeError("in-process analyze on %s: %s" % (e, resp.status))
                    per[e].setdefault("request", []).append(wall)
                    per[e].setdefault("handler elapsed_ms", []).append(
                        float(resp.get_json()["elapsed_ms"]))
                    for k, v in acc.items():
                        per[e].setdefault(k, []).append(v)
        for e, app in apps.items():
            pool = getattr(app.extensions["deepfake"].store.db, "_pool", None)
            if pool is not None:
                pool_stats[e] = pool.get_stats()
    finally:
        for cls, attr, fn in saved:
            setattr(cls, attr, fn)
        for app in apps.values():
            with contextlib.suppress(Exception):
                app.extensions["deepfake"].store.close()
        shutil.rmtree(tmp, ignore_errors=True)
    return {"ms": {e: {k: {"median": statistics.median(v), "mean": statistics.mean(v),
                           "p90": pct(v, 90), "n": len(v)} for k, v in d.items()}
                   for e, d in per.items()},
            "pool_stats": pool_stats, "n": n, "rounds": rounds}


# ============================================================================ summary

def summarize(raw: Dict[str, Any]) -> Dict[str, Any]:
    s: Dict[str, Any] = {"analyze": {}, "feedback": {}, "promotion": {}}
    an = raw.get("analyze_runs", {})
    for e, by_c in an.items():
        for c, runs in by_c.items():
            pooled = [x for run in runs for x in run["lat_ms"]]
            svc = [x for run in runs for x in run["service_ms"]]
            s["analyze"].setdefault(e, {})[c] = {
                "requests": len(pooled), "p50_ms": pct(pooled, 50), "p99_ms": pct(pooled, 99),
                "service_p50_ms": pct(svc, 50),
                "p50_runs": B.spread([r["p50_ms"] for r in runs]),
                "p99_runs": B.spread([r["p99_ms"] for r in runs]),
                "rps_runs": B.spread([r["rps"] for r in runs]),
                "service_p50_runs": B.spread([r["service_p50_ms"] for r in runs])}
    diffs: Dict[str, Any] = {}
    if all(e in an for e in ENGINES):
        for c in an["sqlite"]:
            per = [pg["p50_ms"] - sq["p50_ms"] for sq, pg in zip(an["sqlite"][c],
                                                                 an["postgresql"][c])
                   if sq["p50_ms"] is not None and pg["p50_ms"] is not None]
            svc = [pg["service_p50_ms"] - sq["service_p50_ms"]
                   for sq, pg in zip(an["sqlite"][c], an["postgresql"][c])
                   if sq["service_p50_ms"] is not None and pg["service_p50_ms"] is not None]
            a = s["analyze"]
            pooled = a["postgresql"][c]["p50_ms"] - a["sqlite"][c]["p50_ms"]
            sp = B.spread(per) or {}
            # met only if every repeat says so; not met only if every repeat says so; else the
            # machine's noise is wider than the difference looked for
            verdict = ("MET" if sp and sp["max"] <= TARGET_P50_DIFF_MS else
                       "NOT MET" if sp and sp["min"] > TARGET_P50_DIFF_MS else
                       "UNRESOLVED (repeats disagree: the noise exceeds the target)")
            diffs[c] = {"per_repeat": sp or None, "pooled": pooled,
                        "service_per_repeat": B.spread(svc),
                        "target_ms": TARGET_P50_DIFF_MS, "verdict": verdict}
    s["analyze_p50_diff_pg_minus_sqlite"] = diffs
    for e, kinds in raw.get("feedback_runs", {}).items():
        for kind, runs in kinds.items():
            pooled = [x for run in runs for x in run["lat_ms"]]
            s["feedback"].setdefault(e, {})[kind] = {
                "rps_runs": B.spread([r["rps"] for r in runs]),
                "p50_ms": pct(pooled, 50), "p99_ms": pct(pooled, 99), "requests": len(pooled)}
    for e, trials in raw.get("promotion", {}).items():
        s["promotion"][e] = {
            "all_workers_ms": B.spread([t.get("all_workers_ms") for t in trials]),
            "retrain_s": B.spread([t.get("retrain_s") for t in trials]),
            "promoted": sum(1 for t in trials if t.get("new_version")),
            "trials": len(trials),
            "stale_polls_after_answer": sum(t.get("stale_polls_after_answer") or 0
                                            for t in trials)}
    return s


def _f(v: Optional[float], fmt: str = "%.1f") -> str:
    return "-" if v is None else fmt % v


def _sp(s: Optional[Dict[str, float]], fmt: str = "%.1f") -> str:
    return B.fmt_spread(s, fmt)


def print_report(res: Dict[str, Any]) -> None:
    s = res["summary"]
    print()
    print("Store engines through the gateway (%s, 2 workers, production; PostgreSQL %s, "
          "fsync=%s)" % (res["environment"].get("git", "?"),
                         (res.get("postgresql") or {}).get("server_version", "?"),
                         (res.get("postgresql") or {}).get("fsync", "?")))
    print("figures: pooled over the repeats; (median, min..max) of the per-repeat figure")
    print()
    print("1. analyze (8 x 1024x1024 JPEG, >= %d answers per run, %d repeats)"
          % (res["params"]["requests"], res["params"]["repeats"]))
    print("   machine load average before %s, after %s (%d CPUs)" % (
        ", ".join("%.1f" % x for x in res["environment"]["loadavg_before"]),
        ", ".join("%.1f" % x for x in res["environment"].get("loadavg_after", [])),
        res["environment"]["cpus"]))
    print("   %-10s %3s %6s %8s %8s  %-22s %-22s %-20s %s" % (
        "engine", "c", "n", "p50 ms", "p99 ms", "p50 per run", "p99 per run", "req/s per run",
        "service p50"))
    for e in ENGINES:
        for c, a in sorted((s["analyze"].get(e) or {}).items(), key=lambda kv: int(kv[0])):
            print("   %-10s %3s %6d %8s %8s  %-22s %-22s %-20s %s" % (
                e, c, a["requests"], _f(a["p50_ms"]), _f(a["p99_ms"]), _sp(a["p50_runs"]),
                _sp(a["p99_runs"]), _sp(a["rps_runs"]), _f(a["service_p50_ms"])))
    for c, d in sorted(s["analyze_p50_diff_pg_minus_sqlite"].items(), key=lambda kv: int(kv[0])):
        print("   PostgreSQL - SQLite p50 at c=%s: %+.1f ms pooled, per repeat %s; service "
              "elapsed_ms p50 per repeat %s -> target <= +%.0f ms: %s"
              % (c, d["pooled"], _sp(d["per_repeat"], "%+.1f"),
                 _sp(d["service_per_repeat"], "%+.1f"), d["target_ms"], d["verdict"]))
    print()
    print("2a. feedback writes/s through the gateway (%d clients, >= %d answers per run)"
          % (res["params"]["feedback_clients"], res["params"]["requests"]))
    print("   %-10s %-8s %-24s %8s %8s" % ("engine", "kind", "writes/s per run", "p50 ms",
                                           "p99 ms"))
    for e in ENGINES:
        for kind, f in (s["feedback"].get(e) or {}).items():
            print("   %-10s %-8s %-24s %8s %8s" % (e, kind, _sp(f["rps_runs"]),
                                                   _f(f["p50_ms"]), _f(f["p99_ms"])))
    inproc = res.get("inprocess") or {}
    if inproc.get("us"):
        print()
        print("2b. in-process store operations, us (min / median / p99; n per engine)")
        for e in ENGINES:
            for op, d in (inproc["us"].get(e) or {}).items():
                if d:
                    print("   %-10s %-17s %8.1f %8.1f %8.1f  (n=%d)" % (e, op, d["min"],
                                                                       d["p50"], d["p99"],
                                                                       d["n"]))
    bd = res.get("breakdown") or {}
    if bd.get("ms"):
        print()
        print("2c. where an analyze's time goes, in-process (Flask test client, %d per engine):"
              " median ms per request (mean)" % (bd["n"] * bd["rounds"]))
        keys = [k for k in ("request", "handler elapsed_ms", "current_model_id", "model",
                            "add_analysis", "db.read:enter", "db.read:exit", "db.write:enter",
                            "db.write:exit") if any(k in bd["ms"].get(e, {}) for e in ENGINES)]
        print("   %-20s" % "" + "".join("%22s" % e for e in ENGINES))
        for k in keys:
            print("   %-20s" % k + "".join(
                "%22s" % ("%.3f (%.3f)" % (bd["ms"][e][k]["median"], bd["ms"][e][k]["mean"])
                          if k in bd["ms"].get(e, {}) else "-") for e in ENGINES))
        store_ms = {e: sum(bd["ms"][e][k]["median"] for k in ("current_model_id",
                                                               "add_analysis")
                           if k in bd["ms"].get(e, {})) for e in ENGINES}
        print("   store per analyze (pointer read + insert, medians): sqlite %.2f ms, "
              "postgresql %.2f ms: PostgreSQL %+.2f ms" % (
                  store_ms["sqlite"], store_ms["postgresql"],
                  store_ms["postgresql"] - store_ms["sqlite"]))
        for e, st in (bd.get("pool_stats") or {}).items():
            print("   %s pool: %s" % (e, {k: v for k, v in st.items()
                                          if k.startswith(("requests", "connections", "pool"))}))
    print()
    print("3. promotion -> every worker's own /stats names the new version (ms after the "
          "retrain's answer)")
    for e in ENGINES:
        p = s["promotion"].get(e)
        if p:
            print("   %-10s %d/%d promoted; all workers %s ms; retrain %s s; stale polls after "
                  "the answer: %d" % (e, p["promoted"], p["trials"], _sp(p["all_workers_ms"]),
                                      _sp(p["retrain_s"], "%.2f"),
                                      p["stale_polls_after_answer"]))
    for note in res.get("notes", []):
        print("note: " + note)
    print()
    print("JSON: %s (%.0f s)" % (res["json_path"], res["elapsed_s"]))


# ============================================================================ main

def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="See the top of bench/store_bench.py for what is measured and how.")
    parser.add_argument("--repeats", type=int, default=3,
                        help="interleaved repeats of the analyze and feedback runs (default 3)")
    parser.add_argument("--requests", type=int, default=200,
                        help="answers counted per load run after its warm-up (default 200)")
    parser.add_argument("--clients", default="1,4",
                        help="analyze client counts (default 1,4)")
    parser.add_argument("--feedback-clients", type=int, default=4)
    parser.add_argument("--trials", type=int, default=3,
                        help="promotions per engine (default 3)")
    parser.add_argument("--inprocess-n", type=int, default=1000,
                        help="calls per operation per round in-process (default 1000; "
                             "add_analysis: a tenth)")
    parser.add_argument("--pg-fsync", choices=("on", "off"), default="on",
                        help="PostgreSQL's fsync (default on, durable like SQLite's "
                             "synchronous=FULL; tests/servers.py uses off)")
    parser.add_argument("--max-seconds", type=int, default=600,
                        help="stop everything and report what was measured after this "
                             "(default 600)")
    parser.add_argument("--breakdown", type=int, default=40, metavar="N",
                        help="analyses per engine per round in the in-process breakdown of "
                             "an analyze's time (default 40; 0: skip)")
    parser.add_argument("--json", help="output path (default bench/results/store-<UTC>.json)")
    parser.add_argument("--_load", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args._load:
        print(json.dumps(asyncio.run(_load(json.loads(args._load)))))
        return 0

    clients_list = [int(c) for c in args.clients.split(",") if c.strip()]
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    json_path = args.json or os.path.join(RESULTS_DIR, "store-%s.json" % stamp)

    def on_term(_sig: int, _frame: Any) -> None:
        raise KeyboardInterrupt()

    def on_alarm(_sig: int, _frame: Any) -> None:
        raise BudgetExceeded("--max-seconds %d reached" % args.max_seconds)
    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(args.max_seconds)

    os.makedirs(RESULTS_DIR, exist_ok=True)
    log_dir = os.path.join(RESULTS_DIR, "logs")
    os.makedirs(log_dir, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix="store-bench-")
    started = time.monotonic()
    result: Dict[str, Any] = {
        "started_utc": stamp, "json_path": os.path.relpath(json_path, ROOT),
        "command": "python bench/store_bench.py " + " ".join(argv if argv is not None
                                                             else sys.argv[1:]),
        "params": {"repeats": args.repeats, "requests": args.requests,
                   "clients": clients_list, "feedback_clients": args.feedback_clients,
                   "trials": args.trials, "inprocess_n": args.inprocess_n,
                   "pg_fsync": args.pg_fsync, "workers": 2},
        "environment": {"cpus": os.cpu_count(), "loadavg_before": list(os.getloadavg()),
                        "python": platform.python_version(), "platform": platform.platform()},
    }
    with contextlib.suppress(Exception):
        result["environment"]["git"] = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
            text=True).stdout.strip()
        result["environment"]["uncommitted"] = subprocess.run(
            ["git", "status", "--porcelain", "--", "tornado_gateway", "python"], cwd=ROOT,
            capture_output=True, text=True).stdout.split("\n")[:-1]
    notes: List[str] = []
    raw: Dict[str, Any] = {}
    procs = B.Processes(log_dir)
    failure = None
    interrupted = False
    targets: Dict[str, Target] = {}
    try:
        images, source = analyze_images()
        result["images"] = {"source": source, "bytes": [len(i) for i in images]}
        reqs = []
        for i, img in enumerate(images):
            body, ctype = multipart(img, "photo%d.jpg" % i, "image/jpeg")
            reqs.append((API + "/analyze", body, ctype))
        analyze_file = write_requests(os.path.join(tmp, "analyze.json"), reqs)
        log("PostgreSQL cluster (fsync=%s)" % args.pg_fsync)
        with pg_cluster(args.pg_fsync == "on") as admin_url:
            import servers

            result["postgresql"] = pg_settings(admin_url)
            db_name = "deepfake_bench"
            servers._create_database(admin_url, db_name)
            pg_url = admin_url.rsplit("/", 1)[0] + "/" + db_name
            log("PostgreSQL %s" % result["postgresql"])
            try:
                env = B.clean_env(tmp)
                for e in ENGINES:  # one after the other: launches do not compete
                    d = os.path.join(tmp, "data-%s" % e)
                    os.makedirs(d)
                    targets[e] = Target(procs, e, env, d, pg_url if e == "postgresql" else None,
                                        2)
                    targets[e].wait()
                    log("%s gateway ready in %.0f ms (gateway %d, workers %s on %s)"
                        % (e, targets[e].ready_ms, targets[e].proc.pid,
                           targets[e].worker_pids, targets[e].worker_ports))
                for e, t in targets.items():  # warm-up: imports, pools, first analyses
                    res = run_load(t.port, analyze_file, 4, 0, 40, max_seconds=60)
                    n = t.analyses_stored()
                    log("%s warm-up: %.1f req/s, statuses %s; %d analyses in its %s store"
                        % (e, res["rps"] or 0, res["statuses"], n, e))
                    if n < 40:
                        raise RuntimeError("the %s gateway's analyses are not in its %s "
                                           "store" % (e, e))
                result["targets"] = {e: t.describe() for e, t in targets.items()}
                ids: Dict[str, List[str]] = {e: [] for e in targets}
                raw["analyze_runs"] = {}
                analyze_phase(targets, analyze_file, clients_list, args.repeats,
                              args.requests, raw["analyze_runs"], ids)
                raw["promotion"] = {}
                promotion_phase(targets, args.trials, raw["promotion"])
                raw["feedback_runs"] = {}
                feedback_phase(targets, ids, tmp, args.repeats, args.requests,
                               args.feedback_clients, raw["feedback_runs"])
                result["analyses_stored"] = {e: t.analyses_stored() for e, t in targets.items()}
                for t in targets.values():
                    procs.stop(t.proc)
                log("gateways stopped; in-process store operations")
                raw["inprocess"] = inprocess_phase(targets, 3, args.inprocess_n // 3)
                if args.breakdown:
                    log("in-process analyze breakdown (%d per engine x 2 rounds)"
                        % args.breakdown)
                    raw["breakdown"] = breakdown_phase(admin_url, images, args.breakdown, 2)
            finally:
                procs.cleanup()
    except KeyboardInterrupt:
        interrupted = True
        log("interrupted: stopping everything")
    except Exception as exc:  # report what was measured, then fail
        import traceback

        failure = "%s: %s" % (type(exc).__name__, exc)
        traceback.print_exc()
        log("failed: %s; stopping everything" % failure)
    finally:
        signal.alarm(0)
        procs.cleanup()
        shutil.rmtree(tmp, ignore_errors=True)

    result["environment"]["loadavg_after"] = list(os.getloadavg())
    # the per-request latencies stay in the JSON only through the summary (pooled figures)
    result["summary"] = summarize(raw)
    for runs in raw.get("analyze_runs", {}).values():
        for rs in runs.values():
            for r in rs:
                r.pop("lat_ms", None)
                r.pop("service_ms", None)
    for kinds in raw.get("feedback_runs", {}).values():
        for rs in kinds.values():
            for r in rs:
                r.pop("lat_ms", None)
    result["inprocess"] = raw.pop("inprocess", None)
    result["breakdown"] = raw.pop("breakdown", None)
    result["raw"] = raw
    if interrupted:
        notes.append("INTERRUPTED: partial results")
    if failure:
        notes.append("FAILED (%s): partial results" % failure)
    result["notes"] = notes
    result["elapsed_s"] = time.monotonic() - started
    os.makedirs(os.path.dirname(os.path.abspath(json_path)), exist_ok=True)
    with open(json_path, "w") as f:
        json.dump(result, f, indent=1, default=str)
    print_report(result)
    return 130 if interrupted else (1 if failure else 0)


if __name__ == "__main__":
    sys.exit(main())
