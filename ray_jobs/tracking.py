"""Experiment tracking besides the job's event log: TensorBoard, MLflow and Weights & Biases (``spec.tracking``).

MLflow and W&B are reached through Ray's integrations: Ray Tune's logger callbacks (`tune_callbacks`) log the
ensemble's trials, one run per member, from the driver; `StageTracker` opens a run with Ray's `setup_mlflow` /
`setup_wandb` in a training loop that runs outside Tune (distillation's rank-0 worker). Every run is named
``<job id>/<stage>[/member-k]`` and tagged with the job id (the job folder's name) and the stage, so a tracker's run
leads back to its job. Credentials come from the environment only; the spec has no field that could hold one.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ray_jobs.layout import JobLayout, home
from ray_jobs.spec import MlflowSpec, TrackingSpec, WandbSpec

JOB_TAG = "rmdistill.job_id"
STAGE_TAG = "rmdistill.stage"


def job_id(job_dir: str | os.PathLike[str]) -> str:
    """The id a job's tracker runs carry: its folder's name, which is the service's job id."""
    return Path(job_dir).resolve().name


def check_trackers(tracking: TrackingSpec) -> None:
    """Refuse, naming the field, a tracker whose package is not installed: before any stage runs, not after."""
    from importlib.util import find_spec

    from ray_jobs.spec import SpecError

    wanted = (("mlflow", tracking.mlflow, "mlflow"), ("wandb", tracking.wandb, "wandb"))
    errors = [
        {"field": f"tracking.{name}", "message": f"needs the {module} package: pip install 'rmdistill[tracking]'"}
        for name, chosen, module in wanted
        if chosen is not None and find_spec(module) is None
    ]
    if errors:
        raise SpecError(errors)


def mlflow_uri(spec: MlflowSpec) -> str:
    """The spec's tracking URI, else a SQLite store in the data home: MLflow 3 refuses its old file store."""
    return spec.tracking_uri or f"sqlite:///{home().resolve() / 'mlflow.db'}"


def _wandb_options(spec: WandbSpec, job_dir: str | os.PathLike[str], stage: str) -> dict[str, Any]:
    """wandb.init arguments shared by the Tune callback and `setup_wandb`."""
    # Ray's W&B helpers look for an API key unless WANDB_MODE itself says offline: offline runs need none.
    if spec.mode == "offline":
        os.environ["WANDB_MODE"] = "offline"
    folder = JobLayout(job_dir).root / "wandb"
    folder.mkdir(parents=True, exist_ok=True)
    return {
        "project": spec.project,
        "entity": spec.entity,
        "mode": spec.mode,
        "group": job_id(job_dir),
        "tags": [job_id(job_dir), stage],
        "dir": str(folder),
    }


def tune_callbacks(tracking: TrackingSpec, job_dir: str | os.PathLike[str], stage: str) -> list[Any]:
    """Ray Tune logger callbacks for the trackers the spec chose (one run per trial)."""
    callbacks: list[Any] = []
    if tracking.mlflow is not None:
        from ray.air.integrations.mlflow import MLflowLoggerCallback

        callbacks.append(
            MLflowLoggerCallback(
                tracking_uri=mlflow_uri(tracking.mlflow),
                experiment_name=tracking.mlflow.experiment,
                tags={JOB_TAG: job_id(job_dir), STAGE_TAG: stage},
            )
        )
    if tracking.wandb is not None:
        from ray.air.integrations.wandb import WandbLoggerCallback

        callbacks.append(WandbLoggerCallback(**_wandb_options(tracking.wandb, job_dir, stage)))
    return callbacks


def tensorboard_dir(job_dir: str | os.PathLike[str], stage: str, name: str | None = None) -> Path:
    """``<job>/tensorboard/<stage>[/<name>]``: one folder of event files per stage (and member)."""
    folder = JobLayout(job_dir).tensorboard / stage
    return folder / name if name else folder


class StageTracker:
    """One training loop's metrics (rank 0 of a stage outside Tune) to TensorBoard, MLflow and W&B as chosen.

    `name` tells runs of one stage apart (``member-2``); `config` is logged as the run's parameters.
    """

    def __init__(
        self,
        tracking: TrackingSpec,
        job_dir: str | os.PathLike[str],
        stage: str,
        name: str | None = None,
        config: dict[str, Any] | None = None,
    ):
        self.stage = stage
        self.writer = self.mlflow = self.wandb = None
        run_name = "/".join(p for p in (job_id(job_dir), stage, name) if p)
        if tracking.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(tensorboard_dir(job_dir, stage, name)))
        if tracking.mlflow is not None:
            from ray.air.integrations.mlflow import setup_mlflow

            self.mlflow = setup_mlflow(
                config=config,
                tracking_uri=mlflow_uri(tracking.mlflow),
                experiment_name=tracking.mlflow.experiment,
                run_name=run_name,
                create_experiment_if_not_exists=True,
                tags={JOB_TAG: job_id(job_dir), STAGE_TAG: stage},
            )
        if tracking.wandb is not None:
            from ray.air.integrations.wandb import setup_wandb

            self.wandb = setup_wandb(config=config, name=run_name, **_wandb_options(tracking.wandb, job_dir, stage))

    def log(self, step: int, values: dict[str, Any]) -> None:
        """Scalars of `values` at `step`; a list becomes one series per index (``member_losses/0``)."""
        scalars = flatten_scalars(values)
        if self.writer is not None:
            for key, value in scalars.items():
                self.writer.add_scalar(f"{self.stage}/{key}", value, step)
        if self.mlflow is not None:
            # MLflow metric names take no brackets or spaces; slashes are allowed.
            self.mlflow.log_metrics(scalars, step=step)
        if self.wandb is not None:
            self.wandb.log(scalars, step=step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.mlflow is not None:
            self.mlflow.end_run()
        if self.wandb is not None:
            self.wandb.finish()


def flatten_scalars(values: dict[str, Any]) -> dict[str, float]:
    """The numbers of a metrics dict, lists spread over ``key/i``; None and text left out."""
    out: dict[str, float] = {}
    for key, value in values.items():
        items = enumerate(value) if isinstance(value, list | tuple) else [(None, value)]
        for i, v in items:
            if isinstance(v, int | float) and not isinstance(v, bool):
                out[key if i is None else f"{key}/{i}"] = float(v)
    return out
