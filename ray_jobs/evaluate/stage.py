"""The evaluate stage: the trained policy against π_ref on held-out prompts; publishes ``evaluate/``.

`samples_per_prompt` samples per prompt from each model, the j-th of the policy's compared with the j-th of π_ref's
under the oracle. π_ref's samples come from the shared sample cache, so every job with the same reference, prompts
and sampling seed is judged against the very same reference samples, and two jobs can be compared sample by sample
(the report keeps every score under its ``prompt:sample`` key). The win rate counts ties as half a win and carries a
95% Wilson interval (over samples: samples of one prompt are not independent, which an experiment's bootstrap over
prompts accounts for). KL(π‖π_ref) is the Monte-Carlo mean of log π − log π_ref over the policy's own samples at
temperature 1 (whole-response log-probs, the quantity the losses use). log π(chosen) − log π_ref(chosen) on training
pairs shows whether training pushed the preferred responses down, as DPO is known to.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pandas as pd

from ray_jobs.data.formats import Renderer
from ray_jobs.data.reviews import eval_prompts, read_prompt_lines
from ray_jobs.data.stage import BUILTIN_REVIEWS
from ray_jobs.distill.card import write_policy_card
from ray_jobs.events import EventLog
from ray_jobs.generate.cache import cached_samples
from ray_jobs.generate.engines import SamplingEngines, kl_sampling
from ray_jobs.layout import JobLayout
from ray_jobs.names import Precision
from ray_jobs.spec import GenerationSpec, JobSpec
from ray_jobs.tracking import StageTracker, flatten_scalars

STAGE = "evaluate"
Z95 = 1.959963984540054


class EvaluationError(ValueError):
    """The job folder lacks what evaluation needs; the message names the missing file or column."""


def evaluation_prompts(spec: JobSpec, layout: JobLayout) -> list[str]:
    """The rendered prompts evaluation samples, per `evaluate.prompts` (the first `num_prompts` of them)."""
    source, limit = spec.evaluate.prompts, spec.evaluate.num_prompts
    if source == "auto":
        source = BUILTIN_REVIEWS if spec.data.source == BUILTIN_REVIEWS else "held_out"
    if source == "held_out":
        return held_out_prompts(layout.test, limit)  # already rendered by the data stage
    if source == BUILTIN_REVIEWS:
        raw = eval_prompts()
    else:
        path = Path(source).expanduser()
        if not path.is_file():
            raise EvaluationError(f"evaluate.prompts: {source} is neither held_out, builtin:reviews nor a file")
        raw = read_prompt_lines(path)
        if not raw:
            raise EvaluationError(f"evaluate.prompts: {source} holds no prompts")
    render = Renderer(spec.reference, spec.data.apply_chat_template)
    return [render(p) for p in raw[:limit]]


def held_out_prompts(path: Path, limit: int) -> list[str]:
    """Distinct prompts of the held-out split, in first-seen order, at most `limit` of them."""
    if not path.exists():
        raise EvaluationError(f"{path}: missing; evaluation samples the held-out prompts of the data stage")
    df = pd.read_parquet(path, columns=None)
    if "prompt" not in df.columns:
        raise EvaluationError(f"{path}: no 'prompt' column")
    prompts = [p for p in dict.fromkeys(df["prompt"].tolist()) if isinstance(p, str) and p]
    if not prompts:
        raise EvaluationError(f"{path}: no prompts to evaluate on")
    return prompts[:limit]


def win_rate(policy: list[float], reference: list[float]) -> dict[str, Any]:
    """Share of prompts where the policy's reward beats the reference's (ties = ½), with a 95% Wilson interval."""
    p, r = np.asarray(policy, dtype=np.float64), np.asarray(reference, dtype=np.float64)
    n = len(p)
    if n == 0 or len(r) != n:
        raise ValueError(f"win_rate needs two equal non-empty score lists, got {len(p)} and {len(r)}")
    wins, ties = int((p > r).sum()), int((p == r).sum())
    rate = (wins + 0.5 * ties) / n
    denom = 1 + Z95**2 / n
    centre = (rate + Z95**2 / (2 * n)) / denom
    half = Z95 * math.sqrt(rate * (1 - rate) / n + Z95**2 / (4 * n * n)) / denom
    return {
        "rate": rate,
        "lo": max(0.0, centre - half),
        "hi": min(1.0, centre + half),
        "wins": wins,
        "ties": ties,
        "losses": n - wins - ties,
        "n": n,
        "interval": "wilson-95",
    }


def sampling(spec: JobSpec) -> GenerationSpec:
    """The job's generation settings (engine, replicas, batching, context) with evaluation's sampling (top_p 1)."""
    e = spec.evaluate
    return spec.generation.model_copy(
        update={"max_new_tokens": e.max_new_tokens, "temperature": e.temperature, "seed": e.seed, "top_p": 1.0}
    )


def _flat(texts: list[list[str]], ended: list[list[bool]], n: int) -> tuple[list[str], list[bool]]:
    """n completions per prompt, flattened prompt-major; a prompt that got fewer counts as empty, ended answers."""
    padded = [(list(ts) + [""] * n)[:n] for ts in texts]
    flags = [(list(es) + [True] * n)[:n] for es in ended]
    return [t for ts in padded for t in ts], [e for es in flags for e in es]


def _sample(engines: SamplingEngines, prompts: list[str], gen: GenerationSpec, n: int) -> tuple[list[str], list[bool]]:
    """n completions per prompt (prompt-major), and whether each ended on its own (False: cut at max_new_tokens)."""
    out = engines.generate(prompts, n, gen, STAGE)
    return _flat(out.texts, out.ended, n)


def reference_samples(
    spec: JobSpec, job_dir: str | Path, events: EventLog, engines: SamplingEngines | None = None
) -> tuple[list[str], list[bool]]:
    """π_ref's evaluation samples, flattened like the policy's. They are cached: the pipeline draws them on the π_ref
    engine it holds for the data and generate stages, before it ends that engine, so evaluation reads them instead
    of starting π_ref again; seeded by stage, they are the samples an engine of evaluation's own would draw."""
    prompts = evaluation_prompts(spec, JobLayout(job_dir))
    n = spec.evaluate.samples_per_prompt
    texts, ended, _ = cached_samples(spec.reference, prompts, n, sampling(spec), events, stage=STAGE, engines=engines)
    return _flat(texts, ended, n)


class Responses(NamedTuple):
    """Responses to score under both models; ``ended`` False marks one cut at the token cap (no EOS term)."""

    prompts: list[str]
    responses: list[str]
    ended: list[bool] | None
    max_length: int


def chosen_responses(spec: JobSpec, layout: JobLayout) -> Responses | None:
    """The preferred responses of the first `evaluate.chosen_pairs` labelled training pairs (None: none asked)."""
    limit = spec.evaluate.chosen_pairs
    if limit == 0:
        return None
    if not layout.train.exists():
        raise EvaluationError(f"{layout.train}: missing; log π(chosen) − log π_ref(chosen) is read on training pairs")
    df = pd.read_parquet(layout.train)
    df = df[df["label"].notna()].head(limit)
    if df.empty:
        return None
    a_chosen = df["label"].to_numpy() == 1
    return Responses(
        df["prompt"].tolist(),
        np.where(a_chosen, df["response_a"], df["response_b"]).tolist(),
        np.where(a_chosen, df["ended_a"], df["ended_b"]).astype(bool).tolist(),
        spec.distill.max_length,
    )


def logratios(
    policy: str | Path, reference: str | Path, sets: list[Responses], precision: Precision = "fp32"
) -> list[np.ndarray]:
    """log π − log π_ref of every response of each set, loading each model once for all of them."""
    from ray_jobs.models.logps import response_logps
    from ray_jobs.models.registry import load_causal_lm
    from ray_jobs.precision import autocast

    per_model = []
    for model_ref in (policy, reference):
        model, tokenizer = load_causal_lm(str(model_ref))
        model.eval()
        with autocast(precision, model.device):
            per_model.append(
                [
                    response_logps(model, tokenizer, s.prompts, s.responses, s.max_length, ended=s.ended).numpy()
                    for s in sets
                ]
            )
        del model
    return [p - r for p, r in zip(*per_model, strict=True)]


def _mean_and_sem(diff: np.ndarray) -> tuple[float, float | None]:
    sem = float(diff.std(ddof=1) / math.sqrt(len(diff))) if len(diff) > 1 else None
    return float(diff.mean()), sem


def kl_estimate(
    policy: str | Path,
    reference: str | Path,
    prompts: list[str],
    samples: list[str],
    max_length: int,
    precision: Precision = "fp32",
    ended: list[bool] | None = None,
):
    """Monte-Carlo KL(π‖π_ref) from the policy's samples (both models under one precision), and its standard error.

    ``ended`` False marks samples cut at the token cap: their log-probs then have no EOS term.
    """
    return _mean_and_sem(logratios(policy, reference, [Responses(prompts, samples, ended, max_length)], precision)[0])


def _length_stats(tokenizer: Any, texts: list[str]) -> dict[str, Any]:
    tokens = [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    words = [len(t.split()) for t in texts]
    return {
        "tokens": tokens,
        "words": words,
        "mean_tokens": float(np.mean(tokens)),
        "mean_words": float(np.mean(words)),
    }


def report_scalars(report: dict[str, Any]) -> dict[str, float]:
    """The report's headline numbers under flat names, as experiment trackers take them (absent ones left out)."""
    rate = report["win_rate"] or {}
    return flatten_scalars(
        {
            "win_rate": rate.get("rate"),
            "win_rate_lo": rate.get("lo"),
            "win_rate_hi": rate.get("hi"),
            "kl": report["kl"]["estimate"],
            "kl_stderr": report["kl"]["stderr"],
            "chosen_logratio": report["chosen_logratio"],
            **{f"reward_{k}": v for k, v in (report["reward"] or {}).items()},
            **{f"{side}_{k}": v for side, stats in report["lengths"].items() for k, v in stats.items()},
        }
    )


def run(spec: JobSpec, job_dir: str | Path, events: EventLog) -> dict[str, Any]:
    """Compare the policy with π_ref on held-out prompts; writes ``evaluate/report.json`` and PNG plots."""
    from ray_jobs.evaluate.plots import write_plots
    from ray_jobs.models.registry import load_tokenizer

    layout = JobLayout(job_dir)
    e = spec.evaluate
    policy = layout.policy
    if not policy.is_dir():
        raise EvaluationError(f"the policy {policy} is missing: run the distill stage first")
    prompts = evaluation_prompts(spec, layout)
    n = e.samples_per_prompt
    events.emit("log", STAGE, message=f"sampling policy and reference on {len(prompts)} prompts, {n} each")
    gen = sampling(spec)
    # KL(π‖π_ref) is an expectation under π itself: samples at temperature 1, drawn apart when evaluation's differs,
    # on the same policy engine.
    kl_gen = kl_sampling(gen)
    with SamplingEngines(policy, events) as engines:
        policy_texts, policy_ended = _sample(engines, prompts, gen, n)
        kl_texts, kl_ended = (policy_texts, policy_ended) if kl_gen == gen else _sample(engines, prompts, kl_gen, n)
    reference_texts, reference_ended = reference_samples(spec, job_dir, events)
    sample_prompts = [p for p in prompts for _ in range(n)]
    m = n * min(e.kl_prompts or len(prompts), len(prompts))
    kl_set = Responses(sample_prompts[:m], kl_texts[:m], kl_ended[:m], spec.distill.max_length + e.max_new_tokens)
    chosen = chosen_responses(spec, layout)
    # Both models loaded once for the KL samples and the chosen responses together.
    diffs = logratios(policy, spec.reference, [kl_set] + ([chosen] if chosen else []), spec.distill.precision)
    kl, kl_sem = _mean_and_sem(diffs[0])
    tokenizer = load_tokenizer(spec.reference)
    lengths = {"policy": _length_stats(tokenizer, policy_texts), "reference": _length_stats(tokenizer, reference_texts)}
    report: dict[str, Any] = {
        "num_prompts": len(prompts),
        "samples_per_prompt": n,
        "prompts": e.prompts,
        "oracle": e.oracle,
        "kl": {
            "estimate": kl,
            "stderr": kl_sem,
            "samples": m,
            "method": "mean over policy samples at temperature 1 of log pi - log pi_ref",
        },
        # capped: samples cut at max_new_tokens, whose length says more about the cap than about the model.
        "lengths": {
            side: {"mean_tokens": s["mean_tokens"], "mean_words": s["mean_words"], "capped": sum(not e for e in ended)}
            for (side, s), ended in zip(lengths.items(), (policy_ended, reference_ended), strict=True)
        },
        "win_rate": None,
        "reward": None,
    }
    scores: dict[str, list[float]] = {}
    if e.oracle is not None:
        from ray_jobs.models.oracle import load_oracle

        oracle = load_oracle(e.oracle)
        scores = {
            "policy": [float(s) for s in oracle.score(sample_prompts, policy_texts)],
            "reference": [float(s) for s in oracle.score(sample_prompts, reference_texts)],
        }
        report["win_rate"] = win_rate(scores["policy"], scores["reference"])
        report["reward"] = {
            "policy_mean": float(np.mean(scores["policy"])),
            "reference_mean": float(np.mean(scores["reference"])),
        }
    report["chosen_logratio"] = float(diffs[1].mean()) if chosen else None
    report["samples"] = {
        "key": [f"{i}:{j}" for i in range(len(prompts)) for j in range(n)],
        **scores,
        "policy_tokens": lengths["policy"]["tokens"],
        "reference_tokens": lengths["reference"]["tokens"],
    }
    report["examples"] = [
        {"prompt": p, "policy": a, "reference": b}
        for p, a, b in zip(sample_prompts[::n][:5], policy_texts[::n][:5], reference_texts[::n][:5], strict=True)
    ]
    with layout.staging(STAGE) as out:
        report["plots"] = write_plots(out, layout.root, scores, lengths)
        (out / layout.report.name).write_text(json.dumps(report, indent=2), encoding="utf-8")
    write_policy_card(layout, policy)  # the card now tells how the policy did
    # The job's tracker runs end with its result, next to the training curves that led there.
    tracker = StageTracker(spec.tracking, job_dir, STAGE, config=spec.evaluate.model_dump(mode="json"))
    try:
        tracker.log(0, report_scalars(report))
    finally:
        tracker.close()
    summary = {k: report[k] for k in ("num_prompts", "win_rate", "reward", "kl", "lengths", "chosen_logratio")}
    events.metrics(STAGE, 0, {"win_rate": (report["win_rate"] or {}).get("rate"), "kl": kl})
    return summary
