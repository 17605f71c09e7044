"""The FastAPI application: job API, policies, the serving routes, health and metrics.

`create_app(settings)` builds it; the lifespan opens the store (running migrations), connects to or starts Ray
(re-attaching to the embedded head a previous service left running), reconciles non-final jobs before the first
request, follows jobs in the background, and undoes it all on exit, except that an embedded head is left running
with its jobs unless `stop_cluster`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from ray_jobs.artifact_store import ArtifactStore
from service import artifacts_api, dashboard, datasets_api, experiments_api, jobs_api, ops_api, policies_api, serving
from service.errors import error_response, install_error_handlers
from service.follower import JobFollower
from service.launch import Launcher
from service.metrics import LatencyMiddleware
from service.ray_backend import RayBackend, RayUnavailable, gcs_address_of
from service.serving_client import PolicyServing
from service.settings import Settings
from service.store import Store

log = logging.getLogger("rmdistill.service")

# What uvicorn gives open requests on shutdown before cancelling them. Event streams never end on their own while
# their job runs and would hold the exit for as long; cut, a client resumes from its last event id (the SDK does).
SHUTDOWN_GRACE_S = 2


class BodyLimitMiddleware:
    """413 for bodies over the limit, whether announced by Content-Length or streamed in chunks; paths under a
    prefix of `larger` (uploads) have that prefix's limit instead."""

    def __init__(self, app: Any, max_bytes: int, larger: dict[str, int] | None = None):
        self.app, self.max_bytes, self.larger = app, max_bytes, larger or {}

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        limit = next((n for prefix, n in self.larger.items() if path.startswith(prefix)), self.max_bytes)
        too_large = f"request body over the {limit}-byte limit"
        length = dict(scope.get("headers") or []).get(b"content-length", b"")
        if length.isdigit() and int(length) > limit:
            await error_response(413, too_large)(scope, receive, send)
            return
        received = 0

        async def limited() -> dict:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    # HTTPException, not ApiError: FastAPI turns other errors raised while reading a body into 400.
                    raise HTTPException(413, too_large)
            return message

        await self.app(scope, limited, send)


def _mark_orphaned(store: Store) -> None:
    reason = "the service stopped, and with it the embedded Ray head that ran this job"
    for job in store.active_jobs():
        store.transition(job.id, "failed", reason, error=reason)


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: Settings = app.state.settings
    for folder in (settings.data_dir, settings.jobs_dir, *settings.data_roots[:1]):
        folder.mkdir(parents=True, exist_ok=True)
    store = app.state.store = Store(settings.database_url)
    backend = app.state.backend = RayBackend(
        settings.data_dir, settings.ray_address, settings.ray_num_cpus, artifacts=settings.artifacts
    )
    try:
        await asyncio.to_thread(backend.start)
    except RayUnavailable as exc:
        # Stay up: reads work, submissions answer 503 with this reason.
        log.error("Ray is unavailable: %s", exc)
    follower = JobFollower(
        store, backend, settings.poll_interval_s, Launcher(store, backend, settings), artifacts=app.state.artifacts
    )
    await asyncio.to_thread(follower.sync_all)
    task = asyncio.create_task(follower.run())
    # Policies are served on the same cluster as the jobs: the embedded head's GCS, else RAY_ADDRESS's (a dashboard
    # URL cannot take a driver: its host at Ray's default GCS port). RMDISTILL_SERVING_RAY_ADDRESS overrides both.
    embedded_gcs = backend.head.gcs_address if backend.embedded and backend.head else None
    serving_address = embedded_gcs or gcs_address_of(settings.ray_address)
    serving = app.state.serving = PolicyServing(settings.serving, ray_address=serving_address)
    try:
        yield
    finally:
        experiments_api.stop_all(app.state)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        # Policies stay loaded in Serve for the next service unless this one is told to stop; an embedded head about
        # to stop takes its applications with it, without Serve's graceful drain of each replica (many seconds).
        stop_head = backend.embedded and app.state.stop_cluster
        await serving.shutdown(delete=app.state.stop_cluster and not stop_head)
        if stop_head:
            await asyncio.to_thread(backend.stop)
            _mark_orphaned(store)
        elif backend.head is not None:
            log.info(
                "leaving the embedded Ray head at %s running with its jobs: the next service on %s re-attaches to it, "
                "`rmdistill stop-cluster` stops it",
                backend.address,
                settings.data_dir,
            )
        store.close()


def create_app(settings: Settings | None = None, stop_cluster: bool = True) -> FastAPI:
    """The app; `stop_cluster`: whether its shutdown stops the embedded Ray head (failing the jobs on it) and deletes
    the serving applications, or leaves both running (policies loaded) for the next service. Embedders (tests,
    benchmarks) stop theirs by default; `rmdistill serve` leaves them unless told --stop-cluster."""
    settings = settings or Settings.from_env()
    app = FastAPI(
        title="rmdistill",
        version="0.1.0",
        summary="Robust preference optimization through reward-model distillation, as a Ray service.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.stop_cluster = stop_cluster
    # Opening it reaches nothing yet (the URI was checked with the settings); each use reads the root.
    app.state.artifacts = ArtifactStore(settings.artifacts) if settings.artifacts else None
    app.state.experiments = {}  # experiment id -> its running thread (service/experiments_api.py)
    install_error_handlers(app)

    @app.exception_handler(RayUnavailable)
    async def _ray_unavailable(request: Request, exc: RayUnavailable) -> JSONResponse:
        return error_response(503, f"Ray is unavailable: {exc}")

    # The last added is outermost: the size limit rejects before any work; latency covers everything else.
    app.add_middleware(LatencyMiddleware)
    app.add_middleware(
        BodyLimitMiddleware,
        max_bytes=settings.max_body_bytes,
        larger={datasets_api.router.prefix + "/": settings.max_upload_bytes},
    )

    for module in (jobs_api, artifacts_api, datasets_api, experiments_api, policies_api, serving, ops_api):
        app.include_router(module.router)
    dashboard.mount(app)
    return app
