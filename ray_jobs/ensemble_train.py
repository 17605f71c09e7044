"""The plain PyTorch loop that fits one Bradley–Terry reward model (one ensemble member).

It runs without Ray (``train_member(config)``) and, unchanged, inside a Ray Train worker, where ``distributed=True``
wraps the model in DDP through ``ray.train.torch.prepare_model`` and shards the rows by rank. The config is a plain
JSON-able dict (see ``ray_jobs.ensemble.member_configs``) so it travels through Tune's param space as is.

Loss (TRL RewardTrainer semantics): ``-log σ(r_w - r_l - margin)`` averaged over the batch, plus
``center_rewards_coefficient * mean((r_w + r_l)²)`` which pins the reward scale so members are comparable.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import socket
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

REQUIRED_COLUMNS = ("prompt", "response_a", "response_b", "label")
# Test hook, not a feature: RMDISTILL_FAIL_MEMBER_ONCE=<k> (read by the stage driver, see ray_jobs.ensemble) sets
# config["fail_once_marker"] for member k; its first attempt raises after one epoch and leaves this marker file, so
# the retry runs clean. It lets tests exercise Tune's retry path with real processes and no mocks.
FAIL_ONCE_MESSAGE = "injected failure of member {k} (RMDISTILL_FAIL_MEMBER_ONCE test hook)"


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
    if not path.is_file():
        raise PreferenceDataError(f"{path} does not exist: run the data stage first")
    frame = pd.read_parquet(path)
    missing = [c for c in REQUIRED_COLUMNS if c not in frame.columns]
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


class _Dist:
    """Rank, world size and collectives; a single process when torch.distributed is not initialised."""

    def __init__(self) -> None:
        self.on = torch.distributed.is_available() and torch.distributed.is_initialized()
        self.rank = torch.distributed.get_rank() if self.on else 0
        self.world = torch.distributed.get_world_size() if self.on else 1

    def gather(self, obj: Any) -> list[Any]:
        if not self.on:
            return [obj]
        out: list[Any] = [None] * self.world
        torch.distributed.all_gather_object(out, obj)
        return out

    def mean(self, value: float) -> float:
        return float(np.mean(self.gather(value)))


def _rewards(model: torch.nn.Module, tokenizer: Any, prompts: list[str], responses: list[str], max_length: int):
    from ray_jobs.models.reward import reward_inputs

    batch = reward_inputs(tokenizer, prompts, responses, max_length)
    device = next(model.parameters()).device
    inputs = {k: v.to(device) for k, v in batch.items()}
    return model(**inputs).logits[:, 0].float()


def _pair_rewards(model, tokenizer, data: dict[str, list], idx: list[int], max_length: int):
    # One forward over chosen and rejected together: half the calls, and both sides see the same padding.
    prompts = [data["prompt"][i] for i in idx]
    responses = [data["chosen"][i] for i in idx] + [data["rejected"][i] for i in idx]
    r = _rewards(model, tokenizer, prompts + prompts, responses, max_length)
    return r[: len(idx)], r[len(idx) :]


@torch.no_grad()
def evaluate(model, tokenizer, data: dict[str, list], config: dict[str, Any], dist: _Dist) -> dict[str, Any]:
    """Held-out loss and accuracy over the whole split; each rank scores a shard, every rank gets the full result."""
    model.eval()
    n = len(data["prompt"])
    mine = list(range(dist.rank, n, dist.world))
    parts = []
    for start in range(0, len(mine), config["batch_size"]):
        idx = mine[start : start + config["batch_size"]]
        r_w, r_l = _pair_rewards(model, tokenizer, data, idx, config["max_length"])
        parts.append((idx, r_w.tolist(), r_l.tolist()))
    r_w, r_l = np.zeros(n), np.zeros(n)
    for shard in dist.gather(parts):
        for idx, w, lo in shard:
            r_w[idx], r_l[idx] = w, lo
    tw, tl = torch.from_numpy(r_w), torch.from_numpy(r_l)
    loss = bt_loss(tw, tl, config["margin"], config["center_rewards_coefficient"]).item()
    model.train()
    # Margins are r(preferred) - r(rejected): > 0 is a correct ranking.
    return {"loss": loss, "accuracy": float(np.mean(r_w > r_l)), "margins": (r_w - r_l).tolist()}


def _load_model(config: dict[str, Any]):
    from ray_jobs.models.registry import load_reward_model
    from ray_jobs.spec import LoraSpec

    # The fresh scalar head draws from torch's global RNG: the member seed makes members start apart.
    torch.manual_seed(config["seed"])
    lora = LoraSpec(**config["lora"]) if config.get("lora") else None
    return load_reward_model(config["backbone"], lora=lora)


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def save_member(model: torch.nn.Module, tokenizer: Any, out_dir: Path) -> None:
    """A plain HF folder: LoRA is merged so scoring and vLLM need no PEFT."""
    model = _unwrap(model)
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def _node() -> dict[str, str | None]:
    try:
        import ray

        if ray.is_initialized():
            ctx = ray.get_runtime_context()
            return {
                "node_id": ctx.get_node_id(),
                "node_ip": ray.util.get_node_ip_address(),
                "host": socket.gethostname(),
            }
    except ImportError:
        pass
    return {"node_id": None, "node_ip": None, "host": socket.gethostname()}


def train_member(config: dict[str, Any], distributed: bool = False, report=None) -> dict[str, Any]:
    """Fit member ``config["k"]`` and write its HF folder + metrics.json to ``config["out_dir"]`` (rank 0).

    ``report(metrics)`` is called every epoch on every rank (Ray Train's report must be called by all workers).
    Early stopping keeps the weights of the best held-out-loss epoch. Returns the metrics dict.
    """
    from ray_jobs.events import EventLog

    launched = config.get("launched_at") or time.time()
    train_start = time.time()
    k = config["k"]
    events = EventLog(config["job_dir"]) if config.get("job_dir") else None
    train, test = load_pairs(config["train_path"]), load_pairs(config["test_path"])
    rows = member_rows(
        len(train["prompt"]), config["diversity"], k, config["size"], config["seed"], config["data_seed"]
    )
    model, tokenizer = _load_model(config)
    if distributed:
        import ray.train.torch

        model = ray.train.torch.prepare_model(model)
    dist = _Dist()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=config["lr"])
    accum = config["gradient_accumulation_steps"]
    best: dict[str, Any] | None = None
    best_state = None
    history = []
    stale = 0
    model.train()
    for epoch in range(1, config["epochs"] + 1):
        order = np.random.default_rng([config["seed"], epoch]).permutation(rows)[dist.rank :: dist.world]
        batches = [order[i : i + config["batch_size"]].tolist() for i in range(0, len(order), config["batch_size"])]
        train_losses = []
        for step, idx in enumerate(batches):
            sync = (step + 1) % accum == 0 or step + 1 == len(batches)
            # DDP all-reduces on every backward unless told not to: only the last micro-batch of a step syncs.
            ctx = model.no_sync() if dist.on and not sync else contextlib.nullcontext()
            with ctx:
                r_w, r_l = _pair_rewards(model, tokenizer, train, idx, config["max_length"])
                loss = bt_loss(r_w, r_l, config["margin"], config["center_rewards_coefficient"])
                (loss / accum).backward()
            train_losses.append(loss.item())
            if sync:
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        held_out = evaluate(model, tokenizer, test, config, dist)
        train_loss = dist.mean(float(np.mean(train_losses)) if train_losses else math.nan)
        epoch_metrics = {"epoch": epoch, "train_loss": train_loss, "loss": held_out["loss"]}
        epoch_metrics["accuracy"] = held_out["accuracy"]
        history.append(epoch_metrics)
        if dist.rank == 0 and events:
            events.metrics("ensemble", step=epoch, values=epoch_metrics, member=k, event="epoch_done")
        if best is None or held_out["loss"] < best["loss"]:
            best, stale = {**epoch_metrics, "margins": held_out["margins"]}, 0
            if config.get("early_stopping_patience"):
                best_state = copy.deepcopy(_unwrap(model).state_dict())
        else:
            stale += 1
        if report:
            report({"member": k, **epoch_metrics})
        if config.get("fail_once_marker") and not Path(config["fail_once_marker"]).exists():
            Path(config["fail_once_marker"]).write_text(str(time.time()))
            raise RuntimeError(FAIL_ONCE_MESSAGE.format(k=k))
        if config.get("early_stopping_patience") and stale >= config["early_stopping_patience"]:
            break
    if best_state is not None:
        _unwrap(model).load_state_dict(best_state)
    metrics = {
        "member": k,
        "accuracy": best["accuracy"],
        "loss": best["loss"],
        "best_epoch": best["epoch"],
        "epochs_run": len(history),
        "history": history,
        "heldout_margins": best["margins"],
        "backbone": config["backbone"],
        "lr": config["lr"],
        "seed": config["seed"],
        "lora_r": (config.get("lora") or {}).get("r"),
        "diversity": config["diversity"],
        "train_pairs": len(rows),
        "unique_train_pairs": len(np.unique(rows)),
        "test_pairs": len(test["prompt"]),
        "world_size": dist.world,
        "attempt": config.get("attempt", 1),
        "start_time": launched,
        "train_start_time": train_start,
        **_node(),
    }
    if dist.rank == 0:
        save_member(model, tokenizer, Path(config["out_dir"]))
    metrics["end_time"] = time.time()
    if dist.rank == 0:
        (Path(config["out_dir"]) / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics
