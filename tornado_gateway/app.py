"""make_app(): the gateway's routes: the proxy, the status endpoint and the web page."""
from __future__ import annotations

import asyncio
import os
import time
from typing import Any, List, Optional

import tornado.web

from . import __version__
from .config import GatewayConfig
from .errors import GatewayError, not_found, write_error_response
from .proxy import proxy_routes

STATIC_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")


class JSONErrorMixin:
    """Errors Tornado raises itself (405, 400, 500...) answered in the gateway's JSON shape."""

    def allowed_methods(self) -> List[str]:
        """The methods this handler implements (for a 405's ``Allow`` header)."""
        base = tornado.web.RequestHandler
        return [m for m in self.SUPPORTED_METHODS  # type: ignore[attr-defined]
                if getattr(type(self), m.lower(), None) is not getattr(base, m.lower(), None)]

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        # "Method not allowed", as the gateway's own errors are written ("Not found")
        reason = (self._reason or "Error").capitalize()  # type: ignore[attr-defined]
        suggestion = {
            405: "Use %s for this endpoint." % " or ".join(self.allowed_methods()),
            400: "Check the request line, headers and body.",
        }.get(status_code, "Retry; if it persists, read the gateway's log.")
        # RFC 9110 15.5.6: a 405 says which methods would work
        extra = {"Allow": ", ".join(self.allowed_methods())} if status_code == 405 else None
        write_error_response(self, GatewayError(status_code, reason,
                                                "The gateway answered %d %s for %s %s." % (
                                                    status_code, reason,
                                                    self.request.method,  # type: ignore
                                                    self.request.path),  # type: ignore
                                                suggestion), extra)


class StatusHandler(JSONErrorMixin, tornado.web.RequestHandler):
    """``GET /api/gateway/status``: the gateway and the child, for people and the web page."""

    def initialize(self, bridge: Any, config: GatewayConfig, started: float) -> None:
        self.bridge = bridge
        self.config = config
        self.started = started

    def get(self) -> None:
        self.set_header("Cache-Control", "no-store")
        self.write({
            "gateway": {
                "version": __version__,
                "mode": self.config.mode,
                "uptime_s": round(time.monotonic() - self.started, 3),
                "pid": os.getpid(),
                # the loop serving (asyncio or uvloop): GATEWAY_LOOP, or an embedder's own
                "loop": type(asyncio.get_running_loop()).__module__.split(".")[0],
            },
            "service": self.bridge.status(),
        })

    def compute_etag(self) -> Optional[str]:
        return None  # a status must never be answered 304


class IndexHandler(JSONErrorMixin, tornado.web.RequestHandler):
    """``GET /`` (and ``HEAD /``): the web page."""

    def head(self) -> None:
        self.get()  # Tornado sends the headers of the GET without its body

    def get(self) -> None:
        path = os.path.join(STATIC_DIR, "index.html")
        if not os.path.isfile(path):
            raise tornado.web.HTTPError(404)
        self.set_header("Content-Type", "text/html; charset=utf-8")
        self.set_header("Cache-Control", "no-cache")
        with open(path, "rb") as f:
            self.write(f.read())


class NotFoundHandler(JSONErrorMixin, tornado.web.RequestHandler):
    """Everything else: a JSON 404 that says where things are."""

    def prepare(self) -> None:
        write_error_response(self, not_found(self.request.path))


def gateway_routes(bridge: Any, config: GatewayConfig) -> List[Any]:
    """The gateway's own routes and the proxy, for embedding in another Application."""
    return proxy_routes(bridge, config) + [
        (r"/api/gateway/status", StatusHandler,
         dict(bridge=bridge, config=config, started=time.monotonic())),
    ]


def make_app(bridge: Any, config: Optional[GatewayConfig] = None,
             **settings: Any) -> tornado.web.Application:
    """The gateway's Application: ``/api/deepfake/*`` proxied to the bridge's child,
    ``/api/gateway/status``, the web page at ``/`` and ``/static/``, JSON 404 elsewhere.
    Extra ``settings`` go to the Application."""
    config = config or GatewayConfig()
    routes = gateway_routes(bridge, config) + [
        (r"/", IndexHandler),
        (r"/static/(.*)", tornado.web.StaticFileHandler, {"path": STATIC_DIR}),
    ]
    settings.setdefault("default_handler_class", NotFoundHandler)
    return tornado.web.Application(routes, **settings)
