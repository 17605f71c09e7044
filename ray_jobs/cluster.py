"""The Ray cluster a job runs on: connecting to it, and whether it can ever hold what a spec asks for.

`check_resources` is the one admission rule, used by the service before it submits a job (answering 409) and by
the driver before its first stage (failing the job): a job must never wait forever on resources the cluster lacks.
Imports Ray only inside `connect` and `current_resources`, so the service can check specs with its own totals.
"""

from __future__ import annotations

import math
import os
import signal
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from ray_jobs.spec import DistillSpec, JobSpec


@dataclass(frozen=True)
class ClusterResources:
    cpus: float
    gpus: float
    max_node_cpus: float
    max_node_gpus: float
    nodes: int
    max_node_memory: float = 0.0  # bytes of Ray's `memory` resource on the largest node

    @classmethod
    def from_nodes(cls, totals: Iterable[Mapping[str, float]]) -> ClusterResources:
        """From each alive node's resource totals ({"CPU": .., "GPU": ..})."""
        totals = list(totals)
        return cls(
            cpus=sum(t.get("CPU", 0.0) for t in totals),
            gpus=sum(t.get("GPU", 0.0) for t in totals),
            max_node_cpus=max((t.get("CPU", 0.0) for t in totals), default=0.0),
            max_node_gpus=max((t.get("GPU", 0.0) for t in totals), default=0.0),
            nodes=len(totals),
            max_node_memory=max((t.get("memory", 0.0) for t in totals), default=0.0),
        )

    def describe(self) -> str:
        return f"the cluster has {self.cpus:g} CPUs and {self.gpus:g} GPUs on {self.nodes} node(s)"


class ResourceError(RuntimeError):
    """The cluster can never run this spec; `field` names the spec field that asks too much."""

    def __init__(self, field: str, message: str):
        self.field, self.message = field, message
        super().__init__(f"{field}: {message}")


def distill_worker_cpus(spec: DistillSpec, cluster: ClusterResources) -> tuple[float, int]:
    """(CPUs each distillation worker reserves, torch threads it computes with).

    Ray Train reserves one CPU per worker and Ray then gives the worker one thread, so a lone CPU worker trained on
    one core of a larger node. Reserving the whole node instead would make a job wait on anything else holding a CPU
    there (a served policy holds one for as long as it is loaded); so by default the reservation stays at one CPU
    and only the threads grow to the worker's share of the node.
    """
    if spec.cpus_per_worker is not None:
        return spec.cpus_per_worker, max(1, math.floor(spec.cpus_per_worker + 1e-9))
    return 1.0, max(1, math.floor(cluster.max_node_cpus / spec.num_workers))


def check_resources(spec: JobSpec, cluster: ClusterResources) -> None:
    """Raise ResourceError for the first thing this spec asks of the cluster that no placement could give."""
    have = cluster.describe()
    d = spec.distill
    cpus, _ = distill_worker_cpus(d, cluster)
    if d.use_gpu:
        if cluster.gpus == 0:
            raise ResourceError("distill.use_gpu", f"asks for GPUs but {have}")
        if d.num_workers > cluster.gpus:
            raise ResourceError("distill.num_workers", f"{d.num_workers} GPU workers asked but {have}")
    if cpus > cluster.max_node_cpus:
        raise ResourceError("distill.cpus_per_worker", f"{cpus:g} CPUs per worker but {have}")
    if d.num_workers * cpus > cluster.cpus:
        raise ResourceError("distill.num_workers", f"{d.num_workers} workers of {cpus:g} CPUs asked but {have}")
    # Generation and scoring run as actor pools of one CPU per replica.
    for field, replicas in (("generation.replicas", spec.generation.replicas), ("score.replicas", spec.score.replicas)):
        if replicas > max(cluster.cpus, 1):
            raise ResourceError(field, f"{replicas} one-CPU replicas asked but {have}")
    if not spec.trains_ensemble:
        return
    ens = spec.ensemble
    if ens.gpus_per_worker > 0 and cluster.gpus == 0:
        raise ResourceError("ensemble.gpus_per_worker", f"asks for GPUs but {have}")
    if ens.gpus_per_worker > cluster.max_node_gpus > 0:
        raise ResourceError("ensemble.gpus_per_worker", f"{ens.gpus_per_worker:g} GPUs per worker but {have}")
    if ens.cpus_per_worker > cluster.max_node_cpus:
        raise ResourceError("ensemble.cpus_per_worker", f"{ens.cpus_per_worker:g} CPUs per worker but {have}")
    if ens.workers_per_member * ens.cpus_per_worker > cluster.cpus:
        message = f"{ens.workers_per_member} workers of {ens.cpus_per_worker:g} CPUs per member but {have}"
        raise ResourceError("ensemble.workers_per_member", message)
    if ens.gpus_per_worker > 0 and ens.workers_per_member * ens.gpus_per_worker > cluster.gpus:
        message = f"{ens.workers_per_member} workers of {ens.gpus_per_worker:g} GPUs per member but {have}"
        raise ResourceError("ensemble.workers_per_member", message)


def current_resources() -> ClusterResources:
    """The totals of the cluster this process is connected to (needs `connect` first)."""
    import ray

    return ClusterResources.from_nodes(n["Resources"] for n in ray.nodes() if n.get("Alive"))


def connect(address: str | None = None, **init_kwargs: object) -> None:
    """Join the cluster at `address` (else $RAY_ADDRESS), or start a private local one; no-op when connected.

    "local" is explicit because a bare ray.init() would attach to whatever `ray start` head the machine runs.
    ray.init installs its own SIGTERM handler; the caller's (the driver's cancel handler) is put back.
    """
    import ray

    if ray.is_initialized():
        return
    previous = signal.getsignal(signal.SIGTERM)
    target = address or os.environ.get("RAY_ADDRESS") or "local"
    options: dict[str, object] = {"log_to_driver": False, "configure_logging": False, **init_kwargs}
    if target == "local":
        options.setdefault("include_dashboard", False)
    ray.init(address=target, **options)
    if callable(previous):
        signal.signal(signal.SIGTERM, previous)
