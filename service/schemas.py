"""Response bodies of the job, policy and ops routes, and the error body they share.

The routes return these models, so /openapi.json documents what each one sends; the serving routes' bodies follow
OpenAI's and live in serving_schemas.py.
"""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PlainSerializer, WithJsonSchema, computed_field

from ray_jobs.names import JobState
from service.metrics import metrics_label

# isoformat, as the API has always written its times ("+00:00"); pydantic's own encoding would write "Z".
Timestamp = Annotated[
    dt.datetime,
    PlainSerializer(lambda t: t.isoformat(), return_type=str),
    WithJsonSchema({"type": "string", "format": "date-time"}),
]


# ------------------------------------------------------------------------------------------------------- errors
class FieldError(BaseModel):
    field: str = Field(description="Dotted path of the offending field, e.g. distill.beta.")
    message: str


class ErrorDetail(BaseModel):
    message: str
    fields: list[FieldError] = Field(default_factory=list)


class ErrorBody(BaseModel):
    """Every failure of the job, policy and ops routes (and authentication on all routes)."""

    error: ErrorDetail


ERROR_DESCRIPTIONS = {
    401: "Missing or unknown bearer token",
    403: "A path outside the data roots",
    404: "No such job, policy, artifact or dataset among the caller's",
    409: "Conflicts with the job's state, an existing id, or what the cluster can ever provide",
    413: "Request body over the size limit",
    422: "Invalid request or job spec; `fields` names each offending field",
    429: "Too many of the caller's jobs are pending or running",
    503: "Ray is unavailable or refused the job",
}


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` entries documenting these statuses with the shared error body."""
    return {code: {"model": ErrorBody, "description": ERROR_DESCRIPTIONS[code]} for code in codes}


# The success response of a route that answers text (logs, metrics). Such a route keeps the plain `Response` class:
# FastAPI documents a route's other responses in its class's media type, and its errors are JSON.
PLAIN_TEXT: dict[int | str, dict[str, Any]] = {
    200: {"description": "Plain text", "content": {"text/plain": {"schema": {"type": "string"}}}}
}


# --------------------------------------------------------------------------------------------------------- jobs
class JobBrief(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    name: str
    state: JobState
    stage: str | None = Field(description="The stage running now, or the last one that ran.")
    error: str | None
    ray_submission_id: str | None
    created_at: Timestamp | None
    updated_at: Timestamp | None
    started_at: Timestamp | None
    finished_at: Timestamp | None


class StageProgress(BaseModel):
    done: int | float | None
    total: int | float | None


class Transition(BaseModel):
    model_config = ConfigDict(validate_by_name=True)

    from_state: JobState | None = Field(alias="from")
    to: JobState
    at: Timestamp | None
    reason: str | None


class JobDetail(JobBrief):
    stages: dict[str, Literal["running", "finished", "skipped"]]
    progress: dict[str, StageProgress] = Field(description="Latest progress event per stage.")
    metrics: dict[str, dict[str, Any]] = Field(description="Latest value of each metric per stage, with its step.")
    job_dir: str
    artifacts: dict[str, str] = Field(description="Published (so complete) stage folders by stage.")
    policy_id: str | None = Field(description="The policy a succeeded job registered.")
    spec: dict[str, Any] = Field(description="The spec as it runs, its paths confined to the data roots.")
    transitions: list[Transition]


class JobPage(BaseModel):
    items: list[JobBrief]
    total: int = Field(description="Matching jobs before paging.")
    limit: int
    offset: int


class EventPage(BaseModel):
    events: list[dict[str, Any]] = Field(description="Entries of the job's events.jsonl (ray_jobs.events).")
    offset: int
    next_offset: int
    state: JobState


class ArtifactView(BaseModel):
    path: str = Field(description="The name to download it by: `<stage>/<file>`, or `<stage>.tar.gz` for a folder.")
    kind: Literal["policy", "report", "plot", "pairs", "archive", "file"] = Field(
        description="policy: the trained policy as a .tar.gz (a Hugging Face folder); report: the evaluation "
        "report; plot: a PNG; pairs: the scored pairs (Parquet); archive: another stage folder; file: anything else."
    )
    bytes: int | None = Field(description="File size; None for archives, which are built while they are sent.")
    media_type: str
    url: str = Field(description="Where to GET it, relative to the service, with the same bearer token.")


class ArtifactList(BaseModel):
    items: list[ArtifactView] = Field(description="Files of the published (complete) stages, then their archives.")


class DatasetView(BaseModel):
    name: str
    source: str = Field(description="What to write as data.source in a job spec to train on this file.")
    bytes: int
    format: str | None = Field(description="The row format detected when it was uploaded.")
    rows: int | None = Field(description="Rows it held when it was uploaded, every one valid.")
    uploaded_at: Timestamp


class DatasetList(BaseModel):
    items: list[DatasetView]


# ----------------------------------------------------------------------------------------------------- policies
class JobResults(BaseModel):
    data: dict[str, Any] | None = Field(description="data/summary.json: what was read, skipped, biased and split.")
    evaluate: dict[str, Any] = Field(
        description="evaluate/report.json: win rate, KL, lengths, log π(chosen) − log π_ref(chosen), and per-sample "
        "oracle scores under `prompt:sample` keys."
    )


class ExperimentRequest(BaseModel):
    spec: dict[str, Any] = Field(description="An experiment document (see examples/experiment.yaml).")
    quick: bool = Field(False, description="Run the document's quick grid instead of the full one.")


class ExperimentStatus(BaseModel):
    id: str = Field(description="The experiment's name plus a digest of its content: the same document, the same id.")
    name: str
    state: Literal["running", "finished", "failed", "stopped"]
    cells: int = Field(description="Cells in the grid.")
    done: list[str] = Field(description="Cells with a result file.")
    failures: dict[str, str] = Field(description="Cells whose job did not succeed, with its state.")
    error: str | None = None
    rows: list[dict[str, Any]] = Field(default_factory=list, description="The table (ray_jobs.experiment.aggregate).")
    table: str = Field("", description="The table as Markdown.")


class ExperimentCell(BaseModel):
    """One finished cell (ray_jobs/experiment/runner.py `cell_result`); further fields pass through."""

    model_config = ConfigDict(extra="allow")
    cell: str
    params: dict[str, Any]
    job_id: str
    win_rate: dict[str, Any]


class PolicyView(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    job_id: str | None
    path: str
    base_model: str | None
    loss: str | None
    summary: dict[str, Any]
    created_at: Timestamp

    @computed_field(description="The `policy` label of this policy's serving metrics on /metrics (a digest of the id).")
    @property
    def metrics_label(self) -> str:
        return metrics_label(self.id)


class PolicyList(BaseModel):
    items: list[PolicyView]


# ---------------------------------------------------------------------------------------------------------- ops
class RayStatus(BaseModel):
    address: str | None
    embedded: bool


class Health(BaseModel):
    status: Literal["ok"]
    ray: RayStatus
    auth: bool = Field(description="Whether bearer tokens are required.")
