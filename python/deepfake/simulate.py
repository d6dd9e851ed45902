"""Simulated generator up-sampling and the augmentations shared by both classes.

Used only to build the baseline training set (``python/build_baseline.py``). A "generated"
image is a real photo halved in size and brought back up the way generator decoders do it
(AutoGAN, Zhang et al. 2019): nearest neighbour, bilinear, or zero insertion followed by a
learned-looking transposed-convolution kernel. Blur and JPEG are applied to real and generated
images alike, so the model cannot learn "blurry" or "compressed" as a shortcut for "generated".
Everything is driven by an explicit ``numpy.random.Generator``: the same seed gives the same
images, byte for byte, for the same Pillow build.
"""
from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageFilter
from scipy.ndimage import convolve1d

UPSAMPLERS = ("nearest", "bilinear", "transposed_conv")


def _as_float(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.float64)


def _to_image(array: np.ndarray, mode: str) -> Image.Image:
    return Image.fromarray(np.clip(np.rint(array), 0, 255).astype(np.uint8), mode)


def _upsample_axis(array: np.ndarray, kernel: np.ndarray, axis: int) -> np.ndarray:
    """Zero insertion along one axis, then a 1-D kernel: a stride-2 transposed convolution."""
    shape = list(array.shape)
    shape[axis] *= 2
    stuffed = np.zeros(shape)
    index = [slice(None)] * array.ndim
    index[axis] = slice(0, None, 2)
    stuffed[tuple(index)] = array
    # mode="wrap" keeps the output the same size and introduces no border of its own
    return convolve1d(stuffed, kernel, axis=axis, mode="wrap")


def upsample(image: Image.Image, method: str, rng: np.random.Generator) -> Image.Image:
    """Halve ``image`` (box average, like a downsampling encoder) and up-sample it by 2."""
    small = image.reduce(2)
    data = _as_float(small)
    if method == "nearest":
        out = np.repeat(np.repeat(data, 2, axis=0), 2, axis=1)
    else:
        if method == "bilinear":
            kernel = np.array([0.5, 1.0, 0.5])
        elif method == "transposed_conv":
            # a 4-tap kernel whose two phases each sum to ~1: smooth on average, but the small
            # imbalance leaves the checkerboard that trained generators show
            a, b = rng.uniform(0.1, 0.4), rng.uniform(0.1, 0.4)
            kernel = np.array([a, b, 1.0 - a, 1.0 - b]) * rng.uniform(0.95, 1.05, size=4)
        else:
            raise ValueError("unknown up-sampling method: %r" % method)
        out = _upsample_axis(_upsample_axis(data, kernel, 0), kernel, 1)
    return _to_image(out, small.mode)


def downscale(image: Image.Image, factor: float) -> Image.Image:
    """A real photo made smaller with an anti-aliasing filter, as websites do: still real."""
    size = (max(1, round(image.width / factor)), max(1, round(image.height / factor)))
    return image.resize(size, Image.Resampling.LANCZOS)


def augment(image: Image.Image, rng: np.random.Generator) -> tuple[Image.Image, str]:
    """One of: untouched, Gaussian blur, JPEG, blur then JPEG. Returns the image and its name."""
    choice = int(rng.integers(0, 4))
    name = "none"
    if choice in (1, 3):
        sigma = float(rng.uniform(0.4, 1.2))
        image = image.filter(ImageFilter.GaussianBlur(sigma))
        name = "blur%.2f" % sigma
    if choice in (2, 3):
        quality = int(rng.integers(60, 96))
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=quality)
        image = Image.open(io.BytesIO(buffer.getvalue()))
        image.load()
        name = ("%s+" % name if name != "none" else "") + "jpeg%d" % quality
    return image, name


def defocus(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """A real photo out of focus (Gaussian blur, sigma 1.5-2.5): still real. Blur removes high
    frequencies smoothly, with no periodic trace; the model must not take it for up-sampling."""
    return image.filter(ImageFilter.GaussianBlur(float(rng.uniform(1.5, 2.5))))


RESAMPLERS = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC,
              "lanczos": Image.Resampling.LANCZOS}


def enlarge(image: Image.Image, factor: float, method: str) -> Image.Image:
    """Shrunk by ``factor`` (box average) and enlarged back by it with an ordinary resampling
    kernel: what enlarging a smaller image, by a non-integer factor too, leaves."""
    size = image.size
    small = image.resize((max(1, round(size[0] / factor)), max(1, round(size[1] / factor))),
                         Image.Resampling.BOX)
    return small.resize(size, RESAMPLERS[method])
