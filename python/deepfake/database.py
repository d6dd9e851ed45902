"""The service's database engines: SQLite (the default, one file in the data directory) and
PostgreSQL (shared by every worker of every replica), behind one small interface.

The store writes its SQL once, in the dialect both engines share (``?`` placeholders,
``INSERT ... ON CONFLICT ... DO UPDATE``, ``RETURNING``); this module runs it on either:

* :class:`SQLiteDatabase`: a connection per thread (opening one with its settings costs
  ~0.3 ms, a query on an open one microseconds), WAL, ``synchronous=FULL``, no implicit
  transactions, so every read sees what any process committed; write transactions take
  SQLite's write lock at once (``BEGIN IMMEDIATE``);
* :class:`PostgresDatabase`: psycopg 3 with its connection pool (``psycopg_pool``), one pool
  per process; ``?`` becomes ``%s``; write transactions are ordinary ``READ COMMITTED`` ones
  whose statements are written to be safe under it (upserts, row locks).

The schema is versioned: :data:`MIGRATIONS` is an ordered list, applied at start-up by
:meth:`migrate` in one transaction per step, recorded in ``schema_migrations``. Concurrent
start-ups (several workers, several replicas) serialise on the engine's own lock (PostgreSQL's
``pg_advisory_xact_lock``, SQLite's write lock), so each step runs exactly once. A table of
versions and SQL per engine is all this schema needs; a migration framework (Alembic) would
bring SQLAlchemy into a service that uses neither its ORM nor its engine.

:meth:`Database.session_lock` is the engine's cross-process mutex held for as long as a
block runs: a PostgreSQL advisory lock on a connection of its own (released by the server when
that connection ends, so a replica killed mid-retrain never leaves it held), and on SQLite
``None`` (the store keeps its lock row with a liveness check there, as before).
"""
from __future__ import annotations

import contextlib
import datetime
import logging
import os
import sqlite3
import threading
import time
from typing import Any, Callable, Iterator, List, Optional, Sequence, Union

log = logging.getLogger("deepfake.database")

OPEN_TIMEOUT = 30.0  # seconds to keep retrying a database that other workers are creating
POOL_MAX = 8  # connections per worker process: waitress runs 8 threads by default


def utc_now() -> str:
    """Now as ISO 8601 UTC with millisecond precision and a ``Z``."""
    now = datetime.datetime.now(datetime.timezone.utc)
    return now.strftime("%Y-%m-%dT%H:%M:%S.") + "%03dZ" % (now.microsecond // 1000)


Step = Union[str, Callable[[Any], None]]


class Migration:
    """One step of the schema: its version, what it does, and its SQL per engine (or a
    function of the open connection, for what SQL alone cannot say on that engine)."""

    def __init__(self, version: int, description: str, sqlite: Step,
                 postgresql: Optional[Step] = None) -> None:
        self.version = version
        self.description = description
        self.sqlite = sqlite
        self.postgresql = postgresql if postgresql is not None else sqlite

    def script(self, engine: str) -> Step:
        return self.sqlite if engine == "sqlite" else self.postgresql


def _sqlite_add_near_hash(conn: Any) -> None:
    # SQLite has no ADD COLUMN IF NOT EXISTS; a data directory from before the schema was
    # versioned may already have the column
    for table in ("analyses", "samples"):
        columns = {row[1] for row in conn.execute("PRAGMA table_info(%s)" % table)}
        if "near_hash" not in columns:
            conn.execute("ALTER TABLE %s ADD COLUMN near_hash TEXT" % table)


MIGRATIONS: List[Migration] = [
    Migration(1, "analyses, samples and the retrain lock", """
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
    image_path TEXT
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
    image_path TEXT
);
CREATE TABLE IF NOT EXISTS retrain_lock (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    token TEXT NOT NULL,
    pid INTEGER NOT NULL,
    process_started REAL,
    host TEXT NOT NULL,
    started_at TEXT NOT NULL
);
""", """
CREATE TABLE IF NOT EXISTS analyses (
    analysis_id TEXT PRIMARY KEY,
    created_at TEXT NOT NULL,
    image_sha256 TEXT NOT NULL,
    width INTEGER NOT NULL,
    height INTEGER NOT NULL,
    format TEXT NOT NULL,
    bytes BIGINT NOT NULL,
    feature_version TEXT NOT NULL,
    n_crops INTEGER NOT NULL,
    features BYTEA NOT NULL,
    probability DOUBLE PRECISION,
    verdict TEXT NOT NULL,
    model_version TEXT,
    image_path TEXT
);
CREATE TABLE IF NOT EXISTS samples (
    sample_id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    image_sha256 TEXT NOT NULL UNIQUE,
    label TEXT NOT NULL CHECK (label IN ('real', 'fake')),
    analysis_id TEXT,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    width INTEGER NOT NULL,
    height INTEGER NOT NULL,
    format TEXT NOT NULL,
    bytes BIGINT NOT NULL,
    feature_version TEXT NOT NULL,
    n_crops INTEGER NOT NULL,
    features BYTEA NOT NULL,
    image_path TEXT
);
CREATE TABLE IF NOT EXISTS retrain_lock (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    token TEXT NOT NULL,
    pid INTEGER NOT NULL,
    process_started DOUBLE PRECISION,
    host TEXT NOT NULL,
    started_at TEXT NOT NULL
);
"""),
    Migration(2, "model versions and the pointer to the current one", """
CREATE TABLE IF NOT EXISTS models (
    model_id INTEGER PRIMARY KEY AUTOINCREMENT,
    version TEXT NOT NULL,
    source TEXT NOT NULL,
    feature_version TEXT NOT NULL,
    created_at TEXT NOT NULL,
    model TEXT NOT NULL,
    digest TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS current_model (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    model_id INTEGER NOT NULL REFERENCES models (model_id),
    promoted_at TEXT NOT NULL
);
""", """
CREATE TABLE IF NOT EXISTS models (
    model_id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    version TEXT NOT NULL,
    source TEXT NOT NULL,
    feature_version TEXT NOT NULL,
    created_at TEXT NOT NULL,
    model TEXT NOT NULL,
    digest TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS current_model (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    model_id BIGINT NOT NULL REFERENCES models (model_id),
    promoted_at TEXT NOT NULL
);
"""),
    Migration(3, "perceptual hashes of analysed and labelled images (near-duplicate groups)",
              _sqlite_add_near_hash,
              "ALTER TABLE analyses ADD COLUMN IF NOT EXISTS near_hash TEXT;"
              "ALTER TABLE samples ADD COLUMN IF NOT EXISTS near_hash TEXT"),
    # counts() runs on every feedback and every /stats: without it SQLite scanned the whole
    # table (14 us at 20 samples, 640 us at 660: bench/store_bench.py)
    Migration(4, "an index for the samples per label",
              "CREATE INDEX IF NOT EXISTS samples_by_label ON samples (label)"),
]


class Database:
    """What the store needs from an engine (both engines implement it)."""

    engine = ""
    url = ""

    def read(self) -> "contextlib.AbstractContextManager[Any]":
        """A connection for reads (each statement its own transaction)."""
        raise NotImplementedError

    def write(self) -> "contextlib.AbstractContextManager[Any]":
        """A connection in a write transaction: committed when the block ends, rolled back
        when it raises."""
        raise NotImplementedError

    def session_lock(self, name: str) -> "contextlib.AbstractContextManager[Optional[bool]]":
        """Try the engine's cross-process lock ``name`` for as long as the block runs:
        True (held), False (someone else holds it), None (the engine has none)."""
        raise NotImplementedError

    def lock_is_held(self, name: str) -> Optional[bool]:
        """Whether any session holds lock ``name`` (None: the engine has no such lock)."""
        raise NotImplementedError

    def close(self) -> None:
        pass

    def describe(self) -> str:
        """The engine and where, without credentials (for /stats and logs)."""
        raise NotImplementedError

    # --- the schema ---------------------------------------------------------------------

    def migrate(self, migrations: Sequence[Migration] = MIGRATIONS) -> List[int]:
        """Apply the migrations this database has not had, in order; the versions applied."""
        applied: List[int] = []
        for step in migrations:
            with self.write() as conn:
                self._serialise_migrations(conn)
                conn.execute("CREATE TABLE IF NOT EXISTS schema_migrations ("
                             " version INTEGER PRIMARY KEY, description TEXT NOT NULL,"
                             " applied_at TEXT NOT NULL)")
                done = conn.execute("SELECT 1 FROM schema_migrations WHERE version = ?",
                                    (step.version,)).fetchone()
                if done:
                    continue
                self._run_script(conn, step.script(self.engine))
                conn.execute("INSERT INTO schema_migrations VALUES (?, ?, ?)",
                             (step.version, step.description, utc_now()))
                applied.append(step.version)
        if applied:
            log.info("database %s: applied migrations %s", self.describe(), applied)
        return applied

    def schema_version(self) -> int:
        with self.read() as conn:
            row = conn.execute("SELECT MAX(version) FROM schema_migrations").fetchone()
        return int(row[0] or 0)

    def _serialise_migrations(self, conn: Any) -> None:
        pass

    def _run_script(self, conn: Any, script: Step) -> None:
        if callable(script):
            script(conn)
            return
        for statement in (s.strip() for s in script.split(";")):
            if statement:
                conn.execute(statement)


# --- SQLite ---------------------------------------------------------------------------------

class SQLiteDatabase(Database):
    """One SQLite file; a connection per thread."""

    engine = "sqlite"

    def __init__(self, path: str) -> None:
        self.path = path
        self.url = "sqlite:///" + path
        self._local = threading.local()
        self._all: List[sqlite3.Connection] = []
        self._all_guard = threading.Lock()
        self._enable_wal()

    def describe(self) -> str:
        return "sqlite:" + self.path

    def _enable_wal(self) -> None:
        # several workers opening a new data directory at once: the switch to WAL needs the
        # database to itself, and SQLite refuses it with "database is locked" at once, without
        # waiting for the busy timeout; the statement is idempotent, so try again
        deadline = time.monotonic() + OPEN_TIMEOUT
        while True:
            try:
                with self._connect() as conn:
                    conn.execute("PRAGMA journal_mode=WAL")
                return
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(0.01)

    @contextlib.contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        with contextlib.closing(sqlite3.connect(self.path, timeout=30,
                                                isolation_level=None)) as conn:
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA busy_timeout=30000")
            yield conn

    def _thread_connection(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, timeout=30, isolation_level=None,
                                   check_same_thread=False)  # closed by close() only
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA busy_timeout=30000")
            self._local.conn = conn
            with self._all_guard:
                self._all.append(conn)
        return conn

    @contextlib.contextmanager
    def read(self) -> Iterator[sqlite3.Connection]:
        yield self._thread_connection()

    @contextlib.contextmanager
    def write(self) -> Iterator[sqlite3.Connection]:
        conn = self._thread_connection()
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    def close(self) -> None:
        with self._all_guard:
            connections, self._all = self._all, []
        for conn in connections:
            conn.close()
        self._local = threading.local()

    @contextlib.contextmanager
    def session_lock(self, name: str) -> Iterator[Optional[bool]]:
        yield None

    def lock_is_held(self, name: str) -> Optional[bool]:
        return None

    def synchronous(self) -> int:
        """The ``synchronous`` setting every connection runs with (2 = FULL)."""
        with self._connect() as conn:
            return int(conn.execute("PRAGMA synchronous").fetchone()[0])


# --- PostgreSQL -----------------------------------------------------------------------------

def _lock_key(name: str) -> int:
    """A stable 63-bit key for ``pg_advisory_lock`` from a lock's name."""
    import hashlib
    return int.from_bytes(hashlib.sha256(("deepfake:" + name).encode()).digest()[:8],
                          "big") >> 1


class _PgConnection:
    """A psycopg connection that takes the store's ``?`` placeholders."""

    __slots__ = ("raw",)

    def __init__(self, raw: Any) -> None:
        self.raw = raw

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Any:
        return self.raw.execute(sql.replace("?", "%s"), params or None)


class PostgresDatabase(Database):
    """A PostgreSQL database through a psycopg connection pool (one per process)."""

    engine = "postgresql"

    def __init__(self, url: str, max_size: int = POOL_MAX) -> None:
        try:
            import psycopg  # noqa: F401
            from psycopg_pool import ConnectionPool
        except ImportError as exc:  # the extra is not installed
            raise RuntimeError(
                "DEEPFAKE_DATABASE_URL names PostgreSQL, but psycopg is not installed (%s): "
                "pip install 'psycopg[binary,pool]'" % exc) from exc
        self.url = url
        self._pool = ConnectionPool(url, min_size=1, max_size=max_size, open=False,
                                    kwargs={"autocommit": True}, name="deepfake")
        self._pool.open(wait=True, timeout=OPEN_TIMEOUT)
        self._lock_guard = threading.Lock()

    def describe(self) -> str:
        from psycopg.conninfo import conninfo_to_dict
        info = conninfo_to_dict(self.url)
        return "postgresql://%s:%s/%s" % (info.get("host", "localhost"),
                                          info.get("port", 5432), info.get("dbname", ""))

    @contextlib.contextmanager
    def read(self) -> Iterator[_PgConnection]:
        with self._pool.connection() as raw:
            yield _PgConnection(raw)

    @contextlib.contextmanager
    def write(self) -> Iterator[_PgConnection]:
        with self._pool.connection() as raw:
            with raw.transaction():
                yield _PgConnection(raw)

    def _serialise_migrations(self, conn: Any) -> None:
        conn.execute("SELECT pg_advisory_xact_lock(?)", (_lock_key("migrations"),))

    @contextlib.contextmanager
    def session_lock(self, name: str) -> Iterator[Optional[bool]]:
        import psycopg
        # a connection of its own, outside the pool: the lock lives as long as it does, and
        # the server releases it when the connection ends, however this process ends
        with psycopg.connect(self.url, autocommit=True) as raw:
            key = _lock_key(name)
            held = bool(raw.execute("SELECT pg_try_advisory_lock(%s)", (key,)).fetchone()[0])
            try:
                yield held
            finally:
                if held and not raw.closed:
                    raw.execute("SELECT pg_advisory_unlock(%s)", (key,))

    def lock_is_held(self, name: str) -> Optional[bool]:
        key = _lock_key(name)
        with self.read() as conn:
            row = conn.execute(
                "SELECT COUNT(*) FROM pg_locks WHERE locktype = 'advisory' AND granted"
                " AND ((classid::bigint << 32) | objid::bigint) = ?", (key,)).fetchone()
        return bool(row[0])

    def close(self) -> None:
        self._pool.close()


def open_database(url: Optional[str], data_dir: str) -> Database:
    """The database ``DEEPFAKE_DATABASE_URL`` names (``postgresql://...``), or the SQLite
    file in ``data_dir`` when it is unset; migrated to the current schema."""
    if url and url.split(":", 1)[0] in ("postgresql", "postgres"):
        database: Database = PostgresDatabase(url)
    elif url and url.startswith("sqlite:///"):
        database = SQLiteDatabase(url[len("sqlite:///"):])
    elif url:
        raise ValueError("DEEPFAKE_DATABASE_URL=%r: use postgresql://user@host:port/dbname, or "
                         "leave it unset for the SQLite file in the data directory" % url)
    else:
        os.makedirs(data_dir, exist_ok=True)
        database = SQLiteDatabase(os.path.join(data_dir, "deepfake.sqlite3"))
    database.migrate()
    return database
