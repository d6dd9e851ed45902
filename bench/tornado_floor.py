#!/usr/bin/env python
"""A bare Tornado server answering ``GET /api/deepfake/tiny`` itself (``{"ok": true}``).

The benchmark's reference for what Tornado's HTTP server costs before any proxying: the
same HTTP/1.1 server, request parsing, routing and RequestHandler machinery the gateway runs
on, with nothing behind it. At one connection a request through the gateway takes at least
the child's time plus this server's time, which bounds the gateway's ratio from above.

    python bench/tornado_floor.py --port 8099
"""
from __future__ import annotations

import argparse
import asyncio
import logging

import tornado.web


class Tiny(tornado.web.RequestHandler):
    def get(self) -> None:
        self.set_header("Content-Type", "application/json")
        self.write(b'{"ok": true}\n')


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    logging.getLogger("tornado.access").setLevel(logging.WARNING)  # as the gateway
    app = tornado.web.Application([(r"/api/deepfake/tiny", Tiny)])
    app.listen(args.port, args.host)
    print("tornado floor listening on %s:%d" % (args.host, args.port), flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except KeyboardInterrupt:  # the benchmark stops it with SIGINT
        pass
