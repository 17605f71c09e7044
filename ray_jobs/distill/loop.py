"""The distillation training loop: plain PyTorch that Ray Train wraps, and that runs alone without Ray.

Only the policy is in memory: reference log-probs, ensemble rewards and token ids arrive precomputed in the pairs,
so one forward pass per micro-batch (each pair's responses packed after one copy of its prompt, reference samples
in the same batch) and `packed_logps` (logits only at response positions, float32 log-softmax) give every term of
every loss.

The loop reads a `DistillTask`: the job's reference and its validated `DistillSpec` as is, plus where to read and
write. A field added to the spec therefore reaches the loop with no other edit.

Test hook: ``crash_after_step = N`` (set by `distill_task` from the env var ``RMDISTILL_CRASH_AFTER_STEP``) makes
rank 0 raise once right after step N's checkpoint, leaving a marker file in the log folder so the restarted worker
carries on. It exists to prove resumption without mocks.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ray_jobs.distill import checkpoint as ckpt
from ray_jobs.distill.data import (
    collate_pairs,
    collate_samples,
    local_batches,
    read_pairs,
    read_ref_samples,
    shard_batches,
)
from ray_jobs.distill.metrics import MetricsWindow
from ray_jobs.distill.objective import Objective
from ray_jobs.layout import ADAPTER_DIR, POLICY_INFO_FILE, JobLayout
from ray_jobs.precision import autocast
from ray_jobs.spec import DistillSpec, JobSpec, TrackingSpec
from ray_jobs.train_runtime import WorkerRuntime, node_info, unwrap

CRASH_ENV = "RMDISTILL_CRASH_AFTER_STEP"


@dataclass(frozen=True)
class DistillTask:
    """What the loop needs: the reference, the distill section, and where to read and write.

    ``log_dir`` receives events.jsonl and the trackers' files (rank 0; None = silent), `tracking` says which
    trackers (the job's `spec.tracking`), ``checkpoint_dir`` the resumable state when running without Ray Train
    (None = no checkpoints), ``output_dir`` the policy (None = not saved).
    """

    reference: str
    spec: DistillSpec
    pairs: str
    ref_samples: str
    log_dir: str | None = None
    checkpoint_dir: str | None = None
    output_dir: str | None = None
    total_steps: int | None = None
    crash_after_step: int | None = None
    tracking: TrackingSpec = dataclasses.field(default_factory=TrackingSpec)
    events_relay: Any = None  # the driver's event-log relay (ray_jobs.event_relay), for a rank 0 on another node

    @property
    def objective(self) -> Objective:
        return Objective.from_spec(self.spec)


def distill_task(spec: JobSpec, job_dir: str | os.PathLike[str], **changes: Any) -> DistillTask:
    """The task of a job's distill stage, reading ``score/`` and logging into the job folder."""
    layout = JobLayout(job_dir)
    crash = os.environ.get(CRASH_ENV)
    task = DistillTask(
        reference=spec.reference,
        spec=spec.distill,
        pairs=str(layout.pairs),
        ref_samples=str(layout.ref_samples),
        log_dir=str(layout.root),
        checkpoint_dir=str(layout.checkpoints / "local"),
        crash_after_step=int(crash) if crash else None,
        tracking=spec.tracking,
    )
    return dataclasses.replace(task, **changes)


def policy_info(task: DistillTask, steps: int, final_metrics: dict[str, Any]) -> dict[str, Any]:
    """rmdistill.json, the policy's record of how it was trained: the reference and the whole distill section."""
    return {
        "reference": task.reference,
        **task.spec.model_dump(mode="json"),
        "labelled_only": task.objective.labelled,
        "steps": steps,
        "final_metrics": final_metrics,
    }


def steps_for(rows: int, spec: DistillSpec, world: int) -> int:
    """Optimizer steps for `epochs` passes over `rows` pairs split across `world` workers."""
    per_step = spec.batch_size * spec.gradient_accumulation_steps * world
    return max(1, math.ceil(rows / per_step)) * spec.epochs


def _pair_batches(task: DistillTask, rt: WorkerRuntime) -> Iterator[Any]:
    d = task.spec
    if rt.ray:
        return shard_batches(rt.dataset_shard("train"), d.batch_size, d.seed)
    return local_batches(read_pairs(task.pairs, task.objective.labelled), d.batch_size, d.seed)


def _sample_batches(task: DistillTask, rt: WorkerRuntime) -> Iterator[Any]:
    d = task.spec
    if rt.ray:
        return shard_batches(rt.dataset_shard("ref"), d.batch_size, d.seed)
    return local_batches(read_ref_samples(task.ref_samples), d.batch_size, d.seed)


def _total_steps(task: DistillTask, world: int) -> int:
    if task.spec.max_steps:
        return task.spec.max_steps
    if task.total_steps:
        return task.total_steps
    return steps_for(len(read_pairs(task.pairs, task.objective.labelled)), task.spec, world)


def _load_policy(task: DistillTask, device: torch.device) -> tuple[torch.nn.Module, Any]:
    from ray_jobs.models.registry import enable_gradient_checkpointing, load_causal_lm

    d = task.spec
    # fp32 master weights whatever the compute precision (ray_jobs.precision).
    model, tokenizer = load_causal_lm(task.reference, dtype=torch.float32, device="cpu")
    # π_ref's log-probs were computed without dropout; the policy must match it at step 0.
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    if d.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    if d.lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(
            model,
            LoraConfig(
                r=d.lora.r,
                lora_alpha=d.lora.alpha,
                lora_dropout=d.lora.dropout,
                target_modules=d.lora.target_modules,
                task_type="CAUSAL_LM",
            ),
        )
    if d.compile:
        # In place: a wrapper module would prefix every state_dict key, which checkpoints and the saved policy read.
        model.compile(dynamic=True)
    model.train()
    return model, tokenizer


def _scheduler(spec: DistillSpec, optimizer: torch.optim.Optimizer, total: int) -> Any:
    from transformers import get_scheduler

    name = spec.lr_scheduler
    if name == "constant" and spec.warmup_steps:
        name = "constant_with_warmup"
    return get_scheduler(name, optimizer, num_warmup_steps=spec.warmup_steps, num_training_steps=total)


def _forward(
    model: torch.nn.Module, tokenizer: Any, spec: DistillSpec, pairs: dict[str, Any], samples: dict[str, Any] | None
) -> tuple[torch.Tensor, ...]:
    """One packed forward: [a; b; reference samples] → their summed response log-probs and the token count.

    Each pair's two responses share one copy of its prompt (`ray_jobs.models.logps.pack`); the ids are stored
    with the pairs, EOS already appended to the responses that ended, exactly as π_ref's log-probs were computed.
    """
    from ray_jobs.models.logps import pack, packed_logps

    prompts = pairs["prompt_ids"] * 2
    responses = pairs["ids_a"] + pairs["ids_b"]
    if samples is not None:
        prompts = prompts + samples["prompt_ids"]
        responses = responses + samples["ids"]
    packed = pack(prompts, responses, spec.max_length, tokenizer.pad_token_id)
    device = next(model.parameters()).device
    with autocast(spec.precision, device):
        logps = packed_logps(model, packed).float()
    n = len(pairs["prompt_ids"])
    return logps[:n], logps[n : 2 * n], logps[2 * n :], packed.tokens


def _step_selection(
    model: torch.nn.Module,
    tokenizer: Any,
    spec: DistillSpec,
    objective: Objective,
    micros: list[tuple[dict[str, Any], dict[str, Any] | None]],
) -> tuple[torch.Tensor, list[tuple[torch.Tensor, ...] | None]]:
    """The member weights of this optimizer step, chosen on all its pairs across micro-batches and workers.

    With one micro-batch its forward (with grad) is kept for the update; with several, a gradient-free forward
    over each gives the statistics first, since the choice must precede every backward of the step.
    """
    outputs: list[tuple[torch.Tensor, ...] | None] = [None] * len(micros)
    total = None
    for i, (pairs, samples) in enumerate(micros):
        if len(micros) == 1:
            outputs[i] = _forward(model, tokenizer, spec, pairs, samples)
            pi_a, pi_b = outputs[i][:2]
        else:
            with torch.no_grad():
                pi_a, pi_b, *_ = _forward(model, tokenizer, spec, pairs, samples)
        dev = pi_a.device
        refs_and_rewards = (pairs[key].to(dev) for key in ("ref_a", "ref_b", "r_a", "r_b"))
        part = objective.gap_stats(pi_a, pi_b, *refs_and_rewards)
        total = part if total is None else total + part
    return total.all_reduce().selection(objective.family), outputs


def _crash_hook(task: DistillTask, step: int, rank: int) -> None:
    if task.crash_after_step != step or rank != 0:
        return
    marker = Path(task.log_dir or ".") / f".crash-hook-step-{step}"
    if marker.exists():
        return
    marker.touch()
    raise RuntimeError(f"{CRASH_ENV}={step}: test hook killing the worker after its checkpoint")


def _checkpoints(task: DistillTask, rt: WorkerRuntime) -> Any:
    return ckpt.RayCheckpoints() if rt.ray else ckpt.LocalCheckpoints(task.checkpoint_dir)


def train_policy(task: DistillTask) -> dict[str, Any]:
    """Train the policy on precomputed pairs; returns the last logged metrics (rank 0) and saves the policy."""
    d = task.spec
    rt = WorkerRuntime(use_gpu=d.use_gpu)
    objective = task.objective
    torch.manual_seed(d.seed)
    model, tokenizer = _load_policy(task, rt.device)
    model = rt.prepare(model, d.strategy)
    params = [p for p in model.parameters() if p.requires_grad]
    # Fused on every device (CPU too): on 2 cores the multi-tensor AdamW step of a 135M model measured 10× the
    # fused one, longer than the forward and backward it follows.
    optimizer = torch.optim.AdamW(params, lr=d.lr, fused=True)
    total = _total_steps(task, rt.world)
    scheduler = _scheduler(d, optimizer, total)
    checkpoints = _checkpoints(task, rt)
    start = 0
    with checkpoints.latest() as folder:
        if folder is not None:
            start = ckpt.restore(folder, model, optimizer, scheduler)
    accum = d.gradient_accumulation_steps
    # Skip what the checkpointed steps consumed, so a resumed run sees the data a clean run would have.
    pair_stream = itertools.islice(_pair_batches(task, rt), start * accum, None)
    sample_stream = (
        itertools.islice(_sample_batches(task, rt), start * accum, None) if objective.needs_ref_samples else None
    )
    log = _Logger(task.log_dir if rt.rank == 0 else None, task.tracking, d.model_dump(mode="json"), task.events_relay)
    threads = torch.get_num_threads()
    checkpointing = bool(getattr(unwrap(model), "is_gradient_checkpointing", False))  # as the model has it
    # Where every worker runs, in rank order: the record that a multi-node run really spread out.
    workers = [{"rank": r, **node} for r, node in enumerate(rt.gather(node_info()))]
    log.event(
        "log",
        message=f"computing with {threads} torch thread(s)",
        threads=threads,
        gradient_checkpointing=checkpointing,
        workers=workers,
    )
    if start:
        log.event("log", message=f"resumed from checkpoint at step {start}", resumed_step=start)
    window = MetricsWindow()
    last: dict[str, Any] = {}
    for step in range(start + 1, total + 1):
        t0 = time.perf_counter()
        micros = [
            (collate_pairs(next(pair_stream)), collate_samples(next(sample_stream)) if sample_stream else None)
            for _ in range(accum)
        ]
        outputs: list[tuple[torch.Tensor, ...] | None] = [None] * accum
        selection = None
        if objective.chooses_per_step:
            selection, outputs = _step_selection(model, tokenizer, d, objective, micros)
        for micro, (pairs, samples) in enumerate(micros):
            sync = micro == accum - 1 or not hasattr(model, "no_sync")
            with contextlib.nullcontext() if sync else model.no_sync():
                pi_a, pi_b, pi_s, tokens = outputs[micro] or _forward(model, tokenizer, d, pairs, samples)
                dev = pi_a.device
                loss, stats = objective(
                    pi_a,
                    pi_b,
                    pairs["ref_a"].to(dev),
                    pairs["ref_b"].to(dev),
                    pairs["r_a"].to(dev),
                    pairs["r_b"].to(dev),
                    pi_s if samples is not None else None,
                    samples["ref"].to(dev) if samples is not None else None,
                    selection=selection,
                )
                (loss / accum).backward()
            window.add(loss.detach(), stats, pairs["labelled"], tokens, len(pairs["prompt_ids"]))
        grad_norm = torch.nn.utils.clip_grad_norm_(params, d.max_grad_norm or float("inf"))
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        window.add_step(float(grad_norm), scheduler.get_last_lr()[0], time.perf_counter() - t0)
        if step % d.log_every == 0 or step == total:
            last = window.flush()
            log.metrics(step, last)
        if step % d.checkpoint_every == 0 and step < total:
            state = ckpt.gather(model, optimizer, scheduler, step)
            checkpoints.save(state if rt.rank == 0 else None, step, {"step": step, **last})
            _crash_hook(task, step, rt.rank)
    log.close()
    # FSDP shards the weights: every rank joins the gather, rank 0 writes the full model.
    full_state = ckpt.full_model_state(model) if d.strategy == "fsdp" and rt.world > 1 else None
    if task.output_dir and rt.rank == 0:
        info = policy_info(task, total, last)
        save_policy(model, tokenizer, Path(task.output_dir), info, full_state, d.policy_format)
    return last


def save_policy(
    model: torch.nn.Module,
    tokenizer: Any,
    out: Path,
    info: dict[str, Any],
    state_dict: dict[str, Any] | None = None,
    policy_format: str = "merged",
) -> None:
    """The policy as `distill.policy_format` asks: a plain Hugging Face folder (LoRA merged in), the PEFT adapter,
    or both (the adapter in ``adapter/``); plus rmdistill.json, whose `reference` is the adapter's base."""
    from ray_jobs.models.io import save_adapter_folder, save_model_folder

    if policy_format != "merged":
        # First: merging folds the adapter into the base weights in place.
        save_adapter_folder(model, tokenizer, out if policy_format == "adapter" else out / ADAPTER_DIR)
    if policy_format != "adapter":
        save_model_folder(model, tokenizer, out, state_dict)
    (out / POLICY_INFO_FILE).write_text(json.dumps(info, indent=2, default=str), encoding="utf-8")


class _Logger:
    """Writes metrics to the job's event log and to the trackers `spec.tracking` chose (TensorBoard by default);
    a None folder (other ranks) stays silent."""

    def __init__(self, log_dir: str | None, tracking: TrackingSpec, config: dict[str, Any], relay: Any = None):
        self.events = self.tracker = None
        if not log_dir:
            return
        from ray_jobs.event_relay import worker_events
        from ray_jobs.tracking import StageTracker

        self.events = worker_events(log_dir, relay)
        self.tracker = StageTracker(tracking, log_dir, "distill", config=config)

    def event(self, kind: str, **fields: Any) -> None:
        if self.events is not None:
            self.events.emit(kind, "distill", **fields)

    def metrics(self, step: int, values: dict[str, Any]) -> None:
        if self.events is None:
            return
        self.events.metrics("distill", step, values)
        self.tracker.log(step, values)

    def close(self) -> None:
        if self.tracker is not None:
            self.tracker.close()
