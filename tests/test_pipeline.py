"""The job driver end to end on tiny models and a real local Ray: artifacts, events, resume, failure."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from support.data import write_prefs

from ray_jobs.events import read_events
from ray_jobs.layout import JobLayout
from ray_jobs.pipeline import main, planned_stages, run_job
from ray_jobs.spec import SpecError, parse_spec


def tiny_spec(source: Path, **distill) -> dict:
    return {
        "name": "tiny",
        "reference": "tiny:llama",
        "data": {"source": str(source), "test_fraction": 0.25},
        "ensemble": {"size": 2, "backbone": "tiny:bert", "epochs": 1, "batch_size": 8, "cpus_per_worker": 0.5},
        "generation": {"engine": "hf", "samples_per_prompt": 2, "max_new_tokens": 8, "max_prompts": 8},
        "score": {"batch_size": 16, "max_length": 96},
        "distill": {"loss": "e-dpo", "max_steps": 3, "batch_size": 4, "lr": 1e-3, "max_length": 96, **distill},
        "evaluate": {"oracle": "builtin:vader", "num_prompts": 4, "max_new_tokens": 8},
    }


@pytest.fixture(scope="module")
def finished_job(tmp_path_factory, ray_cluster, tiny_llama, tiny_bert):
    root = tmp_path_factory.mktemp("pipeline")
    spec = parse_spec(tiny_spec(write_prefs(root / "prefs.jsonl")))
    job_dir = root / "job"
    summaries = run_job(spec, job_dir)
    return spec, job_dir, summaries


def test_whole_pipeline_writes_the_designed_artifacts(finished_job):
    spec, job_dir, summaries = finished_job
    assert list(summaries) == planned_stages(spec) == ["data", "generate", "ensemble", "score", "distill", "evaluate"]
    assert json.loads((job_dir / "spec.json").read_text())["distill"]["loss"] == "e-dpo"
    train = pd.read_parquet(job_dir / "data" / "train.parquet")
    test = pd.read_parquet(job_dir / "data" / "test.parquet")
    assert len(train) + len(test) == 24 and not set(train.prompt) & set(test.prompt)
    manifest = json.loads((job_dir / "ensemble" / "manifest.json").read_text())
    assert len(manifest["members"]) == 2
    for k in range(2):
        assert (job_dir / "ensemble" / f"member-{k}" / "metrics.json").is_file()
    pairs = pd.read_parquet(JobLayout(job_dir).pairs)
    expected = {"prompt", "response_a", "response_b", "source", "label", "ref_logp_a", "ref_logp_b"}
    assert expected | {"rewards_a", "rewards_b"} <= set(pairs.columns)
    assert set(pairs.source) <= {"dataset", "generated"} and (pairs.source == "dataset").sum() == len(train)
    assert all(len(r) == 2 for r in pairs.rewards_a)
    assert (JobLayout(job_dir).policy / "config.json").is_file()
    report = json.loads(JobLayout(job_dir).report.read_text())
    win = report["win_rate"]
    assert 0.0 <= win["lo"] <= win["rate"] <= win["hi"] <= 1.0
    assert win["n"] == min(spec.evaluate.num_prompts, len(set(test.prompt)))
    assert not (job_dir / ".partial").exists() or not any((job_dir / ".partial").iterdir())


def test_the_policy_card_tells_how_the_policy_was_trained_and_how_it_did(finished_job):
    spec, job_dir, summaries = finished_job
    card = (JobLayout(job_dir).policy / "README.md").read_text()
    win = json.loads(JobLayout(job_dir).report.read_text())["win_rate"]
    manifest = json.loads(JobLayout(job_dir).manifest.read_text())
    assert card.startswith("---\nbase_model: tiny:llama\nlibrary_name: transformers\n")
    assert "**tiny:llama** with the loss **e-dpo**" in card and "family min" in card
    assert f"{summaries['data']['train']} training and {summaries['data']['test']} held-out pairs" in card
    assert f"| 1 | trained | tiny:bert | {manifest['accuracies'][1]:.4g} |" in card
    assert f"{summaries['distill']['steps']} optimizer steps" in card
    # Written again once the evaluation was done: its win rate, not "Not evaluated yet."
    assert f"by builtin:vader: {win['rate']:.4g} (95% interval {win['lo']:.4g}–{win['hi']:.4g}, n = {win['n']})" in card


def test_events_tell_the_story(finished_job):
    _, job_dir, _ = finished_job
    events = list(read_events(job_dir))
    kinds = [e["kind"] for e in events]
    assert kinds[0] == "job_started" and events[-1] == {**events[-1], "kind": "job_finished", "status": "succeeded"}
    finished = [e["stage"] for e in events if e["kind"] == "stage_finished"]
    assert finished == ["data", "generate", "ensemble", "score", "distill", "evaluate"]
    assert any(e["kind"] == "metrics" and e["stage"] == "distill" for e in events)
    assert any(e["kind"] == "metrics" and e["stage"] == "ensemble" for e in events)


def test_a_job_starts_each_model_once(finished_job):
    """π_ref starts once, for data, generation and evaluation's reference samples alike; the policy starts once in
    evaluation, for its samples at evaluation's temperature (0.7 here) and its KL samples at temperature 1."""
    _, job_dir, _ = finished_job
    starts = [(e["stage"], e["engine_started"]) for e in read_events(job_dir) if "engine_started" in e]
    assert starts == [("generate", "hf"), ("evaluate", "hf")]
    report = json.loads((job_dir / "evaluate" / "report.json").read_text())
    assert report["kl"]["samples"] == 4 and len(report["samples"]["reference"]) == 4


def test_rerunning_a_finished_job_does_no_work(finished_job):
    spec, job_dir, _ = finished_job
    before = {p: p.stat().st_mtime_ns for p in job_dir.rglob("*") if p.is_file() and p.name != "events.jsonl"}
    n_events = len(list(read_events(job_dir)))
    assert run_job(spec, job_dir) == {}
    new = list(read_events(job_dir, offset=n_events))
    assert [e["kind"] for e in new].count("stage_skipped") == 6
    assert not [e for e in new if e["kind"] == "stage_started"]
    assert before == {p: p.stat().st_mtime_ns for p in before}


def test_reuse_pairs_from_an_earlier_job_trains_another_loss(finished_job, tmp_path):
    spec, job_dir, _ = finished_job
    data = tiny_spec(Path(spec.data.source), loss="dpo")
    data["reuse"] = {"pairs": str(job_dir)}
    data["evaluate"]["oracle"] = None
    summaries = run_job(parse_spec(data), tmp_path / "dpo-job")
    assert list(summaries) == ["distill"]
    assert JobLayout(tmp_path / "dpo-job").pairs.is_file()
    meta = json.loads(JobLayout(tmp_path / "dpo-job").policy_info.read_text())
    assert meta["loss"] == "dpo"


def test_reuse_refuses_pairs_scored_with_another_truncation(finished_job, tmp_path):
    """π_ref's log-probs in the pairs were computed at distill.max_length 96: a job training at 64 would start with
    h != 0 on every truncated pair, so reuse is refused before anything is copied."""
    spec, job_dir, _ = finished_job
    assert json.loads(JobLayout(job_dir).scored_with.read_text())["ref_max_length"] == 96
    data = tiny_spec(Path(spec.data.source), loss="dpo", max_length=64)
    data["reuse"] = {"pairs": str(job_dir)}
    with pytest.raises(SpecError, match=r"reuse.pairs: .*distill.max_length = 96, this job trains with 64"):
        run_job(parse_spec(data), tmp_path / "job")
    assert not JobLayout(tmp_path / "job").is_complete("score")


def test_a_bad_row_fails_the_data_stage_and_publishes_nothing(tmp_path, ray_cluster):
    source = write_prefs(tmp_path / "prefs.jsonl")
    with source.open("a") as fh:
        fh.write(json.dumps({"prompt": "p", "chosen": "", "rejected": "x"}) + "\n")
    spec_path = tmp_path / "spec.json"
    spec_path.write_text(json.dumps(tiny_spec(source)))
    job_dir = tmp_path / "job"
    assert main(["--spec", str(spec_path), "--job-dir", str(job_dir)]) == 1
    errors = [e for e in read_events(job_dir) if e["kind"] == "error"]
    assert errors and errors[0]["stage"] == "data" and "25" in errors[0]["message"]
    assert [e for e in read_events(job_dir)][-1]["status"] == "failed"
    assert not JobLayout(job_dir).is_complete("data")


def test_cli_rejects_a_bad_spec_naming_the_field(tmp_path):
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text("distill:\n  beta: -1\n")
    proc = subprocess.run(
        [sys.executable, "-m", "ray_jobs.pipeline", "--spec", str(spec_path), "--job-dir", str(tmp_path / "j")],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert "distill.beta: must be > 0" in proc.stderr
    assert not (tmp_path / "j").exists()


def test_sigterm_cancels_a_running_job(tmp_path):
    """Ray's job stop sends SIGTERM: the job must end as cancelled (exit 143), not as a failure."""
    spec_path = tmp_path / "spec.json"
    spec_path.write_text(json.dumps(tiny_spec(write_prefs(tmp_path / "prefs.jsonl"))))
    job_dir = tmp_path / "job"
    env = {**os.environ, "RAY_ADDRESS": ""}
    cmd = [sys.executable, "-m", "ray_jobs.pipeline", "--spec", str(spec_path), "--job-dir", str(job_dir)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and not any(e["kind"] == "stage_started" for e in read_events(job_dir)):
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 143
    last = list(read_events(job_dir))[-1]
    assert (last["kind"], last["status"]) == ("job_finished", "cancelled")
