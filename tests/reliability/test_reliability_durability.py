"""Feedback written while a retrain runs and while the child is SIGKILLed: every acknowledged
(201) sample survives the restart, and the killed retrain leaves the previous model loaded and
the stored model versions intact."""
from __future__ import annotations

import hashlib
import http.client
import os
import signal
import sqlite3
import threading
import time

import pytest

from rel_helpers import encode, multipart, noise_image, wait_until

pytestmark = pytest.mark.integration


def stored_models(data_dir: str) -> dict:
    """Every stored model version (id -> version, digest of its JSON) and the current one."""
    path = os.path.join(data_dir, "deepfake.sqlite3")
    with sqlite3.connect("file:%s?mode=ro" % path, uri=True) as db:
        versions = {row[0]: (row[1], row[2]) for row in
                    db.execute("SELECT model_id, version, digest FROM models")}
        current = db.execute("SELECT model_id FROM current_model").fetchone()
    return {"versions": versions, "current": current[0] if current else None}


def post_feedback(gw, image: bytes, label: str, timeout: float = 10.0):
    body, ctype = multipart({"label": label}, {"file": ("x.png", image, "image/png")})
    return gw.request("POST", "/api/deepfake/feedback", body, {"Content-Type": ctype},
                      timeout=timeout)


@pytest.mark.timeout(90)
def test_acknowledged_feedback_and_the_model_survive_a_kill_during_retrain(gateways):
    gw = gateways(["--auto-restart", "1", "--health-interval", "200"],
                  env={"DEEPFAKE_MIN_FEEDBACK_PER_LABEL": "2"})
    images = [encode(noise_image(96, seed)) for seed in range(400)]
    acked: dict = {}  # sha256 -> label, for every 201
    for i in range(4):
        resp = post_feedback(gw, images[i], "real" if i % 2 else "fake")
        assert resp.status == 201, resp
        acked[hashlib.sha256(images[i]).hexdigest()] = "real" if i % 2 else "fake"

    # a first, complete retrain: the model it installs is the "previous model" below
    first = gw.request("POST", "/api/deepfake/retrain", b"", timeout=60)
    assert first.status == 200, first
    before = gw.get("/api/deepfake/stats").json()["model"]
    models_before = stored_models(gw.data_dir)
    assert len(models_before["versions"]) == 2, "the first retrain promoted no model"

    retrain_result: dict = {}

    def retrain() -> None:
        try:
            retrain_result["resp"] = gw.request("POST", "/api/deepfake/retrain", b"", timeout=30)
        except OSError as exc:
            retrain_result["error"] = exc

    stop = threading.Event()
    lock = threading.Lock()
    outcomes = []
    next_image = iter(range(4, len(images)))

    def writer() -> None:
        while not stop.is_set():
            with lock:
                i = next(next_image, None)
            if i is None:
                return
            label = "real" if i % 2 else "fake"
            try:
                resp = post_feedback(gw, images[i], label, timeout=10)
            except (OSError, http.client.HTTPException) as exc:
                outcomes.append(type(exc).__name__)  # the connection died with the child
                continue
            outcomes.append(resp.status if resp.status in (201, 502, 503) else resp)
            if resp.status == 201:
                with lock:
                    acked[hashlib.sha256(images[i]).hexdigest()] = label

    child = gw.child_pid()
    writers = [threading.Thread(target=writer) for _ in range(3)]
    for t in writers:  # feedback lands before, during and after the retrain
        t.start()
    wait_until(lambda: outcomes.count(201) >= 5, 15, "feedback to flow before the retrain")
    # A retrain takes ~0.1 s once scikit-learn is imported: kill the child the moment it is
    # seen running. If it finished first (its answer came back), that retrain's model is the
    # new "previous model" and the next attempt tries again.
    for attempt in range(10):
        before = gw.get("/api/deepfake/stats").json()["model"]
        models_before = stored_models(gw.data_dir)
        retrain_result.clear()
        trainer = threading.Thread(target=retrain)
        trainer.start()
        while trainer.is_alive():
            if gw.get("/api/deepfake/stats").json()["retrain"]["running"]:
                break
        if trainer.is_alive():
            os.kill(child, signal.SIGKILL)
            break
        assert retrain_result["resp"].status == 200, retrain_result
    else:
        pytest.fail("every retrain finished before the gateway saw it running")
    time.sleep(1.0)  # feedback goes on while the child is dead / restarting
    stop.set()
    for t in writers:
        t.join(15)
    trainer.join(30)
    assert retrain_result.get("resp") is None or retrain_result["resp"].status in (502, 503), \
        retrain_result
    assert outcomes.count(201) >= 5, outcomes
    # nothing but successes, the gateway's 502/503 and connections cut by the kill
    assert all(o in (201, 502, 503) or isinstance(o, str) for o in outcomes), outcomes

    service = gw.wait_state("ready", timeout=20)
    assert service["restarts"] == 1 and service["last_exit"]["signal"] == "SIGKILL"

    # every acknowledged sample is stored, with its label
    with sqlite3.connect("file:%s?mode=ro" % os.path.join(gw.data_dir, "deepfake.sqlite3"),
                         uri=True) as db:
        stored = dict(db.execute("SELECT image_sha256, label FROM samples"))
    missing = {sha: label for sha, label in acked.items() if stored.get(sha) != label}
    assert not missing, "%d acknowledged samples lost" % len(missing)
    stats = gw.get("/api/deepfake/stats").json()
    assert stats["training_samples"] == len(stored) >= len(acked)

    # the killed retrain left the previous model current and the stored versions untouched
    assert stats["model"]["version"] == before["version"]
    assert stats["model"]["source"] == before["source"]
    assert stored_models(gw.data_dir) == models_before
    assert models_before["versions"][models_before["current"]][0] == before["version"]
    analysed = gw.request("POST", "/api/deepfake/analyze", encode(noise_image(128, 999)),
                          {"Content-Type": "image/png"})
    assert analysed.status == 200 and analysed.json()["model_version"] == before["version"]
    assert gw.interrupt() == 0
