"""The bundled baseline training set: crop features of real and simulated-generated photos.

``baseline/features.npz`` is written by ``python/build_baseline.py`` and read here with
``allow_pickle=False`` (plain arrays only), so retraining works where scikit-image, which
ships the source photos, is not installed.
"""
from __future__ import annotations

import os

import numpy as np

from .training import TrainingSet

FEATURES_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "baseline",
                             "features.npz")


def save(data: TrainingSet, path: str = FEATURES_PATH) -> None:
    np.savez_compressed(path, vectors=data.vectors.astype(np.float32),
                        crop_image=data.crop_image.astype(np.int32),
                        image_label=data.image_label.astype(np.int8),
                        image_group=data.image_group.astype("U64"),
                        image_kind=data.image_kind.astype("U64"))


def load(path: str = FEATURES_PATH) -> TrainingSet:
    with np.load(path, allow_pickle=False) as archive:
        n_images = len(archive["image_label"])
        return TrainingSet(
            archive["vectors"].astype(np.float32),
            archive["crop_image"].astype(np.int64),
            archive["image_label"].astype(np.int64),
            archive["image_group"].astype(str),
            np.full(n_images, "baseline"),
            archive["image_kind"].astype(str))
