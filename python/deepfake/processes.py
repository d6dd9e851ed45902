"""Whether the process that took a lock still runs: the store's retrain lock asks this.

A process is named by its PID *and* its creation time: a PID is recycled once its process is
gone, and a recycled PID must not pass for the process that held the lock. psutil answers the
same way on Linux, macOS and Windows (``os.kill(pid, 0)`` would terminate it on Windows).
Doubt counts as alive: a lock is taken over only from a process that is certainly gone.
"""
from __future__ import annotations

import os
from typing import Optional

import psutil

# the same process's creation time read twice differs by rounding only
_SAME_START = 0.01


def start_time(pid: Optional[int] = None) -> Optional[float]:
    """When process ``pid`` (default: this one) was created; None if it is gone or hidden."""
    try:
        return psutil.Process(os.getpid() if pid is None else pid).create_time()
    except psutil.Error:
        return None


def alive(pid: int, created: Optional[float]) -> bool:
    """False only if ``pid`` is gone, a zombie, or now names a process created at another time."""
    try:
        process = psutil.Process(pid)
        if created is not None and abs(process.create_time() - created) > _SAME_START:
            return False  # the PID was reused by another process
        return process.status() != psutil.STATUS_ZOMBIE
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return False
    except psutil.AccessDenied:
        return True  # it exists, we may not look at it: not proof that the holder is gone
