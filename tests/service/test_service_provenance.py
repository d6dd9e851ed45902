"""Provenance readers on files the tests build: PNG text chunks and XMP with Pillow, EXIF, and a
C2PA manifest signed here with a throwaway certificate (c2pa-python); then the same files
through POST /analyze, where provenance and signal are reported apart."""
from __future__ import annotations

import io
import json

import pytest
from PIL import Image, PngImagePlugin

from c2pa_signing import make_credentials, sign
from service_images import encode, pink_noise
from deepfake import provenance
from deepfake.provenance import ProvenanceReader, TrustList

API = "/api/deepfake"
XMP = ('<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF '
       'xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#"><rdf:Description rdf:about="" '
       'xmlns:Iptc4xmpExt="http://iptc.org/std/Iptc4xmpExt/2008-02-29/" '
       'xmlns:xmp="http://ns.adobe.com/xap/1.0/"><Iptc4xmpExt:DigitalSourceType>'
       'http://cv.iptc.org/newscodes/digitalsourcetype/%s</Iptc4xmpExt:DigitalSourceType>'
       '%s</rdf:Description></rdf:RDF></x:xmpmeta>')
A1111 = ("a lighthouse at dusk, oil painting\nNegative prompt: blurry\nSteps: 30, Sampler: "
         "Euler a, CFG scale: 7, Seed: 1234, Size: 512x512, Model hash: abc123")


@pytest.fixture(scope="module")
def photo() -> Image.Image:
    return pink_noise(256, seed=5, rgb=True)


@pytest.fixture(scope="module")
def credentials():
    return make_credentials()


def read(data: bytes, trust: TrustList = TrustList(None, "none configured")) -> list:
    image = Image.open(io.BytesIO(data))
    image.load()
    return ProvenanceReader(trust).read(data, image, image.format)


def png_with(photo: Image.Image, **chunks: str) -> bytes:
    info = PngImagePlugin.PngInfo()
    for key, value in chunks.items():
        info.add_itxt(key, value) if key.startswith("XML") else info.add_text(key, value)
    return encode(photo, "PNG", pnginfo=info)


# --- PNG text chunks ----------------------------------------------------------------------

def test_an_automatic1111_parameters_chunk_is_a_declaration(photo) -> None:
    [item] = read(png_with(photo, parameters=A1111))
    assert (item.source, item.declares) == ("png_text", "ai_generated")
    assert item.where == "PNG text chunk 'parameters'"
    assert "a lighthouse at dusk" in item.says and "Steps" in item.says
    assert item.tool == "AUTOMATIC1111-compatible web UI"


def test_a_chunk_counts_by_its_content_not_only_its_name(photo) -> None:
    assert read(png_with(photo, parameters="exposure +0.3, white balance daylight")) == []
    assert read(png_with(photo, prompt="not json", Comment="holiday 2019")) == []


def test_comfyui_prompt_and_workflow_graphs_are_declarations(photo) -> None:
    graph = {"3": {"class_type": "KSampler", "inputs": {"seed": 1}},
             "4": {"class_type": "CheckpointLoaderSimple", "inputs": {}}}
    workflow = {"nodes": [{"id": 1}, {"id": 2}, {"id": 3}], "links": []}
    items = read(png_with(photo, prompt=json.dumps(graph), workflow=json.dumps(workflow)))
    assert [(i.where, i.tool, i.declares) for i in items] == [
        ("PNG text chunk 'prompt'", "ComfyUI", "ai_generated"),
        ("PNG text chunk 'workflow'", "ComfyUI", "ai_generated")]
    assert "2 nodes" in items[0].says and "3 nodes" in items[1].says


# --- XMP and EXIF -------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_the_iptc_digital_source_type_in_xmp_is_read(photo, fmt) -> None:
    xmp = XMP % ("trainedAlgorithmicMedia", "")
    data = (png_with(photo, **{"XML:com.adobe.xmp": xmp}) if fmt == "PNG"
            else encode(photo, fmt, xmp=xmp.encode()))
    [item] = read(data)
    assert (item.source, item.declares) == ("xmp", "ai_generated")
    assert item.where == "XMP Iptc4xmpExt:DigitalSourceType"
    assert item.details["digital_source_types"] == ["trainedAlgorithmicMedia"]
    assert "not signed" in item.says


def test_xmp_capture_and_composite_types_and_a_creator_tool(photo) -> None:
    [capture] = read(encode(photo, "JPEG", xmp=(XMP % ("digitalCapture", "")).encode()))
    assert capture.declares == "captured"
    tool = "<xmp:CreatorTool>Adobe Firefly Image 3</xmp:CreatorTool>"
    items = read(encode(photo, "JPEG", xmp=(XMP % ("compositeWithTrainedAlgorithmicMedia",
                                                    tool)).encode()))
    assert [(i.declares, i.tool) for i in items] == [("ai_composite", None),
                                                     ("ai_generated", "Adobe Firefly")]


def test_exif_software_naming_a_generator_and_a_parameters_user_comment(photo) -> None:
    exif = Image.Exif()
    exif[0x0131] = "Midjourney v6"
    [item] = read(encode(photo, "JPEG", exif=exif))
    assert (item.where, item.tool, item.declares) == ("EXIF Software (0x0131)", "Midjourney",
                                                      "ai_generated")
    exif[0x0131] = "Adobe Photoshop 25.0 (Windows)"
    assert read(encode(photo, "JPEG", exif=exif)) == []
    exif = Image.Exif()
    exif.get_ifd(0x8769)[0x9286] = b"UNICODE\0" + A1111.encode("utf-16-be")
    [item] = read(encode(photo, "JPEG", exif=exif))
    assert item.where == "EXIF UserComment (0x9286)" and "Steps" in item.says


def test_generator_names_match_whole_words_only() -> None:
    assert provenance.generator_named("made with DALL·E 3") == "DALL·E"
    assert provenance.generator_named("Stable Diffusion XL 1.0") == "Stable Diffusion"
    assert provenance.generator_named("Fireflyer Photo Suite") is None
    assert provenance.generator_named("GIMP 2.10") is None


def test_a_plain_file_declares_nothing(photo) -> None:
    for fmt in ("PNG", "JPEG", "WEBP", "BMP", "TIFF", "GIF"):
        assert read(encode(photo.convert("P") if fmt == "GIF" else photo, fmt)) == []


# --- C2PA ---------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt,mime", [("JPEG", "image/jpeg"), ("PNG", "image/png")])
def test_a_c2pa_manifest_signed_by_an_untrusted_issuer(photo, credentials, fmt, mime) -> None:
    signed = sign(encode(photo, fmt), mime, credentials)
    [item] = read(signed)
    assert (item.source, item.declares, item.tool) == ("c2pa", "ai_generated", "TestGen")
    details = item.details
    assert details["claim_generator"] == "TestGen 1.0"
    assert details["digital_source_types"] == ["trainedAlgorithmicMedia"]
    assert details["signature"]["issuer"] == "Throwaway Test Org"
    assert details["validation"]["status"] == "signed, issuer not trusted"
    assert details["validation"]["signature_valid"] is True
    assert details["validation"]["issuer_trusted"] is False
    assert [f["code"] for f in details["validation"]["failures"]] == [
        "signingCredential.untrusted"]
    assert details["trust_list"] == "none configured"
    assert "signed, issuer not trusted" in item.says


def test_the_same_manifest_is_trusted_when_its_ca_is_on_the_trust_list(photo, credentials,
                                                                       tmp_path) -> None:
    anchors = tmp_path / "anchors.pem"
    anchors.write_bytes(credentials.ca_pem)
    trust = TrustList.from_file(str(anchors))
    assert trust.description.startswith("anchors.pem (1 anchor certificate")
    [item] = read(sign(encode(photo, "JPEG"), "image/jpeg", credentials), trust)
    assert item.details["validation"]["status"] == "signed, issuer trusted"
    # a CA that did not sign it does not make it trusted
    other = tmp_path / "other.pem"
    other.write_bytes(make_credentials("Someone Else").ca_pem)
    [item] = read(sign(encode(photo, "JPEG"), "image/jpeg", credentials),
                  TrustList.from_file(str(other)))
    assert item.details["validation"]["status"] == "signed, issuer not trusted"


def test_a_file_changed_after_signing_does_not_validate(photo, credentials) -> None:
    import struct
    import zlib

    signed = sign(encode(photo, "PNG"), "image/png", credentials)
    # a text chunk added after signing: still a valid PNG, no longer the bytes that were signed
    body = b"tEXt" + b"Comment\0added later"
    chunk = struct.pack(">I", len(body) - 4) + body + struct.pack(">I", zlib.crc32(body))
    iend = signed.rfind(b"IEND") - 4
    [item] = read(signed[:iend] + chunk + signed[iend:])
    assert item.details["validation"]["signature_valid"] is False
    assert item.details["validation"]["status"] == "signature or content hash does not validate"


def test_unreadable_c2pa_data_is_reported_not_trusted(photo, credentials) -> None:
    import struct
    import zlib

    signed = bytearray(sign(encode(photo, "PNG"), "image/png", credentials))
    start = signed.find(b"caBX")  # the PNG chunk that holds the manifest store (JUMBF)
    length = struct.unpack(">I", signed[start - 4:start])[0]
    signed[start + 20:start + 60] = b"\0" * 40  # its box headers wiped ...
    end = start + 4 + length  # ... and its CRC made right again: still a valid PNG
    signed[end:end + 4] = struct.pack(">I", zlib.crc32(bytes(signed[start:end])))
    [item] = read(bytes(signed))
    assert (item.source, item.declares) == ("c2pa", "unreadable")
    assert "could not be read" in item.says


# --- through the API ----------------------------------------------------------------------

def analyze(client, data: bytes) -> dict:
    response = client.post(API + "/analyze", data={"file": (io.BytesIO(data), "x")},
                           content_type="multipart/form-data")
    assert response.status_code == 200, response.get_data(as_text=True)
    return response.get_json()


def test_analyze_reports_c2pa_provenance_and_the_signal_apart(client, photo,
                                                              credentials) -> None:
    body = analyze(client, sign(encode(photo, "JPEG", quality=95), "image/jpeg", credentials))
    assert body["verdict"] == "declared_ai" and body["verdict_rule"] == "R1"
    assert body["verdict_basis"] == "provenance"
    assert body["headline"] == ("Content Credentials declare this image AI-generated (signed by "
                                "Throwaway Test Org, issuer not on the trust list; tool: TestGen)")
    [item] = body["provenance"]["items"]
    assert item["details"]["validation"]["status"] == "signed, issuer not trusted"
    assert "none configured" in item["details"]["trust_list"]
    assert body["provenance"]["note"] is None
    # the spectral signal is still there, under its own name
    assert body["signal"]["name"] == "spectral up-sampling traces"
    assert body["signal"]["status"] in ("traces_found", "no_traces_found", "inconclusive")
    assert body["regions_examined"] == body["signal"]["regions_examined"] == 16


def test_a_trusted_capture_claim_is_relied_on_an_untrusted_one_is_not(make_app, photo,
                                                                      credentials,
                                                                      tmp_path) -> None:
    signed = sign(encode(photo, "JPEG", quality=95), "image/jpeg", credentials,
                  source_type="digitalCapture", generator="TestCam")
    untrusted = analyze(make_app().test_client(), signed)
    assert untrusted["verdict"] != "declared_capture" and untrusted["verdict_rule"] == "R3"
    assert any("declares a capture, but its signer is not on the trust list" in w
               for w in untrusted["warnings"])
    anchors = tmp_path / "anchors.pem"
    anchors.write_bytes(credentials.ca_pem)
    trusted = analyze(make_app(c2pa_trust_anchors=str(anchors)).test_client(), signed)
    assert trusted["verdict"] == "declared_capture" and trusted["verdict_rule"] == "R2"
    assert "trusted issuer declare a capture (Throwaway Test Org; TestCam 1.0)" in \
        trusted["headline"]
    assert "anchors.pem (1 anchor certificate" in trusted["provenance"]["c2pa_trust_list"]


def test_analyze_names_a_png_chunk_declaration(client, photo) -> None:
    body = analyze(client, png_with(photo, parameters=A1111))
    assert body["verdict"] == "declared_ai"
    assert body["headline"].startswith("The file carries AUTOMATIC1111-compatible web UI "
                                       "generation settings (PNG text chunk 'parameters'")
    assert body["provenance"]["items"][0]["where"] == "PNG text chunk 'parameters'"
