"""A bare gateway for tests: only ``proxy_routes``, with a fake bridge that is always ready.

Run: ``python proxy_gateway.py --upstream http://127.0.0.1:5001 [--port 0] [--max-body N]``.
Prints ``LISTENING <port>`` once it accepts connections. Used where the gateway must be its
own process (memory measurements); importable for :class:`FakeBridge`.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import sys
from typing import Any

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

from tornado_gateway.config import GatewayConfig  # noqa: E402
from tornado_gateway.supervisor.state import BridgeState, TERMINAL  # noqa: E402


class FakeBridge:
    """The slice of PythonBridge the proxy reads, with the state set by hand."""

    def __init__(self, flask_url: str, state: BridgeState = BridgeState.READY) -> None:
        self.flask_url = flask_url
        self._state = state
        self._changed: Any = None  # an asyncio.Event, created on the running loop
        self.failures: list = []
        self.wait_calls = 0

    @property
    def state(self) -> BridgeState:
        return self._state

    def set_state(self, state: BridgeState) -> None:
        self._state = state
        if self._changed is not None:
            self._changed.set()
            self._changed = None

    def is_flask_ready(self) -> bool:
        return self._state is BridgeState.READY

    async def wait_until_ready(self, timeout_s: float) -> bool:
        self.wait_calls += 1
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            if self._state is BridgeState.READY:
                return True
            if self._state in TERMINAL or self._state is BridgeState.IDLE:
                return False
            remaining = deadline - loop.time()
            if remaining <= 0:
                return False
            if self._changed is None:
                self._changed = asyncio.Event()
            try:
                await asyncio.wait_for(self._changed.wait(), remaining)
            except asyncio.TimeoutError:
                return False

    def report_upstream_failure(self, reason: str) -> None:
        self.failures.append(reason)


async def _serve(args: Any) -> None:
    import tornado.web
    from tornado.httpserver import HTTPServer
    from tornado.netutil import bind_sockets

    from tornado_gateway.proxy import proxy_routes

    config = GatewayConfig(max_body=args.max_body, proxy_timeout=600000)
    client = "tornado.simple_httpclient.SimpleAsyncHTTPClient" if args.simple else None
    app = tornado.web.Application(proxy_routes(FakeBridge(args.upstream), config,
                                               client=client))
    sockets = bind_sockets(args.port, "127.0.0.1")
    server = HTTPServer(app)
    server.add_sockets(sockets)
    print("LISTENING %d" % sockets[0].getsockname()[1], flush=True)
    await asyncio.Event().wait()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--upstream", required=True)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--max-body", type=int, default=4 << 30)
    parser.add_argument("--simple", action="store_true",
                        help="Tornado's SimpleAsyncHTTPClient (GATEWAY_UPSTREAM=simple)")
    args = parser.parse_args()
    try:
        asyncio.run(_serve(args))
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
