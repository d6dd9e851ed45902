"""A misbehaving child for response-desync tests: keep-alive HTTP/1.1 on raw sockets.

* ``GET /api/deepfake/stats``: the health answer.
* ``/api/deepfake/split``: ``Content-Length: 5`` but sends a second, unsolicited response
  right behind the body (``smuggled``), and keeps the connection open.
* ``/api/deepfake/short``: announces 100 bytes, sends 10, keeps the connection open (stalls).
* anything else: ``ok <path>``.
"""
import argparse
import json
import socket
import threading

STATS = json.dumps({"training_samples": 0, "model_loaded": True, "last_updated": None}).encode()


def response(body: bytes, extra: bytes = b"", length=None) -> bytes:
    return (b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n\r\n"
            % (len(body) if length is None else length)) + body + extra


def serve(conn: socket.socket) -> None:
    buf = b""
    with conn:
        while True:
            while b"\r\n\r\n" not in buf:
                data = conn.recv(65536)
                if not data:
                    return
                buf += data
            head, _, buf = buf.partition(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            path = lines[0].split(" ")[1]
            length = 0
            for line in lines[1:]:
                name, _, value = line.partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value)
            while len(buf) < length:
                data = conn.recv(65536)
                if not data:
                    return
                buf += data
            buf = buf[length:]
            if path.startswith("/api/deepfake/stats"):
                conn.sendall(response(STATS))
            elif path.startswith("/api/deepfake/split"):
                conn.sendall(response(b"hello", extra=response(b"smuggled")))
            elif path.startswith("/api/deepfake/short"):
                conn.sendall(response(b"0123456789", length=100))
            else:
                conn.sendall(response(b"ok " + path.encode()))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=5001)
    args = parser.parse_args()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((args.host, args.port))
    sock.listen(128)
    print("desync child listening on %d" % args.port, flush=True)
    while True:
        conn, _ = sock.accept()
        threading.Thread(target=serve, args=(conn,), daemon=True).start()


if __name__ == "__main__":
    main()
