"""vLLM's async engine behind the service: the real app on uvicorn, a Ray Serve replica on the session's cluster
holding the tiny Llama on vLLM's CPU build, the `openai` client."""

from __future__ import annotations

import itertools
import time

import httpx
import pytest

from tests.support.serving import serving_service

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.vllm]

TOKEN = "vllm-token"


@pytest.fixture(scope="module")
def server(ray_cluster, tiny_llama, tmp_path_factory):
    pytest.importorskip("vllm")
    from service.settings import ServingSettings

    serving = ServingSettings(engine="vllm", num_cpus=1, max_model_len=256)
    with serving_service(ray_cluster, tmp_path_factory.mktemp("serving-vllm"), tiny_llama, [TOKEN], serving) as running:
        yield running


def _auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=f"{server.url}/v1", api_key=TOKEN, max_retries=0, timeout=600)


def test_openai_client_streams_a_chat_completion_token_by_token(client):
    messages = [{"role": "user", "content": "tell me about the film"}]
    # Loads the policy first, so the stream below times generation, not the engine's start.
    whole = client.chat.completions.create(model="tiny", messages=messages, max_tokens=24, temperature=0)
    assert whole.usage.completion_tokens >= 8, "too short a greedy answer to see it stream"

    arrivals, chunks = [], []
    stream = client.chat.completions.create(
        model="tiny",
        messages=messages,
        max_tokens=24,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    for chunk in stream:
        arrivals.append(time.perf_counter())
        chunks.append(chunk)
    text = [(t, c.choices[0].delta.content) for t, c in zip(arrivals, chunks, strict=True) if c.choices]
    content = [(t, piece) for t, piece in text if piece]
    assert "".join(piece for _, piece in content) == whole.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    # Token by token: a chunk per token or so, arriving as each is sampled. vLLM's offline engine, which this
    # replaced, sent a request's whole text when its batch ended: every chunk within a millisecond of the first.
    assert len(content) >= whole.usage.completion_tokens // 2
    gaps = [b[0] - a[0] for a, b in itertools.pairwise(content)]
    assert sum(gap > 0.002 for gap in gaps) >= len(gaps) // 2, gaps
    assert content[-1][0] - content[0][0] > 0.05


def test_greedy_answers_are_the_same_streamed_or_not_and_say_their_engine(server, client):
    plain = client.completions.create(model="tiny", prompt="the movie was", max_tokens=8, temperature=0)
    streamed = client.completions.create(model="tiny", prompt="the movie was", max_tokens=8, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == plain.choices[0].text
    body = {"prompt": "the movie was", "max_tokens": 8, "temperature": 0, "return_logprobs": "tokens"}
    r = httpx.post(f"{server.url}/v1/policies/tiny/generate", json=body, headers=_auth(), timeout=300)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["engine"] == "vllm"
    [sample] = out["samples"]
    assert sample["text"] == plain.choices[0].text
    assert len(sample["token_logprobs"]) == len(sample["token_ids"]) == sample["num_tokens"] >= 1
    assert all(lp <= 0 for lp in sample["token_logprobs"])


def test_echo_logprobs_and_seeds_on_vllm(client, tiny_llama):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    ids = tok("the movie was long")["input_ids"]
    scored = client.completions.create(model="tiny", prompt=[ids], max_tokens=0, echo=True, logprobs=1)
    lp = scored.choices[0].logprobs
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0, :-1].float(), -1)
    teacher = logp.gather(-1, torch.tensor(ids[1:])[:, None])[:, 0].tolist()
    assert lp.token_logprobs[0] is None and lp.token_logprobs[1:] == pytest.approx(teacher, abs=1e-3)
    assert all(len(top) == 1 for top in lp.top_logprobs[1:])

    body = {"model": "tiny", "prompt": "the plot", "max_tokens": 8, "temperature": 1.0, "n": 2}
    first = [c.text for c in client.completions.create(**body, seed=7).choices]
    assert [c.text for c in client.completions.create(**body, seed=7).choices] == first
    assert [c.text for c in client.completions.create(**body, seed=8).choices] != first


def test_lora_policies_share_their_base_models_engine(server, client, tiny_llama):
    """Two policies kept as LoRA adapters of the tiny Llama: one base engine serves both (vLLM's multi-LoRA), each
    request with its own adapter, each answer that adapter's own numbers."""
    import copy
    import json

    import torch
    from peft import LoraConfig, get_peft_model
    from ray import serve
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    ids = AutoTokenizer.from_pretrained(tiny_llama)("the movie was long")["input_ids"]
    app = server.app.state.serving.apps["vllm"]
    # Deployed by the first serving request: this test may be the module's first.
    loads = (
        serve.get_app_handle(app).loaded.remote().result(timeout_s=60)["loads"]
        if app in serve.status().applications
        else 0
    )
    expected = []
    for k in range(2):
        torch.manual_seed(k)
        # Non-zero LoRA weights, so the base model's numbers, or the other adapter's, would be wrong.
        lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        adapted = get_peft_model(copy.deepcopy(base), lora).eval()
        folder = server.settings.data_dir / "datasets" / f"adapter-{k}"
        adapted.save_pretrained(folder)
        (folder / "rmdistill.json").write_text(json.dumps({"base_model": str(tiny_llama)}))
        r = httpx.post(f"{server.url}/v1/policies", json={"path": str(folder), "id": f"lora-{k}"}, headers=_auth())
        assert r.status_code == 201, r.text
        with torch.no_grad():
            logp = torch.log_softmax(adapted(torch.tensor([ids])).logits[0, :-1].float(), -1)
        expected.append(logp.gather(-1, torch.tensor(ids[1:])[:, None])[:, 0].tolist())
    assert expected[0] != pytest.approx(expected[1], abs=1e-2)

    for k in (0, 1, 0):
        scored = client.completions.create(model=f"lora-{k}", prompt=[ids], max_tokens=0, echo=True, logprobs=0)
        assert scored.choices[0].logprobs.token_logprobs[1:] == pytest.approx(expected[k], abs=1e-3)
    held = serve.get_app_handle(app).loaded.remote().result(timeout_s=60)
    assert held["loads"] == loads + 1  # one base engine for both adapters
    assert f"lora-base:{tiny_llama}" in held["policies"] and not {"lora-0", "lora-1"} & set(held["policies"])
