"""Each rule of the model's arithmetic in one place, and the stack's own tools where they fit:

- an image's score is the mean of its crops' log-odds: :func:`deepfake.model.image_means`,
  used by the service's answer and by every held-out score of training and retraining;
- the metrics are ``sklearn.metrics``, with the figures the hand-written code gave;
- the held-out scores are ``cross_val_predict`` over ``GroupKFold``, the same logits as the
  hand-written fold loop gave, bit for bit;
- ``_luma`` is kept beside Pillow's ``convert("F")``, which differs in the last bit;
- the DCT matrix is kept so that the service imports no scipy at start-up.

The old hand-written code is copied here (``_old_*``) as the reference it must keep matching.
"""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from PIL import Image

from deepfake import baseline_set, features, training
from deepfake.model import BASELINE_PATH, image_means, read_model

SETTINGS = settings(max_examples=150, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


# ---- the hand-written code as it was (training.py before this change) ----------------------

def _old_image_metrics(logits: np.ndarray, labels: np.ndarray) -> dict:
    predicted = (logits > 0).astype(np.int64)
    result = {"n_images": int(len(labels))}
    if len(labels) == 0:
        return result
    result["accuracy"] = round(float(np.mean(predicted == labels)), 4)
    recalls = []
    for value, name in ((0, "real_recall"), (1, "fake_recall")):
        sel = labels == value
        if sel.any():
            recalls.append(float(np.mean(predicted[sel] == value)))
            result[name] = round(recalls[-1], 4)
    result["balanced_accuracy"] = round(float(np.mean(recalls)), 4)
    if len(np.unique(labels)) == 2:
        from sklearn.metrics import roc_auc_score
        result["roc_auc"] = round(float(roc_auc_score(labels, logits)), 4)
    return result


def _old_describe(data: training.TrainingSet, logits: np.ndarray, validation: str) -> dict:
    metrics = _old_image_metrics(logits, data.image_label)
    metrics["n_groups"] = int(len(np.unique(data.image_group)))
    metrics["n_crops"] = int(len(data.vectors))
    metrics["validation"] = validation
    for source in np.unique(data.image_source):
        sel = data.image_source == source
        part = _old_image_metrics(logits[sel], data.image_label[sel])
        metrics["%s_accuracy" % source] = part.get("accuracy")
        metrics["%s_balanced_accuracy" % source] = part.get("balanced_accuracy")
        metrics["%s_images" % source] = int(sel.sum())
    per_kind = {}
    for kind in np.unique(data.image_kind):
        sel = data.image_kind == kind
        per_kind[str(kind)] = round(float(np.mean((logits[sel] > 0) == data.image_label[sel])), 4)
    metrics["accuracy_by_kind"] = per_kind
    return metrics


def _old_heldout_pair(data, old_images, old_labels, folds=training.FOLDS):
    from sklearn.model_selection import GroupKFold

    groups = data.image_group[data.crop_image]
    n_folds = min(folds, len(np.unique(groups)))
    new, old = np.zeros(data.n_images), np.zeros(data.n_images)
    old_crops = old_images[data.crop_image]
    for train_idx, test_idx in GroupKFold(n_splits=n_folds).split(data.vectors, groups=groups):
        train = np.zeros(len(data.vectors), bool)
        train[train_idx] = True
        images = data.crop_image[test_idx]
        counts = np.bincount(images, minlength=data.n_images)
        hit = counts > 0
        for out, mask, labels in ((new, train, None), (old, train & old_crops, old_labels)):
            mean, scale, coef, intercept = training.fit(data, mask, labels)
            crop_logits = ((data.vectors[test_idx] - mean) / scale) @ coef + intercept
            sums = np.bincount(images, weights=crop_logits, minlength=data.n_images)
            out[hit] = sums[hit] / counts[hit]
    return new, old, n_folds


def random_set(seed: int, n_images: int = 40, groups: int = 9,
               sources: tuple[str, ...] = ("baseline", "feedback")) -> training.TrainingSet:
    rng = np.random.default_rng(seed)
    images = []
    for i in range(n_images):
        label = int(rng.integers(0, 2)) if i >= 2 else i  # both labels present
        vectors = rng.normal(loc=label * 0.4, size=(int(rng.integers(1, 9)),
                                                   features.N_FEATURES))
        images.append((vectors, label, "g%d" % rng.integers(0, groups),
                       sources[i % len(sources)], "kind%d/%d" % (label, i % 3)))
    return training.TrainingSet.from_images(images)


# ---- 1. mean crop log-odds: one function --------------------------------------------------

@SETTINGS
@given(st.data())
def test_image_means_is_the_mean_of_each_images_crops(data) -> None:
    n_images = data.draw(st.integers(1, 12))
    n_crops = data.draw(st.integers(0, 80))
    crop_image = np.array(data.draw(st.lists(st.integers(0, n_images - 1), min_size=n_crops,
                                             max_size=n_crops)), dtype=np.int64)
    values = np.array(data.draw(st.lists(st.floats(-60, 60, allow_nan=False), min_size=n_crops,
                                         max_size=n_crops)), dtype=np.float64)
    means = image_means(values, crop_image, n_images)
    assert means.shape == (n_images,)
    for i in range(n_images):
        mine = values[crop_image == i]
        if len(mine) == 0:
            assert np.isnan(means[i])
        else:
            assert means[i] == pytest.approx(float(np.mean(mine)), rel=1e-12, abs=1e-12)


def test_the_service_and_training_score_an_image_through_image_means(monkeypatch) -> None:
    """The service's answer and the held-out scores both go through the one function."""
    import deepfake.model as model_module

    model = read_model(BASELINE_PATH)
    vectors = baseline_set.load().vectors[:20]
    calls = []
    real = model_module.image_means

    def spy(values, crop_image, n_images):
        calls.append(len(values))
        return real(values, crop_image, n_images)
    monkeypatch.setattr(model_module, "image_means", spy)
    monkeypatch.setattr(training, "image_means", spy)
    assert model.image_logit(vectors) == pytest.approx(float(np.mean(model.crop_logits(vectors))),
                                                       abs=1e-12)
    data = random_set(5)
    training.heldout_logits(data)
    training.heldout_pair(data, np.ones(data.n_images, bool), data.image_label)
    assert calls == [20] + [len(data.vectors)] * 3


# ---- 2. metrics: sklearn.metrics, the same figures -----------------------------------------

@SETTINGS
@given(st.data())
def test_sklearn_metrics_give_the_hand_written_figures(data) -> None:
    n = data.draw(st.integers(0, 60))
    labels = np.array(data.draw(st.lists(st.integers(0, 1), min_size=n, max_size=n)),
                      dtype=np.int64)
    # scores with ties at 0 and between images (ROC AUC's ties, "> 0" at the boundary)
    logits = np.array(data.draw(st.lists(st.sampled_from([-2.0, -0.5, 0.0, 0.5, 3.0])
                                         | st.floats(-8, 8, allow_nan=False),
                                         min_size=n, max_size=n)), dtype=np.float64)
    assert training.image_metrics(logits, labels) == _old_image_metrics(logits, labels)


@pytest.mark.parametrize("seed", range(6))
def test_describe_gives_the_hand_written_figures(seed) -> None:
    data = random_set(seed, n_images=50)
    logits = np.random.default_rng(seed).normal(size=data.n_images)
    assert training.describe(data, logits, "s") == _old_describe(data, logits, "s")
    # the baseline's stored metrics keep their keys: accuracy only, per source
    only = training.describe(data, logits, "s", source_figures=("accuracy",))
    assert {k for k in only if k.startswith(("baseline_", "feedback_"))} == {
        "baseline_accuracy", "feedback_accuracy"}


# ---- 3. held-out logits: cross_val_predict over GroupKFold ---------------------------------

@pytest.mark.parametrize("seed", [0, 1])
def test_cross_val_predict_gives_the_hand_loops_held_out_logits(seed) -> None:
    data = random_set(seed)
    rng = np.random.default_rng(seed + 100)
    old_images = rng.random(data.n_images) < 0.7
    old_labels = np.where(rng.random(data.n_images) < 0.2, 1 - data.image_label,
                          data.image_label)
    new, old, folds = training.heldout_pair(data, old_images, old_labels)
    ref_new, ref_old, ref_folds = _old_heldout_pair(data, old_images, old_labels)
    assert folds == ref_folds == 5
    assert np.array_equal(new, ref_new) and np.array_equal(old, ref_old)
    assert np.array_equal(training.heldout_logits(data), ref_new)


def test_held_out_crops_never_share_a_group_with_their_training_crops(monkeypatch) -> None:
    data = random_set(3)
    seen = []
    real = training.fit_crops

    def spy(x, y):
        seen.append({bytes(row) for row in np.asarray(x)})
        return real(x, y)
    monkeypatch.setattr(training, "fit_crops", spy)
    training.heldout_logits(data)
    groups = data.image_group[data.crop_image]
    rows = [bytes(row) for row in data.vectors]
    assert len(seen) == 5
    for trained in seen:
        inside = {g for g, row in zip(groups, rows) if row in trained}
        outside = {g for g, row in zip(groups, rows) if row not in trained}
        assert inside and outside and not inside & outside


def test_the_bundled_baselines_held_out_figures_are_unchanged() -> None:
    """validate() on the shipped features gives the shipped metrics (the rebuild test in
    test_service_baseline.py needs scikit-image; this one does not)."""
    data = baseline_set.load()
    metrics, logits = training.validate(data)
    assert metrics == read_model(BASELINE_PATH).metrics
    ref, _, _ = _old_heldout_pair(data, np.ones(data.n_images, bool), data.image_label)
    assert np.array_equal(logits, ref)


# ---- 4. _luma beside Pillow's convert("F") -------------------------------------------------

def _ulps(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.max(np.abs(a.astype(np.float32).view(np.int32).astype(np.int64)
                             - b.astype(np.float32).view(np.int32).astype(np.int64))))


@pytest.mark.parametrize("mode", ["RGB", "L", "P", "RGBA", "CMYK"])
def test_luma_and_pillows_float_conversion_differ_only_in_the_last_bits(mode) -> None:
    rng = np.random.default_rng(4)
    channels = {"RGB": 3, "L": 1, "P": 3, "RGBA": 4, "CMYK": 4}[mode]
    pixels = rng.integers(0, 256, (256, 256, channels), dtype=np.uint8)
    image = Image.fromarray(pixels[..., 0] if channels == 1 else pixels,
                            "RGB" if mode == "P" else mode)
    if mode == "P":
        image = image.convert("P", palette=Image.Palette.ADAPTIVE)
    ours = features._luma(features.pixel_array(image))
    pillow = np.asarray(image.convert("F"), dtype=np.float32)
    assert ours.dtype == np.float32 and ours.shape == pillow.shape
    if mode == "L":
        assert np.array_equal(ours, pillow)
        return
    # the figures _luma's docstring gives: a quarter of the pixels 1-2 ulp apart
    assert _ulps(ours, pillow) <= 2 and float(np.max(np.abs(ours - pillow))) <= 2e-5
    share = float(np.mean(ours != pillow))
    assert 0.15 < share < 0.35, (
        "Pillow's convert('F') now gives %s of _luma's values: if identical, use it and "
        "drop _luma (the features stay the same)" % share)


# ---- 5. the DCT matrix keeps scipy out of start-up -----------------------------------------

def test_importing_the_service_imports_no_scipy_nor_scikit_learn() -> None:
    code = ("import sys, deepfake.app, deepfake.features, deepfake.detector, deepfake.retrain\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('scipy', 'sklearn')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, env=dict(os.environ, PYTHONWARNINGS="ignore"))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
