"""Every endpoint and every error, through Flask's test client."""
from __future__ import annotations

import datetime
import os
import io
import threading

import pytest
from PIL import Image

from service_images import encode, nearest_upsampled, pink_noise

API = "/api/deepfake"
ERROR_KEYS = {"error", "message", "suggestion", "timestamp"}


def assert_error(response, status: int, words: str) -> dict:
    assert response.status_code == status, response.get_data(as_text=True)
    assert response.is_json
    body = response.get_json()
    assert ERROR_KEYS <= set(body)
    assert words.lower() in (body["error"] + " " + body["message"]).lower()
    datetime.datetime.strptime(body["timestamp"], "%Y-%m-%dT%H:%M:%S.%fZ")
    assert "Traceback" not in response.get_data(as_text=True)
    return body


def analyze(client, data: bytes, field: str = "file", **extra):
    return client.post(API + "/analyze", data={field: (io.BytesIO(data), "x"), **extra},
                       content_type="multipart/form-data")


# --- analyze ---------------------------------------------------------------------------------

def test_analyze_returns_the_full_report(client, real_png) -> None:
    response = analyze(client, real_png)
    assert response.status_code == 200
    body = response.get_json()
    assert len(body["analysis_id"]) == 32
    assert body["verdict"] in ("likely_real", "likely_generated", "inconclusive")
    assert 0.0 <= body["probability_generated"] <= 1.0
    assert body["model_version"] == "baseline-1"
    assert body["image"] == {"width": 512, "height": 512, "format": "PNG",
                             "bytes": len(real_png)}
    assert body["regions_examined"] == 64
    assert isinstance(body["warnings"], list) and body["elapsed_ms"] > 0
    spectrum = body["spectrum"]
    assert 32 <= len(spectrum["frequencies"]) == len(spectrum["log_magnitude"]) <= 64
    assert all(0 <= f <= 1 for f in spectrum["frequencies"])
    assert "regions" in body["explanation"]
    assert body["image_stored"] is False


def test_real_texture_and_its_upsampled_copy_get_opposite_verdicts(client, real_png,
                                                                    fake_png) -> None:
    real = analyze(client, real_png).get_json()
    fake = analyze(client, fake_png).get_json()
    assert real["verdict"] == "likely_real" and real["probability_generated"] < 0.3
    assert fake["verdict"] == "likely_generated" and fake["probability_generated"] > 0.7
    assert any("does not prove" in w for w in real["warnings"])
    assert any("enlargement" in w for w in fake["warnings"])
    assert any("not been validated" in w for w in real["warnings"] + fake["warnings"])


def test_field_image_and_raw_body_are_accepted(client, real_png) -> None:
    by_field = analyze(client, real_png, field="image").get_json()
    raw = client.post(API + "/analyze", data=real_png, content_type="image/png").get_json()
    assert by_field["probability_generated"] == raw["probability_generated"]


def test_opting_in_keeps_the_image(client, real_png, tmp_path) -> None:
    body = analyze(client, real_png, store_image="true").get_json()
    assert body["image_stored"] is True
    assert len(list((tmp_path / "data" / "images").iterdir())) == 1


def test_heavy_jpeg_few_regions_and_frames_are_warned_about(client) -> None:
    jpeg = encode(pink_noise(512, seed=20, rgb=True), "JPEG", quality=30)
    warnings = analyze(client, jpeg).get_json()["warnings"]
    assert any("JPEG compression (estimated quality 30)" in w for w in warnings)
    six = analyze(client, encode(pink_noise((128, 192), seed=21))).get_json()
    assert six["regions_examined"] == 6 and six["verdict"] != "inconclusive"
    assert any("Only 6 regions" in w and "less reliable" in w for w in six["warnings"])
    three = analyze(client, encode(pink_noise((64, 192), seed=22))).get_json()
    assert three["regions_examined"] == 3 and three["verdict"] == "inconclusive"
    assert any("Only 3 region" in w for w in three["warnings"])
    frames = [pink_noise(128, seed=s).convert("P") for s in (1, 2)]
    gif = io.BytesIO()
    frames[0].save(gif, format="GIF", save_all=True, append_images=frames[1:])
    assert any("2 frames" in w for w in analyze(client, gif.getvalue()).get_json()["warnings"])


def test_tiny_and_flat_images_are_inconclusive_not_errors(client) -> None:
    tiny = analyze(client, encode(Image.new("RGB", (10, 10), "red"))).get_json()
    assert tiny["verdict"] == "inconclusive" and tiny["regions_examined"] == 0
    assert tiny["probability_generated"] is None
    assert any("smaller than 64 x 64" in w for w in tiny["warnings"])
    flat = analyze(client, encode(Image.new("L", (300, 300), 7))).get_json()
    assert flat["regions_examined"] == 0 and any("flat" in w for w in flat["warnings"])


@pytest.mark.parametrize("mode", ["RGBA", "LA", "CMYK", "I;16", "1", "P"])
def test_unusual_pixel_modes_are_analysed(client, mode) -> None:
    image = pink_noise(128, seed=23, rgb=True)
    image = image.convert("L").convert(mode) if mode in ("I;16", "1", "LA") else image.convert(
        mode)
    fmt = "TIFF" if mode in ("CMYK", "I;16") else "PNG"
    assert analyze(client, encode(image, fmt)).status_code == 200


def test_upload_errors_say_what_is_wrong(client, make_app, real_png) -> None:
    assert_error(client.post(API + "/analyze"), 400, "no file")
    assert_error(client.post(API + "/analyze", data={"other": "x"},
                             content_type="multipart/form-data"), 400, "no file")
    assert_error(analyze(client, b""), 400, "empty")
    assert_error(client.post(API + "/analyze", data=b"", content_type="image/png"), 400, "empty")
    assert_error(analyze(client, b"just some text, not a picture"), 415, "not an image")
    assert_error(analyze(client, encode(pink_noise(64, seed=1), "PPM")), 415, "PPM")
    assert_error(analyze(client, real_png[: len(real_png) // 2]), 400, "corrupt")
    assert_error(client.post(API + "/analyze", data=b'{"a": 1}',
                             content_type="application/json"), 415, "not an image upload")


def test_too_many_bytes_is_413(make_app, real_png) -> None:
    client = make_app(max_upload=10_000).test_client()
    assert_error(analyze(client, real_png), 413, "too large")
    assert_error(client.post(API + "/analyze", data=real_png, content_type="image/png"),
                 413, "too large")
    huge = b"\0" * (3 * 2**20)  # over the limit plus the multipart allowance: refused unread
    assert_error(client.post(API + "/analyze", data=huge, content_type="image/png"),
                 413, "too large")


def test_too_many_pixels_and_decompression_bombs_are_413(make_app) -> None:
    client = make_app(max_pixels=100_000).test_client()
    over = encode(Image.new("1", (400, 300)))  # 120 kpx: between the limit and twice it
    assert_error(analyze(client, over), 413, "limit is 0.1 megapixels")
    bomb = encode(Image.new("1", (2000, 2000)))  # 4 Mpx in a few hundred bytes
    assert len(bomb) < 2000
    assert_error(analyze(client, bomb), 413, "image too large")


def test_unknown_routes_methods_and_the_debugger_are_json(client) -> None:
    assert_error(client.get(API + "/nope"), 404, "not found")
    assert_error(client.get("/"), 404, "not found")
    body = assert_error(client.get(API + "/analyze"), 405, "method")
    assert "POST" in body["suggestion"]
    assert client.get(API + "/analyze").headers["Allow"].count("POST") == 1
    for path in ("/console", API + "/stats?__debugger__=yes&cmd=resource&f=style.css",
                 "/__debugger__/x", API + "/stats?x=%5F%5Fdebugger%5F%5F"):
        response = client.get(path)
        assert response.status_code == 404 and response.is_json, path


def test_an_unexpected_error_is_a_json_500_without_details(client, monkeypatch,
                                                           real_png) -> None:
    from deepfake import detector

    def explode(*_args, **_kwargs):
        raise RuntimeError("secret internal state")
    monkeypatch.setattr(detector, "analyse", explode)
    body = assert_error(analyze(client, real_png), 500, "unexpected")
    assert "secret" not in str(body)


# --- feedback --------------------------------------------------------------------------------

def test_feedback_by_analysis_id_and_duplicates(client, fake_png) -> None:
    analysis_id = analyze(client, fake_png).get_json()["analysis_id"]
    response = client.post(API + "/feedback", json={"analysis_id": analysis_id, "label": "fake"})
    assert response.status_code == 201
    body = response.get_json()
    assert body["analysis_id"] == analysis_id and body["label"] == "fake"
    assert body["duplicate"] is False and body["training_samples"] == 1
    assert body["samples_per_label"] == {"real": 0, "fake": 1}
    # the same bytes analysed again and labelled again are still one sample
    second_id = analyze(client, fake_png).get_json()["analysis_id"]
    again = client.post(API + "/feedback", json={"analysis_id": second_id, "label": "FAKE"})
    assert again.status_code == 201 and again.get_json()["duplicate"] is True
    assert again.get_json()["training_samples"] == 1
    assert again.get_json()["sample_id"] == body["sample_id"]


def test_feedback_with_a_new_image(client, real_png) -> None:
    response = client.post(API + "/feedback", data={
        "file": (io.BytesIO(real_png), "r.png"), "label": "real"},
        content_type="multipart/form-data")
    assert response.status_code == 201
    body = response.get_json()
    assert body["analysis_id"] is None and body["samples_per_label"] == {"real": 1, "fake": 0}
    raw = client.post(API + "/feedback?label=real", data=real_png, content_type="image/png")
    assert raw.status_code == 201 and raw.get_json()["duplicate"] is True


def test_feedback_errors(client, real_png) -> None:
    assert_error(client.post(API + "/feedback", json={"analysis_id": "f" * 32, "label": "real"}),
                 404, "no analysis")
    analysis_id = analyze(client, real_png).get_json()["analysis_id"]
    assert_error(client.post(API + "/feedback", json={"analysis_id": analysis_id,
                                                      "label": "deepfake"}), 400, "label")
    assert_error(client.post(API + "/feedback", json={"analysis_id": analysis_id}), 400,
                 "label")
    assert_error(client.post(API + "/feedback", json={"label": "real"}), 400, "analysis_id")
    assert_error(client.post(API + "/feedback", data=b"not json", content_type="text/plain"),
                 400, "label")
    tiny = encode(Image.new("L", (32, 32)))
    assert_error(client.post(API + "/feedback?label=real", data=tiny, content_type="image/png"),
                 422, "too small")
    assert_error(client.post(API + "/feedback?label=real", data=b"zzz",
                             content_type="image/png"), 415, "not an image")


# --- stats -----------------------------------------------------------------------------------

def test_stats_meets_the_health_contract_and_says_what_it_can_do(client, real_png) -> None:
    body = client.get(API + "/stats").get_json()
    assert isinstance(body["training_samples"], int) and body["training_samples"] == 0
    assert body["model_loaded"] is True
    datetime.datetime.strptime(body["last_updated"], "%Y-%m-%dT%H:%M:%SZ")
    assert body["samples_per_label"] == {"real": 0, "fake": 0}
    model = body["model"]
    assert model["version"] == "baseline-1" and model["source"] == "baseline"
    assert 0.5 < model["metrics"]["accuracy"] <= 1
    assert "up-sampling" in body["capabilities"] and "not been validated" in body["capabilities"]
    assert body["retrain"]["running"] is False
    client.post(API + "/feedback?label=real", data=real_png, content_type="image/png")
    after = client.get(API + "/stats").get_json()
    assert after["training_samples"] == 1 and after["last_updated"] > body["last_updated"]


def test_stats_without_any_model(make_app, monkeypatch, tmp_path) -> None:
    from deepfake import model as model_module
    monkeypatch.setattr(model_module, "BASELINE_PATH", str(tmp_path / "none.json"))
    monkeypatch.setattr(model_module.ModelFiles.__init__, "__defaults__",
                        (str(tmp_path / "none.json"),))
    client = make_app().test_client()
    body = client.get(API + "/stats").get_json()
    assert body["model_loaded"] is False and body["model"] is None
    result = analyze(client, encode(pink_noise(256, seed=3))).get_json()
    assert result["verdict"] == "inconclusive" and result["probability_generated"] is None
    assert any("No detection model" in w for w in result["warnings"])


# --- retrain ---------------------------------------------------------------------------------

def label_images(client, count: int) -> None:
    for seed in range(count):
        real = encode(pink_noise(256, seed=100 + seed))
        fake = encode(nearest_upsampled(pink_noise(256, seed=200 + seed)))
        for data, label in ((real, "real"), (fake, "fake")):
            response = client.post(API + "/feedback?label=" + label, data=data,
                                   content_type="image/png")
            assert response.status_code == 201


def test_retrain_needs_enough_samples_of_each_label(client) -> None:
    body = assert_error(client.post(API + "/retrain"), 409, "not enough")
    assert body["needed"] == {"real": 2, "fake": 2}
    label_images(client, 1)
    body = assert_error(client.post(API + "/retrain"), 409, "not enough")
    assert body["needed"] == {"real": 1, "fake": 1}


@pytest.mark.timeout(90)
def test_retrain_validates_and_replaces_only_if_no_worse(client, app, fake_png) -> None:
    label_images(client, 3)
    response = client.post(API + "/retrain")
    assert response.status_code == 200, response.get_data(as_text=True)
    body = response.get_json()
    assert set(body) == {"replaced", "model_version", "metrics", "previous_metrics", "reason"}
    metrics = body["metrics"]
    assert metrics["n_images"] == 114 + 6 and "feedback_accuracy" in metrics
    assert "baseline_accuracy" in metrics and "grouped" in metrics["validation"]
    assert "feedback_accuracy" in body["previous_metrics"]
    stats = client.get(API + "/stats").get_json()
    if body["replaced"]:
        assert body["model_version"].startswith("retrained-")
        assert stats["model"]["version"] == body["model_version"]
        assert stats["model"]["source"] == "current"
        models = app.extensions["deepfake"].models.files
        assert models.load_active()[0].version == body["model_version"]
        # it still works, and with feedback in its training the simulated-only warning is gone
        result = analyze(client, fake_png).get_json()
        assert result["model_version"] == body["model_version"]
        assert not any("simulated generator" in w for w in result["warnings"])
    else:
        assert stats["model"]["version"] == "baseline-1" and "kept" in body["reason"]


def test_a_second_retrain_is_refused_and_analyze_is_not_blocked(client, app, real_png) -> None:
    retrainer = app.extensions["deepfake"].retrainer
    started, release = threading.Event(), threading.Event()

    def slow_run():
        started.set()
        release.wait(10)
        return {"replaced": False, "model_version": "baseline-1", "metrics": {},
                "previous_metrics": {}, "reason": "test"}
    retrainer._run = slow_run
    results = []
    worker = threading.Thread(target=lambda: results.append(
        app.test_client().post(API + "/retrain").status_code))
    worker.start()
    try:
        assert started.wait(10)
        assert_error(client.post(API + "/retrain"), 409, "already running")
        assert client.get(API + "/stats").get_json()["retrain"]["running"] is True
        assert analyze(client, real_png).status_code == 200  # while the retrain holds its lock
    finally:
        release.set()
        worker.join(10)
    assert results == [200]
    assert client.get(API + "/stats").get_json()["retrain"]["running"] is False


def test_a_worse_candidate_does_not_replace_the_model(client, app, monkeypatch) -> None:
    from deepfake import training

    label_images(client, 2)
    real_validate = training.validate

    def worse(data):
        metrics, logits = real_validate(data)
        return dict(metrics, baseline_accuracy=metrics["baseline_accuracy"] - 0.2), logits
    monkeypatch.setattr(training, "validate", worse)
    body = client.post(API + "/retrain").get_json()
    assert body["replaced"] is False and body["model_version"] == "baseline-1"
    assert "kept the current model: on baseline images" in body["reason"]
    files = app.extensions["deepfake"].models.files
    assert not os.path.exists(files.current)
    assert client.get(API + "/stats").get_json()["model"]["version"] == "baseline-1"


@pytest.mark.parametrize("body,words", [
    ("{not json", "not valid JSON"),
    ("", "not valid JSON (it is empty)"),
    ("[1, 2, 3]", "a list, not an object"),
    ('"real"', "a string, not an object"),
])
def test_feedback_with_a_json_body_that_is_not_an_object_says_so(client, body, words) -> None:
    response = client.post("/api/deepfake/feedback", data=body, content_type="application/json")
    payload = assert_error(response, 400, words)
    assert payload["error"] == "Invalid JSON body"
    assert '{"analysis_id"' in payload["suggestion"] and "label" in payload["suggestion"]


def test_errors_are_compact_json_with_the_gateways_words_even_in_debug_mode(client) -> None:
    client.application.debug = True
    response = client.get("/api/deepfake/nope")
    assert response.status_code == 404 and b"\n  " not in response.data
    payload = assert_error(response, 404, "The service has no route for /api/deepfake/nope.")
    assert set(payload) == {"error", "message", "suggestion", "timestamp"}
    response = client.get("/api/deepfake/analyze")
    assert_error(response, 405, "GET is not allowed on /api/deepfake/analyze")
    assert "POST" in response.headers["Allow"]
