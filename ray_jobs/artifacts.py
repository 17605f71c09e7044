"""The job folder layout (DESIGN.md "Artifacts") and the rule that makes it trustworthy:
a stage writes into ``<job_dir>/.partial/<stage>`` and the folder is renamed into place only when every
output is written, so a stage folder that exists is complete and a crash leaves nothing that looks finished.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

STAGES = ("data", "ensemble", "samples", "pairs", "policy", "eval")
# Pipeline stage name (as in events) -> the folder it publishes.
STAGE_FOLDERS = {
    "data": "data",
    "ensemble": "ensemble",
    "samples": "samples",
    "pairs": "pairs",
    "distill": "policy",
    "evaluate": "eval",
}


def home() -> Path:
    """Root of everything rmdistill keeps on this machine: jobs, the database, the model cache."""
    return Path(os.environ.get("RMDISTILL_HOME", "~/.rmdistill")).expanduser()


def model_cache() -> Path:
    """Where built-in and tiny models are materialised as Hugging Face folders (shared by every job)."""
    return Path(os.environ.get("RMDISTILL_CACHE", str(home() / "cache"))).expanduser()


def stage_dir(job_dir: str | os.PathLike[str], stage: str) -> Path:
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; expected one of {', '.join(STAGES)}")
    return Path(job_dir) / stage


def is_complete(job_dir: str | os.PathLike[str], stage: str) -> bool:
    return stage_dir(job_dir, stage).is_dir()


@contextlib.contextmanager
def staging(job_dir: str | os.PathLike[str], stage: str) -> Iterator[Path]:
    """Yield an empty folder to write the stage's outputs into; publish it atomically on success."""
    final = stage_dir(job_dir, stage)
    partial = Path(job_dir) / ".partial" / stage
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    yield partial
    if final.exists():
        shutil.rmtree(final)
    os.replace(partial, final)
