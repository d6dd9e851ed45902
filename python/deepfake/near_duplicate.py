"""Near-duplicate sources for feedback images, so validation never tests on a copy of a training
image.

Two perceptual hashes from ``imagehash`` (a well-kept library; no hashing written here) are
computed for every analysed or labelled image and stored with it — the hashes only, never
the image:

- ``phash`` (DCT hash, 64 bits): the same picture re-encoded, resized, recompressed or lightly
  edited. Two images are the same source at a Hamming distance of at most
  :data:`PHASH_MAX_DISTANCE` (distinct photos of the baseline set are 20 or more apart,
  a 3/4 resize of one is 0 apart).
- ``crop_resistant_hash`` (Jain et al.'s segment hash): a crop of a larger picture. Two images
  are the same source when at least one segment's hash matches exactly. Segmentation runs on a
  :data:`SEGMENTATION_SIZE`-pixel version (~0.1 s for a 512-pixel photo).

Groups are the connected components of "same source": a photo, its resized copy and a crop
of that copy are one group even if the crop and the photo alone would not match. A false match
only merges groups, which makes validation stricter, never leakier.
"""
from __future__ import annotations

import logging
from typing import Optional, Sequence

from PIL import Image

log = logging.getLogger("deepfake.near_duplicate")

PHASH_MAX_DISTANCE = 10  # of 64 bits
SEGMENTATION_SIZE = 200  # pixels; imagehash's default of 300 costs ~0.27 s per photo
_SEP = ";"


def hash_image(image: Image.Image) -> Optional[str]:
    """``"p:<phash hex>;c:<crop-resistant hash>"`` (either part may be missing), or None."""
    import imagehash  # imported on first use: it loads scipy and PyWavelets

    parts = []
    try:
        gray = image if image.mode in ("L", "RGB") else image.convert("RGB")
        parts.append("p:" + str(imagehash.phash(gray)))
        if min(image.size) >= 16:
            parts.append("c:" + str(imagehash.crop_resistant_hash(
                gray, segmentation_image_size=SEGMENTATION_SIZE)))
    except Exception as exc:  # an unusual mode or a degenerate image: no hash, exact bytes only
        log.info("no perceptual hash for this image: %s", exc)
    return _SEP.join(parts) or None


def same_source(a: Optional[str], b: Optional[str]) -> bool:
    """Whether two stored hashes name near-duplicate sources (False if either is missing)."""
    if not a or not b:
        return False
    import imagehash

    pa, pb = _parts(a), _parts(b)
    try:
        if "p" in pa and "p" in pb and \
                imagehash.hex_to_hash(pa["p"]) - imagehash.hex_to_hash(pb["p"]) \
                <= PHASH_MAX_DISTANCE:
            return True
        if "c" in pa and "c" in pb:
            return bool(imagehash.hex_to_multihash(pa["c"]).matches(
                imagehash.hex_to_multihash(pb["c"]), region_cutoff=1, hamming_cutoff=0))
    except (ValueError, TypeError):
        return False
    return False


def groups(keys: Sequence[str], hashes: Sequence[Optional[str]]) -> list[str]:
    """A group name per image: images linked by :func:`same_source` share one (union-find).
    ``keys`` (e.g. SHA-256) name the group after its first member; identical keys are one
    group too."""
    parent = list(range(len(keys)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    def union(i: int, j: int) -> None:
        ri, rj = find(i), find(j)
        if ri != rj:
            parent[max(ri, rj)] = min(ri, rj)

    first: dict[str, int] = {}
    for i, key in enumerate(keys):
        if key in first:
            union(first[key], i)
        else:
            first[key] = i
    for i in range(len(keys)):
        for j in range(i + 1, len(keys)):
            if find(i) != find(j) and same_source(hashes[i], hashes[j]):
                union(i, j)
    return ["near-duplicates:" + keys[find(i)][:16] for i in range(len(keys))]


def _parts(value: str) -> dict[str, str]:
    out = {}
    for part in value.split(_SEP):
        if ":" in part:
            kind, _, text = part.partition(":")
            out[kind] = text
    return out
