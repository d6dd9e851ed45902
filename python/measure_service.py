#!/usr/bin/env python
"""Measure the running service as the gateway sees it: start-up, analyze latency, memory.

    python python/measure_service.py [--runs 7] [--env production]

Starts ``api_server.py`` on a free port with a temporary data directory, times launch-to-ready
(first 200 from /stats), posts a 1024x1024 and a 4000x3000 JPEG ``--runs`` times each
(median of client round trip and of the service's own ``elapsed_ms``), and reports the
service's peak resident memory (Linux VmHWM; elsewhere the highest RSS sampled).
The test images are 1/f-noise textures, which have the spectrum of natural photos.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

import numpy as np
import psutil
from PIL import Image

SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "api_server.py")


def texture_jpeg(width: int, height: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    fy, fx = np.meshgrid(np.fft.fftfreq(height), np.fft.fftfreq(width), indexing="ij")
    amplitude = 1.0 / np.maximum(np.hypot(fx, fy), 1.0 / max(width, height))
    channels = []
    for _ in range(3):
        noise = np.real(np.fft.ifft2(np.fft.fft2(rng.normal(size=(height, width))) * amplitude))
        channels.append(np.clip((noise - noise.mean()) / noise.std() * 40 + 128, 0, 255))
    buffer = io.BytesIO()
    Image.fromarray(np.stack(channels, -1).astype(np.uint8)).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def post(url: str, data: bytes) -> tuple[float, dict]:
    request = urllib.request.Request(url, data=data, method="POST",
                                     headers={"Content-Type": "image/jpeg"})
    started = time.perf_counter()
    with urllib.request.urlopen(request, timeout=60) as response:
        body = json.loads(response.read())
    return (time.perf_counter() - started) * 1000, body


def peak_rss(pid: int, sampled: list[int]) -> int:
    try:
        with open("/proc/%d/status" % pid) as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return max(sampled or [0])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--env", default="production", choices=("development", "production"))
    args = parser.parse_args()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    base = "http://127.0.0.1:%d/api/deepfake" % port
    images = {"1024x1024": texture_jpeg(1024, 1024, 1), "4000x3000": texture_jpeg(4000, 3000, 2)}
    with tempfile.TemporaryDirectory() as data_dir:
        env = dict(os.environ, PYTHONUNBUFFERED="1", DEEPFAKE_DATA_DIR=data_dir)
        env.pop("TORNADO_GATEWAY_PID", None)
        started = time.perf_counter()
        proc = subprocess.Popen([sys.executable, SCRIPT, "--port", str(port), "--env", args.env],
                                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            while True:
                try:
                    urllib.request.urlopen(base + "/stats", timeout=1).read()
                    break
                except OSError:
                    if proc.poll() is not None or time.perf_counter() - started > 30:
                        raise SystemExit("service did not start")
                    time.sleep(0.01)
            ready_ms = (time.perf_counter() - started) * 1000
            idle_rss = psutil.Process(proc.pid).memory_info().rss
            sampled: list[int] = []
            stop = threading.Event()

            def sample() -> None:
                while not stop.is_set():
                    try:
                        sampled.append(psutil.Process(proc.pid).memory_info().rss)
                    except psutil.Error:
                        return
                    time.sleep(0.005)
            threading.Thread(target=sample, daemon=True).start()
            print("launch to ready: %.0f ms (%s); idle RSS %.0f MiB"
                  % (ready_ms, args.env, idle_rss / 2**20))
            for name, data in images.items():
                post(base + "/analyze", data)  # warm-up
                trips, server = [], []
                for _ in range(args.runs):
                    ms, body = post(base + "/analyze", data)
                    trips.append(ms)
                    server.append(body["elapsed_ms"])
                print("%s JPEG (%.1f MB): median round trip %.0f ms, median service time %.0f ms "
                      "over %d runs, %d regions" % (name, len(data) / 1e6, statistics.median(trips),
                                                    statistics.median(server), args.runs,
                                                    body["regions_examined"]))
            stop.set()
            print("peak RSS while analysing: %.0f MiB" % (peak_rss(proc.pid, sampled) / 2**20))
        finally:
            proc.terminate()
            proc.wait(10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
