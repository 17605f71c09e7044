"""The dashboard at `/`: a static page (service/static/) that reads the same REST API with the same bearer token.

The page and its script hold no data, so they are served without a token; every request they make for jobs,
artifacts or policies carries the token the user gives the page, and is checked like any other.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

STATIC = Path(__file__).parent / "static"

router = APIRouter(include_in_schema=False)


@router.get("/")
def dashboard() -> FileResponse:
    # no-cache: a browser revalidates the page after an upgrade instead of running an old script against a new API.
    return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})


def mount(app: FastAPI) -> None:
    """The page at `/` and its script, styles and vendored chart library under `/static`."""
    app.include_router(router)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
