"""The plain PyTorch loop that fits one Bradley–Terry reward model (one ensemble member).

It runs without Ray (``train_member(task)``) and, unchanged, inside a Ray Train worker, where the `WorkerRuntime`
wraps the model in DDP and shards the rows by rank. A `MemberTask` carries the job's validated `EnsembleSpec` with
this member's overrides applied, so a field added to the spec reaches this loop with no other edit.

Loss (TRL RewardTrainer semantics): ``-log σ(r_w - r_l - margin)`` averaged over the batch, plus
``center_rewards_coefficient * mean((r_w + r_l)²)`` which pins the reward scale so members are comparable.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ray_jobs.artifact_store import ensure_local
from ray_jobs.handover import hand_over
from ray_jobs.layout import MEMBER_METRICS_FILE, PREFERENCES, JobLayout
from ray_jobs.spec import EnsembleSpec, TrackingSpec
from ray_jobs.train_runtime import WorkerRuntime, intra_op_threads, node_info, unwrap

# Test hook, not a feature: RMDISTILL_FAIL_MEMBER_ONCE=<k> (read by the stage, see ray_jobs.ensemble.stage) sets
# `fail_once_marker` for member k; its first attempt raises after one epoch and leaves this marker file, so the
# retry runs clean. It lets tests exercise Tune's retry path with real processes and no mocks.
FAIL_ONCE_MESSAGE = "injected failure of member {k} (RMDISTILL_FAIL_MEMBER_ONCE test hook)"


@dataclass(frozen=True)
class MemberTask:
    """One member's work: `spec` is the ensemble section with the member's overrides (backbone, lr, seed, LoRA).

    `given`: the member is a reward model the user brought, named by `spec.backbone`; it is measured, not trained.
    """

    k: int
    spec: EnsembleSpec
    job_dir: str
    out_dir: str
    data_seed: int  # the ensemble's own seed: disjoint members must cut the same permutation
    given: bool = False
    input: str = "auto"  # how a given member reads (prompt, response): ensemble.members[k].input
    tensorboard: bool = True  # write the member's epoch metrics to <job>/tensorboard/ensemble/member-<k>
    fail_once_marker: str | None = None
    attempt: int = 1
    launched_at: float | None = None
    # The Ray nodes that read the member's folder: the trial's (rank 0 of a Train run hands it over when elsewhere)
    # and the driver's (the trial hands it over in turn); see ray_jobs.handover.
    trial_node: str | None = None
    driver_node: str | None = None
    events_relay: Any = None  # the driver's event-log relay (ray_jobs.event_relay), for a member on another node


class PreferenceDataError(ValueError):
    """Training or test pairs the reward model cannot learn from (missing file, column, or labels)."""


def bt_loss(r_w: torch.Tensor, r_l: torch.Tensor, margin: float = 0.0, center: float = 0.0) -> torch.Tensor:
    """Bradley–Terry loss of preferred rewards ``r_w`` over rejected ``r_l`` (scalar, batch mean)."""
    loss = -F.logsigmoid(r_w - r_l - margin).mean()
    if center:
        loss = loss + center * ((r_w + r_l) ** 2).mean()
    return loss


def load_pairs(path: str | os.PathLike[str]) -> dict[str, list]:
    """Labelled pairs of a split as (prompt, winner, loser) columns; unlabelled rows are skipped (BT needs labels)."""
    import pandas as pd

    path = Path(path)
    ensure_local(path)  # a member on a node that never held the job folder reads the data stage from the root
    if not path.is_file():
        raise PreferenceDataError(f"{path} does not exist: run the data stage first")
    frame = pd.read_parquet(path)
    missing = [c for c in PREFERENCES.required if c not in frame.columns]
    if missing:
        raise PreferenceDataError(f"{path} lacks column(s) {', '.join(missing)}")
    frame = frame[frame["label"].notna()]
    bad = frame[~frame["label"].isin([0, 1])]
    if len(bad):
        raise PreferenceDataError(f"{path} row {bad.index[0]}: label must be 0, 1 or null, got {bad['label'].iloc[0]}")
    if frame.empty:
        raise PreferenceDataError(f"{path} has no labelled pairs: a Bradley–Terry reward model needs labels")
    a_wins = frame["label"].astype(int).to_numpy() == 1
    return {
        "prompt": frame["prompt"].tolist(),
        "chosen": np.where(a_wins, frame["response_a"], frame["response_b"]).tolist(),
        "rejected": np.where(a_wins, frame["response_b"], frame["response_a"]).tolist(),
    }


def member_rows(n: int, diversity: str, k: int, size: int, member_seed: int, data_seed: int) -> np.ndarray:
    """Indices of the training rows member ``k`` of ``size`` sees.

    ``seed``: all rows (members differ by init and order). ``bootstrap``: n draws with replacement, member-seeded.
    ``disjoint``: one shared permutation cut into ``size`` near-equal parts, part k.
    """
    if diversity == "seed":
        return np.arange(n)
    if diversity == "bootstrap":
        return np.random.default_rng(member_seed).integers(0, n, size=n)
    if diversity == "disjoint":
        if n < size:
            raise PreferenceDataError(f"diversity disjoint needs at least {size} labelled training pairs, got {n}")
        return np.array_split(np.random.default_rng(data_seed).permutation(n), size)[k]
    raise ValueError(f"unknown diversity {diversity!r}; expected seed, bootstrap or disjoint")


def _pair_rewards(model, tokenizer, data: dict[str, list], idx: list[int], spec: EnsembleSpec):
    """Rewards of the chosen and the rejected responses of rows `idx`, computed under the member's precision."""
    from ray_jobs.models.reward import reward_inputs
    from ray_jobs.precision import autocast

    # One forward over chosen and rejected together: half the calls, and both sides see the same padding.
    prompts = [data["prompt"][i] for i in idx]
    responses = [data["chosen"][i] for i in idx] + [data["rejected"][i] for i in idx]
    batch = reward_inputs(tokenizer, prompts + prompts, responses, spec.max_length)
    device = next(model.parameters()).device
    with autocast(spec.precision, device):
        r = model(**{k: v.to(device) for k, v in batch.items()}).logits[:, 0].float()
    return r[: len(idx)], r[len(idx) :]


@torch.no_grad()
def evaluate(model, tokenizer, data: dict[str, list], spec: EnsembleSpec, rt: WorkerRuntime) -> dict[str, Any]:
    """Held-out loss and accuracy over the whole split; each rank scores a shard, every rank gets the full result."""
    model.eval()
    n = len(data["prompt"])
    mine = list(range(rt.rank, n, rt.world))
    parts = []
    for start in range(0, len(mine), spec.batch_size):
        idx = mine[start : start + spec.batch_size]
        r_w, r_l = _pair_rewards(model, tokenizer, data, idx, spec)
        parts.append((idx, r_w.tolist(), r_l.tolist()))
    r_w, r_l = np.zeros(n), np.zeros(n)
    for shard in rt.gather(parts):
        for idx, w, lo in shard:
            r_w[idx], r_l[idx] = w, lo
    tw, tl = torch.from_numpy(r_w), torch.from_numpy(r_l)
    loss = bt_loss(tw, tl, spec.margin, spec.center_rewards_coefficient).item()
    model.train()
    # Margins are r(preferred) - r(rejected): > 0 is a correct ranking.
    return {"loss": loss, "accuracy": float(np.mean(r_w > r_l)), "margins": (r_w - r_l).tolist()}


def _load_model(spec: EnsembleSpec):
    from ray_jobs.models.registry import enable_gradient_checkpointing, load_reward_model

    # The fresh scalar head draws from torch's global RNG: the member seed makes members start apart.
    torch.manual_seed(spec.seed)
    model, tokenizer = load_reward_model(spec.backbone, lora=spec.lora)
    if spec.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    return model, tokenizer


def split_validation(train: dict[str, list], fraction: float, seed: int) -> tuple[dict[str, list], dict[str, list]]:
    """Training pairs cut by prompt into (fit, validation); no validation split when `fraction` is 0 or the
    training data has a single prompt. Selection never looks at the test split: it holds the evaluation prompts."""
    from ray_jobs.data.split import split_by_prompt

    held = split_by_prompt(train["prompt"], fraction, seed) if fraction > 0 else [False] * len(train["prompt"])
    part = {
        side: {c: [v for v, h in zip(vals, held, strict=True) if h == side] for c, vals in train.items()}
        for side in (False, True)
    }
    return part[False], part[True]


def train_member(
    task: MemberTask, rt: WorkerRuntime | None = None, report: Callable[[dict[str, Any]], None] | None = None
) -> dict[str, Any]:
    """Fit member ``task.k`` and write its HF folder + metrics.json to ``task.out_dir`` (rank 0).

    The epoch is chosen on a validation split carved from the training prompts (`ensemble.validation_fraction`),
    and the saved weights are that epoch's; `early_stopping_patience` stops after epochs without validation gains.
    The test split is only measured. ``report(metrics)`` is called every epoch on every rank (Ray Train's report
    must be called by all workers). torch computes with `spec.cpus_per_worker` threads. Returns the metrics dict.
    """
    with intra_op_threads(task.spec.cpus_per_worker):
        return _train_member(task, rt or WorkerRuntime(use_gpu=False), report)


def _train_member(task: MemberTask, rt: WorkerRuntime, report: Callable[[dict[str, Any]], None] | None):
    from ray_jobs.event_relay import worker_events
    from ray_jobs.models.io import save_model_folder
    from ray_jobs.tracking import StageTracker

    spec, k = task.spec, task.k
    launched = task.launched_at or time.time()
    train_start = time.time()
    timeline = {"loop_start": train_start}
    events = worker_events(task.job_dir, task.events_relay)
    # MLflow and W&B runs of members come from the Tune run's logger callbacks; TensorBoard is written here.
    tensorboard = TrackingSpec(tensorboard=task.tensorboard and rt.rank == 0)
    tracker = StageTracker(tensorboard, task.job_dir, "ensemble", f"member-{k}")
    layout = JobLayout(task.job_dir)
    train, validation = split_validation(load_pairs(layout.train), spec.validation_fraction, task.data_seed)
    test = load_pairs(layout.test)
    selects = bool(validation["prompt"])
    rows = member_rows(len(train["prompt"]), spec.diversity, k, spec.size, spec.seed, task.data_seed)
    timeline["data_loaded"] = time.time()
    model, tokenizer = _load_model(spec)
    model = rt.prepare(model)
    timeline["model_ready"] = time.time()
    # Fused on every device, as in distillation: the multi-tensor CPU step is many times slower.
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=spec.lr, fused=True)
    accum = spec.gradient_accumulation_steps
    best: dict[str, Any] | None = None
    best_state = None
    history = []
    stale = 0
    model.train()
    for epoch in range(1, spec.epochs + 1):
        order = np.random.default_rng([spec.seed, epoch]).permutation(rows)[rt.rank :: rt.world]
        batches = [order[i : i + spec.batch_size].tolist() for i in range(0, len(order), spec.batch_size)]
        train_losses = []
        for step, idx in enumerate(batches):
            sync = (step + 1) % accum == 0 or step + 1 == len(batches)
            # DDP all-reduces on every backward unless told not to: only the last micro-batch of a step syncs.
            ctx = model.no_sync() if rt.collective and not sync else contextlib.nullcontext()
            with ctx:
                r_w, r_l = _pair_rewards(model, tokenizer, train, idx, spec)
                loss = bt_loss(r_w, r_l, spec.margin, spec.center_rewards_coefficient)
                (loss / accum).backward()
            train_losses.append(loss.item())
            if sync:
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        held_out = evaluate(model, tokenizer, test, spec, rt)
        epoch_metrics = {
            "epoch": epoch,
            "train_loss": rt.mean(float(np.mean(train_losses)) if train_losses else math.nan),
            "loss": held_out["loss"],
            "accuracy": held_out["accuracy"],
        }
        if selects:
            checked = evaluate(model, tokenizer, validation, spec, rt)
            epoch_metrics |= {"validation_loss": checked["loss"], "validation_accuracy": checked["accuracy"]}
        history.append(epoch_metrics)
        if rt.rank == 0:
            events.metrics("ensemble", step=epoch, values=epoch_metrics, member=k, event="epoch_done")
            tracker.log(epoch, epoch_metrics)
        # Without a validation split the last epoch is kept: never choose on the test split.
        score = epoch_metrics["validation_loss"] if selects else -epoch
        if best is None or score < best["score"]:
            best, stale = {**epoch_metrics, "score": score, "margins": held_out["margins"]}, 0
            if selects and epoch < spec.epochs:
                best_state = {name: t.detach().to("cpu", copy=True) for name, t in unwrap(model).state_dict().items()}
        else:
            stale += 1
        if report:
            report({"member": k, **epoch_metrics})
        if task.fail_once_marker and not Path(task.fail_once_marker).exists():
            Path(task.fail_once_marker).write_text(str(time.time()))
            raise RuntimeError(FAIL_ONCE_MESSAGE.format(k=k))
        if selects and spec.early_stopping_patience and stale >= spec.early_stopping_patience:
            break
    timeline["trained"] = time.time()
    tracker.close()
    if best["epoch"] != history[-1]["epoch"]:
        unwrap(model).load_state_dict(best_state)
    metrics = {
        "member": k,
        "accuracy": best["accuracy"],
        "loss": best["loss"],
        "best_epoch": best["epoch"],
        "epochs_run": len(history),
        "history": history,
        "heldout_margins": best["margins"],
        "backbone": spec.backbone,
        "lr": spec.lr,
        "seed": spec.seed,
        "lora_r": spec.lora.r if spec.lora else None,
        "diversity": spec.diversity,
        "train_pairs": len(rows),
        "unique_train_pairs": len(np.unique(rows)),
        "test_pairs": len(test["prompt"]),
        "validation_pairs": len(validation["prompt"]),
        "validation_loss": best.get("validation_loss"),
        "validation_accuracy": best.get("validation_accuracy"),
        "selected_by": "validation" if selects else "last epoch",
        "max_length": spec.max_length,
        "world_size": rt.world,
        "attempt": task.attempt,
        "start_time": launched,
        "train_start_time": train_start,
        "timeline": timeline,
        "torch_threads": torch.get_num_threads(),
        # Read off the model, not the spec: whether its layers really recomputed their activations.
        "gradient_checkpointing": bool(getattr(unwrap(model), "is_gradient_checkpointing", False)),
        "pid": os.getpid(),
        "source": "trained",
        **node_info(),
    }
    out = Path(task.out_dir)
    if rt.rank == 0:
        save_model_folder(model, tokenizer, out)
    metrics["end_time"] = timeline["saved"] = time.time()
    if rt.rank == 0:
        (out / MEMBER_METRICS_FILE).write_text(json.dumps(metrics, indent=2))
        hand_over(layout, out, task.trial_node)
    return metrics
