"""Shared bits of the misbehaving test children (not a test child itself).

Every child takes ``--host`` and ``--port`` (``argparse.parse_known_args``: unknown options are
ignored) and answers the health contract ``GET /api/deepfake/stats`` with 200 JSON
``{training_samples, model_loaded, last_updated}`` while it is healthy. Behaviour is tuned with
environment variables, because the gateway passes only ``--host``/``--port`` to its child.
"""
from __future__ import annotations

import argparse
import http.server
import json
import os
import sys
import threading
import time
from typing import Optional

STATS = {"training_samples": 0, "model_loaded": True, "last_updated": None}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=5001)
    args, _unknown = parser.parse_known_args(argv)
    return args


def say(text: str, stream=None) -> None:
    stream = stream or sys.stdout
    try:
        stream.write(text + "\n")
        stream.flush()
    except (OSError, ValueError):  # the reader (a SIGKILLed gateway) is gone: EPIPE
        pass


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "test-child"
    health_status = 200
    # path -> callable(handler) for extra routes; returns True when it answered
    routes: dict = {}

    def log_message(self, format: str, *args: object) -> None:  # quiet: tests count lines
        pass

    def _send(self, code: int, payload: dict) -> None:
        body = json.dumps(payload).encode("utf-8")
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        route = self.routes.get(path)
        if route is not None and route(self):
            return
        if path == "/api/deepfake/stats":
            if self.health_status == 200:
                self._send(200, dict(STATS, pid=os.getpid()))
            else:
                self._send(self.health_status, {"error": "not healthy on purpose"})
            return
        self._send(200, {"path": self.path, "pid": os.getpid()})

    do_POST = do_GET


def make_server(args: argparse.Namespace, handler=Handler) -> http.server.ThreadingHTTPServer:
    server = http.server.ThreadingHTTPServer((args.host, args.port), handler)
    server.daemon_threads = True
    return server


def watch_gateway(interval: float = 0.2) -> Optional[threading.Thread]:
    """Exit when the process in ``TORNADO_GATEWAY_PID`` is gone (or a zombie), like the real
    service does, so a SIGKILLed gateway leaves no orphan holding the port."""
    raw = os.environ.get("TORNADO_GATEWAY_PID", "").strip()
    if not raw.isdigit() or os.environ.get("CHILD_NO_WATCH"):  # tests of the gateway alone
        return None
    pid = int(raw)

    def alive() -> bool:
        try:
            import psutil
        except ImportError:  # pragma: no cover - psutil is a gateway dependency
            try:
                os.kill(pid, 0)
                return True
            except ProcessLookupError:
                return False
            except PermissionError:
                return True
        try:
            return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        except psutil.Error:
            return False

    def loop() -> None:
        while alive():
            time.sleep(interval)
        say("gateway process %d is gone; exiting" % pid, sys.stderr)
        os._exit(0)

    thread = threading.Thread(target=loop, name="gateway-watch", daemon=True)
    thread.start()
    return thread


def env_float(name: str, default: float) -> float:
    try:
        return float(os.environ.get(name, default))
    except ValueError:
        return default
