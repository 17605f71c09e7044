"""Preference data for tests, built one way each: a raw standard-format file for the data stage, and normal-form
train/test splits for stages that start after it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from ray_jobs.layout import PREFERENCES, JobLayout

POSITIVE = ["I loved it, a wonderful and joyful time.", "Great work, truly delightful and warm.", "Superb, happy."]
NEGATIVE = ["It was awful and boring.", "Terrible, I hated every minute.", "Sad, dull and bad."]

TOPICS = ["the film", "this book", "the hotel", "our dinner", "the camera", "the concert", "the game", "the phone"]
GOOD = ["was wonderful and lovely", "is great, I loved it", "was excellent and fun", "is the best I have seen"]
BAD = ["was terrible and boring", "is bad, I hated it", "was awful and dull", "is the worst I have seen"]


def write_prefs(path: Path, n: int = 24) -> Path:
    """`n` standard-format rows ({prompt, chosen, rejected}, one prompt each) as JSON Lines; the chosen response is
    the positive one, so the VADER oracle agrees with every label."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [
        {
            "prompt": f"Write a short review of place number {i}.",
            "chosen": POSITIVE[i % 3] + f" Visit {i}.",
            "rejected": NEGATIVE[i % 3] + f" Visit {i}.",
        }
        for i in range(n)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def synthetic_pairs(n: int, seed: int, prefer_bad: bool = False) -> pd.DataFrame:
    """Normal-form review pairs where the positive sentence is preferred (or the negative one, so that held-out
    data can disagree with training data)."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        topic = TOPICS[rng.integers(len(TOPICS))]
        good, bad = f"{topic} {GOOD[rng.integers(len(GOOD))]}.", f"{topic} {BAD[rng.integers(len(BAD))]}."
        a_is_good = bool(rng.integers(2))
        rows.append(
            {
                "prompt": f"Review of {topic}: ",
                "response_a": good if a_is_good else bad,
                "response_b": bad if a_is_good else good,
                "label": int(a_is_good != prefer_bad),
            }
        )
    return pd.DataFrame(rows).astype({"label": "Int8"})


def write_job_data(job_dir: Path, n_train: int = 40, n_test: int = 16, prefer_bad_test: bool = False) -> Path:
    """A job folder whose data stage is done, as the data stage would have written it."""
    layout = JobLayout(job_dir)
    layout.train.parent.mkdir(parents=True, exist_ok=True)
    PREFERENCES.write(synthetic_pairs(n_train, seed=0), layout.train)
    PREFERENCES.write(synthetic_pairs(n_test, seed=1, prefer_bad=prefer_bad_test), layout.test)
    return job_dir
