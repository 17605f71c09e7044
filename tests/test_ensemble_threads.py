"""An ensemble member computes with the torch threads its reservation gives it, wherever it runs (on Ray: see
test_ensemble.py's one-worker members, which train inside their Tune trials)."""

from __future__ import annotations

import torch
from support.data import write_job_data

from ray_jobs.ensemble.stage import member_tasks
from ray_jobs.ensemble.train import train_member
from ray_jobs.spec import EnsembleSpec


def test_plain_member_computes_with_the_threads_it_reserved_and_restores_them(tmp_path):
    job = write_job_data(tmp_path, n_train=16, n_test=8)
    spec = EnsembleSpec(size=1, backbone="tiny:bert", epochs=1, batch_size=8, max_length=64, cpus_per_worker=1.0)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        metrics = train_member(member_tasks(spec, job, job / "out")[0])
        assert metrics["torch_threads"] == 1
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
