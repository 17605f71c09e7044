"""Ensemble scaling: how well K reward models fitted concurrently (Tune trials side by side) use the machine's P
parallel slots (one CPU each), against the same K members fitted one after another on one slot; builtin:minilm-l6
on the Reddit TL;DR comparisons from ../shared/data, split by post.

    .venv/bin/python bench/ensemble_scaling.py --sizes 2,4 --reps 3

Sequential: max_concurrent=1, each member reserves one slot (1 CPU, so one torch thread). Concurrent: all K members
at once, each reserving P/K CPUs (one torch thread below 2). The bench's Ray workers run at the bench's own
priority (RAY_worker_niceness=0, not Ray's +15), so start it with `nice` to stay on a par with other users.
Parallel efficiency = sequential wall / (concurrent wall × min(K, P)): 1.0 means the concurrent run is as fast as
perfect use of the slots allows. Sequential and concurrent runs alternate (and swap order every repetition), so a
load from other processes on the machine affects both alike; each efficiency pairs the runs of one repetition.
The phase table splits each member's wall time (median over members and repetitions) from its Tune trial's process
start to its trial's end; the members' results (held-out accuracy) must be the same in both modes.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import pandas as pd

from ray_jobs.data.split import split_by_prompt
from ray_jobs.ensemble.stage import run as run_ensemble
from ray_jobs.events import EventLog, read_events
from ray_jobs.spec import JobSpec

TLDR = Path(__file__).resolve().parents[2] / "shared" / "data" / "tldr" / "google_text_small_preference_dataset.jsonl"
# (label, from, to): consecutive marks of a member's life; trial-side marks come from its member_finished event.
PHASES = [
    ("trial actor start (process → trial function)", "trial_process_start", "launched_at"),
    ("trial function → training loop (Ray Train start)", "launched_at", "loop_start"),
    ("data loading", "loop_start", "data_loaded"),
    ("model load", "data_loaded", "model_ready"),
    ("training + evaluation", "model_ready", "trained"),
    ("checkpoint save", "trained", "saved"),
    ("loop end → trial function end (Ray Train shutdown)", "saved", "fit_end"),
    ("trial end", "fit_end", "trial_end"),
]


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


def member_timelines(job: Path) -> list[dict[str, float]]:
    """Per member: the marks its Train worker wrote to metrics.json and its trial wrote to the event log."""
    trials = {e["member"]: e for e in read_events(job) if e.get("event") == "member_finished"}
    out = []
    for k, trial in sorted(trials.items()):
        metrics = json.loads((job / "ensemble" / f"member-{k}" / "metrics.json").read_text())
        marks = metrics["timeline"] | {"launched_at": metrics["start_time"], "trial_end": trial["ts"]}
        marks |= {key: trial[key] for key in ("trial_process_start", "fit_start", "fit_end")}
        out.append(marks | {"torch_threads": metrics["torch_threads"]})
    return out


def run(k: int, concurrent: bool, slots: int, data: tuple[pd.DataFrame, pd.DataFrame], args) -> dict:
    per_worker = round(slots / k, 2) if concurrent else 1.0
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
                "cpus_per_worker": per_worker,
                "max_concurrent": k if concurrent else 1,
            }
        }
    )
    with tempfile.TemporaryDirectory(prefix="ens-bench-") as tmp:
        job = Path(tmp)
        (job / "data").mkdir()
        data[0].to_parquet(job / "data" / "train.parquet")
        data[1].to_parquet(job / "data" / "test.parquet")
        start = time.time()
        summary = run_ensemble(spec, job, EventLog(job))
        end = time.time()
        members = member_timelines(job)
    first = min(m["trial_process_start"] for m in members)
    last = max(m["trial_end"] for m in members)
    return {
        "K": k,
        "mode": "concurrent" if concurrent else "sequential",
        "wall_s": end - start,
        "cpus_per_worker": per_worker,
        "members": members,
        "before_first_trial_s": first - start,
        "after_last_trial_s": end - last,
        **summary,
    }


def spread(values: list[float], fmt: str = "{:.1f}") -> str:
    return " – ".join(fmt.format(v) for v in (min(values), statistics.median(values), max(values)))


def report(rows: list[dict], slots: int) -> None:
    print("\nWall time of the stage, s (min – median – max over repetitions):\n")
    print("| K | mode | wall s | reps | CPUs reserved per member | torch threads | member held-out accuracy |")
    print("|---|---|---|---|---|---|---|")
    for (k, mode), group in _groups(rows).items():
        threads = sorted({m["torch_threads"] for r in group for m in r["members"]})
        accs = sorted({", ".join(f"{a:.3f}" for a in r["accuracies"]) for r in group})
        print(
            f"| {k} | {mode} | {spread([r['wall_s'] for r in group])} | {len(group)} "
            f"| {group[0]['cpus_per_worker']:g} | {', '.join(map(str, threads))} | {' or '.join(accs)} |"
        )
    print(f"\nParallel efficiency = sequential wall / (concurrent wall × min(K, {slots} slots)), per repetition:\n")
    print("| K | slots used | speed-up (seq / conc) | parallel efficiency |")
    print("|---|---|---|---|")
    groups = _groups(rows)
    for k in sorted({r["K"] for r in rows if r["K"] > 1}):
        pairs = list(zip(groups[(k, "sequential")], groups[(k, "concurrent")], strict=True))
        speedup = [s["wall_s"] / c["wall_s"] for s, c in pairs]
        used = min(k, slots)
        print(f"| {k} | {used} | {spread(speedup, '{:.2f}')}× | {spread([x / used for x in speedup], '{:.2f}')} |")
    print("\nWhere a member's time goes, s (median over members and repetitions):\n")
    modes = list(groups)
    print("| phase | " + " | ".join(f"K={k} {mode}" for k, mode in modes) + " |")
    print("|---|" + "---|" * len(modes))
    for label, a, b in PHASES:
        cells = [statistics.median(m[b] - m[a] for r in groups[key] for m in r["members"]) for key in modes]
        print(f"| {label} | " + " | ".join(f"{c:.1f}" for c in cells) + " |")
    stage_marks = (
        ("stage start → first trial", "before_first_trial_s"),
        ("last trial → stage end", "after_last_trial_s"),
    )
    for label, key in stage_marks:
        cells = [statistics.median(r[key] for r in groups[m]) for m in modes]
        print(f"| {label} (per stage) | " + " | ".join(f"{c:.1f}" for c in cells) + " |")


def _groups(rows: list[dict]) -> dict[tuple[int, str], list[dict]]:
    out: dict[tuple[int, str], list[dict]] = {}
    for r in rows:
        out.setdefault((r["K"], r["mode"]), []).append(r)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="2,4")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--train-pairs", type=int, default=96)
    parser.add_argument("--test-pairs", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--json", type=Path, help="also write every run's timings here")
    args = parser.parse_args()
    import ray

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # Ray lowers its workers to nice 15: on a shared machine they would then measure other users' load, not the stage.
    os.environ.setdefault("RAY_worker_niceness", "0")
    ray.init(address="local", include_dashboard=False, log_to_driver=False, configure_logging=False)
    slots = int(ray.cluster_resources()["CPU"])
    data = tldr_splits(args.train_pairs, args.test_pairs)
    print(
        f"TL;DR: {len(data[0])} train / {len(data[1])} test pairs (split by post), epochs={args.epochs}, "
        f"max_length={args.max_length}, {slots} CPUs, {args.reps} repetitions"
    )
    rows = []
    for rep in range(args.reps):
        for k in (int(s) for s in args.sizes.split(",")):
            order = (False, True) if (rep + k) % 2 == 0 else (True, False)
            for concurrent in order if k > 1 else (False,):
                rows.append(run(k, concurrent, slots, data, args))
                r = rows[-1]
                print(f"  rep {rep + 1} K={k} {r['mode']}: {r['wall_s']:.1f} s", flush=True)
                if args.json:
                    args.json.write_text(json.dumps(rows, indent=1))
    report(rows, slots)
    ray.shutdown()


if __name__ == "__main__":
    main()
