"""Distillation: every loss trains the real tiny Llama, Ray Train resumes from checkpoints, the paper's claim holds."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from support.pairs import write_pairs

from ray_jobs.distill.data import PairsError, collate_pairs
from ray_jobs.distill.loop import DistillTask, distill_task, train_policy
from ray_jobs.distill.stage import run as run_distill
from ray_jobs.events import EventLog, read_events
from ray_jobs.layout import JobLayout
from ray_jobs.models.logps import response_logps
from ray_jobs.models.registry import load_causal_lm, load_tokenizer
from ray_jobs.score.tokens import encode_pairs
from ray_jobs.spec import JobSpec

# Where a GPU is present (the device checks), the loop trains on it, so these tests cover the CUDA path too; the
# scoring actor's Scorer picks the GPU by itself.
ON_GPU = torch.cuda.is_available()
# How far from 0 h may start when π_ref's log-probs and the policy's forward share one precision policy: exactly 0 on
# a CPU; on an H200 the scorer's and the loop's batches sum the same fp32 log-probs in another order (measured up to
# 7.6e-7). Log-probs from another precision start it further off than MISMATCHED_H_START (3.6e-4 measured).
H_START_TOLERANCE = 1e-5 if ON_GPU else 0.0
MISMATCHED_H_START = 1e-4


@pytest.fixture(scope="module")
def pairs_job(tmp_path_factory, tiny_llama) -> Path:
    job = tmp_path_factory.mktemp("distill-pairs")
    write_pairs(job, tiny_llama)
    return job


def _task(tiny_llama: Path, job: Path, run: Path, steps: int, output: Path | None = None, **distill) -> DistillTask:
    """Full-batch steps (all 32 pairs at once), so each step's loss is measured on the same data."""
    settings = {"batch_size": 32, "lr": 2e-3, "max_steps": steps, "use_gpu": ON_GPU, **distill}
    spec = JobSpec(reference=str(tiny_llama), distill=settings)
    return distill_task(spec, job, log_dir=str(run), checkpoint_dir=None, output_dir=str(output) if output else None)


def _losses(run: Path) -> list[float]:
    return [e["values"]["loss"] for e in read_events(run) if e["kind"] == "metrics"]


def test_collate_orients_labelled_pairs_so_a_is_chosen():
    df = pd.DataFrame(
        {
            "prompt": ["p", "p", "p"],
            "response_a": ["a0", "a1", "a2"],
            "response_b": ["b0", "b1", "b2"],
            "label": pd.array([1, 0, None], dtype="Int8"),
            "ended_a": [True, False, True],
            "ended_b": [False, True, True],
            "ref_logp_a": [-1.0, -2.0, -3.0],
            "ref_logp_b": [-4.0, -5.0, -6.0],
            "rewards_a": [[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]],
            "rewards_b": [[0.0, 0.5], [0.1, 0.2], [0.3, 0.4]],
            "prompt_ids": [[9], [9], [9]],
            # a response's ids end in EOS (2) only where it ended: they travel with the text
            "ids_a": [[10, 2], [11], [12, 2]],
            "ids_b": [[20], [21, 2], [22, 2]],
        }
    )
    batch = collate_pairs(df)
    assert batch["ids_a"] == [[10, 2], [21, 2], [12, 2]]
    assert batch["ids_b"] == [[20], [11], [22, 2]]
    assert batch["prompt_ids"] == [[9], [9], [9]]
    assert batch["ref_a"].tolist() == [-1.0, -5.0, -3.0]
    assert torch.allclose(batch["r_a"], torch.tensor([[1.0, 2.0], [0.1, 0.2], [5.0, 6.0]]))
    assert batch["labelled"].tolist() == [True, True, False]


LOSSES = [
    {"loss": "dpo"},
    {"loss": "ipo"},
    {"loss": "p-dpo", "alpha": 0.1},
    {"loss": "distill", "member": 1},
    {"loss": "distill", "alpha": 0.1},
    {"loss": "e-dpo", "family": "min"},
    {"loss": "e-dpo", "family": "example_min"},
    {"loss": "e-dpo", "family": "mean"},
    {"loss": "e-dpo", "family": "hull"},
]


@pytest.mark.parametrize("distill", LOSSES, ids=lambda d: "-".join(str(v) for v in d.values()))
def test_every_loss_lowers_its_training_loss(tiny_llama, pairs_job, tmp_path, distill):
    train_policy(_task(tiny_llama, pairs_job, tmp_path, steps=4, **distill))
    losses = _losses(tmp_path)
    assert len(losses) == 4
    assert losses[-1] < losses[0], losses
    metrics = [e for e in read_events(tmp_path) if e["kind"] == "metrics"][-1]["values"]
    if distill["loss"] == "e-dpo":
        assert len(metrics["member_losses"]) == 3
        if distill["family"] in ("min", "example_min"):
            assert sum(metrics["member_argmin_counts"]) >= 1
    if distill.get("alpha"):
        assert np.isfinite(metrics["forward_kl"])
    # dpo-style losses train on the 24 labelled pairs only, distillation on all 32.
    labelled_only = distill["loss"] in ("dpo", "ipo", "p-dpo")
    assert (metrics["logp_shift_a"] is None) == labelled_only
    assert list((tmp_path / "tensorboard" / "distill").glob("events.out.tfevents.*"))


def test_labelled_loss_without_labels_fails_clearly(tiny_llama, tmp_path):
    job = tmp_path / "job"
    write_pairs(job, tiny_llama, n_labelled=0, n_unlabelled=4)
    with pytest.raises(PairsError, match="no labelled pairs"):
        train_policy(_task(tiny_llama, job, tmp_path, steps=1, loss="dpo"))


def _policy_logps(policy: Path, prompts: list[str], responses: list[str]) -> np.ndarray:
    model, tokenizer = load_causal_lm(str(policy))
    model.eval()
    return response_logps(model, tokenizer, prompts, responses, 256).numpy()


def test_lora_policy_is_merged_and_reloads(tiny_llama, pairs_job, tmp_path):
    train_policy(
        _task(tiny_llama, pairs_job, tmp_path, 2, tmp_path / "policy", loss="dpo", lora={"r": 4, "alpha": 8.0})
    )
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "policy")
    assert not any("lora" in name for name, _ in model.named_parameters())
    info = json.loads((tmp_path / "policy" / "rmdistill.json").read_text())
    assert info["lora"]["r"] == 4 and info["steps"] == 2


def test_dpo_displaces_chosen_likelihood_more_than_edpo(tiny_llama, pairs_job, tmp_path):
    """The paper's claim (PAPER.md §3): on a length-biased set DPO lowers log π(chosen) below π_ref, e-DPO less."""
    pairs = pd.read_parquet(JobLayout(pairs_job).pairs)
    labelled = pairs[pairs["label"].notna()]
    a_chosen = labelled["label"].to_numpy() == 1
    chosen = np.where(a_chosen, labelled["response_a"], labelled["response_b"]).tolist()
    ref_chosen = np.where(a_chosen, labelled["ref_logp_a"], labelled["ref_logp_b"])
    shift = {}
    for loss in ("dpo", "e-dpo"):
        train_policy(
            _task(tiny_llama, pairs_job, tmp_path / loss, 15, tmp_path / loss / "policy", loss=loss, lr=1e-2, seed=3)
        )
        logps = _policy_logps(tmp_path / loss / "policy", labelled["prompt"].tolist(), chosen)
        shift[loss] = float(np.mean(logps - ref_chosen))
    # Measured: DPO's chosen log-ratio rises first, then falls as DPO keeps pushing the rejected EOS down (+3.0
    # after 12 steps, +0.2 after 15, -12 after 30), while e-DPO stops at the reward gap and stays near +12.
    assert shift["dpo"] < shift["e-dpo"] - 1.0, shift


@pytest.mark.ray
def test_ray_train_run_resumes_after_a_crash_and_publishes_a_policy(
    ray_cluster, tiny_llama, pairs_job, tmp_path, monkeypatch
):
    job = tmp_path / "job"
    shutil.copytree(JobLayout(pairs_job).stage("score"), JobLayout(job).stage("score"))
    spec = JobSpec(
        reference=str(tiny_llama),
        distill={
            "loss": "e-dpo",
            "family": "min",
            "alpha": 0.05,
            "batch_size": 8,
            "lr": 2e-3,
            "max_steps": 4,
            "checkpoint_every": 2,
            "max_failures": 1,
        },
    )
    monkeypatch.setenv("RMDISTILL_CRASH_AFTER_STEP", "2")
    summary = run_distill(spec, job, EventLog(job))
    assert summary["steps"] == 4
    assert (job / ".crash-hook-step-2").exists()  # the hook really fired
    events = list(read_events(job))
    # A lone worker reserves Ray Train's one CPU but computes on both of the test cluster's (it had one thread).
    assert [e["threads_per_worker"] for e in events if "threads_per_worker" in e] == [2]
    assert {e["threads"] for e in events if "threads" in e} == {2}
    resumed = [e for e in events if e.get("resumed_step") is not None]
    assert [e["resumed_step"] for e in resumed] == [2]
    steps = [e["step"] for e in events if e["kind"] == "metrics" and e["stage"] == "distill"]
    assert steps == [1, 2, 3, 4]  # steps 1-2 ran once: the retry started at the checkpoint, not at 0
    # The checkpoint the retry resumed from is gone with the rest of the run's storage once the policy is published.
    assert not JobLayout(job).checkpoints.exists()
    last = [e for e in events if e["kind"] == "metrics"][-1]["values"]
    assert len(last["member_losses"]) == 3 and sum(last["member_argmin_counts"]) == 1
    assert "forward_kl" in last
    info = json.loads(JobLayout(job).policy_info.read_text())
    assert info["loss"] == "e-dpo" and info["family"] == "min" and info["steps"] == 4
    prompts, responses = ["Write a short review of a film you enjoyed.\n"], ["the film was warm"]
    policy, reference = (
        _policy_logps(JobLayout(job).policy, prompts, responses),
        _policy_logps(tiny_llama, prompts, responses),
    )
    assert abs(policy[0] - reference[0]) > 1e-3


def _member_split_pairs(job: Path, tiny_llama: Path) -> None:
    """8 unlabelled pairs on which member 0 fits 7 pairs better but misses pair 7 badly, so member 1 is the better
    member overall while any batch without pair 7 would pick member 0 on its own."""
    write_pairs(job, tiny_llama, n_labelled=0, n_unlabelled=8, k=2)
    pairs = pd.read_parquet(JobLayout(job).pairs)
    pairs["rewards_a"] = [[0.1, 0.3]] * 7 + [[3.0, 0.3]]
    pairs["rewards_b"] = [[0.0, 0.0]] * 8
    pairs.to_parquet(JobLayout(job).pairs, index=False)


def _step_spec(tiny_llama: Path, family: str, batch_size: int, accum: int, workers: int = 1) -> JobSpec:
    """One e-DPO optimizer step of `batch_size` × `accum` pairs per worker, in fp32: the equivalences these tests
    assert are exact, and bf16 (`auto` on a CPU with bf16 units) rounds differently with every batch shape."""
    distill = {
        "loss": "e-dpo",
        "family": family,
        "batch_size": batch_size,
        "max_steps": 1,
        "lr": 1e-3,
        "precision": "fp32",
    }
    return JobSpec(
        reference=str(tiny_llama),
        # One worker takes the GPU where there is one; several are the Ray Train test, which runs on CPUs.
        distill={
            **distill,
            "gradient_accumulation_steps": accum,
            "num_workers": workers,
            "use_gpu": ON_GPU and workers == 1,
        },
    )


def _one_step(tiny_llama: Path, job: Path, run: Path, family: str, batch_size: int, accum: int) -> dict:
    spec = _step_spec(tiny_llama, family, batch_size, accum)
    train_policy(distill_task(spec, job, log_dir=str(run), checkpoint_dir=None))
    return [e for e in read_events(run) if e["kind"] == "metrics"][-1]["values"]


@pytest.mark.parametrize("family", ["min", "hull"])
def test_ensemble_choice_is_made_once_per_optimizer_step(tiny_llama, tmp_path, family):
    """The member (or mixture) is chosen on the step's whole batch: 4 micro-batches of 2 pairs give the choice and
    the gradient of 1 batch of 8. Chosen per micro-batch, the three micro-batches without pair 7 would pick member 0."""
    job = tmp_path / "job"
    _member_split_pairs(job, tiny_llama)
    whole = _one_step(tiny_llama, job, tmp_path / "whole", family, batch_size=8, accum=1)
    micro = _one_step(tiny_llama, job, tmp_path / "micro", family, batch_size=2, accum=4)
    # At step 0 the policy is π_ref (h = 0): member k's loss is mean Δr_k², (7·0.01 + 9)/8 for member 0, 0.09 for 1.
    if family == "min":
        assert whole["member_argmin_counts"] == [0.0, 1.0]
        assert micro["member_argmin_counts"] == [0.0, 4.0]  # member 1 in every micro-batch
    else:
        weights = np.array(micro["member_argmin_counts"]) / 4
        np.testing.assert_allclose(weights, whole["member_argmin_counts"], atol=1e-5)
        np.testing.assert_allclose(weights, [0.0, 1.0], atol=1e-5)  # no mixture beats member 1 on the whole step
    assert micro["grad_norm"] == pytest.approx(whole["grad_norm"], rel=1e-4)
    assert micro["loss"] == pytest.approx(whole["loss"], rel=1e-5)  # the mean of the step, whatever its split


@pytest.mark.ray
def test_two_workers_choose_the_member_of_the_whole_step(ray_cluster, tiny_llama, tmp_path):
    """2 DDP workers × 2 micro-batches of 2 pairs: the member statistics are all-reduced before the choice, so the
    update is that of 1 batch of 8 (compared through the gradient norm Ray Train's rank 0 logs)."""
    job = tmp_path / "job"
    _member_split_pairs(job, tiny_llama)
    whole = _one_step(tiny_llama, job, tmp_path / "whole", "min", batch_size=8, accum=1)
    run_distill(_step_spec(tiny_llama, "min", batch_size=2, accum=2, workers=2), job, EventLog(job))
    assert {e["threads"] for e in read_events(job) if "threads" in e} == {1}  # two workers share the two CPUs
    (placed,) = [e["workers"] for e in read_events(job) if "workers" in e]  # rank 0 records every worker's node
    assert [w["rank"] for w in placed] == [0, 1]
    assert {w["node_id"] for w in placed} == {ray_cluster.get_runtime_context().get_node_id()}
    values = [e for e in read_events(job) if e["kind"] == "metrics"][-1]["values"]
    assert values["member_argmin_counts"] == [0.0, 2.0]
    assert values["grad_norm"] == pytest.approx(whole["grad_norm"], rel=1e-4)


def test_policy_weights_stay_fp32_under_bf16_compute(tiny_llama, tmp_path):
    """On a GPU (precision auto) the policy trains in bf16 autocast on fp32 master weights: bf16 weights would
    round away most AdamW updates at lr 5e-6 (1.0 + 5e-6 == 1.0 in bf16)."""
    from ray_jobs.distill.loop import _load_policy

    assert torch.tensor(1.0, dtype=torch.bfloat16) + 5e-6 == 1.0  # why it matters
    task = distill_task(JobSpec(reference=str(tiny_llama), distill={"precision": "auto"}), tmp_path)
    model, _ = _load_policy(task, torch.device("cuda"))  # loaded on the CPU; only the dtype policy is asked
    assert {p.dtype for p in model.parameters()} == {torch.float32}


def test_small_updates_survive_bf16_compute(tiny_llama, pairs_job, tmp_path):
    """The end-to-end form of the test above, on whatever device the loop picks (the GPU where there is one): at
    lr 5e-6 each AdamW step moves a weight by about 5e-6, far below bf16's resolution at the tiny Llama's weight
    scale, so a policy stored in bf16 would come back almost unchanged. Under bf16 compute on fp32 master weights
    nearly every trained weight moves."""
    out = tmp_path / "policy"
    train_policy(_task(tiny_llama, pairs_job, tmp_path, steps=2, output=out, lr=5e-6, precision="bf16"))
    before = load_causal_lm(tiny_llama)[0].state_dict()
    after = load_causal_lm(out)[0].state_dict()
    assert {t.dtype for t in after.values()} == {torch.float32}
    changed = sum(int((after[name] != weight).sum()) for name, weight in before.items())
    total = sum(weight.numel() for weight in before.values())
    assert changed / total > 0.9, (changed, total)


def test_reference_logps_use_the_policys_precision_so_h_starts_at_zero(tiny_llama, tmp_path):
    """π_ref's log-probs come from the scoring actor under distill.precision; at step 0 the policy (= π_ref) then
    sees h = 0 (exactly on a CPU, within H_START_TOLERANCE on a GPU), while log-probs from another precision would
    start it off zero."""
    from ray_jobs.score.scorer import Scorer

    job = tmp_path / "job"
    write_pairs(job, tiny_llama, n_labelled=8, n_unlabelled=0, k=2)
    pairs = pd.read_parquet(JobLayout(job).pairs)
    responses = pairs["response_a"].tolist() + pairs["response_b"].tolist()
    batch = {
        "index": np.arange(16),
        "prompt": np.array(pairs["prompt"].tolist() * 2, dtype=object),
        "response": np.array(responses, dtype=object),
        "reward": np.zeros(16, dtype=bool),
        "ended": np.ones(16, dtype=bool),
    }
    shift = {}
    for ref_precision in ("bf16", "fp32"):
        ref = Scorer(str(tiny_llama), [], 512, 16, ref_precision=ref_precision)(batch)["ref_logp"]
        pairs["ref_logp_a"], pairs["ref_logp_b"] = ref[:8], ref[8:]
        pairs.to_parquet(JobLayout(job).pairs, index=False)
        spec = JobSpec(
            reference=str(tiny_llama),
            distill={"loss": "dpo", "batch_size": 8, "max_steps": 1, "precision": "bf16", "use_gpu": ON_GPU},
        )
        run = tmp_path / ref_precision
        train_policy(distill_task(spec, job, log_dir=str(run), checkpoint_dir=None))
        metrics = [e for e in read_events(run) if e["kind"] == "metrics"][-1]["values"]
        shift[ref_precision] = (metrics["logp_shift_chosen"], metrics["beta_h_max"])
    assert max(map(abs, shift["bf16"])) <= H_START_TOLERANCE, shift
    assert abs(shift["fp32"][0]) > MISMATCHED_H_START


def test_capped_responses_train_without_eos_as_they_were_scored(tiny_llama, tmp_path):
    """Pairs whose responses were cut at the generation cap were scored without EOS; the loop must leave it out
    too, or every capped pair starts training at h != 0 (a length signal nobody chose)."""
    from ray_jobs.score.scorer import Scorer

    job = tmp_path / "job"
    write_pairs(job, tiny_llama, n_labelled=0, n_unlabelled=8, k=2)
    pairs = pd.read_parquet(JobLayout(job).pairs)
    pairs["ended_a"] = [True, False] * 4
    pairs["ended_b"] = [False] * 8
    pairs = encode_pairs(pairs, load_tokenizer(str(tiny_llama)))  # the stored ids lose EOS as the scorer does
    batch = {
        "index": np.arange(16),
        "prompt": np.array(pairs["prompt"].tolist() * 2, dtype=object),
        "response": np.array(pairs["response_a"].tolist() + pairs["response_b"].tolist(), dtype=object),
        "reward": np.zeros(16, dtype=bool),
        "ended": np.array(pairs["ended_a"].tolist() + pairs["ended_b"].tolist()),
    }
    ref = Scorer(str(tiny_llama), [], 512, 16)(batch)["ref_logp"]
    pairs["ref_logp_a"], pairs["ref_logp_b"] = ref[:8], ref[8:]
    pairs.to_parquet(JobLayout(job).pairs, index=False)
    values = _one_step(tiny_llama, job, tmp_path / "run", "min", batch_size=8, accum=1)
    assert max(abs(values[key]) for key in ("logp_shift_a", "logp_shift_b", "beta_h_max")) <= H_START_TOLERANCE
