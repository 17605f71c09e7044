"""A schema-driven fuzz of the whole API (schemathesis from the package index) finds no server error.

The service runs for real with its embedded Ray head, started with 0 CPUs: a reachable cluster that can run no job,
so job submission is fuzzed through admission (every valid spec is refused with a 409 naming the field) without
launching a job. Bounded in time, loopback only.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from service.background import BackgroundServer
from service.settings import Settings

TOKEN = "token-fuzz"
FUZZ_SECONDS = 45
pytestmark = [pytest.mark.slow, pytest.mark.ray, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BackgroundServer]:
    home = tmp_path_factory.mktemp("fuzz")
    server = BackgroundServer(Settings(data_dir=home, tokens=[TOKEN], ray_num_cpus=0)).start()
    yield server
    server.stop()


def test_no_input_gets_a_server_error(server, tmp_path):
    schemathesis = shutil.which("schemathesis", path=str(Path(sys.executable).parent))
    assert schemathesis, "schemathesis is a test dependency ([dev] extra)"
    cmd = [
        schemathesis,
        "run",
        f"{server.url}/openapi.json",
        "--header",
        f"Authorization: Bearer {TOKEN}",
        "--checks",
        "not_a_server_error",
        "--max-time",
        str(FUZZ_SECONDS),
        "--seed",
        "1",
    ]
    run = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=FUZZ_SECONDS + 240)
    summary = run.stdout[-5000:]
    assert run.returncode == 0, summary
    assert "Test cases:" in summary and "generated" in summary  # it really ran
