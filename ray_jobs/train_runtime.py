"""What differs between a training loop inside a Ray Train worker and the same loop run alone: rank, world size,
device, model wrapping (DDP/FSDP), collectives and dataset shards. The ensemble's member loop and the distill loop
take one `WorkerRuntime`, so each is a plain PyTorch function that Ray Train wraps unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch


def in_ray_train() -> bool:
    try:
        import ray.train

        ray.train.get_context()
    except (ImportError, RuntimeError, DeprecationWarning):
        # Ray raises DeprecationWarning inside a Tune trial function: a loop run there is not in a Train worker.
        return False
    return True


class WorkerRuntime:
    def __init__(self, use_gpu: bool | None = None):
        self.ray = in_ray_train()
        if self.ray:
            import ray.train
            import ray.train.torch

            ctx = ray.train.get_context()
            self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
            self.device = ray.train.torch.get_device()
        else:
            self.rank, self.world = 0, 1
            want_gpu = torch.cuda.is_available() if use_gpu is None else use_gpu
            self.device = torch.device("cuda" if want_gpu else "cpu")

    @property
    def collective(self) -> bool:
        return torch.distributed.is_available() and torch.distributed.is_initialized()

    def prepare(self, model: torch.nn.Module, strategy: str = "ddp") -> torch.nn.Module:
        """Moved to this worker's device, and wrapped for DDP/FSDP under Ray Train."""
        if not self.ray:
            return model.to(self.device)
        import ray.train.torch

        return ray.train.torch.prepare_model(model, parallel_strategy=strategy)

    def dataset_shard(self, name: str) -> Any:
        import ray.train

        return ray.train.get_dataset_shard(name)

    def gather(self, obj: Any) -> list[Any]:
        """`obj` from every rank, in rank order."""
        if not self.collective:
            return [obj]
        out: list[Any] = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(out, obj)
        return out

    def mean(self, value: float) -> float:
        return float(np.mean(self.gather(value)))


def node_info() -> dict[str, str | None]:
    """The Ray node (id, IP) and host this process runs on, for placement records; ids are None outside Ray."""
    import socket

    try:
        import ray

        if ray.is_initialized():
            return {
                "node_id": ray.get_runtime_context().get_node_id(),
                "node_ip": ray.util.get_node_ip_address(),
                "host": socket.gethostname(),
            }
    except ImportError:
        pass
    return {"node_id": None, "node_ip": None, "host": socket.gethostname()}


def process_start_time() -> float:
    """When this process started (Unix time): a Ray worker's start-up cost is the gap between this and its task."""
    import psutil

    return psutil.Process().create_time()


@contextmanager
def intra_op_threads(cpus: float) -> Iterator[int]:
    """torch's intra-op threads set to the CPUs a worker reserved (Ray's rule: the floor, at least 1) for the block.

    Ray derives a worker's OMP_NUM_THREADS from its own reservation, which for a loop run inside a Tune trial is the
    trial's (worker share plus the trial's own), and torch fixes its pool from that variable when first imported:
    set explicitly, a member computes with the same threads wherever it runs, and K members on K cores never run
    more threads than cores. The previous count is restored, so a plain run leaves its process as it found it.
    """
    threads = max(1, math.floor(cpus + 1e-9))
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield threads
    finally:
        torch.set_num_threads(before)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside a DDP/FSDP wrapper (or the model itself)."""
    inner = getattr(model, "module", None)
    return inner if isinstance(inner, torch.nn.Module) else model


def live_placement_groups() -> set[str]:
    """Ids of this job's placement groups that still hold (or wait for) resources."""
    import ray
    from ray.util import placement_group_table

    job = ray.get_runtime_context().get_job_id()
    # A placement group's id ends with its job's id.
    return {pg for pg, info in placement_group_table().items() if pg.endswith(job) and info["state"] != "REMOVED"}


@contextmanager
def reclaiming_placement_groups() -> Iterator[None]:
    """Remove the placement groups this job made inside the block and left behind.

    A Tune trial killed mid-fit (an OOM kill, a lost node) takes Ray Train's placement-group cleaner with it, and
    the member's worker-group reservation stays held for the life of the driver: the next stage sized to the
    cluster (distillation on every CPU) then waits for it forever. Once the block is over none of them is in use.
    """
    import ray
    from ray.util import remove_placement_group
    from ray.util.placement_group import PlacementGroup

    before = live_placement_groups()
    try:
        yield
    finally:
        for pg in live_placement_groups() - before:
            remove_placement_group(PlacementGroup(ray.PlacementGroupID(bytes.fromhex(pg))))
