"""The store on both engines (SQLite, and a real PostgreSQL cluster): round trips,
duplicates, surviving a kill mid-write; SQLite's WAL and upgrades of old data directories."""
from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time

import numpy as np
import pytest

from service_images import PYTHON_DIR
from deepfake import features
from deepfake.store import ImageRecord, Store


@pytest.fixture(params=["sqlite", "postgresql"])
def open_store(request, tmp_path):
    """Store(...) on the engine of this run of the test; every store it opened is closed."""
    url = None if request.param == "sqlite" else request.getfixturevalue("postgres_url")
    opened = []

    def make() -> Store:
        store = Store(str(tmp_path), url)
        opened.append(store)
        return store
    make.url = url  # type: ignore[attr-defined]
    yield make
    for store in opened:
        store.close()


def record(seed: int, crops: int = 3) -> ImageRecord:
    rng = np.random.default_rng(seed)
    vectors = rng.normal(size=(crops, features.N_FEATURES)).astype(np.float32)
    return ImageRecord("%064x" % seed, 640, 480, "JPEG", 12345, vectors)


def test_analysis_round_trip_keeps_features_exactly(open_store) -> None:
    store = open_store()
    rec = record(1)
    store.add_analysis("a1", rec, 0.25, "likely_real", "baseline-1")
    got, image_path = store.get_analysis("a1")
    assert image_path is None
    assert (got.sha256, got.width, got.height, got.format, got.bytes) == (
        rec.sha256, 640, 480, "JPEG", 12345)
    assert np.array_equal(got.vectors, rec.vectors)
    assert store.get_analysis("missing") is None


def test_same_image_is_one_sample_and_its_label_can_change(open_store) -> None:
    store = open_store()
    first = store.add_sample(record(1), "fake", "a1")
    again = store.add_sample(record(1), "real")
    other = store.add_sample(record(2), "fake")
    assert not first.duplicate and again.duplicate and not other.duplicate
    assert again.sample_id == first.sample_id
    assert store.counts() == {"real": 1, "fake": 1}
    assert [(label, v.shape) for _, label, v, _ in store.samples()] == [
        ("real", (3, features.N_FEATURES)), ("fake", (3, features.N_FEATURES))]
    assert store.last_sample_time().endswith("Z")
    with pytest.raises(ValueError):
        store.add_sample(record(3), "maybe")


def test_database_is_in_wal_mode_and_persists(tmp_path) -> None:
    Store(str(tmp_path)).add_sample(record(1), "real")
    with sqlite3.connect(os.path.join(tmp_path, "deepfake.sqlite3")) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert Store(str(tmp_path)).counts() == {"real": 1, "fake": 0}


def test_images_are_kept_only_on_request(open_store) -> None:
    store = open_store()
    path = store.keep_image(record(1), b"\xff\xd8data")
    assert open(path, "rb").read() == b"\xff\xd8data"
    assert os.listdir(store.images_dir) == [os.path.basename(path)]


WRITER = r"""
import sys, numpy as np
sys.path.insert(0, sys.argv[1])
from deepfake import features
from deepfake.store import ImageRecord, Store
store = Store(sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else None)
i = 0
while True:
    vec = np.full((4, features.N_FEATURES), i, np.float32)
    store.add_sample(ImageRecord("%064x" % i, 8, 8, "PNG", 1, vec), "real" if i % 2 else "fake")
    print(i, flush=True)
    i += 1
"""


@pytest.mark.timeout(60)
def test_a_process_killed_mid_write_loses_no_committed_sample(open_store, tmp_path) -> None:
    proc = subprocess.Popen([sys.executable, "-c", WRITER, PYTHON_DIR, str(tmp_path)]
                            + ([open_store.url] if open_store.url else []),
                            stdout=subprocess.PIPE, text=True)
    try:
        last = -1
        deadline = time.monotonic() + 30
        while last < 40 and time.monotonic() < deadline:
            last = int(proc.stdout.readline())
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()
    store = open_store()
    if store.engine == "sqlite":
        with sqlite3.connect(store.path) as conn:
            assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    samples = store.samples()
    assert len(samples) >= last + 1  # every sample reported as committed is there
    for index, (sha, _, vectors, _) in enumerate(samples):  # and each one is whole
        assert int(sha, 16) == index and np.all(vectors == index)


OPENER = r"""
import sys, time
sys.path.insert(0, sys.argv[1])
from deepfake.store import Store
start = float(sys.argv[2])
for i, directory in enumerate(sys.argv[3:]):
    while time.time() < start + 0.05 * i:
        pass
    Store(directory)
"""


@pytest.mark.timeout(60)
def test_workers_opening_a_new_data_directory_at_once_all_start(tmp_path) -> None:
    # the gateway starts its workers together; on a new data directory they all create the
    # database and switch it to WAL at the same moment (20 directories: 20 such moments)
    directories = [str(tmp_path / ("data%d" % i)) for i in range(20)]
    start = time.time() + 1.5  # once every process has imported numpy
    workers = [subprocess.Popen([sys.executable, "-c", OPENER, PYTHON_DIR, str(start)]
                                + directories, stderr=subprocess.PIPE, text=True)
               for _ in range(4)]
    errors = [worker.communicate(timeout=50)[1] for worker in workers]
    assert [worker.returncode for worker in workers] == [0] * 4, "\n".join(errors)
    for directory in directories:
        with sqlite3.connect(os.path.join(directory, "deepfake.sqlite3")) as conn:
            assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_a_data_directory_from_before_perceptual_hashes_gets_the_column(tmp_path) -> None:
    """An old database (no near_hash column) is upgraded in place; its rows read as unhashed."""
    import sqlite3

    from deepfake.database import MIGRATIONS

    old_schema = MIGRATIONS[0].sqlite  # the schema of data directories from before versions
    assert "near_hash" not in old_schema
    path = tmp_path / "deepfake.sqlite3"
    with sqlite3.connect(str(path)) as conn:
        conn.executescript(old_schema)
        conn.execute("INSERT INTO samples (image_sha256, label, created_at, updated_at, width,"
                     " height, format, bytes, feature_version, n_crops, features) VALUES"
                     " ('ab', 'real', 't', 't', 1, 1, 'PNG', 1, ?, 1, ?)",
                     (features.FEATURE_VERSION,
                      np.zeros((1, features.N_FEATURES), "<f4").tobytes()))
    store = Store(str(tmp_path))
    [(sha, label, vectors, near)] = store.samples()
    assert (sha, label, vectors.shape, near) == ("ab", "real", (1, features.N_FEATURES), None)
    store.add_sample(record(3), "fake")
    assert len(store.samples()) == 2


def test_two_replicas_labelling_one_image_at_once_make_one_sample(open_store) -> None:
    import threading

    stores = [open_store() for _ in range(4)]
    results, errors = [], []

    def label(store, i):
        try:
            results.append(store.add_sample(record(7), "fake" if i % 2 else "real"))
        except Exception as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=label, args=(stores[i % 4], i)) for i in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert errors == []
    assert sum(not r.duplicate for r in results) == 1
    assert len({r.sample_id for r in results}) == 1
    assert sum(stores[0].counts().values()) == 1


def test_an_analysis_made_on_one_replica_is_found_on_another(open_store) -> None:
    one, other = open_store(), open_store()
    one.add_analysis("from-one", record(5), 0.5, "inconclusive", "v1")
    found, _ = other.get_analysis("from-one")
    assert found.sha256 == record(5).sha256


# --- model versions in the store -------------------------------------------------------------

def _payload(version: str, feature_version: str = features.FEATURE_VERSION) -> dict:
    from dataclasses import replace

    from deepfake.model import BASELINE_PATH, read_model
    return replace(read_model(BASELINE_PATH), version=version,
                   feature_version=feature_version).to_json()


def test_an_empty_store_is_seeded_with_the_bundled_baseline_once(open_store, tmp_path) -> None:
    import threading

    from deepfake.model import StoredModels

    stores = [open_store() for _ in range(4)]
    threads = [threading.Thread(target=StoredModels, args=(s, str(tmp_path))) for s in stores]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert [(v, src) for _, v, src, _ in stores[0].model_versions()] == [("baseline-1", "bundled")]
    model, source = StoredModels(stores[0], str(tmp_path)).load_active()
    assert (model.version, source) == ("baseline-1", "baseline")


def test_promotion_moves_the_pointer_and_keeps_every_version(open_store, tmp_path) -> None:
    from deepfake.model import StoredModels

    store = open_store()
    models = StoredModels(store, str(tmp_path))
    seeded = store.current_model_id()
    other = open_store()
    first = other.promote_model(_payload("r-1"), "retrained")
    assert store.current_model_id() == first != seeded  # the other replica sees it at once
    second = other.promote_model(_payload("r-2"), "retrained")
    assert [v for _, v, _, _ in store.model_versions()] == ["baseline-1", "r-1", "r-2"]
    assert store.model(second).promoted_at is not None and store.model(first).promoted_at is None
    assert models.load_active()[0].version == "r-2"
    StoredModels(open_store(), str(tmp_path))  # a restart seeds nothing over a retrained model
    assert store.current_model_id() == second


def test_a_new_bundled_baseline_replaces_the_old_one_but_never_a_retrained_model(
        open_store, tmp_path) -> None:
    store = open_store()
    old = store.seed_model(_payload("baseline-0"), "bundled", replace_source="bundled")
    from deepfake.model import StoredModels
    StoredModels(store, str(tmp_path))  # this code's baseline differs: it becomes current
    assert store.current_model_id() != old
    assert store.model(store.current_model_id()).version == "baseline-1"
    retrained = store.promote_model(_payload("r-1"), "retrained")
    StoredModels(store, str(tmp_path))
    assert store.current_model_id() == retrained


def test_a_data_directory_from_before_stored_models_keeps_its_model(tmp_path) -> None:
    from deepfake.model import ModelFiles, StoredModels, read_model
    from deepfake.model import BASELINE_PATH
    from dataclasses import replace

    ModelFiles(str(tmp_path)).install(replace(read_model(BASELINE_PATH), version="r-old"))
    store = Store(str(tmp_path))
    model, source = StoredModels(store, str(tmp_path)).load_active()
    assert (model.version, source) == ("r-old", "current")
    assert [(v, src) for _, v, src, _ in store.model_versions()] == [("r-old", "imported")]
    store.close()


# --- the retrain lock on PostgreSQL: one retrain across replicas -------------------------------

def test_postgres_retrain_lock_has_one_holder_across_replicas(postgres_url, tmp_path) -> None:
    from deepfake.store import RetrainLocked

    one, two = Store(str(tmp_path / "a"), postgres_url), Store(str(tmp_path / "b"), postgres_url)
    try:
        assert two.retrain_lock_holder() is None
        token = one.acquire_retrain_lock()
        with pytest.raises(RetrainLocked) as refused:
            two.acquire_retrain_lock()
        assert refused.value.holder.pid == os.getpid()
        assert two.retrain_lock_holder().pid == os.getpid()
        one.release_retrain_lock(token)
        assert two.retrain_lock_holder() is None
        two.release_retrain_lock(two.acquire_retrain_lock())
    finally:
        one.close()
        two.close()


HOLDER = r"""
import sys, time
sys.path.insert(0, sys.argv[1])
from deepfake.store import Store
store = Store(sys.argv[2], sys.argv[3])
store.acquire_retrain_lock()
print("HELD", flush=True)
time.sleep(120)
"""


@pytest.mark.timeout(60)
def test_a_replica_killed_mid_retrain_leaves_the_lock_free_and_the_model_alone(
        postgres_url, tmp_path) -> None:
    from deepfake.model import StoredModels

    store = Store(str(tmp_path / "a"), postgres_url)
    StoredModels(store, str(tmp_path / "a"))
    current = store.current_model_id()
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, PYTHON_DIR, str(tmp_path / "b"),
                             postgres_url], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "HELD"
        assert store.retrain_lock_holder().pid == proc.pid
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        deadline = time.monotonic() + 10
        while store.retrain_lock_holder() is not None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert store.retrain_lock_holder() is None
        store.release_retrain_lock(store.acquire_retrain_lock())
        assert store.current_model_id() == current
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        proc.stdout.close()
        store.close()
