"""Scoring stage: build the distillation pairs and precompute everything the loss needs about them.

Every ensemble member scores every distinct (prompt, response) once and π_ref's log-probability of every distinct
response is computed once, each as a Ray Data actor pool whose actors load their model once. The distillation stage
then reads only Parquet: no reward or reference model is in memory while the policy trains.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from ray_jobs.artifacts import staging
from ray_jobs.ensemble import load_members
from ray_jobs.events import EventLog
from ray_jobs.spec import JobSpec

STAGE = "pairs"
PAIRS_SCHEMA = pa.schema(
    [
        ("prompt", pa.string()),
        ("response_a", pa.string()),
        ("response_b", pa.string()),
        ("source", pa.string()),
        ("label", pa.int8()),
        ("ref_logp_a", pa.float64()),
        ("ref_logp_b", pa.float64()),
        ("rewards_a", pa.list_(pa.float64())),
        ("rewards_b", pa.list_(pa.float64())),
    ]
)
REF_SAMPLES_SCHEMA = pa.schema([("prompt", pa.string()), ("response", pa.string()), ("ref_logp", pa.float64())])


class ScoringError(ValueError):
    """A model produced a value the loss cannot use (NaN or infinite); names the model and the text."""


def _device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


class Scorer:
    """Ray Data actor holding π_ref and every ensemble member, each loaded once per actor.

    One pool over the distinct texts gives each text all K+1 numbers in a single pass: a pool per model would pay
    the actor start and the data pass K+1 times, which dominates at the sizes one machine scores.
    """

    def __init__(
        self, reference: str | None, members: list[str], ref_max_length: int, reward_max_length: int, batch_size: int
    ):
        from ray_jobs.models.registry import load_causal_lm, load_reward_model

        device = _device()
        self.reference = None
        if reference is not None:
            self.reference, self.tokenizer = load_causal_lm(reference, device=device)
            self.reference.eval()
        self.members = []
        for path in members:
            model, tokenizer = load_reward_model(path)
            self.members.append((model.to(device).eval(), tokenizer))
        self.ref_max_length, self.reward_max_length, self.batch_size = ref_max_length, reward_max_length, batch_size

    def _ref_logps(self, prompts: list[str], responses: list[str]) -> np.ndarray:
        import torch

        from ray_jobs.models.logps import sequence_logps, tokenize_responses

        if self.reference is None:
            return np.full(len(prompts), np.nan)
        out = []
        with torch.no_grad():
            for i in range(0, len(prompts), self.batch_size):
                enc = tokenize_responses(
                    self.tokenizer,
                    prompts[i : i + self.batch_size],
                    responses[i : i + self.batch_size],
                    self.ref_max_length,
                )
                out.append(sequence_logps(self.reference, enc).double().cpu().numpy())
        return np.concatenate(out)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from ray_jobs.models.reward import score_pairs

        prompts, responses = [str(p) for p in batch["prompt"]], [str(r) for r in batch["response"]]
        # π_ref samples need no rewards: only rows flagged `reward` go through the members.
        wanted = np.flatnonzero(batch["reward"])
        rewards = np.full((len(prompts), len(self.members)), np.nan)
        for k, (model, tokenizer) in enumerate(self.members):
            if wanted.size:
                rewards[wanted, k] = (
                    score_pairs(
                        model,
                        tokenizer,
                        [prompts[i] for i in wanted],
                        [responses[i] for i in wanted],
                        batch_size=self.batch_size,
                        max_length=self.reward_max_length,
                    )
                    .double()
                    .numpy()
                )
        out = {"index": batch["index"], "ref_logp": self._ref_logps(prompts, responses)}
        if self.members:  # a [B, 0] tensor column is more than Ray Data's tensor type accepts
            out["rewards"] = rewards
        return out


def score_texts(
    reference: str | None,
    members: list[str],
    texts: list[tuple[str, str]],
    needs_reward: list[bool],
    *,
    ref_max_length: int,
    reward_max_length: int,
    batch_size: int,
    replicas: int,
    events: EventLog | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """π_ref log-prob [N] and member rewards [N, K] of each (prompt, response); NaN where not asked for
    (no reference, or `needs_reward` false)."""
    import ray

    ref = np.full(len(texts), np.nan)
    rewards = np.full((len(texts), len(members)), np.nan)
    if not texts:
        return ref, rewards
    gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
    rows = [
        {"index": i, "prompt": p, "response": r, "reward": w}
        for i, ((p, r), w) in enumerate(zip(texts, needs_reward, strict=True))
    ]
    out = ray.data.from_items(rows).map_batches(
        Scorer,
        fn_constructor_kwargs=dict(
            reference=reference,
            members=members,
            ref_max_length=ref_max_length,
            reward_max_length=reward_max_length,
            batch_size=batch_size,
        ),
        concurrency=replicas,
        batch_size=batch_size,
        batch_format="numpy",
        num_cpus=1,
        num_gpus=gpus,
    )
    seen = np.zeros(len(texts), dtype=bool)
    for batch in out.iter_batches(batch_size=None, batch_format="numpy"):
        index = batch["index"]
        ref[index], seen[index] = batch["ref_logp"], True
        if members:
            rewards[index] = np.asarray(batch["rewards"], dtype=np.float64).reshape(len(index), len(members))
        if events is not None:
            events.progress(STAGE, int(seen.sum()), len(texts), what="texts scored")
    if not seen.all():
        raise RuntimeError(f"scoring returned nothing for {int((~seen).sum())} of {len(texts)} texts")
    return ref, rewards


def _check_finite(values: np.ndarray, texts: list[tuple[str, str]], what: str) -> None:
    bad = np.flatnonzero(~np.isfinite(values))
    if bad.size:
        i = int(bad[0])
        prompt, response = texts[i]
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
    for prompt, responses in zip(candidates["prompt"], candidates["responses"], strict=True):
        distinct = list(dict.fromkeys(str(r) for r in responses))
        if len(distinct) < 2:
            continue
        if pairing == "all":
            rows.extend((prompt, a, b) for a, b in itertools.combinations(distinct, 2))
        else:
            i, j = rng.choice(len(distinct), size=2, replace=False)
            rows.append((prompt, distinct[i], distinct[j]))
    pairs = pd.DataFrame(rows, columns=["prompt", "response_a", "response_b"])
    pairs["source"] = "generated"
    pairs["label"] = pd.array([None] * len(pairs), dtype="Int8")
    return pairs


def dataset_pairs(train: pd.DataFrame) -> pd.DataFrame:
    """The preference data's own pairs with their labels (1 = a preferred, 0 = b, null = unlabelled)."""
    pairs = train[["prompt", "response_a", "response_b"]].astype(str).reset_index(drop=True)
    pairs["source"] = "dataset"
    pairs["label"] = pd.array(train["label"].to_numpy(), dtype="Int8")
    return pairs


def _read_samples(job_dir: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    samples = job_dir / "samples"
    candidates = samples / "candidates.parquet"
    kl = samples / "kl_samples.parquet"
    if not candidates.is_file():
        raise FileNotFoundError(f"{candidates} is missing: run the generation stage first")
    kl_samples = pd.read_parquet(kl) if kl.is_file() else pd.DataFrame({"prompt": [], "response": []})
    return pd.read_parquet(candidates), kl_samples


def run_scoring(spec: JobSpec, job_dir: Path, events: EventLog) -> dict[str, Any]:
    """Write ``pairs/pairs.parquet`` and ``pairs/ref_samples.parquet`` (see the module docstring)."""
    import ray

    if not ray.is_initialized():
        raise RuntimeError("run_scoring needs a running Ray (the pipeline calls ray.init)")
    from ray_jobs.models.registry import resolve_model_path

    job_dir = Path(job_dir)
    gen, sc = spec.generation, spec.score
    candidates, kl_samples = _read_samples(job_dir)
    parts = [build_pairs(candidates, gen.pairing, gen.seed)]
    if gen.include_dataset_pairs:
        parts.append(dataset_pairs(pd.read_parquet(job_dir / "data" / "train.parquet")))
    pairs = pd.concat(parts, ignore_index=True)
    n_generated = int((pairs["source"] == "generated").sum())

    # Score each distinct text once: the same response appears in several pairs under "all" pairing.
    pair_texts = list(
        dict.fromkeys(
            itertools.chain(
                zip(pairs["prompt"], pairs["response_a"], strict=True),
                zip(pairs["prompt"], pairs["response_b"], strict=True),
            )
        )
    )
    kl_texts = list(zip(kl_samples["prompt"].astype(str), kl_samples["response"].astype(str), strict=True))
    all_texts = list(dict.fromkeys(pair_texts + kl_texts))
    members = load_members(job_dir / "ensemble")  # [] without an ensemble: K = 0
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
        [str(m) for m in members],
        all_texts,
        in_pairs.tolist(),
        # The loop's policy log-probs use distill.max_length; π_ref's must see the same truncation or h is skewed.
        ref_max_length=spec.distill.max_length,
        reward_max_length=sc.max_length,
        batch_size=sc.batch_size,
        replicas=sc.replicas,
        events=events,
    )
    _check_finite(ref, all_texts, f"reference {spec.reference}")
    for k, member in enumerate(members):
        _check_finite(np.where(in_pairs, rewards[:, k], 0.0), all_texts, f"ensemble member {k} ({member})")

    ref_of = dict(zip(all_texts, ref.tolist(), strict=True))
    rewards_of = dict(zip(all_texts, rewards.tolist(), strict=True))
    keys_a = list(zip(pairs["prompt"], pairs["response_a"], strict=True))
    keys_b = list(zip(pairs["prompt"], pairs["response_b"], strict=True))
    table = pa.table(
        {
            "prompt": pairs["prompt"].astype(str),
            "response_a": pairs["response_a"].astype(str),
            "response_b": pairs["response_b"].astype(str),
            "source": pairs["source"],
            "label": pa.array(pairs["label"], type=pa.int8(), from_pandas=True),
            "ref_logp_a": [ref_of[k] for k in keys_a],
            "ref_logp_b": [ref_of[k] for k in keys_b],
            "rewards_a": [rewards_of[k] for k in keys_a],
            "rewards_b": [rewards_of[k] for k in keys_b],
        },
        schema=PAIRS_SCHEMA,
    )
    ref_samples = pa.table(
        {
            "prompt": [p for p, _ in kl_texts],
            "response": [r for _, r in kl_texts],
            "ref_logp": [ref_of[k] for k in kl_texts],
        },
        schema=REF_SAMPLES_SCHEMA,
    )
    with staging(job_dir, STAGE) as out:
        pq.write_table(table, out / "pairs.parquet")
        pq.write_table(ref_samples, out / "ref_samples.parquet")
    return {
        "pairs": len(pairs),
        "generated_pairs": n_generated,
        "dataset_pairs": len(pairs) - n_generated,
        "members": len(members),
        "ref_samples": len(kl_texts),
        "texts_scored": len(all_texts),
    }
