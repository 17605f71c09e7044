"""A job's progress as the service reports it, folded from the driver's events.jsonl (ray_jobs/events.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ray_jobs.events import read_events
from ray_jobs.layout import JobLayout


def summarize(job_dir: str | Path) -> dict[str, Any]:
    """Current stage, per-stage status, latest progress and metrics, the final status and error if any."""
    stage: str | None = None
    stages: dict[str, str] = {}
    progress: dict[str, dict[str, Any]] = {}
    metrics: dict[str, dict[str, Any]] = {}
    finished: str | None = None
    error: str | None = None
    count = 0
    for event in read_events(job_dir):
        count += 1
        kind, name = event.get("kind"), event.get("stage")
        if kind == "stage_started":
            stage, stages[name] = name, "running"
        elif kind == "stage_finished":
            stages[name] = "finished"
        elif kind == "stage_skipped":
            stages[name] = "skipped"
        elif kind == "progress" and name:
            progress[name] = {"done": event.get("done"), "total": event.get("total")}
        elif kind == "metrics" and name:
            metrics.setdefault(name, {}).update(event.get("values") or {})
            metrics[name]["step"] = event.get("step")
        elif kind == "error":
            error = event.get("message") or error
        elif kind == "job_finished":
            finished = event.get("status")
            if finished == "failed" and event.get("message"):
                error = event["message"]
    return {
        "stage": stage,
        "stages": stages,
        "progress": progress,
        "metrics": metrics,
        "finished": finished,
        "error": error,
        "events": count,
    }


def artifacts(job_dir: str | Path) -> dict[str, str]:
    """Published stage folders (a folder that exists is complete: ray_jobs.layout.JobLayout.staging)."""
    return {stage: str(folder) for stage, folder in JobLayout(job_dir).published().items()}
