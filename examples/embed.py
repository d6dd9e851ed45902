"""Embedding tornado_gateway in your own Tornado application.

Run from the project folder:  python examples/embed.py
Then: curl http://127.0.0.1:8080/hello ; curl http://127.0.0.1:8080/api/deepfake/stats
Settings come from the same environment variables as the gateway (GATEWAY_PORT, FLASK_PORT...).
"""
import asyncio
import logging
import signal

import tornado.web

from tornado_gateway import PythonBridge, gateway_routes, load_config


class HelloHandler(tornado.web.RequestHandler):
    def get(self):
        self.write({"hello": "from my own app"})


async def main():
    # The gateway logs through `logging` and leaves its setup to you: without this line you
    # would see neither the child's [Python] lines nor the gateway's warnings.
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    config = load_config()                    # env vars, defaults, warnings
    async with PythonBridge(config) as bridge:   # starts the child, stops its tree on exit
        app = tornado.web.Application([(r"/hello", HelloHandler)] +
                                      gateway_routes(bridge, config))
        app.listen(config.port, config.host)
        print("listening on http://%s:%d" % (config.host, config.port), flush=True)
        await asyncio.Event().wait()          # serve until cancelled


if __name__ == "__main__":
    # A program started in the background by a script inherits SIGINT ignored: make Ctrl+C
    # (and kill -INT) stop it anyway.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        asyncio.run(main())
    except KeyboardInterrupt:  # Ctrl+C: the bridge has already stopped the child's tree
        pass
