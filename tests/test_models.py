"""The model registry: tiny and built-in models, the cache's locking, clear errors, prompts, generation, oracles."""

from __future__ import annotations

import multiprocessing
import string
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ray_jobs.models import tiny
from ray_jobs.models.hf_generate import hf_generate
from ray_jobs.models.logps import response_logps
from ray_jobs.models.oracle import load_oracle
from ray_jobs.models.prompts import render_prompt
from ray_jobs.models.registry import (
    ModelNotFoundError,
    load_causal_lm,
    load_tokenizer,
    materialise,
    resolve_model_path,
)

COMMON_WORDS = {"the", "a", "and", "is", "of", "to", "i", "it", "this", "in", "with", "that", "was", "for", "film"}


# --- tiny models -------------------------------------------------------------------------------------------------


def test_tiny_llama_is_deterministic_for_a_seed(tmp_path, tiny_llama):
    # The cached folder was built with seed 0 (maybe in an earlier session): a fresh build must match it exactly.
    for name, seed in (("a", 0), ("c", 1)):
        tiny.build_tiny_llama(tmp_path / name, seed=seed)
    a, c = (load_file(tmp_path / name / "model.safetensors") for name in "ac")
    cached = load_file(Path(tiny_llama) / "model.safetensors")
    assert a.keys() == cached.keys()
    assert all(torch.equal(a[k], cached[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)
    # The tokenizer is trained, so it must come out identical too.
    assert (tmp_path / "a" / "tokenizer.json").read_bytes() == (Path(tiny_llama) / "tokenizer.json").read_bytes()


def test_tiny_llama_reloads_with_plain_from_pretrained(tiny_llama):
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    assert isinstance(model, LlamaForCausalLM)
    cfg = model.config
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.head_dim) == (64, 2, 2, 32)
    assert cfg.vocab_size == len(tokenizer) and 512 <= len(tokenizer) <= 1024
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|pad|>"
    # Byte-level: any text, accents and emoji included, round-trips.
    text = "Ça va? 東京 🎬 great film!"
    assert tokenizer.decode(tokenizer(text, add_special_tokens=False).input_ids) == text


def test_tiny_bert_is_a_sequence_classifier(tiny_bert):
    from transformers import AutoModelForSequenceClassification, BertForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert)
    assert isinstance(model, BertForSequenceClassification)
    assert (model.config.hidden_size, model.config.num_hidden_layers, model.config.num_labels) == (64, 2, 1)
    assert load_tokenizer("tiny:bert").sep_token == "[SEP]"


# --- the cache: one build, atomic, shared by concurrent workers ----------------------------------------------------


def _slow_build(out: Path) -> None:
    with open(out.parent / "builds.log", "a") as log:
        log.write("build\n")
    time.sleep(0.5)
    (out / "config.json").write_text("{}")


def _materialise_in_worker(cache: str) -> str:
    return str(materialise("slow-v1", _slow_build, Path(cache)))


def test_concurrent_workers_build_once(tmp_path):
    with ProcessPoolExecutor(3, mp_context=multiprocessing.get_context("fork")) as pool:
        paths = list(pool.map(_materialise_in_worker, [str(tmp_path)] * 3))
    assert paths == [str(tmp_path / "slow-v1")] * 3
    assert (tmp_path / "builds.log").read_text() == "build\n"
    assert (tmp_path / "slow-v1" / "config.json").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".slow-v1-")] == []


def test_failed_build_leaves_nothing_behind(tmp_path):
    def broken(out: Path) -> None:
        (out / "half-written").write_text("x")
        raise RuntimeError("conversion failed")

    with pytest.raises(RuntimeError, match="conversion failed"):
        materialise("broken-v1", broken, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".broken-v1.lock"]
    assert materialise("broken-v1", _slow_build, tmp_path).joinpath("config.json").exists()


# --- errors --------------------------------------------------------------------------------------------------------


def test_hub_id_offline_fails_fast_with_advice(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert resolve_model_path("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    start = time.monotonic()
    with pytest.raises(ModelNotFoundError, match="HuggingFaceTB/SmolLM2-135M-Instruct") as err:
        load_causal_lm("HuggingFaceTB/SmolLM2-135M-Instruct")
    assert time.monotonic() - start < 10
    assert "hub is unreachable" in str(err.value) and "local path" in str(err.value)


@pytest.mark.parametrize("ref", ["./no/such/model", "/no/such/model-folder", "~/no-such-model"])
def test_missing_local_path_is_named(ref):
    with pytest.raises(ModelNotFoundError, match=f"model path '{ref}' does not exist"):
        resolve_model_path(ref)


def test_unknown_builtin_lists_the_known_ones():
    with pytest.raises(ModelNotFoundError, match=r"unknown model 'builtin:gpt-5'.*builtin:smollm2-135m"):
        resolve_model_path("builtin:gpt-5")
    with pytest.raises(ModelNotFoundError, match="oracle"):
        resolve_model_path("builtin:vader")


def test_existing_folder_that_is_not_a_model_names_it(tmp_path):
    with pytest.raises(ModelNotFoundError, match=str(tmp_path)):
        load_tokenizer(tmp_path)


# --- prompts -------------------------------------------------------------------------------------------------------


def test_render_prompt(tiny_llama):
    chat = load_tokenizer(tiny_llama)
    plain = load_tokenizer("tiny:bert")
    assert render_prompt(chat, "Hi") == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert render_prompt(chat, "Hi", apply_chat_template=False) == "Hi"
    assert render_prompt(plain, "Hi") == "Hi"
    conversation = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Bye"},
    ]
    rendered = render_prompt(chat, conversation)
    assert rendered.startswith("<|im_start|>system\nBe brief.<|im_end|>\n")
    assert rendered.endswith("<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\n")
    assert render_prompt(plain, conversation[1:]) == "User: Hi\nAssistant: Hello!\nUser: Bye\nAssistant:"
    with pytest.raises(ValueError, match="message 1 .* string 'content'"):
        render_prompt(chat, [{"role": "user", "content": "a"}, {"role": "user", "content": 3}])
    with pytest.raises(ValueError, match="empty"):
        render_prompt(chat, [])


# --- generation ----------------------------------------------------------------------------------------------------


def test_hf_generate_is_seeded_batched_and_returns_new_text_only(tiny_llama):
    model, tokenizer = load_causal_lm(tiny_llama)
    prompts = ["The film was", "Hi", "Write a short review of a book you read last week."]
    kwargs = {"n": 2, "max_new_tokens": 6, "temperature": 1.0}
    first = hf_generate(model, tokenizer, prompts, seed=3, **kwargs)
    assert [len(group) for group in first.texts] == [2, 2, 2]
    assert [len(group) for group in first.ended] == [2, 2, 2]
    assert first == hf_generate(model, tokenizer, prompts, seed=3, **kwargs)
    assert first != hf_generate(model, tokenizer, prompts, seed=4, **kwargs)
    torch.manual_seed(123)
    untouched = torch.rand(3)
    torch.manual_seed(123)
    hf_generate(model, tokenizer, prompts, seed=3, **kwargs)
    assert torch.equal(torch.rand(3), untouched), "the caller's RNG stream must not move"
    greedy = hf_generate(model, tokenizer, prompts, n=2, max_new_tokens=6, temperature=0.0, batch_size=4)
    assert all(a == b for a, b in greedy.texts)
    # Left padding must not change what a prompt produces: one at a time equals batched.
    assert greedy == hf_generate(model, tokenizer, prompts, n=2, max_new_tokens=6, temperature=0.0, batch_size=1)
    ids = tokenizer(prompts[1], return_tensors="pt").input_ids
    expected = model.generate(ids, max_new_tokens=6, do_sample=False)[0, ids.shape[1] :]
    assert greedy.texts[1][0] == tokenizer.decode(expected, skip_special_tokens=True)
    assert greedy.ended[1][0] == bool((expected == tokenizer.eos_token_id).any())


# --- built-in models -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2():
    # One intra-op thread: on a shared 2-core box, 2 OpenMP threads spin-wait on each other and a 32-token
    # generation measured 228 s wall (30 s CPU) against 21 s (3.5 s CPU) with one.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield load_causal_lm("builtin:smollm2-135m")
    torch.set_num_threads(threads)


def test_smollm2_loads_offline_from_a_plain_folder(smollm2):
    from transformers import LlamaForCausalLM

    model, tokenizer = smollm2
    folder = resolve_model_path("builtin:smollm2-135m")
    assert Path(folder).name == "smollm2-135m-instruct" and (Path(folder) / "model.safetensors").exists()
    assert isinstance(model, LlamaForCausalLM)  # load_causal_lm is plain AutoModelForCausalLM.from_pretrained
    assert 134_000_000 < sum(p.numel() for p in model.parameters()) < 135_000_000
    assert tokenizer.eos_token == tokenizer.pad_token == "<|im_end|>"
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id


def test_smollm2_writes_coherent_english(smollm2):
    model, tokenizer = smollm2
    prompt = render_prompt(tokenizer, "Write a short review of a film you enjoyed.")
    assert "<|im_start|>user\nWrite a short review" in prompt
    [[text]], [[ended]] = hf_generate(model, tokenizer, [prompt], n=1, max_new_tokens=32, temperature=0.0)
    assert not ended  # a review runs past 32 tokens: cut at the cap, not ended
    short = render_prompt(tokenizer, "Answer with one word: is the sky blue?")
    [[answer]], [[short_ended]] = hf_generate(model, tokenizer, [short], n=1, max_new_tokens=24, temperature=0.0)
    assert short_ended and len(answer.split()) < 10, answer
    words = text.lower().replace(",", " ").replace(".", " ").split()
    assert len(words) >= 15, text
    assert len(COMMON_WORDS & set(words)) >= 3, text
    assert all(ch in string.printable or ch.isalpha() for ch in text), text
    # The model prefers its own fluent answer to the same words shuffled.
    shuffled = " ".join(sorted(text.split()))
    logps = response_logps(model, tokenizer, [prompt] * 2, [text, shuffled], max_length=128)
    assert logps[0] > logps[1] + 20


def test_vader_oracle_prefers_warm_text():
    oracle = load_oracle("builtin:vader")
    scores = oracle.score(
        ["Review a film."] * 3,
        ["A wonderful, warm and beautiful film. I loved it!", "It was a film.", "Awful, boring and painful to watch."],
    )
    assert scores[0] > 0.5 and scores[2] < -0.5 and scores[1] == pytest.approx(0.0)
    with pytest.raises(ValueError, match="2 prompts but 1 responses"):
        oracle.score(["a", "b"], ["c"])
