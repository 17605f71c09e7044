"""Memory and precision options of the ensemble and scoring stages, as distillation has them: gradient checkpointing
really recomputes (read off the model) and changes no result; the reward models score under score.precision."""

from __future__ import annotations

import json

import numpy as np
import pytest
from support.data import write_job_data
from support.pairs import write_pairs

from ray_jobs.distill.loop import distill_task, train_policy
from ray_jobs.ensemble.stage import member_tasks
from ray_jobs.ensemble.train import train_member
from ray_jobs.events import read_events
from ray_jobs.score.scorer import Scorer
from ray_jobs.spec import EnsembleSpec, JobSpec


def test_member_gradient_checkpointing_recomputes_and_learns_the_same(tmp_path):
    job = write_job_data(tmp_path, n_train=16, n_test=8)
    spec = EnsembleSpec(size=1, backbone="tiny:bert", diversity="seed", lr=1e-3, batch_size=8, max_length=64, epochs=1)
    runs = {}
    for checkpointing in (False, True):
        member = spec.model_copy(update={"gradient_checkpointing": checkpointing})
        runs[checkpointing] = train_member(member_tasks(member, job, job / f"out-{checkpointing}")[0])
    assert (runs[False]["gradient_checkpointing"], runs[True]["gradient_checkpointing"]) == (False, True)
    saved = json.loads((job / "out-True" / "member-0" / "metrics.json").read_text())
    assert saved["gradient_checkpointing"] is True
    np.testing.assert_allclose(runs[True]["heldout_margins"], runs[False]["heldout_margins"], atol=1e-4)


def test_policy_gradient_checkpointing_recomputes_and_trains_the_same(tmp_path, tiny_llama):
    write_pairs(tmp_path / "job", tiny_llama)
    losses = {}
    for checkpointing in (False, True):
        distill = {"loss": "dpo", "batch_size": 16, "lr": 1e-3, "max_steps": 2, "gradient_checkpointing": checkpointing}
        run = tmp_path / f"run-{checkpointing}"
        train_policy(
            distill_task(JobSpec(reference=str(tiny_llama), distill=distill), tmp_path / "job", log_dir=str(run))
        )
        events = list(read_events(run))
        assert next(e for e in events if "threads" in e)["gradient_checkpointing"] is checkpointing
        losses[checkpointing] = [e["values"]["loss"] for e in events if e["kind"] == "metrics"]
    assert losses[True] == pytest.approx(losses[False], abs=1e-5)


def test_members_score_under_the_score_precision(tiny_bert):
    prompts = ["Review of the film: ", "Review of the book: "] * 4
    responses = ["the film was wonderful and lovely.", "the book is bad, I hated it."] * 4
    batch = {
        "index": np.arange(8),
        "prompt": np.array(prompts, dtype=object),
        "response": np.array(responses, dtype=object),
        "reward": np.ones(8, dtype=bool),
        "ended": np.ones(8, dtype=bool),
    }
    rewards = {
        precision: Scorer(None, [(str(tiny_bert), 64)], 512, 8, member_precision=precision)(batch)["rewards"][:, 0]
        for precision in ("fp32", "bf16")
    }
    assert not np.array_equal(rewards["bf16"], rewards["fp32"])  # bf16 compute really ran
    np.testing.assert_allclose(rewards["bf16"], rewards["fp32"], atol=0.05)


@pytest.mark.parametrize(
    ("cpuinfo", "native"),
    [
        ("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512bw avx512vl\n", False),  # AVX-512 alone emulates bf16
        ("processor\t: 0\nflags\t\t: fpu avx512f avx512_bf16 avx512_vnni\n", True),  # Zen 4, Cooper Lake
        ("processor\t: 0\nflags\t\t: fpu avx512f amx_bf16 amx_tile\n", True),  # Sapphire Rapids
        ("processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\n", True),  # Graviton 3
        ("processor\t: 0\nFeatures\t: fp asimd crc32\n", False),  # Graviton 2
    ],
)
def test_auto_precision_is_bf16_only_on_cpus_that_compute_it_natively(tmp_path, monkeypatch, cpuinfo, native):
    import torch

    from ray_jobs import precision

    path = tmp_path / "cpuinfo"
    path.write_text(cpuinfo)
    assert precision.cpu_has_bf16_units(path) is native
    monkeypatch.setattr(precision, "cpu_has_bf16_units", lambda: native)
    assert precision.uses_bf16("auto", torch.device("cpu")) is native
    assert precision.uses_bf16("auto", torch.device("cuda")) is True
    assert (precision.uses_bf16("fp32", torch.device("cuda")), precision.uses_bf16("bf16", torch.device("cpu"))) == (
        False,
        True,
    )


def test_a_machine_without_cpuinfo_stays_in_fp32(tmp_path):
    from ray_jobs.precision import cpu_has_bf16_units

    assert cpu_has_bf16_units(tmp_path / "absent") is False
