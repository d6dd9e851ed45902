#!/usr/bin/env python
"""A bare Tornado application answering ``GET /api/deepfake/tiny`` itself (``{"ok": true}``).

The benchmark's reference for what serving a request costs before any proxying: the same
HTTP/1.1 server (``GatewayHTTPServer``, as the gateway; ``--server tornado`` for Tornado's own
``HTTPServer``), routing and RequestHandler machinery the gateway runs on, with nothing behind
it. At one connection a request through the gateway takes at least the child's time plus this
server's time, which bounds the gateway's ratio from above.

    python bench/tornado_floor.py --port 8099 [--server tornado]
"""
from __future__ import annotations

import argparse
import asyncio
import logging

import tornado.web
from tornado.httpserver import HTTPServer
from tornado.netutil import bind_sockets

from tornado_gateway.http.server import GatewayHTTPServer


class Tiny(tornado.web.RequestHandler):
    def get(self) -> None:
        self.set_header("Content-Type", "application/json")
        self.write(b'{"ok": true}\n')


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--server", choices=["gateway", "tornado"], default="gateway",
                        help="GatewayHTTPServer (what the gateway runs on) or Tornado's HTTPServer")
    args = parser.parse_args()
    logging.getLogger("tornado.access").setLevel(logging.WARNING)  # as the gateway
    app = tornado.web.Application([(r"/api/deepfake/tiny", Tiny)])
    sockets = bind_sockets(args.port, args.host)
    if args.server == "gateway":
        await GatewayHTTPServer(app).start(sockets)
    else:
        HTTPServer(app).add_sockets(sockets)
    print("%s floor listening on %s:%d" % (args.server, args.host, args.port), flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except KeyboardInterrupt:  # the benchmark stops it with SIGINT
        pass
