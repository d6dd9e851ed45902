"""make_app(): the gateway's routes: the proxy, the status endpoint and the web page."""
from __future__ import annotations

import asyncio
import os
import time
from typing import Any, List, Optional

import tornado.web
from tornado.log import access_log

from . import __version__
from .auth import Access, access_for, redact
from .config import GatewayConfig
from .errors import GatewayError, not_found, write_error_response
from .proxy import access_log_level, proxy_routes

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

    def initialize(self, bridge: Any, config: GatewayConfig, started: float,
                   access: Optional[Access] = None) -> None:
        self.bridge = bridge
        self.config = config
        self.started = started
        self.access = access

    def get(self) -> None:
        self.set_header("Cache-Control", "no-store")
        if self.access is not None and not self.access.allows(
                self.request.headers.get("Authorization")):
            # Open for load balancers' health checks, and for the web page before it has the
            # token: whether the service can serve, nothing about processes, ports or errors.
            status = self.bridge.status()
            workers = status.get("workers") or [status]
            self.write({"service": {
                "state": status.get("state"), "ready": bool(status.get("ready")),
                "workers_ready": sum(1 for w in workers if w.get("ready")),
                "workers": len(workers)},
                "auth": {"required": True, "message": "Send 'Authorization: Bearer <token>' "
                         "for the full status."}})
            return
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


def gateway_routes(bridge: Any, config: GatewayConfig, access: Optional[Access] = None,
                   client: Any = None) -> List[Any]:
    """The gateway's own routes and the proxy, for embedding in another Application.
    ``access`` is who may use the API (``auth.py``), by default what ``config`` says;
    ``client`` the proxy's HTTP client (``proxy_routes``)."""
    if access is None:
        access = access_for(config)
    return proxy_routes(bridge, config, access, client) + [
        (r"/api/gateway/status", StatusHandler,
         dict(bridge=bridge, config=config, started=time.monotonic(), access=access)),
    ]


def _log_request(handler: tornado.web.RequestHandler) -> None:
    """Tornado's access log line, with any ``token`` query parameter masked."""
    status = handler.get_status()
    level = access_log_level(status)
    if access_log.isEnabledFor(level):
        request = handler.request
        access_log.log(level, "%d %s %s (%s) %.2fms", status, request.method,
                       redact(request.uri or ""), request.remote_ip,
                       1000.0 * request.request_time())


def make_app(bridge: Any, config: Optional[GatewayConfig] = None,
             access: Optional[Access] = None, client: Any = None,
             **settings: Any) -> tornado.web.Application:
    """The gateway's Application: ``/api/deepfake/*`` proxied to the bridge's child,
    ``/api/gateway/status``, the web page at ``/`` and ``/static/``, JSON 404 elsewhere.
    ``access`` is who may use the API (by default what ``config`` says; the decision is the
    Application's ``settings["gateway_access"]``). Extra ``settings`` go to the
    Application."""
    config = config or GatewayConfig()
    if access is None:
        access = access_for(config)
    settings.setdefault("gateway_access", access)
    settings.setdefault("log_function", _log_request)
    routes = gateway_routes(bridge, config, access, client) + [
        (r"/", IndexHandler),
        (r"/static/(.*)", tornado.web.StaticFileHandler, {"path": STATIC_DIR}),
    ]
    settings.setdefault("default_handler_class", NotFoundHandler)
    return tornado.web.Application(routes, **settings)
