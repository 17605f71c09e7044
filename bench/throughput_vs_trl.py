"""Distillation step throughput: rmdistill's `train_policy` against TRL's `DPOTrainer` on the same work.

Same model (random init, no download), same pairs, batch, learning rate, optimizer (AdamW) and precision for every
arm. TRL runs at its defaults (the reference model's forward every step) and at its fastest settings
(`precompute_ref_log_probs=True`, which like rmdistill's score stage moves π_ref out of the step). Each arm runs
in its own process, arms alternate within each repetition so machine load hits them alike, and only the steps
after `--warmup` are timed. TRL is a bench-only peer (`pip install -e .[bench]`), never a runtime dependency.

    python bench/throughput_vs_trl.py [--models tiny smollm2] [--pairs 8] [--repeats 3] [--device cpu]
    python bench/throughput_vs_trl.py --real <job>/score/pairs.parquet   # SmolLM2-135M on a job's pairs

Rows: the tiny test Llama, SmolLM2-135M's shape, and on a GPU a ~0.4B Llama config (`llama-0.4b`), with model
FLOPs utilisation 6·params·tokens / time / `--peak-tflops`. With `--real`, SmolLM2-135M trains on the prompts and
responses of a job's scored pairs (chat-template prompts, responses of varying length: padding and prompt sharing
are part of what is measured).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from ray_jobs.models.registry import load_tokenizer
from ray_jobs.models.tiny import TINY_LLAMA_SHAPE, build_llama, build_llama_tokenizer

SHAPES: dict[str, dict[str, int]] = {
    "tiny": {**TINY_LLAMA_SHAPE, "max_position_embeddings": 1024},
    "smollm2": dict(
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        vocab_size=49152,
        max_position_embeddings=1024,
    ),
    "llama-0.4b": dict(
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=24,
        num_attention_heads=16,
        num_key_value_heads=8,
        vocab_size=49152,
        max_position_embeddings=1024,
    ),
}
ARMS = ("rmdistill dpo", "rmdistill e-dpo K=4", "TRL fastest", "TRL defaults")
PEER = "TRL fastest"
MEMBERS = 4
LR = 1e-6


def _text_of_tokens(tokenizer: Any, rng: np.random.Generator, n: int) -> str:
    """A string of about n tokens: random non-special ids, decoded."""
    ids = rng.integers(len(tokenizer.all_special_ids) + 1, len(tokenizer), size=n).tolist()
    return tokenizer.decode(ids)


def synthetic_pairs(tokenizer: Any, args: argparse.Namespace) -> pd.DataFrame:
    """Eight batches of random texts of the requested token lengths."""
    rng = np.random.default_rng(0)
    n, prompt, response = 8 * args.pairs, args.prompt_tokens, args.response_tokens
    return pd.DataFrame(
        {
            "prompt": [_text_of_tokens(tokenizer, rng, prompt) for _ in range(n)],
            "response_a": [_text_of_tokens(tokenizer, rng, response) for _ in range(n)],
            "response_b": [_text_of_tokens(tokenizer, rng, response) for _ in range(n)],
        }
    )


def real_pairs(path: str, pairs: int) -> pd.DataFrame:
    """Eight batches of a job's scored pairs: real prompts and responses, as a user's job trains on."""
    df = pd.read_parquet(path, columns=["prompt", "response_a", "response_b"])
    return df.iloc[: pairs * 8].reset_index(drop=True)


def write_scored(texts: pd.DataFrame, tokenizer: Any, out: Path) -> None:
    """The pairs as the score stage writes them; π_ref's log-probs and rewards are placeholders (speed only)."""
    from ray_jobs.layout import PAIRS
    from ray_jobs.score.tokens import encode_pairs

    rng = np.random.default_rng(1)
    n = len(texts)
    df = texts.assign(
        source="dataset",
        label=pd.array([1] * n, dtype="Int8"),
        ended_a=True,
        ended_b=True,
        ref_logp_a=rng.normal(-300, 10, n),
        ref_logp_b=rng.normal(-300, 10, n),
        rewards_a=list(rng.normal(size=(n, MEMBERS))),
        rewards_b=list(rng.normal(size=(n, MEMBERS))),
    )
    PAIRS.write(encode_pairs(df, tokenizer), out)


def _peak_memory_mb(device: str) -> float:
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_ours(args: argparse.Namespace, loss: str) -> dict[str, float]:
    from ray_jobs.distill.loop import DistillTask, train_policy
    from ray_jobs.spec import DistillSpec

    spec = DistillSpec(
        loss=loss,
        family="min",
        beta=0.1,
        lr=LR,
        batch_size=args.pairs,
        max_steps=args.warmup + args.steps,
        log_every=args.warmup,  # the last window then holds exactly the timed steps
        max_length=args.max_length,
        precision=args.precision,
        compile=args.compile,
        use_gpu=args.device == "cuda",
    )
    with tempfile.TemporaryDirectory() as logs:
        task = DistillTask(args.model, spec, pairs=args.data, ref_samples="", log_dir=logs)
        metrics = train_policy(task)
    return {"pairs_per_s": metrics["pairs_per_s"], "tokens_per_s": metrics["tokens_per_s"]}


def run_trl(args: argparse.Namespace, fastest: bool) -> dict[str, float]:
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    class StepClock(TrainerCallback):
        """Wall time from the end of the last warm-up step to the end of the last step."""

        def __init__(self) -> None:
            self.marks: list[float] = []

        def on_step_end(self, *_: Any, **__: Any) -> None:
            if args.device == "cuda":
                torch.cuda.synchronize()
            self.marks.append(time.perf_counter())

    df = pd.read_parquet(args.data)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    data = Dataset.from_dict(
        {"prompt": df["prompt"].tolist(), "chosen": df["response_a"].tolist(), "rejected": df["response_b"].tolist()}
    )
    clock = StepClock()
    with tempfile.TemporaryDirectory() as out:
        config = DPOConfig(
            output_dir=out,
            per_device_train_batch_size=args.pairs,
            max_steps=args.warmup + args.steps,
            learning_rate=LR,
            lr_scheduler_type="constant",
            beta=0.1,
            max_length=args.max_length,
            precompute_ref_log_probs=fastest,
            use_cpu=args.device == "cpu",
            bf16=args.precision == "bf16",
            torch_compile=args.compile and fastest,
            report_to=[],
            save_strategy="no",
            logging_steps=10**6,
            disable_tqdm=True,
            dataloader_drop_last=True,
            seed=0,
        )
        trainer = DPOTrainer(model=args.model, args=config, train_dataset=data, processing_class=tokenizer)
        trainer.add_callback(clock)
        trainer.train()
    seconds = clock.marks[-1] - clock.marks[args.warmup - 1]
    return {"pairs_per_s": args.pairs * args.steps / seconds, "tokens_per_s": float("nan")}


def worker(args: argparse.Namespace) -> None:
    """One arm in this process; prints one JSON line."""
    torch.manual_seed(0)
    if args.arm.startswith("rmdistill"):
        result = run_ours(args, "e-dpo" if "e-dpo" in args.arm else "dpo")
    else:
        result = run_trl(args, fastest=args.arm == "TRL fastest")
    result["peak_mb"] = _peak_memory_mb(args.device)
    print("RESULT " + json.dumps(result), flush=True)


def _spawn(args: argparse.Namespace, arm: str, model: Path, data: Path) -> dict[str, float]:
    command = [sys.executable, __file__, "--worker", "--arm", arm, "--model", str(model), "--data", str(data)]
    for flag in ("pairs", "warmup", "steps", "max_length", "device", "precision"):
        command += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    if args.compile:
        command.append("--compile")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise RuntimeError(f"{arm} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT ") :])


def _params(model: Path) -> int:
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        net = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model))
    return sum(p.numel() for p in net.parameters())


def _mfu(params: int, tokens_per_s: float, peak_tflops: float) -> str:
    """Model FLOPs utilisation: 6·N FLOPs per trained token (forward + backward), over the device's peak."""
    return f"{6 * params * tokens_per_s / (peak_tflops * 1e12):.1%}"


def _spread(values: list[float]) -> str:
    return f"{min(values):.2f} / {statistics.median(values):.2f} / {max(values):.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["tiny", "smollm2"], choices=sorted(SHAPES))
    parser.add_argument("--pairs", type=int, default=8, help="pairs per optimizer step (one micro-batch)")
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--response-tokens", type=int, default=64)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--steps", type=int, default=4, help="timed steps")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    parser.add_argument("--real", help="a job's score/pairs.parquet: train on its texts instead of random ones")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--compile", action="store_true", help="torch.compile in both (TRL: fastest arm only)")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="the GPU's dense bf16 peak, for MFU")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--arm", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    results: dict[tuple[str, str], list[dict[str, float]]] = {}
    params: dict[str, int] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in ["smollm2 (real pairs)"] if args.real else args.models:
            if args.real:
                # SmolLM2-135M itself: its tokenizer reads the chat-template prompts as the job did.
                from ray_jobs.models.registry import resolve_model_path

                model = Path(resolve_model_path("builtin:smollm2-135m"))
                texts = real_pairs(args.real, args.pairs)
            else:
                model = Path(tmp) / name
                build_llama(model, seed=0, **SHAPES[name])
                texts = synthetic_pairs(build_llama_tokenizer(), args)
            params[name] = _params(model)
            data = Path(tmp) / "pairs.parquet"
            write_scored(texts, load_tokenizer(str(model)), data)
            for repeat in range(args.repeats):
                # Rotate the order so no arm always runs first (or last) in a repetition.
                for arm in args.arms[repeat % len(args.arms) :] + args.arms[: repeat % len(args.arms)]:
                    result = _spawn(args, arm, model, data)
                    results.setdefault((name, arm), []).append(result)
                    line = f"{name} {arm} #{repeat}: {result['pairs_per_s']:.3f} pairs/s"
                    if args.device == "cuda":
                        # Per run as well as in the closing table, so a run cut off by a time limit still has it.
                        line += f", MFU {_mfu(params[name], result['tokens_per_s'], args.peak_tflops)}"
                    print(line, flush=True)
    tokens = "real job pairs" if args.real else f"{args.prompt_tokens}+{args.response_tokens} tokens"
    print(
        f"\n{args.pairs} pairs/step of {tokens}, {args.device}, {args.precision}, compile={args.compile}, "
        f"{args.steps} timed steps after {args.warmup}, {args.repeats} repetitions, "
        f"torch {torch.__version__}, {os.cpu_count()} CPUs"
    )
    mfu = args.device == "cuda"
    print(
        "| model | arm | pairs/s min / median / max | × TRL fastest (min / median / max) | peak MB |"
        + (" MFU |" if mfu else "")
    )
    print("|---|---|---:|---:|---:|" + ("---:|" if mfu else ""))
    for (name, arm), runs in results.items():
        rates = [r["pairs_per_s"] for r in runs]
        peer = [r["pairs_per_s"] for r in results.get((name, PEER), [])]
        ratio = _spread([a / b for a, b in zip(rates, peer, strict=False)]) if peer else "–"
        row = f"| {name} | {arm} | {_spread(rates)} | {ratio} | {max(r['peak_mb'] for r in runs):.0f} |"
        if mfu:
            tokens_s = statistics.median(r["tokens_per_s"] for r in runs)
            row += f" {_mfu(params[name], tokens_s, args.peak_tflops)} |"
        print(row)


if __name__ == "__main__":
    main()
