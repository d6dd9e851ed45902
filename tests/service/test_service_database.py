"""The database engines under the store (python/deepfake/database.py), on SQLite and on a
real PostgreSQL cluster: migrations, the cross-process lock, and what a killed process leaves."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from deepfake.database import (MIGRATIONS, Migration, PostgresDatabase, SQLiteDatabase,
                               open_database)

SERVICE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "python")


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request, tmp_path):
    if request.param == "sqlite":
        return None
    return request.getfixturevalue("postgres_url")


def test_open_migrates_to_the_latest_version_once(database_url, tmp_path):
    database = open_database(database_url, str(tmp_path))
    try:
        assert database.schema_version() == MIGRATIONS[-1].version
        assert database.migrate() == []  # nothing left to apply
        with database.read() as conn:
            rows = conn.execute("SELECT version, description FROM schema_migrations"
                                " ORDER BY version").fetchall()
        assert [tuple(r) for r in rows] == [(m.version, m.description) for m in MIGRATIONS]
    finally:
        database.close()


def test_concurrent_start_ups_apply_each_step_exactly_once(database_url, tmp_path):
    opened, failures = [], []

    def start():
        try:
            opened.append(open_database(database_url, str(tmp_path)))
        except Exception as exc:  # reported below
            failures.append(exc)

    threads = [threading.Thread(target=start) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    try:
        assert failures == []
        with opened[0].read() as conn:
            count = conn.execute("SELECT COUNT(*) FROM schema_migrations").fetchone()[0]
        assert count == len(MIGRATIONS)
    finally:
        for database in opened:
            database.close()


def test_a_new_migration_is_applied_to_an_existing_database(database_url, tmp_path):
    database = open_database(database_url, str(tmp_path))
    try:
        extra = Migration(MIGRATIONS[-1].version + 1, "a test column",
                          "ALTER TABLE samples ADD COLUMN test_note TEXT")
        assert database.migrate(list(MIGRATIONS) + [extra]) == [extra.version]
        with database.write() as conn:
            conn.execute("UPDATE samples SET test_note = ? WHERE sample_id = ?", ("n", -1))
        assert database.schema_version() == extra.version
    finally:
        database.close()


def test_a_failing_step_leaves_the_schema_where_it_was(database_url, tmp_path):
    database = open_database(database_url, str(tmp_path))
    try:
        broken = Migration(MIGRATIONS[-1].version + 1, "broken",
                           "CREATE TABLE half_done (x INTEGER); SELECT no_such_column FROM samples")
        with pytest.raises(Exception):
            database.migrate(list(MIGRATIONS) + [broken])
        assert database.schema_version() == MIGRATIONS[-1].version
        with database.read() as conn:  # the step's first statement was rolled back too
            with pytest.raises(Exception):
                conn.execute("SELECT x FROM half_done").fetchall()
    finally:
        database.close()


def test_write_rolls_back_on_error(database_url, tmp_path):
    database = open_database(database_url, str(tmp_path))
    try:
        with pytest.raises(RuntimeError):
            with database.write() as conn:
                conn.execute("INSERT INTO retrain_lock VALUES (1, 't', 1, NULL, 'h', 'now')")
                raise RuntimeError("boom")
        with database.read() as conn:
            assert conn.execute("SELECT COUNT(*) FROM retrain_lock").fetchone()[0] == 0
    finally:
        database.close()


def test_sqlite_is_durable_as_promised(tmp_path):
    database = open_database(None, str(tmp_path))
    assert isinstance(database, SQLiteDatabase)
    assert database.synchronous() == 2  # FULL: the README's durability promise
    with database.read() as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_unknown_database_url_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="postgresql://"):
        open_database("mysql://x/y", str(tmp_path))


def test_postgres_lock_is_exclusive_and_released(postgres_url, tmp_path):
    first = open_database(postgres_url, str(tmp_path))
    second = PostgresDatabase(postgres_url)
    try:
        assert first.lock_is_held("retrain") is False
        with first.session_lock("retrain") as held:
            assert held is True and second.lock_is_held("retrain") is True
            with second.session_lock("retrain") as also:
                assert also is False
        assert second.lock_is_held("retrain") is False
        with second.session_lock("retrain") as held:
            assert held is True
    finally:
        first.close()
        second.close()


def test_postgres_lock_of_a_killed_process_is_released_by_the_server(postgres_url, tmp_path):
    database = open_database(postgres_url, str(tmp_path))
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent("""
        import sys, time
        sys.path.insert(0, %r)
        from deepfake.database import PostgresDatabase
        db = PostgresDatabase(%r)
        with db.session_lock("retrain") as held:
            print("HELD" if held else "NOT", flush=True)
            time.sleep(120)
        """ % (SERVICE_DIR, postgres_url))], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "HELD"
        assert database.lock_is_held("retrain") is True
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait(10)
        deadline = time.monotonic() + 10
        while database.lock_is_held("retrain") and time.monotonic() < deadline:
            time.sleep(0.05)
        assert database.lock_is_held("retrain") is False
        with database.session_lock("retrain") as held:
            assert held is True
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait(10)
        database.close()
