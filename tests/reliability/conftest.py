"""Fixtures of the fault-and-abuse suite: real gateways (``python -m tornado_gateway``) on free
ports with a temporary ``DEEPFAKE_DATA_DIR``, the real service or the echo child behind them.

Every gateway a test starts is ended by its pid at teardown, and so is anything it spawned that
is still alive (descendants seen, or processes carrying the gateway's marker variable); a
teardown that had to kill something fails the test: a fault must never leave a process behind.
"""
from __future__ import annotations

import os
import sys
from typing import Any, Dict, Iterable, List, Optional

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from rel_helpers import Gateway, echo_args  # noqa: E402


class GatewayFactory:
    def __init__(self, base: str) -> None:
        self.base = base
        self.started: List[Gateway] = []

    def __call__(self, args: Iterable[str] = (), env: Optional[Dict[str, str]] = None,
                 wait: Optional[str] = "ready", timeout: float = 20.0, **kw: Any) -> Gateway:
        gw = Gateway(os.path.join(self.base, "gw%d" % len(self.started)), args, env, **kw)
        self.started.append(gw)
        gw.start()
        if wait is not None:
            gw.wait_listening(timeout)
            if wait != "listening":
                gw.wait_state(wait, timeout=timeout)
        return gw

    def finish(self) -> List[str]:
        problems = []
        for gw in self.started:
            killed = gw.cleanup()
            if killed:
                problems.append("gateway on port %d left processes %s behind (killed)"
                                % (gw.port, killed))
        return problems


@pytest.fixture
def gateways(tmp_path: Any):
    """Start real gateways; every one is checked for leftovers and cleaned up at teardown."""
    factory = GatewayFactory(str(tmp_path))
    yield factory
    problems = factory.finish()
    assert not problems, problems


def _shared(tmp_path_factory: Any, name: str, args: List[str], env: Dict[str, str]):
    """One gateway shared by a module's non-destructive tests; Ctrl+C must end it with 0."""
    factory = GatewayFactory(str(tmp_path_factory.mktemp(name)))
    gw = factory(args, env)
    yield gw
    try:
        if gw.running():
            code = gw.interrupt()
            assert code == 0, "exit code %s after SIGINT:\n%s" % (code, gw.log()[-2000:])
    finally:
        problems = factory.finish()
    assert not problems, problems


@pytest.fixture(scope="module")
def service_gw(tmp_path_factory: Any):
    """Development mode, the real service, small pixel limit so bombs are cheap to build."""
    yield from _shared(tmp_path_factory, "service-dev", ["--max-body", "8M"],
                       {"DEEPFAKE_MAX_PIXELS": "4000000", "DEEPFAKE_MAX_UPLOAD": "4194304"})


@pytest.fixture(scope="module")
def service_prod_gw(tmp_path_factory: Any):
    """Production mode (waitress), the real service."""
    yield from _shared(tmp_path_factory, "service-prod", ["--mode", "production"], {})


@pytest.fixture(scope="module")
def echo_gw(tmp_path_factory: Any):
    """The echo child behind a gateway with a 1 MiB body limit and short timeouts: idle 2 s,
    body stall 1.5 s, whole proxied exchange 3 s."""
    yield from _shared(tmp_path_factory, "echo", echo_args() + [
        "--max-body", "1M", "--proxy-timeout", "3000", "--idle-timeout", "2000",
        "--body-timeout", "1500"], {})
