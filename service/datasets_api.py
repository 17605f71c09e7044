"""/v1/datasets: a caller's own preference files, uploaded into their data area and usable as `data.source`.

An upload streams to a hidden file beside its destination, is read and validated as the data stage would read it
(every row, in the detected or given format), and only then renamed into place: a file under its name is always
complete and valid, and a refused or broken upload leaves nothing behind.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import secrets
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Query, Request, Response
from fastapi import Path as PathParam

from ray_jobs.data.errors import DatasetError, describe
from ray_jobs.data.formats import extract_pairs
from ray_jobs.data.sources import read_source
from ray_jobs.names import DataFormat
from service.deps import Owner, SettingsDep
from service.errors import ApiError
from service.schemas import DatasetList, DatasetView, error_responses

router = APIRouter(prefix="/v1/datasets", tags=["datasets"], responses=error_responses(401, 422))

SUFFIXES = (".jsonl", ".json", ".parquet", ".csv", ".jsonl.gz", ".json.gz", ".csv.gz")
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$"
DatasetName = Annotated[
    str, PathParam(pattern=NAME_PATTERN, description=f"File name ending in one of {', '.join(SUFFIXES)}.")
]
MAX_FIELD_ERRORS = 20
META_DIR = ".meta"  # what validation found (format, rows) per file, kept beside the files for the listing


def _checked_name(name: str) -> str:
    if not name.lower().endswith(SUFFIXES):
        raise ApiError(
            422,
            f"name: {name!r} must end in one of {', '.join(SUFFIXES)} (the suffix says how the file is read)",
            [{"field": "name", "message": "unsupported file type"}],
        )
    return name


def _view(folder: Path, name: str) -> DatasetView:
    path = folder / name
    try:
        meta = json.loads((folder / META_DIR / f"{name}.json").read_text())
    except (OSError, ValueError):
        meta = {}
    stat = path.stat()
    return DatasetView(
        name=name,
        source=name,
        bytes=stat.st_size,
        format=meta.get("format"),
        rows=meta.get("rows"),
        uploaded_at=dt.datetime.fromtimestamp(stat.st_mtime, dt.UTC),
    )


def _validate(path: Path, name: str, format: str) -> dict[str, object]:
    """What the data stage would find in the file: its format and row count, or 422 naming the bad rows."""
    try:
        fmt, collected = extract_pairs(read_source(str(path)), format, on_error="fail", source=name)
    except DatasetError as exc:
        fields = [{"field": f"row {e['row']}", "message": describe(e)} for e in exc.errors[:MAX_FIELD_ERRORS]]
        message = str(exc).replace(str(path), name)  # the caller's name, not the server's temporary path
        raise ApiError(422, f"{name} is not usable preference data: {message}", fields) from None
    return {"format": fmt, "rows": collected.rows_read}


@router.put(
    "/{name}",
    status_code=201,
    summary="Upload a preference file into your data area (the raw file as the body); replaces one of that name",
    responses=error_responses(413),
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
        }
    },
)
async def upload_dataset(
    name: DatasetName,
    request: Request,
    owner: Owner,
    settings: SettingsDep,
    format: Annotated[DataFormat, Query(description="Row format; auto detects it from the columns.")] = "auto",
) -> DatasetView:
    folder = settings.uploads_of(owner)
    _checked_name(name)
    (folder / META_DIR).mkdir(parents=True, exist_ok=True)
    # The temporary name keeps the suffix: it tells the reader the file type.
    incoming = folder / f".incoming-{secrets.token_hex(6)}-{name}"
    try:
        received = 0
        with incoming.open("wb") as fh:
            # The body-size middleware ends the stream with 413 past max_upload_bytes.
            async for chunk in request.stream():
                received += len(chunk)
                await asyncio.to_thread(fh.write, chunk)
        if received == 0:
            raise ApiError(
                422, f"{name}: the body is empty; send the file's bytes", [{"field": "body", "message": "empty"}]
            )
        meta = await asyncio.to_thread(_validate, incoming, name, format)
        (folder / META_DIR / f"{name}.json").write_text(json.dumps(meta))
        os.replace(incoming, folder / name)
    finally:
        incoming.unlink(missing_ok=True)
    return _view(folder, name)


@router.get("", summary="Your uploaded datasets")
def list_datasets(owner: Owner, settings: SettingsDep) -> DatasetList:
    folder = settings.uploads_of(owner)
    names = (
        sorted(p.name for p in folder.glob("*") if p.is_file() and not p.name.startswith("."))
        if folder.is_dir()
        else []
    )
    return DatasetList(items=[_view(folder, n) for n in names])


@router.delete(
    "/{name}", status_code=204, summary="Delete one of your uploaded datasets", responses=error_responses(404)
)
def delete_dataset(name: DatasetName, owner: Owner, settings: SettingsDep) -> Response:
    folder = settings.uploads_of(owner)
    path = folder / name
    if not path.is_file():
        raise ApiError(404, f"dataset {name} not found")
    path.unlink()
    (folder / META_DIR / f"{name}.json").unlink(missing_ok=True)
    return Response(status_code=204)
