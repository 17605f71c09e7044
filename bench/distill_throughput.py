"""Distillation throughput: our `train_loop` against a naive Hugging Face DPO loop on the same work.

The naive loop is what a first implementation does: policy and reference both in memory, the reference's
log-probs recomputed every step, full-vocabulary log-softmax over every position. Ours holds only the policy
(reference log-probs precomputed in the pairs) and computes logits only at response positions. TRL is not
installed on these machines, so TRL's DPOTrainer is not in the table (DESIGN/ENV.md quote its H100 figures).

    python bench/distill_throughput.py [--models tiny smollm2] [--pairs 16] [--steps 3] [--device cpu]

Random-init models (no download): the tiny test Llama's shape and SmolLM2-135M's config (30 layers, hidden 576).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ray_jobs.distill.loop import DistillTask, train_policy
from ray_jobs.layout import PAIRS
from ray_jobs.models.logps import tokenize_responses
from ray_jobs.models.tiny import TINY_LLAMA_SHAPE, build_llama, build_llama_tokenizer
from ray_jobs.spec import DistillSpec

SHAPES = {
    "tiny": {**TINY_LLAMA_SHAPE, "max_position_embeddings": 512},
    "smollm2": dict(
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        vocab_size=49152,
        max_position_embeddings=512,
    ),
}


def build_model(name: str, out: Path) -> None:
    build_llama(out, seed=0, **SHAPES[name])


def _text_of_tokens(tokenizer, rng: np.random.Generator, n: int) -> str:
    """A string that tokenizes to about n tokens: decoded random non-special ids."""
    ids = rng.integers(len(tokenizer.all_special_ids) + 1, len(tokenizer), size=n).tolist()
    return tokenizer.decode(ids)


def write_pairs(tokenizer, path: Path, pairs: int, prompt_tokens: int, response_tokens: int) -> None:
    rng = np.random.default_rng(0)
    df = pd.DataFrame(
        {
            "prompt": [_text_of_tokens(tokenizer, rng, prompt_tokens) for _ in range(pairs)],
            "response_a": [_text_of_tokens(tokenizer, rng, response_tokens) for _ in range(pairs)],
            "response_b": [_text_of_tokens(tokenizer, rng, response_tokens) for _ in range(pairs)],
            "source": "dataset",
            "label": pd.array([1] * pairs, dtype="Int8"),
            "ref_logp_a": rng.normal(-300, 10, pairs),
            "ref_logp_b": rng.normal(-300, 10, pairs),
            "rewards_a": [[0.0]] * pairs,
            "rewards_b": [[0.0]] * pairs,
        }
    )
    PAIRS.write(df, path)


def ours(model_dir: Path, pairs_path: Path, pairs: int, steps: int, device: str) -> tuple[float, float]:
    """Pairs/s and tokens/s over the second half of 2·steps full-batch DPO steps (the first half warms up)."""
    spec = DistillSpec(
        loss="dpo",
        beta=0.1,
        batch_size=pairs,
        max_steps=2 * steps,
        log_every=steps,
        max_length=512,
        use_gpu=device == "cuda",
    )
    metrics = train_policy(DistillTask(str(model_dir), spec, pairs=str(pairs_path), ref_samples=""))
    return metrics["pairs_per_s"], metrics["tokens_per_s"]


def _naive_logps(model, input_ids, attention_mask, response_mask) -> torch.Tensor:
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1]
    logp = logits.float().log_softmax(-1)  # the full [B, T, V] tensor, as a first implementation writes it
    token = logp.gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    return (token * response_mask[:, 1:]).sum(-1)


def naive(model_dir: Path, pairs_path: Path, pairs: int, steps: int, device: str) -> tuple[float, float]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    policy = AutoModelForCausalLM.from_pretrained(model_dir).to(device).train()
    reference = AutoModelForCausalLM.from_pretrained(model_dir).to(device).eval()
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-6)
    df = pd.read_parquet(pairs_path).iloc[:pairs]
    prompts = df["prompt"].tolist() * 2
    enc = tokenize_responses(tokenizer, prompts, df["response_a"].tolist() + df["response_b"].tolist(), 512)
    batch = [enc[k].to(device) for k in ("input_ids", "attention_mask", "response_mask")]
    tokens = int(enc["attention_mask"].sum())
    elapsed = 0.0
    for step in range(2 * steps):
        t0 = time.perf_counter()
        logps = _naive_logps(policy, *batch)
        with torch.no_grad():
            ref = _naive_logps(reference, *batch)
        h = (logps[:pairs] - ref[:pairs]) - (logps[pairs:] - ref[pairs:])
        loss = -torch.nn.functional.logsigmoid(0.1 * h).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        if step >= steps:
            elapsed += time.perf_counter() - t0
    return pairs * steps / elapsed, tokens * steps / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["tiny", "smollm2"], choices=sorted(SHAPES))
    parser.add_argument("--pairs", type=int, default=16)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--response-tokens", type=int, default=64)
    parser.add_argument("--steps", type=int, default=3, help="timed steps (after as many warm-up steps)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            model_dir = Path(tmp) / name
            build_model(name, model_dir)
            pairs_path = Path(tmp) / f"{name}.parquet"
            write_pairs(build_llama_tokenizer(), pairs_path, args.pairs, args.prompt_tokens, args.response_tokens)
            for loop, fn in (("rmdistill train_loop", ours), ("naive HF loop", naive)):
                pairs_s, tokens_s = fn(model_dir, pairs_path, args.pairs, args.steps, args.device)
                rows.append((name, loop, pairs_s, tokens_s))
                print(f"{name} {loop}: {pairs_s:.2f} pairs/s, {tokens_s:.0f} tokens/s", flush=True)
    print(
        f"\n{args.pairs} pairs of {args.prompt_tokens}+{args.response_tokens} tokens, device {args.device}, "
        f"torch threads {torch.get_num_threads()} (TRL is not installed here)"
    )
    print("| model | loop | pairs/s | tokens/s |\n|---|---|---:|---:|")
    for name, loop, pairs_s, tokens_s in rows:
        print(f"| {name} | {loop} | {pairs_s:.2f} | {tokens_s:.0f} |")


if __name__ == "__main__":
    main()
