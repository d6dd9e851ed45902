"""The linear detector as plain data: load, predict with numpy, save atomically as JSON.

A model is a standard scaler plus logistic-regression weights over the per-crop features of
:mod:`deepfake.features`. An image's score is the mean of its crops' log-odds
(:func:`image_means`, the one place that rule is computed). Models are
stored as JSON only (never pickle: the data directory is writable, and unpickling a file from a
writable place runs whatever code it contains).

:class:`ModelFiles` owns the files: ``models/current.json`` and ``models/previous.json`` in the
data directory, with the bundled baseline in the package as the read-only fallback. Writes go
to a temporary file that is fsynced and renamed over the old one, so a crash mid-write leaves
either the old model or the new one, never half of one; and a worker process reading the file
while another installs a model reads one of the two, whole.
"""
from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np

from . import features

log = logging.getLogger("deepfake.model")

BASELINE_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "baseline", "model.json")
FORMAT = "deepfake-linear-model/1"
# Windows refuses to rename over a file another process has open (another worker reading the
# model it just saw change, for about a millisecond): retry for up to this many seconds
REPLACE_RETRY_SECONDS = 2.0 if os.name == "nt" else 0.0


class ModelError(ValueError):
    """A model file that cannot be used: unreadable, malformed, or for other features."""


@dataclass(frozen=True)
class LinearModel:
    """Scaler + logistic regression over crop features, plus where it came from."""

    version: str
    feature_version: str
    trained_at: str
    mean: np.ndarray
    scale: np.ndarray
    coef: np.ndarray
    intercept: float
    metrics: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)

    def crop_logits(self, vectors: np.ndarray) -> np.ndarray:
        """Log-odds that each crop comes from an up-sampled (generated) image."""
        standardised = (np.asarray(vectors, dtype=np.float64) - self.mean) / self.scale
        return standardised @ self.coef + self.intercept

    def image_logit(self, vectors: np.ndarray) -> Optional[float]:
        """Mean crop log-odds (:func:`image_means`), or None with no crops (nothing to judge)."""
        if len(vectors) == 0:
            return None
        return float(image_means(self.crop_logits(vectors), np.zeros(len(vectors), np.int64),
                                 1)[0])

    def probability(self, vectors: np.ndarray) -> Optional[float]:
        logit = self.image_logit(vectors)
        if logit is None:
            return None
        return 1.0 / (1.0 + math.exp(-max(min(logit, 60.0), -60.0)))

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": self.version,
            "feature_version": self.feature_version,
            "trained_at": self.trained_at,
            "scaler": {"mean": self.mean.tolist(), "scale": self.scale.tolist()},
            "coef": self.coef.tolist(),
            "intercept": self.intercept,
            "metrics": self.metrics,
            "training": self.training,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "LinearModel":
        try:
            if data.get("format") != FORMAT:
                raise ModelError("unknown model format %r" % data.get("format"))
            model = cls(
                version=str(data["version"]),
                feature_version=str(data["feature_version"]),
                trained_at=str(data["trained_at"]),
                mean=np.asarray(data["scaler"]["mean"], dtype=np.float64),
                scale=np.asarray(data["scaler"]["scale"], dtype=np.float64),
                coef=np.asarray(data["coef"], dtype=np.float64),
                intercept=float(data["intercept"]),
                metrics=dict(data.get("metrics") or {}),
                training=dict(data.get("training") or {}),
            )
        except (KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, ModelError):
                raise
            raise ModelError("malformed model file: %s" % exc) from exc
        if model.feature_version != features.FEATURE_VERSION:
            raise ModelError("model uses features %r, this code computes %r"
                             % (model.feature_version, features.FEATURE_VERSION))
        shapes = {model.mean.shape, model.scale.shape, model.coef.shape}
        if shapes != {(features.N_FEATURES,)}:
            raise ModelError("model has the wrong number of weights")
        finite = all(np.all(np.isfinite(a)) for a in (model.mean, model.scale, model.coef))
        if not finite or not math.isfinite(model.intercept) or np.any(model.scale <= 0):
            raise ModelError("model has non-finite or non-positive values")
        return model


def image_means(crop_values: np.ndarray, crop_image: np.ndarray, n_images: int) -> np.ndarray:
    """Per-image mean of per-crop values: ``out[i]`` is the mean of ``crop_values`` over the
    crops whose ``crop_image`` is ``i`` (NaN for an image with no crop). The one place where an
    image's score is made from its crops' log-odds: the service's answer
    (:meth:`LinearModel.image_logit`) and every held-out score of training and retraining
    (:mod:`deepfake.training`) go through it.

    One ``np.bincount`` pass: each image's crops are summed in their order, then divided by
    their count; the held-out scores of training were always made this way. ``np.mean``, which
    :meth:`LinearModel.image_logit` used before, sums pairwise, so for one image the two can
    differ in the last bits: measured at most 1.8e-15 in log-odds (baseline images, and
    20,000 random sets of 1-64 baseline crops), with no reported probability (4 decimals)
    changed.
    """
    crop_image = np.asarray(crop_image, dtype=np.int64)
    sums = np.bincount(crop_image, weights=np.asarray(crop_values, dtype=np.float64),
                       minlength=n_images)
    counts = np.bincount(crop_image, minlength=n_images)
    with np.errstate(invalid="ignore", divide="ignore"):
        return sums / counts


def read_model(path: str) -> LinearModel:
    """Load one JSON model file; :class:`ModelError` if it is missing or unusable."""
    try:
        with open(path, "r", encoding="utf-8") as handle:
            data = json.load(handle)
    except (OSError, ValueError) as exc:
        raise ModelError("cannot read %s: %s" % (path, exc)) from exc
    if not isinstance(data, dict):
        raise ModelError("%s does not hold a JSON object" % path)
    return LinearModel.from_json(data)


def write_json_atomically(path: str, payload: dict[str, Any]) -> None:
    """Write JSON to ``path`` so that readers and crashes see the old file or the new one."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(payload, handle, indent=1, sort_keys=True)
            handle.write("\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; a model file is not a secret
        replace_file(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_directory(directory)


def replace_file(source: str, target: str) -> None:
    """``os.replace``, retried while Windows reports the target as in use by another process."""
    deadline = time.monotonic() + REPLACE_RETRY_SECONDS
    while True:
        try:
            os.replace(source, target)
            return
        except PermissionError:
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.005)


def _fsync_directory(directory: str) -> None:
    # the rename is durable only once the directory entry is on disk (POSIX; no-op on Windows)
    if hasattr(os, "O_DIRECTORY"):
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class ModelFiles:
    """Where the active model lives: current, previous (for rollback), bundled baseline."""

    def __init__(self, data_dir: str, baseline_path: str = BASELINE_PATH) -> None:
        self.directory = os.path.join(data_dir, "models")
        self.current = os.path.join(self.directory, "current.json")
        self.previous = os.path.join(self.directory, "previous.json")
        self.baseline = baseline_path

    def current_identity(self) -> Optional[tuple[int, ...]]:
        """What changes whenever ``current.json`` is replaced, from one ``stat``; None if absent.

        An install renames a new file over it, so its inode number changes; on a filesystem
        without inode numbers, its modification time (and usually its size) still does.
        """
        try:
            st = os.stat(self.current)
        except OSError:  # missing (or unreadable, which load_active treats the same way)
            return None
        return (st.st_ino, st.st_dev, st.st_size, st.st_mtime_ns)

    def load_active(self) -> tuple[Optional[LinearModel], str]:
        """The newest usable model and where it came from; (None, reason) if there is none.

        A damaged ``current.json`` is logged and skipped, so a bad file costs a rollback to the
        previous model, not the service.
        """
        problems = []
        for source, path in (("current", self.current), ("previous", self.previous),
                             ("baseline", self.baseline)):
            if not os.path.exists(path):
                continue
            try:
                return read_model(path), source
            except ModelError as exc:
                log.warning("skipping %s model: %s", source, exc)
                problems.append(str(exc))
        return None, "; ".join(problems) or "no model file found"

    def install(self, model: LinearModel) -> None:
        """Make ``model`` current; the model it replaces becomes ``previous.json``."""
        os.makedirs(self.directory, exist_ok=True)
        if os.path.exists(self.current):
            fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=self.directory)
            os.close(fd)
            shutil.copyfile(self.current, tmp)
            replace_file(tmp, self.previous)
        write_json_atomically(self.current, model.to_json())


class StoredModels:
    """The active model kept in the store: one row per promoted version, one pointer to the
    current one (:meth:`deepfake.store.Store.promote_model`). What :class:`ModelHolder` asks of
    a model source: ``current_identity()`` (the pointer, one indexed read), ``load_active()``
    and ``install()``.

    On an empty store the current model is seeded: a ``models/current.json`` left by a version
    of this service from before the store held models is imported, else the bundled baseline.
    A bundled baseline that is current but differs from the one this code ships (an upgrade)
    is replaced by the new one; a retrained model is never replaced that way. A stored model
    this code cannot use (other features) falls back to the bundled baseline, logged once per
    change.
    """

    def __init__(self, store: Any, data_dir: str, baseline_path: str = BASELINE_PATH) -> None:
        self.store = store
        self.baseline = baseline_path
        legacy = ModelFiles(data_dir, baseline_path)
        seed, source = None, "bundled"
        if store.current_model_id() is None and os.path.exists(legacy.current):
            try:
                seed, source = read_model(legacy.current), "imported"
            except ModelError as exc:
                log.warning("not importing %s: %s", legacy.current, exc)
        if seed is None and os.path.exists(baseline_path):
            try:
                seed = read_model(baseline_path)
            except ModelError as exc:
                log.error("the bundled baseline is unusable: %s", exc)
        if seed is not None:
            store.seed_model(seed.to_json(), source,
                             replace_source="bundled" if source == "bundled" else None)

    def current_identity(self) -> Optional[int]:
        return self.store.current_model_id()

    def load_active(self) -> tuple[Optional[LinearModel], str]:
        """The current model and its source ("current" for a retrained or imported version,
        "baseline"), or the bundled baseline when the stored one cannot be used."""
        problems = []
        model_id = self.store.current_model_id()
        stored = self.store.model(model_id) if model_id is not None else None
        if stored is not None:
            try:
                model = LinearModel.from_json(stored.payload)
                return model, "baseline" if stored.source == "bundled" else "current"
            except ModelError as exc:
                log.warning("skipping current model %s: %s", stored.version, exc)
                problems.append(str(exc))
        if os.path.exists(self.baseline):
            try:
                return read_model(self.baseline), "baseline"
            except ModelError as exc:
                problems.append(str(exc))
        return None, "; ".join(problems) or "no model stored and no bundled baseline"

    def install(self, model: LinearModel) -> None:
        """Store ``model`` as a new version and make it current (one transaction)."""
        self.store.promote_model(model.to_json(), "retrained")
