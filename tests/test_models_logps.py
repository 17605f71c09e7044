"""sequence_logps against a token-by-token reference on the tiny Llama, with padding and truncation."""

from __future__ import annotations

import pytest
import torch

from ray_jobs.models.logps import sequence_logps, tokenize_responses
from ray_jobs.models.registry import load_causal_lm

PROMPTS = [
    "Write a short review of a film you enjoyed.",
    "Hi",
    "What is the capital of France? Answer in one sentence, please, and be polite about it.",
]
RESPONSES = ["The film was lovely and warm.", "Hello, how are you today? I am well, thank you!", "Paris."]


@pytest.fixture(scope="module")
def llama(tiny_llama):
    model, tokenizer = load_causal_lm(tiny_llama)
    return model.eval(), tokenizer


def reference_logp(model, tokenizer, prompt_ids: list[int], response_ids: list[int]) -> float:
    """Full logits of one unpadded sequence; add log p(token | prefix) over the response tokens one at a time."""
    ids = torch.tensor([prompt_ids + response_ids])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)
    return sum(float(logprobs[t - 1, ids[0, t]]) for t in range(len(prompt_ids), ids.shape[1]))


def split_ids(tokenizer, prompt: str, response: str) -> tuple[list[int], list[int]]:
    return tokenizer(prompt).input_ids, tokenizer(response, add_special_tokens=False).input_ids + [
        tokenizer.eos_token_id
    ]


def test_matches_token_by_token_reference_with_padding(llama):
    model, tokenizer = llama
    batch = tokenize_responses(tokenizer, PROMPTS, RESPONSES, max_length=256)
    assert batch["num_truncated"] == 0
    lengths = batch["attention_mask"].sum(-1)
    assert len(set(lengths.tolist())) == 3, "rows of different lengths exercise the padding"
    with torch.no_grad():
        got = sequence_logps(model, batch)
    expected = [
        reference_logp(model, tokenizer, *split_ids(tokenizer, p, r)) for p, r in zip(PROMPTS, RESPONSES, strict=True)
    ]
    assert got.dtype == torch.float32 and got.shape == (3,)
    torch.testing.assert_close(got.double(), torch.tensor(expected, dtype=torch.float64), atol=1e-5, rtol=0)
    # Each row alone (no padding at all) gives the same numbers as inside the padded batch.
    for i in range(3):
        alone = tokenize_responses(tokenizer, PROMPTS[i : i + 1], RESPONSES[i : i + 1], max_length=256)
        assert int(alone["attention_mask"].min()) == 1
        with torch.no_grad():
            assert abs(float(sequence_logps(model, alone)[0]) - expected[i]) < 1e-5


def test_response_mask_covers_response_and_eos(llama):
    _, tokenizer = llama
    batch = tokenize_responses(tokenizer, PROMPTS, RESPONSES, max_length=256)
    for i, (p, r) in enumerate(zip(PROMPTS, RESPONSES, strict=True)):
        prompt_ids, response_ids = split_ids(tokenizer, p, r)
        row = batch["input_ids"][i][batch["attention_mask"][i].bool()].tolist()
        assert row == prompt_ids + response_ids
        assert batch["input_ids"][i, -1] == tokenizer.eos_token_id
        assert int(batch["response_mask"][i].sum()) == len(response_ids)
        assert batch["response_mask"][i, -len(response_ids) :].all()


def test_truncation_cuts_prompt_from_the_left_and_keeps_response(llama):
    model, tokenizer = llama
    prompt_ids, response_ids = split_ids(tokenizer, PROMPTS[2], RESPONSES[2])
    max_length = len(response_ids) + 5
    batch = tokenize_responses(tokenizer, [PROMPTS[2], "Hi"], [RESPONSES[2], "ok"], max_length=max_length)
    assert batch["num_truncated"] == 1
    assert batch["input_ids"].shape[1] == max_length
    assert batch["input_ids"][0].tolist() == prompt_ids[-5:] + response_ids
    with torch.no_grad():
        got = float(sequence_logps(model, batch)[0])
    assert abs(got - reference_logp(model, tokenizer, prompt_ids[-5:], response_ids)) < 1e-5

    # A response longer than the whole budget keeps its head and one prompt token.
    long_batch = tokenize_responses(tokenizer, [PROMPTS[0]], [RESPONSES[1] * 4], max_length=8)
    assert long_batch["num_truncated"] == 1
    assert long_batch["input_ids"].shape[1] == 8 and int(long_batch["response_mask"].sum()) == 7
    long_response = tokenizer(RESPONSES[1] * 4, add_special_tokens=False).input_ids
    assert long_batch["input_ids"][0, 1:].tolist() == long_response[:7]


def test_gradients_flow_and_are_finite_with_padding(llama):
    model, tokenizer = llama
    batch = tokenize_responses(tokenizer, PROMPTS, RESPONSES, max_length=256)
    model.zero_grad()
    sequence_logps(model, batch).sum().backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert any(float(g.abs().sum()) > 0 for g in grads)
    model.zero_grad()


def test_mismatched_lengths_are_rejected(llama):
    _, tokenizer = llama
    with pytest.raises(ValueError, match="2 prompts but 1 responses"):
        tokenize_responses(tokenizer, ["a", "b"], ["c"], max_length=32)


def test_a_response_cut_at_the_cap_gets_no_eos(tiny_llama):
    """EOS is appended only to responses that ended: scoring a stop the model did not make would score a length."""
    _, tokenizer = load_causal_lm(tiny_llama)
    prompts, responses = ["The film was", "The film was"], ["good and long", "good and long"]
    batch = tokenize_responses(tokenizer, prompts, responses, 64, ended=[True, False])
    n_response = len(tokenizer(responses[0], add_special_tokens=False)["input_ids"])
    assert batch["response_mask"].sum(dim=1).tolist() == [n_response + 1, n_response]
    assert batch["input_ids"][0, -1] == tokenizer.eos_token_id != batch["input_ids"][1, -1]
    with pytest.raises(ValueError, match="ended flags"):
        tokenize_responses(tokenizer, prompts, responses, 64, ended=[True])
