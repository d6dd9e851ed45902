"""A stand-in for the Flask child: a stdlib HTTP/1.1 server that shows what it received.

Run: ``python echo_server.py --host 127.0.0.1 --port 5001``. Prints ``LISTENING <port>`` on
stdout once it accepts connections (``--port 0`` picks a free port).

Routes (everything lives under ``/api/deepfake``):

* ``GET /api/deepfake/stats`` -> ``{"training_samples":0,"model_loaded":true,"last_updated":null}``
  (the health check's answer).
* ``/api/deepfake/download?size=N[&chunked=1]`` -> N bytes (``b"x"``), streamed in 64 KiB
  writes, with Content-Length (or chunked).
* ``/api/deepfake/status/<code>[?reason=...]`` -> that status (with that reason phrase) and
  the echo body unless the status forbids a body.
* ``/api/deepfake/slow?delay=S`` -> waits S seconds, then echoes.
* ``/api/deepfake/die?after=N`` -> announces Content-Length N*2, sends N bytes, closes.
* ``/api/deepfake/cookies?n=K`` -> K ``Set-Cookie`` headers, then the echo.
* ``/api/deepfake/hop`` -> the echo plus hop-by-hop response headers a proxy must drop
  (``Connection: X-Hop``, ``X-Hop``, ``Keep-Alive``, ``Proxy-Agent``, ``Upgrade``).
* any route with ``?pause=S`` waits S seconds before reading the request body (a slow
  reader, to exercise upload back-pressure).
* ``/api/deepfake/_events`` -> JSON list of the requests seen so far, each
  ``{"method", "target", "complete", "received"}``: an upload cut short shows
  ``complete: false``; a download whose reader went away adds
  ``{"method", "target", "download_aborted": true, "sent"}``. ``/api/deepfake/_connections`` -> ``{"connections": N}`` accepted.
* anything else under the prefix echoes: JSON ``{"method", "target" (raw path and query),
  "headers" ([name, value] pairs in order), "body_length", "body_sha256"}``.

Request bodies are read with Content-Length or chunked framing, hashed as they stream (no
buffering), so the script also serves as a sink for very large uploads.
"""
from __future__ import annotations

import argparse
import hashlib
import http.server
import json
import socketserver
import sys
import threading
import time
import urllib.parse

from _childlib import watch_gateway

PREFIX = "/api/deepfake"
CHUNK = 64 * 1024
_EVENTS: list = []
_LOCK = threading.Lock()
_CONNECTIONS = [0]


class _Incomplete(Exception):
    def __init__(self, received: int) -> None:
        super().__init__("request body incomplete after %d bytes" % received)
        self.received = received


class EchoHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "echo"

    def log_message(self, format: str, *args: object) -> None:  # quiet
        pass

    def setup(self) -> None:
        super().setup()
        with _LOCK:
            _CONNECTIONS[0] += 1

    def __getattr__(self, name: str):  # every method, standard or not
        if name.startswith("do_"):
            return self._handle
        raise AttributeError(name)

    # -- body ----------------------------------------------------------------------------
    def _read_body(self) -> tuple:
        digest = hashlib.sha256()
        received = 0
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            while True:
                line = self.rfile.readline(1024)
                if not line:
                    raise _Incomplete(received)
                size = int(line.split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while True:  # trailers up to the empty line
                        trailer = self.rfile.readline(8192)
                        if not trailer:
                            raise _Incomplete(received)
                        if trailer in (b"\r\n", b"\n"):
                            break
                    break
                left = size
                while left:
                    data = self.rfile.read(min(left, CHUNK))
                    if not data:
                        raise _Incomplete(received)
                    digest.update(data)
                    received += len(data)
                    left -= len(data)
                if self.rfile.readline(16) not in (b"\r\n", b"\n"):
                    raise _Incomplete(received)
        else:
            left = int(self.headers.get("Content-Length") or 0)
            while left:
                data = self.rfile.read1(min(left, CHUNK)) if hasattr(self.rfile, "read1") \
                    else self.rfile.read(min(left, CHUNK))
                if not data:
                    raise _Incomplete(received)
                digest.update(data)
                received += len(data)
                left -= len(data)
        return received, digest.hexdigest()

    def _record(self, complete: bool, received: int) -> None:
        with _LOCK:
            _EVENTS.append({"method": self.command, "target": self.path,
                            "complete": complete, "received": received})
            del _EVENTS[:-1000]

    # -- responses -------------------------------------------------------------------------
    def _send(self, code: int, body: bytes, headers=(), reason=None,
              ctype="application/json") -> None:
        if reason is not None:
            self.send_response_only(code, reason)
            self.send_header("Server", self.version_string())
            self.send_header("Date", self.date_time_string())
        else:
            self.send_response(code)
        for name, value in headers:
            self.send_header(name, value)
        no_body = code in (204, 304) or 100 <= code < 200
        if not no_body:
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not no_body and self.command != "HEAD":
            self.wfile.write(body)

    def _handle(self) -> None:
        parts = urllib.parse.urlsplit(self.path)
        path, query = parts.path, urllib.parse.parse_qs(parts.query)
        if "pause" in query:  # a slow reader: leave the body unread for a while
            time.sleep(float(query["pause"][0]))
        try:
            received, sha = self._read_body()
        except _Incomplete as exc:
            self._record(False, exc.received)
            self.close_connection = True
            return
        except (ValueError, OSError):
            self._record(False, 0)
            self.close_connection = True
            return
        self._record(True, received)
        echo = {
            "method": self.command,
            "target": self.path,
            "headers": [[k, v] for k, v in self.headers.items()],
            "body_length": received,
            "body_sha256": sha,
        }
        body = json.dumps(echo).encode()

        if path == PREFIX + "/stats" and self.command in ("GET", "HEAD"):
            self._send(200, json.dumps({"training_samples": 0, "model_loaded": True,
                                        "last_updated": None}).encode())
        elif path == PREFIX + "/_events":
            with _LOCK:
                data = json.dumps(_EVENTS).encode()
            self._send(200, data)
        elif path == PREFIX + "/_connections":
            with _LOCK:
                data = json.dumps({"connections": _CONNECTIONS[0]}).encode()
            self._send(200, data)
        elif path == PREFIX + "/download":
            self._download(int(query.get("size", ["0"])[0]), bool(query.get("chunked")))
        elif path.startswith(PREFIX + "/status/"):
            code = int(path.rsplit("/", 1)[1])
            self._send(code, body, reason=query.get("reason", [None])[0])
        elif path == PREFIX + "/slow":
            time.sleep(float(query.get("delay", ["1"])[0]))
            self._send(200, body)
        elif path == PREFIX + "/die":
            after = int(query.get("after", ["1000"])[0])
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(after * 2))
            self.end_headers()
            self.wfile.write(b"d" * after)
            self.wfile.flush()
            self.close_connection = True
        elif path == PREFIX + "/cookies":
            n = int(query.get("n", ["3"])[0])
            self._send(200, body, headers=[("Set-Cookie", "c%d=v%d; Path=/" % (i, i))
                                           for i in range(n)])
        elif path == PREFIX + "/hop":
            self._send(200, body, headers=[("Connection", "X-Hop"), ("X-Hop", "secret"),
                                           ("Keep-Alive", "timeout=5"),
                                           ("Proxy-Agent", "echo"), ("Upgrade", "h2c"),
                                           ("X-Kept", "yes")])
        else:
            self._send(200, body)

    def _download(self, size: int, chunked: bool) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        if chunked:
            self.send_header("Transfer-Encoding", "chunked")
        else:
            self.send_header("Content-Length", str(size))
        self.end_headers()
        if self.command == "HEAD":
            return
        block = b"x" * CHUNK
        left = size
        try:
            while left:
                n = min(left, CHUNK)
                data = block if n == CHUNK else block[:n]
                if chunked:
                    self.wfile.write(b"%x\r\n" % n + data + b"\r\n")
                else:
                    self.wfile.write(data)
                left -= n
            if chunked:
                self.wfile.write(b"0\r\n\r\n")
        except OSError:  # the reader went away: record how far the download got
            with _LOCK:
                _EVENTS.append({"method": self.command, "target": self.path,
                                "download_aborted": True, "sent": size - left})
            self.close_connection = True


class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=5001)
    args = parser.parse_args(argv)
    server = Server((args.host, args.port), EchoHandler)
    watch_gateway()  # under a gateway: exit with it, so a killed gateway leaves no orphan
    print("LISTENING %d" % server.server_address[1], flush=True)
    try:
        server.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
