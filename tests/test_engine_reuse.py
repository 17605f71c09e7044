"""One π_ref engine per job: builtin:reviews' data stage and the generate stage sample on the engine the driver
holds, and get the texts that an engine of their own would give (issue #14)."""

from __future__ import annotations

import importlib.util
import shutil

import pytest

from ray_jobs.events import read_events
from ray_jobs.generate import cache
from ray_jobs.layout import JobLayout
from ray_jobs.pipeline import run_job
from ray_jobs.spec import parse_spec

pytestmark = [
    pytest.mark.ray,
    pytest.mark.vllm,
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed"),
]

SPEC = {
    "name": "engine-reuse",
    "reference": "tiny:llama",
    "data": {"source": "builtin:reviews", "num_prompts": 8, "test_fraction": 0.25, "candidates_per_prompt": 3},
    # temperature != 1 with alpha > 0: the KL samples are a third call with other sampling settings.
    "generation": {
        "engine": "vllm",
        "samples_per_prompt": 2,
        "max_new_tokens": 6,
        "temperature": 0.8,
        "batch_size": 4,
        "max_model_len": 256,
    },
    "distill": {"loss": "p-dpo", "alpha": 0.1},
}
STAGES = ["data", "generate"]


def _engine_starts(job_dir) -> list[tuple[str, str, int]]:
    return [(e["stage"], e["engine_started"], e["replicas"]) for e in read_events(job_dir) if "engine_started" in e]


def test_data_and_generate_share_one_reference_engine(ray_cluster, tiny_llama, tmp_path, monkeypatch):
    # A private sample cache, so the data stage samples instead of reading an earlier run's candidates.
    monkeypatch.setattr(cache, "model_cache", lambda: tmp_path / "cache")
    spec = parse_spec(SPEC)
    shared = tmp_path / "shared"
    summaries = run_job(spec, shared, only=STAGES)
    assert list(summaries) == STAGES and summaries["generate"]["engine"] == "vllm"
    assert not summaries["data"]["candidates_cached"]
    assert _engine_starts(shared) == [("data", "vllm", 1)]

    # The generate stage alone, resumed on a copy of the finished data stage, starts an engine of its own: the
    # shared engine, used by the data stage first, must have sampled exactly what that fresh one samples.
    alone = tmp_path / "alone"
    shutil.copytree(JobLayout(shared).stage("data"), JobLayout(alone).stage("data"))
    assert list(run_job(spec, alone, only=STAGES)) == ["generate"]
    assert _engine_starts(alone) == [("generate", "vllm", 1)]
    for path in (JobLayout(shared).candidates, JobLayout(shared).kl_samples):
        assert path.read_bytes() == (JobLayout(alone).stage("generate") / path.name).read_bytes(), path.name
