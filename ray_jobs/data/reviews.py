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
from ray_jobs.generate.engines import count_capped, drop_capped
from ray_jobs.layout import CANDIDATES, model_cache
from ray_jobs.spec import GenerationSpec, JobSpec

PROMPTS_FILE = Path(__file__).parent / "builtin" / "reviews_prompts.txt"
ORACLE = "builtin:vader"
TIE = 1e-6
CACHE_VERSION = 2  # 2: the data stage samples with its own stage seed


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


def sample_candidates(
    reference: str, prompts: list[str], n: int, gen: GenerationSpec, events: EventLog | None = None
) -> tuple[list[list[str]], list[list[bool]], bool]:
    """n responses per rendered prompt, whether each ended on its own (not cut at the cap), and whether they came
    from the cache."""
    from ray_jobs.generate.engines import generate

    path = _cache_path(reference, prompts, n, gen)
    if path.is_file():
        table = pq.read_table(path)
        return table.column("responses").to_pylist(), table.column("ended").to_pylist(), True
    # The generate stage's sampler: vLLM through Ray Data where it runs, transformers otherwise.
    result = generate(reference, prompts, n, gen, events, stage="data")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    CANDIDATES.write({"prompt": prompts, "responses": result.texts, "ended": result.ended}, tmp)
    os.replace(tmp, path)  # concurrent jobs may both sample; the last complete file wins
    return result.texts, result.ended, False


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
) -> tuple[list, dict[tuple[str, str], bool], dict[str, Any]]:
    """Numbered unlabeled records of sampled review pairs, whether each (prompt, response) ended on its own, and
    what was sampled. Responses cut at the token cap are dropped under ``generation.capped: drop``."""
    gen = spec.generation
    n = max(2, gen.samples_per_prompt)
    prompts = [render(p) for p in select_prompts(spec.data.num_prompts, spec.data.seed)]
    responses, ended, cached = sample_candidates(spec.reference, prompts, n, gen, events)
    capped = count_capped(ended)
    if gen.capped == "drop":
        responses, ended = drop_capped(responses, ended)
    ended_of = {
        (p, r): e for p, rs, es in zip(prompts, responses, ended, strict=True) for r, e in zip(rs, es, strict=True)
    }
    info = {"prompts": len(prompts), "samples_per_prompt": n, "candidates_cached": cached, "capped": capped}
    return candidate_pairs(prompts, responses), ended_of, info
