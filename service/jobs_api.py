"""/v1/jobs: submit, list, inspect, follow, read logs of and cancel pipeline jobs."""

from __future__ import annotations

import asyncio
import json
import secrets
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Body, Query, Request, Response
from fastapi.responses import PlainTextResponse, StreamingResponse

from ray_jobs.events import EventCursor, read_events
from ray_jobs.layout import JobLayout
from ray_jobs.names import FINAL_STATES, JobState
from ray_jobs.spec import JobSpec, SpecError, parse_spec
from service.admission import check_cluster, confine_spec
from service.artifacts import refill
from service.deps import ArtifactsDep, BackendDep, Owner, SettingsDep, StoreDep
from service.errors import ApiError
from service.launch import Launcher
from service.progress import artifacts, summarize
from service.ray_backend import RayBackend
from service.schemas import (
    PLAIN_TEXT,
    EventPage,
    JobBrief,
    JobDetail,
    JobPage,
    JobResults,
    Transition,
    error_responses,
)
from service.settings import Settings
from service.store import Job, Store

MAX_LOG_LINES = 100_000
# Offsets past this are no page of anything: SQL backends cannot even take them (SQLite's are 64-bit).
MAX_OFFSET = 10**9

router = APIRouter(prefix="/v1/jobs", tags=["jobs"], responses=error_responses(401, 422))
SSE_POLL_S = 0.5
SSE_KEEPALIVE_S = 15.0

SPEC_EXAMPLE = {
    "name": "quickstart",
    "reference": "tiny:llama",
    "data": {"source": "prefs.jsonl", "max_pairs": 16},
    "ensemble": {"size": 2, "backbone": "tiny:bert", "epochs": 1},
    "generation": {"engine": "hf", "max_new_tokens": 8},
    "distill": {"loss": "e-dpo", "max_steps": 2},
}


def job_brief(job: Job) -> JobBrief:
    return JobBrief.model_validate(job)


def job_detail(store: Store, job: Job) -> JobDetail:
    view = summarize(job.job_dir)
    policy = store.get_policy(job.id) if job.state == "succeeded" else None
    return JobDetail(
        **{**dict(job_brief(job)), "stage": view["stage"] or job.stage},
        stages=view["stages"],
        progress=view["progress"],
        metrics=view["metrics"],
        job_dir=job.job_dir,
        artifacts=artifacts(job.job_dir),
        policy_id=policy.id if policy else None,
        spec=job.spec,
        transitions=[
            Transition(from_state=t.from_state, to=t.to_state, at=t.at, reason=t.reason)
            for t in store.transitions(job.id)
        ],
    )


def owned_job(store: Store, job_id: str, owner: str | None) -> Job:
    job = store.get_job(job_id, owner)
    if job is None:
        raise ApiError(404, f"job {job_id} not found")
    return job


@router.post(
    "",
    status_code=202,
    summary="Submit a job spec",
    description="The body is a job spec (ray_jobs/spec.py; `rmdistill schema` prints the same JSON schema): every "
    "field is optional, unknown fields are refused, and each bad field is named in the 422 body.",
    responses=error_responses(403, 409, 429, 503),
)
def submit_job(
    owner: Owner,
    store: StoreDep,
    settings: SettingsDep,
    backend: BackendDep,
    response: Response,
    body: Annotated[JobSpec, Body(openapi_examples={"tiny": {"value": SPEC_EXAMPLE}})],
) -> JobDetail:
    job = submit_spec(body, owner, store, settings, backend)
    response.headers["Location"] = f"/v1/jobs/{job.id}"
    return job_detail(store, job)


def submit_spec(
    body: dict[str, Any] | JobSpec, owner: str | None, store: Store, settings: Settings, backend: RayBackend
) -> Job:
    """Validate, admit and submit one job spec: the path of POST /v1/jobs, and of each experiment cell."""
    try:
        spec = parse_spec(body)
    except SpecError as exc:
        raise ApiError(422, f"invalid job spec: {exc}", exc.errors) from None
    active = store.count_active(owner)
    if active >= settings.max_active_jobs:
        # Each job is a driver process importing torch: one token must not crowd out everyone else.
        raise ApiError(
            429,
            f"{active} of your jobs are queued, pending or running, the limit is {settings.max_active_jobs}: "
            "wait for one to finish or cancel one",
        )

    def own_job_dir(ref: str) -> str | None:
        job = store.get_job(ref, owner)
        return job.job_dir if job else None

    spec = confine_spec(spec, settings.roots_for(owner), own_job_dir)
    check_cluster(spec, backend.resources(), settings.driver_memory_bytes)

    job_id = f"job-{secrets.token_hex(6)}"
    job_dir = Path(settings.jobs_dir) / job_id
    spec_data = spec.model_dump(mode="json")
    try:
        job_dir.mkdir(parents=True)
        JobLayout(job_dir).spec.write_text(json.dumps(spec_data, indent=2))
        return Launcher(store, backend, settings).admit(
            job_id=job_id, name=spec.name, owner=owner, spec=spec_data, job_dir=str(job_dir)
        )
    except BaseException:
        # Refused (a full queue, a full disk) before the job was recorded: leave no folder that no job owns.
        if store.get_job(job_id) is None:
            shutil.rmtree(job_dir, ignore_errors=True)
        raise


@router.get("", summary="List jobs, newest first")
def list_jobs(
    owner: Owner,
    store: StoreDep,
    state: JobState | None = None,
    name: str | None = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0,
) -> JobPage:
    jobs, total = store.list_jobs(owner, state=state, name=name, limit=limit, offset=offset)
    return JobPage(items=[job_brief(j) for j in jobs], total=total, limit=limit, offset=offset)


@router.get(
    "/{job_id}",
    summary="State, current stage, progress, metrics and artifacts of a job",
    responses=error_responses(404),
)
def get_job(job_id: str, owner: Owner, store: StoreDep, artifacts: ArtifactsDep) -> JobDetail:
    job = owned_job(store, job_id, owner)
    refill(job, artifacts)  # the event log its stages and metrics are folded from
    return job_detail(store, job)


def job_results(job: Job) -> JobResults:
    """What a finished job measured: its data summary and its evaluation report."""
    layout = JobLayout(job.job_dir)
    if not layout.report.is_file():
        raise ApiError(404, f"job {job.id} has no evaluation report (state {job.state})")
    data = json.loads(layout.data_summary.read_text()) if layout.data_summary.is_file() else None
    return JobResults(data=data, evaluate=json.loads(layout.report.read_text()))


@router.get(
    "/{job_id}/results",
    summary="A finished job's data summary and evaluation report (win rate, KL, lengths, per-sample scores)",
    responses=error_responses(404),
)
def get_results(job_id: str, owner: Owner, store: StoreDep, artifacts: ArtifactsDep) -> JobResults:
    job = owned_job(store, job_id, owner)
    refill(job, artifacts, ["data", "evaluate"])
    return job_results(job)


def _sse(event: dict[str, Any], event_id: int) -> bytes:
    return f"id: {event_id}\nevent: {event.get('kind', 'message')}\ndata: {json.dumps(event)}\n\n".encode()


async def _stream(request: Request, store: Store, job: Job, offset: int) -> AsyncIterator[bytes]:
    """Events from `offset` on as they are appended; ends after job_finished, or when the job is final and drained.

    File and database reads run in worker threads: the event loop serves every other request meanwhile.
    """
    idle = 0.0
    cursor = EventCursor(job.job_dir, offset)
    while True:
        batch = await asyncio.to_thread(cursor.read)
        for event in batch:
            offset += 1
            yield _sse(event, offset)
            if event.get("kind") == "job_finished":
                return
        if batch:
            idle = 0.0
            continue
        current = await asyncio.to_thread(store.get_job, job.id)
        if current is None or current.state in FINAL_STATES:
            # The driver can die without writing job_finished (killed, vanished): end with the store's verdict.
            final = {"kind": "end", "state": current.state if current else "gone", "error": current and current.error}
            yield _sse(final, offset)
            return
        if await request.is_disconnected():
            return
        if idle >= SSE_KEEPALIVE_S:
            idle = 0.0
            yield b": keep-alive\n\n"
        await asyncio.sleep(SSE_POLL_S)
        idle += SSE_POLL_S


# The page is JSON; with ?stream=true or `Accept: text/event-stream` the same events come as server-sent events.
EVENT_STREAM = {
    200: {
        "description": "A page of events, or (streamed) each event as `id: <n>`, `event: <kind>`, `data: <json>`",
        "content": {"text/event-stream": {"schema": {"type": "string"}}},
    }
}


@router.get(
    "/{job_id}/events",
    summary="The job's event log: a page, or a server-sent-event stream",
    response_model=EventPage,
    responses={**EVENT_STREAM, **error_responses(404)},
)
def job_events(
    request: Request,
    job_id: str,
    owner: Owner,
    store: StoreDep,
    artifacts: ArtifactsDep,
    offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0,
    limit: Annotated[int, Query(ge=1, le=10000)] = 1000,
    stream: bool = False,
) -> Any:
    job = owned_job(store, job_id, owner)
    refill(job, artifacts)
    if stream or "text/event-stream" in request.headers.get("accept", ""):
        last_id = request.headers.get("last-event-id", "")
        # isdecimal() also admits non-ASCII digits, which int() reads but a client's id never holds.
        start = int(last_id) if last_id.isascii() and last_id.isdecimal() and len(last_id) <= 12 else offset
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        return StreamingResponse(_stream(request, store, job, start), media_type="text/event-stream", headers=headers)
    events = []
    for event in read_events(job.job_dir, offset):
        if len(events) == limit:
            break
        events.append(event)
    return EventPage(events=events, offset=offset, next_offset=offset + len(events), state=job.state)


@router.get(
    "/{job_id}/logs",
    response_class=Response,
    summary="The Ray job's driver logs",
    responses={**PLAIN_TEXT, **error_responses(404, 503)},
)
def job_logs(
    job_id: str,
    owner: Owner,
    store: StoreDep,
    backend: BackendDep,
    tail: Annotated[int | None, Query(ge=1, le=MAX_LOG_LINES, description="Only the last this-many lines.")] = None,
) -> PlainTextResponse:
    job = owned_job(store, job_id, owner)
    logs = backend.logs(job.ray_submission_id) if job.ray_submission_id else None
    if logs is None:
        raise ApiError(404, f"Ray has no logs for job {job_id} (it was never submitted or the cluster forgot it)")
    if tail is not None:
        logs = "".join(logs.splitlines(keepends=True)[-tail:])
    return PlainTextResponse(logs)


@router.post(
    "/{job_id}/cancel", status_code=202, summary="Stop the job's Ray job", responses=error_responses(404, 409, 503)
)
def cancel_job(job_id: str, owner: Owner, store: StoreDep, backend: BackendDep) -> JobDetail:
    job = owned_job(store, job_id, owner)
    # A job can move under us (the follower submits a queued one, Ray starts a pending one): retry on the new state.
    for _ in range(5):
        if job.is_final:
            raise ApiError(409, f"job {job_id} is already {job.state}")
        if _cancel(store, backend, job):
            break
        job = owned_job(store, job_id, owner)
    current = store.get_job(job_id)
    assert current is not None
    return job_detail(store, current)


def _cancel(store: Store, backend: RayBackend, job: Job) -> bool:
    """One attempt at cancelling `job` as last read; False when its state changed in between."""
    if job.state == "queued":
        return store.transition(job.id, "cancelled", "cancelled while queued", expect="queued")
    stopped = backend.stop_job(job.ray_submission_id) if job.ray_submission_id else None
    if stopped is None:
        # Ray has not got the job (yet): it is cancelled now, and a submission still in flight stops it on landing.
        return store.transition(job.id, "cancelled", "cancelled before Ray ran it", expect=job.state)
    return store.transition(job.id, "cancelling", "cancel requested", expect=job.state) or job.state == "cancelling"
