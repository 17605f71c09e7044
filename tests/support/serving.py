"""The real service on uvicorn serving policies on the session's Ray cluster, for the serving test modules."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from service.background import BackgroundServer
from service.settings import ServingSettings, Settings


@contextmanager
def serving_service(
    ray: Any,
    home: Path,
    policy: Path,
    tokens: Sequence[str],
    serving: ServingSettings,
    policy_ids: Sequence[str] = ("tiny",),
    **settings: Any,
) -> Iterator[BackgroundServer]:
    """The service on ``home``, ``policy`` registered under each of ``policy_ids`` by the first token; stopped, and
    its serving applications deleted, on exit. No jobs are submitted: the Ray address only keeps the app from
    starting an embedded head of its own."""
    running = BackgroundServer(
        Settings(
            data_dir=home,
            data_roots=(policy.parent,),
            tokens=list(tokens),
            ray_address=ray.get_runtime_context().gcs_address,
            serving=serving,
            **settings,
        )
    ).start(timeout_s=60)
    try:
        for pid in policy_ids:
            r = httpx.post(
                f"{running.url}/v1/policies",
                json={"path": str(policy), "id": pid},
                headers={"Authorization": f"Bearer {tokens[0]}"},
                timeout=30,
            )
            assert r.status_code == 201, r.text
        yield running
    finally:
        apps = list(running.app.state.serving.apps.values())
        running.stop(120)
        # A service on a cluster it does not own leaves its applications loaded for the next API process; the
        # session's cluster must not carry a module's replicas (a vLLM engine's memory) into every later test.
        from ray import serve

        for name in apps:
            if name in serve.status().applications:
                serve.delete(name)
