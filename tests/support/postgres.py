"""A throwaway PostgreSQL server for the store's tests: Debian's `postgresql` binaries, a fresh cluster in a temporary
folder, listening on a free loopback port, removed when the tests end (also when they fail).

`make test` installs the package when it is missing and the machine can (scripts/test-services.sh). Where the
binaries are absent, the PostgreSQL cases skip with a reason instead of passing silently; under CI they fail.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path


def bin_dir() -> Path | None:
    """Folder of initdb and pg_ctl: Debian keeps them off PATH, under /usr/lib/postgresql/<major>/bin."""
    found = shutil.which("initdb")
    if found:
        return Path(found).resolve().parent
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    return Path(candidates[-1]).parent if candidates else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _as(user: str | None, argv: list[str], prefix: Sequence[str] = ()) -> list[str]:
    # initdb and postgres refuse to run as root: as root, run them as the package's `postgres` user.
    return [*prefix, *(["runuser", "-u", user, "--"] if user else []), *argv]


@contextmanager
def postgres_server(prefix: Sequence[str] = ()) -> Iterator[str]:
    """Start a server; yield the SQLAlchemy URL of its `postgres` database (superuser `postgres`, trust on loopback).

    `prefix` runs the server under a command such as ``ip netns exec NS``: it then listens on that namespace's
    loopback, for a service running there."""
    bindir = bin_dir()
    if bindir is None:
        raise FileNotFoundError("PostgreSQL's initdb was not found (Debian package `postgresql`)")
    user = None
    root = Path(tempfile.mkdtemp(prefix="rmdistill-pg-"))
    if os.geteuid() == 0:
        user = "postgres"
        entry = pwd.getpwnam(user)
        os.chown(root, entry.pw_uid, entry.pw_gid)
    data, port = root / "data", _free_port()
    try:
        initdb = [str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "-A", "trust", "-E", "UTF8"]
        subprocess.run(_as(user, initdb), check=True, capture_output=True)
        options = f"-c listen_addresses=127.0.0.1 -p {port} -k {root} -c fsync=off -c max_connections=60"
        start = [str(bindir / "pg_ctl"), "-D", str(data), "-l", str(root / "log"), "-o", options, "-w", "start"]
        subprocess.run(_as(user, start, prefix), check=True, capture_output=True)
        yield f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres"
    finally:
        if (data / "postmaster.pid").exists():
            stop = [str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"]
            subprocess.run(_as(user, stop, prefix), capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


def fresh_database(server_url: str, name: str) -> str:
    """Create an empty database on the server and return its URL, so each test starts from nothing."""
    from sqlalchemy import create_engine, text

    engine = create_engine(server_url, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
            connection.execute(text(f'CREATE DATABASE "{name}"'))
    finally:
        engine.dispose()
    return server_url.rsplit("/", 1)[0] + f"/{name}"
