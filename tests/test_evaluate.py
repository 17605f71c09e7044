"""Evaluation: a trained tiny policy against its reference, scored by VADER, reported with plots."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
from support.mlflow_runs import mlflow_run, series
from support.pairs import PROMPTS, write_pairs, write_test_data
from support.wandb_records import offline_run

from ray_jobs.distill.loop import distill_task, train_policy
from ray_jobs.evaluate.stage import (
    EvaluationError,
    chosen_responses,
    evaluation_prompts,
    kl_estimate,
    logratios,
    win_rate,
)
from ray_jobs.evaluate.stage import run as run_evaluation
from ray_jobs.events import EventLog
from ray_jobs.layout import JobLayout
from ray_jobs.spec import JobSpec


def test_win_rate_counts_ties_as_half_with_a_wilson_interval():
    result = win_rate([1.0, 2.0, 3.0, 4.0], [0.0, 2.0, 5.0, 1.0])
    assert (result["wins"], result["ties"], result["losses"]) == (2, 1, 1)
    assert result["rate"] == pytest.approx(0.625)
    # Wilson 95% for p̂ = 0.625, n = 4, worked by hand.
    assert result["lo"] == pytest.approx(0.2195, abs=1e-3)
    assert result["hi"] == pytest.approx(0.9081, abs=1e-3)
    with pytest.raises(ValueError, match="equal non-empty"):
        win_rate([], [])


@pytest.fixture(scope="module")
def trained_job(tmp_path_factory, tiny_llama) -> tuple[JobSpec, Path]:
    job = tmp_path_factory.mktemp("eval-job")
    write_pairs(job, tiny_llama, n_labelled=8, n_unlabelled=0)
    write_test_data(job)
    spec = JobSpec(
        reference=str(tiny_llama),
        distill={"loss": "dpo", "lr": 1e-2, "batch_size": 8, "max_steps": 3},
        generation={"engine": "hf"},
        evaluate={"oracle": "builtin:vader", "prompts": "held_out", "num_prompts": 3, "max_new_tokens": 8},
    )
    train_policy(distill_task(spec, job, checkpoint_dir=None, output_dir=str(JobLayout(job).policy)))
    return spec, job


def test_evaluation_writes_report_and_plots(trained_job):
    spec, job = trained_job
    summary = run_evaluation(spec, job, EventLog(job))
    report = json.loads(JobLayout(job).report.read_text())
    assert report["num_prompts"] == 3 == summary["num_prompts"]  # distinct held-out prompts, capped
    rate = report["win_rate"]
    assert 0.0 <= rate["lo"] <= rate["rate"] <= rate["hi"] <= 1.0
    assert rate["wins"] + rate["ties"] + rate["losses"] == 3
    assert set(report["reward"]) == {"policy_mean", "reference_mean"}
    assert math.isfinite(report["kl"]["estimate"])
    assert report["lengths"]["policy"]["mean_tokens"] > 0
    assert [e["prompt"] for e in report["examples"]] == PROMPTS[:3]
    for name in ("training_curves.png", "lengths.png", "rewards.png"):
        assert (JobLayout(job).stage("evaluate") / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(report["plots"]) == ["lengths.png", "rewards.png", "training_curves.png"]


def test_samples_are_kept_by_key_and_reference_samples_are_shared(trained_job, tmp_path):
    spec, job = trained_job
    two = spec.model_copy(
        update={"evaluate": spec.evaluate.model_copy(update={"samples_per_prompt": 2, "kl_prompts": 1})}
    )
    reports = []
    for copy in ("a", "b"):
        # Two jobs with the same reference, prompts and seed: judged against the very same reference samples.
        other = tmp_path / copy
        shutil.copytree(job, other, ignore=shutil.ignore_patterns("evaluate", ".partial"))
        run_evaluation(two, other, EventLog(other))
        reports.append(json.loads(JobLayout(other).report.read_text()))
    samples = reports[0]["samples"]
    assert samples["key"] == ["0:0", "0:1", "1:0", "1:1", "2:0", "2:1"]
    assert len(samples["policy"]) == len(samples["reference"]) == len(samples["policy_tokens"]) == 6
    assert reports[0]["win_rate"]["n"] == 6 and reports[0]["samples_per_prompt"] == 2
    assert reports[0]["kl"]["samples"] == 2  # KL on the first prompt's two samples only
    assert samples["reference"] == reports[1]["samples"]["reference"]
    wins = sum((p > r) + 0.5 * (p == r) for p, r in zip(samples["policy"], samples["reference"], strict=True))
    assert reports[0]["win_rate"]["rate"] == pytest.approx(wins / 6)
    # The training pairs prefer "a warm film": a finite log-ratio, computed on them.
    assert math.isfinite(reports[0]["chosen_logratio"])


def test_evaluation_results_reach_the_trackers(trained_job, tmp_path):
    spec, job = trained_job
    other = tmp_path / "job-eval01"
    shutil.copytree(job, other, ignore=shutil.ignore_patterns("evaluate", ".partial", "tensorboard"))
    tracking = {"mlflow": {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment": "eval"}, "wandb": {}}
    tracked = JobSpec.model_validate({**spec.model_dump(), "tracking": tracking})
    run_evaluation(tracked, other, EventLog(other))
    report = json.loads(JobLayout(other).report.read_text())
    want = {
        "win_rate": report["win_rate"]["rate"],
        "kl": report["kl"]["estimate"],
        "reward_policy_mean": report["reward"]["policy_mean"],
        "policy_mean_tokens": report["lengths"]["policy"]["mean_tokens"],
        "reference_capped": report["lengths"]["reference"]["capped"],
    }
    client, run = mlflow_run(tmp_path / "mlflow.db", "eval", "job-eval01", "evaluate")
    for key, value in want.items():
        assert series(client, run, key) == [(0, pytest.approx(value))], key
    assert run.data.params["oracle"] == "builtin:vader"  # the evaluate section is the run's parameters
    (run_dir,) = (other / "wandb" / "wandb").glob("offline-run-*")
    info, history = offline_run(run_dir)
    assert info["tags"] == ["job-eval01", "evaluate"]
    assert {key: history[0][key] for key in want} == pytest.approx(want)
    assert list((other / "tensorboard" / "evaluate").glob("events.out.tfevents.*"))


def test_chosen_logratio_of_the_reference_itself_is_zero(tiny_llama, tmp_path):
    write_test_data(tmp_path)
    spec = JobSpec(reference=str(tiny_llama), evaluate={"chosen_pairs": 2})
    chosen = chosen_responses(spec, JobLayout(tmp_path))
    assert len(chosen.responses) == 2 and set(chosen.responses) == {"a warm film"}  # label 0: response_b preferred
    [diff] = logratios(Path(tiny_llama), tiny_llama, [chosen])
    assert float(diff.mean()) == pytest.approx(0.0, abs=1e-6)
    none = JobSpec(reference=str(tiny_llama), evaluate={"chosen_pairs": 0})
    assert chosen_responses(none, JobLayout(tmp_path)) is None


def test_evaluation_prompts_fixed_set_held_out_or_a_file(tiny_llama, tmp_path):
    from ray_jobs.data.reviews import eval_prompts

    write_test_data(tmp_path)
    layout = JobLayout(tmp_path)
    builtin = JobSpec(reference=str(tiny_llama), data={"apply_chat_template": False}, evaluate={"num_prompts": 500})
    assert evaluation_prompts(builtin, layout) == eval_prompts() and len(eval_prompts()) == 200
    held_out = JobSpec(reference=str(tiny_llama), evaluate={"prompts": "held_out", "num_prompts": 2})
    assert evaluation_prompts(held_out, layout) == PROMPTS[:2]
    (tmp_path / "p.txt").write_text("first prompt\n\nsecond prompt\n")
    from_file = JobSpec(
        reference=str(tiny_llama), data={"apply_chat_template": False}, evaluate={"prompts": str(tmp_path / "p.txt")}
    )
    assert evaluation_prompts(from_file, layout) == ["first prompt", "second prompt"]
    missing = JobSpec(reference=str(tiny_llama), evaluate={"prompts": str(tmp_path / "none.txt")})
    with pytest.raises(EvaluationError, match="none.txt"):
        evaluation_prompts(missing, layout)


def test_kl_of_a_model_with_itself_is_zero(tiny_llama):
    kl, _ = kl_estimate(tiny_llama, tiny_llama, PROMPTS, ["the film was good", "a long slow book", "x", "y"], 64)
    assert kl == pytest.approx(0.0, abs=1e-6)


def test_evaluation_without_a_policy_fails_naming_it(tiny_llama, tmp_path):
    write_test_data(tmp_path)
    with pytest.raises(EvaluationError, match="policy"):
        run_evaluation(JobSpec(reference=str(tiny_llama)), tmp_path, EventLog(tmp_path))
    assert not JobLayout(tmp_path).is_complete("evaluate")
