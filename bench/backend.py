#!/usr/bin/env python
"""A tiny stand-in for the deepfake service, for the benchmark (``bench/bench.py``).

Same command line and start-up behaviour as ``python/api_server.py`` in production mode
(Flask app served by waitress, ``--host``/``--port``, a log line once the socket listens, exits
when the gateway named by ``TORNADO_GATEWAY_PID`` is gone), but every route is cheap so the
figures measure the gateway, not the service:

* ``GET  /api/deepfake/stats``            the health contract JSON
* ``GET  /api/deepfake/tiny``             a tiny JSON object
* ``POST /api/deepfake/sink``             reads the body in 1 MiB pieces and answers its size
* ``GET  /api/deepfake/download?size=N``  streams N bytes (Content-Length N) in 256 KiB chunks

Run it under the gateway with ``--flask-script bench/backend.py --mode production``.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import threading
import time

from flask import Flask, Response, jsonify, request

PREFIX = "/api/deepfake"
CHUNK = 256 * 1024
READ = 1024 * 1024
_BLOCK = b"\x5a" * CHUNK

app = Flask("bench_backend")


@app.get(PREFIX + "/stats")
def stats():  # type: ignore[no-untyped-def]
    return jsonify({"training_samples": 0, "model_loaded": True, "last_updated": None})


@app.get(PREFIX + "/tiny")
def tiny():  # type: ignore[no-untyped-def]
    return jsonify({"ok": True})


@app.post(PREFIX + "/sink")
def sink():  # type: ignore[no-untyped-def]
    stream = request.stream
    received = 0
    while True:
        piece = stream.read(READ)
        if not piece:
            break
        received += len(piece)
    return jsonify({"received": received})


@app.get(PREFIX + "/download")
def download():  # type: ignore[no-untyped-def]
    size = max(0, int(request.args.get("size", "0")))

    def generate():  # type: ignore[no-untyped-def]
        left = size
        while left >= CHUNK:
            yield _BLOCK
            left -= CHUNK
        if left:
            yield _BLOCK[:left]

    return Response(generate(), mimetype="application/octet-stream",
                    headers={"Content-Length": str(size)})


def _watch_gateway() -> None:
    """Exit when the gateway that started us is gone (like python/deepfake/parent_watch.py)."""
    raw = os.environ.get("TORNADO_GATEWAY_PID", "")
    if not raw.isdigit():
        return
    try:
        import psutil
    except ImportError:
        return
    pid = int(raw)
    try:
        created = psutil.Process(pid).create_time()
    except psutil.Error:
        os._exit(0)

    def loop() -> None:
        while True:
            time.sleep(0.5)
            try:
                process = psutil.Process(pid)
                if abs(process.create_time() - created) > 0.01 or \
                        process.status() == psutil.STATUS_ZOMBIE:
                    os._exit(0)
            except psutil.Error:
                os._exit(0)

    threading.Thread(target=loop, name="gateway-watch", daemon=True).start()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Benchmark backend (Flask on waitress).")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=5001)
    parser.add_argument("--threads", type=int, default=int(os.environ.get("DEEPFAKE_THREADS", "4")))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    _watch_gateway()
    import waitress

    # waitress spools the whole request body before calling the app and refuses a body of
    # max_request_body_size or more (default exactly 1 GiB): raise it for the 1 GiB upload.
    server = waitress.create_server(app, host=args.host, port=args.port, threads=args.threads,
                                    max_request_body_size=8 * 1024 ** 3)
    # the socket listens now: this line is the gateway's cue for an immediate health check
    print("bench backend listening on http://%s:%d (waitress, %d threads)"
          % (args.host, args.port, args.threads), flush=True)
    server.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
