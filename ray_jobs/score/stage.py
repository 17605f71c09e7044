"""The score stage: build the distillation pairs and precompute everything the loss needs about them.

Every ensemble member scores every distinct (prompt, response) once and π_ref's log-probability of every distinct
response is computed once (`ray_jobs.score.scorer`). The distill stage then reads only Parquet: no reward or
reference model is in memory while the policy trains; the texts' token ids are stored with them, so it tokenizes
nothing either. Publishes ``score/pairs.parquet`` (PAIRS) and
``score/ref_samples.parquet`` (REF_SAMPLES).
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ray_jobs.ensemble.stage import load_members
from ray_jobs.events import EventLog
from ray_jobs.layout import PAIRS, REF_SAMPLES, JobLayout
from ray_jobs.score.scorer import score_texts
from ray_jobs.score.tokens import encode_pairs, encode_samples
from ray_jobs.spec import JobSpec, SpecError

STAGE = "score"


class ScoringError(ValueError):
    """A model produced a value the loss cannot use (NaN or infinite); names the model and the text."""


def _check_finite(values: np.ndarray, texts: list[tuple[str, str, bool]], what: str) -> None:
    bad = np.flatnonzero(~np.isfinite(values))
    if bad.size:
        i = int(bad[0])
        prompt, response, _ = texts[i]
        raise ScoringError(
            f"{what} gave {values[i]} for text row {i} of {len(texts)} (and {bad.size - 1} more): "
            f"prompt {prompt[-80:]!r}, response {response[:80]!r}"
        )


def build_pairs(candidates: pd.DataFrame, pairing: str, seed: int) -> pd.DataFrame:
    """Generated pairs: all distinct pairs of a prompt's distinct responses, or one random such pair per prompt.

    Identical responses are dropped first, so a prompt with fewer than two distinct responses yields no pair.
    """
    if pairing not in ("all", "random"):
        raise ValueError(f"pairing must be 'all' or 'random', got {pairing!r}")
    rng = np.random.default_rng(seed)
    rows = []
    columns = (candidates["prompt"], candidates["responses"], candidates["ended"])
    for prompt, responses, flags in zip(*columns, strict=True):
        ended_of = dict(zip((str(r) for r in responses), map(bool, flags), strict=True))
        distinct = list(ended_of)
        if len(distinct) < 2:
            continue
        if pairing == "all":
            chosen = list(itertools.combinations(distinct, 2))
        else:
            i, j = rng.choice(len(distinct), size=2, replace=False)
            chosen = [(distinct[i], distinct[j])]
        rows.extend((prompt, a, b, ended_of[a], ended_of[b]) for a, b in chosen)
    pairs = pd.DataFrame(rows, columns=["prompt", "response_a", "response_b", "ended_a", "ended_b"])
    pairs["source"] = "generated"
    pairs["label"] = pd.array([None] * len(pairs), dtype="Int8")
    return pairs


def dataset_pairs(train: pd.DataFrame) -> pd.DataFrame:
    """The preference data's own pairs with their labels (1 = a preferred, 0 = b, null = unlabelled)."""
    pairs = train[["prompt", "response_a", "response_b"]].astype(str).reset_index(drop=True)
    pairs["ended_a"], pairs["ended_b"] = train["ended_a"].to_numpy(dtype=bool), train["ended_b"].to_numpy(dtype=bool)
    pairs["source"] = "dataset"
    pairs["label"] = pd.array(train["label"].to_numpy(), dtype="Int8")
    return pairs


def scored_with(spec: JobSpec, members: list[tuple[str, int]]) -> dict[str, Any]:
    """What decides the pairs' precomputed numbers: a job reusing them must train with the same."""
    return {
        "reference": spec.reference,
        "ref_max_length": spec.distill.max_length,
        "ref_precision": spec.distill.precision,
        "members": [{"path": path, "max_length": max_length} for path, max_length in members],
        "member_precision": spec.score.precision,
    }


def check_reusable(spec: JobSpec, source: JobLayout) -> None:
    """Refuse pairs scored with another reference or truncation than `spec` trains with (reuse.pairs)."""

    def refuse(message: str) -> SpecError:
        return SpecError([{"field": "reuse.pairs", "message": message}])

    if not source.scored_with.is_file():
        raise refuse(f"{source.root} records no {source.scored_with.name}: score its pairs again")
    recorded = json.loads(source.scored_with.read_text())
    wanted = scored_with(spec, [])
    fields = (
        ("reference", "reference"),
        ("ref_max_length", "distill.max_length"),
        ("ref_precision", "distill.precision"),
    )
    for key, field in fields:
        if recorded.get(key) != wanted[key]:
            raise refuse(
                f"{source.root}'s pairs were scored with {field} = {recorded.get(key)!r}, this job trains with "
                f"{wanted[key]!r}; π_ref log-probs must come from the same model, truncation and precision"
            )


def _read_samples(layout: JobLayout) -> tuple[pd.DataFrame, pd.DataFrame]:
    if not layout.candidates.is_file():
        raise FileNotFoundError(f"{layout.candidates} is missing: run the generate stage first")
    return pd.read_parquet(layout.candidates), pd.read_parquet(layout.kl_samples)


def run(spec: JobSpec, job_dir: Path, events: EventLog) -> dict[str, Any]:
    import ray

    if not ray.is_initialized():
        raise RuntimeError("the score stage needs a running Ray (the pipeline connects first)")
    from ray_jobs.models.registry import load_tokenizer, resolve_model_path

    layout = JobLayout(job_dir)
    gen, sc = spec.generation, spec.score
    candidates, kl_samples = _read_samples(layout)
    parts = [build_pairs(candidates, gen.pairing, gen.seed)]
    if gen.include_dataset_pairs:
        parts.append(dataset_pairs(pd.read_parquet(layout.train)))
    pairs = pd.concat(parts, ignore_index=True)
    n_generated = int((pairs["source"] == "generated").sum())

    # Score each distinct text once: the same response appears in several pairs under "all" pairing. A text is
    # (prompt, response, ended): a response cut at the token cap is scored without EOS.
    keys_a = list(zip(pairs["prompt"], pairs["response_a"], pairs["ended_a"].astype(bool), strict=True))
    keys_b = list(zip(pairs["prompt"], pairs["response_b"], pairs["ended_b"].astype(bool), strict=True))
    pair_texts = list(dict.fromkeys(keys_a + keys_b))
    columns = (kl_samples["prompt"].astype(str), kl_samples["response"].astype(str), kl_samples["ended"].astype(bool))
    kl_texts = list(zip(*columns, strict=True))
    all_texts = list(dict.fromkeys(pair_texts + kl_texts))
    # Each member scores at the token budget it was trained at; score.max_length where none is recorded.
    members = [(str(path), max_length or sc.max_length) for path, max_length in load_members(layout.ensemble)]
    events.emit(
        "log",
        STAGE,
        message=f"{len(pairs)} pairs ({n_generated} generated), {len(all_texts)} distinct texts, "
        f"{len(members)} reward models",
    )
    pair_set = set(pair_texts)
    in_pairs = np.array([t in pair_set for t in all_texts], dtype=bool)
    ref, rewards = score_texts(
        str(resolve_model_path(spec.reference)),
        members,
        all_texts,
        in_pairs.tolist(),
        # The loop's policy log-probs use distill.max_length; π_ref's must see the same truncation or h is skewed.
        ref_max_length=spec.distill.max_length,
        batch_size=sc.batch_size,
        replicas=sc.replicas,
        events=events,
        ref_precision=spec.distill.precision,
        member_precision=sc.precision,
    )
    _check_finite(ref, all_texts, f"reference {spec.reference}")
    for k, (member, _) in enumerate(members):
        _check_finite(np.where(in_pairs, rewards[:, k], 0.0), all_texts, f"ensemble member {k} ({member})")

    ref_of = dict(zip(all_texts, ref.tolist(), strict=True))
    rewards_of = dict(zip(all_texts, rewards.tolist(), strict=True))
    pairs["ref_logp_a"] = [ref_of[k] for k in keys_a]
    pairs["ref_logp_b"] = [ref_of[k] for k in keys_b]
    pairs["rewards_a"] = [rewards_of[k] for k in keys_a]
    pairs["rewards_b"] = [rewards_of[k] for k in keys_b]
    ref_samples = pd.DataFrame(
        {
            "prompt": [p for p, _, _ in kl_texts],
            "response": [r for _, r, _ in kl_texts],
            "ended": [e for _, _, e in kl_texts],
            "ref_logp": [ref_of[k] for k in kl_texts],
        }
    )
    tokenizer = load_tokenizer(spec.reference)
    pairs, ref_samples = encode_pairs(pairs, tokenizer), encode_samples(ref_samples, tokenizer)
    with layout.staging(STAGE) as out:
        PAIRS.write(pairs, out / layout.pairs.name)
        REF_SAMPLES.write(ref_samples, out / layout.ref_samples.name)
        (out / layout.scored_with.name).write_text(json.dumps(scored_with(spec, members), indent=2))
    return {
        "pairs": len(pairs),
        "generated_pairs": n_generated,
        "dataset_pairs": len(pairs) - n_generated,
        "members": len(members),
        "ref_samples": len(kl_texts),
        "texts_scored": len(all_texts),
    }
