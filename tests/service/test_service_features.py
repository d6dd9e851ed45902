"""Spectral features on inputs whose spectra are known in closed form."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from service_images import nearest_upsampled, pink_noise
from deepfake import features

N = features.CROP


def dct_basis(u: int, v: int) -> np.ndarray:
    """The 2-D DCT-II basis image (u along rows, v along columns): its DCT is one spike."""
    n = np.arange(N)
    rows = np.cos(np.pi * (2 * n + 1) * u / (2 * N))
    cols = np.cos(np.pi * (2 * n + 1) * v / (2 * N))
    return 128 + 50 * np.outer(rows, cols)


@pytest.mark.parametrize("u,v", [(0, 5), (7, 0), (13, 29), (63, 63), (32, 1)])
def test_a_dct_basis_image_has_its_peak_at_that_coefficient(u: int, v: int) -> None:
    spectrum = features.log_spectrum(dct_basis(u, v))
    assert np.unravel_index(np.argmax(spectrum), spectrum.shape) == (u, v)
    # everything else sits at the floor: the spike is ~ log(50*N/2 / eps) above it
    others = np.delete(spectrum.ravel(), u * N + v)
    assert spectrum[u, v] - others.max() > 8


def test_log_spectrum_ignores_brightness_and_contrast() -> None:
    crop = np.asarray(pink_noise(N, seed=1), dtype=np.float64)
    a = features.log_spectrum(crop)
    b = features.log_spectrum(3.0 * crop + 40.0)
    # only the epsilon floor breaks exact invariance
    assert np.median(np.abs(a - b)) < 0.05


def test_radial_profile_of_a_flat_spectrum_is_flat() -> None:
    vector = features.spectrum_features(np.zeros((N, N)))
    assert vector.shape == (features.N_FEATURES,)
    assert np.allclose(vector, 0.0)


def test_radial_bins_cover_the_spectrum_from_dc_to_corner() -> None:
    spectrum = np.zeros((N, N))
    spectrum[0, 0] = 1.0  # DC lands in the first radial bin and the first block
    spectrum[N - 1, N - 1] = 1.0  # the corner lands in the last radial bin and last block
    vector = features.spectrum_features(spectrum)
    radial, blocks = vector[:features.RADIAL_BINS], vector[features.RADIAL_BINS:]
    assert radial[0] > 0 and radial[-1] > 0 and np.count_nonzero(radial) == 2
    assert blocks[0] > 0 and blocks[-1] > 0 and np.count_nonzero(blocks) == 2
    assert features.RADIAL_FREQUENCIES[0] > 0 and features.RADIAL_FREQUENCIES[-1] < 1


def test_nearest_upsampling_suppresses_the_highest_frequencies() -> None:
    """Known spectrum: x[2n] = x[2n+1] multiplies the DCT by cos(pi k / 2N) -> 0 at k = N."""
    rng = np.random.default_rng(0)
    white = rng.normal(128, 30, size=(N, N))
    doubled = np.repeat(np.repeat(white[: N // 2, : N // 2], 2, 0), 2, 1)
    top = slice(N - 8, N)
    white_high = features.log_spectrum(white)[top, top].mean()
    doubled_high = features.log_spectrum(doubled)[top, top].mean()
    assert white_high - doubled_high > 3  # more than e^3 = 20x weaker near Nyquist


def test_crops_are_cut_on_an_8_aligned_grid_without_resizing() -> None:
    image = pink_noise((200, 330), seed=2)
    positions = features._grid_positions(200, 330)
    assert len(positions) == (200 // N) * (330 // N)
    assert all(top % 8 == 0 and left % 8 == 0 for top, left in positions)
    got = features.extract(image)
    top, left = positions[0]
    crop = np.asarray(image, dtype=np.float64)[top:top + N, left:left + N]
    expected = features.spectrum_features(features.log_spectrum(crop))
    assert np.allclose(got.vectors[0], expected, atol=1e-5)


def test_small_flat_and_large_images() -> None:
    assert features.extract(Image.new("L", (63, 400))).count == 0
    flat = features.extract(Image.new("L", (256, 256), 90))
    assert flat.count == 0 and flat.candidates == 16 and flat.flat_skipped == 16
    big = features.extract(pink_noise((1200, 1600), seed=3))
    assert big.count == features.MAX_CROPS
    assert big.radial_mean.shape == (features.RADIAL_BINS,)


def test_grey_rgb_gives_the_same_features_as_grayscale() -> None:
    grey = pink_noise(128, seed=4)
    rgb = Image.merge("RGB", (grey, grey, grey))
    assert np.allclose(features.extract(grey).vectors, features.extract(rgb).vectors, atol=1e-3)


def test_sixteen_bit_and_palette_images_are_read() -> None:
    grey = np.asarray(pink_noise(128, seed=5), dtype=np.uint16) * 257
    sixteen = Image.fromarray(grey.astype(np.uint16))
    assert features.extract(sixteen).count == 4
    palette = pink_noise(128, seed=5, rgb=True).convert("P")
    assert features.extract(palette).count == 4


def test_upsampled_texture_differs_from_the_original_where_expected() -> None:
    original = features.extract(pink_noise(512, seed=6))
    upsampled = features.extract(nearest_upsampled(pink_noise(512, seed=6)))
    # the last radial bins (near the corner of the spectrum) lose energy after up-sampling
    last = slice(features.RADIAL_BINS - 6, features.RADIAL_BINS)
    assert upsampled.radial_mean[last].mean() < original.radial_mean[last].mean() - 1


def test_the_matrix_dct_equals_scipys_orthonormal_dct() -> None:
    from scipy.fft import dctn

    crop = np.random.default_rng(9).normal(size=(N, N))
    centred = crop - crop.mean()
    expected = np.log(np.abs(dctn(centred, type=2, norm="ortho")) + features._EPS)
    assert np.allclose(features.log_spectrum(crop), expected - expected.mean(), atol=1e-9)
