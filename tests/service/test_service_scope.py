"""Out-of-scope inputs are "inconclusive" with a reason, never explained as camera photos; and
retrain validation groups near-duplicate feedback (a photo, its resized copy, a re-encode)."""
from __future__ import annotations

import io

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from PIL import Image, ImageDraw

from service_images import encode, nearest_upsampled, pink_noise
from deepfake import near_duplicate

API = "/api/deepfake"


def analyze(client, data: bytes) -> dict:
    response = client.post(API + "/analyze", data=data, content_type="image/png")
    assert response.status_code == 200, response.get_data(as_text=True)
    return response.get_json()


def screenshot() -> Image.Image:
    image = Image.new("RGB", (800, 600), (245, 245, 245))
    draw = ImageDraw.Draw(image)
    for i in range(30):
        x, y = 20 + (i % 3) * 260, 20 + i // 3 * 55
        draw.text((x, y), "Settings item number %d" % i, fill=(20, 20, 20))
        draw.rectangle((x - 5, y + 25, x + 180, y + 40), outline=(0, 90, 200),
                       fill=(220, 230, 250))
    return image


@pytest.mark.parametrize("name,image,code,words", [
    ("white noise", Image.fromarray(np.random.default_rng(1).integers(
        0, 256, (512, 512, 3), dtype=np.uint8)), "noise", "random noise"),
    ("gaussian noise", Image.fromarray(np.clip(np.random.default_rng(2).normal(
        128, 30, (384, 384)), 0, 255).astype(np.uint8)), "noise", "random noise"),
    ("screenshot", screenshot(), "graphics", "flat graphics or a screenshot"),
    ("tiny", Image.new("RGB", (40, 40), "red"), "too_small", "too small"),
    ("flat", Image.new("L", (300, 300), 7), "flat", "flat"),
    ("strip", pink_noise((64, 192), seed=22), "too_few_regions", "too few usable regions"),
])
def test_out_of_scope_inputs_are_inconclusive_with_a_reason(client, name, image, code,
                                                            words) -> None:
    body = analyze(client, encode(image))
    assert body["verdict"] == "inconclusive", name
    assert body["signal"]["reason_code"] == code and words in body["signal"]["reason"]
    assert body["headline"].startswith("Can't tell: ") and words in body["headline"]
    assert "camera" not in body["explanation"] and "camera" not in body["headline"]


def test_upsampled_noise_is_not_out_of_scope(client) -> None:
    """Enlarged noise is correlated: it is examined, not dismissed as noise."""
    noise = Image.fromarray(np.random.default_rng(3).integers(0, 256, (512, 512), dtype=np.uint8))
    body = analyze(client, encode(nearest_upsampled(noise)))
    assert body["signal"]["reason_code"] != "noise"


def test_photos_are_in_scope(client) -> None:
    skimage_data = pytest.importorskip("skimage.data")
    for photo in (skimage_data.astronaut(), skimage_data.camera(), skimage_data.coffee()):
        body = analyze(client, encode(Image.fromarray(photo)))
        assert body["signal"]["reason_code"] in (None, "in_between"), body["signal"]


# --- near-duplicate grouping ---------------------------------------------------------------

def test_a_photo_its_resized_copy_and_a_reencode_are_one_source() -> None:
    skimage_data = pytest.importorskip("skimage.data")
    photo = Image.fromarray(skimage_data.astronaut())
    other = Image.fromarray(skimage_data.coffee())
    copies = [photo, photo.resize((384, 384), Image.Resampling.LANCZOS),
              Image.open(io.BytesIO(encode(photo, "JPEG", quality=70))), other]
    hashes = [near_duplicate.hash_image(image) for image in copies]
    groups = near_duplicate.groups(["a" * 64, "b" * 64, "c" * 64, "d" * 64], hashes)
    assert groups[0] == groups[1] == groups[2] != groups[3]
    # identical keys are one group even without a hash
    assert near_duplicate.groups(["x", "x", "y"], [None, None, None]) == [
        "near-duplicates:x", "near-duplicates:x", "near-duplicates:y"]


def test_a_photo_and_a_crop_of_it_are_one_source() -> None:
    skimage_data = pytest.importorskip("skimage.data")
    photo = Image.fromarray(skimage_data.astronaut())
    # 12% cut off one side. Segment hashes match only when a segment's bounding box survives
    # the crop whole: crops off every side (e.g. (30, 20, 420, 400)) are *not* grouped, with
    # imagehash's own function as with ours (python/README.md, "Honest retrain validation")
    crop = photo.crop((0, 0, 450, 512))
    hashes = [near_duplicate.hash_image(i) for i in (photo, crop,
                                                     Image.fromarray(skimage_data.coffee()))]
    groups = near_duplicate.groups(["a" * 64, "b" * 64, "c" * 64], hashes)
    assert groups[0] == groups[1] != groups[2]


def test_the_fast_crop_resistant_hash_is_imagehash_s_own() -> None:
    """near_duplicate.crop_resistant gives imagehash.crop_resistant_hash's value (segments by
    scipy.ndimage.label instead of a Python flood fill): stored hashes stay comparable."""
    imagehash = pytest.importorskip("imagehash")
    skimage_data = pytest.importorskip("skimage.data")
    photos = [Image.fromarray(skimage_data.astronaut()), Image.fromarray(skimage_data.camera()),
              Image.fromarray(skimage_data.coffee()).crop((40, 10, 500, 390)),
              pink_noise((180, 300), seed=3, rgb=True)]
    for image in photos + [pink_noise(24, seed=4)]:
        theirs = str(imagehash.crop_resistant_hash(
            image, segmentation_image_size=near_duplicate.SEGMENTATION_SIZE))
        ours = near_duplicate.crop_resistant(image)
        if image in photos:
            assert ours == theirs
        else:  # imagehash's early stop skipped the last valley here: ours has one hash more
            assert set(theirs.split(",")) < set(ours.split(","))


@pytest.mark.timeout(120)
def test_retrain_keeps_a_duplicated_photo_on_one_side_of_every_split(client, app,
                                                                    monkeypatch) -> None:
    """The same photo labelled twice (as PNG and as a resized JPEG) is one feedback group: the
    split the retrain validates on never puts one copy in training and the other in test."""
    from deepfake import training

    photo = pink_noise(256, seed=41, rgb=True)
    uploads = [(encode(photo), "real"),
               (encode(photo.resize((224, 224), Image.Resampling.LANCZOS), "JPEG", quality=90),
                "real")]
    for seed in range(3):
        uploads.append((encode(pink_noise(256, seed=500 + seed)), "real"))
        uploads.append((encode(nearest_upsampled(pink_noise(256, seed=600 + seed))), "fake"))
    for data, label in uploads:
        response = client.post(API + "/feedback", data={"label": label,
                                                        "file": (io.BytesIO(data), "x")},
                               content_type="multipart/form-data")
        assert response.status_code == 201, response.get_data(as_text=True)
    seen = {}
    real_pair = training.heldout_pair

    def spy(data, old_images, old_labels, folds=training.FOLDS):
        seen["groups"] = data.image_group[data.image_source == "feedback"]
        return real_pair(data, old_images, old_labels, folds)
    monkeypatch.setattr(training, "heldout_pair", spy)
    body = client.post(API + "/retrain").get_json()
    groups = list(seen["groups"])
    assert len(groups) == 8 and groups[0] == groups[1]  # the photo and its resized copy
    assert len(set(groups)) == 7 == body["learnt"]["feedback_groups"]
    assert body["learnt"]["feedback_labels"] == 8


# --- grouping at scale: the same links as comparing every pair ---------------------------

def _pairwise_groups(keys, hashes):
    """The definition: union of every pair same_source() links, and of identical keys."""
    parent = list(range(len(keys)))

    def find(i):
        while parent[i] != i:
            i = parent[i]
        return i
    for i in range(len(keys)):
        for j in range(i + 1, len(keys)):
            if keys[i] == keys[j] or near_duplicate.same_source(hashes[i], hashes[j]):
                ri, rj = find(i), find(j)
                if ri != rj:
                    parent[max(ri, rj)] = min(ri, rj)
    return ["near-duplicates:" + keys[find(i)][:16] for i in range(len(keys))]


_PHASH_BASES = [0x0123456789ABCDEF, 0xFEDCBA9876543210, 0x0F0F0F0F0F0F0F0F]


@st.composite
def _hash_value(draw):
    parts = []
    if draw(st.booleans()):
        base = draw(st.sampled_from(_PHASH_BASES))
        flips = draw(st.lists(st.integers(0, 63), max_size=14))
        for bit in flips:
            base ^= 1 << bit
        parts.append("p:%016x" % base)
    if draw(st.booleans()):
        segments = draw(st.lists(st.sampled_from(["00ff00ff00ff00ff", "1234123412341234",
                                                  "abcdabcdabcdabcd", "0000000000000001",
                                                  "8000000000000000"]),
                                 min_size=1, max_size=3))
        parts.append("c:" + ",".join(segments))
    return ";".join(parts) or None


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["k1", "k2", "k3", "k4", "k5", "k6", "k7"]),
                          _hash_value()), min_size=1, max_size=12))
def test_groups_link_exactly_what_same_source_links(items):
    keys = [k * 10 for k, _ in items]
    hashes = [h for _, h in items]
    assert near_duplicate.groups(keys, hashes) == _pairwise_groups(keys, hashes)


# --- the signal's thresholds at their boundaries ---------------------------------------------

def test_verdict_thresholds_at_their_boundaries() -> None:
    from deepfake import detector

    generated, real, regions = detector.GENERATED_AT, detector.REAL_AT, detector.MIN_REGIONS
    assert detector.verdict_for(generated, regions) == "traces_found"
    assert detector.verdict_for(generated - 1e-9, regions) == "inconclusive"
    assert detector.verdict_for(real, regions) == "no_traces_found"
    assert detector.verdict_for(real + 1e-9, regions) == "inconclusive"
    assert detector.verdict_for(0.99, regions - 1) == "inconclusive"  # too few regions
    assert detector.verdict_for(0.01, regions - 1) == "inconclusive"
    assert detector.verdict_for(None, 64) == "inconclusive"
    assert (generated, real, regions) == (0.7, 0.3, 4)  # the values python/README.md states
