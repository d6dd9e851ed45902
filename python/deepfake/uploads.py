"""Getting the image bytes and form fields out of a Flask request.

Accepted: multipart field ``file`` (or ``image``), or a raw body with an ``image/*``
Content-Type. The byte limit is enforced while reading, so an oversized body costs at most
``max_upload + 1`` bytes of memory before it is refused.
"""
from __future__ import annotations

from typing import Any, Optional

from flask import Request

from .errors import ApiError

FILE_FIELDS = ("file", "image")
TRUE_WORDS = ("1", "true", "yes", "on")


def too_large(max_upload: int) -> ApiError:
    return ApiError(413, "File too large",
                    "The upload is larger than the limit of %.1f MiB." % (max_upload / 2**20),
                    "Upload a smaller file, or raise DEEPFAKE_MAX_UPLOAD for the service.")


def _read_limited(stream: Any, max_upload: int) -> bytes:
    data = stream.read(max_upload + 1)
    if len(data) > max_upload:
        raise too_large(max_upload)
    return data


def has_image(request: Request) -> bool:
    mimetype = request.mimetype or ""
    if mimetype.startswith("image/"):
        return True
    return mimetype == "multipart/form-data" and any(
        request.files.get(name) is not None for name in FILE_FIELDS)


def image_bytes(request: Request, max_upload: int) -> bytes:
    """The uploaded image's bytes, or an :class:`ApiError` naming what is missing or wrong."""
    if request.content_length is not None and request.content_length > max_upload + 2**20:
        raise too_large(max_upload)
    mimetype = request.mimetype or ""
    if mimetype.startswith("image/"):
        return _read_limited(request.stream, max_upload)
    if mimetype == "multipart/form-data":
        for name in FILE_FIELDS:
            upload = request.files.get(name)
            if upload is not None:
                return _read_limited(upload.stream, max_upload)
        raise ApiError(400, "No file",
                       "The multipart form has no file field named 'file' (or 'image').",
                       "Send the image as multipart/form-data field 'file'.")
    if not mimetype and not request.content_length:
        raise ApiError(400, "No file", "The request carries no image.",
                       "Send the image as multipart/form-data field 'file', or as the raw "
                       "body with Content-Type image/jpeg, image/png, ...")
    raise ApiError(415, "Unsupported upload type",
                   "Content-Type %r is not an image upload." % (mimetype or "(none)"),
                   "Send multipart/form-data with field 'file', or a raw body with "
                   "Content-Type image/*.")


JSON_SHAPE = ('{"analysis_id": "<id from analyze>", "label": "real"} with Content-Type: '
              'application/json, or a multipart form with the fields label and file')


def json_object(request: Request) -> Optional[dict]:
    """The JSON body as an object; None when the request is not JSON. A JSON request whose
    body is not valid JSON, or not an object, is an :class:`ApiError` 400 that says so."""
    if not request.is_json:
        return None
    body = request.get_json(silent=True)
    if body is None:
        raw = request.get_data(cache=True)
        raise ApiError(400, "Invalid JSON body",
                       "The body is not valid JSON" + (" (it is empty)." if not raw else "."),
                       "Send " + JSON_SHAPE + ".")
    if not isinstance(body, dict):
        raise ApiError(400, "Invalid JSON body",
                       "The body is JSON, but a %s, not an object." % _json_kind(body),
                       "Send " + JSON_SHAPE + ".")
    return body


def _json_kind(value: Any) -> str:
    return {list: "list", str: "string", bool: "boolean", int: "number",
            float: "number"}.get(type(value), "value")


def field(request: Request, name: str) -> Optional[str]:
    """A form, JSON or query field as a string (JSON body first, then form, then query).
    A JSON body that is not an object is an :class:`ApiError` 400 (see :func:`json_object`)."""
    body = json_object(request)
    if body is not None and body.get(name) is not None:
        return str(body[name])
    if request.mimetype in ("multipart/form-data", "application/x-www-form-urlencoded"):
        value = request.form.get(name)
        if value is not None:
            return value
    return request.args.get(name)


def wants_image_kept(request: Request, default: bool) -> bool:
    value = field(request, "store_image")
    return default if value is None else value.strip().lower() in TRUE_WORDS
