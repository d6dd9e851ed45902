"""Make the errors waitress answers by itself (before our app runs) use the JSON error shape.

waitress reads the whole request before calling the app, and refuses some requests on its own
(a body over ``max_request_body_size``, malformed HTTP) with a plain-text page. The gateway and
its clients expect ``{"error", "message", "suggestion", "timestamp"}`` from every error, so
the server is given a channel class whose error task writes that instead. This uses waitress's
documented extension points (``channel_class``, ``error_task_class``), not a patch.
"""
from __future__ import annotations

import json
from typing import Any

from waitress.channel import HTTPChannel
from waitress.task import ErrorTask

from .errors import error_payload

_SUGGESTIONS = {
    413: "Upload a smaller file, or raise DEEPFAKE_MAX_UPLOAD for the service.",
    431: "Send fewer or shorter headers.",
}


class JsonErrorTask(ErrorTask):
    def execute(self) -> None:
        error = self.request.error
        payload = error_payload(error.reason, "%s: %s" % (error.reason, error.body),
                                _SUGGESTIONS.get(error.code, "Check the request and retry."))
        body = json.dumps(payload).encode("utf-8")
        self.status = "%d %s" % (error.code, error.reason)
        self.response_headers.append(("Content-Type", "application/json"))
        self.set_close_on_finish()
        self.content_length = len(body)
        self.write(body)


class JsonErrorChannel(HTTPChannel):
    error_task_class = JsonErrorTask


def use_json_errors(server: Any) -> Any:
    """Switch a server made by ``waitress.create_server`` to JSON error pages; returns it."""
    server.channel_class = JsonErrorChannel
    return server
