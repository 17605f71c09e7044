"""The distillation training loop: plain PyTorch that Ray Train wraps, and that runs alone without Ray.

Only the policy is in memory: reference log-probs and ensemble rewards arrive precomputed in the pairs, so one
forward pass per micro-batch (chosen, rejected and reference samples stacked, padded to the batch's longest) and
`sequence_logps` (logits only at response positions, float32 log-softmax) give every term of every loss.

Test hook: ``config["crash_after_step"] = N`` (set by `run_distill` from the env var
``RMDISTILL_CRASH_AFTER_STEP``) makes rank 0 raise once right after step N's checkpoint, leaving a marker file in
the checkpoint folder so the restarted worker carries on. It exists to prove resumption without mocks.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from ray_jobs import distill_checkpoint as ckpt
from ray_jobs.distill_data import (
    collate_pairs,
    collate_samples,
    local_batches,
    read_pairs,
    read_ref_samples,
    shard_batches,
)
from ray_jobs.distill_metrics import MetricsWindow
from ray_jobs.distill_objective import Objective

POLICY_INFO = "rmdistill.json"

DEFAULTS: dict[str, Any] = {
    "objective": {"loss": "dpo", "beta": 0.1},
    "batch_size": 8,
    "gradient_accumulation_steps": 1,
    "lr": 5e-6,
    "lr_scheduler": "constant",
    "warmup_steps": 0,
    "epochs": 1,
    "max_steps": None,
    "total_steps": None,
    "max_grad_norm": 1.0,
    "max_length": 512,
    "lora": None,
    "bf16": True,
    "compile": False,
    "strategy": "ddp",
    "use_gpu": None,
    "checkpoint_every": 50,
    "log_every": 1,
    "seed": 0,
    "job_dir": None,
    "checkpoint_dir": None,
    "output_dir": None,
    "crash_after_step": None,
    "info": {},
}


class _Runtime:
    """What differs between running under Ray Train and alone: rank, device, data and checkpoint storage."""

    def __init__(self, cfg: dict[str, Any]):
        self.cfg = cfg
        self.ray = _in_ray_train()
        if self.ray:
            import ray.train
            import ray.train.torch

            ctx = ray.train.get_context()
            self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
            self.device = ray.train.torch.get_device()
            self.checkpoints: Any = ckpt.RayCheckpoints()
        else:
            self.rank, self.world = 0, 1
            want_gpu = cfg["use_gpu"] if cfg["use_gpu"] is not None else torch.cuda.is_available()
            self.device = torch.device("cuda" if want_gpu else "cpu")
            self.checkpoints = ckpt.LocalCheckpoints(cfg["checkpoint_dir"])

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        if not self.ray:
            return model.to(self.device)
        import ray.train.torch

        return ray.train.torch.prepare_model(model, parallel_strategy=self.cfg["strategy"])

    def pair_batches(self, labelled: bool) -> Iterator[Any]:
        if self.ray:
            import ray.train

            return shard_batches(ray.train.get_dataset_shard("train"), self.cfg["batch_size"], self.cfg["seed"])
        df = read_pairs(self.cfg["pairs_path"], labelled)
        return local_batches(df, self.cfg["batch_size"], self.cfg["seed"])

    def sample_batches(self) -> Iterator[Any]:
        if self.ray:
            import ray.train

            return shard_batches(ray.train.get_dataset_shard("ref"), self.cfg["batch_size"], self.cfg["seed"])
        df = read_ref_samples(self.cfg["ref_samples_path"])
        return local_batches(df, self.cfg["batch_size"], self.cfg["seed"])

    def total_steps(self, labelled: bool) -> int:
        if self.cfg["max_steps"]:
            return int(self.cfg["max_steps"])
        if self.cfg["total_steps"]:
            return int(self.cfg["total_steps"])
        rows = len(read_pairs(self.cfg["pairs_path"], labelled))
        return steps_for(rows, self.cfg, self.world)


def steps_for(rows: int, cfg: dict[str, Any], world: int) -> int:
    """Optimizer steps for `epochs` passes over `rows` pairs split across `world` workers."""
    per_step = cfg["batch_size"] * cfg["gradient_accumulation_steps"] * world
    return max(1, math.ceil(rows / per_step)) * cfg["epochs"]


def _in_ray_train() -> bool:
    try:
        import ray.train

        ray.train.get_context()
    except (ImportError, RuntimeError):
        return False
    return True


def _load_policy(cfg: dict[str, Any], device: torch.device) -> tuple[torch.nn.Module, Any]:
    from ray_jobs.models.registry import load_causal_lm

    dtype = torch.bfloat16 if device.type == "cuda" and cfg["bf16"] else torch.float32
    model, tokenizer = load_causal_lm(cfg["reference"], dtype=dtype, device="cpu")
    # π_ref's log-probs were computed without dropout; the policy must match it at step 0.
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    if cfg["lora"]:
        from peft import LoraConfig, get_peft_model

        lora = cfg["lora"]
        model = get_peft_model(
            model,
            LoraConfig(
                r=lora["r"],
                lora_alpha=lora["alpha"],
                lora_dropout=lora.get("dropout", 0.0),
                target_modules=lora.get("target_modules"),
                task_type="CAUSAL_LM",
            ),
        )
    if cfg["compile"]:
        # In place, so attribute access (sequence_logps reaching the decoder and lm_head) keeps working.
        model.compile(dynamic=True)
    model.train()
    return model, tokenizer


def _scheduler(cfg: dict[str, Any], optimizer: torch.optim.Optimizer, total: int) -> Any:
    from transformers import get_scheduler

    name = cfg["lr_scheduler"]
    if name == "constant" and cfg["warmup_steps"]:
        name = "constant_with_warmup"
    return get_scheduler(name, optimizer, num_warmup_steps=cfg["warmup_steps"], num_training_steps=total)


def _forward(
    model: torch.nn.Module, tokenizer: Any, cfg: dict[str, Any], pairs: dict[str, Any], samples: dict[str, Any] | None
) -> tuple[torch.Tensor, ...]:
    """One stacked forward: [a; b; reference samples] → their summed response log-probs and the token count."""
    from ray_jobs.models.logps import sequence_logps, tokenize_responses

    prompts = pairs["prompts"] * 2
    responses = pairs["response_a"] + pairs["response_b"]
    if samples is not None:
        prompts = prompts + samples["prompts"]
        responses = responses + samples["responses"]
    enc = tokenize_responses(tokenizer, prompts, responses, cfg["max_length"])
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in enc.items() if isinstance(v, torch.Tensor)}
    logps = sequence_logps(model, batch).float()
    n = len(pairs["prompts"])
    return logps[:n], logps[n : 2 * n], logps[2 * n :], int(batch["attention_mask"].sum())


def _crash_hook(cfg: dict[str, Any], step: int, rank: int) -> None:
    if cfg["crash_after_step"] != step or rank != 0:
        return
    marker = Path(cfg["job_dir"] or ".") / f".crash-hook-step-{step}"
    if marker.exists():
        return
    marker.touch()
    raise RuntimeError(f"RMDISTILL_CRASH_AFTER_STEP={step}: test hook killing the worker after its checkpoint")


def train_loop(config: dict[str, Any]) -> dict[str, Any]:
    """Train the policy on precomputed pairs; returns the last logged metrics (rank 0) and saves the policy."""
    cfg = {**DEFAULTS, **config}
    rt = _Runtime(cfg)
    objective = Objective(**cfg["objective"])
    torch.manual_seed(cfg["seed"])
    model, tokenizer = _load_policy(cfg, rt.device)
    model = rt.prepare(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg["lr"], fused=rt.device.type == "cuda")
    total = rt.total_steps(objective.labelled)
    scheduler = _scheduler(cfg, optimizer, total)
    start = 0
    with rt.checkpoints.latest() as folder:
        if folder is not None:
            start = ckpt.restore(folder, model, optimizer, scheduler)
    accum = cfg["gradient_accumulation_steps"]
    # Skip what the checkpointed steps consumed, so a resumed run sees the data a clean run would have.
    pair_stream = itertools.islice(rt.pair_batches(objective.labelled), start * accum, None)
    sample_stream = itertools.islice(rt.sample_batches(), start * accum, None) if objective.needs_ref_samples else None
    log = _Logger(cfg, rt.rank)
    if start:
        log.event("log", message=f"resumed from checkpoint at step {start}", resumed_step=start)
    window = MetricsWindow()
    last: dict[str, Any] = {}
    for step in range(start + 1, total + 1):
        t0 = time.perf_counter()
        for micro in range(accum):
            pairs = collate_pairs(next(pair_stream))
            samples = collate_samples(next(sample_stream)) if sample_stream is not None else None
            sync = micro == accum - 1 or not hasattr(model, "no_sync")
            with contextlib.nullcontext() if sync else model.no_sync():
                pi_a, pi_b, pi_s, tokens = _forward(model, tokenizer, cfg, pairs, samples)
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
                )
                (loss / accum).backward()
            window.add(loss.detach(), stats, pairs["labelled"], tokens, len(pairs["prompts"]))
        max_norm = cfg["max_grad_norm"] or float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        window.add_step(float(grad_norm), scheduler.get_last_lr()[0], time.perf_counter() - t0)
        if step % cfg["log_every"] == 0 or step == total:
            last = window.flush()
            log.metrics(step, last)
        if step % cfg["checkpoint_every"] == 0 and step < total:
            state = ckpt.gather(model, optimizer, scheduler, step)
            rt.checkpoints.save(state if rt.rank == 0 else None, step, {"step": step, **last})
            _crash_hook(cfg, step, rt.rank)
    log.close()
    # FSDP shards the weights: every rank joins the gather, rank 0 writes the full model.
    full_state = ckpt.full_model_state(model) if cfg["strategy"] == "fsdp" and rt.world > 1 else None
    if cfg["output_dir"] and rt.rank == 0:
        info = {**cfg["info"], "steps": total, "final_metrics": last}
        save_policy(model, tokenizer, Path(cfg["output_dir"]), info, full_state)
    return last


def save_policy(
    model: torch.nn.Module, tokenizer: Any, out: Path, info: dict[str, Any], state_dict: dict[str, Any] | None = None
) -> None:
    """A plain Hugging Face folder (LoRA merged in), so transformers, vLLM and the service load it unchanged."""
    inner = model.module if isinstance(getattr(model, "module", None), torch.nn.Module) else model
    if hasattr(inner, "merge_and_unload"):
        inner = inner.merge_and_unload()
    out.mkdir(parents=True, exist_ok=True)
    inner.save_pretrained(out, state_dict=state_dict)
    tokenizer.save_pretrained(out)
    (out / POLICY_INFO).write_text(json.dumps(info, indent=2, default=str), encoding="utf-8")


class _Logger:
    """Rank 0 writes metrics to the job's event log and to TensorBoard; other ranks stay silent."""

    def __init__(self, cfg: dict[str, Any], rank: int):
        self.events = self.writer = None
        if rank != 0 or not cfg["job_dir"]:
            return
        from torch.utils.tensorboard import SummaryWriter

        from ray_jobs.events import EventLog

        self.events = EventLog(cfg["job_dir"])
        self.writer = SummaryWriter(log_dir=str(Path(cfg["job_dir"]) / "tensorboard"))

    def event(self, kind: str, **fields: Any) -> None:
        if self.events is not None:
            self.events.emit(kind, "distill", **fields)

    def metrics(self, step: int, values: dict[str, Any]) -> None:
        if self.events is None:
            return
        self.events.metrics("distill", step, values)
        for key, value in values.items():
            if isinstance(value, list):
                for k, v in enumerate(value):
                    self.writer.add_scalar(f"distill/{key}/{k}", v, step)
            elif value is not None:
                self.writer.add_scalar(f"distill/{key}", value, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def crash_after_step_from_env() -> int | None:
    value = os.environ.get("RMDISTILL_CRASH_AFTER_STEP")
    return int(value) if value else None
