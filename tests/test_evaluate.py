"""Evaluation: a trained tiny policy against its reference, scored by VADER, reported with plots."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from support.pairs import PROMPTS, write_pairs, write_test_data

from ray_jobs.distill.loop import distill_task, train_policy
from ray_jobs.evaluate.stage import EvaluationError, kl_estimate, win_rate
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
        evaluate={"oracle": "builtin:vader", "num_prompts": 3, "max_new_tokens": 8},
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


def test_kl_of_a_model_with_itself_is_zero(tiny_llama):
    kl, _ = kl_estimate(tiny_llama, tiny_llama, PROMPTS, ["the film was good", "a long slow book", "x", "y"], 64)
    assert kl == pytest.approx(0.0, abs=1e-6)


def test_evaluation_without_a_policy_fails_naming_it(tiny_llama, tmp_path):
    write_test_data(tmp_path)
    with pytest.raises(EvaluationError, match="policy"):
        run_evaluation(JobSpec(reference=str(tiny_llama)), tmp_path, EventLog(tmp_path))
    assert not JobLayout(tmp_path).is_complete("evaluate")
