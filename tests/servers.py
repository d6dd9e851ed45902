"""Real servers for the tests that need them: a private PostgreSQL cluster, and nginx.

Both are Debian's own binaries (``.ci/run`` installs the ``postgresql`` and ``nginx``
packages), started in a temporary directory on a free 127.0.0.1 port, and stopped by the
process they started. PostgreSQL refuses to run as root: as root the cluster is created and
run as the ``postgres`` user, in a directory that user owns.
"""
from __future__ import annotations

import contextlib
import glob
import os
import shutil
import subprocess
import tempfile
import time
from typing import Iterator, List, Optional

from ports import free_port

#: Why a test that needs a real server did not run (for the loud summary in conftest.py).
NOT_RUN: List[str] = []


def require(server: str, binary: Optional[str]) -> str:
    """``binary``, or: fail (SERVERS_TEST_REQUIRED=1, as CI sets) or skip loudly."""
    if binary:
        return binary
    import pytest

    reason = "%s is not installed (apt-get install %s)" % (server, server)
    if os.environ.get("SERVERS_TEST_REQUIRED") == "1":
        pytest.fail(reason + "; SERVERS_TEST_REQUIRED=1 makes this a failure")
    NOT_RUN.append(reason)
    pytest.skip(reason)


def postgres_bin(name: str) -> Optional[str]:
    """A PostgreSQL server binary (``initdb``, ``pg_ctl``): on PATH, else Debian's versioned
    directory (``/usr/lib/postgresql/<version>/bin``), newest first."""
    for candidate in sorted(glob.glob("/usr/lib/postgresql/*/bin/%s" % name), reverse=True):
        return candidate
    return shutil.which(name)


def _as_postgres(argv: List[str]) -> List[str]:
    if os.geteuid() == 0:
        return ["runuser", "-u", "postgres", "--"] + argv
    return argv


@contextlib.contextmanager
def postgres_cluster(database: str = "deepfake", fsync: bool = False) -> Iterator[str]:
    """A private PostgreSQL cluster with one database; yields its ``postgresql://`` URL.
    ``fsync`` off by default (tests: nothing to keep); on for benchmarks that compare its
    durability with SQLite's ``synchronous=FULL``."""
    initdb, pg_ctl = postgres_bin("initdb"), postgres_bin("pg_ctl")
    if not initdb or not pg_ctl:
        raise RuntimeError("PostgreSQL's server binaries are not installed "
                           "(apt-get install postgresql)")
    root = tempfile.mkdtemp(prefix="tg-pg-")
    data = os.path.join(root, "data")
    if os.geteuid() == 0:
        shutil.chown(root, "postgres", "postgres")
    port = free_port()
    user = "postgres" if os.geteuid() == 0 else os.environ.get("USER") or "postgres"
    subprocess.run(_as_postgres([initdb, "-D", data, "-A", "trust", "-U", user, "-E", "UTF8",
                                 "--no-sync"]), check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.PIPE, timeout=120)
    options = ("-p %d -k %s -c listen_addresses=127.0.0.1 -c fsync=%s "
               "-c max_connections=200" % (port, root, "on" if fsync else "off"))
    subprocess.run(_as_postgres([pg_ctl, "-D", data, "-o", options, "-l",
                                 os.path.join(root, "log"), "-w", "-t", "60", "start"]),
                   check=True, stdout=subprocess.DEVNULL, timeout=90)
    try:
        url = "postgresql://%s@127.0.0.1:%d/postgres" % (user, port)
        _create_database(url, database)
        yield "postgresql://%s@127.0.0.1:%d/%s" % (user, port, database)
    finally:
        subprocess.run(_as_postgres([pg_ctl, "-D", data, "-m", "fast", "-w", "stop"]),
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60)
        shutil.rmtree(root, ignore_errors=True)


def _create_database(admin_url: str, name: str) -> None:
    import psycopg

    deadline = time.monotonic() + 30
    while True:
        try:
            with psycopg.connect(admin_url, autocommit=True) as conn:
                conn.execute('CREATE DATABASE "%s"' % name)
                return
        except psycopg.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def nginx_binary() -> Optional[str]:
    return shutil.which("nginx") or (os.path.exists("/usr/sbin/nginx") and "/usr/sbin/nginx") or None


@contextlib.contextmanager
def nginx_server(site_config: str) -> Iterator[subprocess.Popen]:
    """nginx in the foreground with ``site_config`` (an ``http``-context snippet: upstreams
    and servers) inside a minimal main configuration of its own temp directory."""
    nginx = nginx_binary()
    if not nginx:
        raise RuntimeError("nginx is not installed (apt-get install nginx)")
    root = tempfile.mkdtemp(prefix="tg-nginx-")
    for sub in ("client", "proxy", "fastcgi", "uwsgi", "scgi"):
        os.makedirs(os.path.join(root, sub))
    with open(os.path.join(root, "site.conf"), "w") as f:
        f.write(site_config)
    user = "user root;\n" if os.geteuid() == 0 else ""
    main = """%(user)sworker_processes 1;
daemon off;
pid %(root)s/nginx.pid;
error_log %(root)s/error.log warn;
events { worker_connections 1024; }
http {
    access_log off;
    client_body_temp_path %(root)s/client;
    proxy_temp_path %(root)s/proxy;
    fastcgi_temp_path %(root)s/fastcgi;
    uwsgi_temp_path %(root)s/uwsgi;
    scgi_temp_path %(root)s/scgi;
    include %(root)s/site.conf;
}
""" % {"root": root, "user": user}
    path = os.path.join(root, "nginx.conf")
    with open(path, "w") as f:
        f.write(main)
    check = subprocess.run([nginx, "-t", "-c", path, "-p", root], capture_output=True, text=True)
    if check.returncode != 0:
        raise RuntimeError("nginx refused the configuration:\n%s" % check.stderr)
    proc = subprocess.Popen([nginx, "-c", path, "-p", root], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    proc.root = root  # type: ignore[attr-defined]
    try:
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        shutil.rmtree(root, ignore_errors=True)
