"""Two real workers behind a real gateway: one SIGKILLed under load, Ctrl+C with both running.

The workers are ``tests/child_scripts/echo_server.py`` children (``--workers 2``); every
process is real, every signal is real, every request goes over 127.0.0.1.
"""
from __future__ import annotations

import collections
import http.client
import os
import signal
import threading
import time
from typing import Dict, List

import psutil
import pytest

from rel_helpers import alive, echo_args, port_is_free, wait_until

pytestmark = pytest.mark.integration


def load(port: int, clients: int, seconds: float, path: str) -> Dict[object, int]:
    """``clients`` keep-alive clients, one request after another for ``seconds``: the count of
    each status (and of connection errors, as ``"error"``)."""
    counts: Dict[object, int] = collections.Counter()
    lock = threading.Lock()
    deadline = time.monotonic() + seconds

    def client() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        while time.monotonic() < deadline:
            try:
                conn.request("GET", path)
                response = conn.getresponse()
                response.read()
                key: object = response.status
                if response.status == 503:
                    key = (503, response.getheader("Retry-After"))
            except (OSError, http.client.HTTPException):
                key = "error"
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            with lock:
                counts[key] += 1
        conn.close()

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds + 30)
    return counts


@pytest.mark.timeout(90)
def test_sigkill_of_one_worker_under_load(gateways):
    gw = gateways(echo_args() + ["--workers", "2", "--auto-restart", "1",
                                 "--health-interval", "100"])
    service = gw.wait_state("ready")
    wait_until(lambda: all(w["state"] == "ready" for w in gw.status()["service"]["workers"]),
               20, "both workers to be ready")
    workers = gw.status()["service"]["workers"]
    assert [w["port"] for w in workers] == [gw.flask_port, gw.flask_port + 1]
    victim = workers[0]["pid"]
    created = psutil.Process(victim).create_time()
    result: List[Dict[object, int]] = []
    runner = threading.Thread(target=lambda: result.append(
        load(gw.port, 6, 4.0, "/api/deepfake/slow?delay=0.02")))
    runner.start()
    time.sleep(1.0)
    os.kill(victim, signal.SIGKILL)
    runner.join(60)
    counts = result[0]
    # in flight on the killed worker: 502 (at most its limit, plus one caught between the
    # kill and the gateway seeing the exit); never a 503 while the other worker is ready
    assert set(counts) <= {200, 502}, counts
    assert counts[502] <= 4, counts
    assert counts[200] > 50, counts
    assert not alive(victim, created)
    # restarted (FLASK_AUTO_RESTART=1): both serve again, the dead one with a new pid
    wait_until(lambda: all(w["state"] == "ready" for w in gw.status()["service"]["workers"]),
               20, "the killed worker to be restarted")
    workers = gw.status()["service"]["workers"]
    assert workers[0]["pid"] != victim and workers[0]["restarts"] == 1
    assert workers[0]["last_exit"]["signal"] == "SIGKILL"
    assert workers[1]["restarts"] == 0 and workers[1]["served"] > 0
    log = gw.log()
    assert "[worker 1]" in log and "SIGKILL" in log
    after = load(gw.port, 4, 1.0, "/api/deepfake/x")
    assert set(after) == {200}, after
    served = [w["served"] for w in gw.status()["service"]["workers"]]
    assert all(s > 0 for s in served), served
    assert service["dispatch"]["worker_limit"] == 2
    assert gw.interrupt() == 0


@pytest.mark.timeout(60)
def test_ctrl_c_with_two_workers_stops_both_trees_and_frees_both_ports(gateways):
    gw = gateways(echo_args() + ["--workers", "2"])
    wait_until(lambda: all(w["state"] == "ready" for w in gw.status()["service"]["workers"]),
               20, "both workers to be ready")
    pids = [w["pid"] for w in gw.status()["service"]["workers"]]
    assert len(set(pids)) == 2
    created = {pid: psutil.Process(pid).create_time() for pid in pids}
    assert gw.interrupt() == 0
    for pid, when in created.items():
        assert not alive(pid, when), "worker %d outlived the gateway" % pid
    assert port_is_free(gw.flask_port) and port_is_free(gw.flask_port + 1)
    log = gw.log()
    for n in (1, 2):
        assert "[worker %d] Started the Flask server" % n in log, log[-2000:]
        assert "[worker %d] Flask server stopped." % n in log, log[-2000:]
