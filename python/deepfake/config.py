"""The service's settings: defaults, environment variables and CLI overrides in one place.

A bad environment value never stops the service: it is logged with the default used instead.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Mapping, Optional

log = logging.getLogger("deepfake.config")

DEVELOPMENT = "development"
PRODUCTION = "production"
DEFAULT_DATA_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "data")


@dataclass(frozen=True)
class ServiceConfig:
    data_dir: str = DEFAULT_DATA_DIR
    env: str = DEVELOPMENT
    max_upload: int = 50 * 1024 * 1024  # bytes of one image
    max_pixels: int = 50_000_000  # width x height; above this the upload is a likely bomb
    store_images: bool = False  # keep uploaded images on disk (otherwise features only)
    min_feedback_per_label: int = 5  # before a retrain may use feedback
    waitress_threads: int = 4
    c2pa_trust_anchors: Optional[str] = None  # PEM bundle C2PA signers are checked against
    # where analyses, feedback and model versions live: None = the SQLite file in data_dir;
    # postgresql://... = a database every worker of every replica shares
    database_url: Optional[str] = None


def _int(environ: Mapping[str, str], name: str, default: int, minimum: int = 1) -> int:
    raw = environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = int(raw)
        if value < minimum:
            raise ValueError
        return value
    except ValueError:
        log.warning("%s=%r is not an integer >= %d; using %d", name, raw, minimum, default)
        return default


#: What means production, as the gateway reads it (``tornado_gateway.config``); a test keeps
#: the two readings equal.
PRODUCTION_WORDS = ("production", "prod")


def mode_from(environ: Mapping[str, str]) -> str:
    """``GATEWAY_ENV``, then ``NODE_ENV``: production only if it says so, else development."""
    raw = environ.get("GATEWAY_ENV") or environ.get("NODE_ENV") or DEVELOPMENT
    return PRODUCTION if raw.strip().lower() in PRODUCTION_WORDS else DEVELOPMENT


def load_config(environ: Optional[Mapping[str, str]] = None, data_dir: Optional[str] = None,
                env: Optional[str] = None) -> ServiceConfig:
    environ = os.environ if environ is None else environ
    return ServiceConfig(
        data_dir=os.path.abspath(data_dir or environ.get("DEEPFAKE_DATA_DIR") or DEFAULT_DATA_DIR),
        env=env or mode_from(environ),
        max_upload=_int(environ, "DEEPFAKE_MAX_UPLOAD", ServiceConfig.max_upload),
        max_pixels=_int(environ, "DEEPFAKE_MAX_PIXELS", ServiceConfig.max_pixels),
        store_images=environ.get("DEEPFAKE_STORE_IMAGES", "").strip().lower()
        in ("1", "true", "yes", "on"),
        min_feedback_per_label=_int(environ, "DEEPFAKE_MIN_FEEDBACK_PER_LABEL",
                                    ServiceConfig.min_feedback_per_label, minimum=0),
        waitress_threads=_int(environ, "DEEPFAKE_THREADS", ServiceConfig.waitress_threads),
        c2pa_trust_anchors=(environ.get("DEEPFAKE_C2PA_TRUST_ANCHORS") or "").strip() or None,
        database_url=(environ.get("DEEPFAKE_DATABASE_URL") or "").strip() or None,
    )
