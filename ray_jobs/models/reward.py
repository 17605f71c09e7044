"""Reward-model inputs and scoring, shared by training (ensemble) and scoring so both see identical token streams.

Encoders (tokenizers with [CLS]/[SEP]) read ``(prompt, response)`` as a text pair; when the pair is too long the
prompt loses its start first, then the response its tail. Causal LMs read ``prompt + response + EOS``, left-padded
(the layout of ``tokenize_responses``), and their head reads the last token: the EOS that ends the response.

A reward model trained elsewhere may have read its inputs otherwise: TRL's RewardTrainer tokenizes the one text
``prompt + response + eos_token`` with the tokenizer's special tokens, whatever the model. A model folder says so
with ``rmdistill_reward_input: text`` in its tokenizer config (``ensemble.members[k].input`` writes it), and is then
read that way, truncated from the left, right-padded.
"""

from __future__ import annotations

import copy
import weakref
from typing import TYPE_CHECKING

import torch

from ray_jobs.models.logps import tokenize_responses

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


# The tokenizer-config key that records how a reward model reads its inputs (`pair` or `text`), when set.
INPUT_KEY = "rmdistill_reward_input"


def is_pair_encoder(tokenizer: PreTrainedTokenizerBase) -> bool:
    return tokenizer.sep_token is not None and tokenizer.cls_token is not None


def input_format(tokenizer: PreTrainedTokenizerBase) -> str:
    """`pair`, `text` or `causal`: how a reward model with this tokenizer reads (prompt, response)."""
    chosen = tokenizer.init_kwargs.get(INPUT_KEY, "auto")
    if chosen != "auto":
        return chosen
    return "pair" if is_pair_encoder(tokenizer) else "causal"


_plain_backends: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _plain_backend(tokenizer: PreTrainedTokenizerBase):
    """A copy of the tokenizer's Rust backend without the padding/truncation its tokenizer.json may switch on."""
    if tokenizer not in _plain_backends:
        backend = copy.deepcopy(tokenizer.backend_tokenizer)
        backend.no_padding()
        backend.no_truncation()
        _plain_backends[tokenizer] = backend
    return _plain_backends[tokenizer]


def _text_budget(tokenizer: PreTrainedTokenizerBase, max_length: int, pair: bool) -> int:
    """Tokens left for text in `max_length` once the model's special tokens are in."""
    budget = max_length - tokenizer.num_special_tokens_to_add(pair=pair)
    if budget < 1:
        raise ValueError(f"max_length {max_length} leaves no room for text after the special tokens")
    return budget


def _encoder_pairs(
    tokenizer: PreTrainedTokenizerBase, prompts: list[str], responses: list[str], max_length: int
) -> dict[str, torch.Tensor]:
    # The tokenizer's own pair truncation cannot cut the prompt from the left while keeping the response, so the
    # segments are truncated as token encodings and then given the model's special tokens by its post-processor.
    backend, budget = _plain_backend(tokenizer), _text_budget(tokenizer, max_length, pair=True)
    encoded = []
    for p, r in zip(
        backend.encode_batch(list(prompts), add_special_tokens=False),
        backend.encode_batch(list(responses), add_special_tokens=False),
        strict=True,
    ):
        r.truncate(budget, direction="right")
        p.truncate(budget - len(r.ids), direction="left")
        encoded.append(backend.post_process(p, r, add_special_tokens=True))
    features = {
        "input_ids": [e.ids for e in encoded],
        "token_type_ids": [e.type_ids for e in encoded],
        "attention_mask": [e.attention_mask for e in encoded],
    }
    return dict(tokenizer.pad(features, padding=True, return_tensors="pt"))


def _whole_texts(
    tokenizer: PreTrainedTokenizerBase, prompts: list[str], responses: list[str], max_length: int
) -> dict[str, torch.Tensor]:
    backend, budget = _plain_backend(tokenizer), _text_budget(tokenizer, max_length, pair=False)
    texts = [p + r + (tokenizer.eos_token or "") for p, r in zip(prompts, responses, strict=True)]
    encoded = []
    for e in backend.encode_batch(texts, add_special_tokens=False):
        e.truncate(budget, direction="left")
        encoded.append(backend.post_process(e, None, add_special_tokens=True).ids)
    width = max(map(len, encoded))
    input_ids = torch.full((len(encoded), width), tokenizer.pad_token_id or 0, dtype=torch.long)
    attention_mask = torch.zeros((len(encoded), width), dtype=torch.long)
    for i, ids in enumerate(encoded):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        attention_mask[i, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def reward_inputs(
    tokenizer: PreTrainedTokenizerBase, prompts: list[str], responses: list[str], max_length: int
) -> dict[str, torch.Tensor]:
    """Padded model inputs for a reward model: pass them as ``model(**inputs)``."""
    if len(prompts) != len(responses):
        raise ValueError(f"got {len(prompts)} prompts but {len(responses)} responses")
    form = input_format(tokenizer)
    if form == "pair":
        return _encoder_pairs(tokenizer, prompts, responses, max_length)
    if form == "text":
        return _whole_texts(tokenizer, prompts, responses, max_length)
    batch = tokenize_responses(tokenizer, prompts, responses, max_length)
    # Left padding: positions must count real tokens only, or RoPE sees each row shifted by its padding.
    position_ids = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "position_ids": position_ids}


@torch.no_grad()
def score_pairs(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    responses: list[str],
    batch_size: int = 16,
    max_length: int = 512,
) -> torch.Tensor:
    """Scalar reward of each (prompt, response), float32 on CPU, shape [B]."""
    if len(prompts) != len(responses):
        raise ValueError(f"got {len(prompts)} prompts but {len(responses)} responses")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    scores = []
    try:
        for start in range(0, len(prompts), batch_size):
            inputs = reward_inputs(
                tokenizer, prompts[start : start + batch_size], responses[start : start + batch_size], max_length
            )
            logits = model(**{k: v.to(device) for k, v in inputs.items()}).logits
            scores.append(logits[:, 0].float().cpu())
    finally:
        model.train(was_training)
    return torch.cat(scores) if scores else torch.zeros(0)
