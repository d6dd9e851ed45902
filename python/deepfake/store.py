"""The service's store: analyses, training samples (feedback), model versions and the retrain
lock, on SQLite (default: one file in the data directory) or PostgreSQL (shared by replicas,
``DEEPFAKE_DATABASE_URL``); the engines are :mod:`deepfake.database`'s.

What is kept: per-crop feature vectors, the label, the image's SHA-256, size, format and times.
Images themselves are written only when the user opts in, to ``images/<sha256>.<ext>``.
One image is one training sample: a second label for the same bytes updates that sample
instead of counting it twice.

Durability: every write is one transaction (SQLite: ``synchronous=FULL``, WAL; PostgreSQL:
its defaults, ``fsync`` on), so a process killed mid-write loses at most the write in flight,
never committed rows; every worker process (and, on PostgreSQL, every replica) sees what any of
them committed on its next call.

The store also holds the *retrain lock*, one row of ``retrain_lock``, so that one retrain runs
at a time across all worker processes (an in-memory lock would hold within one only). It is
taken with ``BEGIN IMMEDIATE`` (SQLite's write lock makes check-and-take one step) and names
its holder: PID, that process's creation time, host, and since when. On SQLite, a lock whose
holder is gone (killed mid-retrain) is stale and is taken over, so a crash never blocks
retraining. Liveness is judged on the holder's own host only, where its PID means something;
a lock from another host (a data directory shared between containers) is trusted for
``FOREIGN_LOCK_EXPIRY`` seconds, longer than any retrain runs. On PostgreSQL the lock itself is
an advisory lock held on the retraining process's own connection, which the server releases
when that connection ends (a replica killed mid-retrain, on any machine); the row only says
who holds it.
"""
from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import logging
import os
import socket
import tempfile
import threading
import uuid
from dataclasses import dataclass
from typing import Any, Dict, Optional

import numpy as np

from . import features, processes
from .database import Database, open_database, utc_now

log = logging.getLogger("deepfake.store")

LABELS = ("real", "fake")
FOREIGN_LOCK_EXPIRY = 3600.0  # seconds; a retrain takes seconds, even with much feedback
_HOST = socket.gethostname()
# the tokens of the retrain locks this process holds right now: a row with this process's PID
# and another token was left behind by a release that failed, and is stale
_held_tokens: set[str] = set()
_held_guard = threading.Lock()


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


_SEED_LOCK = 0x5EED  # pg_advisory_xact_lock key of the model seeding transaction


@dataclass(frozen=True)
class StoredModel:
    """One stored model version: its row id, name, where it came from, its JSON, and when it
    was made current (None if it is not current)."""

    model_id: int
    version: str
    source: str  # "bundled" (the baseline shipped with the code), "retrained", "imported"
    payload: dict[str, Any]
    promoted_at: Optional[str]


# PostgreSQL: the lock is held but its row is not there yet (the holder is between taking
# the lock and writing its name)
_UNKNOWN_HOLDER = LockHolder("", 0, None, "another replica", "just now")


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

    def __init__(self, data_dir: str, database_url: Optional[str] = None) -> None:
        self.data_dir = data_dir
        self.images_dir = os.path.join(data_dir, "images")
        os.makedirs(data_dir, exist_ok=True)
        self.db: Database = open_database(database_url, data_dir)
        self.path = getattr(self.db, "path", None)  # the SQLite file, when it is one
        self._lock_sessions: Dict[str, Any] = {}  # PostgreSQL: token -> its lock's session

    @property
    def engine(self) -> str:
        return self.db.engine

    def close(self) -> None:
        self.db.close()

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
        with self.db.write() as conn:
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
        with self.db.read() as conn:
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
        with self.db.write() as conn:
            # insert-or-nothing, then update: one image stays one sample even when two
            # replicas label it at the same moment (the second waits for the first's row)
            row = conn.execute(
                "INSERT INTO samples (image_sha256, label, analysis_id, created_at, updated_at,"
                " width, height, format, bytes, feature_version, n_crops, features, image_path,"
                " near_hash) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)"
                " ON CONFLICT (image_sha256) DO NOTHING RETURNING sample_id",
                (record.sha256, label, analysis_id, now, now, record.width, record.height,
                 record.format, record.bytes, features.FEATURE_VERSION, len(record.vectors),
                 _pack(record.vectors), image_path, record.near_hash)).fetchone()
            if row is not None:
                return SampleResult(int(row[0]), False, label)
            row = conn.execute(
                "UPDATE samples SET label = ?, updated_at = ?,"
                " analysis_id = COALESCE(?, analysis_id),"
                " image_path = COALESCE(?, image_path),"
                " near_hash = COALESCE(?, near_hash) WHERE image_sha256 = ?"
                " RETURNING sample_id",
                (label, now, analysis_id, image_path, record.near_hash,
                 record.sha256)).fetchone()
            return SampleResult(int(row[0]), True, label)

    def counts(self) -> dict[str, int]:
        """Training samples per label (both labels always present)."""
        result = {label: 0 for label in LABELS}
        with self.db.read() as conn:
            for label, count in conn.execute(
                    "SELECT label, COUNT(*) FROM samples GROUP BY label"):
                result[label] = int(count)
        return result

    def last_sample_time(self) -> Optional[str]:
        with self.db.read() as conn:
            row = conn.execute("SELECT MAX(updated_at) FROM samples").fetchone()
        return row[0] if row else None

    def samples(self) -> list[tuple[str, str, np.ndarray, Optional[str]]]:
        """Every usable training sample as (sha256, label, crop vectors, near-duplicate hash)."""
        with self.db.read() as conn:
            rows = conn.execute(
                "SELECT image_sha256, label, n_crops, features, near_hash FROM samples"
                " WHERE feature_version = ? AND n_crops > 0 ORDER BY sample_id",
                (features.FEATURE_VERSION,)).fetchall()
        return [(sha, label, _unpack(blob, n), near) for sha, label, n, blob, near in rows]

    # --- model versions -------------------------------------------------------------------

    def current_model_id(self) -> Optional[int]:
        """Which model version is current (the pointer), or None before the first is set. One
        indexed read: asked on every request that uses the model."""
        with self.db.read() as conn:
            row = conn.execute("SELECT model_id FROM current_model WHERE id = 1").fetchone()
        return None if row is None else int(row[0])

    def model(self, model_id: int) -> Optional[StoredModel]:
        with self.db.read() as conn:
            row = conn.execute(
                "SELECT m.model_id, m.version, m.source, m.model, c.promoted_at FROM models m"
                " LEFT JOIN current_model c ON c.model_id = m.model_id WHERE m.model_id = ?",
                (model_id,)).fetchone()
        return None if row is None else StoredModel(int(row[0]), row[1], row[2],
                                                    json.loads(row[3]), row[4])

    def promote_model(self, payload: dict[str, Any], source: str) -> int:
        """Store a model version (its JSON: weights, feature version, metrics, training data)
        and make it current, in one transaction; its id."""
        text = json.dumps(payload, sort_keys=True)
        with self.db.write() as conn:
            model_id = self._insert_model(conn, payload, source, text)
            conn.execute("INSERT INTO current_model VALUES (1, ?, ?) ON CONFLICT (id) DO UPDATE"
                         " SET model_id = excluded.model_id, promoted_at = excluded.promoted_at",
                         (model_id, utc_now()))
        return model_id

    def seed_model(self, payload: dict[str, Any], source: str,
                   replace_source: Optional[str] = None) -> int:
        """Make ``payload`` current if no model is, or if the current one came from
        ``replace_source`` with other contents (a newer bundled baseline after an upgrade);
        the current model's id. Safe when every worker of every replica seeds at once."""
        text = json.dumps(payload, sort_keys=True)
        digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
        with self.db.write() as conn:
            if self.db.engine == "postgresql":
                # the pointer row may not exist yet: serialise seeders on a transaction lock
                conn.execute("SELECT pg_advisory_xact_lock(?)", (_SEED_LOCK,))
            row = conn.execute("SELECT m.model_id, m.source, m.digest FROM current_model c"
                               " JOIN models m ON m.model_id = c.model_id WHERE c.id = 1"
                               ).fetchone()
            if row is not None and not (replace_source and row[1] == replace_source
                                        and row[2] != digest):
                return int(row[0])
            model_id = self._insert_model(conn, payload, source, text)
            conn.execute("INSERT INTO current_model VALUES (1, ?, ?) ON CONFLICT (id) DO UPDATE"
                         " SET model_id = excluded.model_id, promoted_at = excluded.promoted_at",
                         (model_id, utc_now()))
            return model_id

    def model_versions(self) -> list[tuple[int, str, str, str]]:
        """Every stored version, oldest first: (id, version, source, created_at)."""
        with self.db.read() as conn:
            rows = conn.execute("SELECT model_id, version, source, created_at FROM models"
                                " ORDER BY model_id").fetchall()
        return [(int(r[0]), r[1], r[2], r[3]) for r in rows]

    @staticmethod
    def _insert_model(conn: Any, payload: dict[str, Any], source: str, text: str) -> int:
        return int(conn.execute(
            "INSERT INTO models (version, source, feature_version, created_at, model, digest)"
            " VALUES (?, ?, ?, ?, ?, ?) RETURNING model_id",
            (str(payload.get("version")), source, str(payload.get("feature_version")),
             utc_now(), text, hashlib.sha256(text.encode("utf-8")).hexdigest())).fetchone()[0])

    # --- the retrain lock ---------------------------------------------------------------------

    def acquire_retrain_lock(self) -> str:
        """Take the retrain lock for this process; its token, for the release.

        :class:`RetrainLocked` if a live process (on PostgreSQL: any replica) holds it; on
        SQLite a stale lock is taken over (logged).
        """
        token = uuid.uuid4().hex
        with _held_guard:  # before the commit: from then on a thread may look at the row
            _held_tokens.add(token)
        session = None
        try:
            if self.db.engine == "postgresql":
                session = contextlib.ExitStack()
                if not session.enter_context(self.db.session_lock("retrain")):
                    with self.db.read() as conn:
                        holder = _lock_row(conn)
                    raise RetrainLocked(holder or _UNKNOWN_HOLDER)
            with self.db.write() as conn:
                holder = _lock_row(conn)
                if holder is not None and session is None:
                    stale = _stale_reason(holder)
                    if stale is None:
                        raise RetrainLocked(holder)
                    log.warning("taking over the retrain lock of %s: %s", holder.describe(),
                                stale)
                conn.execute("INSERT INTO retrain_lock VALUES (1, ?, ?, ?, ?, ?)"
                             " ON CONFLICT (id) DO UPDATE SET token = excluded.token,"
                             " pid = excluded.pid, process_started = excluded.process_started,"
                             " host = excluded.host, started_at = excluded.started_at",
                             (token, os.getpid(), processes.start_time(), _HOST, utc_now()))
        except BaseException:
            with _held_guard:
                _held_tokens.discard(token)
            if session is not None:
                session.close()
            raise
        if session is not None:
            self._lock_sessions[token] = session
        return token

    def release_retrain_lock(self, token: str) -> None:
        """Release the lock taken with ``token``; a lock taken over since is left alone."""
        try:
            with self.db.write() as conn:
                conn.execute("DELETE FROM retrain_lock WHERE id = 1 AND token = ?", (token,))
        except Exception:
            # never masks the retrain's own outcome; the row left behind names this process
            # with a token it no longer holds, so the next retrain finds it stale
            log.exception("could not release the retrain lock")
        finally:
            with _held_guard:
                _held_tokens.discard(token)
            session = self._lock_sessions.pop(token, None)
            if session is not None:
                session.close()  # PostgreSQL: unlocks, and ends the lock's connection

    def retrain_lock_holder(self) -> Optional[LockHolder]:
        """The live holder of the retrain lock, or None if it is free (or held by the dead)."""
        with self.db.read() as conn:
            holder = _lock_row(conn)
        held = self.db.lock_is_held("retrain")
        if held is not None:  # PostgreSQL: the advisory lock is the truth, the row a label
            return (holder or _UNKNOWN_HOLDER) if held else None
        return holder if holder is not None and _stale_reason(holder) is None else None


def _lock_row(conn: Any) -> Optional[LockHolder]:
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
