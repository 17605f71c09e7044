"""OpenAI-compatible serving over a real uvicorn socket, policies on a real Ray Serve deployment (transformers), the
tiny Llama as the policy; vLLM's is in test_serving_vllm.py."""

from __future__ import annotations

import asyncio

import httpx
import pytest
import torch

from tests.support.serving import serving_service

pytestmark = [pytest.mark.ray, pytest.mark.slow]


ALICE, BOB = "alice-token", "bob-token"


SERVING = {"engine": "hf", "num_cpus": 0.5, "max_policies_per_replica": 2}
POLICY_IDS = ("tiny", "tiny-b", "tiny-c")


@pytest.fixture(scope="module")
def server(ray_cluster, tiny_llama, tmp_path_factory):
    """The real service app on uvicorn, serving on the session's Ray: one transformers replica holding two policies.

    Alice registers the tiny Llama folder three times (three policy ids); Bob's token sees none of it.
    """
    from service.settings import ServingSettings

    home = tmp_path_factory.mktemp("serving-home")
    serving = ServingSettings(**SERVING)
    with serving_service(ray_cluster, home, tiny_llama, [ALICE, BOB], serving, POLICY_IDS) as running:
        yield running.app, running.url


def _auth(token: str = ALICE) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=f"{server[1]}/v1", api_key=ALICE, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def reference(tiny_llama):
    """The same policy loaded in-process: what the server's answers are checked against."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    return model, tok


def _greedy(reference, ids: list[int], max_new_tokens: int) -> str:
    model, tok = reference
    with torch.no_grad():
        out = model.generate(
            torch.tensor([ids]), max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id
        )
    return tok.decode(out[0, len(ids) :], skip_special_tokens=True)


def test_openai_client_lists_completes_and_matches_local_greedy(client, reference):
    assert {m.id for m in client.models.list().data} == set(POLICY_IDS)
    prompt = "the movie was"
    out = client.completions.create(model="tiny", prompt=prompt, max_tokens=8, temperature=0)
    tok = reference[1]
    assert out.choices[0].text == _greedy(reference, tok(prompt)["input_ids"], 8)
    assert out.usage.prompt_tokens == len(tok(prompt)["input_ids"])
    assert 1 <= out.usage.completion_tokens <= 8
    again = client.completions.create(model="tiny", prompt=prompt, max_tokens=8, temperature=0)
    assert again.choices[0].text == out.choices[0].text


def test_chat_uses_the_template_and_streams_the_same_text(client, reference):
    model, tok = reference
    messages = [{"role": "user", "content": "tell me about the film"}]
    chat = client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0)
    rendered = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tok(rendered, add_special_tokens=False)["input_ids"]
    assert chat.choices[0].message.content == _greedy(reference, ids, 10)
    assert chat.choices[0].message.role == "assistant"
    assert chat.usage.prompt_tokens == len(ids)

    stream = client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0, stream=True)
    chunks = list(stream)
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason == chat.choices[0].finish_reason
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == chat.choices[0].message.content

    plain = client.completions.create(model="tiny", prompt="a quiet", max_tokens=6, temperature=0)
    pieces = [
        c.choices[0].text
        for c in client.completions.create(model="tiny", prompt="a quiet", max_tokens=6, temperature=0, stream=True)
    ]
    assert len(pieces) >= 2 and "".join(pieces) == plain.choices[0].text

    # A stop string spanning tokens: the stream holds text back and ends exactly where the plain answer does.
    stop = plain.choices[0].text[3:6]
    cut = client.completions.create(model="tiny", prompt="a quiet", max_tokens=6, temperature=0, stop=stop)
    streamed = client.completions.create(
        model="tiny", prompt="a quiet", max_tokens=6, temperature=0, stop=stop, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed) == cut.choices[0].text == plain.choices[0].text.split(stop)[0]


def test_sse_wire_format_ends_with_done(server):
    body = {"model": "tiny", "prompt": "hello", "max_tokens": 3, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{server[1]}/v1/completions", json=body, headers=_auth(), timeout=60) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"


def test_fifty_concurrent_requests_all_answer_their_own_prompt(server, reference):
    tok = reference[1]
    prompts = [" ".join(["great"] * (k % 10 + 1) + [str(k)]) for k in range(50)]

    async def run() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=server[1], headers=_auth(), timeout=120) as http:
            return await asyncio.gather(
                *(
                    http.post("/v1/completions", json={"model": "tiny", "prompt": p, "max_tokens": 4, "temperature": 0})
                    for p in prompts
                )
            )

    responses = asyncio.run(run())
    assert [r.status_code for r in responses] == [200] * 50
    # Each answer's prompt length matches its own prompt: batching never mixes requests up.
    assert [r.json()["usage"]["prompt_tokens"] for r in responses] == [len(tok(p)["input_ids"]) for p in prompts]


def test_unknown_model_is_openai_404(client, server):
    from openai import NotFoundError

    with pytest.raises(NotFoundError) as err:
        client.completions.create(model="no-such-policy", prompt="x", max_tokens=2)
    assert err.value.status_code == 404
    chat = {"model": "nope", "messages": [{"role": "user", "content": "x"}]}
    r = httpx.post(f"{server[1]}/v1/chat/completions", json=chat, headers=_auth())
    assert r.status_code == 404
    assert r.json() == {
        "error": {
            "message": "The model 'nope' does not exist",
            "type": "invalid_request_error",
            "param": "model",
            "code": "model_not_found",
        }
    }


def test_serving_uses_the_job_api_auth_and_ownership(server):
    from openai import AuthenticationError, NotFoundError, OpenAI

    body = {"model": "tiny", "prompt": "x", "max_tokens": 2}
    assert httpx.post(f"{server[1]}/v1/completions", json=body).status_code == 401
    bob = OpenAI(base_url=f"{server[1]}/v1", api_key=BOB, max_retries=0)
    assert bob.models.list().data == []
    with pytest.raises(NotFoundError):
        bob.completions.create(**body)
    with pytest.raises(AuthenticationError):
        OpenAI(base_url=f"{server[1]}/v1", api_key="wrong", max_retries=0).models.list()


@pytest.mark.parametrize(
    ("field", "value"),
    [("max_tokens", 0), ("max_tokens", 10**7), ("temperature", 2.5), ("top_p", 0), ("n", 17), ("stop", list("abcde"))],
)
def test_bad_sampling_values_are_openai_400(server, field, value):
    body = {"model": "tiny", "prompt": "x", "max_tokens": 2, field: value}
    r = httpx.post(f"{server[1]}/v1/completions", json=body, headers=_auth(), timeout=30)
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == field and field in error["message"]


def test_prompt_longer_than_the_context_is_400(server, tiny_llama):
    import json

    context = json.loads((tiny_llama / "config.json").read_text())["max_position_embeddings"]
    body = {"model": "tiny", "prompt": "word " * context, "max_tokens": 4}
    r = httpx.post(f"{server[1]}/v1/completions", json=body, headers=_auth(), timeout=60)
    assert r.status_code == 400 and "exceeds this policy's context" in r.json()["error"]["message"]


def test_generate_returns_samples_with_their_policy_logprobs(server, reference):
    model, tok = reference
    body = {"prompt": "the plot", "n": 3, "max_tokens": 6, "temperature": 1.0, "return_logprobs": "tokens"}
    r = httpx.post(f"{server[1]}/v1/policies/tiny/generate", json=body, headers=_auth(), timeout=60)
    assert r.status_code == 200, r.text
    out = r.json()
    assert len(out["samples"]) == 3 and out["engine"] == "hf"
    prompt_ids = tok("the plot")["input_ids"]
    for s in out["samples"]:
        assert len(s["token_logprobs"]) == len(s["token_ids"]) == s["num_tokens"] >= 1
        assert s["logprob"] == pytest.approx(sum(s["token_logprobs"]), abs=1e-5)
        # Teacher-forced log-prob of the same tokens under the local copy of the policy.
        ids = torch.tensor([prompt_ids + s["token_ids"]])
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits[0, :-1].float(), -1)
        expected = logp[len(prompt_ids) - 1 :].gather(-1, ids[0, len(prompt_ids) :, None])[:, 0]
        assert s["token_logprobs"] == pytest.approx(expected.tolist(), abs=1e-3)

    stopped = httpx.post(
        f"{server[1]}/v1/policies/tiny/generate",
        json={"prompt": "the plot", "max_tokens": 6, "temperature": 0},
        headers=_auth(),
        timeout=60,
    ).json()["samples"][0]
    stop = stopped["text"][2:4]
    assert stop, "greedy sample too short to test stop strings"
    cut = httpx.post(
        f"{server[1]}/v1/policies/tiny/generate",
        json={"prompt": "the plot", "max_tokens": 6, "temperature": 0, "stop": stop},
        headers=_auth(),
        timeout=60,
    ).json()["samples"][0]
    assert cut["text"] == stopped["text"][: stopped["text"].find(stop)] and cut["finish_reason"] == "stop"


def test_usage_metrics_on_the_metrics_endpoint_count_requests_and_tokens(server, client):
    from prometheus_client.parser import text_string_to_metric_families

    def value(name: str, **labels: str) -> float:
        text = httpx.get(f"{server[1]}/metrics", headers=_auth()).text
        samples = [s for family in text_string_to_metric_families(text) for s in family.samples]
        return sum(s.value for s in samples if s.name == name and labels.items() <= s.labels.items())

    # Policies appear under a digest of their id: /metrics answers any token, and ids are their owners' business.
    label = httpx.get(f"{server[1]}/v1/policies/tiny", headers=_auth()).json()["metrics_label"]
    assert label.startswith("p") and len(label) == 13
    before = value("rmdistill_serving_requests_total", policy=label, endpoint="completions", status="ok")
    tokens = value("rmdistill_serving_completion_tokens_total", policy=label)
    latency = value("rmdistill_serving_request_seconds_count", policy=label, endpoint="completions")
    out = client.completions.create(model="tiny", prompt="count me", max_tokens=5, temperature=0)
    assert value("rmdistill_serving_requests_total", policy=label, endpoint="completions", status="ok") == before + 1
    assert value("rmdistill_serving_completion_tokens_total", policy=label) == tokens + out.usage.completion_tokens
    assert value("rmdistill_serving_request_seconds_count", policy=label, endpoint="completions") == latency + 1
    assert 'policy="tiny"' not in httpx.get(f"{server[1]}/metrics", headers=_auth()).text


def _replica(app) -> dict:
    """What the transformers deployment's replica holds (there is one: max_replicas is 1)."""
    from ray import serve

    return serve.get_app_handle(app.state.serving.apps["hf"]).loaded.remote().result(timeout_s=60)


def test_two_policies_share_one_replica_and_serve_unloads_the_least_recently_used(server, client):
    import ray

    app = server[0]
    texts = {p: client.completions.create(model=p, prompt="a", max_tokens=2, temperature=0) for p in POLICY_IDS[:2]}
    held = _replica(app)
    assert held["policies"][-2:] == ["tiny", "tiny-b"], held
    loads = held["loads"]

    # A third policy on a replica that holds two: Serve unloads the least recently used one (tiny) to load it.
    client.completions.create(model="tiny-c", prompt="a", max_tokens=2, temperature=0)
    after = _replica(app)
    assert after["replica"] == held["replica"]
    assert after["policies"] == ["tiny-b", "tiny-c"] and after["loads"] == loads + 1
    again = client.completions.create(model="tiny", prompt="a", max_tokens=2, temperature=0)
    assert _replica(app)["policies"] == ["tiny-c", "tiny"] and _replica(app)["loads"] == loads + 2
    assert again.choices[0].text == texts["tiny"].choices[0].text == texts["tiny-b"].choices[0].text

    # A replica that dies is replaced by Serve; the request that found it dead is sent again.
    ray.kill(ray.get_actor(after["actor"], namespace="serve"), no_restart=True)
    revived = client.completions.create(model="tiny", prompt="a", max_tokens=2, temperature=0)
    assert revived.choices[0].text == again.choices[0].text
    assert _replica(app)["replica"] != held["replica"]


def test_a_restarted_or_second_api_process_finds_the_policies_loaded(server, tiny_llama, ray_cluster, tmp_path):
    """The replicas belong to Serve, not to an API process: a new one (another data folder, the same serving
    settings) serves a policy the first loaded without loading it again, and so does the next after a SIGKILL."""
    from service.ray_backend import free_port
    from tests.support.service import Service

    app = server[0]
    first = httpx.post(
        f"{server[1]}/v1/completions",
        json={"model": "tiny", "prompt": "restart", "max_tokens": 3, "temperature": 0},
        headers=_auth(),
        timeout=120,
    ).json()["choices"][0]["text"]
    before = _replica(app)
    assert "tiny" in before["policies"]
    env = {
        "RAY_AUTH_MODE": "disabled",
        # Job control answers 503 (nothing listens there); serving goes to the session's cluster.
        "RAY_ADDRESS": f"http://127.0.0.1:{free_port()}",
        "RMDISTILL_SERVING_RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address,
        "RMDISTILL_TOKENS": ALICE,
        **{f"RMDISTILL_SERVING_{k.upper()}": str(v) for k, v in SERVING.items()},
    }
    for attempt in range(2):
        home = tmp_path / f"api-{attempt}"
        home.mkdir()
        api = Service(home, "--data-root", str(tiny_llama.parent), env=env)
        try:
            r = httpx.post(
                f"{api.url}/v1/policies", json={"path": str(tiny_llama), "id": "tiny"}, headers=_auth(), timeout=30
            )
            assert r.status_code == 201, r.text
            body = {"model": "tiny", "prompt": "restart", "max_tokens": 3, "temperature": 0}
            r = httpx.post(f"{api.url}/v1/completions", json=body, headers=_auth(), timeout=120)
            assert r.status_code == 200, (r.text, api.log.read_text()[-3000:])
            assert r.json()["choices"][0]["text"] == first
            now = _replica(app)
            assert (now["replica"], now["loads"]) == (before["replica"], before["loads"])
        finally:
            api.process.kill()
            api.process.wait(30)


def test_lora_adapter_policy_is_merged_into_its_base_once(tiny_llama, tmp_path, reference):
    import copy
    import json

    from peft import LoraConfig, get_peft_model

    from service.engines import materialise

    base, tok = reference
    # Non-zero LoRA weights, so serving the bare base by mistake would change the logits.
    lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    peft_model = get_peft_model(copy.deepcopy(base), lora).eval()
    adapter = tmp_path / "policy"
    peft_model.save_pretrained(adapter)
    (adapter / "rmdistill.json").write_text(json.dumps({"base_model": "tiny:llama", "loss": "dpo"}))

    merged = materialise(str(adapter))
    assert merged != adapter and materialise(str(adapter)) == merged
    from transformers import AutoModelForCausalLM, AutoTokenizer

    served = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    ids = torch.tensor([tok("the film was long")["input_ids"]])
    with torch.no_grad():
        want, got, bare = peft_model(ids).logits, served(ids).logits, base(ids).logits
    assert torch.allclose(got, want, atol=1e-5) and not torch.allclose(got, bare, atol=1e-3)
    assert AutoTokenizer.from_pretrained(merged).chat_template == tok.chat_template


# ------------------------------------------------------------------------------------------- the OpenAI surface
def _teacher(reference, ids: list[int]) -> list[float]:
    """Log-prob of each token after the ones before it, under the local copy of the policy."""
    model, _ = reference
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0, :-1].float(), -1)
    return logp.gather(-1, torch.tensor(ids[1:])[:, None])[:, 0].tolist()


def test_a_model_card_by_id_for_its_owner_only(client, server):
    from openai import NotFoundError, OpenAI

    card = client.models.retrieve("tiny-b")
    assert (card.id, card.object) == ("tiny-b", "model")
    with pytest.raises(NotFoundError):
        OpenAI(base_url=f"{server[1]}/v1", api_key=BOB, max_retries=0).models.retrieve("tiny-b")


def test_echo_returns_the_prompt_with_its_teacher_forced_logprobs(client, reference):
    tok = reference[1]
    prompt = "the movie was long"
    ids = tok(prompt)["input_ids"]
    out = client.completions.create(model="tiny", prompt=prompt, max_tokens=3, temperature=0, echo=True, logprobs=2)
    [choice] = out.choices
    lp = choice.logprobs
    generated = out.usage.completion_tokens
    assert len(lp.tokens) >= len(ids) + generated
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert lp.token_logprobs[1 : len(ids)] == pytest.approx(_teacher(reference, ids), abs=1e-4)
    # The text is the prompt and the completion; each token sits at its offset in it.
    assert choice.text.endswith(
        client.completions.create(model="tiny", prompt=prompt, max_tokens=3, temperature=0).choices[0].text
    )
    assert all(choice.text[o : o + len(t)] == t for o, t in zip(lp.text_offset, lp.tokens, strict=True))
    # Greedy: every generated token is its position's likeliest, with two alternatives listed.
    for token_lp, top in zip(lp.token_logprobs[len(ids) :], lp.top_logprobs[len(ids) :], strict=True):
        assert len(top) == 2 and max(top.values()) == token_lp

    # What an evaluation harness sends: token ids, nothing to generate, the prompt's log-probs back.
    scored = client.completions.create(model="tiny", prompt=[ids], max_tokens=0, echo=True, logprobs=1)
    assert scored.choices[0].logprobs.token_logprobs == pytest.approx(lp.token_logprobs[: len(ids)], abs=1e-6)
    assert scored.usage.completion_tokens == 0 and scored.usage.prompt_tokens == len(ids)


def test_stream_chunks_carry_the_logprobs_of_their_tokens(client):
    kwargs = {"model": "tiny", "prompt": "a quiet", "max_tokens": 6, "temperature": 0, "logprobs": 1}
    whole = client.completions.create(**kwargs).choices[0].logprobs
    chunks = [c.choices[0] for c in client.completions.create(**kwargs, stream=True) if c.choices[0].logprobs]
    assert len(chunks) >= 2
    assert [t for c in chunks for t in c.logprobs.tokens] == whole.tokens[: len(whole.token_logprobs)]
    streamed = [v for c in chunks for v in c.logprobs.token_logprobs]
    assert streamed == pytest.approx(whole.token_logprobs[: len(streamed)], abs=1e-6)

    messages = [{"role": "user", "content": "tell me about the film"}]
    chat = dict(model="tiny", messages=messages, max_tokens=6, temperature=0, logprobs=True, top_logprobs=2)
    plain = client.chat.completions.create(**chat).choices[0].logprobs.content
    entries = [
        e
        for c in client.chat.completions.create(**chat, stream=True)
        if c.choices and c.choices[0].logprobs
        for e in c.choices[0].logprobs.content
    ]
    assert [(e.token, round(e.logprob, 5)) for e in entries] == [(e.token, round(e.logprob, 5)) for e in plain]
    assert all(len(e.top_logprobs) == 2 and e.top_logprobs[0].logprob == e.logprob for e in plain)


def test_a_seed_fixes_the_samples_whatever_runs_beside_them(server, client):
    body = {"model": "tiny", "prompt": "the plot", "max_tokens": 8, "temperature": 1.0, "n": 2}
    alone = [c.text for c in client.completions.create(**body, seed=7).choices]
    other = [c.text for c in client.completions.create(**body, seed=8).choices]

    async def crowded() -> list[str]:
        async with httpx.AsyncClient(base_url=server[1], headers=_auth(), timeout=120) as http:
            noise = [http.post("/v1/completions", json={**body, "prompt": f"noise {k}"}) for k in range(4)]
            seeded, *_ = await asyncio.gather(http.post("/v1/completions", json={**body, "seed": 7}), *noise)
        return [c["text"] for c in seeded.json()["choices"]]

    assert asyncio.run(crowded()) == alone
    assert other != alone and alone[0] != alone[1]


@pytest.mark.parametrize(
    ("path", "field", "value"),
    [
        ("/v1/chat/completions", "tools", [{"type": "function", "function": {"name": "f"}}]),
        ("/v1/chat/completions", "response_format", {"type": "json_object"}),
        ("/v1/chat/completions", "tool_choice", "auto"),
        ("/v1/completions", "logit_bias", {"50": 10}),
        ("/v1/completions", "suffix", "end"),
        ("/v1/completions", "best_of", 3),
        ("/v1/completions", "presence_penalty", 1),
    ],
)
def test_an_unsupported_field_is_400_naming_it(server, path, field, value):
    base = {"model": "tiny", "max_tokens": 2}
    base |= {"messages": [{"role": "user", "content": "x"}]} if "chat" in path else {"prompt": "x"}
    r = httpx.post(f"{server[1]}{path}", json={**base, field: value}, headers=_auth(), timeout=60)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == field and "not supported" in r.json()["error"]["message"]
    # The values clients send when they do not use the feature pass.
    defaults = {"tool_choice": "none", "response_format": {"type": "text"}, "presence_penalty": 0, "best_of": 1}
    if field in defaults:
        ok = httpx.post(f"{server[1]}{path}", json={**base, field: defaults[field]}, headers=_auth(), timeout=120)
        assert ok.status_code == 200, ok.text


def test_time_to_first_token_inter_token_latency_and_queue_depth_on_metrics(server, client):
    from prometheus_client.parser import text_string_to_metric_families

    label = httpx.get(f"{server[1]}/v1/policies/tiny", headers=_auth()).json()["metrics_label"]

    def value(name: str) -> float:
        text = httpx.get(f"{server[1]}/metrics", headers=_auth()).text
        samples = [s for family in text_string_to_metric_families(text) for s in family.samples]
        return sum(s.value for s in samples if s.name == name and s.labels.get("policy") == label)

    ttft, itl = (
        value("rmdistill_serving_time_to_first_token_seconds_count"),
        value("rmdistill_serving_inter_token_latency_seconds_count"),
    )
    chunks = list(client.completions.create(model="tiny", prompt="count", max_tokens=6, temperature=0, stream=True))
    texts = [c for c in chunks if c.choices and c.choices[0].text]
    assert value("rmdistill_serving_time_to_first_token_seconds_count") == ttft + 1
    assert value("rmdistill_serving_inter_token_latency_seconds_count") == itl + len(texts) - 1
    assert value("rmdistill_serving_time_to_first_token_seconds_sum") > 0
    assert value("rmdistill_serving_queue_depth") == 0


def test_an_idle_deployment_scales_to_zero_and_the_next_request_loads_the_policy_again(
    ray_cluster, tiny_llama, tmp_path
):
    """min_replicas 0: after `idle_s` without a request Serve removes the last replica, and every policy with it."""
    from ray import serve

    from service.settings import ServingSettings
    from tests.test_service import wait_for

    serving = ServingSettings(engine="hf", num_cpus=0.25, min_replicas=0, idle_s=2)
    with serving_service(ray_cluster, tmp_path, tiny_llama, [ALICE], serving) as running:
        name = running.app.state.serving.apps["hf"]

        def replicas() -> int:
            (deployment,) = serve.status().applications[name].deployments.values()
            return sum(n for state, n in deployment.replica_states.items() if state in ("STARTING", "RUNNING"))

        def complete() -> str:
            body = {"model": "tiny", "prompt": "idle", "max_tokens": 4, "temperature": 0}
            response = httpx.post(f"{running.url}/v1/completions", json=body, headers=_auth(), timeout=300)
            assert response.status_code == 200, response.text
            return response.json()["choices"][0]["text"]

        first = complete()
        assert replicas() == 1
        wait_for(lambda: replicas() == 0, 120, "the idle deployment to scale to zero")
        assert complete() == first  # a fresh replica loaded the policy again
        assert replicas() == 1


def test_an_api_that_does_not_deploy_attaches_to_the_applications_its_serve_config_deploys(
    ray_cluster, tiny_llama, tmp_path
):
    """RMDISTILL_SERVING_DEPLOY=false (a RayService owns serving): the applications come from `serve_config` through
    its import path, as Serve deploys a config; until they run the API answers 503 naming them, then serves."""
    from ray import serve
    from ray._common.utils import import_attr
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary

    from service.policy_app import serve_config
    from service.settings import ServingSettings

    serving = ServingSettings(engine="hf", num_cpus=0.25, deploy=False)
    (config,) = serve_config(serving)["applications"]
    with serving_service(ray_cluster, tmp_path, tiny_llama, [ALICE], serving) as running:
        body = {"model": "tiny", "prompt": "attach", "max_tokens": 3, "temperature": 0}
        missing = httpx.post(f"{running.url}/v1/completions", json=body, headers=_auth(), timeout=60)
        assert missing.status_code == 503 and config["name"] in missing.text and "not deployed" in missing.text
        assert config["name"] not in serve.status().applications  # it deployed nothing itself

        builder = import_attr(config["import_path"])
        serve.run(call_user_app_builder_with_args_if_necessary(builder, config["args"]), name=config["name"])
        served = httpx.post(f"{running.url}/v1/completions", json=body, headers=_auth(), timeout=300)
        assert served.status_code == 200, served.text
        assert served.json()["choices"][0]["text"]
