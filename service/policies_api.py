"""/v1/policies: the policies jobs produced, and registration of an existing Hugging Face folder."""

from __future__ import annotations

import secrets
from pathlib import Path

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field

from service.admission import confine_path
from service.deps import BackendDep, Owner, SettingsDep, StoreDep
from service.errors import ApiError
from service.schemas import PolicyList, PolicyView, error_responses
from service.store import PolicyExists

router = APIRouter(prefix="/v1/policies", tags=["policies"], responses=error_responses(401))
JOB_POLICY_PREFIX = "job-"
# π_ref of policy P is served as policy "ref-P" (POST /v1/policies/P/reference).
REFERENCE_PREFIX = "ref-"
RESERVED_PREFIXES = (JOB_POLICY_PREFIX, REFERENCE_PREFIX)
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
    if policy_id.startswith(RESERVED_PREFIXES):
        # A job's policy takes the job's id when the job succeeds, and a reference takes its policy's: nobody may
        # squat either beforehand.
        raise ApiError(
            422,
            f"id: {policy_id!r} is reserved (ids starting with {JOB_POLICY_PREFIX!r} name the policies jobs produce, "
            f"{REFERENCE_PREFIX!r} their references)",
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


@router.post(
    "/{policy_id}/reference",
    summary="The policy's π_ref as a policy of its own (id ref-<policy id>), to serve and compare side by side",
    responses=error_responses(404, 409, 422),
)
def reference_policy(policy_id: str, owner: Owner, store: StoreDep, backend: BackendDep) -> PolicyView:
    policy = store.get_policy(policy_id, owner)
    if policy is None:
        raise ApiError(404, f"policy {policy_id} not found")
    reference_id = f"{REFERENCE_PREFIX}{policy.id}"
    existing = store.get_policy(reference_id, owner)
    if existing is not None:
        return PolicyView.model_validate(existing)
    if not policy.base_model:
        raise ApiError(409, f"policy {policy_id} records no reference model (register it with base_model)")
    folder = _reference_folder(policy.base_model, Path(backend.job_env()["RMDISTILL_CACHE"]))
    try:
        registered = store.add_policy(
            policy_id=reference_id, path=str(folder), owner=owner, base_model=policy.base_model, loss=None
        )
    except PolicyExists:  # registered by a concurrent request meanwhile
        registered = store.get_policy(reference_id, owner)
    return PolicyView.model_validate(registered)


def _reference_folder(reference: str, cache: Path) -> Path:
    """The local folder of a reference model as the job's driver found it (the same model cache); 409 for what
    cannot be served from here (a hub id, or a model that is gone)."""
    # Imported here: the registry imports torch, which only this route of the policy API needs.
    from ray_jobs.models.registry import ModelNotFoundError, resolve_model_path

    try:
        folder = resolve_model_path(reference, cache)
    except ModelNotFoundError as exc:
        raise ApiError(409, f"the reference {reference!r} cannot be served: {exc}") from None
    if not isinstance(folder, Path):
        raise ApiError(409, f"the reference {reference!r} is a hub id, not a model folder on this machine")
    return folder
