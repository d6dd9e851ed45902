"""Fixtures for the real-process integration tests: free ports, an orphan check after each test,
and ``Subprocess.uninitialize()`` once each test's event loop is done (STACK-NOTES: Subprocess's
SIGCHLD handling is bound to the first loop; without this, exit callbacks never fire on the
next test's loop)."""
from __future__ import annotations

import logging
import os
import sys
import threading
from typing import List

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gw_realproc import orphans  # noqa: E402,F401  (fixture)


@pytest.fixture(autouse=True)
def _subprocess_uninitialize(io_loop):
    yield
    from tornado.process import Subprocess

    Subprocess.uninitialize()


class LineSink:
    """A bridge ``sink`` that keeps every LogLine and also logs it the default way."""

    def __init__(self) -> None:
        self.lines: List = []
        # the stdout and stderr pumps call this from two threads: keeping and logging a line
        # as one step keeps self.lines in the order the log records have
        self._lock = threading.Lock()

    def __call__(self, line) -> None:
        from tornado_gateway.supervisor.logpump import log_sink

        with self._lock:
            self.lines.append(line)
            log_sink(line)

    def texts(self, stream=None) -> List[str]:
        return [ln.text for ln in list(self.lines) if stream in (None, ln.stream)]


@pytest.fixture
def sink() -> LineSink:
    return LineSink()


@pytest.fixture
def gwlog(caplog):
    caplog.set_level(logging.DEBUG)
    return caplog
