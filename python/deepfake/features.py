"""Spectral features of an image: fixed-size luma crops, log-magnitude DCT, band averages.

Image generators up-sample (nearest, bilinear, transposed convolution). Up-sampling leaves
periodic traces that are plain in the frequency domain: the highest frequencies are suppressed
by the interpolation kernel's zeros, or spectral replicas of the low band appear there
(Durall et al. 2019/2020; Frank et al., ICML 2020). This module turns an image into per-crop
feature vectors that describe exactly that part of the spectrum.

Rules that keep the traces intact:
- crops are cut at fixed positions on a grid aligned to multiples of 8 pixels and are never
  resized: any resampling creates or destroys the very traces we look for;
- grayscale luma (ITU-R BT.601 weights) in floating point, so colour conversion adds no
  rounding of its own;
- each crop's log spectrum has its mean removed, so brightness and contrast do not matter.

``FEATURE_VERSION`` names this exact recipe; a model trained on another version is refused.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

FEATURE_VERSION = "dct64-radial32-grid8-v1"
CROP = 64  # pixels; 64 keeps enough crops in small images and still resolves factor-2 traces
RADIAL_BINS = 32
GRID = 8  # the 64x64 spectrum averaged in 8x8 blocks of 8x8 coefficients
N_FEATURES = RADIAL_BINS + GRID * GRID
MAX_CROPS = 64  # enough for a stable mean score; bounds the cost for 12-MP photos
MAX_CANDIDATES = 256  # positions inspected for texture before choosing MAX_CROPS of them
FLAT_STD = 2.0  # grey levels; a flatter crop has no spectrum worth reading, only noise
_EPS = 1e-2  # below 8-bit quantisation noise (~0.29 per orthonormal coefficient)

_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


def _dct_matrix(n: int) -> np.ndarray:
    """Orthonormal DCT-II matrix: ``D @ x @ D.T`` equals ``scipy.fft.dctn(x, norm="ortho")``.

    A 64x64 matrix product is as fast as an FFT at this size and keeps scipy (~0.2 s to
    import) out of the service's start-up.
    """
    k = np.arange(n)[:, None]
    i = np.arange(n)[None, :]
    matrix = np.cos(np.pi * (2 * i + 1) * k / (2 * n)) * np.sqrt(2.0 / n)
    matrix[0] /= np.sqrt(2.0)
    return matrix


_DCT = _dct_matrix(CROP)


def _radial_index() -> np.ndarray:
    """Bin index per DCT coefficient: radius sqrt(u^2+v^2), scaled so the corner is 1."""
    u = np.arange(CROP, dtype=np.float64)
    radius = np.hypot(u[:, None], u[None, :]) / (np.sqrt(2.0) * (CROP - 1))
    return np.minimum((radius * RADIAL_BINS).astype(np.int64), RADIAL_BINS - 1)


_RADIAL = _radial_index()
_RADIAL_COUNTS = np.bincount(_RADIAL.ravel(), minlength=RADIAL_BINS).astype(np.float64)
# centre of each radial bin, 0..1 (1 = the corner of the spectrum, both axes at Nyquist)
RADIAL_FREQUENCIES = (np.arange(RADIAL_BINS) + 0.5) / RADIAL_BINS


@dataclass(frozen=True)
class CropFeatures:
    """Per-crop features of one image, plus what the report needs about them."""

    vectors: np.ndarray  # (n_crops, N_FEATURES) float32
    radial_mean: np.ndarray  # (RADIAL_BINS,) mean log-magnitude profile, for display
    candidates: int  # grid positions that fit in the image
    flat_skipped: int  # candidates rejected as too flat to read
    # scope checks (not model features): share of the candidates' 8x8 blocks that are one
    # exact value, how many distinct values those blocks have, and the median correlation of
    # horizontally neighbouring pixels in the textured crops (photos ~0.6-1, white noise ~0)
    constant_blocks: float = 0.0
    constant_values: int = 0
    neighbour_correlation: float = 1.0

    @property
    def count(self) -> int:
        return int(self.vectors.shape[0])


def pixel_array(image: Image.Image) -> np.ndarray:
    """The image as an (H, W) or (H, W, 3) array, without copying more than needed.

    Modes with more than 8 bits (I;16, I, F) are scaled to 0..255 floats so a 16-bit PNG is read
    at its real precision instead of being clipped.
    """
    mode = image.mode
    if mode in ("L", "RGB"):
        return np.asarray(image)
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(image.convert("F") if mode != "F" else image, dtype=np.float32)
        # 16-bit has a known full scale; 32-bit int/float crops are scaled by their own peak,
        # which the mean-removed log spectrum does not notice
        top = 65535.0 if mode.startswith("I;16") else max(float(np.nanmax(np.abs(arr))), 1.0)
        return np.nan_to_num(arr, nan=0.0, posinf=top, neginf=0.0) * (255.0 / top)
    if mode in ("1", "LA", "La"):
        return np.asarray(image.convert("L"))
    return np.asarray(image.convert("RGB"))


def _luma(block: np.ndarray) -> np.ndarray:
    """BT.601 luma in float32 of a :func:`pixel_array` block (grey blocks as they are).

    Kept instead of Pillow's ``convert("F")``, which is the same rule but not the same float:
    Pillow sums ``299 R + 587 G + 114 B`` in integers and divides by 1000 in float32, this
    takes a float32 dot product with the float32 weights. Measured over all 2^24 RGB colours:
    25.4% of them differ, by 1 unit in the last place (2 at most), at most 1.53e-5 grey
    levels; P, RGBA and CMYK go through RGB in both, with the same differences; L is
    identical. The crop features computed with Pillow's values move by up to ~1.4e-5, and
    the stored baseline features (``FEATURE_VERSION``) were computed with these: switching
    would need a new feature version and a rebuilt baseline for no gain in what is measured.
    ``tests/service/test_service_features.py`` keeps these figures honest.
    """
    if block.ndim == 3:
        return block.astype(np.float32) @ _LUMA
    return block.astype(np.float32)


def _grid_positions(height: int, width: int) -> list[tuple[int, int]]:
    """Top-left corners on a grid of CROP-sized tiles (all multiples of 8), evenly thinned."""
    rows, cols = height // CROP, width // CROP
    total = rows * cols
    if total == 0:
        return []
    flat = np.arange(total) if total <= MAX_CANDIDATES else np.unique(
        np.linspace(0, total - 1, MAX_CANDIDATES).round().astype(np.int64))
    # centre the grid so borders (often vignetted or padded) are used least
    top, left = ((height - rows * CROP) // 2) // 8 * 8, ((width - cols * CROP) // 2) // 8 * 8
    return [(top + (i // cols) * CROP, left + (i % cols) * CROP) for i in flat]


def log_spectrum(crop: np.ndarray) -> np.ndarray:
    """Log-magnitude of the orthonormal 2-D DCT-II of one luma crop, its mean removed."""
    centred = crop - crop.mean()
    coeffs = _DCT @ centred @ _DCT.T
    spectrum = np.log(np.abs(coeffs) + _EPS)
    return spectrum - spectrum.mean()


def spectrum_features(spectrum: np.ndarray) -> np.ndarray:
    """Radial profile (RADIAL_BINS) followed by GRID x GRID block means of one log spectrum."""
    radial = np.bincount(_RADIAL.ravel(), weights=spectrum.ravel(), minlength=RADIAL_BINS)
    radial = radial / _RADIAL_COUNTS
    step = CROP // GRID
    blocks = spectrum.reshape(GRID, step, GRID, step).mean(axis=(1, 3)).ravel()
    return np.concatenate([radial, blocks])


def extract(image: Image.Image, max_crops: int = MAX_CROPS) -> CropFeatures:
    """Per-crop features of a decoded image (any Pillow mode); no resizing anywhere.

    Crops are cut from the Pillow image one by one, so a 12-MP photo is never copied whole
    into numpy: memory stays at the decoded image plus a few small tiles.
    """
    width, height = image.size
    positions = _grid_positions(height, width)
    textured = []
    constant, blocks, values, correlations = 0, 0, set(), []
    for top, left in positions:
        tile = image.crop((left, top, left + CROP, top + CROP))
        crop = _luma(pixel_array(tile))
        cells = crop.reshape(CROP // 8, 8, CROP // 8, 8)
        lows, highs = cells.min(axis=(1, 3)), cells.max(axis=(1, 3))
        same = lows == highs
        constant += int(same.sum())
        blocks += same.size
        if len(values) <= 256:
            values.update(np.round(lows[same], 1).tolist())
        if float(crop.std()) >= FLAT_STD:
            textured.append(crop)
            centred = crop - crop.mean()
            correlations.append(float(np.mean(centred[:, 1:] * centred[:, :-1])
                                      / max(float(np.mean(centred * centred)), 1e-9)))
    if len(textured) > max_crops:
        keep = np.unique(np.linspace(0, len(textured) - 1, max_crops).round().astype(np.int64))
        textured = [textured[i] for i in keep]
    vectors = np.empty((len(textured), N_FEATURES), dtype=np.float32)
    radial_sum = np.zeros(RADIAL_BINS)
    for i, crop in enumerate(textured):
        vectors[i] = spectrum_features(log_spectrum(crop.astype(np.float64)))
        radial_sum += vectors[i, :RADIAL_BINS]
    radial_mean = radial_sum / max(len(textured), 1)
    return CropFeatures(vectors, radial_mean, len(positions), len(positions) - len(textured),
                        constant / blocks if blocks else 0.0, len(values),
                        float(np.median(correlations)) if correlations else 1.0)
