"""The Ray Serve applications that hold the policies: one deployment on vLLM's async engine, one on transformers.

Each replica holds up to `max_policies_per_replica` policies at once through Serve's model multiplexing: a request
names its policy as the multiplexed model id, Serve routes it to a replica that already holds that policy when one
does, the replica loads it on first use, and loading one too many unloads the replica's least recently used policy.
Replicas are owned by Serve's controller, not by the API process: an API restart, or several API processes, find
the policies still loaded.

A policy's folder travels with each request (the replicas cannot read the service's store); a LoRA adapter is
merged into its base, in a Ray task of its own, before Serve's loader runs, so a slow or stalled merge holds up no
other policy's load.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
from ray import serve

from ray_jobs.generate.vllm import describe_failure, vllm_installed
from service.engines import (
    Delta,
    EngineUnavailableError,
    GenerationResult,
    SamplingRequest,
    ServedPolicy,
    VLLMRefusedError,
    materialise,
)
from service.settings import ServingSettings

APP_PREFIX = "rmdistill-policies"
# The multiplexed id of a base model whose engine serves LoRA adapter policies (vLLM), followed by the base's reference.
LORA_BASE = "lora-base:"
# Concurrent requests for one policy that the transformers deployment gathers into one batch, and how long the
# first of them waits for others.
HF_BATCH_REQUESTS = 32
HF_BATCH_WAIT_S = 0.005


@dataclass
class PolicyCall:
    policy_id: str
    path: str
    request: SamplingRequest


class _Resident(ServedPolicy):
    """A policy held by a replica; Serve calls ``__del__`` when it unloads it (LRU), which frees the engine."""

    def __init__(self, engine: Any, on_unload: Any) -> None:
        super().__init__(engine)
        self._on_unload = on_unload
        self._closed = False

    def __del__(self) -> None:
        # Serve calls it on unload, and the interpreter again when the object is collected: close once.
        if not getattr(self, "_closed", True):
            self._closed = True
            self._on_unload()
            self.close()


class _PolicyReplica:
    """What both deployments share; a subclass builds the engine and `multiplexed` adds Serve's loader."""

    engine_name = ""

    def __init__(self, options: ServingSettings, gpus: float) -> None:
        self.options, self.gpus = options, gpus
        self._paths: dict[str, str] = {}
        self._folders: dict[str, asyncio.Task[Path]] = {}
        self.resident: dict[str, ServedPolicy] = {}
        self.loads = 0

    async def stream(self, call: PolicyCall) -> AsyncIterator[Delta | GenerationResult]:
        policy = await self._policy(call)
        async for item in policy.stream(call.request):
            yield item

    async def generate(self, call: PolicyCall) -> GenerationResult:
        return await (await self._policy(call)).generate(call.request)

    async def loaded(self) -> dict[str, Any]:
        """This replica, the policies it holds (least recently used first) and how many loads it has done."""
        return {
            "replica": serve.get_replica_context().replica_id.unique_id,
            "engine": self.engine_name,
            "policies": list(self.resident),
            "actor": ray.get_runtime_context().get_actor_name(),
            "loads": self.loads,
            "pid": os.getpid(),
        }

    async def policy(self, policy_id: str) -> ServedPolicy:  # replaced by Serve's multiplexed loader
        raise NotImplementedError

    async def _policy(self, call: PolicyCall) -> ServedPolicy:
        self._paths[call.policy_id] = call.path
        await self._folder(call.policy_id, call.path)
        policy = await self.policy(call.policy_id)
        # Kept in Serve's order (least recently used first), for `loaded`.
        if call.policy_id in self.resident:
            self.resident[call.policy_id] = self.resident.pop(call.policy_id)
        return policy

    async def _folder(self, policy_id: str, path: str) -> Path:
        """The policy's loadable folder, prepared once per path however many requests wait for it."""
        task = self._folders.get(path)
        if task is None or (task.done() and task.exception() is not None):
            task = self._folders[path] = asyncio.ensure_future(_prepare(path))
        try:
            # Shielded: a client that hangs up does not cancel the preparation the other waiters share.
            return await asyncio.wait_for(asyncio.shield(task), self.options.load_timeout_s)
        except TimeoutError as exc:
            raise EngineUnavailableError(f"could not load policy {policy_id!r} from {path}: timed out") from exc
        except EngineUnavailableError:
            raise
        except Exception as exc:
            raise EngineUnavailableError(
                f"could not load policy {policy_id!r} from {path}: {describe_failure(exc)}"
            ) from exc

    async def _load(self, policy_id: str) -> ServedPolicy:
        folder = await self._folder(policy_id, self._paths[policy_id])
        # In a thread: loading takes seconds, and the replica goes on serving the policies it holds meanwhile.
        build = asyncio.ensure_future(asyncio.to_thread(self._build, policy_id, folder))
        try:
            engine = await asyncio.wait_for(build, self.options.load_timeout_s)
        except TimeoutError as exc:
            raise EngineUnavailableError(
                f"could not load policy {policy_id!r}: timed out after {self.options.load_timeout_s:.0f} s"
            ) from exc
        except EngineUnavailableError:
            raise
        except Exception as exc:
            raise EngineUnavailableError(
                f"could not load policy {policy_id!r} from {folder}: {describe_failure(exc)}"
            ) from exc
        self.loads += 1
        self.resident[policy_id] = policy = _Resident(engine, lambda: self.resident.pop(policy_id, None))
        return policy

    def _build(self, policy_id: str, folder: Path) -> Any:
        raise NotImplementedError


class TransformersPolicies(_PolicyReplica):
    """Policies on transformers; concurrent requests for one policy are batched by `@serve.batch`."""

    engine_name = "hf"

    def _build(self, policy_id: str, folder: Path) -> Any:
        from service.hf_engine import HFEngine

        return HFEngine(folder, self.options.max_model_len, submit=self._batch)

    @serve.batch(max_batch_size=HF_BATCH_REQUESTS, batch_wait_timeout_s=HF_BATCH_WAIT_S)
    async def _batch(self, jobs: list[Any]) -> list[None]:
        # Serve splits batches by multiplexed model id, so these jobs are one policy's (one engine, unless the policy
        # was unloaded and loaded again between their arrivals).
        engines: dict[int, list[Any]] = {}
        for job in jobs:
            engines.setdefault(id(job.engine), []).append(job)
        for group in engines.values():
            await group[0].engine.run_jobs(group)
        return [None] * len(jobs)


class VLLMPolicies(_PolicyReplica):
    """Policies on vLLM's async engine. A policy vLLM cannot load is refused with VLLMRefusedError, remembered, so
    engine auto sends it to the transformers deployment without trying again."""

    engine_name = "vllm"

    def __init__(self, options: ServingSettings, gpus: float) -> None:
        super().__init__(options, gpus)
        self._refused: dict[Path, str] = {}

    def _build(self, policy_id: str, folder: Path) -> Any:
        if not vllm_installed():
            raise VLLMRefusedError("vLLM is not installed (pip install 'rmdistill[vllm]')")
        if folder in self._refused:
            raise VLLMRefusedError(self._refused[folder])
        from service.vllm_engine import VLLMEngine

        # The replica's GPU share, split among the engines it may hold at once, with vLLM's usual 10% headroom.
        share = 0.9 * self.gpus / self.options.max_policies_per_replica if self.gpus else None
        # A base model loaded for adapter policies serves them all, applying each request's own adapter.
        rank = self.options.max_lora_rank if policy_id.startswith(LORA_BASE) else None
        try:
            return VLLMEngine(folder, self.options.max_model_len, gpu_memory_utilization=share, lora_rank=rank)
        except Exception as exc:
            self._refused[folder] = f"vLLM could not run {folder}: {describe_failure(exc)}"
            raise VLLMRefusedError(self._refused[folder]) from exc


@ray.remote(num_cpus=0)
def _materialise_task(path: str) -> Path:
    from ray_jobs.models.registry import resolve_model_path

    # A policy is a folder (resolving fetches it from the artifact root onto a node that lacks it); the base model of
    # adapter policies may be any model reference (tiny:llama, a hub id...).
    return materialise(str(resolve_model_path(path)))


async def _prepare(path: str) -> Path:
    """``materialise(path)`` in a Ray task on this node, not in the replica: reading a checkpoint can block while
    holding the GIL (safetensors opens files from Rust), and a merge that hangs on a stalled file system would then
    freeze every policy the replica holds until Serve's health check replaced it. The task shares the node's model
    cache, and takes no CPU from the reservations (a one-off merge, on a node whose CPUs replicas may all hold)."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    ref = _materialise_task.options(scheduling_strategy=here).remote(path)
    try:
        return await ref
    except asyncio.CancelledError:
        ray.cancel(ref, force=True)
        raise


DEPLOYMENTS: dict[str, type[_PolicyReplica]] = {"vllm": VLLMPolicies, "hf": TransformersPolicies}


def multiplexed(cls: type[_PolicyReplica], max_policies: int) -> type[_PolicyReplica]:
    """``cls`` with Serve's multiplexed loader as its ``policy`` method, holding ``max_policies`` per replica.

    Serve reads the bound when the method is decorated, and finds multiplexing on the class itself, so the
    setting makes a subclass.
    """

    class Replica(cls):  # type: ignore[valid-type, misc]
        @serve.multiplexed(max_num_models_per_replica=max_policies)
        async def policy(self, policy_id: str) -> ServedPolicy:
            return await self._load(policy_id)

    Replica.__name__ = Replica.__qualname__ = cls.__name__
    return Replica


def engines_for(options: ServingSettings) -> list[str]:
    """The deployments an engine setting needs, in the order a policy tries them."""
    return {"auto": ["vllm", "hf"], "vllm": ["vllm"], "hf": ["hf"]}[options.engine]


# How a process reaches and manages the applications, not what they serve: left out of their names and configs.
NOT_SERVED = {"ray_address", "deploy"}


def app_name(options: ServingSettings, engine: str) -> str:
    """One application per engine, named by a digest of the settings: an API process with the same settings finds
    and reuses it, one with other settings deploys its own."""
    digest = hashlib.sha256(options.model_dump_json(exclude=NOT_SERVED).encode()).hexdigest()[:10]
    return f"{APP_PREFIX}-{engine}-{digest}"


def serve_config(options: ServingSettings) -> dict[str, Any]:
    """The Serve config (`serve deploy`, a RayService's ``serveConfigV2``) of the applications that an API process
    with these settings finds instead of deploying its own. No HTTP route: the API reaches them through handles."""
    return {
        "applications": [
            {
                "name": app_name(options, engine),
                "import_path": f"{__name__}:application",
                "route_prefix": None,
                "args": {"engine": engine, "settings": options.model_dump(mode="json", exclude=NOT_SERVED)},
            }
            for engine in engines_for(options)
        ]
    }


def application(args: dict[str, Any]) -> Any:
    """Serve's application builder for `serve_config`'s import path, run by Serve where the config is deployed."""
    options = ServingSettings.model_validate(args["settings"])
    return build(options, args["engine"], ray.cluster_resources().get("GPU", 0))


def build(options: ServingSettings, engine: str, cluster_gpus: float) -> Any:
    """The Serve application of one engine's deployment."""
    gpus = options.num_gpus if options.num_gpus is not None else (0.25 if cluster_gpus else 0.0)
    # Under engine auto the transformers deployment serves only what vLLM refuses: it costs nothing until then.
    fallback = options.engine == "auto" and engine == "hf"
    deployment = serve.deployment(
        multiplexed(DEPLOYMENTS[engine], options.max_policies_per_replica),
        name=DEPLOYMENTS[engine].__name__,
        ray_actor_options={"num_cpus": options.num_cpus, "num_gpus": gpus},
        autoscaling_config={
            "min_replicas": 0 if fallback else options.min_replicas,
            "max_replicas": options.max_replicas,
            "target_ongoing_requests": options.target_ongoing_requests,
            # Serve averages the load over its look-back window before it may scale down: an idle time shorter
            # than the default 30 s window must shorten the window too.
            "downscale_delay_s": options.idle_s,
            "downscale_to_zero_delay_s": options.idle_s,
            "look_back_period_s": min(30.0, options.idle_s),
            "metrics_interval_s": min(10.0, options.idle_s / 2),
        },
        max_ongoing_requests=options.max_ongoing_requests,
    )
    return deployment.bind(options, gpus)
