"""Service configuration: explicit arguments (the CLI's options) over environment variables over defaults.

Plain pydantic rather than pydantic-settings so the server extra needs no extra package. Tokens are hashed the
moment they are read: the process never keeps a plain token after start-up.
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ray_jobs.artifact_store import ARTIFACTS_ENV
from ray_jobs.layout import JOBS_DIR
from ray_jobs.names import Engine

# Uploads live outside every shared data root, one folder per owner, so no spec reaches another owner's files.
UPLOADS_DIR = "uploads"
ANONYMOUS = "anonymous"  # the owner folder when auth is off (owner ids are 12 hex digits: no clash)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def is_loopback(host: str) -> bool:
    """Whether a bind address is reachable from this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


def _check_artifact_root(uri: str) -> None:
    """Refuse at start-up a root no filesystem opens, rather than fail every job (without reaching it: the store may
    be down for a moment); the message leaves out any user:password part of the URI."""
    from ray_jobs.artifact_store import check_uri, redact

    if "@" in uri.partition("://")[2].split("/")[0]:
        raise ValueError(
            f"artifacts: {redact(uri)!r} holds credentials; give them in the environment (AWS_ACCESS_KEY_ID, ...)"
        )
    try:
        check_uri(uri)
    except ValueError as exc:
        raise ValueError(f"artifacts: {redact(uri)!r}: {exc}") from None


def _split(value: str | None, sep: str) -> list[str]:
    return [part.strip() for part in (value or "").split(sep) if part.strip()]


class ServingSettings(BaseModel):
    """How policies are served: the Ray Serve deployments' engines, resources and bounds (`service/policy_app.py`)."""

    model_config = ConfigDict(frozen=True)

    engine: Engine = Field(
        "auto",
        description="`vllm`: vLLM's async engine only; `hf`: transformers only; `auto`: vLLM, and a transformers "
        "deployment (scaled from zero replicas) for the policies vLLM cannot load.",
    )
    deploy: bool = Field(
        True,
        description="Deploy the serving applications this API needs when the cluster lacks them. False: they come "
        "from elsewhere (a KubeRay RayService, `serve deploy`; `rmdistill serving-config` prints their config) and "
        "this API only attaches, answering 503 while one is missing, and never deletes them.",
    )
    ray_address: str | None = Field(
        None,
        description="GCS address (`host:port`) of the cluster serving runs on, when it is not the one RAY_ADDRESS "
        "names. None = the embedded head's, else RAY_ADDRESS's (a dashboard URL's host at Ray's default GCS port "
        "6379), else a private local Ray.",
    )
    num_cpus: float = Field(1.0, gt=0, description="CPUs each replica reserves (fractions share a CPU).")
    num_gpus: float | None = Field(
        None,
        ge=0,
        le=1,
        description="Share of one GPU each replica reserves (0.25: four replicas share a GPU; a 135M policy needs "
        "far less than one). None = 0.25 where the cluster has GPUs, else 0. A vLLM replica divides its share "
        "among the policies it holds.",
    )
    max_policies_per_replica: int = Field(
        2,
        gt=0,
        description="Policies one replica holds at once (Serve model multiplexing); loading one more unloads the "
        "replica's least recently used policy first.",
    )
    max_lora_rank: Literal[0, 8, 16, 32, 64, 128, 256, 512] = Field(
        64,
        description="vLLM: a policy kept as a LoRA adapter is applied per request on its base model's engine, which "
        "then serves every adapter of that base (up to this rank) as one policy slot; 0 = merge each adapter into a "
        "policy of its own, as transformers always does.",
    )
    min_replicas: int = Field(1, ge=0, description="Replicas each deployment keeps even when idle (0: scale to zero).")
    max_replicas: int = Field(1, ge=1, description="Most replicas each deployment scales up to.")
    idle_s: float = Field(
        600,
        gt=0,
        description="Seconds without requests after which Serve's autoscaler removes a replica above min_replicas; "
        "with min_replicas 0 the last replica goes too, unloading every policy it held until the next request "
        "loads them again.",
    )
    target_ongoing_requests: float = Field(
        16, gt=0, description="Requests in flight per replica that Serve's autoscaler aims for, between the bounds."
    )
    max_ongoing_requests: int = Field(
        256, gt=0, description="Requests one replica takes at once; more wait in Serve's queue for a free replica."
    )
    max_model_len: int = Field(
        2048,
        gt=0,
        description="Context (prompt + completion tokens) of a served policy, "
        "capped by the model's own position limit.",
    )
    load_timeout_s: float = Field(
        600, gt=0, description="Seconds a policy's load may take before its requests get 503 (and the load is dropped)."
    )

    @model_validator(mode="after")
    def _bounds(self) -> ServingSettings:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) exceeds max_replicas ({self.max_replicas})")
        return self

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> ServingSettings:
        """From RMDISTILL_SERVING_* (each field's name, upper case); unset variables keep the defaults."""
        values = {
            name: env[f"RMDISTILL_SERVING_{name.upper()}"]
            for name in cls.model_fields
            if env.get(f"RMDISTILL_SERVING_{name.upper()}")
        }
        return cls.model_validate(values)


class Settings(BaseModel):
    # An error never echoes the input: it holds the plain tokens, and may hold a URI with a password in it.
    model_config = ConfigDict(frozen=True, hide_input_in_errors=True)

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    data_dir: Path = Field(description="Jobs, database, datasets and the embedded Ray head's files live here.")
    database_url: str = Field("", description="Any SQLAlchemy URL; empty = SQLite file in data_dir.")
    token_hashes: frozenset[str] = Field(frozenset(), description="sha256 hex of each accepted bearer token.")
    data_roots: tuple[Path, ...] = Field((), description="Folders specs may read from; data_dir/datasets is added.")
    max_body_bytes: int = Field(1 << 20, gt=0, description="Largest request body in bytes (uploads excepted).")
    max_upload_bytes: int = Field(
        256 << 20, gt=0, description="Largest dataset upload in bytes (PUT /v1/datasets/{name}); more gets 413."
    )
    artifacts: str | None = Field(
        None,
        description="Artifact root: a filesystem URI (s3://bucket/prefix, gs://..., any pyarrow or fsspec one) that "
        "keeps every job's published stages, spec and event log, and a running job's checkpoints "
        "(ray_jobs/artifact_store.py); job folders are then caches, refilled from it when a file is missing. "
        "Credentials come from the environment "
        "(AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL...), never from here. None = job folders only.",
    )
    ray_address: str | None = Field(
        None, description="Existing cluster (dashboard URL or GCS address); None = embedded."
    )
    ray_num_cpus: int | None = Field(
        None, ge=0, description="CPUs of the embedded head; None = all of them, 0 = a head that runs no job."
    )
    serving: ServingSettings = Field(default_factory=ServingSettings, description="Policy serving on Ray Serve.")
    poll_interval_s: float = Field(1.0, gt=0)
    max_active_jobs: int = Field(
        10, gt=0, description="Jobs one token may have pending or running at once; more are refused with 429."
    )
    max_running_jobs: int = Field(
        4,
        gt=0,
        description="Jobs the service keeps submitted to Ray at once, all owners together; later ones wait as "
        "`queued` and are submitted oldest first as running ones end.",
    )
    max_queued_jobs: int = Field(
        200, ge=0, description="Jobs that may wait as `queued`, all owners together; past it a submission gets 429."
    )
    driver_memory_bytes: int = Field(
        1 << 30,
        ge=0,
        description="Memory each job's driver reserves on the cluster (Ray's `memory` resource): a driver imports "
        "torch, and Ray must not place more of them than the nodes can hold.",
    )
    max_request_tokens: int = Field(
        262_144,
        gt=0,
        description="Serving: the most tokens one request may ask to generate (prompts × n × max_tokens); "
        "larger requests get 400 before any model runs.",
    )
    insecure: bool = Field(
        False, description="Allow a bind address other than loopback without tokens (anyone who reaches it is in)."
    )

    @model_validator(mode="before")
    @classmethod
    def _hash_tokens(cls, data: Any) -> Any:
        if isinstance(data, dict) and "tokens" in data:
            data = dict(data)
            tokens = data.pop("tokens") or []
            data["token_hashes"] = frozenset(data.get("token_hashes", ())) | {hash_token(t) for t in tokens}
        return data

    @model_validator(mode="after")
    def _derive(self) -> Settings:
        data_dir = self.data_dir.expanduser().resolve()
        object.__setattr__(self, "data_dir", data_dir)
        if not self.database_url:
            object.__setattr__(self, "database_url", f"sqlite:///{data_dir / 'rmdistill.db'}")
        if self.artifacts:
            _check_artifact_root(self.artifacts)
        roots = [data_dir / "datasets", *(Path(r).expanduser().resolve() for r in self.data_roots)]
        object.__setattr__(self, "data_roots", tuple(dict.fromkeys(roots)))
        if not (self.auth_enabled or self.insecure or is_loopback(self.host)):
            raise ValueError(
                f"host {self.host!r} is reachable from other machines and no tokens are set: anyone who reaches it "
                "could submit jobs and read every job and policy. Set tokens (--tokens / RMDISTILL_TOKENS), bind "
                "127.0.0.1, or pass --insecure (RMDISTILL_INSECURE=1) to accept that."
            )
        return self

    @property
    def auth_enabled(self) -> bool:
        return bool(self.token_hashes)

    @property
    def jobs_dir(self) -> Path:
        return self.data_dir / JOBS_DIR

    def uploads_of(self, owner: str | None) -> Path:
        """The owner's data area: the datasets they uploaded, readable by their jobs only."""
        return self.data_dir / UPLOADS_DIR / (owner or ANONYMOUS)

    def roots_for(self, owner: str | None) -> tuple[Path, ...]:
        """The folders an owner's specs may read from: their own uploads first, then the shared data roots."""
        return (self.uploads_of(owner), *self.data_roots)

    @classmethod
    def from_env(cls, **overrides: Any) -> Settings:
        """Settings from RMDISTILL_* / RAY_ADDRESS, with non-None keyword overrides winning."""
        env = os.environ
        values: dict[str, Any] = {
            "host": env.get("RMDISTILL_HOST", "127.0.0.1"),
            "port": int(env.get("RMDISTILL_PORT", "8000")),
            "data_dir": Path(env.get("RMDISTILL_HOME", "~/.rmdistill")),
            "database_url": env.get("RMDISTILL_DATABASE_URL", ""),
            "tokens": _split(env.get("RMDISTILL_TOKENS"), ","),
            "data_roots": tuple(Path(p) for p in _split(env.get("RMDISTILL_DATA_ROOTS"), os.pathsep)),
            "max_body_bytes": int(env.get("RMDISTILL_MAX_BODY_BYTES", str(1 << 20))),
            "max_upload_bytes": int(env.get("RMDISTILL_MAX_UPLOAD_BYTES", str(256 << 20))),
            "ray_address": env.get("RAY_ADDRESS") or None,
            "artifacts": env.get(ARTIFACTS_ENV) or None,
            "ray_num_cpus": int(env["RMDISTILL_RAY_NUM_CPUS"]) if env.get("RMDISTILL_RAY_NUM_CPUS") else None,
            "serving": ServingSettings.from_env(env),
            "max_active_jobs": int(env.get("RMDISTILL_MAX_ACTIVE_JOBS", "10")),
            "max_running_jobs": int(env.get("RMDISTILL_MAX_RUNNING_JOBS", "4")),
            "max_queued_jobs": int(env.get("RMDISTILL_MAX_QUEUED_JOBS", "200")),
            "driver_memory_bytes": int(env.get("RMDISTILL_DRIVER_MEMORY_BYTES", str(1 << 30))),
            "max_request_tokens": int(env.get("RMDISTILL_MAX_REQUEST_TOKENS", "262144")),
            "insecure": env.get("RMDISTILL_INSECURE", "").lower() in ("1", "true", "yes"),
        }
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)
