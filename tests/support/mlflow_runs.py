"""Reading an MLflow run back from a local SQLite store, found by the job and stage tags every rmdistill run has."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ray_jobs.tracking import JOB_TAG, STAGE_TAG


def mlflow_run(db: Path, experiment: str, job_id: str, stage: str) -> tuple[Any, Any]:
    """(client, run) of the one run of `job_id`'s `stage` in `experiment` of the store at `db`."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{db}")
    found = client.get_experiment_by_name(experiment)
    runs = client.search_runs(
        [found.experiment_id], f"tags.`{JOB_TAG}` = '{job_id}' and tags.`{STAGE_TAG}` = '{stage}'"
    )
    assert len(runs) == 1, runs
    return client, runs[0]


def series(client: Any, run: Any, key: str) -> list[tuple[int, float]]:
    """(step, value) of metric `key` of `run`, by step."""
    return sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))
