"""The JSON error payloads the gateway answers with: one shape, one place.

Every error the gateway makes itself is ``{"error", "message", "suggestion", "timestamp"}``
(timestamp in ISO 8601, UTC). Handlers call :func:`write_error_response`; nothing else builds
error bodies.
"""
from __future__ import annotations

import datetime
import json
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple


def utc_timestamp(wall: Optional[float] = None) -> str:
    """``wall`` (a ``time.time()``; default now) as ISO 8601 in UTC with milliseconds and a
    ``Z`` suffix (``2024-01-15T10:30:00.123Z``): the gateway's one timestamp format."""
    now = (datetime.datetime.now(datetime.timezone.utc) if wall is None
           else datetime.datetime.fromtimestamp(wall, datetime.timezone.utc))
    return now.strftime("%Y-%m-%dT%H:%M:%S.") + f"{now.microsecond // 1000:03d}Z"


@dataclass(frozen=True)
class GatewayError:
    """An error the gateway answers itself, with the status code and an optional retry hint."""

    status: int
    error: str
    message: str
    suggestion: str
    retry_after: Optional[int] = None  # seconds; sent as Retry-After when a retry can help
    headers: Tuple[Tuple[str, str], ...] = ()  # sent with it (a 401's WWW-Authenticate)

    def payload(self) -> dict[str, Any]:
        return {
            "error": self.error,
            "message": self.message,
            "suggestion": self.suggestion,
            "timestamp": utc_timestamp(),
        }

    def body(self) -> bytes:
        return json.dumps(self.payload()).encode("utf-8")


def write_error_response(handler: Any, err: GatewayError,
                         headers: Optional[Dict[str, str]] = None) -> None:
    """Answer ``err`` on a Tornado RequestHandler whose headers are not sent yet, and finish
    (with ``headers`` added, such as a 405's ``Allow``)."""
    handler.clear()
    handler.set_status(err.status)
    for name, value in err.headers + tuple((headers or {}).items()):
        handler.set_header(name, value)
    handler.set_header("Content-Type", "application/json; charset=utf-8")
    handler.set_header("Cache-Control", "no-store")
    if err.retry_after is not None:
        handler.set_header("Retry-After", str(err.retry_after))
    handler.finish(err.body())


# The catalogue. Functions, not constants, so messages can name the port, the limit, the state.

def killed_by_sigkill_advice() -> str:
    """What a SIGKILL usually means, for the crash report and the 503."""
    return ("SIGKILL is usually the out-of-memory killer (look for 'Out of memory' in `dmesg` "
            "or `journalctl -k`) or someone's `kill -9`.")


def service_unavailable(state: str, detail: str = "", retry_after: Optional[int] = 5,
                        last_error: Optional[dict] = None,
                        last_exit: Optional[dict] = None) -> GatewayError:
    """503 while the service cannot serve. ``last_error`` / ``last_exit`` are what the bridge
    recorded (``status()``'s fields of the same names): a failed start or an exit is
    explained by its actual cause, in the same words as the gateway's warning."""
    hints = {
        "idle": "The gateway has not started the service yet (PythonBridge.start() or "
        "WorkerGroup.start() starts it).",
        "starting": "The service is still starting; retry in a few seconds.",
        "failed": "The service failed to start. The gateway's log says why; fix it, then "
        "restart the gateway.",
        "exited": "The service process exited. Read the gateway's log for its exit code and "
        "last error lines (prefixed [Python]), fix the cause, then restart the gateway (or set "
        "FLASK_AUTO_RESTART to restart it by itself).",
        "unhealthy": "The service stopped answering its health check; it may be overloaded or "
        "frozen. Retry shortly; if it persists, restart the gateway.",
        "stopping": "The gateway is shutting down.",
        "stopped": "The gateway has stopped the service; start the gateway again.",
    }
    message = "The deepfake detection service is currently unavailable (state: %s)." % state
    suggestion = hints.get(state, "Restart the gateway.")
    if state == "failed" and last_error:
        message += " " + str(last_error.get("message") or "")
        suggestion = str(last_error.get("suggestion") or suggestion)
    elif state == "exited" and last_exit:
        how = ("it was killed by signal %s" % last_exit["signal"] if last_exit.get("signal")
               else "it exited with code %s" % last_exit.get("code"))
        message += " The service process %s." % how.replace("it ", "", 1)
        if last_exit.get("signal") == "SIGKILL":
            suggestion = killed_by_sigkill_advice() + " " + suggestion
    if detail:
        message += " " + detail
    return GatewayError(
        503,
        "Flask server unavailable",
        message.strip(),
        suggestion,
        retry_after if state in ("starting", "unhealthy") else None,
    )


def unauthorized(presented: bool) -> GatewayError:
    """401 for an API request without the gateway's token (``auth.py``). Sent with
    ``WWW-Authenticate: Bearer``; never says what the token is or how close a guess came."""
    return GatewayError(
        401,
        "unauthorized",
        "This gateway requires a token: %s." % (
            "the Authorization header does not carry it" if presented
            else "the request has no Authorization header"),
        "Send 'Authorization: Bearer <token>'. The token is GATEWAY_TOKEN (or the contents of "
        "GATEWAY_TOKEN_FILE) where the gateway runs; when the gateway generated one, it printed "
        "a URL with ?token=... at start-up (open that URL for the web page).",
        headers=(("WWW-Authenticate", 'Bearer realm="tornado_gateway"'),),
    )


def overloaded(why: str, retry_after: int = 1) -> GatewayError:
    """503 for a request the workers have no room for: the queue is full, or it waited its
    longest. Answered at once, so latency never piles up behind a full queue."""
    return GatewayError(
        503,
        "overloaded",
        "The deepfake detection service is busy: %s." % why,
        "Retry after the time in Retry-After (spread retries out); for more capacity raise "
        "FLASK_WORKERS, or GATEWAY_QUEUE_LIMIT / GATEWAY_QUEUE_TIMEOUT to wait longer.",
        retry_after,
    )


def bad_gateway(detail: str) -> GatewayError:
    return GatewayError(
        502,
        "Bad gateway",
        "The deepfake detection service could not be reached or dropped the connection: %s" % detail,
        "Check the gateway's log lines prefixed '[Python]'; the service may have crashed.",
        5,
    )


def gateway_timeout(timeout_s: float) -> GatewayError:
    return GatewayError(
        504,
        "Gateway timeout",
        "The deepfake detection service did not answer within %g seconds." % timeout_s,
        "Retry later; raise GATEWAY_PROXY_TIMEOUT (milliseconds) if requests legitimately "
        "take longer.",
        10,
    )


def _too_large(size: Optional[int], limit: int, whose: str, suggestion: str) -> GatewayError:
    got = "%d bytes" % size if size is not None else "the request body"
    return GatewayError(
        413,
        "Payload too large",
        "%s exceeds %s limit of %d bytes." % (got[0].upper() + got[1:], whose, limit),
        suggestion,
    )


def payload_too_large(size: Optional[int], limit: int) -> GatewayError:
    return _too_large(size, limit, "the gateway's", "Send a smaller body, or raise the limit "
                      "with GATEWAY_MAX_BODY (bytes) or --max-body.")


def request_body_too_large(size: Optional[int], limit: int) -> GatewayError:
    """413 from the HTTP server for a body over a route's limit (the proxy's limit, with its
    own message, is checked before this one)."""
    return _too_large(size, limit, "this route's", "Send a smaller body. Only /api/deepfake/ "
                      "routes take large bodies (GATEWAY_MAX_BODY).")


def request_head_too_large(limit: int) -> GatewayError:
    """431 for a request line and header fields longer than the server reads."""
    return GatewayError(
        431,
        "Request header fields too large",
        "The request line and header fields exceed the gateway's limit of %d bytes." % limit,
        "Send fewer or shorter header fields (large cookies are the usual cause).",
    )


def malformed_request(detail: str) -> GatewayError:
    """400 for a request the HTTP server cannot read (a malformed head or body framing)."""
    return GatewayError(
        400,
        "Bad request",
        "The gateway could not read the request: %s." % detail.rstrip("."),
        "Send a well-formed HTTP/1.1 request: one request line, 'Name: value' header lines, "
        "and a body framed by one Content-Length or by Transfer-Encoding: chunked.",
    )


def not_found(path: str) -> GatewayError:
    return GatewayError(
        404,
        "Not found",
        "The gateway has no route for %s." % path,
        "Deepfake API endpoints live under /api/deepfake/; gateway status is at "
        "/api/gateway/status.",
    )


def bad_request_path(path: str, detail: str) -> GatewayError:
    """400 for a proxied path the gateway refuses to forward (prefix escape, encoded slash)."""
    return GatewayError(
        400,
        "Bad request",
        "The gateway refuses to forward %s: %s." % (path, detail),
        "Use a plain path under /api/deepfake/ without '..' segments, encoded slashes, "
        "empty segments or backslashes.",
    )


def ambiguous_framing(detail: str) -> GatewayError:
    """400 for a request whose body framing could be read two ways (request smuggling)."""
    return GatewayError(
        400,
        "Bad request",
        "The gateway refuses a request with ambiguous body framing: %s." % detail,
        "Send either one Content-Length or Transfer-Encoding: chunked, never both.",
    )


def request_timeout(timeout_s: float) -> GatewayError:
    """408 for a client that stopped sending its request body."""
    return GatewayError(
        408,
        "Request timeout",
        "The request body stalled: no bytes arrived for %g seconds." % timeout_s,
        "Check the client's connection and retry; raise GATEWAY_BODY_TIMEOUT (milliseconds) "
        "for very slow links.",
    )


def method_not_supported(method: str) -> GatewayError:
    """501 for a request method the gateway cannot forward."""
    return GatewayError(
        501,
        "Not implemented",
        "The gateway cannot forward the request method %s." % method,
        "Use a standard HTTP method (GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS).",
    )


def internal_error(status: int = 500, reason: str = "Internal Server Error") -> GatewayError:
    """An error Tornado raised inside a gateway handler (a bug, or a malformed request)."""
    return GatewayError(
        status,
        reason or "Internal Server Error",
        "The gateway could not handle the request (%d %s)." % (status, reason),
        "Retry; if it persists, read the gateway's log for the traceback and report it.",
    )
