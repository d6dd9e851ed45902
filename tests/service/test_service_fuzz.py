"""Property: no upload, however malformed, makes the service answer 500 (or hang)."""
from __future__ import annotations

import io

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

API = "/api/deepfake"
# Pillow warns (rightly) about the corrupt TIFF/EXIF data these tests feed it
pytestmark = pytest.mark.filterwarnings("ignore:.*:UserWarning:PIL")
SETTINGS = settings(max_examples=150, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])

# corrupt-but-plausible inputs: valid magic numbers followed by garbage
MAGICS = [b"", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff\xe0", b"GIF89a", b"RIFF\0\0\0\0WEBPVP8 ",
          b"BM", b"II*\0", b"MM\0*"]


@pytest.fixture(scope="module")
def fuzz_client(tmp_path_factory):
    from dataclasses import replace

    from deepfake.app import create_app
    from deepfake.config import ServiceConfig

    config = replace(ServiceConfig(data_dir=str(tmp_path_factory.mktemp("fuzz"))),
                     max_upload=2**20, max_pixels=4_000_000)
    app = create_app(config)
    app.config["PROPAGATE_EXCEPTIONS"] = False
    return app.test_client()


def check(response) -> None:
    assert response.status_code < 500, response.get_data(as_text=True)
    assert response.is_json
    assert "Traceback" not in response.get_data(as_text=True)


@SETTINGS
@given(magic=st.sampled_from(MAGICS), tail=st.binary(max_size=4096),
       as_raw=st.booleans(), label=st.sampled_from(["real", "fake", "x", ""]))
def test_arbitrary_bytes_never_cause_a_500(fuzz_client, magic, tail, as_raw, label) -> None:
    data = magic + tail
    if as_raw:
        check(fuzz_client.post(API + "/analyze", data=data, content_type="image/png"))
        check(fuzz_client.post(API + "/feedback?label=" + label, data=data,
                               content_type="image/jpeg"))
    else:
        check(fuzz_client.post(API + "/analyze", data={"file": (io.BytesIO(data), "f")},
                               content_type="multipart/form-data"))


@st.composite
def small_images(draw):
    width = draw(st.integers(1, 160))
    height = draw(st.integers(1, 160))
    mode = draw(st.sampled_from(["L", "RGB", "RGBA", "P", "1", "LA", "I;16", "CMYK"]))
    seed = draw(st.integers(0, 2**32 - 1))
    kind = draw(st.sampled_from(["noise", "flat", "stripes"]))
    rng = np.random.default_rng(seed)
    if kind == "noise":
        array = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    elif kind == "flat":
        array = np.full((height, width, 3), int(rng.integers(0, 256)), np.uint8)
    else:
        array = np.zeros((height, width, 3), np.uint8)
        array[:, ::2] = 255
    image = Image.fromarray(array, "RGB")
    image = image.convert("L").convert(mode) if mode in ("I;16", "1", "LA") else image.convert(
        mode)
    formats = {"L": ["PNG", "JPEG", "WEBP", "BMP", "TIFF", "GIF"],
               "RGB": ["PNG", "JPEG", "WEBP", "BMP", "TIFF", "GIF"],
               "RGBA": ["PNG", "WEBP", "TIFF"], "P": ["PNG", "GIF", "BMP", "TIFF"],
               "1": ["PNG", "BMP", "TIFF", "GIF"], "LA": ["PNG", "TIFF"],
               "I;16": ["PNG", "TIFF"], "CMYK": ["JPEG", "TIFF"]}[mode]
    fmt = draw(st.sampled_from(formats))
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


@SETTINGS
@given(data=small_images(), truncate=st.one_of(st.none(), st.integers(0, 400)))
def test_arbitrary_small_images_never_cause_a_500(fuzz_client, data, truncate) -> None:
    if truncate is not None:
        data = data[:truncate]
    response = fuzz_client.post(API + "/analyze", data={"file": (io.BytesIO(data), "i")},
                                content_type="multipart/form-data")
    check(response)
    if truncate is None:
        assert response.status_code == 200
        body = response.get_json()
        if body["regions_examined"] == 0:
            assert body["verdict"] == "inconclusive"
        check(fuzz_client.post(API + "/feedback", json={"analysis_id": body["analysis_id"],
                                                        "label": "real"}))


def test_gif_frames_are_counted_through_pillows_private_seek() -> None:
    """imaging.count_frames parses GIF frames one by one with Pillow's private
    ``GifImageFile._seek(n, False)`` (the public seek decodes every frame before): this fails
    the day Pillow changes it."""
    import io

    from PIL import GifImagePlugin, Image

    from deepfake import imaging

    assert callable(getattr(GifImagePlugin.GifImageFile, "_seek", None))
    frames = [Image.new("L", (8, 8), value) for value in (0, 80, 160, 240)]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:])
    image = Image.open(io.BytesIO(buffer.getvalue()))
    assert imaging.count_frames(image) == 4
    assert imaging.count_frames(Image.open(io.BytesIO(buffer.getvalue())), limit=2) == 2


def test_create_app_changes_nothing_process_wide(tmp_path) -> None:
    import warnings

    from PIL import Image

    from deepfake.app import create_app
    from deepfake.config import ServiceConfig

    before = (Image.MAX_IMAGE_PIXELS, list(warnings.filters))
    create_app(ServiceConfig(data_dir=str(tmp_path), max_pixels=1234))
    assert (Image.MAX_IMAGE_PIXELS, list(warnings.filters)) == before
