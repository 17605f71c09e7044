"""Policies out as users need them: a LoRA policy saved as its PEFT adapter (alone, or beside the merged model),
loaded with PEFT, resolved by rmdistill to the same model, and served over the real service; and the policy card."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
import torch
from support.pairs import write_pairs

from ray_jobs.distill.card import policy_card
from ray_jobs.distill.loop import distill_task, train_policy
from ray_jobs.layout import JobLayout
from ray_jobs.spec import JobSpec, SpecError, parse_spec

LORA = {"r": 4, "alpha": 16.0, "target_modules": ["q_proj", "v_proj"]}
PROMPT = "the film was"


@pytest.fixture(scope="module")
def pairs_job(tmp_path_factory, tiny_llama) -> Path:
    job = tmp_path_factory.mktemp("formats")
    write_pairs(job, tiny_llama)
    return job


def _train(tiny_llama: Path, job: Path, out: Path, policy_format: str) -> JobSpec:
    distill = {"loss": "dpo", "batch_size": 32, "lr": 5e-3, "max_steps": 2, "lora": LORA}
    spec = JobSpec(reference=str(tiny_llama), distill={**distill, "policy_format": policy_format})
    train_policy(distill_task(spec, job, log_dir=str(out.parent / "run"), checkpoint_dir=None, output_dir=str(out)))
    return spec


def _logits(model: torch.nn.Module, tokenizer) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([tokenizer(PROMPT)["input_ids"]])).logits


@pytest.fixture(scope="module")
def adapter_policy(tmp_path_factory, tiny_llama, pairs_job) -> Path:
    out = tmp_path_factory.mktemp("adapter") / "policy"
    _train(tiny_llama, pairs_job, out, "adapter")
    return out


def test_an_adapter_only_policy_loads_with_peft_and_resolves_to_its_merge(adapter_policy, tiny_llama):
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ray_jobs.models.registry import resolve_model_path

    assert (adapter_policy / "adapter_config.json").is_file() and not (adapter_policy / "config.json").exists()
    assert json.loads((adapter_policy / "rmdistill.json").read_text())["policy_format"] == "adapter"
    tokenizer = AutoTokenizer.from_pretrained(adapter_policy)
    peft_model = AutoPeftModelForCausalLM.from_pretrained(adapter_policy).eval()
    assert any("lora_" in name for name, _ in peft_model.named_parameters())
    merged = resolve_model_path(adapter_policy)
    assert merged != adapter_policy and resolve_model_path(adapter_policy) == merged  # merged once, then cached
    served = AutoModelForCausalLM.from_pretrained(merged).eval()
    base = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    want = _logits(peft_model, tokenizer)
    assert torch.allclose(_logits(served, tokenizer), want, atol=1e-5)
    assert not torch.allclose(_logits(base, tokenizer), want, atol=1e-4)  # training moved the adapter


def test_both_keeps_the_merged_policy_and_its_adapter(tmp_path, tiny_llama, pairs_job):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "policy"
    _train(tiny_llama, pairs_job, out, "both")
    tokenizer = AutoTokenizer.from_pretrained(out)
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    assert not any("lora_" in name for name, _ in merged.named_parameters())
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama), out / "adapter").eval()
    assert torch.allclose(_logits(merged, tokenizer), _logits(adapted, tokenizer), atol=1e-5)


def test_adapter_formats_need_lora():
    with pytest.raises(SpecError) as err:
        parse_spec({"distill": {"policy_format": "adapter"}})
    assert err.value.errors[0]["field"] == "distill.policy_format"


@pytest.mark.ray
def test_an_adapter_only_policy_serves_what_peft_computes(ray_cluster, adapter_policy, tmp_path):
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoTokenizer

    from service.background import BackgroundServer
    from service.settings import Settings

    settings = Settings(
        data_dir=tmp_path / "home",
        data_roots=(adapter_policy.parent,),
        tokens=["t"],
        ray_address=ray_cluster.get_runtime_context().gcs_address,
    )
    mp = pytest.MonkeyPatch()
    mp.setenv("RMDISTILL_SERVING_ENGINE", "hf")
    mp.setenv("RMDISTILL_SERVING_NUM_CPUS", "0.5")
    server = BackgroundServer(settings).start(timeout_s=60)
    try:
        auth = {"Authorization": "Bearer t"}
        r = httpx.post(f"{server.url}/v1/policies", json={"path": str(adapter_policy), "id": "lora"}, headers=auth)
        assert r.status_code == 201, r.text
        body = {"model": "lora", "prompt": PROMPT, "max_tokens": 6, "temperature": 0}
        r = httpx.post(f"{server.url}/v1/completions", json=body, headers=auth, timeout=300)
        assert r.status_code == 200, r.text
        text = r.json()["choices"][0]["text"]
    finally:
        server.stop(60)
        mp.undo()
    tokenizer = AutoTokenizer.from_pretrained(adapter_policy)
    model = AutoPeftModelForCausalLM.from_pretrained(adapter_policy).eval()
    ids = torch.tensor([tokenizer(PROMPT)["input_ids"]])
    with torch.no_grad():
        out = model.generate(input_ids=ids, max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert text == tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def test_the_policy_card_names_reference_loss_data_and_how_to_load(adapter_policy, tiny_llama, pairs_job):
    card = policy_card(JobLayout(pairs_job), adapter_policy)
    assert card.startswith(f"---\nbase_model: {tiny_llama}\nlibrary_name: peft\n")
    assert "with the loss **dpo**" in card and "AutoPeftModelForCausalLM" in card
    assert "2 optimizer steps" in card and "LoRA rank 4" in card
    assert "Not evaluated yet." in card
