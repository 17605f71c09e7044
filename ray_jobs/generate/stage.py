"""The generate stage: sample candidate responses (and forward-KL samples when distill.alpha > 0) from π_ref for
the training prompts; publishes ``generate/candidates.parquet`` and ``generate/kl_samples.parquet``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ray_jobs.events import EventLog
from ray_jobs.generate.engines import generate
from ray_jobs.layout import CANDIDATES, KL_SAMPLES, JobLayout
from ray_jobs.spec import JobSpec

STAGE = "generate"


def training_prompts(layout: JobLayout, max_prompts: int | None, seed: int) -> list[str]:
    """The distinct training prompts, or a seeded subset of `max_prompts` of them kept in data order."""
    if not layout.train.is_file():
        raise FileNotFoundError(f"{layout.train} is missing: run the data stage first")
    prompts = list(dict.fromkeys(pd.read_parquet(layout.train, columns=["prompt"])["prompt"].astype(str)))
    if max_prompts is not None and len(prompts) > max_prompts:
        # Reproducible, and not biased to the file's head.
        keep = np.sort(np.random.default_rng(seed).choice(len(prompts), size=max_prompts, replace=False))
        prompts = [prompts[i] for i in keep]
    return prompts


def run(spec: JobSpec, job_dir: Path, events: EventLog) -> dict[str, Any]:
    import ray

    if not ray.is_initialized():
        raise RuntimeError("the generate stage needs a running Ray (the pipeline connects first)")
    layout = JobLayout(job_dir)
    gen = spec.generation
    prompts = training_prompts(layout, gen.max_prompts, gen.seed)
    n_kl = gen.kl_samples_per_prompt if spec.distill.alpha > 0 else 0
    if gen.temperature == 0 and gen.samples_per_prompt > 1:
        events.emit("log", STAGE, message="temperature 0 samples identical responses: no generated pairs")
    # Candidates and KL samples are both i.i.d. draws from π_ref, so one call serves both and starts one engine.
    result = generate(spec.reference, prompts, gen.samples_per_prompt + n_kl, gen, events, stage=STAGE)
    candidates = pd.DataFrame({"prompt": prompts, "responses": [s[: gen.samples_per_prompt] for s in result.texts]})
    kl = [(p, r) for p, s in zip(prompts, result.texts, strict=True) for r in s[gen.samples_per_prompt :]]
    with layout.staging(STAGE) as out:
        CANDIDATES.write(candidates, out / layout.candidates.name)
        KL_SAMPLES.write(pd.DataFrame(kl, columns=list(KL_SAMPLES.names)), out / layout.kl_samples.name)
    return {
        "prompts": len(prompts),
        "candidates": len(prompts) * gen.samples_per_prompt,
        "kl_samples": len(kl),
        "engine": result.engine,
    }
