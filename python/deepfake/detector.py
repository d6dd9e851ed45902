"""One image in, one honest verdict out: features, score, warnings, spectrum, explanation.

Owns the decision rule (probability thresholds, the minimum number of regions) and the words
the service uses to describe what it can and cannot see. Pure function of the decoded image
and the model; no I/O.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from . import features
from .imaging import MAX_COUNTED_FRAMES, DecodedImage
from .model import LinearModel

GENERATED_AT = 0.7  # probability at or above which the verdict is likely_generated
REAL_AT = 0.3  # at or below: likely_real; in between: inconclusive
MIN_REGIONS = 4  # fewer crops than this: the mean score is too noisy to call
FEW_REGIONS = 8  # fewer than this: answer, but warn
HEAVY_JPEG_QUALITY = 75

CAPABILITIES = (
    "This detector looks for the periodic traces that up-sampling (nearest-neighbour, bilinear "
    "or transposed-convolution enlargement, as used by GAN-style image generators) leaves in "
    "the frequency spectrum of an image's brightness. It was trained on real photographs and "
    "on the same photographs put through simulated generator up-sampling, with blur and JPEG "
    "applied to both; it has not been validated on the output of real image generators such "
    "as diffusion models, and it cannot detect face swaps, edits or generators that leave no "
    "up-sampling traces. Ordinary enlargement (digital zoom, upscaling software) produces the "
    "same traces, and heavy JPEG compression or downscaling can erase them."
)


@dataclass(frozen=True)
class Analysis:
    verdict: str
    probability: Optional[float]
    regions: int
    warnings: list[str]
    spectrum: dict[str, list[float]]
    explanation: str
    vectors: np.ndarray


def verdict_for(probability: Optional[float], regions: int) -> str:
    if probability is None or regions < MIN_REGIONS:
        return "inconclusive"
    if probability >= GENERATED_AT:
        return "likely_generated"
    if probability <= REAL_AT:
        return "likely_real"
    return "inconclusive"


def analyse(decoded: DecodedImage, model: Optional[LinearModel]) -> Analysis:
    """Score ``decoded`` with ``model`` (None: no model loaded, verdict inconclusive)."""
    crops = features.extract(decoded.image)
    probability = model.probability(crops.vectors) if model is not None else None
    verdict = verdict_for(probability, crops.count)
    notes = _warnings(decoded, crops, model, verdict)
    spectrum = {
        "frequencies": [round(float(f), 4) for f in features.RADIAL_FREQUENCIES],
        "log_magnitude": [round(float(v), 4) for v in crops.radial_mean] if crops.count else [],
    }
    return Analysis(verdict, None if probability is None else round(probability, 4),
                    crops.count, notes, spectrum, _explanation(verdict, probability, crops.count),
                    crops.vectors)


def _warnings(decoded: DecodedImage, crops: features.CropFeatures,
              model: Optional[LinearModel], verdict: str) -> list[str]:
    notes = []
    if model is None:
        notes.append("No detection model is loaded, so no score was computed; check the "
                      "service log for why the model files could not be read.")
    if crops.count == 0:
        if crops.candidates == 0:
            notes.append("The image is smaller than %d x %d pixels: there is no region to "
                         "examine." % (features.CROP, features.CROP))
        else:
            notes.append("Every region of the image is nearly flat: there is no detail whose "
                         "spectrum could be examined.")
    elif crops.count < MIN_REGIONS:
        notes.append("Only %d region(s) could be examined (at least %d are needed for a "
                     "verdict, %d or more recommended)." % (crops.count, MIN_REGIONS, FEW_REGIONS))
    elif crops.count < FEW_REGIONS:
        notes.append("Only %d regions could be examined (%d or more recommended); the score is "
                     "less reliable." % (crops.count, FEW_REGIONS))
    if decoded.jpeg_quality is not None and decoded.jpeg_quality < HEAVY_JPEG_QUALITY:
        notes.append("Heavy JPEG compression (estimated quality %d) removes the fine detail "
                     "where up-sampling traces live; the result is less reliable."
                     % decoded.jpeg_quality)
    if decoded.frames >= MAX_COUNTED_FRAMES:
        notes.append("The file holds %d or more frames; only the first was examined."
                     % decoded.frames)
    elif decoded.frames > 1:
        notes.append("The file holds %d frames; only the first was examined." % decoded.frames)
    if verdict == "likely_real":
        notes.append("No up-sampling traces were found. That does not prove the image is real: "
                     "diffusion models, generators with anti-aliased up-sampling, and images "
                     "downscaled after generation can leave no such traces.")
    elif verdict == "likely_generated":
        notes.append("Up-sampling traces were found. Ordinary enlargement (digital zoom, "
                      "upscaling software) leaves the same traces: this means the image was "
                      "enlarged, which image generators do, not proof that it was generated.")
    if model is not None and not model.training.get("feedback_samples"):
        notes.append("The model was trained on simulated generator up-sampling only; it has "
                     "not been validated on images from real generators.")
    return notes


def _explanation(verdict: str, probability: Optional[float], regions: int) -> str:
    if probability is None or regions == 0:
        return ("The image could not be scored: the detector needs regions of at least "
                "%d x %d pixels with some detail in them." % (features.CROP, features.CROP))
    looked = ("We examined %d regions of %d x %d pixels and measured how the image's fine "
              "detail is spread over spatial frequencies. " % (regions, features.CROP,
                                                              features.CROP))
    pct = "%.0f%%" % (100 * probability)
    if verdict == "likely_generated":
        return looked + ("The pattern matches an image that was enlarged by up-sampling, as "
                         "image generators do (estimated probability generated: %s)." % pct)
    if verdict == "likely_real":
        return looked + ("The pattern shows no sign of up-sampling, as expected from a camera "
                         "photo (estimated probability generated: %s)." % pct)
    return looked + ("The pattern is between what real photos and up-sampled images show, or "
                     "too few regions were available to decide (estimated probability "
                     "generated: %s)." % pct)


def as_payload(analysis: Analysis) -> dict[str, Any]:
    return {"verdict": analysis.verdict, "probability_generated": analysis.probability,
            "regions_examined": analysis.regions, "warnings": analysis.warnings,
            "spectrum": analysis.spectrum, "explanation": analysis.explanation}
