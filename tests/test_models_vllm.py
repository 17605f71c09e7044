"""The tiny Llama folder loads in vLLM's CPU build and decodes exactly like transformers."""

from __future__ import annotations

import pytest
import torch

from ray_jobs.models.registry import load_causal_lm

pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module")
def llm(tiny_llama):
    vllm = pytest.importorskip("vllm")
    engine = vllm.LLM(model=str(tiny_llama), enforce_eager=True, max_model_len=256, dtype="float32", seed=0)
    yield engine
    engine.llm_engine.engine_core.shutdown()


def test_tiny_llama_greedy_decoding_matches_transformers(llm, tiny_llama):
    from vllm import SamplingParams

    prompt = "Write a short review of a film you enjoyed."
    out = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))[0].outputs[0]
    model, tokenizer = load_causal_lm(tiny_llama)
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        hf = model.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False)[0, ids.shape[1] :]
    assert list(out.token_ids) == hf.tolist()


def test_tiny_llama_chat_uses_its_template(llm):
    from vllm import SamplingParams

    out = llm.chat([{"role": "user", "content": "Hello"}], SamplingParams(temperature=0.0, max_tokens=4))[0]
    assert "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n" in out.prompt
    assert out.outputs[0].token_ids


def test_tiny_bert_scores_pairs_in_vllm_like_transformers(tiny_bert):
    vllm = pytest.importorskip("vllm")
    from ray_jobs.models.registry import load_reward_model
    from ray_jobs.models.reward import score_pairs

    # Its own short-lived engine: a pooling runner, and the generation engine above may still be up.
    engine = vllm.LLM(model=str(tiny_bert), runner="pooling", enforce_eager=True, max_model_len=256, dtype="float32")
    try:
        responses = ["A warm and lovely film.", "Dull."]
        got = [o.outputs.score for o in engine.score("Review a film.", responses, use_tqdm=False)]
    finally:
        engine.llm_engine.engine_core.shutdown()
    model, tokenizer = load_reward_model(tiny_bert)
    # vLLM's cross-encoder score is the sigmoid of the same (prompt, response) pair logit.
    expected = torch.sigmoid(score_pairs(model, tokenizer, ["Review a film."] * 2, responses))
    torch.testing.assert_close(torch.tensor(got), expected, atol=1e-5, rtol=0)
