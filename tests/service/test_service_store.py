"""The SQLite store: round trips, duplicates, WAL, and surviving a kill mid-write."""
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


def record(seed: int, crops: int = 3) -> ImageRecord:
    rng = np.random.default_rng(seed)
    vectors = rng.normal(size=(crops, features.N_FEATURES)).astype(np.float32)
    return ImageRecord("%064x" % seed, 640, 480, "JPEG", 12345, vectors)


def test_analysis_round_trip_keeps_features_exactly(tmp_path) -> None:
    store = Store(str(tmp_path))
    rec = record(1)
    store.add_analysis("a1", rec, 0.25, "likely_real", "baseline-1")
    got, image_path = store.get_analysis("a1")
    assert image_path is None
    assert (got.sha256, got.width, got.height, got.format, got.bytes) == (
        rec.sha256, 640, 480, "JPEG", 12345)
    assert np.array_equal(got.vectors, rec.vectors)
    assert store.get_analysis("missing") is None


def test_same_image_is_one_sample_and_its_label_can_change(tmp_path) -> None:
    store = Store(str(tmp_path))
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


def test_images_are_kept_only_on_request(tmp_path) -> None:
    store = Store(str(tmp_path))
    path = store.keep_image(record(1), b"\xff\xd8data")
    assert open(path, "rb").read() == b"\xff\xd8data"
    assert os.listdir(store.images_dir) == [os.path.basename(path)]


WRITER = r"""
import sys, numpy as np
sys.path.insert(0, sys.argv[1])
from deepfake import features
from deepfake.store import ImageRecord, Store
store = Store(sys.argv[2])
i = 0
while True:
    vec = np.full((4, features.N_FEATURES), i, np.float32)
    store.add_sample(ImageRecord("%064x" % i, 8, 8, "PNG", 1, vec), "real" if i % 2 else "fake")
    print(i, flush=True)
    i += 1
"""


@pytest.mark.timeout(60)
def test_a_process_killed_mid_write_loses_no_committed_sample(tmp_path) -> None:
    proc = subprocess.Popen([sys.executable, "-c", WRITER, PYTHON_DIR, str(tmp_path)],
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
    store = Store(str(tmp_path))
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

    from deepfake import store as store_module

    old_schema = store_module._SCHEMA.replace(",\n    near_hash TEXT", "")
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
