"""The API process's side of serving: deploys the policy applications on first use (or finds them running) and
sends each request to its policy through Serve deployment handles.

Used from the API process's event loop. If that process is not yet a Ray driver, the first request connects it to
the serving cluster (`ServingSettings.ray_address`, else the embedded head's GCS or RAY_ADDRESS's; None starts a
private local Ray).
Under engine auto a policy goes to the vLLM deployment first; one vLLM refuses goes to the transformers deployment
from then on. A request whose replica died before it streamed anything is sent once more (Serve replaces the
replica and routes around the dead one).
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

from service.engines import (
    Delta,
    EngineRequestError,
    EngineUnavailableError,
    GenerationResult,
    LoraAdapter,
    SamplingRequest,
    VLLMRefusedError,
    adapter_base,
)
from service.settings import ServingSettings

log = logging.getLogger(__name__)

# What a replica raises that the caller should see as is (Ray wraps it; the wrapper's cause is the original).
_PASSED_ON = (EngineRequestError, EngineUnavailableError)


class PolicyServing:
    # service.policy_app (and with it Ray) is imported only once serving starts: `rmdistill serve` imports this module
    # before it sets the embedded head's auth variables, which Ray reads when it is first imported.

    def __init__(self, options: ServingSettings, ray_address: str | None = None) -> None:
        # Serve's handles run threads that call Ray; after this process disconnects they must not start a Ray
        # instance of their own (Ray connects on first use unless told not to, and reads this when imported).
        os.environ.setdefault("RAY_ENABLE_AUTO_CONNECT", "0")
        from service.policy_app import app_name, engines_for

        self.options = options
        self.ray_address = options.ray_address or ray_address
        self.engines = engines_for(options)
        self.apps = {engine: app_name(options, engine) for engine in self.engines}
        self._handles: dict[str, Any] = {}
        self._ready = asyncio.Lock()
        self._engine_of: dict[str, str] = {}  # policies vLLM refused: served by transformers
        self._bases: dict[str, str | None] = {}  # adapter policies served on their base model's engine
        self._own_ray = False  # whether this object made the process a Ray driver (and so disconnects it)

    async def generate(self, policy_id: str, path: str, request: SamplingRequest) -> GenerationResult:
        # Run to exhaustion (one item) so the call's cleanup happens now, not when the generator is collected.
        [result] = [item async for item in self._call(policy_id, path, request, stream=False)]
        assert isinstance(result, GenerationResult)
        return result

    def stream(self, policy_id: str, path: str, request: SamplingRequest) -> AsyncIterator[Delta | GenerationResult]:
        """Deltas while the policy generates, then the GenerationResult."""
        return self._call(policy_id, path, request, stream=True)

    async def replicas(self) -> list[dict[str, Any]]:
        """What a replica of each deployed engine holds (`loaded` of service/policy_app.py): for tests and probes."""
        handles = await self._deployments()
        return [await handle.loaded.remote() for handle in handles.values()]

    async def _call(
        self, policy_id: str, path: str, request: SamplingRequest, stream: bool
    ) -> AsyncIterator[Delta | GenerationResult]:
        from ray.exceptions import ActorDiedError, ActorUnavailableError, RayTaskError

        handles = await self._deployments()
        for attempt in range(2):
            engine = self._engine_of.get(policy_id, self.engines[0])
            model_id, call = self._route(engine, policy_id, path, request)
            # gRPC between this process and the replica (`_by_reference=False`, what Serve's throughput preset
            # RAY_SERVE_USE_GRPC_BY_DEFAULT turns on) instead of one Ray object per streamed item: at 8 streams it
            # brought the service from 0.84× to 0.94–0.95× of `vllm serve`'s requests/s (docs/RESULTS.md).
            handle = handles[engine].options(multiplexed_model_id=model_id, stream=stream, _by_reference=False)
            started = False
            try:
                if stream:
                    async for item in handle.stream.remote(call):
                        started = True
                        yield item
                else:
                    yield await handle.generate.remote(call)
                return
            except RayTaskError as exc:
                cause = exc.cause
                if isinstance(cause, VLLMRefusedError) and engine == "vllm" and "hf" in self.engines:
                    log.warning("%s; serving %s with transformers", cause, policy_id)
                    self._engine_of[policy_id] = "hf"
                    self._bases.pop(policy_id, None)
                    continue
                # Re-raised bare so callers see the replica's message, not a remote traceback.
                if isinstance(cause, _PASSED_ON):
                    raise type(cause)(str(cause)) from None
                raise
            except (ActorDiedError, ActorUnavailableError) as exc:
                # A stream that already sent text cannot be replayed without duplicating it.
                if attempt or started:
                    raise EngineUnavailableError(f"the replica serving {policy_id!r} died: {exc}") from exc
                log.warning("the replica serving %s died (%s); sending the request again", policy_id, exc)

    def _route(self, engine: str, policy_id: str, path: str, request: SamplingRequest) -> tuple[str, Any]:
        """The multiplexed id and call for a policy on an engine: its own, or, for a LoRA adapter on vLLM, its base
        model's, with the adapter riding on the request (every adapter of a base shares one engine)."""
        from service.policy_app import LORA_BASE, PolicyCall

        if policy_id not in self._bases:
            use_lora = engine == "vllm" and self.options.max_lora_rank
            self._bases[policy_id] = adapter_base(path) if use_lora else None
        base = self._bases[policy_id]
        if base is None:
            return policy_id, PolicyCall(policy_id, path, request)
        model_id = LORA_BASE + base
        return model_id, PolicyCall(model_id, base, replace(request, lora=LoraAdapter(policy_id, path)))

    async def _deployments(self) -> dict[str, Any]:
        async with self._ready:
            if not self._handles:
                self._handles = await asyncio.to_thread(self._deploy)
        return self._handles

    def _deploy(self) -> dict[str, Any]:
        """Connect, and deploy each engine's application unless one with these settings already runs."""
        import ray
        from ray import serve

        from service.policy_app import APP_PREFIX, build

        if not ray.is_initialized():
            if (self.ray_address or "").startswith(("http://", "https://")):
                # A dashboard URL serves job submission only; a driver connects through the GCS or ray://.
                raise EngineUnavailableError(
                    f"serving needs the cluster's GCS address (host:port), not the dashboard URL {self.ray_address}: "
                    "set RMDISTILL_SERVING_RAY_ADDRESS"
                )
            ray.init(address=self.ray_address or "local", namespace="rmdistill", log_to_driver=False)
            self._own_ray = True
        if not self.options.deploy:
            return self._attach()
        # Handles only: no HTTP proxy, whose port would clash with the service's.
        serve.start(proxy_location="Disabled")
        running = serve.status().applications
        gpus = ray.cluster_resources().get("GPU", 0)
        for engine, name in self.apps.items():
            if name not in running or running[name].status in ("DEPLOY_FAILED", "DELETING"):
                log.info("deploying %s", name)
                serve.run(build(self.options, engine, gpus), name=name, route_prefix=None)
        # Applications of other settings, left by an earlier service, would hold their replicas' CPUs for nothing.
        for name in running:
            if name.startswith(APP_PREFIX) and name not in self.apps.values():
                log.info("deleting %s, deployed with other settings", name)
                serve.delete(name, _blocking=False)
        return {engine: serve.get_app_handle(name) for engine, name in self.apps.items()}

    def _attach(self) -> dict[str, Any]:
        """Handles to applications deployed by someone else (a RayService), or 503 naming the first one missing."""
        from ray import serve
        from ray.serve.exceptions import RayServeException

        try:
            running = serve.status().applications
        except RayServeException:
            running = {}
        for name in self.apps.values():
            if name not in running or running[name].status != "RUNNING":
                state = running[name].status if name in running else "not deployed"
                raise EngineUnavailableError(
                    f"serving application {name} is {state} on the cluster; with RMDISTILL_SERVING_DEPLOY=false it "
                    "comes from a RayService or `serve deploy` (`rmdistill serving-config` prints its config)"
                )
        return {engine: serve.get_app_handle(name) for engine, name in self.apps.items()}

    async def shutdown(self, delete: bool) -> None:
        """Disconnect; ``delete``: also delete the applications, unloading every policy (else they stay loaded
        for the next API process)."""
        if self._handles and delete and self.options.deploy:
            from ray import serve

            for name in self.apps.values():
                await asyncio.to_thread(serve.delete, name)
        self._handles = {}
        if self._own_ray:
            import ray

            # Disconnect before the app stops an embedded head, or the driver logs connection errors on exit.
            ray.shutdown()
            self._own_ray = False
