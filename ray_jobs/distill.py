"""Stage 4, distillation: train the policy on the scored pairs with Ray Train and publish ``policy/``.

`train_loop` (in `ray_jobs.distill_loop`) is the plain PyTorch loop; `run_distill` wraps it in a `TorchTrainer`
whose workers read ``pairs/pairs.parquet`` (and ``pairs/ref_samples.parquet`` when alpha > 0) as Ray Data shards.
Checkpoints live in ``<job_dir>/checkpoints/`` (outside staging, so they survive a crash): Ray Train restarts
failed workers up to ``distill.max_failures`` times from the newest one, and a re-run of the stage with the same
job folder restores the run by its name. FSDP comes from `ray.train.torch.prepare_model(parallel_strategy="fsdp")`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ray_jobs.artifacts import stage_dir, staging
from ray_jobs.distill_data import PairsError, keep_labelled, read_pairs, read_ref_samples
from ray_jobs.distill_loop import POLICY_INFO, crash_after_step_from_env, steps_for, train_loop
from ray_jobs.distill_objective import Objective
from ray_jobs.events import EventLog
from ray_jobs.spec import JobSpec

__all__ = ["loop_config", "run_distill", "train_loop"]

RUN_NAME = "distill"


def objective_for(spec: JobSpec) -> Objective:
    d = spec.distill
    return Objective(loss=d.loss, beta=d.beta, alpha=d.alpha, family=d.family, member=d.member)


def loop_config(spec: JobSpec, job_dir: str | Path) -> dict[str, Any]:
    """The `train_loop` config for a job; runs as is without Ray (reading the Parquet files with pandas)."""
    d, job_dir = spec.distill, Path(job_dir)
    objective = objective_for(spec)
    return {
        "reference": spec.reference,
        "objective": {"loss": d.loss, "beta": d.beta, "alpha": d.alpha, "family": d.family, "member": d.member},
        "pairs_path": str(job_dir / "pairs" / "pairs.parquet"),
        "ref_samples_path": str(job_dir / "pairs" / "ref_samples.parquet"),
        "batch_size": d.batch_size,
        "gradient_accumulation_steps": d.gradient_accumulation_steps,
        "lr": d.lr,
        "lr_scheduler": d.lr_scheduler,
        "warmup_steps": d.warmup_steps,
        "epochs": d.epochs,
        "max_steps": d.max_steps,
        "max_grad_norm": d.max_grad_norm,
        "max_length": d.max_length,
        "lora": d.lora.model_dump() if d.lora else None,
        "bf16": d.bf16,
        "compile": d.compile,
        "strategy": d.strategy,
        "use_gpu": d.use_gpu,
        "checkpoint_every": d.checkpoint_every,
        "log_every": d.log_every,
        "seed": d.seed,
        "job_dir": str(job_dir),
        "checkpoint_dir": str(job_dir / "checkpoints" / "local"),
        "crash_after_step": crash_after_step_from_env(),
        "info": {
            "reference": spec.reference,
            "loss": d.loss,
            "beta": d.beta,
            "alpha": d.alpha,
            "family": d.family if d.loss == "e-dpo" else None,
            "member": d.member if d.loss == "distill" else None,
            "labelled_only": objective.labelled,
            "lora": d.lora.model_dump() if d.lora else None,
            "lr": d.lr,
            "seed": d.seed,
        },
    }


def _check_inputs(spec: JobSpec, job_dir: Path) -> int:
    """Validate the pairs against the loss before any worker starts; returns how many pairs it trains on."""
    objective = objective_for(spec)
    if spec.distill.lora is not None and spec.distill.strategy == "fsdp":
        raise ValueError("distill.lora with distill.strategy fsdp is not supported: use ddp for LoRA")
    path = job_dir / "pairs" / "pairs.parquet"
    if not path.exists():
        raise PairsError(f"{path}: missing; run the scoring stage first (or reuse.pairs)")
    df = read_pairs(path, objective.labelled)
    if not objective.labelled:
        k = len(df["rewards_a"].iloc[0]) if df["rewards_a"].iloc[0] is not None else 0
        if k == 0:
            raise PairsError(f"{path}: rewards_a is empty (K = 0); loss {spec.distill.loss} needs ensemble rewards")
        if spec.distill.member is not None and spec.distill.member >= k:
            raise PairsError(f"distill.member {spec.distill.member} is not below the {k} rewards in {path}")
    if objective.needs_ref_samples:
        samples = read_ref_samples(job_dir / "pairs" / "ref_samples.parquet")
        if len(samples) < spec.distill.num_workers:
            raise PairsError(f"ref_samples.parquet has {len(samples)} rows, fewer than distill.num_workers")
    if len(df) < spec.distill.num_workers:
        raise PairsError(f"{path}: {len(df)} usable pairs, fewer than distill.num_workers={spec.distill.num_workers}")
    return len(df)


def run_distill(spec: JobSpec, job_dir: str | Path, events: EventLog) -> dict[str, Any]:
    """Train with a Ray Train TorchTrainer and publish ``policy/`` atomically; needs a running Ray."""
    import ray
    import ray.data
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    if not ray.is_initialized():
        raise RuntimeError("run_distill needs a running Ray (the pipeline calls ray.init before the stages)")
    job_dir = Path(job_dir)
    d = spec.distill
    objective = objective_for(spec)
    rows = _check_inputs(spec, job_dir)
    config = loop_config(spec, job_dir)
    config["total_steps"] = d.max_steps or steps_for(rows, config, d.num_workers)
    train = ray.data.read_parquet(str(job_dir / "pairs" / "pairs.parquet"))
    if objective.labelled:
        train = train.map_batches(keep_labelled, batch_format="pandas")
    # Read once into the object store: every epoch re-executes the dataset, and on a busy cluster re-reading
    # the files each epoch costs more than the steps themselves.
    datasets = {"train": train.materialize()}
    if objective.needs_ref_samples:
        datasets["ref"] = ray.data.read_parquet(str(job_dir / "pairs" / "ref_samples.parquet")).materialize()
    events.emit("log", "distill", message=f"training {d.loss} on {rows} pairs for {config['total_steps']} steps")
    with staging(job_dir, "policy") as out:
        config["output_dir"] = str(out)
        trainer = TorchTrainer(
            train_loop,
            train_loop_config=config,
            scaling_config=ScalingConfig(num_workers=d.num_workers, use_gpu=d.use_gpu),
            datasets=datasets,
            run_config=RunConfig(
                name=RUN_NAME,
                storage_path=str((job_dir / "checkpoints").resolve()),
                failure_config=FailureConfig(max_failures=d.max_failures),
                checkpoint_config=CheckpointConfig(num_to_keep=2),
            ),
        )
        trainer.fit()
        info = json.loads((out / POLICY_INFO).read_text(encoding="utf-8"))
    return {
        "policy": str(stage_dir(job_dir, "policy")),
        "pairs": rows,
        "steps": info["steps"],
        "final_metrics": info["final_metrics"],
    }
