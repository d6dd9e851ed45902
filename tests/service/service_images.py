"""Test images and paths for the service's tests (a module of its own, not conftest: several
conftest modules share that name, so importing from "conftest" depends on collection order)."""
from __future__ import annotations

import io
import os
import sys
from typing import Any

import numpy as np
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PYTHON_DIR = os.path.join(REPO, "python")  # the service's scripts (the package is installed)

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
