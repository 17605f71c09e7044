"""The distill stage: train the policy on the scored pairs with Ray Train and publish ``distill/`` (the policy).

`train_policy` (in `ray_jobs.distill.loop`) is the plain PyTorch loop; `run` wraps it in a `TorchTrainer` whose
workers read the pairs (and the reference samples when alpha > 0) as Ray Data shards. Checkpoints live in
``<job>/checkpoints/`` (outside staging, so they survive a crash), or under the job in the artifact root when
``RMDISTILL_ARTIFACTS`` sets one (every worker node reaches it, and a resume on another node finds them): Ray
Train restarts failed workers up to ``distill.max_failures`` times from the newest one, and a re-run of the stage
with the same job folder restores the run by its name. Once the policy is published the checkpoints are deleted:
nothing reads them after, and a 135M policy's two kept checkpoints (weights and AdamW state) are 1.5 GB a job,
which filled a disk halfway through the robustness grid. FSDP comes from
`ray.train.torch.prepare_model(parallel_strategy="fsdp")`.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from ray_jobs.artifact_store import dataset_source, remove_run_storage, run_storage
from ray_jobs.cluster import current_resources, distill_worker_cpus
from ray_jobs.distill.card import write_policy_card
from ray_jobs.distill.data import PairsError, keep_labelled, read_pairs, read_ref_samples
from ray_jobs.distill.loop import DistillTask, distill_task, steps_for, train_policy
from ray_jobs.events import EventLog
from ray_jobs.handover import hand_over, take_over, this_node
from ray_jobs.layout import JobLayout
from ray_jobs.spec import JobSpec
from ray_jobs.train_runtime import intra_op_threads

STAGE = "distill"


def check_inputs(task: DistillTask) -> int:
    """Validate the pairs against the loss before any worker starts; returns how many pairs it trains on."""
    d, objective = task.spec, task.objective
    if d.lora is not None and d.strategy == "fsdp":
        raise ValueError("distill.lora with distill.strategy fsdp is not supported: use ddp for LoRA")
    path = Path(task.pairs)
    if not path.exists():
        raise PairsError(f"{path}: missing; run the score stage first (or reuse.pairs)")
    df = read_pairs(path, objective.labelled)
    if not objective.labelled:
        k = len(df["rewards_a"].iloc[0]) if df["rewards_a"].iloc[0] is not None else 0
        if k == 0:
            raise PairsError(f"{path}: rewards_a is empty (K = 0); loss {d.loss} needs ensemble rewards")
        if d.member is not None and d.member >= k:
            raise PairsError(f"distill.member {d.member} is not below the {k} rewards in {path}")
    if objective.needs_ref_samples:
        samples = read_ref_samples(task.ref_samples)
        if len(samples) < d.num_workers:
            raise PairsError(f"{task.ref_samples} has {len(samples)} rows, fewer than distill.num_workers")
    if len(df) < d.num_workers:
        raise PairsError(f"{path}: {len(df)} usable pairs, fewer than distill.num_workers={d.num_workers}")
    return len(df)


def _ray_worker(config: dict[str, Any]) -> None:
    import ray.train

    task = config["task"]
    with intra_op_threads(config["threads"]):
        train_policy(task)
    if ray.train.get_context().get_world_rank() == 0:
        hand_over(JobLayout(task.log_dir), task.output_dir, config["driver_node"])


def run(spec: JobSpec, job_dir: str | Path, events: EventLog) -> dict[str, Any]:
    """Train with a Ray Train TorchTrainer and publish the policy atomically; needs a running Ray."""
    import ray
    import ray.data
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    if not ray.is_initialized():
        raise RuntimeError("the distill stage needs a running Ray (the pipeline connects first)")
    layout = JobLayout(job_dir)
    d = spec.distill
    task = distill_task(spec, layout.root)
    rows = check_inputs(task)
    task = dataclasses.replace(task, total_steps=d.max_steps or steps_for(rows, d, d.num_workers))
    # Read tasks run on any node: from the artifact root when one is set, where every node reaches the pairs.
    source, filesystem = dataset_source(layout, Path(task.pairs))
    train = ray.data.read_parquet(source, filesystem=filesystem)
    if task.objective.labelled:
        train = train.map_batches(keep_labelled, batch_format="pandas")
    # Read once into the object store: every epoch re-executes the dataset, and on a busy cluster re-reading
    # the files each epoch costs more than the steps themselves.
    datasets = {"train": train.materialize()}
    if task.objective.needs_ref_samples:
        source, filesystem = dataset_source(layout, Path(task.ref_samples))
        datasets["ref"] = ray.data.read_parquet(source, filesystem=filesystem).materialize()
    cpus, threads = distill_worker_cpus(d, current_resources())
    events.emit(
        "log",
        STAGE,
        message=f"training {d.loss} on {rows} pairs for {task.total_steps} steps, {d.num_workers} worker(s) "
        f"reserving {cpus:g} CPU(s) and computing with {threads} thread(s) each",
        cpus_per_worker=cpus,
        threads_per_worker=threads,
    )
    storage_path, storage_filesystem = run_storage(layout, layout.checkpoints)
    with layout.staging(STAGE) as out:
        trainer = TorchTrainer(
            _ray_worker,
            train_loop_config={
                "task": dataclasses.replace(task, output_dir=str(out), events_relay=events.relay),
                "threads": threads,
                "driver_node": this_node(),
            },
            scaling_config=ScalingConfig(
                num_workers=d.num_workers,
                use_gpu=d.use_gpu,
                resources_per_worker={"CPU": cpus, **({"GPU": 1} if d.use_gpu else {})},
            ),
            datasets=datasets,
            run_config=RunConfig(
                name=STAGE,
                storage_path=storage_path,
                storage_filesystem=storage_filesystem,
                failure_config=FailureConfig(max_failures=d.max_failures),
                checkpoint_config=CheckpointConfig(num_to_keep=2),
            ),
        )
        trainer.fit()
        take_over(layout, out)  # rank 0 trained on another node
        info = json.loads((out / layout.policy_info.name).read_text(encoding="utf-8"))
        write_policy_card(layout, out)
    remove_run_storage(layout, layout.checkpoints)
    return {"policy": str(layout.policy), "pairs": rows, "steps": info["steps"], "final_metrics": info["final_metrics"]}
