"""Reward models: input layout for encoders and causal LMs, padding-independent scores, LoRA, the model oracle."""

from __future__ import annotations

import pytest
import torch

from ray_jobs.models.oracle import load_oracle
from ray_jobs.models.registry import load_reward_model
from ray_jobs.models.reward import reward_inputs, score_pairs
from ray_jobs.spec import LoraSpec

PROMPTS = ["Review a film.", "Write a short review of a book you read last week, please.", "Hi"]
RESPONSES = ["A warm and lovely film.", "Dull.", "Hello, how are you today? I am well, thank you for asking!"]


@pytest.fixture(scope="module")
def minilm():
    torch.manual_seed(0)
    return load_reward_model("builtin:minilm-l6")


@pytest.fixture(scope="module")
def llama_rm(tiny_llama):
    torch.manual_seed(0)
    return load_reward_model(tiny_llama)


def test_minilm_scores_pairs(minilm):
    model, tokenizer = minilm
    scores = score_pairs(model, tokenizer, PROMPTS, RESPONSES, batch_size=2)
    assert scores.shape == (3,) and scores.dtype == torch.float32 and torch.isfinite(scores).all()
    assert len(set(scores.tolist())) == 3
    # Scores do not depend on what else is in the batch (padding is masked out).
    singles = torch.cat([score_pairs(model, tokenizer, [p], [r]) for p, r in zip(PROMPTS, RESPONSES, strict=True)])
    torch.testing.assert_close(scores, singles, atol=1e-5, rtol=0)


def test_encoder_pairs_match_the_tokenizer_and_cut_the_prompt_first(minilm):
    _, tokenizer = minilm
    inputs = reward_inputs(tokenizer, PROMPTS[:1], RESPONSES[:1], max_length=64)
    assert inputs["input_ids"][0].tolist() == tokenizer(PROMPTS[0], RESPONSES[0]).input_ids
    assert inputs["token_type_ids"][0].tolist() == tokenizer(PROMPTS[0], RESPONSES[0]).token_type_ids

    cut = reward_inputs(tokenizer, ["one two three four five six seven"], ["good film"], max_length=8)
    assert tokenizer.decode(cut["input_ids"][0]) == "[CLS] five six seven [SEP] good film [SEP]"
    longest = reward_inputs(tokenizer, ["one two"], ["a b c d e f g h"], max_length=8)
    assert tokenizer.decode(longest["input_ids"][0]) == "[CLS] [SEP] a b c d e [SEP]"


def test_causal_reward_reads_the_eos_after_the_response(llama_rm):
    model, tokenizer = llama_rm
    inputs = reward_inputs(tokenizer, PROMPTS, RESPONSES, max_length=128)
    assert (inputs["input_ids"][:, -1] == tokenizer.eos_token_id).all()
    scores = score_pairs(model, tokenizer, PROMPTS, RESPONSES)
    # By hand: each row alone, no padding, the score head on the last hidden state.
    for i, (p, r) in enumerate(zip(PROMPTS, RESPONSES, strict=True)):
        ids = tokenizer(p).input_ids + tokenizer(r, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
        with torch.no_grad():
            hidden = model.model(input_ids=torch.tensor([ids])).last_hidden_state[0, -1]
            assert float(model.score(hidden)) == pytest.approx(float(scores[i]), abs=1e-5)


def test_pad_that_doubles_as_eos_moves_to_unk(tmp_path):
    from transformers import AutoTokenizer

    # A tiny Llama whose tokenizer pads with its EOS (as SmolLM2's does) and has an unknown token.
    from ray_jobs.models.tiny import build_tiny_llama

    build_tiny_llama(tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    tokenizer.pad_token, tokenizer.unk_token = tokenizer.eos_token, "<|bos|>"
    tokenizer.save_pretrained(tmp_path)
    model, tokenizer = load_reward_model(tmp_path)
    assert tokenizer.pad_token == "<|bos|>" and model.config.pad_token_id == tokenizer.pad_token_id
    inputs = reward_inputs(tokenizer, ["Hi", "A longer prompt here"], ["Yes", "No"], max_length=32)
    hidden = model.model(**inputs).last_hidden_state[:, -1]
    torch.testing.assert_close(model(**inputs).logits[:, 0], model.score(hidden)[:, 0])


def test_lora_reward_model_trains_only_adapters_and_head(tiny_bert):
    torch.manual_seed(0)
    model, tokenizer = load_reward_model(tiny_bert, lora=LoraSpec(r=4, alpha=8))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or "classifier" in n for n in trainable)
    assert any("classifier" in n for n in trainable)
    inputs = reward_inputs(tokenizer, PROMPTS, RESPONSES, max_length=64)
    before = score_pairs(model, tokenizer, PROMPTS, RESPONSES)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model.train()
    (-model(**inputs).logits[:, 0].sum()).backward()  # one ascent step on the rewards
    optimizer.step()
    assert (score_pairs(model, tokenizer, PROMPTS, RESPONSES) > before).all()


def test_reward_model_oracle_matches_score_pairs(tiny_bert):
    model, tokenizer = load_reward_model(tiny_bert)  # tiny:bert's saved head: no fresh initialisation
    oracle = load_oracle(tiny_bert)
    expected = score_pairs(model, tokenizer, PROMPTS, RESPONSES).tolist()
    assert oracle.score(PROMPTS, RESPONSES) == pytest.approx(expected, abs=1e-6)
