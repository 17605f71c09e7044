"""Scored pairs written as the score stage would, for the distill and evaluate tests.

They write the scoring stage's outputs themselves, so these tests depend on no other stage: reference log-probs
come from the real tiny reference through `response_logps`, rewards are fixed length-biased numbers (the paper's
induced shift: longer is preferred in 80% of labelled pairs and every member rewards length).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from ray_jobs.layout import PAIRS, PREFERENCES, REF_SAMPLES, JobLayout
from ray_jobs.models.logps import response_logps
from ray_jobs.models.registry import load_causal_lm, load_tokenizer
from ray_jobs.score.tokens import encode_pairs, encode_samples

_VOCAB = """the film was a warm and gentle story about family who opened small bakery by sea acting good music lovely
ending made me smile book long slow wonderful characters real writing clear great read rainy weekend"""
WORDS = tuple(_VOCAB.split())
PROMPTS = [
    "Write a short review of a film you enjoyed.\n",
    "Write a short review of a book, a product or a place you visited.\n",
    "Summarize the text in one sentence.\n",
    "Please answer the question briefly and politely.\n",
]


def _text(rng: np.random.Generator, lo: int, hi: int) -> str:
    return " ".join(rng.choice(WORDS, size=int(rng.integers(lo, hi))))


def ref_logps(reference: str | Path, prompts: list[str], responses: list[str]) -> np.ndarray:
    model, tokenizer = load_causal_lm(str(reference))
    model.eval()
    return response_logps(model, tokenizer, prompts, responses, 256).numpy()


def length_rewards(texts: list[str], k: int, rng: np.random.Generator) -> list[list[float]]:
    """Member j rewards length with its own slope plus fixed noise: a length-biased ensemble."""
    words = np.array([len(t.split()) for t in texts], dtype=np.float64)
    slopes = 0.1 * (1.0 + 0.5 * np.arange(k))
    noise = rng.normal(0.0, 0.2, size=(len(texts), k))
    return (words[:, None] * slopes[None, :] + noise).tolist()


def write_pairs(job_dir: Path, reference: str | Path, n_labelled: int = 24, n_unlabelled: int = 8, k: int = 3) -> None:
    """Pairs that differ by one appended word, the longer preferred 80% of the time.

    Near-duplicate pairs are where DPO's likelihood displacement shows: pushing the rejected response's EOS down
    also pushes down the chosen one's, and DPO never stops pushing, whereas distillation stops at the reward gap.
    """
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n_labelled + n_unlabelled):
        short = _text(rng, 3, 9)
        long = f"{short} {rng.choice(WORDS)}"
        chosen, rejected = (long, short) if rng.random() < 0.8 else (short, long)
        a_first = rng.random() < 0.5
        a, b = (chosen, rejected) if a_first else (rejected, chosen)
        labelled = i < n_labelled
        rows.append(
            {
                "prompt": PROMPTS[i % len(PROMPTS)],
                "response_a": a,
                "response_b": b,
                "source": "dataset" if labelled else "generated",
                "label": (1 if a_first else 0) if labelled else None,
            }
        )
    df = pd.DataFrame(rows)
    prompts = df["prompt"].tolist()
    logps = ref_logps(reference, prompts * 2, df["response_a"].tolist() + df["response_b"].tolist())
    df["ref_logp_a"], df["ref_logp_b"] = logps[: len(df)], logps[len(df) :]
    df["rewards_a"] = length_rewards(df["response_a"].tolist(), k, rng)
    df["rewards_b"] = length_rewards(df["response_b"].tolist(), k, rng)
    samples = pd.DataFrame({"prompt": PROMPTS * 4, "response": [_text(rng, 3, 10) for _ in range(4 * len(PROMPTS))]})
    samples["ref_logp"] = ref_logps(reference, samples["prompt"].tolist(), samples["response"].tolist())
    df["ended_a"], df["ended_b"], samples["ended"] = True, True, True
    tokenizer = load_tokenizer(str(reference))
    layout = JobLayout(job_dir)
    layout.pairs.parent.mkdir(parents=True, exist_ok=True)
    PAIRS.write(encode_pairs(df, tokenizer), layout.pairs)
    REF_SAMPLES.write(encode_samples(samples, tokenizer), layout.ref_samples)


def write_test_data(job_dir: Path) -> None:
    """A data stage's two splits: held-out prompts for evaluation, and labelled training pairs."""
    layout = JobLayout(job_dir)
    layout.test.parent.mkdir(parents=True, exist_ok=True)
    rows = [{"prompt": p, "response_a": "good", "response_b": "bad", "label": 1} for p in PROMPTS * 2]
    PREFERENCES.write(pd.DataFrame(rows), layout.test)
    train = [{"prompt": p, "response_a": "a dull film", "response_b": "a warm film", "label": 0} for p in PROMPTS]
    PREFERENCES.write(pd.DataFrame(train), layout.train)
