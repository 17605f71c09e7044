"""Resumable training state for distillation, stored through Ray Train or in a plain folder.

A checkpoint holds the trainable weights (the LoRA adapter alone when LoRA is on), the optimizer, the scheduler,
the step and every RNG, so a restarted worker continues the same run from that step. State dicts go through
`torch.distributed.checkpoint.state_dict`, which gathers full tensors for plain, DDP and FSDP models alike
(a collective under FSDP: every rank calls `gather`, rank 0 writes).
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)

STATE_FILE = "state.pt"
_OPTIONS = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def gather(model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, step: int) -> dict[str, Any]:
    model_sd, optim_sd = get_state_dict(model, optimizer, options=_OPTIONS)
    return {
        "model": model_sd,
        "optimizer": optim_sd,
        "scheduler": scheduler.state_dict(),
        "step": step,
        "rng": _rng_state(),
    }


def full_model_state(model: torch.nn.Module) -> dict[str, Any]:
    """Every weight as a full CPU tensor (a collective under FSDP), for writing the final policy."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=options)


def restore(folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any) -> int:
    """Load a checkpoint folder into the live objects; returns the step it was taken after."""
    state = torch.load(folder / STATE_FILE, map_location="cpu", weights_only=False)
    options = StateDictOptions(full_state_dict=True, cpu_offload=True, strict=False)
    set_state_dict(
        model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"], options=options
    )
    scheduler.load_state_dict(state["scheduler"])
    _set_rng_state(state["rng"])
    return int(state["step"])


class LocalCheckpoints:
    """``<root>/step-<N>/state.pt`` for runs without Ray Train; ``root=None`` turns checkpointing off."""

    def __init__(self, root: str | os.PathLike[str] | None, keep: int = 2):
        self.root = Path(root) if root else None
        self.keep = keep

    @contextlib.contextmanager
    def latest(self) -> Iterator[Path | None]:
        found = sorted(self.root.glob("step-*")) if self.root and self.root.is_dir() else []
        yield found[-1] if found else None

    def save(self, state: dict[str, Any] | None, step: int, metrics: dict[str, Any]) -> None:
        if self.root is None or state is None:
            return
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=self.root, prefix=".tmp-"))
        torch.save(state, tmp / STATE_FILE)
        os.replace(tmp, self.root / f"step-{step:08d}")
        for old in sorted(self.root.glob("step-*"))[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)


class RayCheckpoints:
    """Checkpoints through `ray.train.report`, so Ray Train's failure handling restarts from the newest one."""

    @contextlib.contextmanager
    def latest(self) -> Iterator[Path | None]:
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            yield None
            return
        with checkpoint.as_directory() as folder:
            yield Path(folder)

    def save(self, state: dict[str, Any] | None, step: int, metrics: dict[str, Any]) -> None:
        import ray.train

        # Every rank must call report (it is a barrier); only the rank holding the gathered state uploads.
        with tempfile.TemporaryDirectory() as folder:
            checkpoint = None
            if state is not None:
                torch.save(state, Path(folder) / STATE_FILE)
                checkpoint = ray.train.Checkpoint.from_directory(folder)
            ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=f"step-{step:08d}")
