"""Latency of ``POST /api/deepfake/analyze`` with a 1024x1024 JPEG (~420 KB), through the
gateway and direct to the child, each on one keep-alive client connection (taking turns).

Starts the gateway (``--production``, so the child is waitress) on free ports with a
throw-away data directory, sends ``--requests`` uploads each way after ``--warmup`` uncounted
ones, and prints min / median / max in ms. Requests ~40 ms slower through the gateway only
are the mark of a transmission stall (Nagle's algorithm against a delayed ACK); the child's
own time varies too, on a busy machine by as much, so compare both columns.

    python bench/upload_stall.py [--requests 30] [--warmup 20] [--upstream keepalive|simple]
"""

from __future__ import annotations

import argparse
import http.client
import io
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_jpeg() -> bytes:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(7)
    # Smooth gradients plus noise: a photo-like JPEG of a few hundred KB.
    y, x = np.mgrid[0:1024, 0:1024]
    base = np.stack([(x * 255 // 1023), (y * 255 // 1023), ((x + y) * 255 // 2046)], axis=-1)
    noise = rng.integers(-40, 40, size=base.shape)
    pixels = np.clip(base + noise, 0, 255).astype("uint8")
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="JPEG", quality=85)
    return out.getvalue()


def multipart(jpeg: bytes) -> tuple[bytes, str]:
    boundary = "----bench-upload-stall"
    body = (
        f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; "
        f"filename=\"photo.jpg\"\r\nContent-Type: image/jpeg\r\n\r\n"
    ).encode() + jpeg + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def wait_ready(port: int, deadline: float) -> None:
    while time.monotonic() < deadline:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", "/api/deepfake/stats")
            if conn.getresponse().status == 200:
                conn.close()
                return
            conn.close()
        except OSError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"nothing ready on port {port}")


def timings(ports: dict[str, int], body: bytes, ctype: str, n: int,
            warmup: int = 3) -> dict[str, list[float]]:
    """Per port, ``n`` request times in ms on one keep-alive connection each; the ports take
    turns request by request, so that a slow spell of the machine hits both alike."""
    conns = {name: http.client.HTTPConnection("127.0.0.1", port, timeout=30)
             for name, port in ports.items()}
    out: dict[str, list[float]] = {name: [] for name in ports}
    for i in range(warmup + n):
        for name, conn in conns.items():
            t0 = time.perf_counter()
            conn.request("POST", "/api/deepfake/analyze", body=body,
                         headers={"Content-Type": ctype})
            resp = conn.getresponse()
            resp.read()
            elapsed = (time.perf_counter() - t0) * 1000
            if resp.status != 200:
                raise SystemExit(f"status {resp.status}")
            if i >= warmup:
                out[name].append(elapsed)
    for conn in conns.values():
        conn.close()
    return out


def summary(name: str, ms: list[float]) -> str:
    slow = sum(1 for t in ms if t > statistics.median(ms) + 25)
    return (f"{name:8s} n={len(ms)} min {min(ms):6.1f}  median {statistics.median(ms):6.1f}  "
            f"max {max(ms):6.1f} ms  (>{statistics.median(ms) + 25:.0f} ms: {slow})")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=20,
                        help="requests each way not counted (the child is slower at first)")
    parser.add_argument("--upstream", default="keepalive")
    args = parser.parse_args()
    jpeg = make_jpeg()
    body, ctype = multipart(jpeg)
    gw, child = free_port(), free_port()
    env = dict(os.environ, DEEPFAKE_DATA_DIR=tempfile.mkdtemp(), GATEWAY_UPSTREAM=args.upstream)
    proc = subprocess.Popen(
        [sys.executable, "-m", "tornado_gateway", "--production", "--port", str(gw),
         "--flask-port", str(child)],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_ready(gw, time.monotonic() + 60)
        print(f"JPEG {len(jpeg)} bytes, upstream={args.upstream}")
        for name, ms in timings({"gateway": gw, "direct": child}, body, ctype,
                                args.requests, args.warmup).items():
            print(summary(name, ms))
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()


if __name__ == "__main__":
    main()
