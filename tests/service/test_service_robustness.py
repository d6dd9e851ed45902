"""The robustness evaluation (python/evaluate_robustness.py) in its --quick form, with its seed:
the figures it measured on its small held-out set (4 windows from the two photos in the
scikit-learn wheel, never used in training), asserted as thresholds."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from service_images import PYTHON_DIR

sys.path.insert(0, PYTHON_DIR)
import evaluate_robustness  # noqa: E402


@pytest.fixture(scope="module")
def quick() -> dict:
    pytest.importorskip("sklearn")
    return evaluate_robustness.evaluate(quick=True, seed=evaluate_robustness.SEED)


def test_quick_set_is_the_documented_one(quick) -> None:
    assert quick["windows"] == 4 and quick["held_out_photos"] == ["china.jpg", "flower.jpg"]
    assert all(row["images"] == 4 for row in quick["procedures"].values())


def test_real_photos_raw_defocused_compressed_or_downscaled_are_not_flagged(quick) -> None:
    rows = quick["procedures"]
    assert rows["real/raw"]["traces_found"] <= 0.02  # issue 14: raw real photos <= 2%
    assert rows["real/defocus"]["traces_found"] <= 0.05  # issue 14: defocus sigma 1.5-2.5
    assert rows["real/jpeg"]["traces_found"] == 0.0
    assert rows["real/downscaled"]["traces_found"] == 0.0
    # the verdict's "traces found" (either signal): the same limits, JPEG grid excluded
    for kind in ("real/raw", "real/defocus", "real/jpeg", "real/downscaled"):
        assert rows[kind]["resampling_found"] == 0.0 and rows[kind]["either_found"] == 0.0, kind


def test_integer_upsampling_is_caught_and_the_baseline_auc_holds(quick) -> None:
    rows = quick["procedures"]
    assert rows["up4/nearest"]["traces_found"] == 1.0
    assert rows["up2/nearest"]["traces_found"] >= 0.75
    assert rows["up2/transposed_conv"]["traces_found"] >= 0.75
    assert rows["up2/bilinear"]["traces_found"] >= 0.5
    assert quick["baseline_procedures_roc_auc"] >= 0.99


def test_non_integer_enlargement_is_caught_by_the_resampling_signal(quick) -> None:
    """Issue 14 asks for >= 0.7 at 1.25x-1.75x. The spectral model still catches none of it;
    the resampling signal (deepfake/resampling.py) does, Lanczos least (measured with the seed:
    1.5x bicubic 4/4, 1.25x and 1.75x Lanczos 2/4 each; full set 110/144, README)."""
    rows = quick["procedures"]
    assert rows["up1.5/bicubic"]["traces_found"] <= 0.25  # the spectral model: a blind spot
    assert rows["up1.5/bicubic"]["resampling_found"] == 1.0
    assert rows["up1.25/lanczos"]["resampling_found"] >= 0.5
    assert rows["up1.75/lanczos"]["resampling_found"] >= 0.5
    assert quick["non_integer_caught"] == [8, 12]
    assert quick["resampling_threshold"] == 119.9


def test_the_script_runs_from_the_command_line(tmp_path) -> None:
    pytest.importorskip("sklearn")
    out = tmp_path / "figures.json"
    result = subprocess.run([sys.executable, os.path.join(PYTHON_DIR, "evaluate_robustness.py"),
                             "--quick", "--json", str(out)], capture_output=True, text=True,
                            timeout=120, cwd=str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert "ROC AUC on the baseline procedures" in result.stdout and out.exists()
