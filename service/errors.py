"""One JSON error shape for every failure: ``{"error": {"message": ..., "fields": [{"field", "message"}]}}``.

Handlers are installed by `install_error_handlers`; request-validation errors name the field (dotted path, without
FastAPI's "body"/"query" prefix) so a person can fix the request without reading a traceback.
"""

from __future__ import annotations

import errno
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import OperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException

from ray_jobs.spec import friendly_error
from service.schemas import ErrorBody

log = logging.getLogger("rmdistill.service")


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        fields: list[dict[str, str]] | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.fields, self.headers = status, message, fields or [], headers


def error_body(message: str, fields: list[dict[str, str]] | None = None) -> dict:
    # Built through the documented model, so the body cannot drift from what /openapi.json says.
    return ErrorBody.model_validate({"error": {"message": message, "fields": fields or []}}).model_dump()


def error_response(status: int, message: str, fields: list[dict[str, str]] | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, fields), status_code=status)


def _field_error(error: dict) -> dict[str, str]:
    """One request-validation error as the job spec's own errors read (``distill.beta: must be > 0``), its path
    without FastAPI's "body"/"query" prefix; a body that is no JSON, or no object, is named ``body``."""
    loc = tuple(error.get("loc", ()))
    if loc and loc[0] in ("body", "query", "path", "header"):
        loc = loc[1:]
    field_error = friendly_error({**error, "loc": loc})
    if not loc or error.get("type") == "json_invalid":
        field_error["field"] = "body"
    return field_error


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(error_body(exc.message, exc.fields), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        fields = [_field_error(e) for e in exc.errors()]
        message = "invalid request: " + "; ".join(f"{f['field']}: {f['message']}" for f in fields)
        return error_response(422, message, fields)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(error_body(str(exc.detail)), status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        storage = storage_failure(exc)
        if storage is not None:
            folder = getattr(getattr(request.app.state, "settings", None), "data_dir", "the data folder")
            log.error("storage failure on %s %s: %s", request.method, request.url.path, storage)
            # Insufficient Storage: the request was fine and nothing was recorded; the operator must make room.
            return error_response(507, f"the data folder {folder} cannot be written ({storage}): nothing was saved")
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(500, f"internal error ({type(exc).__name__}); see the service log")


# What a full disk, a quota, a file-size limit or a read-only mount look like from Python and from SQLite.
STORAGE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS})
SQLITE_STORAGE_MESSAGES = ("database or disk is full", "disk i/o error", "readonly database", "read-only file system")


def storage_failure(exc: BaseException) -> str | None:
    """Why `exc` is the storage refusing a write (None when it is anything else)."""
    if isinstance(exc, OSError) and exc.errno in STORAGE_ERRNOS:
        return exc.strerror or str(exc)
    if isinstance(exc, OperationalError) and any(m in str(exc.orig).lower() for m in SQLITE_STORAGE_MESSAGES):
        return str(exc.orig)
    return None
