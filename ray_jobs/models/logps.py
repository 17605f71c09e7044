"""Sequence log-probabilities log π(y|x) of responses given prompts, the quantity every DPO-style loss is built on.

Batches are left-padded so every row's response ends at the last column: the logits needed for all rows are then
the last ``max_response_len + 1`` positions, and the model computes the LM head (the big vocab projection) only there.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


def tokenize_responses(
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    responses: list[str],
    max_length: int,
    ended: Sequence[bool] | None = None,
) -> dict[str, Any]:
    """Tokenize prompt and response separately (as generation sees them), append EOS to the response, left-pad.

    ``ended[i]`` False marks a response cut at a generation token cap: it gets no EOS, since the model did not
    choose to stop there, and scoring the stop would reward or punish a length nobody chose (default: all ended).

    Over-long rows keep the whole response and lose the prompt's start; a response longer than the budget by itself
    keeps its head and one prompt token (the first response token needs a predecessor). Returns ``input_ids``,
    ``attention_mask``, ``response_mask`` (1 on response tokens including EOS) and ``num_truncated``.
    """
    if len(prompts) != len(responses):
        raise ValueError(f"got {len(prompts)} prompts but {len(responses)} responses")
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2, got {max_length}")
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no EOS token to end responses with")
    prompt_ids = tokenizer(list(prompts), add_special_tokens=True)["input_ids"]
    response_ids = tokenizer(list(responses), add_special_tokens=False)["input_ids"]
    if ended is not None and len(ended) != len(responses):
        raise ValueError(f"got {len(ended)} ended flags for {len(responses)} responses")
    rows: list[tuple[list[int], list[int]]] = []
    num_truncated = 0
    for i, (p, r) in enumerate(zip(prompt_ids, response_ids, strict=True)):
        if ended is None or ended[i]:
            r = [*r, tokenizer.eos_token_id]
        if len(r) > max_length - 1:
            r = r[: max_length - 1]
        keep = max_length - len(r)
        if len(p) + len(r) > max_length:
            num_truncated += 1
            p = p[-keep:]
        rows.append((p, r))
    width = max(len(p) + len(r) for p, r in rows)
    input_ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    response_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (p, r) in enumerate(rows):
        n = len(p) + len(r)
        input_ids[i, width - n :] = torch.tensor(p + r, dtype=torch.long)
        attention_mask[i, width - n :] = 1
        # With no prompt token at all, nothing predicts the first response token: it cannot be scored.
        response_mask[i, width - len(r) + (0 if p else 1) :] = 1
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "response_mask": response_mask,
        "num_truncated": num_truncated,
    }


def sequence_logps(model: PreTrainedModel, batch: dict[str, Any]) -> torch.Tensor:
    """Sum of response-token log-probs per row, float32, shape [B]; differentiable.

    ``batch`` is what ``tokenize_responses`` returns (left-padded). A response token at column 0 has no predecessor
    is not counted.
    """
    device = next(model.parameters()).device
    input_ids = batch["input_ids"].to(device)
    attention_mask = batch["attention_mask"].to(device)
    response_mask = batch["response_mask"].to(device)
    width = input_ids.shape[1]
    # From the first column holding any row's response token (column 0 has no predecessor) to the end.
    start = max(int(response_mask.any(dim=0).int().argmax()), 1) if response_mask.any() else width
    # Left padding shifts every row: positions must count real tokens only, or RoPE sees the wrong offsets.
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    logits = (
        model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            logits_to_keep=width - start + 1,
            use_cache=False,
        )
        .logits[:, :-1]
        .float()
    )
    targets, mask = input_ids[:, start:], response_mask[:, start:]
    # Picking the target logit and subtracting logsumexp avoids materialising a second [B, T, V] log-softmax.
    token_logps = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    return (token_logps * mask).sum(-1)


@torch.no_grad()
def response_logps(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    responses: list[str],
    max_length: int,
    batch_size: int = 16,
    ended: Sequence[bool] | None = None,
) -> torch.Tensor:
    """log π(response | prompt) of each row under a frozen model, float64 on the CPU, shape [N]."""
    out = [torch.zeros(0, dtype=torch.float64)]
    for i in range(0, len(prompts), batch_size):
        flags = None if ended is None else ended[i : i + batch_size]
        batch = tokenize_responses(
            tokenizer, prompts[i : i + batch_size], responses[i : i + batch_size], max_length, flags
        )
        out.append(sequence_logps(model, batch).double().cpu())
    return torch.cat(out)
