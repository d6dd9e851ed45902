"""Fixtures for the deepfake service's tests: a temporary data dir, the app, test images.

The service is its own distribution (``python/pyproject.toml``), installed beside the gateway
(``pip install -e ./python``): ``deepfake`` is imported as any installed package.
"""
from __future__ import annotations

import os
import sys
from dataclasses import replace
from typing import Any, Callable

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from service_images import encode, nearest_upsampled, pink_noise  # noqa: E402

from deepfake.app import create_app  # noqa: E402
from deepfake.config import ServiceConfig  # noqa: E402


@pytest.fixture
def make_app(tmp_path: Any) -> Callable[..., Any]:
    """Build an app on a fresh data directory; keyword arguments override the config."""
    def build(**overrides: Any) -> Any:
        config = replace(ServiceConfig(data_dir=str(tmp_path / "data")),
                         min_feedback_per_label=2, **overrides)
        app = create_app(config)
        app.config["TESTING"] = True
        app.config["PROPAGATE_EXCEPTIONS"] = False  # TESTING would re-raise; we test the 500
        return app
    return build


@pytest.fixture
def app(make_app: Callable[..., Any]) -> Any:
    return make_app()


@pytest.fixture
def client(app: Any) -> Any:
    return app.test_client()


@pytest.fixture(scope="session")
def real_png() -> bytes:
    return encode(pink_noise(512, seed=11))


@pytest.fixture(scope="session")
def fake_png() -> bytes:
    return encode(nearest_upsampled(pink_noise(512, seed=12)))
