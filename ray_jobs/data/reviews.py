"""`builtin:reviews`: a self-contained preference task needing no files outside the repository.

Prompts ask for short reviews (films, books, products, places, food, music, games); candidate responses are
sampled from the job's reference policy and labelled by the VADER oracle, which prefers positive, warm text.
Candidates are cached per (reference, prompts, sampling settings), so jobs that share them sample once.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from ray_jobs.events import EventLog
from ray_jobs.layout import CANDIDATES, model_cache
from ray_jobs.spec import GenerationSpec, JobSpec

PROMPTS_FILE = Path(__file__).parent / "builtin" / "reviews_prompts.txt"
ORACLE = "builtin:vader"
TIE = 1e-6
CACHE_VERSION = 1


def review_prompts() -> list[str]:
    return [line.strip() for line in PROMPTS_FILE.read_text(encoding="utf-8").splitlines() if line.strip()]


def select_prompts(num_prompts: int, seed: int) -> list[str]:
    """`num_prompts` of the built-in prompts (all of them if fewer), the same ones for the same seed."""
    prompts = review_prompts()
    if num_prompts >= len(prompts):
        return prompts
    picked = np.random.default_rng(seed).choice(len(prompts), num_prompts, replace=False)
    return [prompts[i] for i in sorted(picked.tolist())]


def _cache_path(reference: str, prompts: list[str], n: int, gen: GenerationSpec) -> Path:
    settings = {
        "version": CACHE_VERSION,
        "reference": reference,
        "prompts": prompts,
        "n": n,
        "max_new_tokens": gen.max_new_tokens,
        "temperature": gen.temperature,
        "top_p": gen.top_p,
        "seed": gen.seed,
        "engine": gen.engine,
    }
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:24]
    return model_cache() / "reviews" / f"{digest}.parquet"


def _generate(
    reference: str, prompts: list[str], n: int, gen: GenerationSpec, events: EventLog | None
) -> list[list[str]]:
    # The generate stage's sampler: vLLM through Ray Data where it runs, transformers otherwise.
    from ray_jobs.generate.engines import generate

    return generate(reference, prompts, n, gen, events, stage="data").texts


def sample_candidates(
    reference: str, prompts: list[str], n: int, gen: GenerationSpec, events: EventLog | None = None
) -> tuple[list[list[str]], bool]:
    """n responses per rendered prompt, and whether they came from the cache."""
    path = _cache_path(reference, prompts, n, gen)
    if path.is_file():
        return pq.read_table(path).column("responses").to_pylist(), True
    responses = _generate(reference, prompts, n, gen, events)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    CANDIDATES.write({"prompt": prompts, "responses": responses}, tmp)
    os.replace(tmp, path)  # concurrent jobs may both sample; the last complete file wins
    return responses, False


def candidate_pairs(prompts: list[str], responses: list[list[str]]) -> list[tuple[int, dict[str, Any]]]:
    """Every unordered pair of a prompt's candidates, as numbered unlabeled records (labels come later)."""
    records = []
    for prompt, texts in zip(prompts, responses, strict=True):
        for a, b in combinations(texts, 2):
            records.append((len(records) + 1, {"prompt": prompt, "response_a": a, "response_b": b}))
    return records


def label_by_oracle(rows: list[dict[str, Any]], oracle_ref: str = ORACLE) -> tuple[list[dict[str, Any]], int]:
    """Rows labelled by the oracle (1 when a scores higher), and how many ties (|diff| < 1e-6) were dropped."""
    from ray_jobs.models.oracle import load_oracle

    oracle = load_oracle(oracle_ref)
    prompts = [r["prompt"] for r in rows]
    score_a = oracle.score(prompts, [r["response_a"] for r in rows])
    score_b = oracle.score(prompts, [r["response_b"] for r in rows])
    labelled = [
        {**row, "label": int(sa > sb)}
        for row, sa, sb in zip(rows, score_a, score_b, strict=True)
        if abs(sa - sb) >= TIE
    ]
    return labelled, len(rows) - len(labelled)


def reviews_records(
    spec: JobSpec, render: Callable[[str], str], events: EventLog | None = None
) -> tuple[list, dict[str, Any]]:
    """Numbered unlabeled records of sampled review pairs, with what was sampled."""
    gen = spec.generation
    n = max(2, gen.samples_per_prompt)
    prompts = [render(p) for p in select_prompts(spec.data.num_prompts, spec.data.seed)]
    responses, cached = sample_candidates(spec.reference, prompts, n, gen, events)
    info = {"prompts": len(prompts), "samples_per_prompt": n, "candidates_cached": cached}
    return candidate_pairs(prompts, responses), info
