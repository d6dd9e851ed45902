"""Several workers on one data directory: one model, shared feedback, one retrain at a time.

Two apps built on the same data directory in one process stand for two worker processes:
they share nothing in memory but what a process would share (this module's code), only the
store. What needs separate processes (PIDs, SIGKILL) is in test_service_process.py.
"""
from __future__ import annotations

import io
import logging
import os
import re
import sqlite3
import subprocess
import sys
import threading
import time
from dataclasses import replace

import pytest

from service_images import encode, nearest_upsampled, pink_noise
from deepfake import processes, retrain, store as store_module
from deepfake.model import BASELINE_PATH, StoredModels, read_model
from deepfake.retrain import ModelHolder
from deepfake.store import RetrainLocked, Store

API = "/api/deepfake"


@pytest.fixture
def workers(make_app):
    """Two apps ("workers") on one data directory, and their test clients."""
    apps = [make_app(), make_app()]
    return apps, [app.test_client() for app in apps]


def analyze(client, data: bytes) -> dict:
    response = client.post(API + "/analyze", data={"file": (io.BytesIO(data), "x.png")},
                           content_type="multipart/form-data")
    assert response.status_code == 200, response.get_data(as_text=True)
    return response.get_json()


def label_images(client, count: int, first_seed: int = 100) -> None:
    """``count`` distinct images of each label, as feedback through ``client``."""
    for seed in range(first_seed, first_seed + count):
        real = encode(pink_noise(256, seed=seed))
        fake = encode(nearest_upsampled(pink_noise(256, seed=seed + 1000)))
        for data, label in ((real, "real"), (fake, "fake")):
            response = client.post(API + "/feedback?label=" + label, data=data,
                                   content_type="image/png")
            assert response.status_code == 201, response.get_data(as_text=True)


def retrained(client) -> dict:
    response = client.post(API + "/retrain")
    assert response.status_code == 200, response.get_data(as_text=True)
    body = response.get_json()
    # these seeded images are separable: the candidate always beats the baseline on them
    assert body["replaced"] is True, body["reason"]
    return body


def data_dir(app) -> str:
    return app.extensions["deepfake"].config.data_dir


def install_elsewhere(directory: str, version: str, **changes) -> None:
    """Promote the baseline's weights as ``version``, as another worker would."""
    store = Store(directory)
    try:
        store.promote_model(replace(read_model(BASELINE_PATH), version=version,
                                    **changes).to_json(), "retrained")
    finally:
        store.close()


def current_version(app) -> str:
    store = app.extensions["deepfake"].store
    return store.model(store.current_model_id()).version


def dead_pid() -> int:
    """The PID of a process that has exited (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def write_lock_row(path: str, pid: int, process_started, host: str, started_at: str,
                   token: str = "f" * 32) -> None:
    with sqlite3.connect(path) as conn:
        conn.execute("INSERT OR REPLACE INTO retrain_lock VALUES (1, ?, ?, ?, ?, ?)",
                     (token, pid, process_started, host, started_at))


# --- one model for all workers ---------------------------------------------------------------

@pytest.mark.timeout(90)
def test_a_model_installed_by_one_worker_answers_on_the_other_at_once(workers, real_png):
    (_, _), (a, b) = workers
    assert analyze(b, real_png)["model_version"] == "baseline-1"  # b has loaded its model
    label_images(a, 2)
    body = retrained(a)
    version = body["model_version"]
    assert re.fullmatch(r"retrained-\d{8}T\d{6}\.\d{3}Z-[0-9a-f]{12}", version)
    # the very next requests on b, with no wait: stats, analyze and feedback name it
    stats = b.get(API + "/stats").get_json()
    assert (stats["model"]["version"], stats["model"]["source"]) == (version, "current")
    assert stats["model"]["metrics"] == body["metrics"]
    result = analyze(b, real_png)
    assert result["model_version"] == version
    assert any("not been validated on images from real generators" in w
               for w in result["warnings"])  # user labels validate nothing about generators
    labelled = b.post(API + "/feedback", json={"analysis_id": result["analysis_id"],
                                               "label": "real"})
    assert labelled.status_code == 201 and labelled.get_json()["model_version"] == version


def test_feedback_and_analyses_from_one_worker_are_seen_by_the_other(workers, real_png,
                                                                     fake_png) -> None:
    (_, _), (a, b) = workers
    analysis_id = analyze(a, fake_png)["analysis_id"]
    labelled = b.post(API + "/feedback", json={"analysis_id": analysis_id, "label": "fake"})
    assert labelled.status_code == 201, labelled.get_data(as_text=True)
    assert labelled.get_json()["samples_per_label"] == {"real": 0, "fake": 1}
    assert labelled.get_json()["model_version"] == "baseline-1"
    assert a.get(API + "/stats").get_json()["samples_per_label"] == {"real": 0, "fake": 1}
    assert a.post(API + "/feedback?label=real", data=real_png,
                  content_type="image/png").status_code == 201
    stats = b.get(API + "/stats").get_json()
    assert stats["samples_per_label"] == {"real": 1, "fake": 1}
    # the same image labelled through the other worker is still one sample
    again = b.post(API + "/feedback?label=fake", data=real_png, content_type="image/png")
    assert again.get_json()["duplicate"] is True
    assert a.get(API + "/stats").get_json()["samples_per_label"] == {"real": 0, "fake": 2}


@pytest.mark.timeout(120)
def test_a_retrain_on_the_other_worker_compares_against_the_newest_model(workers) -> None:
    (_, app_b), (a, b) = workers
    b.get(API + "/stats")  # b has the baseline in memory, and gets no request until its retrain
    label_images(a, 2)
    first = retrained(a)
    label_images(a, 1, first_seed=300)
    second = b.post(API + "/retrain").get_json()
    # b judged its candidate against a's model, not against the baseline it last served:
    # a's recipe (the 4 labels it learnt) on the same split, and only 2 labels are new
    assert first["model_version"] in second["previous_metrics"]["recipe"]
    assert "the 4 feedback labels it learnt" in second["previous_metrics"]["recipe"]
    assert second["learnt"]["new_labels"] == 2
    assert second["previous_metrics"]["n_images"] == second["metrics"]["n_images"]
    versions = [v for _, v, _, _ in app_b.extensions["deepfake"].store.model_versions()]
    if second["replaced"]:
        assert second["model_version"] != first["model_version"]
        assert versions[-2:] == [first["model_version"], second["model_version"]]
    else:
        assert second["model_version"] == first["model_version"]
    assert current_version(app_b) == second["model_version"]
    assert a.get(API + "/stats").get_json()["model"]["version"] == second["model_version"]


def test_model_versions_are_unique_within_a_millisecond() -> None:
    versions = [retrain.new_version() for _ in range(2000)]
    assert len(set(versions)) == len(versions)
    assert all(v.startswith("retrained-") and v.endswith(tuple("0123456789abcdef"))
               for v in versions)


# --- the holder follows the store's current version -----------------------------------------

def counting_loads(monkeypatch, files: StoredModels) -> list:
    calls = []
    real = files.load_active

    def load_active():
        calls.append(1)
        return real()
    monkeypatch.setattr(files, "load_active", load_active)
    return calls


def test_the_holder_reloads_once_per_change_however_many_threads_ask(tmp_path,
                                                                   monkeypatch) -> None:
    files = StoredModels(Store(str(tmp_path)), str(tmp_path))
    holder = ModelHolder(files)
    loads = counting_loads(monkeypatch, files)
    for _ in range(50):
        assert holder.current().version == "baseline-1"
    assert loads == []  # unchanged: the pointer read, no model read
    install_elsewhere(str(tmp_path), "other-1")
    barrier = threading.Barrier(8)
    seen = []

    def ask() -> None:
        barrier.wait()
        seen.append(holder.current().version)
    threads = [threading.Thread(target=ask) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert seen == ["other-1"] * 8
    assert len(loads) == 1
    assert holder.current().source == "current" and len(loads) == 1


def test_an_unusable_stored_model_falls_back_once_not_on_every_request(workers, caplog) -> None:
    (app_a, _), (a, b) = workers
    install_elsewhere(data_dir(app_a), "first-1")
    for client in (a, b):
        assert client.get(API + "/stats").get_json()["model"]["version"] == "first-1"
    # a version promoted by a replica running other code (features this code cannot compute)
    install_elsewhere(data_dir(app_a), "other-features-1", feature_version="features-v0")
    caplog.set_level(logging.WARNING, logger="deepfake.model")
    for client in (a, b) * 10:
        model = client.get(API + "/stats").get_json()["model"]
        assert (model["version"], model["source"]) == ("baseline-1", "baseline")
    skipped = [r for r in caplog.records if "skipping current model" in r.getMessage()]
    assert len(skipped) == 2  # once per worker, not once per request
    install_elsewhere(data_dir(app_a), "third-1")  # a model promoted afterwards is used again
    for client in (a, b):
        model = client.get(API + "/stats").get_json()["model"]
        assert (model["version"], model["source"]) == ("third-1", "current")


# --- the retrain lock in the store -----------------------------------------------------------

def test_the_retrain_lock_has_one_holder_and_names_it(tmp_path) -> None:
    one, two = Store(str(tmp_path)), Store(str(tmp_path))
    token = one.acquire_retrain_lock()
    with pytest.raises(RetrainLocked) as refused:
        two.acquire_retrain_lock()
    holder = refused.value.holder
    assert holder.pid == os.getpid() and holder.started_at.endswith("Z")
    assert "process %d on " % os.getpid() in str(refused.value)
    assert two.retrain_lock_holder() == holder
    one.release_retrain_lock(token)
    assert two.retrain_lock_holder() is None
    two.release_retrain_lock(two.acquire_retrain_lock())


@pytest.mark.parametrize("case", ["dead pid", "reused pid", "release failed"])
def test_a_stale_retrain_lock_is_taken_over(tmp_path, case, caplog) -> None:
    store = Store(str(tmp_path))
    me = processes.start_time()
    pid, started = {"dead pid": (dead_pid(), None),
                    "reused pid": (os.getpid(), me - 60),  # this PID, an older process
                    "release failed": (os.getpid(), me)}[case]
    write_lock_row(store.path, pid, started, store_module._HOST, store_module.utc_now())
    assert store.retrain_lock_holder() is None
    with caplog.at_level(logging.WARNING, logger="deepfake.store"):
        token = store.acquire_retrain_lock()
    assert "taking over the retrain lock of process %d" % pid in caplog.text
    assert store.retrain_lock_holder().token == token
    store.release_retrain_lock(token)


def test_a_lock_from_another_host_is_trusted_until_it_expires(tmp_path) -> None:
    store = Store(str(tmp_path))
    write_lock_row(store.path, dead_pid(), None, "elsewhere", store_module.utc_now())
    with pytest.raises(RetrainLocked):  # its PID means nothing here
        store.acquire_retrain_lock()
    write_lock_row(store.path, 1, None, "elsewhere", "2001-01-01T00:00:00.000Z")
    store.release_retrain_lock(store.acquire_retrain_lock())


def test_a_release_leaves_a_lock_taken_over_since_alone(tmp_path) -> None:
    store = Store(str(tmp_path))
    token = store.acquire_retrain_lock()
    parent = os.getppid()  # alive: stands for a worker that took the lock over
    write_lock_row(store.path, parent, processes.start_time(parent), store_module._HOST,
                   store_module.utc_now(), token="e" * 32)
    store.release_retrain_lock(token)
    assert store.retrain_lock_holder().pid == parent


# --- retrain across workers ------------------------------------------------------------------

def test_a_retrain_on_one_worker_refuses_one_on_the_other_and_says_whose(workers) -> None:
    (app_a, _), (a, b) = workers
    lock = app_a.extensions["deepfake"].store
    token = lock.acquire_retrain_lock()
    try:
        refused = b.post(API + "/retrain")
        assert refused.status_code == 409
        body = refused.get_json()
        assert body["error"] == "Retrain already running"
        assert "process %d on " % os.getpid() in body["message"]
        assert body["holder"]["pid"] == os.getpid()
        status = b.get(API + "/stats").get_json()["retrain"]
        assert status["running"] is True and status["holder"] == body["holder"]
    finally:
        lock.release_retrain_lock(token)
    status = b.get(API + "/stats").get_json()["retrain"]
    assert status["running"] is False and status["holder"] is None


@pytest.mark.timeout(90)
def test_the_lock_is_released_when_training_fails(workers, monkeypatch) -> None:
    (app_a, _), (a, b) = workers
    from deepfake import training

    label_images(a, 2)

    def broken(_data):
        raise RuntimeError("out of memory, say")
    monkeypatch.setattr(training, "heldout_pair", broken)
    assert a.post(API + "/retrain").status_code == 500
    assert app_a.extensions["deepfake"].store.retrain_lock_holder() is None
    monkeypatch.undo()
    retrained(b)


@pytest.mark.timeout(120)
def test_two_retrains_at_the_same_moment_on_two_workers(workers, monkeypatch) -> None:
    (app_a, _), (a, b) = workers
    from deepfake import training

    label_images(a, 2)
    statuses: list = []
    real_validate = training.validate

    def validate_after_the_other_answered(data):
        # the winner trains only once the other request has its answer: were both let in,
        # both would wait here for the 10 s and the statuses would be [200, 200]
        deadline = time.monotonic() + 10
        while not statuses and time.monotonic() < deadline:
            time.sleep(0.01)
        return real_validate(data)
    monkeypatch.setattr(training, "validate", validate_after_the_other_answered)

    barrier = threading.Barrier(3)
    answers: dict = {}

    def retrain_on(name, client) -> None:
        barrier.wait()
        response = client.post(API + "/retrain")
        answers[name] = response.get_json()
        statuses.append(response.status_code)

    acked = []

    def label_meanwhile() -> None:  # feedback keeps arriving on both workers during it all
        barrier.wait()
        for seed in range(500, 506):
            client = (a, b)[seed % 2]
            data = encode(pink_noise(128, seed=seed))
            if client.post(API + "/feedback?label=real", data=data,
                           content_type="image/png").status_code == 201:
                acked.append(seed)
    threads = [threading.Thread(target=retrain_on, args=("a", a)),
               threading.Thread(target=retrain_on, args=("b", b)),
               threading.Thread(target=label_meanwhile)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert sorted(statuses) == [200, 409], answers
    winner = next(body for body in answers.values() if "replaced" in body)
    loser = next(body for body in answers.values() if "replaced" not in body)
    assert loser["error"] == "Retrain already running"
    assert current_version(app_a) == winner["model_version"]
    # one retrain promoted one version: the bundled seed, then the winner's
    assert [(v, src) for _, v, src, _ in app_a.extensions["deepfake"].store.model_versions()] \
        == [("baseline-1", "bundled"), (winner["model_version"], "retrained")]
    assert len(acked) == 6
    for client in (a, b):
        stats = client.get(API + "/stats").get_json()
        assert stats["samples_per_label"] == {"real": 2 + 6, "fake": 2}
        assert stats["model"]["version"] == winner["model_version"]
        assert stats["retrain"]["running"] is False
