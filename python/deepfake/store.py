"""SQLite storage for analyses and training samples (feedback), in WAL mode.

What is kept: per-crop feature vectors, the label, the image's SHA-256, size, format and times.
Images themselves are written only when the user opts in, to ``images/<sha256>.<ext>``.
One image is one training sample: a second label for the same bytes updates that sample
instead of counting it twice.

Durability: every write is one transaction with ``synchronous=FULL``; WAL keeps readers off the
writer's back, so a process killed mid-write loses at most the write in flight, never
committed rows. Each call opens its own connection, which makes the store safe to use from
the threaded server without sharing connections across threads, and lets every worker process
on the same data directory see what any of them committed on its next call.

The store also holds the *retrain lock*, one row of ``retrain_lock``, so that one retrain runs
at a time across all worker processes (an in-memory lock would hold within one only). It is
taken with ``BEGIN IMMEDIATE`` (SQLite's write lock makes check-and-take one step) and names
its holder: PID, that process's creation time, host, and since when. A lock whose holder is
gone (killed mid-retrain) is stale and is taken over, so a crash never blocks retraining.
Liveness is judged on the holder's own host only, where its PID means something; a lock from
another host (a data directory shared between containers) is trusted for
``FOREIGN_LOCK_EXPIRY`` seconds, longer than any retrain runs.
"""
from __future__ import annotations

import datetime
import logging
import os
import socket
import sqlite3
import tempfile
import threading
import time
import uuid
from contextlib import closing, contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import numpy as np

from . import features, processes

log = logging.getLogger("deepfake.store")

LABELS = ("real", "fake")
FOREIGN_LOCK_EXPIRY = 3600.0  # seconds; a retrain takes seconds, even with much feedback
OPEN_TIMEOUT = 30.0  # seconds to keep retrying a database that other workers are creating

_SCHEMA = """
CREATE TABLE IF NOT EXISTS analyses (
    analysis_id TEXT PRIMARY KEY,
    created_at TEXT NOT NULL,
    image_sha256 TEXT NOT NULL,
    width INTEGER NOT NULL,
    height INTEGER NOT NULL,
    format TEXT NOT NULL,
    bytes INTEGER NOT NULL,
    feature_version TEXT NOT NULL,
    n_crops INTEGER NOT NULL,
    features BLOB NOT NULL,
    probability REAL,
    verdict TEXT NOT NULL,
    model_version TEXT,
    image_path TEXT,
    near_hash TEXT
);
CREATE TABLE IF NOT EXISTS samples (
    sample_id INTEGER PRIMARY KEY AUTOINCREMENT,
    image_sha256 TEXT NOT NULL UNIQUE,
    label TEXT NOT NULL CHECK (label IN ('real', 'fake')),
    analysis_id TEXT,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    width INTEGER NOT NULL,
    height INTEGER NOT NULL,
    format TEXT NOT NULL,
    bytes INTEGER NOT NULL,
    feature_version TEXT NOT NULL,
    n_crops INTEGER NOT NULL,
    features BLOB NOT NULL,
    image_path TEXT,
    near_hash TEXT
);
CREATE TABLE IF NOT EXISTS retrain_lock (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    token TEXT NOT NULL,
    pid INTEGER NOT NULL,
    process_started REAL,
    host TEXT NOT NULL,
    started_at TEXT NOT NULL
);
"""

_HOST = socket.gethostname()
# the tokens of the retrain locks this process holds right now: a row with this process's PID
# and another token was left behind by a release that failed, and is stale
_held_tokens: set[str] = set()
_held_guard = threading.Lock()


def utc_now() -> str:
    """Now as ISO 8601 UTC with millisecond precision and a ``Z``."""
    now = datetime.datetime.now(datetime.timezone.utc)
    return now.strftime("%Y-%m-%dT%H:%M:%S.") + "%03dZ" % (now.microsecond // 1000)


@dataclass(frozen=True)
class ImageRecord:
    """What the store keeps about one image (analysed or labelled)."""

    sha256: str
    width: int
    height: int
    format: str
    bytes: int
    vectors: np.ndarray  # (n_crops, N_FEATURES) float32
    near_hash: Optional[str] = None  # perceptual hashes (deepfake.near_duplicate), no pixels


@dataclass(frozen=True)
class SampleResult:
    sample_id: int
    duplicate: bool
    label: str


@dataclass(frozen=True)
class LockHolder:
    """Who holds the retrain lock: which process, on which host, since when."""

    token: str
    pid: int
    process_started: Optional[float]
    host: str
    started_at: str

    def describe(self) -> str:
        return "process %d on %s since %s" % (self.pid, self.host, self.started_at)

    def public(self) -> dict[str, Any]:
        return {"pid": self.pid, "host": self.host, "started_at": self.started_at}


class RetrainLocked(Exception):
    """The retrain lock is held by a live process (``holder``)."""

    def __init__(self, holder: LockHolder) -> None:
        super().__init__("the retrain lock is held by " + holder.describe())
        self.holder = holder


def _pack(vectors: np.ndarray) -> bytes:
    return np.ascontiguousarray(vectors, dtype="<f4").tobytes()


def _unpack(blob: bytes, n_crops: int) -> np.ndarray:
    return np.frombuffer(blob, dtype="<f4").reshape(n_crops, features.N_FEATURES)


class Store:
    """The service's database and the opt-in image folder under one data directory."""

    def __init__(self, data_dir: str) -> None:
        self.data_dir = data_dir
        self.path = os.path.join(data_dir, "deepfake.sqlite3")
        self.images_dir = os.path.join(data_dir, "images")
        os.makedirs(data_dir, exist_ok=True)
        self._create()

    def _create(self) -> None:
        # several workers opening a new data directory at once: the switch to WAL needs the
        # database to itself, and SQLite refuses it with "database is locked" at once, without
        # waiting for the busy timeout; both statements are idempotent, so try again
        deadline = time.monotonic() + OPEN_TIMEOUT
        while True:
            try:
                with self._connect() as conn:
                    conn.execute("PRAGMA journal_mode=WAL")
                    conn.executescript(_SCHEMA)
                    _add_missing_columns(conn)
                return
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(0.01)

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        with closing(sqlite3.connect(self.path, timeout=30, isolation_level=None)) as conn:
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA busy_timeout=30000")
            yield conn

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._connect() as conn:
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    def keep_image(self, record: ImageRecord, data: bytes) -> str:
        """Write the image's bytes (opt-in only) atomically; returns the path."""
        os.makedirs(self.images_dir, exist_ok=True)
        path = os.path.join(self.images_dir, "%s.%s" % (record.sha256, record.format.lower()))
        if not os.path.exists(path):
            fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=self.images_dir)
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        return path

    def add_analysis(self, analysis_id: str, record: ImageRecord, probability: Optional[float],
                     verdict: str, model_version: Optional[str],
                     image_path: Optional[str] = None) -> None:
        with self._transaction() as conn:
            conn.execute(
                "INSERT INTO analyses (analysis_id, created_at, image_sha256, width, height,"
                " format, bytes, feature_version, n_crops, features, probability, verdict,"
                " model_version, image_path, near_hash) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (analysis_id, utc_now(), record.sha256, record.width, record.height,
                 record.format, record.bytes, features.FEATURE_VERSION, len(record.vectors),
                 _pack(record.vectors), probability, verdict, model_version, image_path,
                 record.near_hash))

    def get_analysis(self, analysis_id: str) -> Optional[tuple[ImageRecord, Optional[str]]]:
        """The stored record of an earlier analysis and its image path, or None."""
        with self._connect() as conn:
            row = conn.execute(
                "SELECT image_sha256, width, height, format, bytes, n_crops, features,"
                " image_path, feature_version, near_hash FROM analyses WHERE analysis_id = ?",
                (analysis_id,)).fetchone()
        if row is None or row[8] != features.FEATURE_VERSION:
            return None
        record = ImageRecord(row[0], row[1], row[2], row[3], row[4], _unpack(row[6], row[5]),
                             row[9])
        return record, row[7]

    def add_sample(self, record: ImageRecord, label: str, analysis_id: Optional[str] = None,
                   image_path: Optional[str] = None) -> SampleResult:
        """Store a labelled image; the same image again updates its label, not the count."""
        if label not in LABELS:
            raise ValueError("label must be one of %s" % (LABELS,))
        now = utc_now()
        with self._transaction() as conn:
            row = conn.execute("SELECT sample_id FROM samples WHERE image_sha256 = ?",
                               (record.sha256,)).fetchone()
            if row is not None:
                conn.execute(
                    "UPDATE samples SET label = ?, updated_at = ?,"
                    " analysis_id = COALESCE(?, analysis_id),"
                    " image_path = COALESCE(?, image_path),"
                    " near_hash = COALESCE(?, near_hash) WHERE sample_id = ?",
                    (label, now, analysis_id, image_path, record.near_hash, row[0]))
                return SampleResult(int(row[0]), True, label)
            cursor = conn.execute(
                "INSERT INTO samples (image_sha256, label, analysis_id, created_at, updated_at,"
                " width, height, format, bytes, feature_version, n_crops, features, image_path,"
                " near_hash) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (record.sha256, label, analysis_id, now, now, record.width, record.height,
                 record.format, record.bytes, features.FEATURE_VERSION, len(record.vectors),
                 _pack(record.vectors), image_path, record.near_hash))
            return SampleResult(int(cursor.lastrowid), False, label)

    def counts(self) -> dict[str, int]:
        """Training samples per label (both labels always present)."""
        result = {label: 0 for label in LABELS}
        with self._connect() as conn:
            for label, count in conn.execute(
                    "SELECT label, COUNT(*) FROM samples GROUP BY label"):
                result[label] = int(count)
        return result

    def last_sample_time(self) -> Optional[str]:
        with self._connect() as conn:
            row = conn.execute("SELECT MAX(updated_at) FROM samples").fetchone()
        return row[0] if row else None

    def samples(self) -> list[tuple[str, str, np.ndarray, Optional[str]]]:
        """Every usable training sample as (sha256, label, crop vectors, near-duplicate hash)."""
        with self._connect() as conn:
            rows = conn.execute(
                "SELECT image_sha256, label, n_crops, features, near_hash FROM samples"
                " WHERE feature_version = ? AND n_crops > 0 ORDER BY sample_id",
                (features.FEATURE_VERSION,)).fetchall()
        return [(sha, label, _unpack(blob, n), near) for sha, label, n, blob, near in rows]

    # --- the retrain lock ---------------------------------------------------------------------

    def acquire_retrain_lock(self) -> str:
        """Take the retrain lock for this process; its token, for the release.

        :class:`RetrainLocked` if a live process holds it; a stale lock is taken over (logged).
        """
        token = uuid.uuid4().hex
        with _held_guard:  # before the commit: from then on a thread may look at the row
            _held_tokens.add(token)
        try:
            with self._transaction() as conn:
                holder = _lock_row(conn)
                if holder is not None:
                    stale = _stale_reason(holder)
                    if stale is None:
                        raise RetrainLocked(holder)
                    log.warning("taking over the retrain lock of %s: %s", holder.describe(),
                                stale)
                conn.execute("INSERT OR REPLACE INTO retrain_lock VALUES (1, ?, ?, ?, ?, ?)",
                             (token, os.getpid(), processes.start_time(), _HOST, utc_now()))
        except BaseException:
            with _held_guard:
                _held_tokens.discard(token)
            raise
        return token

    def release_retrain_lock(self, token: str) -> None:
        """Release the lock taken with ``token``; a lock taken over since is left alone."""
        try:
            with self._transaction() as conn:
                conn.execute("DELETE FROM retrain_lock WHERE id = 1 AND token = ?", (token,))
        except sqlite3.Error:
            # never masks the retrain's own outcome; the row left behind names this process
            # with a token it no longer holds, so the next retrain finds it stale
            log.exception("could not release the retrain lock")
        finally:
            with _held_guard:
                _held_tokens.discard(token)

    def retrain_lock_holder(self) -> Optional[LockHolder]:
        """The live holder of the retrain lock, or None if it is free (or held by the dead)."""
        with self._connect() as conn:
            holder = _lock_row(conn)
        return holder if holder is not None and _stale_reason(holder) is None else None


def _add_missing_columns(conn: sqlite3.Connection) -> None:
    """A data directory made before a column existed gets it (NULL for old rows); two workers
    adding it at once is harmless: the loser's "duplicate column" is ignored."""
    for table in ("analyses", "samples"):
        columns = {row[1] for row in conn.execute("PRAGMA table_info(%s)" % table)}
        if "near_hash" not in columns:
            try:
                conn.execute("ALTER TABLE %s ADD COLUMN near_hash TEXT" % table)
            except sqlite3.OperationalError as exc:
                if "duplicate column" not in str(exc):
                    raise


def _lock_row(conn: sqlite3.Connection) -> Optional[LockHolder]:
    row = conn.execute("SELECT token, pid, process_started, host, started_at FROM retrain_lock"
                       " WHERE id = 1").fetchone()
    return None if row is None else LockHolder(*row)


def _stale_reason(holder: LockHolder) -> Optional[str]:
    """Why ``holder``'s lock may be taken over, or None if it must be respected."""
    if holder.host != _HOST:
        age = _age_seconds(holder.started_at)
        if age is None or age > FOREIGN_LOCK_EXPIRY:
            return ("held from another host for longer than %.0f s, so that host's retrain "
                    "has died" % FOREIGN_LOCK_EXPIRY)
        return None
    if not processes.alive(holder.pid, holder.process_started):
        return "process %d is gone" % holder.pid
    if holder.pid == os.getpid():
        with _held_guard:
            if holder.token not in _held_tokens:
                return "this process holds no such lock (its release failed)"
    return None


def _age_seconds(timestamp: str) -> Optional[float]:
    try:
        then = datetime.datetime.strptime(timestamp, "%Y-%m-%dT%H:%M:%S.%fZ")
    except ValueError:
        return None
    now = datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None)
    return (now - then).total_seconds()
