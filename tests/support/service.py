"""`rmdistill serve` in a subprocess: a real API process, for tests that stop, kill and restart one."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from service.ray_backend import free_port

RMDISTILL = str(Path(sys.executable).with_name("rmdistill"))


class Service:
    """`rmdistill serve` on `home`, its output in a log file there."""

    def __init__(self, home: Path, *args: str, env: dict[str, str] | None = None):
        self.url = f"http://127.0.0.1:{free_port()}"
        base = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "RMDISTILL_"))}
        env = base | {"RMDISTILL_RAY_NUM_CPUS": "1", "RMDISTILL_CACHE": os.environ["RMDISTILL_CACHE"]} | (env or {})
        self.log = home / f"serve-{time.monotonic_ns()}.log"
        command = [RMDISTILL, "serve", "--data-dir", str(home), "--port", self.url.rsplit(":", 1)[1], *args]
        with self.log.open("wb") as out:
            self.process = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 300
        while not self._healthy():
            assert self.process.poll() is None, f"rmdistill serve exited:\n{self.log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"rmdistill serve did not come up:\n{self.log.read_text()[-3000:]}"
            time.sleep(0.3)

    def _healthy(self) -> bool:
        try:
            return httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    def get(self, path: str) -> dict:
        response = httpx.get(f"{self.url}{path}", timeout=30)
        response.raise_for_status()
        return response.json()

    def sigterm(self) -> float:
        """Seconds from SIGTERM to the exit, which must be by that signal, re-raised once the shutdown is done (an
        abort, -6, is Ray's crash handler cutting it short); killed, and failing the test, past two minutes."""
        start = time.monotonic()
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(120)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            pytest.fail(f"rmdistill serve still running 120 s after SIGTERM:\n{self.log.read_text()[-3000:]}")
        elapsed = time.monotonic() - start
        status = self.process.returncode
        assert status == -signal.SIGTERM, f"exit status {status}:\n{self.log.read_text()[-3000:]}"
        return elapsed
