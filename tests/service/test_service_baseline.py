"""The baseline build script reproduces the shipped model: same data, weights and metrics."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from service_images import PYTHON_DIR
from deepfake import baseline_set
from deepfake.model import BASELINE_PATH, read_model


@pytest.mark.timeout(120)
def test_rerunning_the_build_script_reproduces_the_shipped_model(tmp_path) -> None:
    pytest.importorskip("skimage")
    result = subprocess.run(
        [sys.executable, os.path.join(PYTHON_DIR, "build_baseline.py"), "--out-dir",
         str(tmp_path)], capture_output=True, text=True, timeout=110)
    assert result.returncode == 0, result.stderr
    assert "held-out image accuracy" in result.stdout
    shipped, rebuilt = read_model(BASELINE_PATH), read_model(str(tmp_path / "model.json"))
    assert rebuilt.metrics == shipped.metrics
    assert np.allclose(rebuilt.coef, shipped.coef, atol=1e-6)
    assert rebuilt.intercept == pytest.approx(shipped.intercept, abs=1e-6)
    data_shipped, data_rebuilt = baseline_set.load(), baseline_set.load(
        str(tmp_path / "features.npz"))
    assert np.allclose(data_shipped.vectors, data_rebuilt.vectors, atol=1e-5)
    assert np.array_equal(data_shipped.image_group, data_rebuilt.image_group)


def test_shipped_metrics_are_grouped_and_honest() -> None:
    with open(BASELINE_PATH) as handle:
        metrics = json.load(handle)["metrics"]
    data = baseline_set.load()
    assert metrics["n_images"] == data.n_images and metrics["n_groups"] == 18
    assert set(metrics["accuracy_by_kind"]) == {
        "real/original", "real/downscaled2", "real/downscaled1.5",
        "fake/nearest", "fake/bilinear", "fake/transposed_conv", "real/defocus"}
    assert 0.75 <= metrics["accuracy"] <= 1.0 and metrics["roc_auc"] > 0.85


@pytest.mark.timeout(120)
def test_a_rebuild_over_the_shipped_files_changes_no_byte_and_runs_from_anywhere(tmp_path) -> None:
    """Run from another directory over copies of the tracked files: byte-identical (a rebuild
    with unchanged inputs leaves the git tree clean)."""
    pytest.importorskip("skimage")
    import shutil

    out = tmp_path / "baseline"
    out.mkdir()
    shipped_dir = os.path.dirname(BASELINE_PATH)
    for name in ("model.json", "features.npz"):
        shutil.copy(os.path.join(shipped_dir, name), out / name)
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    result = subprocess.run(
        [sys.executable, os.path.join(PYTHON_DIR, "build_baseline.py"), "--out-dir", str(out)],
        cwd=str(elsewhere), capture_output=True, text=True, timeout=110)
    assert result.returncode == 0, result.stderr
    for name in ("model.json", "features.npz"):
        with open(os.path.join(shipped_dir, name), "rb") as a, open(out / name, "rb") as b:
            assert a.read() == b.read(), "%s changed on a rebuild from the same inputs" % name
