"""EleutherAI's lm-eval (from the package index) evaluates a served policy through its own OpenAI-compatible models:
`local-completions` for a log-likelihood (multiple-choice) task and a generation task, `local-chat-completions`
for the generation task as chat. The tasks are YAML files over local JSON lines: no hub, no download.

The numbers are checked against the policy computed here: each choice's log-likelihood teacher-forced on the same
tokens, and each generation against the service's own greedy answer.
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
import torch

from tests.support.serving import serving_service

pytestmark = [pytest.mark.ray, pytest.mark.slow]

TOKEN = "eval-token"
CHOICE_DOCS = [
    {"question": "The film was", "choices": ["good", "bad", "long"], "answer": 0},
    {"question": "A quiet evening with", "choices": ["friends", "rain", "a book"], "answer": 2},
    {"question": "The plot of the movie", "choices": ["dragged", "flew"], "answer": 1},
    {"question": "Critics called it", "choices": ["a triumph", "a mess", "fine"], "answer": 0},
]
GEN_PROMPTS = ["Review:", "The ending", "My verdict on the film", "One word:"]


@pytest.fixture(scope="module")
def server(ray_cluster, tiny_llama, tmp_path_factory):
    pytest.importorskip("lm_eval")
    from service.settings import ServingSettings

    serving = ServingSettings(engine="hf", num_cpus=0.5)
    with serving_service(ray_cluster, tmp_path_factory.mktemp("lm-eval-home"), tiny_llama, [TOKEN], serving) as running:
        yield running


def _auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKEN}"}


def _complete(server, **body) -> str:
    r = httpx.post(f"{server.url}/v1/completions", json={"model": "tiny", **body}, headers=_auth(), timeout=120)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def _write_tasks(folder: Path, targets: list[str], until: str) -> Path:
    """Two tasks over local JSON lines: `rmd_choice` (log-likelihood) and `rmd_generate` (generation, up to 6
    tokens, ending at ``until``)."""
    folder.mkdir(parents=True, exist_ok=True)
    choices, gens = folder / "choice.jsonl", folder / "generate.jsonl"
    choices.write_text("".join(json.dumps(d) + "\n" for d in CHOICE_DOCS))
    rows = [{"prompt": p, "target": t} for p, t in zip(GEN_PROMPTS, targets, strict=True)]
    gens.write_text("".join(json.dumps(row) + "\n" for row in rows))
    common = "dataset_path: json\ntest_split: test\n"
    (folder / "rmd_choice.yaml").write_text(
        f"task: rmd_choice\n{common}dataset_kwargs:\n  data_files:\n    test: {choices}\n"
        "output_type: multiple_choice\ndoc_to_text: '{{question}}'\ndoc_to_choice: choices\n"
        "doc_to_target: answer\nmetric_list:\n  - metric: acc\n"
    )
    (folder / "rmd_generate.yaml").write_text(
        f"task: rmd_generate\n{common}dataset_kwargs:\n  data_files:\n    test: {gens}\n"
        "output_type: generate_until\ndoc_to_text: '{{prompt}}'\ndoc_to_target: '{{target}}'\n"
        f"generation_kwargs:\n  until: [{json.dumps(until)}]\n  max_gen_toks: 6\n  do_sample: false\n  temperature: 0\n"
        "metric_list:\n  - metric: exact_match\n"
    )
    return folder


def _evaluate(model: str, base_url: str, tasks: list[str], folder: Path, tiny_llama: Path, **kwargs) -> dict:
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    model_args = {"model": "tiny", "base_url": base_url, "num_concurrent": 1, "max_retries": 1}
    if model == "local-completions":
        model_args |= {"tokenizer_backend": "huggingface", "tokenizer": str(tiny_llama)}
    return simple_evaluate(
        model=model,
        model_args=model_args,
        tasks=tasks,
        task_manager=TaskManager(include_path=str(folder), include_defaults=False),
        bootstrap_iters=0,
        log_samples=True,
        **kwargs,
    )


def _loglikelihood(model, tok, context: str, continuation: str) -> float:
    """lm-eval's split (trailing spaces of the context move to the continuation; the pair is encoded whole, without
    BOS, then cut where the context's tokens end), scored teacher-forced on the local copy of the policy."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tok(context + continuation, add_special_tokens=False)["input_ids"]
    cut = len(tok(context, add_special_tokens=False)["input_ids"])
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([whole])).logits[0, :-1].float(), -1)
    picked = logp.gather(-1, torch.tensor(whole[1:])[:, None])[:, 0]
    return float(picked[cut - 1 :].sum())


def test_lm_eval_scores_a_loglikelihood_and_a_generation_task_through_local_completions(
    server, tiny_llama, tmp_path, monkeypatch
):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.setenv("OPENAI_API_KEY", TOKEN)
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    # Half the targets are the policy's own greedy answers (the prompt sent as lm-eval sends it: token ids without
    # BOS, up to 6 tokens, stopping at a blank line or EOS): exact match is then 0.5 exactly.
    greedy = [
        _complete(
            server, prompt=[tok(p, add_special_tokens=False)["input_ids"]], max_tokens=6, temperature=0, stop=["\n\n"]
        )
        for p in GEN_PROMPTS
    ]
    targets = [greedy[0], "no such answer", greedy[2], "nor this one"]
    folder = _write_tasks(tmp_path / "tasks", targets, "\n\n")
    out = _evaluate(
        "local-completions", f"{server.url}/v1/completions", ["rmd_choice", "rmd_generate"], folder, tiny_llama
    )

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    samples = sorted(out["samples"]["rmd_choice"], key=lambda s: s["doc_id"])
    assert len(samples) == len(CHOICE_DOCS)
    correct = 0
    for doc, sample in zip(CHOICE_DOCS, samples, strict=True):
        served = [resp[0][0] for resp in sample["resps"]]
        expected = [_loglikelihood(model, tok, doc["question"], " " + c) for c in doc["choices"]]
        assert served == pytest.approx(expected, abs=1e-3)
        correct += max(range(len(expected)), key=expected.__getitem__) == doc["answer"]
    assert out["results"]["rmd_choice"]["acc,none"] == pytest.approx(correct / len(CHOICE_DOCS))

    generated = sorted(out["samples"]["rmd_generate"], key=lambda s: s["doc_id"])
    assert [s["resps"][0][0] for s in generated] == greedy
    assert out["results"]["rmd_generate"]["exact_match,none"] == pytest.approx(0.5)


def test_lm_eval_runs_the_generation_task_as_chat_through_local_chat_completions(
    server, tiny_llama, tmp_path, monkeypatch
):
    monkeypatch.setenv("OPENAI_API_KEY", TOKEN)
    chat = [
        httpx.post(
            f"{server.url}/v1/chat/completions",
            json={
                "model": "tiny",
                "messages": [{"role": "user", "content": p}],
                "max_tokens": 6,
                "temperature": 0,
                "stop": ["zq"],
            },
            headers=_auth(),
            timeout=120,
        ).json()["choices"][0]["message"]["content"]
        for p in GEN_PROMPTS
    ]
    assert all(chat), "empty greedy answers would make the exact-match check trivial"
    folder = _write_tasks(tmp_path / "tasks", [chat[0], chat[1], "no", "no"], "zq")
    out = _evaluate(
        "local-chat-completions",
        f"{server.url}/v1/chat/completions",
        ["rmd_generate"],
        folder,
        tiny_llama,
        apply_chat_template=True,
    )
    generated = sorted(out["samples"]["rmd_generate"], key=lambda s: s["doc_id"])
    assert [s["resps"][0][0] for s in generated] == chat
    assert out["results"]["rmd_generate"]["exact_match,none"] == pytest.approx(0.5)
