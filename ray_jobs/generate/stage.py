"""The generate stage: sample candidate responses (and forward-KL samples when distill.alpha > 0) from π_ref for
the training prompts; publishes ``generate/candidates.parquet`` and ``generate/kl_samples.parquet``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ray_jobs.events import EventLog
from ray_jobs.generate.engines import SamplingEngines, count_capped, drop_capped, kl_sampling
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


def run(spec: JobSpec, job_dir: Path, events: EventLog, engines: SamplingEngines | None = None) -> dict[str, Any]:
    """Run the generate stage on `engines` (π_ref's, held by the pipeline across the data stage and this one), or
    on engines of its own."""
    import ray

    if not ray.is_initialized():
        raise RuntimeError("the generate stage needs a running Ray (the pipeline connects first)")
    if engines is not None:
        return _generate(spec, JobLayout(job_dir), events, engines)
    with SamplingEngines(spec.reference, events) as own:
        return _generate(spec, JobLayout(job_dir), events, own)


def _generate(spec: JobSpec, layout: JobLayout, events: EventLog, engines: SamplingEngines) -> dict[str, Any]:
    gen = spec.generation
    prompts = training_prompts(layout, gen.max_prompts, gen.seed)
    n_kl = gen.kl_samples_per_prompt if spec.distill.alpha > 0 else 0
    if gen.temperature == 0 and gen.samples_per_prompt > 1:
        events.emit("log", STAGE, message="temperature 0 samples identical responses: no generated pairs")
    kl_gen = kl_sampling(gen)
    k = gen.samples_per_prompt
    if kl_gen == gen:
        # Candidates and KL samples are then i.i.d. draws of one distribution: one call, one stream of seeds.
        both = engines.generate(prompts, k + n_kl, gen, STAGE)
        engine = both.engine
        texts, ended = [t[:k] for t in both.texts], [e[:k] for e in both.ended]
        kl_texts, kl_ended = [t[k:] for t in both.texts], [e[k:] for e in both.ended]
    else:
        result = engines.generate(prompts, k, gen, STAGE)
        kl = engines.generate(prompts, n_kl, kl_gen, STAGE)
        engine, texts, ended, kl_texts, kl_ended = result.engine, result.texts, result.ended, kl.texts, kl.ended
    capped = {"candidates": count_capped(ended), "kl_samples": count_capped(kl_ended)}
    if any(capped.values()):
        events.emit(
            "log",
            STAGE,
            message=f"{capped['candidates']} candidates and {capped['kl_samples']} KL samples reached "
            f"max_new_tokens={gen.max_new_tokens}: {'dropped' if gen.capped == 'drop' else 'kept, scored without EOS'}",
            capped=capped,
        )
    if gen.capped == "drop":
        texts, ended = drop_capped(texts, ended)
        kl_texts, kl_ended = drop_capped(kl_texts, kl_ended)
    candidates = pd.DataFrame({"prompt": prompts, "responses": texts, "ended": ended})
    kl_rows = [
        (p, t, e) for p, ts, es in zip(prompts, kl_texts, kl_ended, strict=True) for t, e in zip(ts, es, strict=True)
    ]
    with layout.staging(STAGE) as out:
        CANDIDATES.write(candidates, out / layout.candidates.name)
        KL_SAMPLES.write(pd.DataFrame(kl_rows, columns=list(KL_SAMPLES.names)), out / layout.kl_samples.name)
    return {
        "prompts": len(prompts),
        "candidates": sum(len(r) for r in candidates["responses"]),
        "kl_samples": len(kl_rows),
        "capped": capped,
        "engine": engine,
    }
