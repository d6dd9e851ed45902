"""Fitting and validating the linear detector with scikit-learn (imported only here).

A training set is a list of labelled *images*, each with its crop vectors and a *group*: the
photo it was derived from. Validation is grouped K-fold, so no photo (nor any of its resized,
blurred, compressed or up-sampled versions) is ever in both the training and the test part;
accuracy is measured per image, on the mean crop log-odds, exactly as the service scores
(:func:`deepfake.model.image_means`). The held-out crop scores are ``cross_val_predict`` over
``GroupKFold``; the figures are ``sklearn.metrics`` (:func:`image_metrics`).
"""
from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np

from . import features
from .database import utc_now
from .model import LinearModel, image_means

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
    labels = (data.image_label if image_label is None else image_label)[data.crop_image]
    x = data.vectors if crop_mask is None else data.vectors[crop_mask]
    y = labels if crop_mask is None else labels[crop_mask]
    return fit_crops(x, y)


def fit_crops(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, ...]:
    """:func:`fit` on crop vectors and their labels."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(x)
    scale = np.where(scaler.scale_ > 0, scaler.scale_, 1.0)
    # balanced weights: feedback may be lopsided, and the score must not drift toward the
    # more common label
    clf = LogisticRegression(C=C, max_iter=MAX_ITER, class_weight="balanced")
    clf.fit((x - scaler.mean_) / scale, y)
    return scaler.mean_.copy(), scale, clf.coef_[0].copy(), float(clf.intercept_[0])


@functools.lru_cache(maxsize=None)
def crop_estimator() -> type:
    """The recipe of :func:`fit` as a scikit-learn classifier, for ``cross_val_predict``.

    ``fit(X, y, include=None)`` fits on the crops ``include`` selects (all by default): the
    include mask is a per-sample fit parameter, so cross-validation cuts it per fold like X
    and y. ``decision_function`` is the model's own crop log-odds
    (:meth:`deepfake.model.LinearModel.crop_logits`, in float64). Not a plain Pipeline of
    StandardScaler and LogisticRegression: retrain's "old recipe" learns from only part of
    each training fold (the images the current model learnt, with the labels it was given)
    while every crop of the test fold is scored, which a Pipeline cannot express. (For the
    plain recipe such a Pipeline on float64 crops gives the same held-out logits, measured
    bit for bit on the bundled baseline; on the stored float32 crops it standardises in
    float32 and moves image logits by up to 0.0085.) Made on first use, so scikit-learn is
    imported only when training runs.
    """
    from sklearn.base import BaseEstimator, ClassifierMixin

    class CropLogistic(ClassifierMixin, BaseEstimator):
        def fit(self, X: np.ndarray, y: np.ndarray,
                include: Optional[np.ndarray] = None) -> "CropLogistic":
            X, y = np.asarray(X), np.asarray(y)
            self.classes_ = np.unique(y)
            if include is not None:
                X, y = X[np.asarray(include, bool)], y[np.asarray(include, bool)]
            self.mean_, self.scale_, self.coef_, self.intercept_ = fit_crops(X, y)
            return self

        def decision_function(self, X: np.ndarray) -> np.ndarray:
            return ((np.asarray(X) - self.mean_) / self.scale_) @ self.coef_ + self.intercept_

        def predict(self, X: np.ndarray) -> np.ndarray:
            return self.classes_[(self.decision_function(X) > 0).astype(np.int64)]

    return CropLogistic


def n_folds(data: TrainingSet, folds: int = FOLDS) -> int:
    """Grouped folds used: ``folds``, or fewer when there are fewer groups."""
    return min(folds, len(np.unique(data.image_group[data.crop_image])))


def heldout_crop_logits(data: TrainingSet, folds: int = FOLDS,
                        train_images: Optional[np.ndarray] = None,
                        image_label: Optional[np.ndarray] = None) -> np.ndarray:
    """Each crop's log-odds from a model fitted without its group: ``cross_val_predict`` over
    ``GroupKFold`` on the crops, grouped by their image's group (the source photo, or the
    near-duplicate group of a feedback image), so all crops of an image, and all images of a
    group, sit in one test fold. ``train_images`` (bool per image) restricts what each fold's
    model learns from, ``image_label`` replaces the labels it learns (the test folds and
    their scores cover every crop either way)."""
    from sklearn.model_selection import GroupKFold, cross_val_predict

    labels = (data.image_label if image_label is None else image_label)[data.crop_image]
    params = {} if train_images is None else {"include": train_images[data.crop_image]}
    return cross_val_predict(crop_estimator()(), data.vectors, labels,
                             groups=data.image_group[data.crop_image],
                             cv=GroupKFold(n_splits=n_folds(data, folds)),
                             method="decision_function", params=params)


def heldout_logits(data: TrainingSet, folds: int = FOLDS) -> np.ndarray:
    """Each image's mean crop log-odds from a model that never saw its group."""
    return image_means(heldout_crop_logits(data, folds), data.crop_image, data.n_images)


def heldout_pair(data: TrainingSet, old_images: np.ndarray, old_labels: np.ndarray,
                 folds: int = FOLDS) -> tuple[np.ndarray, np.ndarray, int]:
    """Held-out image log-odds of two recipes on the *same* grouped split: "new" trains on every
    image outside the test fold; "old" only on those of ``old_images`` (bool per image) outside
    it, with ``old_labels`` (what the older model was told). Each test image is scored by both
    models of its fold, neither of which saw its group (GroupKFold is deterministic: both
    calls cut the same folds). Returns (new, old, number of folds)."""
    new = heldout_crop_logits(data, folds)
    old = heldout_crop_logits(data, folds, train_images=old_images, image_label=old_labels)
    return (image_means(new, data.crop_image, data.n_images),
            image_means(old, data.crop_image, data.n_images), n_folds(data, folds))


#: per-source figures of :func:`describe` (retrain's answer); :func:`validate` (the bundled
#: baseline's stored metrics) reports only accuracy
SOURCE_FIGURES = ("accuracy", "balanced_accuracy", "images")


def describe(data: TrainingSet, logits: np.ndarray, validation: str,
             source_figures: Sequence[str] = SOURCE_FIGURES) -> dict[str, Any]:
    """The metrics of held-out image log-odds: overall (:func:`image_metrics`), per source
    (``source_figures`` of "accuracy", "balanced_accuracy", "images") and accuracy per kind."""
    metrics = image_metrics(logits, data.image_label)
    metrics["n_groups"] = int(len(np.unique(data.image_group)))
    metrics["n_crops"] = int(len(data.vectors))
    metrics["validation"] = validation
    for source in np.unique(data.image_source):
        sel = data.image_source == source
        part = image_metrics(logits[sel], data.image_label[sel])
        part["images"] = int(sel.sum())
        for figure in source_figures:
            metrics["%s_%s" % (source, figure)] = part.get(figure)
    metrics["accuracy_by_kind"] = {
        str(kind): image_metrics(logits[data.image_kind == kind],
                                 data.image_label[data.image_kind == kind])["accuracy"]
        for kind in np.unique(data.image_kind)}
    return metrics


def image_metrics(logits: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    """Accuracy, balanced accuracy, per-class recall and ROC AUC of image-level log-odds
    (``sklearn.metrics``; a log-odds above 0 predicts "generated"), rounded to 4 decimals.
    Balanced accuracy is the mean recall of the classes present in ``labels``; ROC AUC only
    when both are."""
    from sklearn.metrics import (accuracy_score, balanced_accuracy_score, recall_score,
                                 roc_auc_score)

    labels = np.asarray(labels)
    predicted = (np.asarray(logits) > 0).astype(np.int64)
    result: dict[str, Any] = {"n_images": int(len(labels))}
    if len(labels) == 0:
        return result
    result["accuracy"] = round(float(accuracy_score(labels, predicted)), 4)
    present = [value for value in (0, 1) if np.any(labels == value)]
    recalls = recall_score(labels, predicted, labels=present, average=None, zero_division=0)
    for value, recall in zip(present, recalls):
        result["fake_recall" if value else "real_recall"] = round(float(recall), 4)
    with warnings.catch_warnings():
        # one class only: "y_pred contains classes not in y_true", and the mean is taken
        # over the class present, as intended
        warnings.simplefilter("ignore", UserWarning)
        result["balanced_accuracy"] = round(float(balanced_accuracy_score(labels, predicted)),
                                            4)
    if len(present) == 2:
        result["roc_auc"] = round(float(roc_auc_score(labels, logits)), 4)
    return result


def validate(data: TrainingSet) -> tuple[dict[str, Any], np.ndarray]:
    """Grouped-CV metrics overall, per source and per kind; plus the held-out logits."""
    logits = heldout_logits(data)
    validation = "grouped %d-fold, image level, no photo in both train and test" % n_folds(data)
    return describe(data, logits, validation, source_figures=("accuracy",)), logits


def train_model(data: TrainingSet, version: str, metrics: dict[str, Any],
                training: dict[str, Any]) -> LinearModel:
    """Fit on every crop and wrap the result with its (already measured) metrics."""
    mean, scale, coef, intercept = fit(data)
    trained_at = utc_now()
    return LinearModel(version, features.FEATURE_VERSION, trained_at, mean, scale, coef,
                       intercept, metrics, training)
