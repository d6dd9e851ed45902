"""WSGI middleware that makes Werkzeug's interactive debugger unreachable.

The debugger executes Python sent by the browser. It is never enabled (``use_debugger=False``),
and this guard answers 404 to any request that names ``__debugger__`` in its path or query
anyway, so a configuration slip cannot expose it.
"""
from __future__ import annotations

import json
from typing import Any, Callable, Iterable
from urllib.parse import unquote

from .errors import error_payload

MARKER = "__debugger__"


class DebuggerGuard:
    def __init__(self, app: Callable[..., Iterable[bytes]]) -> None:
        self.app = app

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]
                 ) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        query = environ.get("QUERY_STRING", "")
        if MARKER in path or MARKER in query or MARKER in unquote(unquote(query)):
            body = json.dumps(error_payload(
                "Not found", "The requested URL was not found on this service.",
                "See GET /api/deepfake/stats for the service's endpoints.")).encode("utf-8")
            start_response("404 NOT FOUND", [("Content-Type", "application/json"),
                                             ("Content-Length", str(len(body)))])
            return [body]
        return self.app(environ, start_response)
