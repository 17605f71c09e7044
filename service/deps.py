"""What the routes share, declared once as `Annotated` dependencies: the caller's owner id, the settings, and the
objects the app's lifespan keeps on `app.state` (the store, the Ray backend, the artifact root, the policy serving
client).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from ray_jobs.artifact_store import ArtifactStore
from service.auth import current_owner
from service.ray_backend import RayBackend
from service.serving_client import PolicyServing
from service.settings import Settings
from service.store import Store


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_store(request: Request) -> Store:
    return request.app.state.store


def get_artifacts(request: Request) -> ArtifactStore | None:
    return request.app.state.artifacts


def get_backend(request: Request) -> RayBackend:
    return request.app.state.backend


def get_serving(request: Request) -> PolicyServing:
    return request.app.state.serving


# None when auth is off; a missing or unknown token is answered with 401 before the route runs.
Owner = Annotated[str | None, Depends(current_owner)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
StoreDep = Annotated[Store, Depends(get_store)]
BackendDep = Annotated[RayBackend, Depends(get_backend)]
# The artifact root (None: job folders only), from which a job folder missing files is refilled.
ArtifactsDep = Annotated[ArtifactStore | None, Depends(get_artifacts)]
ServingDep = Annotated[PolicyServing, Depends(get_serving)]
