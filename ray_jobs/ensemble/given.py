"""Reward models the user brings as ensemble members (``ensemble.members[k].model``).

Each is checked before anything runs (a one-output sequence-classification model, or the spec is refused naming
the field), then copied into the ensemble as ``member-<k>/`` with a ``metrics.json`` measured on the test split
exactly as a trained member's is. The score stage, `reuse.ensemble` and the manifest then treat every member
alike, and the job folder holds every model it was scored with, whatever happens to the original path.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from ray_jobs.ensemble.train import MemberTask, evaluate, load_pairs
from ray_jobs.layout import MEMBER_METRICS_FILE, JobLayout
from ray_jobs.spec import EnsembleSpec, SpecError
from ray_jobs.train_runtime import WorkerRuntime, intra_op_threads, node_info


def given_field(k: int) -> str:
    return f"ensemble.members.{k}.model"


def check_given(spec: EnsembleSpec) -> None:
    """Refuse, naming each field, a given member that does not load as a sequence-classification model with one
    output. Reads configurations only, so a bad reference fails in seconds, before any member trains."""
    from ray_jobs.models.registry import ModelNotFoundError, load_config

    errors = []
    for k, ref in spec.given.items():
        try:
            config = load_config(ref)
        except ModelNotFoundError as exc:
            errors.append({"field": given_field(k), "message": str(exc)})
            continue
        architectures = getattr(config, "architectures", None) or []
        if architectures and not any(a.endswith("ForSequenceClassification") for a in architectures):
            message = f"{ref} is a {architectures[0]}, not a sequence-classification (reward) model"
        elif config.num_labels != 1:
            message = f"{ref} has {config.num_labels} outputs (num_labels); a reward model has exactly one"
        else:
            continue
        errors.append({"field": given_field(k), "message": message})
    if errors:
        raise SpecError(errors)


def adopt_given(task: MemberTask) -> dict[str, Any]:
    """Copy given member ``task.k`` (``task.spec.backbone`` names it) into ``task.out_dir`` and write its
    metrics.json: held-out loss, accuracy and margins on the test split, under the ensemble's precision and token
    budget. Returns the metrics."""
    with intra_op_threads(task.spec.cpus_per_worker):
        return _adopt(task, WorkerRuntime(use_gpu=task.spec.gpus_per_worker > 0))


def _adopt(task: MemberTask, rt: WorkerRuntime) -> dict[str, Any]:
    from ray_jobs.models.io import save_model_folder
    from ray_jobs.models.registry import load_reward_model
    from ray_jobs.models.reward import INPUT_KEY

    spec, started = task.spec, task.launched_at or time.time()
    test = load_pairs(JobLayout(task.job_dir).test)
    model, tokenizer = load_reward_model(spec.backbone)
    chosen = task.input
    if chosen != "auto":
        # Kept in the member's own tokenizer config: scoring, `reuse.ensemble` and any later reader see it.
        tokenizer.init_kwargs[INPUT_KEY] = chosen
    held_out = evaluate(rt.prepare(model), tokenizer, test, spec, rt)
    out = Path(task.out_dir)
    save_model_folder(model, tokenizer, out)
    metrics = {
        "member": task.k,
        "source": "given",
        "accuracy": held_out["accuracy"],
        "loss": held_out["loss"],
        "heldout_margins": held_out["margins"],
        "validation_accuracy": None,
        "selected_by": "given",
        "epochs_run": 0,
        "best_epoch": None,
        "attempt": task.attempt,
        "backbone": spec.backbone,
        "lr": None,
        "seed": None,
        "lora_r": None,
        "max_length": spec.max_length,
        "input": chosen,
        "test_pairs": len(test["prompt"]),
        "start_time": started,
        "end_time": time.time(),
        "pid": os.getpid(),
        **node_info(),
    }
    (out / MEMBER_METRICS_FILE).write_text(json.dumps(metrics, indent=2))
    return metrics
