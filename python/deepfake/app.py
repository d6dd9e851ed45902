"""The Flask application: four endpoints, JSON errors everywhere, no traceback in a response.

Handlers stay thin: they read the request, call the detector, store and retrainer, and shape
the JSON. ``create_app(config)`` builds everything from a :class:`ServiceConfig`, which is
what tests use with a temporary data directory. Several apps (worker processes) may share one
data directory: every answer that involves the model names the version that produced it.
"""
from __future__ import annotations

import logging
import time
import uuid
from typing import Any

from flask import Flask, jsonify, request
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from . import detector, features, imaging, near_duplicate, provenance, uploads
from .config import ServiceConfig
from .debugger_guard import DebuggerGuard
from .errors import ApiError, error_payload
from .model import StoredModels
from .retrain import ModelHolder, Retrainer
from .store import LABELS, ImageRecord, Store

log = logging.getLogger("deepfake.app")

PREFIX = "/api/deepfake"
_HTTP_SUGGESTIONS = {
    404: "Use one of: POST %s/analyze, POST %s/feedback, GET %s/stats, POST %s/retrain."
         % ((PREFIX,) * 4),
    405: "Check the method: analyze, feedback and retrain take POST; stats takes GET.",
}


class Service:
    """Everything a request needs, built once per app."""

    def __init__(self, config: ServiceConfig) -> None:
        self.config = config
        self.store = Store(config.data_dir, config.database_url)
        self.models = ModelHolder(StoredModels(self.store, config.data_dir))
        self.retrainer = Retrainer(self.store, self.models, config.min_feedback_per_label)
        self.provenance = provenance.ProvenanceReader(
            provenance.TrustList.from_file(config.c2pa_trust_anchors))

    def decode_upload(self) -> tuple[imaging.DecodedImage, bytes]:
        data = uploads.image_bytes(request, self.config.max_upload)
        return imaging.decode(data, self.config.max_pixels), data

    def record_for(self, decoded: imaging.DecodedImage, vectors: Any) -> ImageRecord:
        return ImageRecord(decoded.sha256, decoded.width, decoded.height, decoded.format,
                           decoded.bytes, vectors, near_duplicate.hash_image(decoded.image))


def create_app(config: ServiceConfig) -> Flask:
    """The service's Flask app. It changes nothing process-wide (Pillow's own pixel limit is
    set by ``api_server.py``, which owns its process; every upload's pixel count is checked
    here against ``config.max_pixels`` before it is decoded)."""
    app = Flask("deepfake")
    # exceptions go to our JSON 500 handler even in debug mode; tracebacks go to the log only
    app.config.update(MAX_CONTENT_LENGTH=config.max_upload + 2**20, PROPAGATE_EXCEPTIONS=False,
                      TRAP_HTTP_EXCEPTIONS=False, JSON_SORT_KEYS=False)
    app.json.compact = True  # one shape in every mode (Flask pretty-prints in debug mode)
    app.wsgi_app = DebuggerGuard(app.wsgi_app)  # type: ignore[method-assign]
    service = Service(config)
    app.extensions["deepfake"] = service
    _register_errors(app, config)

    @app.post(PREFIX + "/analyze")
    def analyze() -> Any:
        started = time.perf_counter()
        decoded, data = service.decode_upload()
        # one read: a retrain (here or on another worker) cannot change it midway
        model = service.models.current().model
        findings = service.provenance.read(data, decoded.image, decoded.format)
        try:
            result = detector.analyse(decoded, model, findings,
                                      service.provenance.trust.description)
        except (ValueError, OSError) as exc:
            raise ApiError(415, "Unsupported image", "The image's pixel format could not be "
                           "read (%s)." % type(exc).__name__,
                           "Save it as an 8-bit RGB or grayscale JPEG or PNG and retry.")
        analysis_id = uuid.uuid4().hex
        record = service.record_for(decoded, result.vectors)
        image_path = (service.store.keep_image(record, data)
                      if uploads.wants_image_kept(request, config.store_images) else None)
        service.store.add_analysis(analysis_id, record, result.probability, result.verdict,
                                   model.version if model else None, image_path)
        body = {"analysis_id": analysis_id,
                "model_version": model.version if model else None,
                "image": {"width": decoded.width, "height": decoded.height,
                          "format": decoded.format, "bytes": decoded.bytes}}
        body.update(detector.as_payload(result))
        body["image_stored"] = image_path is not None
        body["elapsed_ms"] = round((time.perf_counter() - started) * 1000, 1)
        return jsonify(body)

    @app.post(PREFIX + "/feedback")
    def feedback() -> Any:
        label = (uploads.field(request, "label") or "").strip().lower()
        if label not in LABELS:
            raise ApiError(400, "Invalid label",
                           "The label must be 'real' or 'fake', got %r." % label if label else
                           "The label is missing; it must be 'real' or 'fake'.",
                           "Send label=real or label=fake with an analysis_id or a file.")
        analysis_id = (uploads.field(request, "analysis_id") or "").strip() or None
        image_path = None
        if uploads.has_image(request):
            decoded, data = service.decode_upload()
            record = service.record_for(decoded, features.extract(decoded.image).vectors)
            if uploads.wants_image_kept(request, config.store_images):
                image_path = service.store.keep_image(record, data)
        elif analysis_id is not None:
            found = service.store.get_analysis(analysis_id)
            if found is None:
                raise ApiError(404, "Unknown analysis",
                               "No analysis with id %r is stored." % analysis_id[:64],
                               "Use the analysis_id returned by POST %s/analyze, or send the "
                               "image again with the label." % PREFIX)
            record, image_path = found
        else:
            raise ApiError(400, "Nothing to label",
                           "Send either the analysis_id of an earlier analysis or the image.",
                           "POST JSON {\"analysis_id\": ..., \"label\": \"fake\"} or a "
                           "multipart form with 'file' and 'label'.")
        if len(record.vectors) == 0:
            raise ApiError(422, "Image too small to learn from",
                           "The image has no %d x %d region with detail, so it cannot be a "
                           "training sample." % (features.CROP, features.CROP),
                           "Label a larger image.")
        result = service.store.add_sample(record, label, analysis_id, image_path)
        counts = service.store.counts()
        return jsonify({"sample_id": result.sample_id, "analysis_id": analysis_id,
                        "label": label, "duplicate": result.duplicate,
                        "training_samples": sum(counts.values()),
                        "samples_per_label": counts,
                        # the model the next retrain must beat, now that this label is in
                        "model_version": service.models.current().version}), 201

    @app.get(PREFIX + "/stats")
    def stats() -> Any:
        counts = service.store.counts()
        active = service.models.current()
        model = active.model
        times = [t for t in (service.store.last_sample_time(),
                             model.trained_at if model else None) if t]
        return jsonify({
            "training_samples": sum(counts.values()),
            "model_loaded": model is not None,
            "last_updated": max(times, key=_iso_key) if times else None,
            "samples_per_label": counts,
            "model": None if model is None else {
                "version": model.version, "feature_version": model.feature_version,
                "trained_at": model.trained_at, "source": active.source,
                "metrics": model.metrics},
            "capabilities": detector.CAPABILITIES,
            "retrain": dict(service.retrainer.status(),
                            min_feedback_per_label=config.min_feedback_per_label),
            "limits": {"max_upload_bytes": config.max_upload, "max_pixels": config.max_pixels,
                       "formats": list(imaging.SUPPORTED_FORMATS)},
        })

    @app.post(PREFIX + "/retrain")
    def retrain() -> Any:
        return jsonify(service.retrainer.run())

    return app


def _iso_key(timestamp: str) -> str:
    # "...:05Z" and "...:05.120Z" must compare by time, not by the character after the seconds
    return timestamp if "." in timestamp else timestamp[:-1] + ".000Z"


def _register_errors(app: Flask, config: ServiceConfig) -> None:
    @app.errorhandler(ApiError)
    def api_error(exc: ApiError) -> Any:
        return jsonify(exc.payload()), exc.status

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException) -> Any:
        if isinstance(exc, RequestEntityTooLarge):
            return api_error(uploads.too_large(config.max_upload))
        status = exc.code or 500
        name = (exc.name or "HTTP error").capitalize()  # "Not found", as the gateway writes it
        suggestion = _HTTP_SUGGESTIONS.get(status, "Check the request and try again.")
        message = exc.description or name
        if status == 404:  # the gateway's words for the same thing
            message = "The service has no route for %s." % request.path[:200]
        elif status == 405:
            message = "%s is not allowed on %s." % (request.method, request.path[:200])
        response = jsonify(error_payload(name, message, suggestion))
        response.status_code = status
        if status == 405 and exc.valid_methods:  # type: ignore[attr-defined]
            response.headers["Allow"] = ", ".join(exc.valid_methods)  # type: ignore
        return response

    @app.errorhandler(Exception)
    def unexpected(exc: Exception) -> Any:
        log.exception("unhandled error in %s %s", request.method, request.path)
        return jsonify(error_payload(
            "Internal error", "The service hit an unexpected error (%s); details are in its "
            "log." % type(exc).__name__,
            "Retry; if it keeps failing, report it with the service log.")), 500
