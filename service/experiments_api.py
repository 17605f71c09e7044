"""/v1/experiments: the service runs a robustness grid (ray_jobs.experiment) as ordinary jobs of the caller.

Each experiment runs in a thread of the service, one cell job at a time, through the same admission path as
POST /v1/jobs (so quotas, data roots and cluster checks apply to every cell). Its folder under
`<data_dir>/experiments/<id>/` holds a file per finished cell; submitting the same document again after a restart
resumes it, skipping the cells already there. The id is the experiment's name plus a digest of its content.
"""

from __future__ import annotations

import json
import re
import threading
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request

from ray_jobs.experiment.aggregate import SUMMARY_FILE
from ray_jobs.experiment.grid import expand, experiment_id, parse_experiment
from ray_jobs.experiment.runner import EXPERIMENT_FILE, FAILURES_FILE, run_experiment, write_plan
from ray_jobs.names import FINAL_STATES
from ray_jobs.spec import SpecError
from service.deps import Owner, SettingsDep
from service.errors import ApiError
from service.jobs_api import cancel_job, job_results, submit_spec
from service.schemas import ExperimentCell, ExperimentRequest, ExperimentStatus, error_responses

router = APIRouter(prefix="/v1/experiments", tags=["experiments"], responses=error_responses(401, 422))
OWNER_FILE = "owner.json"
EXPERIMENT_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}-[0-9a-f]{10}$")
POLL_S = 2.0


class _Stopped(Exception):
    pass


class _ServiceJobs:
    """Cells submitted as the caller's own jobs, waited for by reading the store the follower keeps current."""

    def __init__(self, app_state: Any, owner: str | None, stop: threading.Event):
        self.state, self.owner, self.stop = app_state, owner, stop

    def run(self, spec: dict[str, Any]) -> tuple[str, str]:
        store, backend = self.state.store, self.state.backend
        job = submit_spec(spec, self.owner, store, self.state.settings, backend)
        while job.state not in FINAL_STATES:
            if self.stop.wait(POLL_S):
                cancel_job(job.id, self.owner, store, backend)  # a stopped experiment leaves nothing running
                raise _Stopped()
            job = store.get_job(job.id) or job
        return job.id, job.state

    def results(self, job_id: str) -> dict[str, Any]:
        job = self.state.store.get_job(job_id, self.owner)
        if job is None:
            raise ApiError(404, f"job {job_id} not found")
        return job_results(job).model_dump()

    def succeeded(self, job_id: str) -> bool:
        job = self.state.store.get_job(job_id, self.owner)
        return job is not None and job.state == "succeeded"


class _Run:
    def __init__(self, thread: threading.Thread, stop: threading.Event):
        self.thread, self.stop, self.error = thread, stop, None


def _runs(request: Request) -> dict[str, _Run]:
    return request.app.state.experiments


def _folder(settings: Any, eid: str) -> Path:
    return Path(settings.data_dir) / "experiments" / eid


def _status(folder: Path, run: _Run | None) -> ExperimentStatus:
    document = json.loads((folder / EXPERIMENT_FILE).read_text())
    cells = document["cells"]
    done = [c for c in cells if (folder / f"{c}.json").exists()]
    failures = json.loads((folder / FAILURES_FILE).read_text()) if (folder / FAILURES_FILE).exists() else {}
    summary = json.loads((folder / SUMMARY_FILE).read_text()) if (folder / SUMMARY_FILE).exists() else {}
    if run is not None and run.thread.is_alive():
        state = "running"
    elif run is not None and run.error:
        state = "failed"
    else:
        state = "finished" if len(done) == len(cells) else "stopped"
    return ExperimentStatus(
        id=document["id"],
        name=document["spec"]["name"],
        state=state,
        cells=len(cells),
        done=done,
        failures=failures,
        error=run.error if run else None,
        rows=summary.get("rows", []),
        table=(folder / "table.md").read_text() if (folder / "table.md").exists() else "",
    )


def _owner_of(folder: Path) -> str | None:
    return json.loads((folder / OWNER_FILE).read_text())["owner"]


def _owned_folder(settings: Any, eid: str, owner: str | None) -> Path:
    """The caller's experiment folder; 404 alike for a malformed id, another owner's experiment or none at all."""
    # Ids are names plus a digest: anything else (a path, a name no filesystem takes) is no experiment.
    folder = _folder(settings, eid)
    if not EXPERIMENT_ID.match(eid) or not (folder / OWNER_FILE).is_file() or _owner_of(folder) != owner:
        raise ApiError(404, f"experiment {eid[:80]} not found")
    return folder


@router.post(
    "", status_code=202, summary="Run (or resume) an experiment grid", responses=error_responses(403, 409, 503)
)
def submit_experiment(
    request: Request, body: ExperimentRequest, owner: Owner, settings: SettingsDep
) -> ExperimentStatus:
    try:
        plan = parse_experiment(body.spec, body.quick)
        cells = expand(plan)
    except SpecError as exc:
        raise ApiError(422, f"invalid experiment: {exc}", exc.errors) from None
    eid = experiment_id(plan)
    folder = _folder(settings, eid)
    if (folder / OWNER_FILE).is_file() and _owner_of(folder) != owner:
        raise ApiError(409, f"experiment {eid} belongs to another caller; rename yours")
    runs = _runs(request)
    run = runs.get(eid)
    if run is not None and run.thread.is_alive():
        return _status(folder, run)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / OWNER_FILE).write_text(json.dumps({"owner": owner}))
    stop = threading.Event()
    jobs = _ServiceJobs(request.app.state, owner, stop)

    def work() -> None:
        try:
            run_experiment(plan, jobs, folder, log=lambda _: None, should_stop=stop.is_set)
        except _Stopped:
            pass
        except Exception as exc:  # the thread's end is reported by GET, not raised into nowhere
            runs[eid].error = f"{type(exc).__name__}: {exc}"

    run = runs[eid] = _Run(threading.Thread(target=work, name=f"experiment-{eid}", daemon=True), stop)
    write_plan(folder, plan, cells)  # the cell list exists before the first GET can ask
    run.thread.start()
    return _status(folder, run)


@router.get("/{experiment_id}", summary="An experiment's cells, failures and table", responses=error_responses(404))
def get_experiment(request: Request, experiment_id: str, owner: Owner, settings: SettingsDep) -> ExperimentStatus:
    folder = _owned_folder(settings, experiment_id, owner)
    return _status(folder, _runs(request).get(experiment_id))


@router.get(
    "/{experiment_id}/cells/{cell_id}", summary="One finished cell's result file", responses=error_responses(404)
)
def get_cell(experiment_id: str, cell_id: str, owner: Owner, settings: SettingsDep) -> ExperimentCell:
    folder = _owned_folder(settings, experiment_id, owner)
    document = json.loads((folder / EXPERIMENT_FILE).read_text())
    path = folder / f"{cell_id}.json"
    if cell_id not in document["cells"] or not path.is_file():
        raise ApiError(404, f"cell {cell_id} of experiment {experiment_id} has no result")
    return ExperimentCell.model_validate(json.loads(path.read_text()))


@router.post(
    "/{experiment_id}/stop",
    status_code=202,
    summary="Stop: cancel the running cell's job; finished cells are kept",
    responses=error_responses(404),
)
def stop_experiment(request: Request, experiment_id: str, owner: Owner, settings: SettingsDep) -> ExperimentStatus:
    folder = _owned_folder(settings, experiment_id, owner)
    run = _runs(request).get(experiment_id)
    if run is not None:
        run.stop.set()
        run.thread.join(timeout=POLL_S * 3)
    return _status(folder, run)


def stop_all(app_state: Any) -> None:
    """On shutdown: every experiment thread cancels its running cell's job and ends."""
    for run in app_state.experiments.values():
        run.stop.set()
