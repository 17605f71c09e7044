"""/v1/policies: the policies jobs produced, and registration of an existing Hugging Face folder."""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from service.admission import confine_path
from service.auth import current_owner
from service.errors import ApiError
from service.store import Policy, Store

router = APIRouter(prefix="/v1/policies", tags=["policies"])
Owner = Annotated[str | None, Depends(current_owner)]
# A folder transformers (full checkpoint) or PEFT (adapter) can load.
MODEL_MARKERS = ("config.json", "adapter_config.json")


class PolicyRegistration(BaseModel):
    model_config = ConfigDict(extra="forbid")

    path: str = Field(description="Hugging Face model or PEFT adapter folder inside the data roots.")
    id: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$", description="Default: pol-<random>.")
    base_model: str | None = None
    loss: str | None = None


def policy_view(policy: Policy) -> dict[str, Any]:
    return {
        "id": policy.id,
        "job_id": policy.job_id,
        "path": policy.path,
        "base_model": policy.base_model,
        "loss": policy.loss,
        "summary": policy.summary,
        "created_at": policy.created_at.isoformat(),
    }


def _store(request: Request) -> Store:
    return request.app.state.store


@router.get("", summary="Registered policies")
def list_policies(request: Request, owner: Owner) -> dict[str, Any]:
    return {"items": [policy_view(p) for p in _store(request).list_policies(owner)]}


@router.get("/{policy_id}", summary="One policy")
def get_policy(request: Request, policy_id: str, owner: Owner) -> dict[str, Any]:
    policy = _store(request).get_policy(policy_id, owner)
    if policy is None:
        raise ApiError(404, f"policy {policy_id} not found")
    return policy_view(policy)


@router.post("", status_code=201, summary="Register an existing model folder as a policy")
def register_policy(request: Request, body: PolicyRegistration, owner: Owner) -> JSONResponse:
    store = _store(request)
    folder = Path(confine_path("path", body.path, request.app.state.settings.data_roots))
    if not folder.is_dir() or not any((folder / marker).is_file() for marker in MODEL_MARKERS):
        raise ApiError(
            422,
            f"path: {body.path!r} is not a model folder (needs {' or '.join(MODEL_MARKERS)})",
            [{"field": "path", "message": "not a Hugging Face model or adapter folder"}],
        )
    policy_id = body.id or f"pol-{secrets.token_hex(6)}"
    if store.get_policy(policy_id) is not None:
        raise ApiError(409, f"policy {policy_id} exists already", [{"field": "id", "message": "taken"}])
    policy = store.add_policy(
        policy_id=policy_id, path=str(folder), owner=owner, base_model=body.base_model, loss=body.loss
    )
    return JSONResponse(policy_view(policy), status_code=201)
