"""Sequence log-probs against a token-by-token reference on the tiny Llama: padding, truncation, shared prompts."""

from __future__ import annotations

import pytest
import torch

from ray_jobs.models.logps import encode, pack, packed_logps, response_logps, tokenize_responses
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


def alone_logps(model, tokenizer, prompts: list[str], responses: list[str]) -> list[float]:
    return [
        reference_logp(model, tokenizer, *split_ids(tokenizer, p, r)) for p, r in zip(prompts, responses, strict=True)
    ]


def _packed(tokenizer, prompts, responses, max_length=256, ended=None):
    return pack(*encode(tokenizer, prompts, responses, ended), max_length, tokenizer.pad_token_id)


def test_matches_token_by_token_reference_with_padding(llama):
    model, tokenizer = llama
    packed = _packed(tokenizer, PROMPTS, RESPONSES)
    assert packed.num_truncated == 0 and packed.input_ids.shape[0] == 3
    assert len({int((row != tokenizer.pad_token_id).sum()) for row in packed.input_ids}) == 3, "padding exercised"
    with torch.no_grad():
        got = packed_logps(model, packed)
    expected = alone_logps(model, tokenizer, PROMPTS, RESPONSES)
    assert got.dtype == torch.float32 and got.shape == (3,)
    torch.testing.assert_close(got.double(), torch.tensor(expected, dtype=torch.float64), atol=1e-5, rtol=0)
    # Each row alone (no padding at all) gives the same numbers as inside the padded batch.
    for i in range(3):
        alone = _packed(tokenizer, PROMPTS[i : i + 1], RESPONSES[i : i + 1])
        assert alone.tokens == alone.input_ids.numel()
        with torch.no_grad():
            assert abs(float(packed_logps(model, alone)[0]) - expected[i]) < 1e-5


def test_responses_to_one_prompt_share_a_row_and_score_as_if_alone(llama):
    """A pair's two responses (and a third to the same prompt) are packed after one copy of the prompt, each
    attending to the prompt and itself only: the log-probs and their gradients are those of separate rows."""
    model, tokenizer = llama
    prompts = [PROMPTS[0], PROMPTS[0], PROMPTS[2], PROMPTS[0], PROMPTS[0]]
    responses = [RESPONSES[0], RESPONSES[1], RESPONSES[2], "Dull.", RESPONSES[1]]
    packed = _packed(tokenizer, prompts, responses)
    prompt_ids = [split_ids(tokenizer, p, r)[0] for p, r in zip(prompts, responses, strict=True)]
    assert packed.input_ids.shape[0] == 2, "one row per distinct prompt"
    assert packed.num_unique == 4, "the repeated (prompt, response) is computed once"
    response_tokens = sum(len(split_ids(tokenizer, p, r)[1]) for p, r in zip(prompts[:4], responses[:4], strict=True))
    assert packed.tokens == len(prompt_ids[0]) + len(prompt_ids[2]) + response_tokens
    expected = alone_logps(model, tokenizer, prompts, responses)
    model.zero_grad()
    got = packed_logps(model, packed)
    torch.testing.assert_close(got.double(), torch.tensor(expected, dtype=torch.float64), atol=1e-5, rtol=0)
    weights = torch.tensor([1.0, -2.0, 0.5, 3.0, 1.0])
    (got * weights).sum().backward()
    shared = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    for i in range(5):  # one unpacked row per sequence
        (packed_logps(model, _packed(tokenizer, prompts[i : i + 1], responses[i : i + 1]))[0] * weights[i]).backward()
    for a, b in zip(shared, (p.grad for p in model.parameters()), strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    model.zero_grad()


def test_response_logps_batches_by_prompt_and_keeps_input_order(llama):
    model, tokenizer = llama
    prompts = [PROMPTS[2], PROMPTS[0], PROMPTS[2], PROMPTS[1]]
    responses = [RESPONSES[0], RESPONSES[1], RESPONSES[2], RESPONSES[0]]
    got = response_logps(model, tokenizer, prompts, responses, 256, batch_size=2)
    expected = alone_logps(model, tokenizer, prompts, responses)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64), atol=1e-5, rtol=0)


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
    packed = _packed(tokenizer, [PROMPTS[2], "Hi"], [RESPONSES[2], "ok"], max_length)
    assert packed.num_truncated == 1
    with torch.no_grad():
        got = float(packed_logps(model, packed)[0])
    assert abs(got - reference_logp(model, tokenizer, prompt_ids[-5:], response_ids)) < 1e-5

    # A response longer than the whole budget keeps its head and one prompt token.
    long_batch = tokenize_responses(tokenizer, [PROMPTS[0]], [RESPONSES[1] * 4], max_length=8)
    assert long_batch["num_truncated"] == 1
    assert long_batch["input_ids"].shape[1] == 8 and int(long_batch["response_mask"].sum()) == 7
    long_response = tokenizer(RESPONSES[1] * 4, add_special_tokens=False).input_ids
    assert long_batch["input_ids"][0, 1:].tolist() == long_response[:7]


def test_a_truncated_prompt_is_shared_only_by_responses_that_see_the_same_cut(llama):
    """Two responses of different lengths to one long prompt keep different prompt tails under a tight budget:
    they must not share a row, or the shorter one would lose context it has alone."""
    model, tokenizer = llama
    prompts, responses = [PROMPTS[2]] * 2, ["Paris.", RESPONSES[1]]
    max_length = len(split_ids(tokenizer, PROMPTS[2], RESPONSES[1])[1]) + 4
    packed = _packed(tokenizer, prompts, responses, max_length)
    assert packed.input_ids.shape[0] == 2 and packed.num_truncated == 2
    expected = []
    for p, r in zip(prompts, responses, strict=True):
        prompt_ids, response_ids = split_ids(tokenizer, p, r)
        expected.append(reference_logp(model, tokenizer, prompt_ids[-(max_length - len(response_ids)) :], response_ids))
    with torch.no_grad():
        got = packed_logps(model, packed)
    torch.testing.assert_close(got.double(), torch.tensor(expected, dtype=torch.float64), atol=1e-5, rtol=0)


def test_gradients_flow_and_are_finite_with_padding(llama):
    model, tokenizer = llama
    model.zero_grad()
    packed_logps(model, _packed(tokenizer, PROMPTS, RESPONSES)).sum().backward()
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
