"""Retraining: baseline set + feedback, grouped validation, replace only if no worse.

Owns the active model (:class:`ModelHolder`) and the rule for replacing it. Several worker
processes (and, on PostgreSQL, several replicas) share one store; its pointer to the current
model version is the one model they all serve (:class:`deepfake.model.StoredModels`):

- Every request that uses the model asks the holder for it, and the holder first reads the
  pointer (one indexed read on an open connection: a few microseconds on SQLite, one round
  trip on PostgreSQL) and reloads if it moved. So once a retrain on any worker has promoted a
  model, every request that starts afterwards, on any worker of any replica, is answered by
  it: there is no polling interval. A stored model this code cannot use is judged (and its
  fallback logged) once, not on every request: the holder remembers which version it judged.
- The snapshot a request gets (model, source) is one immutable tuple, swapped in a single
  assignment: analyses never wait for a retrain, and one in flight finishes with the model it
  started with.
- One retrain at a time across all workers: the store's retrain lock, not an in-memory one. A
  second retrain, on any worker, is refused with who holds the lock rather than queued. The
  decision and the install happen under that lock, against the model current *then* (reloaded
  from disk), so a retrain never compares against a model another worker has since replaced.

Honest validation:
- Feedback images are grouped by near-duplicate source (perceptual hashes,
  :mod:`deepfake.near_duplicate`), baseline images by source photo, for every split: a photo
  and its resized copy never sit on both sides.
- Nothing new learnt (the same feedback labels the current model was trained on): no new
  version is made, and the answer says so.
- Old vs new on the *same* split: for each grouped fold, the current model's recipe (the
  baseline plus the feedback labels it learnt, with the labels it was given) and the
  candidate's (baseline plus all feedback) are both refitted without the fold and score its
  images. The candidate replaces the model only if it is no worse on held-out feedback images
  (balanced accuracy) and on held-out baseline images (within ``BASELINE_TOLERANCE``).
- User labels say nothing about real generators: the "not validated on real generators"
  warning stays after any retrain (:mod:`deepfake.detector`).
"""
from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from typing import Any, NamedTuple, Optional

import numpy as np

from . import baseline_set, near_duplicate
from .errors import ApiError
from .model import LinearModel
from .store import LABELS, RetrainLocked, Store

log = logging.getLogger("deepfake.retrain")

BASELINE_TOLERANCE = 0.02  # accuracy points: one baseline image out of 114 is ~0.009


class ActiveModel(NamedTuple):
    """The model to answer with, where it came from, and which stored version was judged."""

    model: Optional[LinearModel]
    source: str  # "current", "baseline" or "none"
    identity: Any  # the source's current_identity() when it was loaded

    @property
    def version(self) -> Optional[str]:
        return self.model.version if self.model is not None else None


class ModelHolder:
    """The model requests use right now, kept in step with the store's current version.

    ``files`` is the model source: :class:`deepfake.model.StoredModels` (the service's), or
    :class:`deepfake.model.ModelFiles` (JSON files, for tools)."""

    def __init__(self, files: Any) -> None:
        self.files = files
        self._reloading = threading.Lock()
        self._active = self._load(files.current_identity(), None)

    def current(self) -> ActiveModel:
        """The model to use for this request; reloaded first if another process installed one."""
        active = self._active
        if self.files.current_identity() == active.identity:
            return active
        with self._reloading:  # one thread reloads; the others then find it done
            identity = self.files.current_identity()
            if identity != self._active.identity:
                self._active = self._load(identity, self._active.version)
            return self._active

    def install(self, model: LinearModel) -> None:
        """Make ``model`` current on disk (first: a crash after this keeps it) and here."""
        with self._reloading:
            self.files.install(model)
            self._active = ActiveModel(model, "current", self.files.current_identity())

    def _load(self, identity: Any, was: Optional[str]) -> ActiveModel:
        # ``identity`` was taken before reading: if the file is replaced meanwhile, the next
        # request sees a newer identity and reloads again, never keeps an older model for good
        model, source = self.files.load_active()
        if model is None:
            log.error("no usable model: %s", source)
            return ActiveModel(None, "none", identity)
        if model.version != was:
            log.info("model %s (%s) is active in process %d", model.version, source,
                     os.getpid())
        return ActiveModel(model, source, identity)


class Retrainer:
    """Runs one retrain at a time and decides whether its result replaces the model."""

    def __init__(self, store: Store, holder: ModelHolder, min_per_label: int,
                 baseline_path: str = baseline_set.FEATURES_PATH) -> None:
        self.store = store
        self.holder = holder
        self.min_per_label = min_per_label
        self.baseline_path = baseline_path

    def status(self) -> dict[str, Any]:
        """Whether a retrain runs on any worker, and whose it is."""
        holder = self.store.retrain_lock_holder()
        return {"running": holder is not None,
                "holder": holder.public() if holder is not None else None}

    def run(self) -> dict[str, Any]:
        """Retrain now; :class:`ApiError` 409 if one runs anywhere or if a label lacks samples."""
        try:
            token = self.store.acquire_retrain_lock()
        except RetrainLocked as busy:
            raise ApiError(409, "Retrain already running",
                           "A retrain is already in progress (%s); only one runs at a time "
                           "across all workers." % busy.holder.describe(),
                           "Wait for it to finish (GET /api/deepfake/stats shows retrain.running)"
                           " and try again if needed.", {"holder": busy.holder.public()})
        try:
            return self._run()
        finally:
            self.store.release_retrain_lock(token)

    def _run(self) -> dict[str, Any]:
        counts = self.store.counts()
        needed = {label: max(0, self.min_per_label - counts[label]) for label in LABELS}
        if any(needed.values()):
            raise ApiError(409, "Not enough training samples",
                           "Retraining needs at least %d feedback samples per label; it has "
                           "%d real and %d fake." % (self.min_per_label, counts["real"],
                                                     counts["fake"]),
                           "Send %d more 'real' and %d more 'fake' labels to "
                           "POST /api/deepfake/feedback, then retry."
                           % (needed["real"], needed["fake"]),
                           {"needed": needed})
        from . import training  # scikit-learn is imported here, never at startup

        started = time.monotonic()
        samples = self.store.samples()
        # near-duplicate sources (perceptual hashes) are one group: a photo and its resized
        # copy, or a crop uploaded twice, never land on both sides of any validation split
        group_of = near_duplicate.groups([sha for sha, _, _, _ in samples],
                                         [near for _, _, _, near in samples])
        feedback = training.TrainingSet.from_images(
            [(vectors, 1 if label == "fake" else 0, "feedback:" + group, "feedback",
              "feedback/" + label)
             for (sha, label, vectors, _), group in zip(samples, group_of)])
        keys = sorted("%s:%s" % (sha, label) for sha, label, vectors, _ in samples
                      if len(vectors))
        unhashed = sum(1 for _, _, vectors, near in samples if len(vectors) and not near)
        groups_count = int(len({g for (_, _, v, _), g in zip(samples, group_of) if len(v)}))
        # the model on disk now, not the one this worker last served: under the lock nobody
        # else installs, and this is what the candidate must be no worse than
        current = self.holder.current().model
        current_version = current.version if current is not None else None
        learnt_before = list((current.training if current is not None else {})
                             .get("feedback_labels") or [])
        if current is not None and keys == sorted(learnt_before):
            reason = ("nothing new to learn: the current model %s was trained on exactly these "
                      "%d feedback labels, so no new version was made" % (current.version,
                                                                          len(keys)))
            log.info("retrain skipped: %s", reason)
            return {"replaced": False, "model_version": current_version,
                    "metrics": None, "previous_metrics": dict(current.metrics),
                    "comparison": None, "reason": reason,
                    "learnt": {"new_labels": 0, "changed_labels": 0,
                               "feedback_labels": len(keys), "feedback_groups": groups_count}}
        data = baseline_set.load(self.baseline_path).concat(feedback)
        old_images, old_labels, new_count, changed = _old_training(data, samples, feedback,
                                                                   learnt_before)
        new_logits, old_logits, folds = training.heldout_pair(data, old_images, old_labels)
        split = ("grouped %d-fold, image level: baseline images grouped by source photo, "
                 "feedback grouped by near-duplicate source (perceptual hash); both models "
                 "scored on the same held-out folds, against today's labels" % folds)
        metrics = training.describe(data, new_logits, split)
        old_metrics = training.describe(data, old_logits, split)
        old_metrics["recipe"] = ("the training data of %s (bundled baseline plus the %d "
                                 "feedback labels it learnt), refitted per fold"
                                 % (current_version or "no model", len(learnt_before)))
        replace, reason = _compare(metrics, old_metrics)
        metrics["feedback_groups"] = groups_count
        metrics["feedback_without_perceptual_hash"] = unhashed
        learnt = {"new_labels": new_count, "changed_labels": changed,
                  "feedback_labels": len(keys), "feedback_groups": groups_count}
        model_version = current_version
        if replace:
            description = {"data": "bundled baseline set plus feedback",
                           "feedback_samples": int(feedback.n_images),
                           "feedback_per_label": counts, "C": training.C,
                           "feedback_labels": keys}
            model = training.train_model(data, new_version(), metrics, description)
            self.holder.install(model)
            model_version = model.version
        log.info("retrain %s in %.1f s: %s", "replaced the model" if replace else "kept the model",
                 time.monotonic() - started, reason)
        return {"replaced": replace, "model_version": model_version, "metrics": metrics,
                "previous_metrics": old_metrics,
                "comparison": {"split": split, "folds": folds,
                               "test_images": metrics["n_images"],
                               "old": _summary(old_metrics), "new": _summary(metrics)},
                "reason": reason, "learnt": learnt}


def _old_training(data: Any, samples: list, feedback: Any,
                  learnt_before: list[str]) -> tuple[np.ndarray, np.ndarray, int, int]:
    """Which images the current model learnt from, with the labels it was given then; and how
    many feedback labels are new or changed since."""
    before = dict(key.rsplit(":", 1) for key in learnt_before)
    n_base = data.n_images - feedback.n_images
    old_images = np.zeros(data.n_images, bool)
    old_images[:n_base] = True
    old_labels = data.image_label.copy()
    new_count = changed = 0
    usable = [(sha, label) for sha, label, vectors, _ in samples if len(vectors)]
    for i, (sha, label) in enumerate(usable):
        was = before.get(sha)
        if was is None:
            new_count += 1
            continue
        old_images[n_base + i] = True
        old_labels[n_base + i] = 1 if was == "fake" else 0
        changed += int(was != label)
    return old_images, old_labels, new_count, changed


def _compare(new: dict[str, Any], old: dict[str, Any]) -> tuple[bool, str]:
    """Replace only if the candidate is no worse than the current recipe on the same held-out
    split: on feedback images (balanced accuracy) and on baseline images (accuracy, within
    ``BASELINE_TOLERANCE``)."""
    nf, of = new.get("feedback_balanced_accuracy"), old.get("feedback_balanced_accuracy")
    nb, ob = new.get("baseline_accuracy"), old.get("baseline_accuracy")
    if nf is not None and of is not None and nf < of:
        return False, ("kept the current model: on held-out feedback images the candidate's "
                       "balanced accuracy is %.3f against %.3f for the current recipe on the "
                       "same split" % (nf, of))
    if nb is not None and ob is not None and nb < ob - BASELINE_TOLERANCE:
        return False, ("kept the current model: on held-out baseline images the candidate "
                       "scored %.3f against %.3f on the same split" % (nb, ob))
    return True, ("replaced: on the same held-out split the candidate is no worse on feedback "
                  "images (balanced accuracy %s vs %s) and on baseline images (%s vs %s, "
                  "tolerance %.2f)" % (_fmt(nf), _fmt(of), _fmt(nb), _fmt(ob),
                                       BASELINE_TOLERANCE))


def _summary(metrics: dict[str, Any]) -> dict[str, Any]:
    keys = ("accuracy", "balanced_accuracy", "roc_auc", "feedback_accuracy",
            "feedback_balanced_accuracy", "baseline_accuracy")
    return {k: metrics.get(k) for k in keys}


def new_version() -> str:
    """A model version no other retrain, on any worker, gets: UTC time to the ms + random."""
    now = time.time()
    return "retrained-%s.%03dZ-%s" % (time.strftime("%Y%m%dT%H%M%S", time.gmtime(now)),
                                      int(now % 1 * 1000), uuid.uuid4().hex[:12])


def _fmt(value: Optional[float]) -> str:
    return "n/a" if value is None else "%.3f" % value
