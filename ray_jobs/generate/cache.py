"""Samples of a model that many jobs share, drawn once per machine and kept in the model cache.

builtin:reviews' candidates and evaluation's π_ref samples depend only on the model, the prompts and the sampling
settings, so every job of a sweep that agrees on those reads the same file instead of sampling again, and cells of
a grid are compared against the very same reference samples. Never use it for a model that training changes.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow.parquet as pq

from ray_jobs.events import EventLog
from ray_jobs.layout import CANDIDATES, model_cache
from ray_jobs.names import Stage
from ray_jobs.spec import GenerationSpec

if TYPE_CHECKING:
    from ray_jobs.generate.engines import SamplingEngines

CACHE_VERSION = 3  # 3: keyed by the sampling stage too (each stage has its own seed stream)


def cache_path(model_ref: str, prompts: list[str], n: int, gen: GenerationSpec, stage: Stage) -> Path:
    settings = {
        "version": CACHE_VERSION,
        "model": model_ref,
        "stage": stage,
        "prompts": prompts,
        "n": n,
        "max_new_tokens": gen.max_new_tokens,
        "temperature": gen.temperature,
        "top_p": gen.top_p,
        "seed": gen.seed,
        "engine": gen.engine,
    }
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:24]
    return model_cache() / "samples" / f"{digest}.parquet"


def cached_samples(
    model_ref: str,
    prompts: list[str],
    n: int,
    gen: GenerationSpec,
    events: EventLog | None,
    stage: Stage,
    engines: SamplingEngines | None = None,
) -> tuple[list[list[str]], list[list[bool]], bool]:
    """n responses per rendered prompt, whether each ended on its own (not cut at the cap), and whether they came
    from the cache. On a miss they are sampled on `engines` (held for `model_ref`), else on engines of their own."""
    from ray_jobs.generate.engines import generate

    path = cache_path(model_ref, prompts, n, gen, stage)
    if path.is_file():
        table = pq.read_table(path)
        return table.column("responses").to_pylist(), table.column("ended").to_pylist(), True
    if engines is not None:
        result = engines.generate(prompts, n, gen, stage)
    else:
        result = generate(model_ref, prompts, n, gen, events, stage=stage)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    CANDIDATES.write({"prompt": prompts, "responses": result.texts, "ended": result.ended}, tmp)
    os.replace(tmp, path)  # concurrent jobs may both sample; the last complete file wins
    return result.texts, result.ended, False
