"""Fixtures for the deepfake service's tests: a temporary data dir, the app, test images.

The service lives in ``python/`` (not an installed package), so it is put on ``sys.path`` here,
the same way ``python/api_server.py`` does it for itself.
"""
from __future__ import annotations

import io
import os
import sys
from dataclasses import replace
from typing import Any, Callable

import numpy as np
import pytest
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PYTHON_DIR = os.path.join(REPO, "python")
if PYTHON_DIR not in sys.path:
    sys.path.insert(0, PYTHON_DIR)

from deepfake.app import create_app  # noqa: E402
from deepfake.config import ServiceConfig  # noqa: E402


def pink_noise(size: int | tuple[int, int], seed: int, rgb: bool = False) -> Image.Image:
    """A 1/f-noise texture: the spectrum of natural photos, with no up-sampling in it."""
    height, width = (size, size) if isinstance(size, int) else size
    rng = np.random.default_rng(seed)
    fy, fx = np.meshgrid(np.fft.fftfreq(height), np.fft.fftfreq(width), indexing="ij")
    amplitude = 1.0 / np.maximum(np.hypot(fx, fy), 1.0 / max(height, width))
    channels = []
    for _ in range(3 if rgb else 1):
        noise = np.real(np.fft.ifft2(np.fft.fft2(rng.normal(size=(height, width))) * amplitude))
        channels.append((noise - noise.mean()) / noise.std() * 40 + 128)
    array = np.stack(channels, axis=-1) if rgb else channels[0]
    return Image.fromarray(np.clip(array, 0, 255).astype(np.uint8))


def nearest_upsampled(image: Image.Image) -> Image.Image:
    """The image halved and enlarged by 2 with nearest neighbour: a generator's trace."""
    small = np.asarray(image.reduce(2))
    return Image.fromarray(np.repeat(np.repeat(small, 2, axis=0), 2, axis=1))


def encode(image: Image.Image, fmt: str = "PNG", **options: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


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
