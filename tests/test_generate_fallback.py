"""engine: auto falls back to transformers, and says so, when vLLM cannot load the model."""

from __future__ import annotations

import importlib.util
import shutil

import pytest

from ray_jobs.events import EventLog, read_events
from ray_jobs.generate.engines import generate
from ray_jobs.spec import GenerationSpec

pytestmark = [
    pytest.mark.ray,
    pytest.mark.vllm,
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed"),
]


def test_auto_falls_back_to_transformers_with_a_log_event(ray_cluster, tiny_llama, tmp_path):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    # vLLM's CPU attention needs head size >= 32 (shared/ENV.md): a head size of 16 is a real model it cannot run.
    config = LlamaConfig.from_pretrained(tiny_llama)
    config.hidden_size, config.num_attention_heads, config.num_key_value_heads, config.head_dim = 32, 2, 2, 16
    torch.manual_seed(0)
    model_dir = tmp_path / "head16"
    LlamaForCausalLM(config).save_pretrained(model_dir)
    for f in tiny_llama.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy(f, model_dir / f.name)

    events = EventLog(tmp_path / "job")
    gen = GenerationSpec(max_new_tokens=4, temperature=1.0, seed=0, engine="auto", batch_size=2, max_model_len=128)
    result = generate(model_dir, ["The movie was", "A dull plot"], 2, gen, events, stage="generate")
    assert result.engine == "hf"
    assert [len(t) for t in result.texts] == [2, 2]
    events = list(read_events(tmp_path / "job"))
    assert [e["engine_started"] for e in events if "engine_started" in e] == ["vllm", "hf"]
    logs = [e for e in events if e["kind"] == "log" and "engine_started" not in e]
    assert len(logs) == 1 and logs[0]["stage"] == "generate"
    message = logs[0]["message"]
    assert "falling back to transformers" in message and str(model_dir) in message
    assert "UDF failed" not in message  # the engine's own error, not Ray Data's wrapper
