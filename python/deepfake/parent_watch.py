"""Exit when the gateway that started us is gone, so no orphan keeps the port.

The gateway passes its PID in ``TORNADO_GATEWAY_PID``. We watch that PID, not ``getppid()``:
under the Werkzeug reloader our direct parent is the reloader, not the gateway. The process's
creation time is remembered so a recycled PID is not mistaken for the gateway.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from typing import Callable, Optional

import psutil

log = logging.getLogger("deepfake.parent_watch")

INTERVAL = 0.5  # seconds between checks


def _alive(pid: int, created: Optional[float]) -> bool:
    try:
        process = psutil.Process(pid)
        if created is not None and abs(process.create_time() - created) > 0.01:
            return False  # the PID was reused by another process
        return process.status() != psutil.STATUS_ZOMBIE
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return False


def watch_parent(pid: int, on_gone: Callable[[], None] = lambda: os._exit(0),
                 interval: float = INTERVAL) -> threading.Thread:
    """Start a daemon thread that calls ``on_gone`` (default: exit now) once ``pid`` is gone."""
    try:
        created: Optional[float] = psutil.Process(pid).create_time()
    except psutil.Error:
        created = None

    def loop() -> None:
        while _alive(pid, created):
            time.sleep(interval)
        log.warning("gateway process %d is gone; exiting so the port is released", pid)
        on_gone()

    thread = threading.Thread(target=loop, name="parent-watch", daemon=True)
    thread.start()
    return thread


def watch_from_environment(environ: Optional[dict] = None) -> Optional[threading.Thread]:
    """Watch ``TORNADO_GATEWAY_PID`` if the gateway set it; ignore a malformed value."""
    raw = (os.environ if environ is None else environ).get("TORNADO_GATEWAY_PID", "").strip()
    if not raw:
        return None
    try:
        pid = int(raw)
    except ValueError:
        log.warning("TORNADO_GATEWAY_PID=%r is not a process id; not watching the parent", raw)
        return None
    log.info("watching gateway process %d", pid)
    return watch_parent(pid)
