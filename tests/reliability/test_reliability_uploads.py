"""Hostile uploads through the real gateway to the real service: malformed multipart,
non-image bytes, image bombs and huge dimensions, truncated JPEG/PNG, wrong Content-Type.
Every one gets a clear 4xx in the JSON error shape within seconds: never a 500, never a hang.

The shared gateway runs the service with DEEPFAKE_MAX_PIXELS=4000000 and a 4 MiB upload limit.
"""
from __future__ import annotations

import http.client
import struct
import time
import zlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rel_helpers import ERROR_KEYS, encode, multipart, noise_image

pytestmark = pytest.mark.integration

MAX_PIXELS = 4_000_000
SETTINGS = settings(max_examples=100, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture,
                                           HealthCheck.too_slow])
ENDPOINTS = st.sampled_from(["/api/deepfake/analyze", "/api/deepfake/feedback"])


def send(gw, path: str, body: bytes, content_type, as_file: bool = False, field: str = "file"):
    headers = {}
    if as_file:
        body, content_type = multipart({"label": "fake"}, {field: ("up.bin", body, content_type
                                                                   or "application/octet-stream")})
    elif path.endswith("/feedback"):
        path += "?label=real"
    if content_type is not None:
        headers["Content-Type"] = content_type
    started = time.monotonic()
    resp = gw.request("POST", path, body, headers, timeout=20)
    return resp, time.monotonic() - started


def assert_clear_4xx(resp, took: float, allowed=None) -> None:
    assert 400 <= resp.status < 500, resp
    if allowed is not None:
        assert resp.status in allowed, resp
    data = resp.json()
    assert ERROR_KEYS <= set(data), data
    assert "Traceback" not in resp.body.decode("utf-8", "replace")
    assert took < 10, took


# --- building hostile images ---------------------------------------------------------------

def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_with_size(width: int, height: int, color_type: int = 0) -> bytes:
    """A PNG whose header claims width x height, with a tiny (bomb-like) compressed body."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, color_type, 0, 0, 0)
    body = zlib.compress(b"\x00" * 4096, 9)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", body)
            + png_chunk(b"IEND", b""))


def gif_with_size(width: int, height: int) -> bytes:
    return (b"GIF89a" + struct.pack("<HHBBB", width, height, 0, 0, 0)
            + b"," + struct.pack("<HHHHB", 0, 0, width, height, 0) + b"\x02\x02\x44\x01\x00;")


def bmp_with_size(width: int, height: int) -> bytes:
    header = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 24, 0, 0, 2835, 2835, 0, 0)
    return b"BM" + struct.pack("<IHHI", 14 + len(header) + 16, 0, 0, 14 + len(header)) + header \
        + b"\x00" * 16


_IMAGES: dict = {}


def valid_image(fmt: str, size: int) -> bytes:
    key = (fmt, size)
    if key not in _IMAGES:
        image = noise_image(size, seed=size, rgb=fmt == "JPEG")
        _IMAGES[key] = encode(image, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return _IMAGES[key]


# --- properties ---------------------------------------------------------------------------

MAGICS = (b"\x89PNG", b"\xff\xd8", b"GIF8", b"BM", b"RIFF", b"II*\x00", b"MM\x00*")


@pytest.mark.timeout(180)
@SETTINGS
@given(data=st.binary(min_size=0, max_size=4096).filter(lambda d: not d.startswith(MAGICS)),
       path=ENDPOINTS, as_file=st.booleans(),
       ctype=st.sampled_from(["image/png", "image/jpeg", "image/webp", "image/anything"]))
def test_non_image_bytes_get_a_clear_4xx(service_gw, data, path, as_file, ctype):
    resp, took = send(service_gw, path, data, ctype, as_file=as_file)
    assert_clear_4xx(resp, took, allowed=(400, 415))


@pytest.mark.timeout(180)
@SETTINGS
@given(fmt=st.sampled_from(["PNG", "JPEG"]), size=st.sampled_from([64, 96, 160]),
       cut=st.floats(min_value=0.0, max_value=0.9), path=ENDPOINTS, as_file=st.booleans())
def test_truncated_jpeg_and_png_get_a_clear_4xx(service_gw, fmt, size, cut, path, as_file):
    whole = valid_image(fmt, size)
    data = whole[:int(len(whole) * cut)]
    resp, took = send(service_gw, path, data, "image/" + fmt.lower(), as_file=as_file)
    assert_clear_4xx(resp, took, allowed=(400, 415))


@pytest.mark.timeout(180)
@SETTINGS
@given(kind=st.sampled_from(["png", "gif", "bmp"]),
       width=st.integers(min_value=1, max_value=2**31 - 1),
       height=st.integers(min_value=1, max_value=2**31 - 1), path=ENDPOINTS,
       as_file=st.booleans())
def test_image_bombs_and_huge_dimensions_get_a_clear_4xx(service_gw, kind, width, height, path,
                                                          as_file):
    limit = 65535 if kind == "gif" else 2**31 - 1
    width, height = min(width, limit), min(height, limit)
    if width * height <= MAX_PIXELS:  # over the limit is what makes it a bomb
        height = max(height, 100)
        width = min(limit, MAX_PIXELS // height + 1)
    assert width * height > MAX_PIXELS
    data = {"png": png_with_size, "gif": gif_with_size, "bmp": bmp_with_size}[kind](width, height)
    resp, took = send(service_gw, path, data, "image/" + kind, as_file=as_file)
    assert_clear_4xx(resp, took, allowed=(400, 413, 415))


PIECES = st.sampled_from([
    b"--{b}\r\n", b"--{b}--\r\n", b"--{b}", b"\r\n", b"\r\n\r\n",
    b'Content-Disposition: form-data; name="file"; filename="a.png"\r\n',
    b'Content-Disposition: form-data; name="label"\r\n', b"Content-Disposition: form-data\r\n",
    b"Content-Type: image/png\r\n", b"Content-Type: multipart/mixed; boundary={b}\r\n",
    b"\x89PNG\r\n\x1a\n", b"real", b"--", b"--{b}x\r\n", b"\x00\xff" * 8,
])


@pytest.mark.timeout(180)
@SETTINGS
@given(boundary=st.text(alphabet="abcXYZ019-_'()+,./:=?", min_size=1, max_size=40),
       pieces=st.lists(st.one_of(PIECES, st.binary(max_size=64)), max_size=20),
       header_boundary=st.one_of(st.none(), st.just(""), st.just("other"), st.just("same")),
       path=ENDPOINTS)
def test_malformed_multipart_gets_a_clear_4xx(service_gw, boundary, pieces, header_boundary,
                                              path):
    body = b"".join(p.replace(b"{b}", boundary.encode()) for p in pieces)
    if header_boundary is None:
        ctype = "multipart/form-data"
    else:
        ctype = "multipart/form-data; boundary=%s" % (
            boundary if header_boundary == "same" else header_boundary)
    resp, took = send(service_gw, path, body, ctype)
    assert_clear_4xx(resp, took, allowed=(400, 413, 415))


WRONG_TYPES = st.one_of(
    st.sampled_from([None, "", "text/plain", "application/json", "application/octet-stream",
                     "application/x-www-form-urlencoded", "multipart/mixed; boundary=x",
                     "text/html; charset=utf-8", "video/mp4", "imagepng", "image", ";",
                     "multipart/form-data; boundary=", "application/json; charset=latin-1"]),
    st.text(alphabet="abcdefghijklmnopqrstuvwxyz/+-.;= ", min_size=1, max_size=30)
    .filter(lambda t: not t.strip().lower().startswith(("image/", "multipart/form-data"))))


@pytest.mark.timeout(180)
@SETTINGS
@given(ctype=WRONG_TYPES, fmt=st.sampled_from(["PNG", "JPEG"]), path=ENDPOINTS)
def test_wrong_content_type_gets_a_clear_4xx(service_gw, ctype, fmt, path):
    resp, took = send(service_gw, path, valid_image(fmt, 96), ctype)
    assert_clear_4xx(resp, took, allowed=(400, 415))


@pytest.mark.timeout(30)
def test_the_same_images_untouched_are_accepted(service_gw):
    """The control: the inputs above are refused for what was done to them, not for being
    images of these formats and sizes."""
    for fmt in ("PNG", "JPEG"):
        for size in (64, 96, 160):
            resp = service_gw.request("POST", "/api/deepfake/analyze", valid_image(fmt, size),
                                      {"Content-Type": "image/" + fmt.lower()})
            assert resp.status == 200, resp
    just_under = png_with_size(2000, 2000)  # 4.0 MP: at the limit, decodes, not a bomb
    resp = service_gw.request("POST", "/api/deepfake/analyze", just_under,
                              {"Content-Type": "image/png"})
    assert resp.status != 413 and resp.status < 500, resp


def gif_with_frames(count: int, size: int = 64) -> bytes:
    """A GIF of ``count`` one-pixel frames (about 23 bytes each) on a size x size canvas."""
    frame = (b"!\xf9\x04\x00\x00\x00\x00\x00" + b"," + struct.pack("<HHHHB", 0, 0, 1, 1, 0)
             + b"\x02\x02\x44\x01\x00")
    return (b"GIF89a" + struct.pack("<HHBBB", size, size, 0x80, 0, 0) + b"\x00\x00\x00\xff\xff\xff"
            + frame * count + b";")


@pytest.mark.timeout(60)
def test_frame_bomb_is_not_walked_frame_by_frame(service_gw):
    """Found here: counting the frames of a GIF walked the whole file (~5.6 us per frame: a
    50 MB upload of one-pixel frames held a service thread ~12 s). The count now stops at
    1000, so the answer comes at once and says so."""
    bomb = gif_with_frames(170_000)  # 3.9 MB, under this gateway's 4 MiB upload limit
    started = time.monotonic()
    resp = service_gw.request("POST", "/api/deepfake/analyze", bomb, {"Content-Type": "image/gif"},
                              timeout=30)
    took = time.monotonic() - started
    assert resp.status == 200, resp
    notes = " ".join(resp.json()["warnings"])
    assert "The file holds 1000 or more frames; only the first was examined." in notes, notes
    assert took < 10, took
    few = service_gw.request("POST", "/api/deepfake/analyze", gif_with_frames(3),
                             {"Content-Type": "image/gif"})
    assert "The file holds 3 frames" in " ".join(few.json()["warnings"]), few
