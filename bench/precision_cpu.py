"""bf16 autocast against fp32 on the CPU, on the same distillation: does it train the same, and how much faster?

    python bench/precision_cpu.py <job folder> --steps 30

Takes a finished job's scored pairs (its score/pairs.parquet and its spec's distill section) and trains the policy
from π_ref twice, once per precision, on the same batches in the same order. Each arm gets π_ref's log-probs
recomputed under its own precision, as the score stage does (`ray_jobs.precision`), so both start at h = 0.
Prints each step's loss under both, their difference, and each arm's pairs/s over the steps after the first;
--json writes the rows. What `distill.precision: auto` picks on a CPU rests on this table (docs/RESULTS.md).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

PRECISIONS = ("fp32", "bf16")


def rescore(pairs: pd.DataFrame, spec: Any, precision: str) -> pd.DataFrame:
    """The pairs with π_ref's log-probs recomputed under `precision` by the score stage's own actor class."""
    from ray_jobs.score.scorer import Scorer

    scorer = Scorer(spec.reference, [], spec.distill.max_length, spec.score.batch_size, ref_precision=precision)
    n = len(pairs)
    ref = scorer(
        {
            "index": np.arange(2 * n),
            "prompt": np.array(pairs["prompt"].tolist() * 2, dtype=object),
            "response": np.array(pairs["response_a"].tolist() + pairs["response_b"].tolist(), dtype=object),
            "ended": np.array(pairs["ended_a"].tolist() + pairs["ended_b"].tolist()),
            "reward": np.zeros(2 * n, dtype=bool),
        }
    )["ref_logp"]
    return pairs.assign(ref_logp_a=ref[:n], ref_logp_b=ref[n:])


def train(spec: Any, pairs: Path, precision: str, steps: int, logs: Path) -> list[dict[str, Any]]:
    from ray_jobs.distill.loop import DistillTask, train_policy
    from ray_jobs.events import read_events

    distill = spec.distill.model_copy(update={"precision": precision, "max_steps": steps, "log_every": 1})
    train_policy(DistillTask(spec.reference, distill, pairs=str(pairs), ref_samples="", log_dir=str(logs)))
    return [e for e in read_events(logs) if e["kind"] == "metrics"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("job", type=Path, help="a finished job's folder (spec.json, score/pairs.parquet)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    from ray_jobs.spec import JobSpec

    spec = JobSpec.model_validate_json((args.job / "spec.json").read_text())
    scored = pd.read_parquet(args.job / "score" / "pairs.parquet")
    runs: dict[str, list[dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for precision in PRECISIONS:
            path = Path(tmp) / f"pairs-{precision}.parquet"
            rescore(scored, spec, precision).to_parquet(path)
            runs[precision] = train(spec, path, precision, args.steps, Path(tmp) / f"logs-{precision}")

    loss = {p: np.array([e["values"]["loss"] for e in runs[p]]) for p in PRECISIONS}
    rate = {p: statistics.median(e["values"]["pairs_per_s"] for e in runs[p][1:]) for p in PRECISIONS}
    print(
        f"{args.job.name}: {len(scored)} pairs, {spec.distill.loss}, batch {spec.distill.batch_size}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    print("| step | loss fp32 | loss bf16 | bf16 − fp32 |\n|---:|---:|---:|---:|")
    for i, (a, b) in enumerate(zip(loss["fp32"], loss["bf16"], strict=True), start=1):
        print(f"| {i} | {a:.4f} | {b:.4f} | {b - a:+.4f} |")
    gap = np.abs(loss["bf16"] - loss["fp32"])
    print(
        f"\nmean loss fp32 {loss['fp32'].mean():.4f}, bf16 {loss['bf16'].mean():.4f}; "
        f"|bf16 − fp32| per step: median {np.median(gap):.4f}, max {gap.max():.4f}\n"
        f"pairs/s (median over steps 2–{args.steps}): fp32 {rate['fp32']:.2f}, bf16 {rate['bf16']:.2f} "
        f"({rate['bf16'] / rate['fp32']:.2f}×)"
    )
    if args.json:
        args.json.write_text(json.dumps({"loss": {p: v.tolist() for p, v in loss.items()}, "pairs_per_s": rate}))


if __name__ == "__main__":
    main()
