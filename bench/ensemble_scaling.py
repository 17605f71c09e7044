"""Ensemble scaling: wall time of K ∈ {1, 2, 4} reward models fitted concurrently (Tune trials side by side) versus
one after another (max_concurrent=1), with builtin:minilm-l6 on the Reddit TL;DR comparisons from ../shared/data,
split by post; prints each member's held-out accuracy on the TL;DR test posts.

    .venv/bin/python bench/ensemble_scaling.py --train-pairs 96 --test-pairs 64 --epochs 1 --max-length 128

On a machine with C CPUs, concurrent members each get (C - K·0.1)/K CPUs per worker and sequential members the whole
machine, so the comparison is "same hardware, same total work" rather than "same per-member resources".
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import pandas as pd

from ray_jobs.data.split import split_by_prompt
from ray_jobs.ensemble.stage import TRIAL_CPUS
from ray_jobs.ensemble.stage import run as run_ensemble
from ray_jobs.events import EventLog
from ray_jobs.spec import JobSpec

TLDR = Path(__file__).resolve().parents[2] / "shared" / "data" / "tldr" / "google_text_small_preference_dataset.jsonl"


def tldr_splits(train_pairs: int, test_pairs: int, seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Normal-form rows (label 1 = candidate_0 preferred), split by post so no post is on both sides."""
    rows = [json.loads(line) for line in TLDR.read_text().splitlines() if line.strip()]
    frame = pd.DataFrame(
        {
            "prompt": [r["input_text"] for r in rows],
            "response_a": [r["candidate_0"] for r in rows],
            "response_b": [r["candidate_1"] for r in rows],
            "label": [1 if r["choice"] == 0 else 0 for r in rows],
        }
    ).astype({"label": "Int8"})
    is_test = pd.Series(split_by_prompt(frame["prompt"].tolist(), test_fraction=0.2, seed=seed))
    train = frame[~is_test].sample(frac=1.0, random_state=seed).head(train_pairs)
    test = frame[is_test].sample(frac=1.0, random_state=seed).head(test_pairs)
    return train.reset_index(drop=True), test.reset_index(drop=True)


def run(k: int, concurrent: bool, data: tuple[pd.DataFrame, pd.DataFrame], args: argparse.Namespace) -> dict:
    import ray

    cpus = ray.cluster_resources()["CPU"]
    per_worker = (cpus - k * TRIAL_CPUS) / k if concurrent else cpus - TRIAL_CPUS
    spec = JobSpec.model_validate(
        {
            "ensemble": {
                "size": k,
                "backbone": "builtin:minilm-l6",
                "diversity": "bootstrap",
                "epochs": args.epochs,
                "lr": 5e-5,
                "batch_size": 16,
                "max_length": args.max_length,
                "cpus_per_worker": round(per_worker, 2),
                "max_concurrent": k if concurrent else 1,
            }
        }
    )
    with tempfile.TemporaryDirectory(prefix="ens-bench-") as tmp:
        job = Path(tmp)
        (job / "data").mkdir()
        data[0].to_parquet(job / "data" / "train.parquet")
        data[1].to_parquet(job / "data" / "test.parquet")
        start = time.perf_counter()
        summary = run_ensemble(spec, job, EventLog(job))
        wall = time.perf_counter() - start
    return {"K": k, "mode": "concurrent" if concurrent else "sequential", "wall_s": wall, **summary}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1,2,4")
    parser.add_argument("--train-pairs", type=int, default=96)
    parser.add_argument("--test-pairs", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--max-length", type=int, default=128)
    args = parser.parse_args()
    import ray

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    ray.init(address="local", include_dashboard=False, log_to_driver=False, configure_logging=False)
    data = tldr_splits(args.train_pairs, args.test_pairs)
    print(
        f"TL;DR: {len(data[0])} train / {len(data[1])} test pairs (split by post), epochs={args.epochs}, "
        f"max_length={args.max_length}, {ray.cluster_resources()['CPU']:.0f} CPUs"
    )
    rows = []
    for k in (int(s) for s in args.sizes.split(",")):
        for concurrent in (True, False) if k > 1 else (True,):
            rows.append(run(k, concurrent, data, args))
            r = rows[-1]
            print(f"  K={k} {r['mode']}: {r['wall_s']:.1f} s", flush=True)
    print()
    print("| K | mode | wall s | member held-out accuracy | ensemble-mean acc | margin std |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        accs = ", ".join(f"{a:.3f}" for a in r["accuracies"])
        print(
            f"| {r['K']} | {r['mode']} | {r['wall_s']:.1f} | {accs} | {r['ensemble_mean_accuracy']:.3f} "
            f"| {r['margin_std']:.3f} |"
        )
    ray.shutdown()


if __name__ == "__main__":
    main()
