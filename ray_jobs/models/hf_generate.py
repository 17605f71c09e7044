"""Batched sampling with transformers' ``generate``: the engine used where vLLM is absent or does not load."""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import torch

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


class Samples(NamedTuple):
    texts: list[list[str]]  # n per prompt
    ended: list[list[bool]]  # False where the token cap cut the response


@torch.no_grad()
def hf_generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    n: int,
    max_new_tokens: int,
    temperature: float,
    top_p: float = 1.0,
    seed: int = 0,
    batch_size: int = 16,
) -> Samples:
    """``n`` completions of each already-rendered prompt (new text only, special tokens stripped), and whether each
    ended on EOS (False: cut at ``max_new_tokens``).

    Greedy when ``temperature == 0`` (then the n completions are identical). Sampling is seeded once per call, so
    the same arguments give the same texts.
    """
    if n < 1 or max_new_tokens < 1 or batch_size < 1:
        raise ValueError(f"n, max_new_tokens and batch_size must be >= 1, got {n}, {max_new_tokens}, {batch_size}")
    if temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1, got {temperature}, {top_p}")
    device = next(model.parameters()).device
    sampling = temperature > 0
    # top_k=0 turns off transformers' default top-50 cut, so sampling means what vLLM's does: temperature + top_p.
    options = {"temperature": temperature, "top_p": top_p, "top_k": 0} if sampling else {}
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    # Sampling: each prompt repeated n times in a row, in order. Greedy: the n completions are equal, decode once.
    repeats = n if sampling else 1
    flat = [p for p in prompts for _ in range(repeats)]
    texts: list[str] = []
    ended: list[bool] = []
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # generation appends on the right: every row's prompt must end at the last column
    was_training = model.training
    model.eval()
    # A forked RNG: the same call gives the same texts, and the caller's random stream is left untouched.
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        try:
            for start in range(0, len(flat), batch_size):
                enc = tokenizer(flat[start : start + batch_size], return_tensors="pt", padding=True).to(device)
                out = model.generate(
                    **enc,
                    max_new_tokens=max_new_tokens,
                    eos_token_id=tokenizer.eos_token_id,
                    pad_token_id=pad_id,
                    do_sample=sampling,
                    **options,
                )
                new = out[:, enc["input_ids"].shape[1] :]
                texts.extend(tokenizer.batch_decode(new, skip_special_tokens=True))
                # A row that stopped early is padded after its EOS; one cut at the cap holds no EOS at all.
                ended.extend((new == tokenizer.eos_token_id).any(dim=1).tolist())
        finally:
            tokenizer.padding_side = side
            model.train(was_training)
    if not sampling:
        return Samples([[text] * n for text in texts], [[flag] * n for flag in ended])
    return Samples(
        [texts[i * n : (i + 1) * n] for i in range(len(prompts))],
        [ended[i * n : (i + 1) * n] for i in range(len(prompts))],
    )
