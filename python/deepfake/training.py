"""Fitting and validating the linear detector with scikit-learn (imported only here).

A training set is a list of labelled *images*, each with its crop vectors and a *group*: the
photo it was derived from. Validation is grouped K-fold, so no photo (nor any of its resized,
blurred, compressed or up-sampled versions) is ever in both the training and the test part;
accuracy is measured per image, on the mean crop log-odds, exactly as the service scores.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np

from . import features
from .database import utc_now
from .model import LinearModel

C = 0.1  # inverse L2 strength; chosen by grouped CV on the baseline (0.01..1 within ~2 points)
FOLDS = 5
MAX_ITER = 5000


@dataclass
class TrainingSet:
    """Crops of many images; image-level label, group and source alongside."""

    vectors: np.ndarray  # (n_crops, N_FEATURES)
    crop_image: np.ndarray  # (n_crops,) index into the image arrays
    image_label: np.ndarray  # (n_images,) 1 = generated, 0 = real
    image_group: np.ndarray  # (n_images,) str: the originating photo
    image_source: np.ndarray  # (n_images,) str: "baseline" or "feedback"
    image_kind: np.ndarray  # (n_images,) str: e.g. "real/original", "fake/nearest"

    @property
    def crop_label(self) -> np.ndarray:
        return self.image_label[self.crop_image]

    @property
    def n_images(self) -> int:
        return int(len(self.image_label))

    @classmethod
    def from_images(cls, images: Sequence[tuple[np.ndarray, int, str, str, str]]) -> "TrainingSet":
        """From (vectors, label, group, source, kind) per image; images without crops dropped."""
        kept = [item for item in images if len(item[0])]
        vectors = (np.concatenate([item[0] for item in kept]).astype(np.float32) if kept
                   else np.empty((0, features.N_FEATURES), np.float32))
        crop_image = np.concatenate([np.full(len(item[0]), i) for i, item in enumerate(kept)]
                                    ) if kept else np.empty(0, np.int64)
        return cls(vectors, crop_image.astype(np.int64),
                   np.array([item[1] for item in kept], dtype=np.int64),
                   np.array([item[2] for item in kept], dtype=str),
                   np.array([item[3] for item in kept], dtype=str),
                   np.array([item[4] for item in kept], dtype=str))

    def concat(self, other: "TrainingSet") -> "TrainingSet":
        return TrainingSet(
            np.concatenate([self.vectors, other.vectors]),
            np.concatenate([self.crop_image, other.crop_image + self.n_images]),
            np.concatenate([self.image_label, other.image_label]),
            np.concatenate([self.image_group, other.image_group]),
            np.concatenate([self.image_source, other.image_source]),
            np.concatenate([self.image_kind, other.image_kind]))


def fit(data: TrainingSet, crop_mask: Optional[np.ndarray] = None,
        image_label: Optional[np.ndarray] = None) -> tuple[np.ndarray, ...]:
    """(mean, scale, coef, intercept) of a standardised, L2-regularised logistic regression
    (``image_label`` replaces the set's labels, e.g. the labels an older model was given)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    labels = (data.image_label if image_label is None else image_label)[data.crop_image]
    x = data.vectors if crop_mask is None else data.vectors[crop_mask]
    y = labels if crop_mask is None else labels[crop_mask]
    scaler = StandardScaler().fit(x)
    scale = np.where(scaler.scale_ > 0, scaler.scale_, 1.0)
    # balanced weights: feedback may be lopsided, and the score must not drift toward the
    # more common label
    clf = LogisticRegression(C=C, max_iter=MAX_ITER, class_weight="balanced")
    clf.fit((x - scaler.mean_) / scale, y)
    return scaler.mean_.copy(), scale, clf.coef_[0].copy(), float(clf.intercept_[0])


def heldout_logits(data: TrainingSet, folds: int = FOLDS) -> np.ndarray:
    """Each image's mean crop log-odds from a model that never saw its group."""
    from sklearn.model_selection import GroupKFold

    groups = data.image_group[data.crop_image]
    n_folds = min(folds, len(np.unique(groups)))
    logits = np.zeros(data.n_images)
    for train_idx, test_idx in GroupKFold(n_splits=n_folds).split(data.vectors, groups=groups):
        mask = np.zeros(len(data.vectors), bool)
        mask[train_idx] = True
        mean, scale, coef, intercept = fit(data, mask)
        crop_logits = ((data.vectors[test_idx] - mean) / scale) @ coef + intercept
        images = data.crop_image[test_idx]
        sums = np.bincount(images, weights=crop_logits, minlength=data.n_images)
        counts = np.bincount(images, minlength=data.n_images)
        hit = counts > 0
        logits[hit] = sums[hit] / counts[hit]
    return logits


def heldout_pair(data: TrainingSet, old_images: np.ndarray, old_labels: np.ndarray,
                 folds: int = FOLDS) -> tuple[np.ndarray, np.ndarray, int]:
    """Held-out image log-odds of two recipes on the *same* grouped split: "new" trains on every
    image outside the test fold; "old" only on those of ``old_images`` (bool per image) outside
    it, with ``old_labels`` (what the older model was told). Each test image is scored by both
    models of its fold, neither of which saw its group. Returns (new, old, number of folds)."""
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
            mean, scale, coef, intercept = fit(data, mask, labels)
            crop_logits = ((data.vectors[test_idx] - mean) / scale) @ coef + intercept
            sums = np.bincount(images, weights=crop_logits, minlength=data.n_images)
            out[hit] = sums[hit] / counts[hit]
    return new, old, n_folds


def describe(data: TrainingSet, logits: np.ndarray, validation: str) -> dict[str, Any]:
    """The metrics dict of :func:`validate` for given held-out logits."""
    metrics = image_metrics(logits, data.image_label)
    metrics["n_groups"] = int(len(np.unique(data.image_group)))
    metrics["n_crops"] = int(len(data.vectors))
    metrics["validation"] = validation
    for source in np.unique(data.image_source):
        sel = data.image_source == source
        part = image_metrics(logits[sel], data.image_label[sel])
        metrics["%s_accuracy" % source] = part.get("accuracy")
        metrics["%s_balanced_accuracy" % source] = part.get("balanced_accuracy")
        metrics["%s_images" % source] = int(sel.sum())
    per_kind = {}
    for kind in np.unique(data.image_kind):
        sel = data.image_kind == kind
        per_kind[str(kind)] = round(float(np.mean((logits[sel] > 0) == data.image_label[sel])), 4)
    metrics["accuracy_by_kind"] = per_kind
    return metrics


def image_metrics(logits: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    """Accuracy, balanced accuracy, per-class recall and ROC AUC of image-level log-odds."""
    predicted = (logits > 0).astype(np.int64)
    result: dict[str, Any] = {"n_images": int(len(labels))}
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


def validate(data: TrainingSet) -> tuple[dict[str, Any], np.ndarray]:
    """Grouped-CV metrics overall, per source and per kind; plus the held-out logits."""
    logits = heldout_logits(data)
    metrics = image_metrics(logits, data.image_label)
    metrics["n_groups"] = int(len(np.unique(data.image_group)))
    metrics["n_crops"] = int(len(data.vectors))
    metrics["validation"] = "grouped %d-fold, image level, no photo in both train and test" % (
        min(FOLDS, metrics["n_groups"]))
    for source in np.unique(data.image_source):
        sel = data.image_source == source
        metrics["%s_accuracy" % source] = image_metrics(logits[sel], data.image_label[sel]).get(
            "accuracy")
    per_kind = {}
    for kind in np.unique(data.image_kind):
        sel = data.image_kind == kind
        per_kind[str(kind)] = round(float(np.mean((logits[sel] > 0) == data.image_label[sel])), 4)
    metrics["accuracy_by_kind"] = per_kind
    return metrics, logits


def train_model(data: TrainingSet, version: str, metrics: dict[str, Any],
                training: dict[str, Any]) -> LinearModel:
    """Fit on every crop and wrap the result with its (already measured) metrics."""
    mean, scale, coef, intercept = fit(data)
    trained_at = utc_now()
    return LinearModel(version, features.FEATURE_VERSION, trained_at, mean, scale, coef,
                       intercept, metrics, training)
