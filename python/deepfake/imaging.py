"""Image intake: bytes in, a decoded Pillow image out, or an :class:`ApiError` saying why not.

Owns the upload rules: accepted formats, the byte limit's companion the pixel limit
(decompression bombs), and telling "not an image", "unsupported format" and "corrupt data"
apart. Decoding never resizes: ``Image.draft`` (JPEG DCT scaling) is never used because any
rescaling changes the spectrum the detector reads.
"""
from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass
from typing import Optional

import numpy as np
from PIL import Image, UnidentifiedImageError

from .errors import ApiError

SUPPORTED_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "TIFF", "GIF")

# IJG standard luminance table (ITU T.81 Annex K): the reference for estimating JPEG quality
_IJG_LUMA = np.array([
    16, 11, 10, 16, 24, 40, 51, 61, 12, 12, 14, 19, 26, 58, 60, 55,
    14, 13, 16, 24, 40, 57, 69, 56, 14, 17, 22, 29, 51, 87, 80, 62,
    18, 22, 37, 56, 68, 109, 103, 77, 24, 35, 55, 64, 81, 104, 113, 92,
    49, 64, 78, 87, 103, 121, 120, 101, 72, 92, 95, 98, 112, 100, 103, 99], dtype=np.float64)


@dataclass(frozen=True)
class DecodedImage:
    image: Image.Image
    format: str
    width: int
    height: int
    bytes: int
    sha256: str
    jpeg_quality: Optional[int]  # estimated from the luma quantisation table
    frames: int


def set_pixel_limit(max_pixels: int) -> None:
    """Make Pillow refuse bombs early (process-wide: called by ``api_server.py``, never by
    ``create_app``); :func:`decode` checks every image against its own limit anyway.

    Pillow raises ``DecompressionBombError`` above twice ``MAX_IMAGE_PIXELS`` and merely warns
    between once and twice; ``decode`` refuses anything above ``max_pixels`` itself, so the
    warning is silenced (``catch_warnings`` would not be thread-safe per request).
    """
    Image.MAX_IMAGE_PIXELS = max_pixels
    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


def estimate_jpeg_quality(image: Image.Image) -> Optional[int]:
    """The IJG quality (1..100) whose scaling best matches the file's luma table."""
    tables = getattr(image, "quantization", None)
    if not tables or 0 not in tables:
        return None
    table = np.asarray(tables[0], dtype=np.float64)
    if table.size != 64:
        return None
    scale = float(np.mean(table / _IJG_LUMA)) * 100.0
    quality = (200.0 - scale) / 2.0 if scale <= 100.0 else 5000.0 / scale
    return int(min(100, max(1, round(quality))))


def decode(data: bytes, max_pixels: int) -> DecodedImage:
    """Decode ``data`` fully (first frame), enforcing format and pixel limits."""
    if not data:
        raise ApiError(400, "Empty file", "The uploaded file is empty (0 bytes).",
                       "Choose an image file and upload it again.")
    try:
        image = Image.open(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise _too_many_pixels(None, max_pixels)
    except UnidentifiedImageError:
        raise ApiError(415, "Not an image",
                       "The uploaded data is not an image format this service can recognise.",
                       "Upload a photo as %s." % ", ".join(SUPPORTED_FORMATS))
    except Exception as exc:  # Pillow raises many types for truncated headers
        raise _corrupt(exc)
    fmt = (image.format or "").upper()
    if fmt == "MPO":  # multi-picture JPEG from cameras: the first picture is a plain JPEG
        fmt = "JPEG"
    if fmt not in SUPPORTED_FORMATS:
        raise ApiError(415, "Unsupported format",
                       "%s images are not supported." % (image.format or "This kind of"),
                       "Convert the image to one of %s and upload it again."
                       % ", ".join(SUPPORTED_FORMATS))
    width, height = image.size
    if width <= 0 or height <= 0:
        raise _corrupt(ValueError("zero-sized image"))
    if width * height > max_pixels:
        raise _too_many_pixels(image.size, max_pixels)
    frames = count_frames(image)
    try:
        image.seek(0)
        image.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise _too_many_pixels(image.size, max_pixels)
    except Exception as exc:
        raise _corrupt(exc)
    return DecodedImage(image, fmt, width, height, len(data), hashlib.sha256(data).hexdigest(),
                        estimate_jpeg_quality(image) if fmt == "JPEG" else None, frames)


#: Frames counted at most: only the first frame is examined, the count is for a note. Pillow's
#: ``n_frames`` walks the whole file for GIF and TIFF, and a 50 MB GIF of two million
#: one-pixel frames took ~12 s of CPU just to be counted (a frame bomb).
MAX_COUNTED_FRAMES = 1000


def count_frames(image: Image.Image, limit: int = MAX_COUNTED_FRAMES) -> int:
    """The number of frames in the file, counting at most ``limit`` (a result of ``limit``
    means "that many or more"). Leaves the image on an unspecified frame: seek(0) after."""
    if not getattr(image, "is_animated", False):
        return 1
    if (image.format or "").upper() not in ("GIF", "TIFF"):
        return min(int(getattr(image, "n_frames", 1) or 1), limit)  # read from a header
    count = 1
    try:
        while count < limit:
            # GIF's _seek(n, False) only parses frame n (what n_frames does for each frame);
            # the public seek() would decode every frame before it. The service's one private
            # Pillow API: tests/service/test_service_fuzz.py fails the day Pillow changes it.
            if (image.format or "").upper() == "GIF":
                image._seek(count, False)  # type: ignore[attr-defined]
            else:
                image.seek(count)  # TIFF: reads the next directory only
            count += 1
    except EOFError:
        pass
    return count


def _corrupt(exc: Exception) -> ApiError:
    return ApiError(400, "Corrupt image",
                    "The image could not be decoded; the file looks damaged or truncated (%s)."
                    % type(exc).__name__,
                    "Re-export or re-download the image and upload it again.")


def _too_many_pixels(size: Optional[tuple[int, int]], max_pixels: int) -> ApiError:
    what = ("%d x %d pixels" % size) if size else "more pixels than allowed"
    return ApiError(413, "Image too large",
                    "The image has %s; the limit is %.1f megapixels." % (what, max_pixels / 1e6),
                    "Downscale the image below the limit (note: resizing can hide or create "
                    "the traces this detector looks for) or raise DEEPFAKE_MAX_PIXELS.")
