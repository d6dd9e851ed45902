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
  :data:`SEGMENTATION_SIZE`-pixel version.

Cost. ``imagehash.crop_resistant_hash`` finds its segments with a flood fill written in
Python: ~75 ms for a 512-pixel photo, three quarters of an analysis. :func:`crop_resistant`
computes the *same* hash (the same segments, the same ``imagehash.dhash`` of each segment's
bounding box, the same text) with ``scipy.ndimage.label`` doing the connected components in C:
~3 ms. The stored value is unchanged, so hashes stored before and after compare as before;
``tests/service/test_service_scope.py`` checks it against imagehash's own on photos, textures,
crops and small images (they differ only in imagehash's early stop below, see
:func:`crop_resistant`).

Groups are the connected components of "same source": a photo, its resized copy and a crop
of that copy are one group even if the crop and the photo alone would not match. A false match
only merges groups, which makes validation stricter, never leakier.
"""
from __future__ import annotations

import logging
from typing import Optional, Sequence

import numpy as np
from PIL import Image, ImageFilter

log = logging.getLogger("deepfake.near_duplicate")

PHASH_MAX_DISTANCE = 10  # of 64 bits
SEGMENTATION_SIZE = 200  # pixels (imagehash's default is 300)
SEGMENT_THRESHOLD = 128  # imagehash's defaults for crop_resistant_hash
MIN_SEGMENT_SIZE = 500
_SEP = ";"


def hash_image(image: Image.Image) -> Optional[str]:
    """``"p:<phash hex>;c:<crop-resistant hash>"`` (either part may be missing), or None."""
    import imagehash  # imported on first use: it loads scipy and PyWavelets

    parts = []
    try:
        gray = image if image.mode in ("L", "RGB") else image.convert("RGB")
        parts.append("p:" + str(imagehash.phash(gray)))
        if min(image.size) >= 16:
            parts.append("c:" + crop_resistant(gray))
    except Exception as exc:  # an unusual mode or a degenerate image: no hash, exact bytes only
        log.info("no perceptual hash for this image: %s", exc)
    return _SEP.join(parts) or None


def crop_resistant(image: Image.Image) -> str:
    """``str(imagehash.crop_resistant_hash(image, segmentation_image_size=SEGMENTATION_SIZE))``,
    with the segments found by ``scipy.ndimage.label`` instead of imagehash's Python flood fill.

    imagehash: grey, resized to SEGMENTATION_SIZE square (Lanczos), Gaussian blur, median
    filter; "hills" (> SEGMENT_THRESHOLD) then "valleys" are 4-connected regions, each in the
    order of its first pixel (row-major), kept if larger than MIN_SEGMENT_SIZE; each kept
    region's bounding box, scaled to the original, is cropped and ``dhash``-ed. ``label``
    numbers components in that same order. One difference: imagehash stops looking for valleys
    once its count of visited pixels (which includes the 4 * SEGMENTATION_SIZE pixels just
    outside the border) reaches the image's area, so it can skip the last valleys in scan
    order; here every valley is examined. A segment more only adds a hash, and matching needs
    one equal segment: grouping can only become stricter (more merges), never leakier.
    """
    import imagehash
    from scipy import ndimage

    size = SEGMENTATION_SIZE
    small = image.convert("L").resize((size, size), Image.Resampling.LANCZOS)
    small = small.filter(ImageFilter.GaussianBlur()).filter(ImageFilter.MedianFilter())
    hills = np.asarray(small).astype(np.float32) > SEGMENT_THRESHOLD
    boxes = []
    for mask in (hills, ~hills):
        labels, count = ndimage.label(mask)  # 4-connectivity, raster order of first pixels
        if not count:
            continue
        sizes = np.bincount(labels.ravel(), minlength=count + 1)
        for number, where in enumerate(ndimage.find_objects(labels), start=1):
            if where is not None and sizes[number] > MIN_SEGMENT_SIZE:
                boxes.append((where[0].start, where[1].start, where[0].stop, where[1].stop))
    if not boxes:  # imagehash: one segment, the whole image
        boxes.append((0, 0, size, size))
    width, height = image.size
    scale_w, scale_h = float(width) / size, float(height) / size
    hashes = [imagehash.dhash(image.crop((left * scale_w, top * scale_h, right * scale_w,
                                          bottom * scale_h)))
              for top, left, bottom, right in boxes]
    return str(imagehash.ImageMultiHash(hashes))


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
    group too.

    Every hash is parsed once: pHashes become 64-bit integers compared against all others at
    once (XOR and a bit count per row, numpy), crop-resistant hashes are matched through an
    index of their segment hashes (two images match when one segment hash is equal, which is
    :func:`same_source`'s ``hamming_cutoff=0, region_cutoff=1``). Same links as calling
    :func:`same_source` on every pair (a test checks it), without its n² hash parsing: 1,000
    feedback images in a fraction of a second rather than minutes.
    """
    n = len(keys)
    parent = list(range(n))

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
    phash_index, phash_values = [], []
    by_segment: dict[str, int] = {}
    for i, value in enumerate(hashes):
        parts = _parts(value) if value else {}
        p = parts.get("p")
        if p:
            try:
                phash_values.append(int(p, 16))
                phash_index.append(i)
            except ValueError:
                pass
        c = parts.get("c")
        if c:
            for segment in {seg.strip().lower() for seg in c.split(",") if seg.strip()}:
                if segment in by_segment:
                    union(by_segment[segment], i)
                else:
                    by_segment[segment] = i
    if len(phash_values) > 1:
        values = np.array(phash_values, dtype=np.uint64)
        for row, i in enumerate(phash_index[:-1]):
            distances = _popcount(values[row + 1:] ^ values[row])
            for offset in np.flatnonzero(distances <= PHASH_MAX_DISTANCE):
                union(i, phash_index[row + 1 + int(offset)])
    return ["near-duplicates:" + keys[find(i)][:16] for i in range(n)]


def _popcount(values: np.ndarray) -> np.ndarray:
    """Set bits of each uint64."""
    if hasattr(np, "bitwise_count"):  # numpy >= 2.0
        return np.bitwise_count(values)
    return np.unpackbits(values.view(np.uint8).reshape(-1, 8), axis=1).sum(axis=1)


def _parts(value: str) -> dict[str, str]:
    out = {}
    for part in value.split(_SEP):
        if ":" in part:
            kind, _, text = part.partition(":")
            out[kind] = text
    return out
