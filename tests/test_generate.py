"""Generation through Ray Data: vLLM (CPU build) and transformers give the same shape of output."""

from __future__ import annotations

import importlib.util

import pytest

from ray_jobs.events import read_events
from ray_jobs.generate.engines import generate
from ray_jobs.spec import GenerationSpec, SpecError, parse_spec

pytestmark = pytest.mark.ray

PROMPTS = ["<|im_start|>user\nReview a film.<|im_end|>\n<|im_start|>assistant\n", "The movie was", "A dull plot and"]


def _check_shape(result, n: int) -> None:
    assert len(result.texts) == len(PROMPTS) and len(result.num_tokens) == len(PROMPTS)
    for texts, counts in zip(result.texts, result.num_tokens, strict=True):
        assert len(texts) == n and all(isinstance(t, str) for t in texts)
        assert len(counts) == n and all(c >= 0 for c in counts)


@pytest.mark.vllm
@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed")
def test_vllm_samples_n_completions_within_the_token_limit(ray_cluster, tiny_llama, tmp_path):
    from ray_jobs.events import EventLog

    events = EventLog(tmp_path)
    gen = GenerationSpec(
        max_new_tokens=6,
        temperature=1.0,
        top_p=0.95,
        seed=3,
        engine="vllm",
        replicas=1,
        batch_size=2,
        max_model_len=256,
    )
    result = generate(tiny_llama, PROMPTS, 4, gen, events, stage="generate")
    assert result.engine == "vllm"
    _check_shape(result, 4)
    assert all(c <= 6 for counts in result.num_tokens for c in counts)  # vLLM's counts are the sampled tokens
    # A random tiny model almost never emits EOS in 6 steps: the limit, not EOS, ends nearly every completion.
    assert sum(c == 6 for counts in result.num_tokens for c in counts) >= 10
    # Sampling at temperature 1 gives different completions for one prompt.
    assert all(len(set(texts)) > 1 for texts in result.texts)
    progress = [e for e in read_events(tmp_path) if e["kind"] == "progress"]
    assert progress and progress[-1]["done"] == progress[-1]["total"] == len(PROMPTS)


def test_hf_engine_gives_the_same_schema(ray_cluster, tiny_llama):
    gen = GenerationSpec(
        max_new_tokens=5, temperature=1.0, seed=0, engine="hf", replicas=1, batch_size=2, max_model_len=256
    )
    result = generate(tiny_llama, PROMPTS, 3, gen)
    assert result.engine == "hf"
    _check_shape(result, 3)  # HF's counts re-encode the text: not a bound when a random model emits partial bytes
    again = generate(tiny_llama, PROMPTS, 3, gen)
    assert again.texts == result.texts  # seeded: a rerun samples the same texts


def test_nothing_to_generate_starts_no_engine(ray_cluster, tiny_llama):
    gen = GenerationSpec(max_new_tokens=4, temperature=1.0)
    assert generate(tiny_llama, PROMPTS, 0, gen).texts == [[], [], []]
    assert generate(tiny_llama, [], 2, gen).engine == "none"
    with pytest.raises(SpecError, match="generation.engine"):
        parse_spec({"generation": {"engine": "tgi"}})


def test_each_stage_samples_its_own_responses(ray_cluster, tiny_llama):
    """builtin:reviews' data stage and the generate stage sample the same prompts with the same settings: with one
    seed for both, the generated pairs would repeat the dataset's pairs."""
    gen = GenerationSpec(max_new_tokens=6, temperature=1.0, seed=0, engine="hf", batch_size=3)
    data = generate(tiny_llama, PROMPTS, 2, gen, stage="data").texts
    assert generate(tiny_llama, PROMPTS, 2, gen, stage="data").texts == data  # still reproducible per stage
    assert all(set(a).isdisjoint(b) for a, b in zip(data, generate(tiny_llama, PROMPTS, 2, gen).texts, strict=True))
