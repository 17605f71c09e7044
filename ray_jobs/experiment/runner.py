"""Run an experiment's grid as ordinary jobs, one at a time, leaving one small JSON file per finished cell.

The folder of cell files *is* the experiment's state: a cell whose file exists is done and is skipped, so a run
stopped at any point (a crash, a Ctrl-C, the end of a session) resumes where it stopped when started again on the
same folder, and the folder can be committed as it grows. Cells of one (ρ, seed) share the data, reward models and
scored pairs of the first of them that runs (`reuse.pairs`). A resumed run starts a group from the job of a leader
that finished earlier, while the service still holds that job; otherwise (another service, the job deleted) the
next cell able to lead computes them again, from the same seeds, and any cell before it computes what it needs.

Jobs run one after another on purpose: cells are each sized to use the cluster, and running them in turn keeps
their wall times comparable. The same loop runs in the CLI (jobs submitted over REST) and in the service
(`POST /v1/experiments`); only `JobRunner` differs.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from ray_jobs.experiment.aggregate import write_summary
from ray_jobs.experiment.grid import Cell, ExperimentSpec, Group, expand, experiment_id, groups

EXPERIMENT_FILE = "experiment.json"
FAILURES_FILE = "failures.json"


class JobRunner(Protocol):
    def run(self, spec: dict[str, Any]) -> tuple[str, str]:
        """Submit a job spec and wait for it to end; returns (job id, final state)."""
        ...

    def results(self, job_id: str) -> dict[str, Any]:
        """A finished job's {"data": data/summary.json, "evaluate": evaluate/report.json}."""
        ...

    def succeeded(self, job_id: str) -> bool:
        """Whether the caller still has this job and it succeeded (False for an unknown or deleted one)."""
        ...


def code_version() -> str | None:
    """The commit the results came from, where the code is a git checkout."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def cell_result(
    cell: Cell, experiment: str, job_id: str, results: dict[str, Any], wall_seconds: float, commit: str | None
) -> dict[str, Any]:
    """The cell file: what the table needs (see aggregate.py), and the per-sample scores for paired comparisons."""
    report, data = results["evaluate"], results["data"]
    if report.get("win_rate") is None or report.get("samples") is None:
        raise ValueError(f"cell {cell.id}: job {job_id} has no oracle evaluation to compare (evaluate.oracle unset?)")
    bias = data.get("length_bias") or {}
    samples = report["samples"]
    return {
        "cell": cell.id,
        "experiment": experiment,
        "params": cell.params(),
        "job_id": job_id,
        "commit": commit,
        "wall_seconds": round(wall_seconds, 1),
        "train": {"pairs": data.get("train"), "rho_achieved": bias.get("rho_achieved")},
        "win_rate": report["win_rate"],
        "reward": report.get("reward"),
        "kl": report["kl"],
        "lengths": {
            "policy_mean_tokens": report["lengths"]["policy"]["mean_tokens"],
            "reference_mean_tokens": report["lengths"]["reference"]["mean_tokens"],
            "policy_capped": report["lengths"]["policy"]["capped"],
            "reference_capped": report["lengths"]["reference"]["capped"],
        },
        "chosen_logratio": report.get("chosen_logratio"),
        "samples": {k: samples[k] for k in ("key", "policy", "reference", "policy_tokens")},
        "examples": report.get("examples", [])[:2],
    }


def _write_json(path: Path, document: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(document, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)  # a cell file is either whole or absent: absent means "run it"


class FolderInUse(ValueError):
    """The results folder holds another experiment's cells: mixing them would make one table of two designs."""


def write_plan(folder: Path, experiment: ExperimentSpec, cells: list[Cell]) -> None:
    """experiment.json: the id, the spec and every cell id, so a reader knows what "done" means.

    Refuses a folder that already holds a different experiment (another name, grid or base spec).
    """
    folder.mkdir(parents=True, exist_ok=True)
    existing = folder / EXPERIMENT_FILE
    if existing.is_file():
        other = json.loads(existing.read_text()).get("id")
        if other != experiment_id(experiment):
            raise FolderInUse(f"{folder} holds experiment {other}, not {experiment_id(experiment)}: use another folder")
    document = {
        "id": experiment_id(experiment),
        "spec": experiment.model_dump(mode="json"),
        "cells": [c.id for c in cells],
    }
    _write_json(folder / EXPERIMENT_FILE, document)


def pending_cells(cells: list[Cell], folder: Path) -> list[Cell]:
    return [c for c in cells if not (folder / f"{c.id}.json").exists()]


def run_experiment(
    experiment: ExperimentSpec,
    runner: JobRunner,
    folder: str | os.PathLike[str],
    log: Callable[[str], None] = print,
    should_stop: Callable[[], bool] = lambda: False,
) -> dict[str, Any]:
    """Run every cell without a result file in `folder`; returns the summary of all cells there."""
    folder = Path(folder)
    cells = expand(experiment)
    write_plan(folder, experiment, cells)
    commit = code_version()
    failures: dict[str, str] = {}
    todo = pending_cells(cells, folder)
    log(f"{experiment.name}: {len(cells)} cells, {len(cells) - len(todo)} already done")
    for group in groups(cells):
        shared = _earlier_leader(group, folder, runner)
        for cell in group.ordered():
            if (folder / f"{cell.id}.json").exists():
                continue
            if should_stop():
                log("stopping: the cells done so far are kept")
                return _finish(folder, cells, failures)
            spec = cell.spec.model_dump(mode="json")
            if shared is not None:
                spec["reuse"]["pairs"] = shared
            start = time.monotonic()
            log(f"cell {cell.id}: running" + (f" (reusing {shared})" if shared else ""))
            job_id, state = runner.run(spec)
            if state != "succeeded":
                failures[cell.id] = f"job {job_id} {state}"
                log(f"cell {cell.id}: job {job_id} {state}")
                continue
            if shared is None and group.can_lead(cell):
                shared = job_id
            result = cell_result(
                cell, experiment.name, job_id, runner.results(job_id), time.monotonic() - start, commit
            )
            _write_json(folder / f"{cell.id}.json", result)
            log(f"cell {cell.id}: win rate {result['win_rate']['rate']:.3f} ({job_id})")
    return _finish(folder, cells, failures)


def _earlier_leader(group: Group, folder: Path, runner: JobRunner) -> str | None:
    """The job of a leader cell finished in an earlier run, if the service still holds it.

    Without it a resumed group's first cell refits the reward models and rescores the pairs (on 2 CPU cores a
    quarter of an hour) only to get what that job already has; the score stage still refuses pairs that do not
    match the cell's spec.
    """
    for cell in group.ordered():
        done = folder / f"{cell.id}.json"
        if not (group.can_lead(cell) and done.exists()):
            continue
        job_id = json.loads(done.read_text(encoding="utf-8")).get("job_id")
        if job_id and runner.succeeded(job_id):
            return job_id
    return None


def _finish(folder: Path, cells: list[Cell], failures: dict[str, str]) -> dict[str, Any]:
    if failures:
        _write_json(folder / FAILURES_FILE, failures)
    elif (folder / FAILURES_FILE).exists():
        (folder / FAILURES_FILE).unlink()
    done = len(cells) - len(pending_cells(cells, folder))
    summary = write_summary(folder) if done else {"rows": [], "cells": 0}
    return {**summary, "failures": failures}
