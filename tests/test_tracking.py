"""Experiment tracking: distillation and the ensemble's trials log the job's metrics to TensorBoard, to MLflow (a
local SQLite store) and to W&B (offline), through Ray's integrations, every run named and tagged with the job id."""

from __future__ import annotations

from pathlib import Path

import pytest
from support.data import write_job_data
from support.mlflow_runs import mlflow_run, series
from support.pairs import write_pairs
from support.wandb_records import offline_run

from ray_jobs.distill.loop import distill_task, train_policy
from ray_jobs.ensemble.stage import run as run_ensemble
from ray_jobs.events import EventLog, read_events
from ray_jobs.spec import SpecError, parse_spec


def _tracking(tmp_path: Path) -> dict:
    return {"mlflow": {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment": "byo"}, "wandb": {}}


def _same_series(got: list[tuple[int, float]], want: list[tuple[int, float]]) -> None:
    assert [step for step, _ in got] == [step for step, _ in want]
    assert [value for _, value in got] == pytest.approx([value for _, value in want])


def _wandb_runs(job: Path) -> list[Path]:
    return sorted((job / "wandb" / "wandb").glob("offline-run-*"))


def test_distillation_metrics_reach_tensorboard_mlflow_and_wandb(tmp_path, tiny_llama):
    job = tmp_path / "job-distill01"
    write_pairs(job, tiny_llama)
    spec = parse_spec(
        {
            "reference": str(tiny_llama),
            "distill": {"loss": "dpo", "batch_size": 16, "lr": 1e-3, "max_steps": 3},
            "tracking": _tracking(tmp_path),
        }
    )
    train_policy(distill_task(spec, job, checkpoint_dir=None))
    logged = [(e["step"], e["values"]["loss"]) for e in read_events(job) if e["kind"] == "metrics"]
    assert [step for step, _ in logged] == [1, 2, 3]

    client, run = mlflow_run(tmp_path / "mlflow.db", "byo", "job-distill01", "distill")
    assert run.info.run_name == "job-distill01/distill"
    _same_series(series(client, run, "loss"), logged)
    assert run.data.params["loss"] == "dpo"  # the distill section is the run's parameters

    (run_dir,) = _wandb_runs(job)
    info, history = offline_run(run_dir)
    assert info == {"name": "job-distill01/distill", "group": "job-distill01", "tags": ["job-distill01", "distill"]}
    _same_series([(row["_step"], row["loss"]) for row in history], logged)

    assert list((job / "tensorboard" / "distill").glob("events.out.tfevents.*"))


@pytest.mark.ray
def test_ensemble_members_are_tracked_through_tunes_logger_callbacks(ray_cluster, tmp_path):
    job = write_job_data(tmp_path / "job-ensemble01", n_train=16, n_test=8)
    spec = parse_spec(
        {
            "ensemble": {
                "size": 1,
                "backbone": "tiny:bert",
                "diversity": "seed",
                "epochs": 2,
                "batch_size": 8,
                "max_length": 64,
                "cpus_per_worker": 0.5,
                "validation_fraction": 0.0,
            },
            "tracking": _tracking(tmp_path),
        }
    )
    run_ensemble(spec, job, EventLog(job))
    epochs = [e["values"]["accuracy"] for e in read_events(job) if e.get("event") == "epoch_done"]
    assert len(epochs) == 2

    client, run = mlflow_run(tmp_path / "mlflow.db", "byo", "job-ensemble01", "ensemble")
    # One result per epoch as the member trains, then the trial's final summary (its chosen epoch: the last).
    assert [value for _, value in series(client, run, "accuracy")] == pytest.approx([*epochs, epochs[-1]])

    (run_dir,) = _wandb_runs(job)
    info, history = offline_run(run_dir)
    assert info["group"] == "job-ensemble01" and info["tags"] == ["job-ensemble01", "ensemble"]
    assert [row["accuracy"] for row in history if "accuracy" in row][:2] == pytest.approx(epochs)

    assert list((job / "tensorboard" / "ensemble" / "member-0").glob("events.out.tfevents.*"))


def test_the_spec_takes_no_credentials():
    for tracker in ("mlflow", "wandb"):
        with pytest.raises(SpecError) as err:
            parse_spec({"tracking": {tracker: {"api_key": "secret"}}})
        assert err.value.errors[0] == {"field": f"tracking.{tracker}.api_key", "message": "unknown field"}
