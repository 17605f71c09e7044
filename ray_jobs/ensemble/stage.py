"""The ensemble stage: fit the family of K Bradley–Terry reward models, members in parallel on Ray.

The K members are Ray Tune trials of one Tuner, so Tune provides the concurrency limit and the retry policy. A member
of several workers is a Ray Train ``TorchTrainer`` run (DDP over ``workers_per_member`` workers, gloo on CPU; the Train
V2 + Tune pattern: the trial function builds and fits the trainer), its trial holding only ``TRIAL_CPUS`` and the
workers their own resources. A one-worker member trains inside its trial, which then reserves the worker's resources
too. Either way members share a node or a GPU freely.

Outputs (published atomically): ``ensemble/member-<k>/`` (HF folder + metrics.json) and ``ensemble/manifest.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ray_jobs.artifact_store import remove_run_storage, run_storage
from ray_jobs.ensemble.given import check_given
from ray_jobs.ensemble.train import MemberTask
from ray_jobs.event_relay import worker_events
from ray_jobs.events import EventLog
from ray_jobs.handover import hand_over, take_over, this_node
from ray_jobs.layout import MANIFEST_FILE, MEMBER_METRICS_FILE, JobLayout, member_dir
from ray_jobs.spec import EnsembleSpec, JobSpec, LoraSpec, MemberOverride, load_spec
from ray_jobs.tracking import tune_callbacks
from ray_jobs.train_runtime import process_start_time, reclaiming_placement_groups

STAGE = "ensemble"
# A trial that only builds a Train run and waits on it; a tenth of a CPU lets K of them sit beside K members' workers.
TRIAL_CPUS = 0.1
# Test hook (see ray_jobs.ensemble.train): the first attempt of this member index raises after its first epoch.
FAIL_ONCE_ENV = "RMDISTILL_FAIL_MEMBER_ONCE"


class EnsembleError(RuntimeError):
    """A member failed for good (after its retries), or the stage cannot start."""


def _member_spec(spec: EnsembleSpec, k: int) -> EnsembleSpec:
    """The ensemble section as member k trains it: its overrides applied, no other member's.

    A member without a seed override gets ``seed + k``, so ``diversity: seed`` members differ by default.
    """
    override = spec.members[k] if k < len(spec.members) else MemberOverride()
    lora = spec.lora
    if override.lora_r is not None:
        lora = (spec.lora or LoraSpec()).model_copy(update={"r": override.lora_r})
    return spec.model_copy(
        update={
            "backbone": override.model or override.backbone or spec.backbone,
            "lr": override.lr or spec.lr,
            "seed": spec.seed + k if override.seed is None else override.seed,
            "lora": lora,
            "members": [],
        }
    )


def member_tasks(
    spec: EnsembleSpec, job_dir: Path, out_root: Path, tensorboard: bool = True, events_relay: Any = None
) -> list[MemberTask]:
    """One task per member, writing into ``out_root/member-<k>``; a given member's `spec.backbone` is its model."""
    fail_member = os.environ.get(FAIL_ONCE_ENV)
    driver = this_node()
    return [
        MemberTask(
            k=k,
            spec=_member_spec(spec, k),
            job_dir=str(job_dir),
            out_dir=str(member_dir(out_root, k)),
            data_seed=spec.seed,
            given=k in spec.given,
            input=spec.members[k].input if k < len(spec.members) else "auto",
            tensorboard=tensorboard,
            fail_once_marker=str(out_root / f".failed-once-{k}") if fail_member == str(k) else None,
            driver_node=driver,
            events_relay=events_relay,
        )
        for k in range(spec.size)
    ]


def _train_worker(config: dict[str, Any]) -> None:
    """Ray Train worker entry: the plain loop, DDP-wrapped, reporting every epoch (Tune sees it via the callback)."""
    import ray.train

    from ray_jobs.ensemble.train import train_member
    from ray_jobs.train_runtime import WorkerRuntime

    train_member(config["task"], WorkerRuntime(), report=ray.train.report)


def _bump_attempt(task: MemberTask) -> int:
    # Tune restarts a failed trial in a fresh actor, so the attempt count lives on the shared job folder.
    counter = Path(task.out_dir).parent / ".attempts" / f"member-{task.k}"
    counter.parent.mkdir(parents=True, exist_ok=True)
    with counter.open("a") as fh:
        fh.write(f"{time.time()}\n")
    return len(counter.read_text().splitlines())


def _member_trial(trial_config: dict[str, Any], tasks: dict[int, MemberTask]) -> dict[str, Any]:
    """Tune trial function: fit one member; raise so Tune retries a failed member."""
    res = trial_config["resources"]
    fit = _fit_in_trial if res["workers_per_member"] == 1 else _fit_with_train
    return _run_member(tasks[trial_config["member"]], lambda task: fit(task, res))


def _run_member(task: MemberTask, fit: Callable[[MemberTask], Any]) -> dict[str, Any]:
    """Fit (or, for a given member, measure) one member into its folder, telling the event log; a trial's or a
    task's body alike."""
    task = dataclasses.replace(task, attempt=_bump_attempt(task), launched_at=time.time(), trial_node=this_node())
    k = task.k
    layout = JobLayout(task.job_dir)
    events = worker_events(task.job_dir, task.events_relay)
    events.emit("log", STAGE, message=f"member {k} started (attempt {task.attempt})", event="member_started", member=k)
    shutil.rmtree(task.out_dir, ignore_errors=True)  # a retry must not publish a half-written earlier attempt
    fit_start = time.time()
    fit(task)
    fit_end = time.time()
    take_over(layout, task.out_dir)  # written by a Train run's rank 0 on another node
    metrics = json.loads((Path(task.out_dir) / MEMBER_METRICS_FILE).read_text())
    hand_over(layout, task.out_dir, task.driver_node)
    events.emit(
        "log",
        STAGE,
        message=f"member {k} finished: held-out accuracy {metrics['accuracy']:.3f}, loss {metrics['loss']:.4f}",
        event="member_finished",
        member=k,
        source=metrics["source"],
        accuracy=metrics["accuracy"],
        loss=metrics["loss"],
        attempt=metrics["attempt"],
        node_id=metrics["node_id"],
        trial_pid=os.getpid(),
        trial_process_start=process_start_time(),
        fit_start=fit_start,
        fit_end=fit_end,
    )
    finished = {e["member"] for e in events.since_started(STAGE) if e.get("event") == "member_finished"}
    events.progress(STAGE, done=len(finished), total=task.spec.size)
    return {key: metrics[key] for key in ("member", "accuracy", "loss", "epochs_run", "attempt")}


def _adopt_given(spec: EnsembleSpec, tasks: list[MemberTask]) -> list[Any]:
    """Start measuring the given members, one Ray task each on a member's resources; returns their refs."""
    import ray

    from ray_jobs.ensemble.given import adopt_given

    # A plain task, not a Tune trial: there is nothing to search or report per epoch, and an ensemble of given
    # members only then starts no Tune run at all. A bad model fails its task at once (no retry helps it).
    remote = ray.remote(_run_member).options(
        num_cpus=spec.cpus_per_worker, num_gpus=spec.gpus_per_worker, max_retries=0
    )
    return [remote.remote(task, adopt_given) for task in tasks]


def _fit_in_trial(task: MemberTask, res: dict[str, Any]) -> None:
    """A one-worker member trains in its trial's own process, on the resources the trial reserved for it.

    A Train run would add a controller, a placement-group cleaner, a synchronisation actor and the worker: four
    processes that each import Ray (the worker torch and transformers too) and a worker group to wait for, all
    to run one rank. On a small machine that start-up was as long as the training itself.
    """
    from ray import tune

    from ray_jobs.ensemble.train import train_member
    from ray_jobs.train_runtime import WorkerRuntime

    # Each epoch reaches Tune as a result, so the tracker callbacks log the member's curve, not only its end.
    train_member(task, WorkerRuntime(use_gpu=res["gpus_per_worker"] > 0), report=tune.report)


def _fit_with_train(task: MemberTask, res: dict[str, Any]) -> None:
    """A member spanning several workers is one Ray Train run: DDP over its worker group."""
    import ray.train
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    # Train's preemption watcher is one more actor process per member; a preempted member is retried whole by Tune.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    layout = JobLayout(task.job_dir)
    storage_path, storage_filesystem = run_storage(layout, layout.ray_storage(STAGE))
    worker_resources = {"CPU": res["cpus_per_worker"]}
    if res["gpus_per_worker"] > 0:
        worker_resources["GPU"] = res["gpus_per_worker"]
    TorchTrainer(
        _train_worker,
        train_loop_config={"task": task},
        scaling_config=ray.train.ScalingConfig(
            num_workers=res["workers_per_member"],
            use_gpu=res["gpus_per_worker"] > 0,
            resources_per_worker=worker_resources,
        ),
        run_config=ray.train.RunConfig(
            name=f"member-{task.k}-attempt-{task.attempt}",
            storage_path=storage_path,
            storage_filesystem=storage_filesystem,
            callbacks=[TuneReportCallback()],
            # Retries belong to Tune (whole member, counted in metrics.json), not to Train's worker restarts.
            failure_config=ray.train.FailureConfig(max_failures=0),
        ),
    ).fit()


def _trial_resources(spec: EnsembleSpec) -> dict[str, float]:
    """What one member's Tune trial reserves: the worker itself when the member trains in the trial (nothing on top,
    so a worker may take a whole node), else only ``TRIAL_CPUS`` beside the Train workers' own reservations."""
    if spec.workers_per_member > 1:
        return {"cpu": TRIAL_CPUS}
    return {"cpu": spec.cpus_per_worker, "gpu": spec.gpus_per_worker}


def _max_concurrent(spec: EnsembleSpec, trained: int) -> int:
    """Members that fit on the cluster at once (spec.max_concurrent wins): more would only queue inside Train."""
    import ray

    if spec.max_concurrent:
        return min(spec.max_concurrent, trained)
    total = ray.cluster_resources()
    member_cpus = spec.workers_per_member * spec.cpus_per_worker
    fits = total.get("CPU", 0.0) / (member_cpus + (TRIAL_CPUS if spec.workers_per_member > 1 else 0.0))
    if spec.gpus_per_worker > 0:
        fits = min(fits, total.get("GPU", 0.0) / (spec.workers_per_member * spec.gpus_per_worker))
    return max(1, min(trained, math.floor(fits + 1e-9)))


def _fit_members(spec: EnsembleSpec, tasks: list[MemberTask], layout: JobLayout, callbacks: list[Any]) -> None:
    """The trained members as trials of one Tune run; `callbacks` are its tracker logger callbacks."""
    from ray import tune

    storage_path, storage_filesystem = run_storage(layout, layout.ray_storage(STAGE))
    resources = {
        "workers_per_member": spec.workers_per_member,
        "cpus_per_worker": spec.cpus_per_worker,
        "gpus_per_worker": spec.gpus_per_worker,
    }
    tuner = tune.Tuner(
        # Tune's param space is for searchable values: the tasks travel with the function, the space names a member.
        tune.with_resources(tune.with_parameters(_member_trial, tasks={t.k: t for t in tasks}), _trial_resources(spec)),
        param_space={"member": tune.grid_search([t.k for t in tasks]), "resources": resources},
        tune_config=tune.TuneConfig(
            max_concurrent_trials=_max_concurrent(spec, len(tasks)),
            trial_name_creator=lambda t: f"member-{t.config['member']}",
            trial_dirname_creator=lambda t: f"member-{t.config['member']}",
        ),
        run_config=tune.RunConfig(
            name="ensemble",
            storage_path=storage_path,
            storage_filesystem=storage_filesystem,
            failure_config=tune.FailureConfig(max_failures=spec.max_retries),
            callbacks=callbacks,
            verbose=0,
        ),
    )
    with reclaiming_placement_groups():
        results = tuner.fit()
    failed = [(r.config["member"], r.error) for r in results if r.error is not None]
    if failed:
        detail = "; ".join(f"member {k}: {type(e).__name__}: {e}" for k, e in failed)
        raise EnsembleError(
            f"{len(failed)} of {len(tasks)} trained members failed after {spec.max_retries} retries: {detail}"
        )


def build_manifest(spec: EnsembleSpec, out_root: Path) -> dict[str, Any]:
    """Summarise the members: accuracies, where they ran, and their disagreement on the held-out pairs."""
    members = [json.loads((member_dir(out_root, k) / MEMBER_METRICS_FILE).read_text()) for k in range(spec.size)]
    margins = np.array([m["heldout_margins"] for m in members])  # [K, test pairs], r(preferred) - r(rejected)
    keys = (
        "accuracy",
        "loss",
        "validation_accuracy",
        "selected_by",
        "epochs_run",
        "best_epoch",
        "attempt",
        "backbone",
        "lr",
        "seed",
        "lora_r",
        "max_length",
    )
    return {
        "size": spec.size,
        # Which members the user brought (used as they are) and which this stage fitted.
        "given": sorted(spec.given),
        "trained": spec.trained,
        "backbone": spec.backbone,
        "backbones": sorted({m["backbone"] for m in members}),
        "diversity": spec.diversity,
        "members": [
            {"path": member_dir(out_root, m["member"]).name, "member": m["member"], "source": m["source"]}
            | {key: m[key] for key in keys}
            | {
                "node_id": m["node_id"],
                "node_ip": m["node_ip"],
                "start_time": m["start_time"],
                "end_time": m["end_time"],
                # How the member reads (prompt, response): a given member's `input`; trained ones as trained here.
                "input": m.get("input", "auto"),
            }
            for m in members
        ],
        "accuracies": [m["accuracy"] for m in members],
        "mean_member_accuracy": float(np.mean([m["accuracy"] for m in members])),
        # The ensemble-mean reward ranks a pair correctly when the mean margin is positive.
        "ensemble_mean_accuracy": float(np.mean(margins.mean(axis=0) > 0)),
        # Per-pair spread of the members' margins: the disagreement the pessimistic e-DPO loss exploits.
        "margin_std": float(margins.std(axis=0).mean()),
        "test_pairs": int(margins.shape[1]),
        "nodes": sorted({m["node_id"] for m in members if m["node_id"]}),
    }


def run(spec: JobSpec, job_dir: str | os.PathLike[str], events: EventLog) -> dict[str, Any]:
    """Fit ``spec.ensemble.size`` members on the running Ray cluster and publish ``ensemble/``."""
    import ray

    if not ray.is_initialized():
        raise EnsembleError("the ensemble stage needs a running Ray (the pipeline connects first)")
    ens = spec.ensemble
    layout = JobLayout(Path(job_dir).resolve())
    if ens.size == 0:
        return {"size": 0, "skipped": True}
    for split in (layout.train, layout.test):
        if not split.is_file():
            raise EnsembleError(f"{split} is missing: run the data stage first")
    check_given(ens)
    started = time.time()
    with layout.staging(STAGE) as out_root:
        tasks = member_tasks(ens, layout.root, out_root, spec.tracking.tensorboard, events.relay)
        given, trained = [t for t in tasks if t.given], [t for t in tasks if not t.given]
        events.emit(
            "log",
            STAGE,
            message=f"fitting {len(trained)} reward models ({ens.diversity}), measuring {len(given)} given",
            members=ens.size,
            given=len(given),
        )
        adopting = _adopt_given(ens, given)
        try:
            if trained:
                _fit_members(ens, trained, layout, tune_callbacks(spec.tracking, layout.root, STAGE))
        finally:
            # Wait for the given members whatever the trained ones did: none may still write into staging.
            adopted = ray.wait(adopting, num_returns=len(adopting))[0] if adopting else []
        ray.get(adopted)
        for task in tasks:
            take_over(layout, task.out_dir)  # members that trained on another node handed their folders over
        manifest = build_manifest(ens, out_root)
        manifest["wall_time_s"] = time.time() - started
        (out_root / layout.manifest.name).write_text(json.dumps(manifest, indent=2))
        for hidden in out_root.glob(".*"):
            shutil.rmtree(hidden) if hidden.is_dir() else hidden.unlink()
    remove_run_storage(layout, layout.ray_storage(STAGE))
    summary = {k: manifest[k] for k in ("size", "accuracies", "ensemble_mean_accuracy", "margin_std", "nodes")}
    events.metrics(STAGE, step=0, values={k: summary[k] for k in ("ensemble_mean_accuracy", "margin_std")})
    return summary | {"wall_time_s": manifest["wall_time_s"]}


def load_members(ensemble_dir: str | os.PathLike[str]) -> list[tuple[Path, int | None]]:
    """(folder, the token budget it was trained at, if recorded) of each member of a published ensemble, in member
    order; empty when there is no ensemble."""
    ensemble_dir = Path(ensemble_dir)
    manifest = ensemble_dir / MANIFEST_FILE
    if not manifest.is_file():
        return []
    members = [(ensemble_dir / m["path"], m.get("max_length")) for m in json.loads(manifest.read_text())["members"]]
    missing = [str(p) for p, _ in members if not p.is_dir()]
    if missing:
        raise EnsembleError(f"{manifest} lists member folders that do not exist: {', '.join(missing)}")
    return members


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ray_jobs.ensemble", description="Fit the reward-model ensemble of a job (needs job_dir/data/)."
    )
    parser.add_argument("--spec", required=True, help="job spec (.yaml/.yml/.json)")
    parser.add_argument("--job-dir", required=True, type=Path)
    args = parser.parse_args(argv)
    from ray_jobs.cluster import connect

    spec = load_spec(args.spec)
    connect()
    summary = run(spec, args.job_dir, EventLog(args.job_dir))
    # One line, last: Ray and Tune may print to stdout before it, so callers read the final line.
    print(json.dumps(summary))
    print(f"ensemble written to {JobLayout(args.job_dir).ensemble}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
