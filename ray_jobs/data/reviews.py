"""`builtin:reviews`: a self-contained preference task needing no files outside the repository.

Prompts ask for one-sentence reviews (films, books, products, places, food, music, games), short enough that a
small instruct model usually ends on its own well inside a 64-token cap, so response length can move. Candidate
responses are sampled from the job's reference policy and labelled by the VADER oracle, which prefers positive, warm
text. Candidates are cached per (reference, prompts, sampling settings), so jobs that share them sample once.

A second, fixed set of 200 prompts (`eval_prompts`) is for evaluation only: its 100 subjects never occur among the
training prompts' subjects, so held-out numbers do not depend on how a job split or biased its data.
"""

from __future__ import annotations

from collections.abc import Callable
from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np

from ray_jobs.events import EventLog
from ray_jobs.generate.cache import cached_samples
from ray_jobs.generate.engines import SamplingEngines, count_capped, drop_capped
from ray_jobs.spec import JobSpec

PROMPTS_FILE = Path(__file__).parent / "builtin" / "reviews_prompts.txt"
EVAL_PROMPTS_FILE = Path(__file__).parent / "builtin" / "reviews_eval_prompts.txt"
ORACLE = "builtin:vader"
TIE = 1e-6


def read_prompt_lines(path: Path) -> list[str]:
    """One prompt per non-empty line."""
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def review_prompts() -> list[str]:
    return read_prompt_lines(PROMPTS_FILE)


def eval_prompts() -> list[str]:
    return read_prompt_lines(EVAL_PROMPTS_FILE)


def select_prompts(num_prompts: int, seed: int) -> list[str]:
    """`num_prompts` of the built-in prompts (all of them if fewer), the same ones for the same seed."""
    prompts = review_prompts()
    if num_prompts >= len(prompts):
        return prompts
    picked = np.random.default_rng(seed).choice(len(prompts), num_prompts, replace=False)
    return [prompts[i] for i in sorted(picked.tolist())]


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
    spec: JobSpec,
    render: Callable[[str], str],
    events: EventLog | None = None,
    engines: SamplingEngines | None = None,
) -> tuple[list, dict[tuple[str, str], bool], dict[str, Any]]:
    """Numbered unlabeled records of sampled review pairs, whether each (prompt, response) ended on its own, and
    what was sampled. Responses cut at the token cap are dropped under ``generation.capped: drop``. Sampling runs
    on `engines` (π_ref's, held by the pipeline) when given."""
    gen = spec.generation
    n = spec.data.candidates_per_prompt
    prompts = [render(p) for p in select_prompts(spec.data.num_prompts, spec.data.seed)]
    # The generate stage's sampler (vLLM through Ray Data where it runs), on the data stage's own seed stream.
    responses, ended, cached = cached_samples(spec.reference, prompts, n, gen, events, stage="data", engines=engines)
    capped = count_capped(ended)
    if gen.capped == "drop":
        responses, ended = drop_capped(responses, ended)
    ended_of = {
        (p, r): e for p, rs, es in zip(prompts, responses, ended, strict=True) for r, e in zip(rs, es, strict=True)
    }
    info = {"prompts": len(prompts), "samples_per_prompt": n, "candidates_cached": cached, "capped": capped}
    return candidate_pairs(prompts, responses), ended_of, info
