"""/v1/jobs/{id}/artifacts: list and download what a job published, its owner only (others get 404)."""

from __future__ import annotations

from fastapi import APIRouter, Response
from fastapi.responses import FileResponse, StreamingResponse

from ray_jobs.names import STAGES
from service.artifacts import (
    ARCHIVE_SUFFIX,
    find_artifact,
    list_artifacts,
    refill,
    stages_in_root,
    stream_archive,
)
from service.deps import ArtifactsDep, Owner, StoreDep
from service.errors import ApiError
from service.jobs_api import owned_job
from service.schemas import ArtifactList, ArtifactView, error_responses

router = APIRouter(prefix="/v1/jobs", tags=["artifacts"], responses=error_responses(401, 404, 422))

DOWNLOAD = {
    200: {
        "description": "The file's bytes (JSON, PNG, Parquet, ...), or a stage folder as a .tar.gz built while sent",
        "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
    }
}


@router.get("/{job_id}/artifacts", summary="A job's published files, and one archive per published stage")
def job_artifacts(job_id: str, owner: Owner, store: StoreDep, artifacts: ArtifactsDep) -> ArtifactList:
    job = owned_job(store, job_id, owner)
    in_root = stages_in_root(job, artifacts)
    return ArtifactList(
        items=[
            ArtifactView(
                path=a.path,
                kind=a.kind,
                bytes=a.bytes,
                media_type=a.media_type,
                url=f"/v1/jobs/{job.id}/artifacts/{a.path}",
            )
            for a in list_artifacts(job.job_dir, in_root)
        ]
    )


@router.get(
    "/{job_id}/artifacts/{path:path}",
    response_class=Response,
    summary="Download one artifact by its listed path (`distill.tar.gz` is the policy)",
    responses=DOWNLOAD,
)
def download_artifact(job_id: str, path: str, owner: Owner, store: StoreDep, artifacts: ArtifactsDep) -> Response:
    job = owned_job(store, job_id, owner)
    # Only the stage the path names (`<stage>/...` or `<stage>.tar.gz`): one report needs no policy fetched.
    stage = path.split("/", 1)[0].removesuffix(ARCHIVE_SUFFIX)
    refill(job, artifacts, [stage] if stage in STAGES else [])
    artifact = find_artifact(job.job_dir, path)
    if artifact is None:
        raise ApiError(
            404,
            f"job {job_id} has no artifact {path!r}: GET /v1/jobs/{job_id}/artifacts lists them",
            [{"field": "path", "message": "not an artifact of this job"}],
        )
    filename = f"{job.id}-{artifact.path.replace('/', '-')}"
    if not artifact.archive:
        return FileResponse(artifact.source, media_type=artifact.media_type, filename=filename)
    return StreamingResponse(
        stream_archive(artifact.source, f"{job.id}-{artifact.source.name}"),
        media_type=artifact.media_type,
        headers={"Content-Disposition": f'attachment; filename="{filename}"'},
    )
