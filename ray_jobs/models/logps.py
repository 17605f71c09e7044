"""Sequence log-probabilities log π(y|x) of responses given prompts, the quantity every DPO-style loss is built on.

Responses that share a prompt are packed into one row after a single copy of it: a pair's two responses (and any
other response to the same prompt in the batch) each attend to the prompt and to themselves only, through a 4D
attention mask, with positions restarting after the prompt. That is the same computation as one row per response,
minus the prompt's repeated tokens: with chat-template prompts longer than the responses, a third or more of a
pair's tokens. Rows are left-padded so every row ends at the last column: the logits needed are then the last
few columns, and the model computes the LM head (the big vocabulary projection) only there.

Token ids are computed once (`encode`) and truncated here (`fit`), so a caller that stores ids, as the score stage
does for distillation, tokenizes nothing per step.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


def encode(
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    responses: Sequence[str],
    ended: Sequence[bool] | None = None,
) -> tuple[list[list[int]], list[list[int]]]:
    """Token ids of the prompts (with the tokenizer's special tokens) and responses (EOS appended), untruncated.

    Prompt and response are tokenized separately, as generation sees them. ``ended[i]`` False marks a response cut
    at a generation token cap: it gets no EOS, since the model did not choose to stop there, and scoring the stop
    would reward or punish a length nobody chose (default: all ended).
    """
    if len(prompts) != len(responses):
        raise ValueError(f"got {len(prompts)} prompts but {len(responses)} responses")
    if ended is not None and len(ended) != len(responses):
        raise ValueError(f"got {len(ended)} ended flags for {len(responses)} responses")
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no EOS token to end responses with")
    prompt_ids = tokenizer(list(prompts), add_special_tokens=True)["input_ids"] if prompts else []
    response_ids = tokenizer(list(responses), add_special_tokens=False)["input_ids"] if responses else []
    eos = [tokenizer.eos_token_id]
    return prompt_ids, [r + eos if ended is None or ended[i] else r for i, r in enumerate(response_ids)]


def fit(prompt: Sequence[int], response: Sequence[int], max_length: int) -> tuple[list[int], list[int], bool]:
    """Truncate one sequence to `max_length` tokens; returns (prompt, response, whether anything was cut).

    Over-long sequences keep the whole response and lose the prompt's start; a response longer than the budget by
    itself keeps its head and one prompt token (the first response token needs a predecessor).
    """
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2, got {max_length}")
    response = list(response[: max_length - 1])
    keep = max_length - len(response)
    cut = len(prompt) + len(response) > max_length
    return list(prompt[-keep:] if cut else prompt), response, cut


def tokenize_responses(
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    responses: list[str],
    max_length: int,
    ended: Sequence[bool] | None = None,
) -> dict[str, Any]:
    """One left-padded row per (prompt, response): the layout reward models read (their head sees the last token).

    Returns ``input_ids``, ``attention_mask``, ``response_mask`` (1 on response tokens including EOS) and
    ``num_truncated``; truncation as in `fit`.
    """
    prompt_ids, response_ids = encode(tokenizer, prompts, responses, ended)
    rows = [fit(p, r, max_length) for p, r in zip(prompt_ids, response_ids, strict=True)]
    width = max(len(p) + len(r) for p, r, _ in rows)
    input_ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    response_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (p, r, _) in enumerate(rows):
        n = len(p) + len(r)
        input_ids[i, width - n :] = torch.tensor(p + r, dtype=torch.long)
        attention_mask[i, width - n :] = 1
        # With no prompt token at all, nothing predicts the first response token: it cannot be scored.
        response_mask[i, width - len(r) + (0 if p else 1) :] = 1
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "response_mask": response_mask,
        "num_truncated": sum(cut for *_, cut in rows),
    }


@dataclass(frozen=True)
class Packed:
    """A batch of sequences packed by shared prompt, ready for `packed_logps`.

    ``row``/``col``/``target`` name each scored token: the row, the window column whose logits predict it (the
    window is the last ``keep`` columns) and its id; ``unique[k]`` is the distinct sequence it belongs to, and
    sequence ``i`` of the input is distinct sequence ``inverse[i]`` (a response repeated in a batch, as pairs of
    one prompt's candidates repeat them, is computed once).
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    attention_mask: torch.Tensor
    keep: int
    row: torch.Tensor
    col: torch.Tensor
    target: torch.Tensor
    unique: torch.Tensor
    inverse: torch.Tensor
    num_unique: int
    num_truncated: int
    tokens: int  # real (non-padding) tokens the model computes on


def pack(
    prompt_ids: Sequence[Sequence[int]], response_ids: Sequence[Sequence[int]], max_length: int, pad_token_id: int
) -> Packed:
    """Pack sequences (prompt i + response i, each truncated by `fit`) into rows of one shared prompt each.

    Sequences share a row only when their truncated prompts are identical, so every response sees exactly the
    context it would see alone, and its log-prob is the same number up to float rounding.
    """
    if len(prompt_ids) != len(response_ids):
        raise ValueError(f"got {len(prompt_ids)} prompts but {len(response_ids)} responses")
    groups: dict[tuple[int, ...], dict[tuple[int, ...], int]] = {}  # prompt → response → distinct index
    inverse, num_truncated, num_unique = [], 0, 0
    for p, r in zip(prompt_ids, response_ids, strict=True):
        p, r, cut = fit(p, r, max_length)
        num_truncated += cut
        responses = groups.setdefault(tuple(p), {})
        if tuple(r) not in responses:
            responses[tuple(r)] = num_unique
            num_unique += 1
        inverse.append(responses[tuple(r)])
    rows = [(list(p), list(responses.items())) for p, responses in groups.items()]
    width = max(len(p) + sum(len(r) for r, _ in rs) for p, rs in rows)
    n = len(rows)
    input_ids = torch.full((n, width), pad_token_id, dtype=torch.long)
    position_ids = torch.zeros((n, width), dtype=torch.long)
    segment = torch.full((n, width), -1, dtype=torch.long)  # -1 padding, 0 prompt, j ≥ 1 the j-th response
    index: list[tuple[int, int, int, int]] = []  # (row, predecessor column, target id, distinct sequence)
    for i, (p, responses) in enumerate(rows):
        start = width - len(p) - sum(len(r) for r, _ in responses)
        input_ids[i, start : start + len(p)] = torch.tensor(p, dtype=torch.long)
        position_ids[i, start : start + len(p)] = torch.arange(len(p))
        segment[i, start : start + len(p)] = 0
        col = last = start + len(p)
        last -= 1  # the prompt's last column, which predicts every response's first token
        for j, (r, k) in enumerate(responses, start=1):
            input_ids[i, col : col + len(r)] = torch.tensor(r, dtype=torch.long)
            position_ids[i, col : col + len(r)] = torch.arange(len(p), len(p) + len(r))
            segment[i, col : col + len(r)] = j
            # Token t is predicted by the one before it, a response's first token by the prompt's last; with no
            # prompt token at all (an empty prompt and no BOS) the first token has no predecessor and is not scored.
            index += [(i, col + t - 1 if t else last, r[t], k) for t in range(len(r)) if t or p]
            col += len(r)
    same = segment[:, :, None] == segment[:, None, :]
    to_prompt = (segment[:, None, :] == 0) & (segment[:, :, None] >= 0)
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    # Padding attends to itself only, so no softmax row is empty (an all-masked row is NaN, and NaN times the zero
    # gradient it receives is still NaN).
    mask = ((same & (segment[:, :, None] >= 0)) | to_prompt) & causal | torch.eye(width, dtype=torch.bool)
    rows_t, cols, targets, seqs = torch.tensor(index, dtype=torch.long).reshape(-1, 4).unbind(1)
    first = int(cols.min()) if index else width - 1
    return Packed(
        input_ids=input_ids,
        position_ids=position_ids,
        attention_mask=mask[:, None],
        keep=width - first,
        row=rows_t,
        col=cols - first,
        target=targets,
        unique=seqs,
        inverse=torch.tensor(inverse, dtype=torch.long),
        num_unique=num_unique,
        num_truncated=num_truncated,
        tokens=int((segment >= 0).sum()),
    )


def packed_logps(model: PreTrainedModel, packed: Packed) -> torch.Tensor:
    """Sum of response-token log-probs of every input sequence, float32, shape [N]; differentiable."""
    device = next(model.parameters()).device
    logits = model(
        input_ids=packed.input_ids.to(device),
        attention_mask=packed.attention_mask.to(device),
        position_ids=packed.position_ids.to(device),
        logits_to_keep=packed.keep,
        use_cache=False,
    ).logits.float()
    row, col = packed.row.to(device), packed.col.to(device)
    # Picking the target logit and subtracting logsumexp avoids materialising a second [B, T, V] log-softmax.
    token_logps = logits[row, col, packed.target.to(device)] - torch.logsumexp(logits, dim=-1)[row, col]
    distinct = torch.zeros(packed.num_unique, dtype=token_logps.dtype, device=device)
    distinct = distinct.index_add(0, packed.unique.to(device), token_logps)
    return distinct[packed.inverse.to(device)]


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
    """log π(response | prompt) of each row under a frozen model, float64 on the CPU, shape [N].

    Rows are batched by prompt (then length), so a prompt's responses share one packed row and padding is small.
    """
    prompt_ids, response_ids = encode(tokenizer, prompts, responses, ended)
    order = sorted(range(len(prompts)), key=lambda i: (len(prompt_ids[i]), prompt_ids[i], len(response_ids[i])))
    out = torch.zeros(len(prompts), dtype=torch.float64)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        chunk_prompts, chunk_responses = [prompt_ids[i] for i in chunk], [response_ids[i] for i in chunk]
        packed = pack(chunk_prompts, chunk_responses, max_length, tokenizer.pad_token_id)
        out[chunk] = packed_logps(model, packed).double().cpu()
    return out
