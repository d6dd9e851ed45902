"""The service's JSON errors: one shape, one place, same as the gateway's.

Every error body is ``{"error", "message", "suggestion", "timestamp"}`` (ISO 8601 UTC), plus
optional extra keys (``needed`` and ``holder`` for retrain). Code raises :class:`ApiError`; the
Flask app turns it into a response. Nothing else builds error bodies.
"""
from __future__ import annotations

from typing import Any, Optional

from .store import utc_now


class ApiError(Exception):
    """An error answered to the client with ``status`` and a JSON body."""

    def __init__(self, status: int, error: str, message: str, suggestion: str,
                 extra: Optional[dict[str, Any]] = None) -> None:
        super().__init__(message)
        self.status = status
        self.error = error
        self.message = message
        self.suggestion = suggestion
        self.extra = extra or {}

    def payload(self) -> dict[str, Any]:
        body = {"error": self.error, "message": self.message, "suggestion": self.suggestion,
                "timestamp": utc_now()}
        body.update(self.extra)
        return body


def error_payload(error: str, message: str, suggestion: str) -> dict[str, Any]:
    return ApiError(0, error, message, suggestion).payload()
