"""Held-out pairwise accuracy of each reward model of an ensemble versus the ensemble mean, on Reddit TL;DR.

Why: e-DPO distils the policy against K Bradley–Terry members, and its premise is that the family is at least as
good a judge as any one member while disagreeing where the data is thin. This measures the first half on the
paper's task with real human labels: does the mean of the members' rewards rank held-out summary pairs better
than each member alone, and how wide are the intervals at these sizes?

How: the members are fitted by the project's own code, in this process and one after another (two members in
parallel on a small machine only share the same cores): `ensemble.stage.member_tasks` builds the K `MemberTask`s
exactly as the ensemble stage does (member seed ``seed + k``, bootstrap resampling of the training pairs by
default, the shared data seed), and `ensemble.train.train_member` runs the plain PyTorch member loop, which picks
each member's epoch on a validation split carved by prompt hash from the training prompts and records its margins
r(preferred) − r(rejected) on the job's test split. Accuracies are read from those margins: a member is right when
its margin is positive, the ensemble when the mean of the K margins is (the mean of member rewards, as
`build_manifest` computes it). Intervals are the 95% Wilson intervals of the evaluate stage's `win_rate` (an exact
tie counts half).

Protocol (no prompt is ever on both sides):
- the 929 `google_text_small` pairs (866 posts) are read by the data stage's `read_pairs` and split by a stable
  hash of the prompt (`split_by_prompt`, the data stage's rule): ``--test-fraction`` of the posts (default 0.2)
  become the in-domain test set, the rest is the training set (from which each member also carves its
  validation posts);
- the 100 OpenAI batch-18 pairs, whose 18 posts are not among the 929, are the out-of-sample test set. Their
  prompts are written the way the 929 are (``post + " [summary]: "``, no title or subreddit) and then read by
  `read_pairs` like the training file: the project's own `tldr_openai` reader renders a SUBREDDIT/TITLE/POST/TL;DR
  prompt instead, which the members never saw in training.
Both test sets go into the job's test split, so every member scores them at its selected epoch; nothing is chosen
on them. The batch-18 pairs are six per post on average, so their effective sample size is smaller than n and
their Wilson interval is optimistic; the JSON records the post counts. ``--test-fraction 0`` trains on all 929 and
measures on batch 18 only.

The "longer summary wins" rule is reported beside the models: it is right on about 59% of the 929 pairs, so a
reward model has to beat it to show it learned more than length.

    .venv/bin/python bench/ensemble_accuracy.py --members 3 --epochs 2 --lr 5e-5 --max-length 160
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from ray_jobs.spec import EnsembleSpec

REPO = Path(__file__).resolve().parents[1]
GOOGLE_FILE = "tldr/google_text_small_preference_dataset.jsonl"
OPENAI_FILE = "tldr/openai_comparisons_batch18_first100.jsonl"
# The suffix that ends every google_text_small prompt: batch-18 prompts get it so both sets read alike.
SUMMARY_CUE = " [summary]: "


def openai_as_vertex(path: Path) -> list[dict[str, Any]]:
    """OpenAI summarize-from-feedback comparisons as google_text_small records (same prompt form, same choice)."""
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [
        {
            "input_text": r["info"]["post"] + SUMMARY_CUE,
            "candidate_0": r["summaries"][0]["text"],
            "candidate_1": r["summaries"][1]["text"],
            "choice": r["choice"],
        }
        for r in records
    ]


def load_sets(
    data_dir: Path, test_fraction: float, seed: int, work: Path, max_train_pairs: int | None = None
) -> dict[str, list[dict[str, Any]]]:
    """Normal-form rows of the training set and the two test sets (``in_domain`` is empty at fraction 0)."""
    from ray_jobs.data.split import split_by_prompt
    from ray_jobs.data.stage import read_pairs

    rows, info = read_pairs(str(data_dir / GOOGLE_FILE))
    if info["format"] != "tldr_vertex":
        raise SystemExit(f"{data_dir / GOOGLE_FILE}: read as {info['format']}, expected tldr_vertex")
    is_test = split_by_prompt([r["prompt"] for r in rows], test_fraction, seed) if test_fraction > 0 else []
    is_test = is_test or [False] * len(rows)
    # Through a file so batch 18 goes through the same reader, validation and label convention as the training set.
    converted = work / "batch18.jsonl"
    converted.write_text("".join(json.dumps(r) + "\n" for r in openai_as_vertex(data_dir / OPENAI_FILE)))
    batch18, _ = read_pairs(str(converted), "tldr_vertex")
    train = [r for r, t in zip(rows, is_test, strict=True) if not t]
    if max_train_pairs is not None and max_train_pairs < len(train):
        keep = np.random.default_rng(seed).choice(len(train), max_train_pairs, replace=False)
        train = [train[i] for i in sorted(keep.tolist())]
    return {
        "train": train,
        "in_domain": [r for r, t in zip(rows, is_test, strict=True) if t],
        "batch18": batch18,
    }


def write_job(job: Path, sets: dict[str, list[dict[str, Any]]]) -> dict[str, slice]:
    """The job folder `train_member` reads; returns where each test set lies in the test split."""
    import pandas as pd

    from ray_jobs.layout import PREFERENCES, JobLayout

    layout = JobLayout(job)
    layout.train.parent.mkdir(parents=True, exist_ok=True)
    PREFERENCES.write(pd.DataFrame(sets["train"]), layout.train)
    test_sets = [name for name in ("in_domain", "batch18") if sets[name]]
    PREFERENCES.write(pd.DataFrame([r for name in test_sets for r in sets[name]]), layout.test)
    bounds, start = {}, 0
    for name in test_sets:
        bounds[name] = slice(start, start + len(sets[name]))
        start += len(sets[name])
    return bounds


def preferred_margins(rows: list[dict[str, Any]], measure: Any) -> np.ndarray:
    """measure(preferred) − measure(rejected) per labelled pair (label 1: response_a preferred)."""
    return np.array(
        [
            measure(r["response_a"]) - measure(r["response_b"])
            if r["label"] == 1
            else measure(r["response_b"]) - measure(r["response_a"])
            for r in rows
        ],
        dtype=np.float64,
    )


def accuracy(margins: np.ndarray) -> dict[str, Any]:
    """Share of pairs ranked right (margin > 0, ties half) with the evaluate stage's 95% Wilson interval."""
    from ray_jobs.evaluate.stage import win_rate

    w = win_rate(margins.tolist(), [0.0] * len(margins))
    return {"accuracy": round(w["rate"], 4), "lo": round(w["lo"], 4), "hi": round(w["hi"], 4), "n": w["n"]}


def member_spec(args: argparse.Namespace) -> EnsembleSpec:
    """The ensemble section the members train under: the flags given, the spec's defaults for the rest."""
    given = {
        "epochs": args.epochs,
        "lr": args.lr,
        "max_length": args.max_length,
        "batch_size": args.batch_size,
        "validation_fraction": args.validation_fraction,
    }
    return EnsembleSpec(
        size=args.members,
        backbone=args.backbone,
        diversity=args.diversity,
        seed=args.seed,
        **{k: v for k, v in given.items() if v is not None},
    )


def fit_members(spec: EnsembleSpec, job: Path) -> list[dict[str, Any]]:
    """Train the K members as the ensemble stage would, sequentially in this process; their metrics dicts."""
    from ray_jobs.ensemble.stage import member_tasks
    from ray_jobs.ensemble.train import train_member
    from ray_jobs.train_runtime import WorkerRuntime

    members = []
    for task in member_tasks(spec, job, job / "members"):
        started = time.perf_counter()

        def progress(m: dict[str, Any], k: int = task.k) -> None:
            val = m.get("validation_accuracy")
            shown = f"validation accuracy {val:.3f}" if val is not None else "no validation split"
            print(f"  member {k} epoch {m['epoch']}: train loss {m['train_loss']:.4f}, {shown}", flush=True)

        # WorkerRuntime() picks the GPU when there is one; train_member's own default would pin the CPU.
        metrics = train_member(task, WorkerRuntime(), report=progress)
        metrics["wall_s"] = time.perf_counter() - started
        print(f"  member {task.k} done in {metrics['wall_s']:.0f} s (epoch {metrics['best_epoch']} kept)", flush=True)
        members.append(metrics)
    return members


def summarise(
    members: list[dict[str, Any]], sets: dict[str, list[dict[str, Any]]], bounds: dict[str, slice]
) -> dict[str, Any]:
    """Per test set: each member's accuracy, the ensemble mean's, and the longer-summary baseline's."""
    margins = np.array([m["heldout_margins"] for m in members])  # [K, test pairs]
    out = {}
    for name, where in bounds.items():
        part = margins[:, where]
        signs = np.sign(part)
        out[name] = {
            "pairs": part.shape[1],
            "prompts": len({r["prompt"] for r in sets[name]}),
            "members": [accuracy(row) for row in part],
            "ensemble_mean": accuracy(part.mean(axis=0)),
            "mean_member_accuracy": round(float(np.mean([(row > 0).mean() for row in part])), 4),
            # How often the members disagree in sign: the spread a pessimistic e-DPO family can exploit.
            "members_disagree": round(float(np.mean((signs != signs[0]).any(axis=0))), 4),
            "longer_summary_wins": accuracy(preferred_margins(sets[name], len)),
        }
    return out


def _git_commit() -> dict[str, Any]:
    def git(*cmd: str) -> str:
        return subprocess.run(["git", *cmd], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()

    try:
        # Dirty: the measured code may differ from the commit (another change in flight, or this script itself).
        return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain", "--", "ray_jobs"))}
    except (OSError, subprocess.CalledProcessError):
        return {"commit": None, "dirty": None}


def _nproc() -> int | None:
    try:
        return int(subprocess.run(["nproc"], capture_output=True, text=True, check=True).stdout)
    except (OSError, ValueError, subprocess.CalledProcessError):
        return os.cpu_count()


def print_table(results: dict[str, Any]) -> None:
    print("\n| test set | model | accuracy | 95% Wilson | n |")
    print("|---|---|---|---|---|")
    for name, r in results.items():
        rows = [(f"member {k}", a) for k, a in enumerate(r["members"])]
        rows += [("ensemble mean", r["ensemble_mean"]), ("longer summary wins", r["longer_summary_wins"])]
        for label, a in rows:
            print(f"| {name} | {label} | {a['accuracy']:.3f} | [{a['lo']:.3f}, {a['hi']:.3f}] | {a['n']} |")
    for name, r in results.items():
        print(
            f"{name}: {r['pairs']} pairs over {r['prompts']} posts; mean member accuracy "
            f"{r['mean_member_accuracy']:.3f}; members disagree on {r['members_disagree']:.1%} of pairs"
        )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--members", type=int, default=3)
    # None: the ensemble section's own default, so an unset flag measures what a job would train.
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--max-length", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--validation-fraction", type=float, default=None)
    parser.add_argument("--backbone", default="builtin:minilm-l6")
    parser.add_argument("--diversity", default="bootstrap", choices=("bootstrap", "seed", "disjoint"))
    parser.add_argument("--test-fraction", type=float, default=0.2, help="share of the 929's posts held out (0: none)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-train-pairs", type=int, default=None, help="a random subset, for smoke runs only")
    parser.add_argument("--out", type=Path, default=Path("docs/results/tldr-ensemble.json"), help="relative to repo")
    args = parser.parse_args(argv)
    if not 0 <= args.test_fraction < 1:
        parser.error("--test-fraction must be in [0, 1)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    spec = member_spec(args)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # Read before training: the tree may change under a run this long, and the code imported is the code at start.
    git = _git_commit()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="tldr-ensemble-") as tmp:
        job = Path(tmp)
        sets = load_sets(args.data_dir, args.test_fraction, args.seed, job, args.max_train_pairs)
        bounds = write_job(job, sets)
        print(
            f"TL;DR: {len(sets['train'])} training pairs ({len({r['prompt'] for r in sets['train']})} posts); "
            + ", ".join(f"{name} test {len(sets[name])} pairs" for name in bounds),
            flush=True,
        )
        members = fit_members(spec, job)
    results = summarise(members, sets, bounds)
    wall = time.perf_counter() - started
    print_table(results)
    report = {
        "task": "Reddit TL;DR pairwise accuracy: ensemble members vs ensemble mean",
        "protocol": "train on google_text_small minus a prompt-hash test split; test on that split and on OpenAI "
        "batch 18 (disjoint posts); epoch chosen per member on validation posts carved from training",
        "settings": {
            "members": spec.size,
            "backbone": spec.backbone,
            "diversity": spec.diversity,
            "epochs": spec.epochs,
            "lr": spec.lr,
            "batch_size": spec.batch_size,
            "max_length": spec.max_length,
            "validation_fraction": spec.validation_fraction,
            "test_fraction": args.test_fraction,
            "seed": spec.seed,
            "max_train_pairs": args.max_train_pairs,
        },
        "train_pairs": len(sets["train"]),
        "train_prompts": len({r["prompt"] for r in sets["train"]}),
        "members": [
            {
                key: m[key]
                for key in ("member", "seed", "best_epoch", "epochs_run", "validation_accuracy", "unique_train_pairs")
            }
            | {"wall_s": round(m["wall_s"], 1)}
            for m in members
        ],
        "results": results,
        "wall_s": round(wall, 1),
        "git": git,
        "nproc": _nproc(),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }
    out = args.out if args.out.is_absolute() else REPO / args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"\nwall {wall:.0f} s; wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
