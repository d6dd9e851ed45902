"""Retraining: baseline set + feedback, grouped validation, replace only if no worse.

Owns the active model (:class:`ModelHolder`) and the rule for replacing it. Analyses read the
holder's reference without a lock: swapping a Python attribute is atomic, so a retrain never
blocks them, and an analysis in flight finishes with the model it started with. Only one
retrain runs at a time; a second one is refused rather than queued.

The "no worse" rule compares both models on data neither trained on, as far as that exists:
- on feedback images, the candidate's grouped-CV accuracy against the current model's direct
  accuracy (a current model that already trained on some of them is favoured: conservative);
- on the baseline images, the candidate's grouped-CV accuracy against the current model's
  recorded baseline accuracy, allowing ``BASELINE_TOLERANCE`` for fold-to-fold noise.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Any, Optional

import numpy as np

from . import baseline_set
from .errors import ApiError
from .model import LinearModel, ModelFiles
from .store import LABELS, Store

log = logging.getLogger("deepfake.retrain")

BASELINE_TOLERANCE = 0.02  # accuracy points: one baseline image out of 114 is ~0.009


class ModelHolder:
    """The model analyses use right now, and where it was loaded from."""

    def __init__(self, files: ModelFiles) -> None:
        self.files = files
        self.model: Optional[LinearModel] = None
        self.source = "none"
        self.reload()

    def reload(self) -> None:
        model, source = self.files.load_active()
        self.model, self.source = model, source if model is not None else "none"
        if model is None:
            log.error("no usable model: %s", source)

    def install(self, model: LinearModel) -> None:
        self.files.install(model)  # on disk first: a crash after this keeps the new model
        self.model, self.source = model, "current"


class Retrainer:
    """Runs one retrain at a time and decides whether its result replaces the model."""

    def __init__(self, store: Store, holder: ModelHolder, min_per_label: int,
                 baseline_path: str = baseline_set.FEATURES_PATH) -> None:
        self.store = store
        self.holder = holder
        self.min_per_label = min_per_label
        self.baseline_path = baseline_path
        self._lock = threading.Lock()

    @property
    def running(self) -> bool:
        return self._lock.locked()

    def run(self) -> dict[str, Any]:
        """Retrain now; :class:`ApiError` 409 if busy or if a label lacks samples."""
        if not self._lock.acquire(blocking=False):
            raise ApiError(409, "Retrain already running",
                           "A retrain is already in progress; only one runs at a time.",
                           "Wait for it to finish (GET /api/deepfake/stats shows retrain.running)"
                           " and try again if needed.")
        try:
            return self._run()
        finally:
            self._lock.release()

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
        current = self.holder.model
        previous_metrics = dict(current.metrics) if current is not None else {}
        replace, reason = self._compare(metrics, current, feedback)
        if current is not None:
            previous_metrics["feedback_accuracy"] = _direct_accuracy(current, feedback)
        version = "retrained-%s" % time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
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


def _direct_accuracy(model: LinearModel, data: Any) -> Optional[float]:
    if data.n_images == 0:
        return None
    logits = np.array([model.image_logit(data.vectors[data.crop_image == i])
                       for i in range(data.n_images)])
    return round(float(np.mean((logits > 0) == data.image_label)), 4)


def _fmt(value: Optional[float]) -> str:
    return "n/a" if value is None else "%.3f" % value
