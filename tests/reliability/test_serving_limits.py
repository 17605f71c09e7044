"""Serving under abuse and load: a request's compute is capped before any model runs, log-probs hold one step of the
vocabulary at a time, one policy's stalled or broken load holds up no other policy and unloads nothing, and 200
concurrent generations all succeed.

Everything is real: uvicorn on a socket, the session's Ray cluster, policies on a Ray Serve deployment (transformers)
on the tiny random Llama.
The stalled checkpoint is a LoRA adapter whose weights file is a FIFO: the loader's open() blocks, as on a hung
network file system, until the test writes garbage into it, which the loader then fails to read as a checkpoint.
"""

from __future__ import annotations

import asyncio
import copy
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from service.engines import EngineUnavailableError, SamplingRequest
from service.serving_client import PolicyServing
from service.settings import ServingSettings
from tests.support.serving import serving_service

pytestmark = [pytest.mark.ray, pytest.mark.slow]

ALICE = "alice-token"
BUDGET = 64  # max_request_tokens of the service under test
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def server(ray_cluster, tiny_llama, tmp_path_factory):
    home = tmp_path_factory.mktemp("serving-limits")
    serving = ServingSettings(engine="hf", num_cpus=0.25)
    with serving_service(ray_cluster, home, tiny_llama, [ALICE], serving, max_request_tokens=BUDGET) as running:
        yield running


def _auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {ALICE}"}


def test_a_request_over_the_token_budget_is_400_naming_the_parameter_before_any_model_runs(server):
    from ray import serve

    url, app = server.url, server.app.state.serving.apps["hf"]
    over = [
        ("/v1/completions", {"model": "tiny", "prompt": ["a", "b", "c", "d"], "n": 4, "max_tokens": 8}, "max_tokens"),
        ("/v1/completions", {"model": "tiny", "prompt": "a", "n": 9, "max_tokens": 8, "stream": True}, "max_tokens"),
        (
            "/v1/chat/completions",
            {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "n": 3, "max_completion_tokens": 22},
            "max_completion_tokens",
        ),
        # No max_tokens given: chat's default of 256 is what would run.
        ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}, "max_tokens"),
        ("/v1/policies/tiny/generate", {"prompt": "a", "n": 16, "max_tokens": 5}, "max_tokens"),
    ]
    messages = []
    for path, body, param in over:
        r = httpx.post(f"{url}{path}", json=body, headers=_auth(), timeout=60)
        assert r.status_code == 400, (path, body, r.text)
        error = r.json()["error"]
        assert error["param"] == param and error["type"] == "invalid_request_error", error
        assert f"more than the {BUDGET} one request may ask for" in error["message"], error
        messages.append(error["message"])
    assert messages[0].startswith("max_tokens: prompts (4) × n (4) × max_tokens (8) = 128 tokens")
    # Refused before any model ran: the serving application was not even deployed for them.
    assert app not in serve.status().applications

    at_budget = {"model": "tiny", "prompt": ["a", "b", "c", "d"], "n": 2, "max_tokens": 8, "temperature": 0}
    r = httpx.post(f"{url}/v1/completions", json=at_budget, headers=_auth(), timeout=120)
    assert r.status_code == 200, r.text
    assert len(r.json()["choices"]) == 8
    assert serve.status().applications[app].status == "RUNNING"


# Run in a fresh interpreter so its peak resident memory (ru_maxrss) measures this generation and nothing before it.
_LOGPROB_MEMORY = r"""
import json, resource, sys
from pathlib import Path
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
from service.engines import SamplingRequest, Token
from service.hf_engine import HFBackend

source, folder = Path(sys.argv[1]), Path(sys.argv[2])
# The tiny Llama with a 65,536-token vocabulary: the output layer is what logits scale with.
config = LlamaConfig.from_pretrained(source)
config.vocab_size = 65536
torch.manual_seed(0)
LlamaForCausalLM(config).save_pretrained(folder)
AutoTokenizer.from_pretrained(source).save_pretrained(folder)
backend = HFBackend(folder, max_model_len=1024)
ids = backend.tokenizer("the movie was")["input_ids"]

def generate(request):
    samples = [[] for _ in range(request.n)]
    backend.run([(ids, request)], lambda i, e: samples[e.index].append(e) if isinstance(e, Token) else None)
    return samples

request = SamplingRequest(n=16, max_tokens=2, logprobs=0)
generate(request)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
request.max_tokens = 64
samples = generate(request)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
teacher = []
for sample in samples[:3]:
    full = torch.tensor([ids + [t.token_id for t in sample]])
    with torch.no_grad():
        logp = torch.log_softmax(backend.model(full).logits[0, :-1].float(), -1)
    teacher.append(logp[len(ids) - 1 :].gather(-1, full[0, len(ids) :, None])[:, 0].tolist())
print(json.dumps({
    "growth_mb": (after - before) / 1024,
    "lengths": [len(s) for s in samples],
    "logprobs": [[t.logprob for t in s] for s in samples[:3]],
    "teacher": teacher,
}))
"""


def test_logprobs_hold_one_step_of_the_vocabulary_not_every_generated_position(tiny_llama, tmp_path):
    # 16 rows x 64 steps x 65,536 logits are 268 MB per copy; keeping every step's logits (and their log-softmax)
    # until the end grew the peak by 745 MB, one step at a time grows it by about 1 MB.
    done = subprocess.run(
        [sys.executable, "-c", _LOGPROB_MEMORY, str(tiny_llama), str(tmp_path / "wide-vocab")],
        cwd=REPO,
        # Large blocks from mmap, returned on free: resident memory then tracks live tensors, not what glibc's heap
        # kept of earlier steps' (which varied by 10-200 MB from run to run).
        env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"\npeak RSS growth for n=16 x 64 tokens x 65,536-token vocab with logprobs: {out['growth_mb']:.0f} MB")
    assert max(out["lengths"]) == 64
    assert out["growth_mb"] < 64, out["growth_mb"]
    # Still the right numbers: each sampled token's log-prob under the policy, teacher-forced.
    for got, want in zip(out["logprobs"], out["teacher"], strict=True):
        assert got == pytest.approx(want, abs=1e-4)


def test_two_hundred_concurrent_generations_all_succeed(server, tiny_llama):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    prompts = [f"review {k}: " + "good " * (k % 7) for k in range(200)]

    async def one(http: httpx.AsyncClient, prompt: str) -> tuple[httpx.Response | Exception, float]:
        start = time.perf_counter()
        body = {"model": "tiny", "prompt": prompt, "max_tokens": 8, "temperature": 0}
        try:
            response: httpx.Response | Exception = await http.post("/v1/completions", json=body)
        except httpx.HTTPError as exc:  # counted as a failure, not raised: the figures report every request
            response = exc
        return response, time.perf_counter() - start

    async def run() -> tuple[list[tuple[httpx.Response | Exception, float]], float]:
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
        async with httpx.AsyncClient(base_url=server.url, headers=_auth(), timeout=300, limits=limits) as http:
            # Loaded first, so the figures are of serving, not of one model load.
            assert (await one(http, "warm up"))[0].status_code == 200
            start = time.perf_counter()
            results = await asyncio.gather(*(one(http, p) for p in prompts))
            return results, time.perf_counter() - start

    results, wall = asyncio.run(run())
    failed = [r for r, _ in results if isinstance(r, Exception) or r.status_code != 200]
    latencies = sorted(s for _, s in results)
    p50, p99 = statistics.median(latencies), statistics.quantiles(latencies, n=100)[98]
    print(
        f"\n200 concurrent completions (max_tokens 8, tiny Llama, hf engine): wall {wall:.1f} s, "
        f"{len(failed)} failed, p50 {p50:.2f} s, p99 {p99:.2f} s, max {latencies[-1]:.2f} s"
    )
    assert failed == []
    # Each answer is its own prompt's: batching 200 requests together mixes none of them up.
    assert [r.json()["usage"]["prompt_tokens"] for r, _ in results] == [len(tok(p)["input_ids"]) for p in prompts]


# ------------------------------------------------------------------------------------------------- load isolation
@pytest.fixture
def stalled_policy(tiny_llama, tmp_path) -> Iterator[Path]:
    """A LoRA adapter on the tiny Llama whose weights file is a FIFO: loading it blocks until `_break` writes."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    folder = tmp_path / "stalled"
    base = AutoModelForCausalLM.from_pretrained(tiny_llama)
    get_peft_model(copy.deepcopy(base), LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(folder)
    (folder / "rmdistill.json").write_text(json.dumps({"base_model": str(tiny_llama)}))
    weights = folder / "adapter_model.safetensors"
    weights.unlink()
    os.mkfifo(weights)
    yield folder
    _break(folder)  # a loader still waiting (a failed test) is let go


def _break(folder: Path) -> bool:
    """Feed the stalled loader a corrupt checkpoint, if it is waiting on it; whether it was."""
    try:
        fd = os.open(folder / "adapter_model.safetensors", os.O_WRONLY | os.O_NONBLOCK)
    except OSError:  # ENXIO: nobody has it open for reading yet
        return False
    try:
        os.write(fd, b"not a checkpoint")
    except BrokenPipeError:
        pass  # the loader opened the weights and closed them before this write: it was let go and fails anyway
    finally:
        os.close(fd)
    return True


async def _break_once_stalled(folder: Path, load: asyncio.Task, timeout_s: float = 300) -> None:
    """Wait until the loader is blocked reading the weights (its actor has got that far), then break it."""
    deadline = time.monotonic() + timeout_s
    while not _break(folder):
        assert not load.done(), "the stalled load ended before reaching its weights"
        assert time.monotonic() < deadline, "the loader never opened its weights"
        await asyncio.sleep(0.2)


GREEDY = SamplingRequest(prompt="the movie was", max_tokens=4, temperature=0)


async def _held(serving: PolicyServing) -> dict:
    [replica] = await serving.replicas()
    return replica


def test_a_stalled_load_holds_up_no_other_policy(ray_cluster, tiny_llama, stalled_policy):
    async def scenario() -> None:
        serving = PolicyServing(ServingSettings(engine="hf", num_cpus=0.25, max_policies_per_replica=3))
        try:
            first = await serving.generate("b", str(tiny_llama), GREEDY)
            stalled = asyncio.create_task(serving.generate("a", str(stalled_policy), GREEDY))
            await asyncio.sleep(1)
            # Loaded b answers, and c loads on the same replica, while a's load hangs; c's two requests share a load.
            b, c1, c2 = await asyncio.wait_for(
                asyncio.gather(
                    serving.generate("b", str(tiny_llama), GREEDY),
                    serving.generate("c", str(tiny_llama), GREEDY),
                    serving.generate("c", str(tiny_llama), GREEDY),
                ),
                timeout=180,
            )
            assert not stalled.done()
            assert b.samples[0].text == c1.samples[0].text == c2.samples[0].text == first.samples[0].text
            held = await _held(serving)
            assert held["loads"] == 2 and sorted(held["policies"]) == ["b", "c"]
            await _break_once_stalled(stalled_policy, stalled)
            with pytest.raises(EngineUnavailableError, match="could not load policy 'a'"):
                await stalled
            held = await _held(serving)
            assert held["loads"] == 2 and sorted(held["policies"]) == ["b", "c"]
        finally:
            await serving.shutdown(delete=True)

    asyncio.run(scenario())


def test_a_stalled_or_failed_replacement_unloads_nothing(ray_cluster, tiny_llama, stalled_policy):
    """With room for one policy, the held one serves while its replacement's folder is stalled, and stays when
    that load fails. (Serve unloads the least recently used policy once a load itself starts, not after it ends.)"""

    async def scenario() -> None:
        serving = PolicyServing(ServingSettings(engine="hf", num_cpus=0.25, max_policies_per_replica=1))
        try:
            first = await serving.generate("old", str(tiny_llama), GREEDY)
            replica = (await _held(serving))["replica"]
            stalled = asyncio.create_task(serving.generate("new", str(stalled_policy), GREEDY))
            await asyncio.sleep(1)
            during = await asyncio.wait_for(serving.generate("old", str(tiny_llama), GREEDY), timeout=60)
            assert during.samples[0].text == first.samples[0].text
            held = await _held(serving)
            assert (held["replica"], held["policies"], held["loads"]) == (replica, ["old"], 1)
            await _break_once_stalled(stalled_policy, stalled)
            with pytest.raises(EngineUnavailableError):
                await stalled
            held = await _held(serving)
            assert (held["replica"], held["policies"], held["loads"]) == (replica, ["old"], 1)

            replacement = await serving.generate("other", str(tiny_llama), GREEDY)
            assert replacement.samples[0].text == first.samples[0].text
            held = await _held(serving)
            assert (held["policies"], held["loads"]) == (["other"], 2)
        finally:
            await serving.shutdown(delete=True)

    asyncio.run(scenario())
