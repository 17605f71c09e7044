"""Prometheus metrics in the default registry (the serving routes add their own counters beside these).

Defined once at import: several apps in one process (tests, restarts) share them instead of registering twice.
"""

from __future__ import annotations

import hashlib
import time
from typing import Any

from fastapi import Response
from prometheus_client import CONTENT_TYPE_LATEST, Gauge, Histogram, generate_latest

from ray_jobs.names import JOB_STATES
from service.store import Store

JOBS = Gauge("rmdistill_jobs", "Jobs in the store by state.", ["state"])
REQUEST_LATENCY = Histogram(
    "rmdistill_http_request_duration_seconds",
    "HTTP request latency by route template (not raw path, to keep label cardinality bounded).",
    ["method", "route", "status"],
)


def metrics_label(policy_id: str) -> str:
    """The label a policy's serving metrics carry: a digest, because /metrics answers any token and policy ids are
    their owners' business. An owner finds theirs as `metrics_label` on GET /v1/policies/{id}."""
    return "p" + hashlib.sha256(policy_id.encode()).hexdigest()[:12]


def metrics_response(store: Store) -> Response:
    counts = store.count_by_state()
    for state in JOB_STATES:
        JOBS.labels(state).set(counts.get(state, 0))
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)


class LatencyMiddleware:
    """Pure ASGI (not BaseHTTPMiddleware) so streamed responses pass through unbuffered."""

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start, status = time.perf_counter(), [500]

        async def record_status(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, record_status)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            REQUEST_LATENCY.labels(scope["method"], template, str(status[0])).observe(time.perf_counter() - start)
