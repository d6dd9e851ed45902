"""Helpers shared by the real-process tests (tests/integration, tests/e2e).

* :func:`free_port` -- a port nobody listens on now (never the fixed 5001/8080: other test runs
  share the machine).
* :class:`OrphanGuard` -- after a test, no process whose command line names one of our programs
  (a test child script, ``tornado_gateway``, ``api_server.py``) AND one of the test's own ports
  may be left. Leftovers are killed (only those: they carry this test's unique port) and the
  test fails with their command lines.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import time
from typing import Iterable, List, Set

import psutil
import pytest

TESTS_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROJECT_DIR = os.path.dirname(TESTS_DIR)
CHILD_SCRIPTS = os.path.join(TESTS_DIR, "child_scripts")
OURS = ("child_scripts", "tornado_gateway", "api_server.py")


def script(name: str) -> str:
    """Absolute path of a test child script."""
    path = os.path.join(CHILD_SCRIPTS, name)
    assert os.path.isfile(path), path
    return path


from ports import free_port, free_ports  # noqa: E402  (never the same port twice in a run)


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    """True if (host, port) can be bound now (TIME_WAIT leftovers do not count)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def pid_alive(pid: int) -> bool:
    """True if ``pid`` runs (a zombie counts as gone)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def wait_until(predicate, timeout: float, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


def matching_processes(ports: Iterable[int]) -> List[psutil.Process]:
    """Live processes (not this one) whose argv holds one of ``ports`` as a whole argument and
    names one of our programs."""
    wanted = {str(p) for p in ports}
    found = []
    if not wanted:
        return found
    for proc in psutil.process_iter(["pid", "cmdline", "status"]):
        try:
            if proc.pid == os.getpid() or proc.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            argv = proc.info["cmdline"] or []
        except psutil.Error:
            continue
        if wanted.intersection(argv) and any(o in arg for arg in argv for o in OURS):
            found.append(proc)
    return found


class OrphanGuard:
    """Hands out this test's ports and checks, afterwards, that nothing using them is left."""

    def __init__(self) -> None:
        self.ports: Set[int] = set()

    def port(self, count: int = 1) -> int:
        """A free port (the first of ``count`` consecutive ones, for a group of workers)."""
        port = free_port() if count == 1 else free_ports(count)
        self.ports.update(range(port, port + count))
        return port

    def leftovers(self, grace: float = 2.0) -> List[psutil.Process]:
        wait_until(lambda: not matching_processes(self.ports), grace, 0.05)
        return matching_processes(self.ports)

    def check(self) -> None:
        left = self.leftovers()
        if not left:
            return
        described = []
        for proc in left:
            try:
                described.append("%d: %s" % (proc.pid, " ".join(proc.cmdline())))
            except psutil.Error:
                described.append(str(proc.pid))
        for proc in left:  # ours: they carry this test's unique port
            try:
                proc.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(left, timeout=3)
        pytest.fail("orphan process(es) left behind (killed now):\n  " + "\n  ".join(described))


@pytest.fixture
def orphans():
    """``orphans.port()`` gives a free port owned by this test; teardown fails the test if a
    process of ours with one of those ports is still running."""
    guard = OrphanGuard()
    yield guard
    guard.check()


# --- for tests that drive PythonBridge directly ----------------------------------------------

FAST = dict(health_interval=100, health_timeout=5000, health_retries=50,
            shutdown_timeout=2000)


def child_env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("TORNADO_GATEWAY_PID", "CRASH_AFTER", "SLOW_START")}
    env.update(extra)
    return env


def make_bridge(orphans, name: str, sink, env=None, **overrides):
    """A PythonBridge running test child ``name`` on a port owned by the test, with fast
    health settings (100 ms interval); ``overrides`` are FlaskConfig fields."""
    from tornado_gateway.supervisor.bridge import PythonBridge
    from tornado_gateway.config import FlaskConfig

    settings = dict(FAST, script=script(name), port=orphans.port())
    settings.update(overrides)
    return PythonBridge(FlaskConfig(**settings), sink=sink, environ=env or child_env())


async def wait_for(predicate, timeout: float, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(interval)
    return True


def messages(caplog, logger: str = "tornado_gateway", level: int = logging.DEBUG) -> list:
    return [r.getMessage() for r in caplog.records
            if r.name.startswith(logger) and r.levelno >= level]


async def fetch_json(url: str) -> tuple:
    from tornado.httpclient import AsyncHTTPClient

    client = AsyncHTTPClient(force_instance=True)
    try:
        response = await client.fetch(url, raise_error=False, request_timeout=5)
        return response.code, json.loads(response.body or b"null")
    finally:
        client.close()
