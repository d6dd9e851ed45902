"""A stand-in for a child that refuses a request body early: answers 413 and closes.

Run: ``python early_answer_server.py --port 0 [--limit N] [--read N] [--close rst|fin]``.
Prints ``LISTENING <port>`` on stdout once it accepts connections.

What waitress does with a body over its ``max_request_body_size``, without waitress: every
request whose ``Content-Length`` is above ``--limit`` (default 1 MiB), or that is chunked, is
answered ``413`` with a JSON body, ``Content-Length`` and ``Connection: close`` after at most
``--read`` bytes of its body were read (default 0: as soon as the head is in), and the
connection is closed:

* ``--close rst`` (default): a plain ``close()`` with the rest of the upload unread, so the
  kernel resets the connection (as waitress's close does) and resets again whatever the
  client still sends;
* ``--close fin``: the answer, a FIN, then the rest of the body is read and dropped until the
  client closes (a lingering close: the client surely sees the answer).

Any other request (at most ``--limit`` bytes) is read whole and answered 200 with JSON
``{"received": N}``; ``GET /api/deepfake/stats`` answers as the health check expects. Each
connection is served by a thread; keep-alive is honoured for those answers.
"""
from __future__ import annotations

import argparse
import json
import socket
import sys
import threading

REFUSAL = json.dumps({"error": "Request Entity Too Large",
                      "message": "Request Entity Too Large: exceeds max_request_body_size",
                      "suggestion": "Upload a smaller file.",
                      "timestamp": "2024-01-01T00:00:00.000Z"}).encode()


def _answer(status: str, body: bytes, close: bool) -> bytes:
    return ("HTTP/1.1 %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n%s\r\n"
            % (status, len(body), "Connection: close\r\n" if close else "")).encode() + body


def _serve(conn: socket.socket, args: argparse.Namespace) -> None:
    buf = b""
    try:
        while True:
            while b"\r\n\r\n" not in buf:
                data = conn.recv(65536)
                if not data:
                    return
                buf += data
            head, _, buf = buf.partition(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            method, target = lines[0].split(" ")[:2]
            headers = {}
            for line in lines[1:]:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
            length = int(headers.get("content-length") or 0)
            chunked = "chunked" in headers.get("transfer-encoding", "").lower()
            if chunked or length > args.limit:
                while len(buf) < args.read:
                    data = conn.recv(65536)
                    if not data:
                        break
                    buf += data
                conn.sendall(_answer("413 Request Entity Too Large", REFUSAL, True))
                if args.close == "fin":
                    conn.shutdown(socket.SHUT_WR)
                    conn.settimeout(10)
                    try:
                        while conn.recv(65536):
                            pass
                    except OSError:
                        pass
                return  # the finally closes: with unread bytes, a reset
            while len(buf) < length:
                data = conn.recv(65536)
                if not data:
                    return
                buf += data
            buf = buf[length:]
            if method == "GET" and target.startswith("/api/deepfake/stats"):
                body = b'{"training_samples":0,"model_loaded":true,"last_updated":null}'
            else:
                body = json.dumps({"received": length}).encode()
            conn.sendall(_answer("200 OK", body, False))
    except OSError:
        pass
    finally:
        conn.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--limit", type=int, default=1 << 20)
    parser.add_argument("--read", type=int, default=0)
    parser.add_argument("--close", choices=("rst", "fin"), default="rst")
    args = parser.parse_args()
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((args.host, args.port))
    listener.listen(64)
    print("LISTENING %d" % listener.getsockname()[1], flush=True)
    try:
        while True:
            conn, _addr = listener.accept()
            threading.Thread(target=_serve, args=(conn, args), daemon=True).start()
    except KeyboardInterrupt:
        pass
    finally:
        listener.close()
    sys.exit(0)


if __name__ == "__main__":
    main()
