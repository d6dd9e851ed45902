"""Retraining: baseline set + feedback, grouped validation, replace only if no worse.

Owns the active model (:class:`ModelHolder`) and the rule for replacing it. Several worker
processes may serve one data directory; ``models/current.json`` is the one model they share:

- Every request that uses the model asks the holder for it, and the holder first calls
  ``os.stat`` on ``current.json`` (a few microseconds) and reloads if the file was replaced.
  So once a retrain on any worker has installed a model, every request that starts
  afterwards, on any worker, is answered by it: there is no polling interval. A damaged
  ``current.json`` is read (and its fallback logged) once, not on every request: the holder
  remembers which file it judged.
- The snapshot a request gets (model, source) is one immutable tuple, swapped in a single
  assignment: analyses never wait for a retrain, and one in flight finishes with the model it
  started with.
- One retrain at a time across all workers: the store's retrain lock, not an in-memory one. A
  second retrain, on any worker, is refused with who holds the lock rather than queued. The
  decision and the install happen under that lock, against the model current *then* (reloaded
  from disk), so a retrain never compares against a model another worker has since replaced.

The "no worse" rule compares both models on data neither trained on, as far as that exists:
- on feedback images, the candidate's grouped-CV accuracy against the current model's direct
  accuracy (a current model that already trained on some of them is favoured: conservative);
- on the baseline images, the candidate's grouped-CV accuracy against the current model's
  recorded baseline accuracy, allowing ``BASELINE_TOLERANCE`` for fold-to-fold noise.
"""
from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from typing import Any, NamedTuple, Optional

import numpy as np

from . import baseline_set
from .errors import ApiError
from .model import LinearModel, ModelFiles
from .store import LABELS, RetrainLocked, Store

log = logging.getLogger("deepfake.retrain")

BASELINE_TOLERANCE = 0.02  # accuracy points: one baseline image out of 114 is ~0.009


class ActiveModel(NamedTuple):
    """The model to answer with, where it came from, and which ``current.json`` was judged."""

    model: Optional[LinearModel]
    source: str  # "current", "previous", "baseline" or "none"
    identity: Optional[tuple[int, ...]]  # ModelFiles.current_identity() when it was loaded

    @property
    def version(self) -> Optional[str]:
        return self.model.version if self.model is not None else None


class ModelHolder:
    """The model requests use right now, kept in step with ``current.json`` on disk."""

    def __init__(self, files: ModelFiles) -> None:
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

    def _load(self, identity: Optional[tuple[int, ...]],
              was: Optional[str]) -> ActiveModel:
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
        feedback = training.TrainingSet.from_images(
            [(vectors, 1 if label == "fake" else 0, "feedback:" + sha, "feedback",
              "feedback/" + label) for sha, label, vectors in samples])
        data = baseline_set.load(self.baseline_path).concat(feedback)
        metrics, _ = training.validate(data)
        # the model on disk now, not the one this worker last served: under the lock nobody
        # else installs, and this is what the candidate must be no worse than
        current = self.holder.current().model
        previous_metrics = dict(current.metrics) if current is not None else {}
        replace, reason = self._compare(metrics, current, feedback)
        if current is not None:
            previous_metrics["feedback_accuracy"] = _direct_accuracy(current, feedback)
        version = new_version()
        model_version = current.version if current is not None else None
        if replace:
            description = {"data": "bundled baseline set plus feedback",
                           "feedback_samples": int(feedback.n_images),
                           "feedback_per_label": counts, "C": training.C}
            model = training.train_model(data, version, metrics, description)
            self.holder.install(model)
            model_version = model.version
        log.info("retrain %s in %.1f s: %s", "replaced the model" if replace else "kept the model",
                 time.monotonic() - started, reason)
        return {"replaced": replace, "model_version": model_version, "metrics": metrics,
                "previous_metrics": previous_metrics, "reason": reason}

    def _compare(self, metrics: dict[str, Any], current: Optional[LinearModel],
                 feedback: Any) -> tuple[bool, str]:
        if current is None:
            return True, "no model was loaded"
        current_feedback = _direct_accuracy(current, feedback)
        new_feedback = metrics.get("feedback_accuracy")
        current_baseline = current.metrics.get("baseline_accuracy")
        new_baseline = metrics.get("baseline_accuracy")
        if new_feedback is not None and current_feedback is not None \
                and new_feedback < current_feedback:
            return False, ("kept the current model: on feedback images the candidate scored "
                           "%.3f (held out) against %.3f" % (new_feedback, current_feedback))
        if new_baseline is not None and current_baseline is not None \
                and new_baseline < current_baseline - BASELINE_TOLERANCE:
            return False, ("kept the current model: on baseline images the candidate scored "
                           "%.3f (held out) against %.3f" % (new_baseline, current_baseline))
        return True, ("replaced: the candidate is no worse on feedback images (%s vs %s) and "
                      "on baseline images (%s vs %s, tolerance %.2f)"
                      % (_fmt(new_feedback), _fmt(current_feedback), _fmt(new_baseline),
                         _fmt(current_baseline), BASELINE_TOLERANCE))


def new_version() -> str:
    """A model version no other retrain, on any worker, gets: UTC time to the ms + random."""
    now = time.time()
    return "retrained-%s.%03dZ-%s" % (time.strftime("%Y%m%dT%H%M%S", time.gmtime(now)),
                                      int(now % 1 * 1000), uuid.uuid4().hex[:6])


def _direct_accuracy(model: LinearModel, data: Any) -> Optional[float]:
    if data.n_images == 0:
        return None
    logits = np.array([model.image_logit(data.vectors[data.crop_image == i])
                       for i in range(data.n_images)])
    return round(float(np.mean((logits > 0) == data.image_label)), 4)


def _fmt(value: Optional[float]) -> str:
    return "n/a" if value is None else "%.3f" % value
