"""A data folder that stops taking writes: the service answers 507 naming the folder, records nothing half-way,
keeps answering reads, and its database comes through intact.

The fault is real: the kernel refuses the service process's file writes. "Full" lowers the running service's
file-size limit to 0 (`prlimit`, so every write to a regular file fails with EFBIG, the way a full disk fails them
with ENOSPC); "read-only" runs the service in a private mount namespace where its data folder is a read-only bind
mount (EROFS), where user namespaces are allowed.
"""

from __future__ import annotations

import os
import resource
import shutil
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from service.ray_backend import free_port
from tests.test_service import wait_for

NOBODY_LISTENS = f"http://127.0.0.1:{free_port()}"  # no cluster: only the database and folders are exercised


def _can_remount_read_only() -> bool:
    unshare = shutil.which("unshare")
    if unshare is None:
        return False
    probe = subprocess.run([unshare, "-rm", "sh", "-c", "mount --bind / /mnt 2>/dev/null || true"], check=False)
    return probe.returncode == 0


@contextmanager
def _service(home: Path, wrap: list[str] | None = None) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    port = free_port()
    command = [str(Path(sys.executable).with_name("rmdistill")), "serve", "--port", str(port), "--data-dir", str(home)]
    env = {**os.environ, "RAY_ADDRESS": NOBODY_LISTENS}
    env.pop("RMDISTILL_TOKENS", None)
    # Output to /dev/null: a log file would itself be refused the writes this test takes away.
    proc = subprocess.Popen([*(wrap or []), *command], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        assert proc.poll() is None, f"the service exited with {proc.returncode}"
        try:
            return httpx.get(f"{url}/healthz", timeout=2).status_code in (200, 503)
        except httpx.TransportError:
            return False

    try:
        wait_for(up, 120, "the service to answer")
        yield proc, url
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(120)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _model_folder(home: Path, name: str) -> str:
    folder = home / "datasets" / name
    folder.mkdir(parents=True)
    (folder / "config.json").write_text('{"model_type": "llama"}')
    return str(folder)


def _register(url: str, policy_id: str, path: str) -> httpx.Response:
    return httpx.post(f"{url}/v1/policies", json={"id": policy_id, "path": path}, timeout=30)


def _database_after(home: Path) -> list[str]:
    """The policies the database holds, after checking it is not corrupt."""
    with sqlite3.connect(home / "rmdistill.db") as db:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        return [row[0] for row in db.execute("SELECT id FROM policies ORDER BY id")]


def test_a_full_data_folder_is_a_507_naming_it_and_nothing_is_half_saved(tmp_path: Path) -> None:
    home = tmp_path / "home"
    paths = [_model_folder(home, name) for name in ("before", "during", "after")]
    with _service(home) as (proc, url):
        assert _register(url, "pol-before", paths[0]).status_code == 201
        resource.prlimit(proc.pid, resource.RLIMIT_FSIZE, (0, resource.RLIM_INFINITY))
        refused = _register(url, "pol-during", paths[1])
        assert refused.status_code == 507, refused.text
        message = refused.json()["error"]["message"]
        assert str(home) in message and "nothing was saved" in message
        # Reads need no writes: the service keeps answering them.
        listed = httpx.get(f"{url}/v1/policies", timeout=30).json()["items"]
        assert [p["id"] for p in listed] == ["pol-before"]
        resource.prlimit(proc.pid, resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
        assert _register(url, "pol-after", paths[2]).status_code == 201  # room again: it works again
        assert proc.poll() is None
    assert _database_after(home) == ["pol-after", "pol-before"]


@pytest.mark.skipif(not _can_remount_read_only(), reason="this machine allows no private mount namespace")
def test_a_read_only_data_folder_is_a_507_and_the_database_stays_whole(tmp_path: Path) -> None:
    home = tmp_path / "home"
    paths = [_model_folder(home, name) for name in ("before", "during")]
    with _service(home) as (_, url):
        assert _register(url, "pol-before", paths[0]).status_code == 201
    # Restart with the data folder mounted read-only for the service alone (the test keeps its own view).
    remount = f'mount --bind "{home}" "{home}" && mount -o remount,bind,ro "{home}" && exec "$@"'
    with _service(home, wrap=["unshare", "-rm", "sh", "-c", remount, "sh"]) as (proc, url):
        refused = _register(url, "pol-during", paths[1])
        assert refused.status_code == 507, refused.text
        assert "nothing was saved" in refused.json()["error"]["message"]
        assert [p["id"] for p in httpx.get(f"{url}/v1/policies", timeout=30).json()["items"]] == ["pol-before"]
        assert proc.poll() is None
    assert _database_after(home) == ["pol-before"]
