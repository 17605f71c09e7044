"""Generation + scoring stages on a small job folder: pair construction, exact schema, scores equal direct calls."""

from __future__ import annotations

import json
import shutil
from math import comb
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch

from ray_jobs.events import EventLog, read_events
from ray_jobs.generate.engines import generate, kl_sampling
from ray_jobs.generate.stage import run as run_generation
from ray_jobs.layout import CANDIDATES, KL_SAMPLES, PAIRS, PREFERENCES, REF_SAMPLES, JobLayout
from ray_jobs.score.stage import ScoringError, build_pairs
from ray_jobs.score.stage import run as run_scoring
from ray_jobs.spec import JobSpec

TRAIN = pd.DataFrame(
    {
        "prompt": ["The movie was", "The movie was", "A dull plot and", "Review this film:"],
        "response_a": [" great fun", " boring", " bad acting", " a classic"],
        "response_b": [" too long", " lovely", " fine music", " a mess"],
        "label": pd.array([1, 0, None, 1], dtype="Int8"),
    }
)
MAX_LENGTH = 64


def _save_member(tiny_bert: Path, out: Path, seed: int, broken: bool = False) -> None:
    from ray_jobs.models.registry import load_reward_model

    model, tokenizer = load_reward_model(tiny_bert)
    torch.manual_seed(seed)
    with torch.no_grad():  # distinct members, as training on different bootstraps would make them
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    if broken:
        with torch.no_grad():
            next(p for n, p in model.named_parameters() if n.endswith("bias")).fill_(float("nan"))
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


# Member 1 was trained at an 8-token budget and must score at it; member 0 records none (score.max_length).
MEMBER_MAX_LENGTHS = (None, 8)


def _write_ensemble(job_dir: Path, tiny_bert: Path, broken: tuple[bool, ...]) -> None:
    ensemble = job_dir / "ensemble"
    for k, bad in enumerate(broken):
        _save_member(tiny_bert, ensemble / f"member-{k}", seed=k, broken=bad)
    members = [
        {"path": f"member-{k}", "member": k} | ({"max_length": n} if (n := MEMBER_MAX_LENGTHS[k]) else {})
        for k in range(len(broken))
    ]
    (ensemble / "manifest.json").write_text(json.dumps({"size": len(broken), "members": members}))


def _spec(tiny_llama: Path, tiny_bert: Path, **generation) -> JobSpec:
    return JobSpec.model_validate(
        {
            "reference": str(tiny_llama),
            "ensemble": {"size": 2, "backbone": str(tiny_bert)},
            "generation": {
                "engine": "hf",
                "samples_per_prompt": 3,
                "kl_samples_per_prompt": 2,
                "max_new_tokens": 6,
                "batch_size": 4,
                **generation,
            },
            # fp32: stored scores must equal direct model calls to 1e-4, which bf16 does not across batch shapes.
            "score": {"batch_size": 4, "max_length": MAX_LENGTH, "precision": "fp32"},
            "distill": {"loss": "e-dpo", "alpha": 0.1, "max_length": MAX_LENGTH, "precision": "fp32"},
        }
    )


@pytest.fixture(scope="module")
def scored(ray_cluster, tiny_llama, tiny_bert, tmp_path_factory):
    job_dir = tmp_path_factory.mktemp("job")
    (job_dir / "data").mkdir()
    PREFERENCES.write(TRAIN, JobLayout(job_dir).train)
    _write_ensemble(job_dir, tiny_bert, broken=(False, False))
    spec = _spec(tiny_llama, tiny_bert)
    events = EventLog(job_dir)
    gen_summary = run_generation(spec, job_dir, events)
    score_summary = run_scoring(spec, job_dir, events)
    return job_dir, spec, gen_summary, score_summary


def test_generation_writes_candidates_and_kl_samples(scored):
    job_dir, _, summary, _ = scored
    candidates = pq.read_table(JobLayout(job_dir).candidates)
    kl = pq.read_table(JobLayout(job_dir).kl_samples)
    assert candidates.schema.equals(CANDIDATES.arrow()) and kl.schema.equals(KL_SAMPLES.arrow())
    prompts = list(dict.fromkeys(TRAIN["prompt"]))
    assert candidates.column("prompt").to_pylist() == prompts
    assert all(len(r) == 3 for r in candidates.column("responses").to_pylist())
    assert sorted(kl.column("prompt").to_pylist()) == sorted(prompts * 2)
    # A random tiny model rarely emits EOS within 6 tokens: nearly every sample is cut at the cap, and says so.
    capped = {
        "candidates": sum(not e for es in candidates.column("ended").to_pylist() for e in es),
        "kl_samples": sum(not e for e in kl.column("ended").to_pylist()),
    }
    assert capped["candidates"] >= 7 and capped["kl_samples"] >= 4
    assert summary == {"prompts": 3, "candidates": 9, "kl_samples": 6, "capped": capped, "engine": "hf"}
    assert not (job_dir / ".partial" / "generate").exists()


def test_a_lone_scorer_computes_on_every_cpu_of_the_node(scored):
    """The scoring actor reserves one CPU, for which Ray gives it one thread; it sets torch's threads to its share
    of the node instead (2 on the 2-CPU test cluster), or scoring ran on one core of an idle machine."""
    job_dir = scored[0]
    assert [e["threads"] for e in read_events(job_dir) if e.get("stage") == "score" and "threads" in e] == [2]


def test_pairs_have_the_exact_columns_and_counts(scored):
    job_dir, _, _, summary = scored
    table = pq.read_table(JobLayout(job_dir).pairs)
    assert table.schema.equals(PAIRS.arrow())
    assert pq.read_table(JobLayout(job_dir).ref_samples).schema.equals(REF_SAMPLES.arrow())
    pairs = table.to_pandas()
    candidates = pd.read_parquet(JobLayout(job_dir).candidates)
    expected_generated = sum(comb(len(set(r)), 2) for r in candidates["responses"])
    generated, dataset = pairs[pairs["source"] == "generated"], pairs[pairs["source"] == "dataset"]
    assert len(generated) == expected_generated == summary["generated_pairs"]
    assert generated["label"].isna().all()
    assert (generated["response_a"] != generated["response_b"]).all()
    assert (
        dataset[["prompt", "response_a", "response_b"]].values.tolist()
        == TRAIN[["prompt", "response_a", "response_b"]].values.tolist()
    )
    assert dataset["label"].tolist()[:2] == [1, 0] and pd.isna(dataset["label"].iloc[2])
    assert all(len(r) == 2 for r in pairs["rewards_a"]) and all(len(r) == 2 for r in pairs["rewards_b"])
    assert summary["members"] == 2 and summary["ref_samples"] == 6


def test_scores_equal_direct_model_calls(scored, tiny_llama):
    from ray_jobs.models.logps import encode, pack, packed_logps
    from ray_jobs.models.registry import load_causal_lm, load_reward_model
    from ray_jobs.models.reward import score_pairs

    job_dir = scored[0]
    pairs = pd.read_parquet(JobLayout(job_dir).pairs)
    prompts = pairs["prompt"].tolist() * 2
    responses = pairs["response_a"].tolist() + pairs["response_b"].tolist()
    for k in range(2):
        model, tokenizer = load_reward_model(job_dir / "ensemble" / f"member-{k}")
        model.eval()
        budget = MEMBER_MAX_LENGTHS[k] or MAX_LENGTH
        direct = score_pairs(model, tokenizer, prompts, responses, batch_size=8, max_length=budget).numpy()
        stored = np.array([r[k] for r in pairs["rewards_a"]] + [r[k] for r in pairs["rewards_b"]])
        np.testing.assert_allclose(stored, direct, atol=1e-4, rtol=0)
        if budget != MAX_LENGTH:  # the budget bites: scored at score.max_length, some texts would differ
            longer = score_pairs(model, tokenizer, prompts, responses, batch_size=8, max_length=MAX_LENGTH).numpy()
            assert not np.allclose(stored, longer, atol=1e-4)
    # The two members really differ, so a mixed-up member order would fail above.
    assert not np.allclose([r[0] for r in pairs["rewards_a"]], [r[1] for r in pairs["rewards_a"]])

    samples = pd.read_parquet(JobLayout(job_dir).ref_samples)
    model, tokenizer = load_causal_lm(tiny_llama)
    model.eval()
    all_prompts, all_responses = prompts + samples["prompt"].tolist(), responses + samples["response"].tolist()
    # Responses cut at the token cap are scored without EOS: π_ref did not choose to stop there.
    ended = pairs["ended_a"].tolist() + pairs["ended_b"].tolist() + samples["ended"].tolist()
    assert not all(ended) and any(ended)  # capped samples and the dataset's complete responses
    prompt_ids, response_ids = encode(tokenizer, all_prompts, all_responses, ended)
    with torch.no_grad():
        direct = packed_logps(model, pack(prompt_ids, response_ids, MAX_LENGTH, tokenizer.pad_token_id)).numpy()
    stored = np.concatenate([pairs["ref_logp_a"], pairs["ref_logp_b"], samples["ref_logp"]])
    np.testing.assert_allclose(stored, direct, atol=1e-4, rtol=0)
    assert (stored < 0).all()
    # The ids stored for distillation are those π_ref was scored on (EOS only where the response ended).
    stored_ids = pairs["ids_a"].tolist() + pairs["ids_b"].tolist() + samples["ids"].tolist()
    assert [list(ids) for ids in stored_ids] == response_ids
    assert [list(ids) for ids in pairs["prompt_ids"]] == prompt_ids[: len(pairs)]


def _copy_job(job_dir: Path, dest: Path) -> Path:
    for stage in ("data", "generate"):
        shutil.copytree(job_dir / stage, dest / stage)
    return dest


def test_without_an_ensemble_rewards_are_empty_lists(scored, tiny_llama, tiny_bert, tmp_path):
    job_dir = _copy_job(scored[0], tmp_path)
    spec = _spec(tiny_llama, tiny_bert, include_dataset_pairs=False)
    summary = run_scoring(spec, job_dir, EventLog(job_dir))
    pairs = pd.read_parquet(JobLayout(job_dir).pairs)
    assert summary["members"] == 0 and (pairs["source"] == "generated").all()
    assert len(pairs) == scored[3]["generated_pairs"]
    assert all(len(r) == 0 for r in pairs["rewards_a"]) and all(len(r) == 0 for r in pairs["rewards_b"])


def test_a_member_that_gives_nan_fails_the_stage_and_writes_nothing(scored, tiny_llama, tiny_bert, tmp_path):
    job_dir = _copy_job(scored[0], tmp_path)
    _write_ensemble(job_dir, tiny_bert, broken=(True,))
    with pytest.raises(ScoringError, match=r"ensemble member 0 .*member-0.* gave nan for text row 0"):
        run_scoring(_spec(tiny_llama, tiny_bert), job_dir, EventLog(job_dir))
    assert not JobLayout(job_dir).is_complete("score")


def test_pair_construction_drops_identical_responses():
    responses = [["a", "a", "b"], ["x", "y", "z"], ["m", "m"], ["u"]]
    candidates = pd.DataFrame(
        {"prompt": ["p", "q", "r", "s"], "responses": responses, "ended": [[True] * len(r) for r in responses]}
    )
    every = build_pairs(candidates, "all", seed=0)
    assert every[["prompt", "response_a", "response_b"]].values.tolist() == [
        ["p", "a", "b"],
        ["q", "x", "y"],
        ["q", "x", "z"],
        ["q", "y", "z"],
    ]
    assert (every["source"] == "generated").all() and every["label"].isna().all()
    one = build_pairs(candidates, "random", seed=0)
    assert one["prompt"].tolist() == ["p", "q"]
    assert all(a != b for a, b in zip(one["response_a"], one["response_b"], strict=True))
    assert set(one.iloc[1][["response_a", "response_b"]]) <= {"x", "y", "z"}


def test_kl_samples_come_from_pi_ref_itself_whatever_the_candidates_settings(
    ray_cluster, tiny_llama, tiny_bert, tmp_path
):
    """Candidates at temperature 0.7 and top_p 0.9; the forward-KL samples must still be draws of π_ref (T = 1,
    top_p = 1), or the α term estimates the KL to a sharpened π_ref."""
    JobLayout(tmp_path).train.parent.mkdir(parents=True)
    PREFERENCES.write(TRAIN, JobLayout(tmp_path).train)
    spec = _spec(tiny_llama, tiny_bert, temperature=0.7, top_p=0.9)
    run_generation(spec, tmp_path, EventLog(tmp_path))
    prompts = list(dict.fromkeys(TRAIN["prompt"]))
    kl = pd.read_parquet(JobLayout(tmp_path).kl_samples)
    gen = spec.generation
    assert (kl_sampling(gen).temperature, kl_sampling(gen).top_p) == (1.0, 1.0)
    expected = generate(tiny_llama, prompts, 2, kl_sampling(gen), stage="generate").texts
    assert kl["response"].tolist() == [r for texts in expected for r in texts]
    candidates = pd.read_parquet(JobLayout(tmp_path).candidates)
    assert [list(r) for r in candidates["responses"]] == generate(tiny_llama, prompts, 3, gen, stage="generate").texts


def test_capped_samples_can_be_dropped(scored, tiny_llama, tiny_bert, tmp_path):
    job_dir = _copy_job(scored[0], tmp_path)
    shutil.rmtree(JobLayout(job_dir).stage("generate"))
    summary = run_generation(_spec(tiny_llama, tiny_bert, capped="drop"), job_dir, EventLog(job_dir))
    candidates = pd.read_parquet(JobLayout(job_dir).candidates)
    kl = pd.read_parquet(JobLayout(job_dir).kl_samples)
    assert all(all(e) for e in candidates["ended"]) and kl["ended"].all()
    assert summary["candidates"] == 9 - summary["capped"]["candidates"]
    assert summary["kl_samples"] == len(kl) == 6 - summary["capped"]["kl_samples"]
