"""Generation and scoring throughput: vLLM vs transformers on builtin:smollm2-135m, and ensemble scoring pairs/s.

Generation runs each engine in this process (the same predictor classes the Ray Data actors use), one thread each
(a generation actor holds one CPU), and times only generation: the engine is built and warmed up first.
Scoring runs the stage's own Ray Data actor pools for a 3-member builtin:minilm-l6 ensemble (untrained heads: the
speed does not depend on the weights), end to end including actor start and model loading.

    .venv/bin/python bench/generation.py [--max-new-tokens 32] [--batch-sizes 1,8,32,64] [--pairs 256]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

MOVIES = ["a space opera", "a silent comedy", "a courtroom drama", "a heist film", "a horror sequel", "a musical"]


def _prompts(tokenizer, count: int) -> list[str]:
    from ray_jobs.models.prompts import render_prompt

    return [
        render_prompt(tokenizer, [{"role": "user", "content": f"Write a short review of {MOVIES[i % len(MOVIES)]}."}])
        for i in range(count)
    ]


def bench_generation(batch_sizes: list[int], max_new_tokens: int) -> list[tuple[str, int, int, float]]:
    import torch

    from ray_jobs.generate.engines import HFPredictor, VLLMPredictor
    from ray_jobs.models.registry import load_tokenizer, resolve_model_path
    from ray_jobs.spec import GenerationSpec

    torch.set_num_threads(1)
    model = str(resolve_model_path("builtin:smollm2-135m"))
    prompts = _prompts(load_tokenizer(model), max(batch_sizes))
    gen = GenerationSpec(max_new_tokens=max_new_tokens, temperature=1.0, top_p=1.0, seed=0, max_model_len=512)
    rows = []
    engines = {
        "transformers": lambda: HFPredictor(model, 1, gen),
        "vllm": lambda: VLLMPredictor(model, 1, gen),
    }
    for name, build in engines.items():
        started = time.perf_counter()
        predictor = build()
        predictor({"index": [0], "prompt": prompts[:1]})  # warm-up
        print(f"{name}: ready in {time.perf_counter() - started:.1f} s", flush=True)
        for size in batch_sizes:
            if name == "transformers":
                predictor.gen = gen.model_copy(update={"batch_size": size})
            started = time.perf_counter()
            out = predictor({"index": list(range(size)), "prompt": prompts[:size]})
            elapsed = time.perf_counter() - started
            tokens = int(sum(sum(c) for c in out["num_tokens"]))
            rows.append((name, size, tokens, tokens / elapsed))
            print(f"  {name} batch {size}: {tokens} tokens in {elapsed:.1f} s", flush=True)
        del predictor
    return rows


def bench_scoring(num_pairs: int, replicas: list[int]) -> list[tuple[int, float, float]]:
    import torch

    from ray_jobs.models.registry import load_reward_model
    from ray_jobs.score.scorer import score_texts

    texts = [
        (f"Review {MOVIES[i % len(MOVIES)]} #{i}:", f" It was {'great' if i % 2 else 'dull'} " * 8, True)
        for i in range(2 * num_pairs)
    ]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        members = []
        for k in range(3):
            torch.manual_seed(k)
            model, tokenizer = load_reward_model("builtin:minilm-l6")
            members.append(Path(tmp) / f"member-{k}")
            model.save_pretrained(members[-1])
            tokenizer.save_pretrained(members[-1])
        for r in replicas:
            started = time.perf_counter()
            score_texts(
                None,
                [(str(m), 256) for m in members],
                texts,
                [True] * len(texts),
                ref_max_length=256,
                batch_size=32,
                replicas=r,
            )
            elapsed = time.perf_counter() - started
            rows.append((r, elapsed, num_pairs / elapsed))
            print(f"  scoring, {r} replica(s): {num_pairs} pairs x 3 members in {elapsed:.1f} s", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", default="1,8,32,64")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--pairs", type=int, default=256)
    parser.add_argument("--replicas", default="1,2")
    args = parser.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

    gen = bench_generation([int(b) for b in args.batch_sizes.split(",")], args.max_new_tokens)
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        scoring = bench_scoring(args.pairs, [int(r) for r in args.replicas.split(",")])
    finally:
        ray.shutdown()

    print(f"\nGeneration, builtin:smollm2-135m, {args.max_new_tokens} new tokens per prompt, 1 thread per engine")
    print("| batch | transformers tok/s | vLLM tok/s | vLLM / transformers |")
    print("|---:|---:|---:|---:|")
    by = {(name, size): rate for name, size, _, rate in gen}
    for size in sorted({s for _, s, _, _ in gen}):
        hf, vl = by.get(("transformers", size)), by.get(("vllm", size))
        print(f"| {size} | {hf:.1f} | {vl:.1f} | {vl / hf:.2f}x |")
    print(f"\nScoring, 3 x builtin:minilm-l6 members, {args.pairs} pairs (Ray Data actor pools, end to end)")
    print("| replicas | seconds | pairs/s |")
    print("|---:|---:|---:|")
    for r, elapsed, rate in scoring:
        print(f"| {r} | {elapsed:.1f} | {rate:.1f} |")


if __name__ == "__main__":
    main()
