"""Writing a trained model as a plain Hugging Face folder, the one format every reader here loads.

Reward-model members and policies are both saved this way: unwrapped from DDP/FSDP, LoRA merged in (so scoring,
vLLM and the service need no PEFT), weights and tokenizer side by side. A LoRA policy may also be saved as its
PEFT adapter alone (`save_adapter_folder`), which the model registry merges into its base when it is loaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ray_jobs.train_runtime import unwrap


def save_model_folder(
    model: torch.nn.Module, tokenizer: Any, out: Path, state_dict: dict[str, Any] | None = None
) -> None:
    """`state_dict`: full weights gathered beforehand where the model is sharded (FSDP)."""
    inner = unwrap(model)
    if hasattr(inner, "merge_and_unload"):
        inner = inner.merge_and_unload()
    out.mkdir(parents=True, exist_ok=True)
    inner.save_pretrained(out, state_dict=state_dict)
    tokenizer.save_pretrained(out)


def save_adapter_folder(model: torch.nn.Module, tokenizer: Any, out: Path) -> None:
    """The PEFT adapter of a LoRA model (adapter_config.json + weights) and the tokenizer; call before any merge."""
    inner = unwrap(model)
    if not hasattr(inner, "peft_config"):
        raise ValueError("only a LoRA (PEFT) model has an adapter to save")
    out.mkdir(parents=True, exist_ok=True)
    inner.save_pretrained(out)
    tokenizer.save_pretrained(out)
