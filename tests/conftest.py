"""Shared fixtures: one real local Ray cluster per pytest session, offline Hugging Face, a private model cache."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from support.s3 import S3Server

# No machine here reaches a model hub; anything that tries must fail fast, not hang.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
# Built-in model conversions are slow (SmolLM2's GGUF takes ~20 s): keep them across test runs.
os.environ.setdefault("RMDISTILL_CACHE", str(Path.home() / ".cache" / "rmdistill-tests"))

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data, or skip: a user's clone has no shared folder."""
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is not present")
    return SHARED_DATA


@pytest.fixture(scope="session")
def ray_cluster():
    """A real local Ray head (2 CPUs, no dashboard), started once and shared by every test that needs Ray.

    address="local" forces a fresh cluster: a bare ray.init() would attach to any `ray start` head on the machine.
    """
    import ray

    for attempt in range(2):
        if ray.is_initialized():
            break
        try:
            ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
        except Exception:
            # A loaded machine can miss Ray's raylet-registration deadline; one fresh try is enough in practice.
            ray.shutdown()
            if attempt:
                raise
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_llama() -> Path:
    """Folder of the deterministic tiny causal LM (vLLM-loadable: head size >= 32)."""
    from ray_jobs.models.registry import resolve_model_path

    return resolve_model_path("tiny:llama")


@pytest.fixture(scope="session")
def tiny_bert() -> Path:
    """Folder of the deterministic tiny encoder used as a reward-model backbone."""
    from ray_jobs.models.registry import resolve_model_path

    return resolve_model_path("tiny:bert")


@pytest.fixture(scope="session")
def postgres_server_url() -> Iterator[str]:
    """A real PostgreSQL server for this session (tests/support/postgres.py); skipped where none can run, but
    never under CI, whose `make test` installs it."""
    from support.postgres import bin_dir, postgres_server

    if bin_dir() is None:
        message = "PostgreSQL is not installed (Debian package `postgresql`; make test installs it as root)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    with postgres_server() as url:
        yield url


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty database of each kind the store supports: a SQLite file, and a fresh PostgreSQL database."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'store.sqlite'}"
    from support.postgres import fresh_database

    server = request.getfixturevalue("postgres_server_url")
    return fresh_database(server, f"t_{abs(hash(request.node.nodeid)) % 10**12}")


@pytest.fixture(scope="session")
def s3() -> Iterator[S3Server]:
    """moto's S3 server on loopback for this session (tests/support/s3.py), reached over real HTTP."""
    from support.s3 import s3_server

    with s3_server() as server:
        yield server
