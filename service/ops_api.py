"""/healthz and /metrics: what an operator or a probe asks of the service itself."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Response

from service.auth import current_owner
from service.deps import BackendDep, SettingsDep, StoreDep
from service.metrics import metrics_response
from service.schemas import PLAIN_TEXT, Health, RayStatus, error_responses

router = APIRouter(tags=["ops"])


@router.get("/healthz", summary="Liveness; open without a token")
def healthz(backend: BackendDep, settings: SettingsDep) -> Health:
    return Health(
        status="ok",
        ray=RayStatus(address=backend.address or None, embedded=backend.embedded),
        auth=settings.auth_enabled,
    )


@router.get(
    "/metrics",
    summary="Prometheus metrics (text exposition format)",
    response_class=Response,
    dependencies=[Depends(current_owner)],
    responses={**PLAIN_TEXT, **error_responses(401)},
)
def metrics(store: StoreDep) -> Response:
    return metrics_response(store)
