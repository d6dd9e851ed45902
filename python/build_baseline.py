#!/usr/bin/env python
"""Rebuild the bundled baseline model from photos that scikit-image ships in its wheel.

    python python/build_baseline.py [--out-dir DIR]

Real class: each photo as shipped, and downscaled by 2 and by 1.5 with an anti-aliasing filter
(a resized real photo is still real). Generated class: the same photo halved and up-sampled by
nearest neighbour, bilinear and transposed-convolution kernels (AutoGAN's simulation). Every
image then gets a random augmentation (none, blur, JPEG, blur+JPEG), whatever its class.
The held-out accuracy is grouped by photo. Only files already inside the installed
scikit-image package are read; nothing is downloaded. The seed is fixed, so a rerun on the
same library versions reproduces the shipped features, weights and metrics.

Writes ``model.json`` and ``features.npz`` to ``python/deepfake/baseline/`` (or --out-dir).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
from PIL import Image

from deepfake import baseline_set, features, simulate, training
from deepfake.model import write_json_atomically

SEED = 20200712
CROPS_PER_IMAGE = 32
# Natural photographs among scikit-image's bundled data (public domain / CC0; see
# skimage/data/README.txt and the skimage docs). Drawings, masks and synthetic test patterns
# (horse, logo, chessboard, phantom, color, binary blobs) are left out: they are not photos.
# The two motorcycle views show the same scene, so they form one group.
PHOTOS = (
    ("astronaut", "astronaut"), ("brick", "brick"), ("camera", "camera"), ("cell", "cell"),
    ("chelsea", "chelsea"), ("clock_motion", "clock_motion"), ("coffee", "coffee"),
    ("coins", "coins"), ("grass", "grass"), ("gravel", "gravel"),
    ("hubble_deep_field", "hubble_deep_field"), ("ihc", "ihc"), ("moon", "moon"),
    ("motorcycle_left", "motorcycle"), ("motorcycle_right", "motorcycle"), ("page", "page"),
    ("retina", "retina"), ("rocket", "rocket"), ("text", "text"),
)


def photo_directory() -> str:
    import skimage.data  # only to locate the files bundled in the installed wheel
    return os.path.dirname(os.path.abspath(skimage.data.__file__))


def load_photo(directory: str, name: str) -> Image.Image:
    for extension in (".png", ".jpg"):
        path = os.path.join(directory, name + extension)
        if os.path.exists(path):
            image = Image.open(path)
            image.load()
            return image if image.mode in ("L", "RGB") else image.convert("RGB")
    raise FileNotFoundError("%s is not bundled in this scikit-image install" % name)


def build_set(seed: int = SEED) -> training.TrainingSet:
    rng = np.random.default_rng(seed)
    directory = photo_directory()
    images = []
    for name, group in PHOTOS:
        photo = load_photo(directory, name)
        variants = [(photo, 0, "real/original"),
                    (simulate.downscale(photo, 2.0), 0, "real/downscaled2"),
                    (simulate.downscale(photo, 1.5), 0, "real/downscaled1.5")]
        variants += [(simulate.upsample(photo, method, rng), 1, "fake/" + method)
                     for method in simulate.UPSAMPLERS]
        # defocused reals: blur is not up-sampling (non-integer enlargement was tried as a
        # fake class too; these features cannot separate it, see evaluate_robustness.py)
        variants.append((simulate.defocus(photo, rng), 0, "real/defocus"))

        for image, label, kind in variants:
            augmented, _ = simulate.augment(image, rng)
            vectors = features.extract(augmented, CROPS_PER_IMAGE).vectors
            images.append((vectors, label, group, "baseline", kind))
    return training.TrainingSet.from_images(images)


def build(out_dir: str, seed: int = SEED) -> dict:
    started = time.monotonic()
    data = build_set(seed)
    metrics, _ = training.validate(data)
    import sklearn
    import PIL
    description = {
        "data": "scikit-image bundled photos (%d photos, %d groups): real, downscaled; "
                "simulated up-sampling (%s); blur/JPEG augmentation on both classes"
                % (len(PHOTOS), len({g for _, g in PHOTOS}), ", ".join(simulate.UPSAMPLERS)),
        "seed": seed,
        "crops_per_image": CROPS_PER_IMAGE,
        "C": training.C,
        "libraries": {"numpy": np.__version__, "scikit-learn": sklearn.__version__,
                      "Pillow": PIL.__version__},
        "feedback_samples": 0,
    }
    model = training.train_model(data, "baseline-1", metrics, description)
    os.makedirs(out_dir, exist_ok=True)
    baseline_set.save(data, os.path.join(out_dir, "features.npz"))
    model_path = os.path.join(out_dir, "model.json")
    write_json_atomically(model_path, keep_trained_at_if_unchanged(model.to_json(), model_path))
    print("baseline: %d images, %d crops, held-out image accuracy %.3f (AUC %.3f), %.1f s"
          % (metrics["n_images"], metrics["n_crops"], metrics["accuracy"],
             metrics.get("roc_auc", float("nan")), time.monotonic() - started))
    return metrics


def keep_trained_at_if_unchanged(payload: dict, path: str) -> dict:
    """``payload`` with the ``trained_at`` of the model already at ``path`` when everything
    else is the same: a rebuild from unchanged inputs then rewrites the file byte for byte
    (the tracked baseline stays clean in git)."""
    try:
        with open(path, encoding="utf-8") as f:
            previous = json.load(f)
    except (OSError, ValueError):
        return payload
    def rest(model: dict) -> str:
        return json.dumps({k: v for k, v in model.items() if k != "trained_at"},
                          sort_keys=True)
    if isinstance(previous, dict) and "trained_at" in previous and rest(previous) == rest(payload):
        return dict(payload, trained_at=previous["trained_at"])
    return payload


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", default=os.path.dirname(baseline_set.FEATURES_PATH))
    parser.add_argument("--seed", type=int, default=SEED)
    args = parser.parse_args(argv)
    build(args.out_dir, args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
