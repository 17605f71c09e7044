"""/v1/policies: the policies jobs produced, and registration of an existing Hugging Face folder."""

from __future__ import annotations

import secrets
from pathlib import Path

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field

from service.admission import confine_path
from service.deps import Owner, SettingsDep, StoreDep
from service.errors import ApiError
from service.schemas import PolicyList, PolicyView, error_responses
from service.store import PolicyExists

router = APIRouter(prefix="/v1/policies", tags=["policies"], responses=error_responses(401))
JOB_POLICY_PREFIX = "job-"
# A folder transformers (full checkpoint) or PEFT (adapter) can load.
MODEL_MARKERS = ("config.json", "adapter_config.json")


class PolicyRegistration(BaseModel):
    model_config = ConfigDict(extra="forbid")

    path: str = Field(description="Hugging Face model or PEFT adapter folder inside the data roots.")
    id: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$", description="Default: pol-<random>.")
    base_model: str | None = None
    loss: str | None = None


@router.get("", summary="Registered policies")
def list_policies(owner: Owner, store: StoreDep) -> PolicyList:
    return PolicyList(items=[PolicyView.model_validate(p) for p in store.list_policies(owner)])


@router.get("/{policy_id}", summary="One policy", responses=error_responses(404, 422))
def get_policy(policy_id: str, owner: Owner, store: StoreDep) -> PolicyView:
    policy = store.get_policy(policy_id, owner)
    if policy is None:
        raise ApiError(404, f"policy {policy_id} not found")
    return PolicyView.model_validate(policy)


@router.post(
    "",
    status_code=201,
    summary="Register an existing model folder as a policy",
    responses=error_responses(403, 409, 422),
)
def register_policy(body: PolicyRegistration, owner: Owner, store: StoreDep, settings: SettingsDep) -> PolicyView:
    folder = Path(confine_path("path", body.path, settings.roots_for(owner)))
    if not folder.is_dir() or not any((folder / marker).is_file() for marker in MODEL_MARKERS):
        raise ApiError(
            422,
            f"path: {body.path!r} is not a model folder (needs {' or '.join(MODEL_MARKERS)})",
            [{"field": "path", "message": "not a Hugging Face model or adapter folder"}],
        )
    policy_id = body.id or f"pol-{secrets.token_hex(6)}"
    if policy_id.startswith(JOB_POLICY_PREFIX):
        # A job's policy takes the job's id when the job succeeds: nobody may squat it beforehand.
        raise ApiError(
            422,
            f"id: {policy_id!r} is reserved (ids starting with {JOB_POLICY_PREFIX!r} name the policies jobs produce)",
            [{"field": "id", "message": "reserved prefix"}],
        )
    try:
        policy = store.add_policy(
            policy_id=policy_id, path=str(folder), owner=owner, base_model=body.base_model, loss=body.loss
        )
    except PolicyExists:
        # The same answer whoever holds the id, and nothing about them.
        raise ApiError(409, f"policy id {policy_id} is not available", [{"field": "id", "message": "taken"}]) from None
    return PolicyView.model_validate(policy)
