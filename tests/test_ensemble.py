"""The ensemble stage: the plain Bradley–Terry loop, member diversity, and K tiny:bert members fitted as Ray Tune
trials of Ray Train runs on the session's real local Ray cluster (concurrent, retried after an injected failure)."""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from support.data import write_job_data
from support.ray_nodes import NO_DRAIN, RAY, free_ports, node_ports, stop

from ray_jobs.ensemble.stage import FAIL_ONCE_ENV, EnsembleError, load_members, member_tasks
from ray_jobs.ensemble.stage import run as run_ensemble
from ray_jobs.ensemble.train import MemberTask, PreferenceDataError, bt_loss, load_pairs, member_rows, train_member
from ray_jobs.events import EventLog, read_events
from ray_jobs.layout import JobLayout
from ray_jobs.spec import EnsembleSpec, JobSpec, LoraSpec, MemberOverride


def plain_task(job_dir: Path, **overrides) -> MemberTask:
    # fp32: these tests compare a reloaded member's scores with the ones it reported to 1e-4, which bf16 (`auto` on
    # a CPU with bf16 units) does not reproduce across batch shapes.
    spec = EnsembleSpec(
        size=1, backbone="tiny:bert", diversity="seed", lr=1e-3, batch_size=8, max_length=64, precision="fp32"
    )
    return member_tasks(spec.model_copy(update=overrides), job_dir, job_dir / "out")[0]


# ---------------------------------------------------------------- pure pieces


def test_bt_loss_matches_closed_form_with_margin_and_centering():
    r_w, r_l = torch.tensor([2.0, -1.0]), torch.tensor([0.5, 1.0])
    expected = -np.mean([math.log(1 / (1 + math.exp(-(1.5 - 0.3)))), math.log(1 / (1 + math.exp(-(-2.0 - 0.3))))])
    expected += 0.1 * np.mean([2.5**2, 0.0**2])
    assert bt_loss(r_w, r_l, margin=0.3, center=0.1).item() == pytest.approx(expected, rel=1e-6)
    # Stable far out in the tail: no exp overflow.
    assert bt_loss(torch.tensor([-500.0]), torch.tensor([500.0])).item() == pytest.approx(1000.0)


def test_member_rows_diversity():
    assert member_rows(10, "seed", 1, 3, member_seed=5, data_seed=0).tolist() == list(range(10))
    boot = [member_rows(50, "bootstrap", k, 3, member_seed=k, data_seed=0) for k in range(3)]
    assert all(len(b) == 50 for b in boot)
    assert all(len(np.unique(b)) < 50 for b in boot)  # with replacement
    assert not np.array_equal(boot[0], boot[1])
    assert np.array_equal(boot[2], member_rows(50, "bootstrap", 2, 3, member_seed=2, data_seed=0))
    parts = [member_rows(10, "disjoint", k, 3, member_seed=k, data_seed=7) for k in range(3)]
    assert sorted(np.concatenate(parts).tolist()) == list(range(10))
    assert [len(p) for p in parts] == [4, 3, 3]
    with pytest.raises(PreferenceDataError, match="at least 3"):
        member_rows(2, "disjoint", 0, 3, member_seed=0, data_seed=0)


def test_member_tasks_apply_overrides(tmp_path):
    spec = EnsembleSpec(
        size=3,
        backbone="tiny:bert",
        lr=1e-4,
        seed=10,
        members=[MemberOverride(lr=5e-4, lora_r=4), MemberOverride(backbone="builtin:minilm-l6", seed=99)],
    )
    c = member_tasks(spec, tmp_path, tmp_path / "out")
    assert [m.spec.backbone for m in c] == ["tiny:bert", "builtin:minilm-l6", "tiny:bert"]
    assert [m.spec.lr for m in c] == [5e-4, 1e-4, 1e-4]
    assert [m.spec.seed for m in c] == [10, 99, 12]
    assert [m.data_seed for m in c] == [10, 10, 10]
    assert c[0].spec.lora.r == 4 and c[1].spec.lora is None
    assert c[2].out_dir == str(tmp_path / "out" / "member-2")
    assert all(m.fail_once_marker is None for m in c)
    # Each member sees its own overrides only, and every other field of the section as declared.
    assert all(m.spec.members == [] and m.spec.size == 3 for m in c)


def test_load_pairs_orients_winners_and_rejects_bad_data(tmp_path):
    frame = pd.DataFrame(
        {
            "prompt": ["p", "q", "r"],
            "response_a": ["a1", "a2", "a3"],
            "response_b": ["b1", "b2", "b3"],
            "label": [1, 0, None],
        }
    ).astype({"label": "Int8"})
    frame.to_parquet(tmp_path / "ok.parquet")
    pairs = load_pairs(tmp_path / "ok.parquet")
    assert pairs == {"prompt": ["p", "q"], "chosen": ["a1", "b2"], "rejected": ["b1", "a2"]}
    frame.drop(columns=["response_b"]).to_parquet(tmp_path / "nocol.parquet")
    with pytest.raises(PreferenceDataError, match="response_b"):
        load_pairs(tmp_path / "nocol.parquet")
    frame.assign(label=pd.array([None, None, None], dtype="Int8")).to_parquet(tmp_path / "nolabel.parquet")
    with pytest.raises(PreferenceDataError, match="no labelled pairs"):
        load_pairs(tmp_path / "nolabel.parquet")
    with pytest.raises(PreferenceDataError, match="does not exist"):
        load_pairs(tmp_path / "missing.parquet")


# ---------------------------------------------------------------- the plain loop (no Ray)


def test_plain_loop_learns_and_saves_reloadable_checkpoint(tmp_path):
    from ray_jobs.models.registry import load_reward_model
    from ray_jobs.models.reward import score_pairs

    job = write_job_data(tmp_path)
    metrics = train_member(plain_task(job, epochs=3))
    out = job / "out" / "member-0"
    assert json.loads((out / "metrics.json").read_text())["accuracy"] == metrics["accuracy"]
    # Losses fall below chance on the held-out pairs (the sentiment words separate them).
    assert metrics["loss"] < math.log(2) and metrics["accuracy"] >= 0.75
    assert [h["epoch"] for h in metrics["history"]] == [1, 2, 3]
    model, tokenizer = load_reward_model(out)
    test = load_pairs(job / "data" / "test.parquet")
    r_w = score_pairs(model.eval(), tokenizer, test["prompt"], test["chosen"], max_length=64)
    r_l = score_pairs(model, tokenizer, test["prompt"], test["rejected"], max_length=64)
    np.testing.assert_allclose((r_w - r_l).numpy(), metrics["heldout_margins"], atol=1e-4)


def _flip_validation_labels(job: Path) -> None:
    """Make the prompts a member holds out for validation prefer the negative review: the better the model learns
    the other training prompts, the worse its validation loss gets."""
    from ray_jobs.data.split import split_by_prompt

    train = pd.read_parquet(JobLayout(job).train)
    held = np.array(split_by_prompt(train["prompt"].tolist(), EnsembleSpec().validation_fraction, seed=0))
    assert 0 < held.sum() < len(train)
    train.loc[held, "label"] = 1 - train.loc[held, "label"]
    train.to_parquet(JobLayout(job).train)


def _margins_of(out: Path, job: Path) -> np.ndarray:
    from ray_jobs.models.registry import load_reward_model
    from ray_jobs.models.reward import score_pairs

    model, tokenizer = load_reward_model(out)
    test = load_pairs(JobLayout(job).test)
    r_w = score_pairs(model.eval(), tokenizer, test["prompt"], test["chosen"], max_length=64)
    return (r_w - score_pairs(model, tokenizer, test["prompt"], test["rejected"], max_length=64)).numpy()


def test_early_stopping_keeps_the_best_validation_epoch(tmp_path):
    job = write_job_data(tmp_path)
    _flip_validation_labels(job)
    metrics = train_member(plain_task(job, epochs=6, lr=3e-3, early_stopping_patience=1))
    losses = [h["validation_loss"] for h in metrics["history"]]
    assert metrics["epochs_run"] < 6 and metrics["selected_by"] == "validation"
    assert metrics["best_epoch"] == int(np.argmin(losses)) + 1
    assert metrics["validation_loss"] == min(losses)


def test_saved_weights_are_the_epoch_the_metrics_describe(tmp_path):
    """Without early stopping the member still keeps its chosen epoch: its saved weights give that epoch's margins,
    not the last epoch's."""
    job = write_job_data(tmp_path)
    _flip_validation_labels(job)
    metrics = train_member(plain_task(job, epochs=4, lr=3e-3))
    assert metrics["best_epoch"] < metrics["epochs_run"] == 4  # the last epoch is not the chosen one
    np.testing.assert_allclose(_margins_of(job / "out" / "member-0", job), metrics["heldout_margins"], atol=1e-4)


def test_the_test_split_never_chooses_the_epoch(tmp_path):
    """The test split holds the evaluation prompts: its labels here prefer the negative review, so its loss rises
    as the member learns, while validation (from the training prompts) keeps improving. The choice follows
    validation."""
    job = write_job_data(tmp_path, prefer_bad_test=True)
    metrics = train_member(plain_task(job, epochs=3, lr=3e-3))
    validation = [h["validation_loss"] for h in metrics["history"]]
    test = [h["loss"] for h in metrics["history"]]
    assert metrics["best_epoch"] == int(np.argmin(validation)) + 1
    assert metrics["best_epoch"] > int(np.argmin(test)) + 1


def test_lora_member_is_saved_merged(tmp_path):
    job = write_job_data(tmp_path, n_train=16, n_test=8)
    train_member(plain_task(job, epochs=1, lora=LoraSpec(r=4, alpha=8.0)))
    out = job / "out" / "member-0"
    assert (out / "config.json").is_file() and not (out / "adapter_config.json").exists()
    assert json.loads((out / "metrics.json").read_text())["lora_r"] == 4


# ---------------------------------------------------------------- on Ray: Tune trials of Train runs

ENSEMBLE_SPEC = {
    "ensemble": {
        "size": 3,
        "backbone": "tiny:bert",
        "diversity": "bootstrap",
        "epochs": 2,
        "lr": 1e-3,
        "batch_size": 8,
        "max_length": 64,
        "cpus_per_worker": 0.5,
        "max_retries": 1,
        "precision": "fp32",  # reloaded members must reproduce their reported margins to 1e-4 (see plain_task)
    }
}


@pytest.fixture(scope="module")
def fitted(ray_cluster, tmp_path_factory):
    """One K=3 ensemble run shared by the Ray tests; member 1's first attempt is made to fail."""
    job = write_job_data(tmp_path_factory.mktemp("job"))
    spec = JobSpec.model_validate(ENSEMBLE_SPEC)
    mp = pytest.MonkeyPatch()
    mp.setenv(FAIL_ONCE_ENV, "1")
    try:
        summary = run_ensemble(spec, job, EventLog(job))
    finally:
        mp.undo()
    return job, summary


@pytest.mark.ray
def test_ensemble_members_finish_and_manifest_summarises_them(fitted):
    job, summary = fitted
    manifest = json.loads((job / "ensemble" / "manifest.json").read_text())
    assert manifest["size"] == 3 and [m["path"] for m in manifest["members"]] == ["member-0", "member-1", "member-2"]
    assert manifest["backbones"] == ["tiny:bert"] and manifest["diversity"] == "bootstrap"
    members = [json.loads((job / "ensemble" / f"member-{k}" / "metrics.json").read_text()) for k in range(3)]
    assert manifest["accuracies"] == [m["accuracy"] for m in members] == summary["accuracies"]
    margins = np.array([m["heldout_margins"] for m in members])
    assert manifest["margin_std"] == pytest.approx(margins.std(axis=0).mean()) and manifest["margin_std"] > 0
    assert manifest["ensemble_mean_accuracy"] == pytest.approx(np.mean(margins.mean(axis=0) > 0))
    assert manifest["nodes"] and all(m["node_id"] for m in members)
    # Nothing half-done is left behind: no partial folder, no attempt counters or failure markers.
    assert not (job / ".partial" / "ensemble").exists()
    assert sorted(p.name for p in (job / "ensemble").iterdir()) == ["manifest.json", "member-0", "member-1", "member-2"]


@pytest.mark.ray
def test_failed_member_is_retried_and_events_tell_the_story(fitted):
    job, _ = fitted
    attempts = [
        json.loads((job / "ensemble" / f"member-{k}" / "metrics.json").read_text())["attempt"] for k in range(3)
    ]
    assert attempts == [1, 2, 1]
    events = list(read_events(job))
    started = [e["member"] for e in events if e.get("event") == "member_started"]
    assert sorted(started) == [0, 1, 1, 2]
    finished = [e for e in events if e.get("event") == "member_finished"]
    assert sorted(e["member"] for e in finished) == [0, 1, 2]
    epochs = [(e["member"], e["step"]) for e in events if e.get("event") == "epoch_done"]
    # Member 1 reported epoch 1 twice: once before its injected failure, once on the retry.
    assert sorted(epochs) == [(0, 1), (0, 2), (1, 1), (1, 1), (1, 2), (2, 1), (2, 2)]
    assert {"loss", "accuracy", "train_loss"} <= set(
        next(e for e in events if e.get("event") == "epoch_done")["values"]
    )


@pytest.mark.ray
def test_members_ran_concurrently(fitted):
    job, _ = fitted
    manifest = json.loads((job / "ensemble" / "manifest.json").read_text())
    windows = [(m["start_time"], m["end_time"]) for m in manifest["members"]]
    assert all(start < end for start, end in windows)
    # Members 0 and 2 ran once each, launched together: their windows overlap. (Member 1's window is its retry.)
    assert max(windows[0][0], windows[2][0]) < min(windows[0][1], windows[2][1])


@pytest.mark.ray
def test_one_worker_members_train_in_their_trials_on_the_threads_they_reserved(fitted):
    job, _ = fitted
    trials = {e["member"]: e for e in read_events(job) if e.get("event") == "member_finished"}
    for k in range(3):
        metrics = json.loads((job / "ensemble" / f"member-{k}" / "metrics.json").read_text())
        # No Train worker group of its own: its start-up cost as much as the training (bench/ensemble_scaling.py).
        assert metrics["pid"] == trials[k]["trial_pid"]
        assert metrics["torch_threads"] == 1  # cpus_per_worker 0.5


@pytest.mark.ray
def test_checkpoints_reload_score_pairs_and_differ(fitted):
    from ray_jobs.models.registry import load_reward_model
    from ray_jobs.models.reward import score_pairs

    job, _ = fitted
    members = load_members(job / "ensemble")
    assert members == [(job / "ensemble" / f"member-{k}", 64) for k in range(3)]  # with the budget they trained at
    paths = [path for path, _ in members]
    test = load_pairs(job / "data" / "test.parquet")
    scores = []
    for path in paths:
        model, tokenizer = load_reward_model(path)
        r_w = score_pairs(model.eval(), tokenizer, test["prompt"], test["chosen"], max_length=64)
        r_l = score_pairs(model, tokenizer, test["prompt"], test["rejected"], max_length=64)
        saved = json.loads((path / "metrics.json").read_text())["heldout_margins"]
        np.testing.assert_allclose((r_w - r_l).numpy(), saved, atol=1e-4)
        scores.append(r_w.numpy())
    # Bootstrap members saw different resamples in a different order: they score the same pair differently.
    assert not np.allclose(scores[0], scores[1], atol=1e-4) and not np.allclose(scores[1], scores[2], atol=1e-4)


@pytest.mark.ray
def test_run_ensemble_refuses_without_data(ray_cluster, tmp_path):
    with pytest.raises(EnsembleError, match="train.parquet is missing"):
        run_ensemble(JobSpec.model_validate(ENSEMBLE_SPEC), tmp_path, EventLog(tmp_path))
    assert not (tmp_path / "ensemble").exists()


def test_load_members_of_missing_ensemble_is_empty(tmp_path):
    assert load_members(tmp_path / "ensemble") == []


# ---------------------------------------------------------------- 2-node cluster
# Each node is a `ray start --block` child of this test (support/ray_nodes.py). The ensemble runs
# in a subprocess (`python -m ray_jobs.ensemble` with RAY_ADDRESS) so it cannot collide with the session's in-process
# cluster. Slow (two node start-ups plus a member fit): marked `slow`.

NODES_PROBE = (
    "import json, ray; ray.init(address='{address}', log_to_driver=False); "
    "print(json.dumps({{'cpus': ray.cluster_resources().get('CPU', 0), "
    "'nodes': sorted(n['NodeID'] for n in ray.nodes() if n['Alive'])}}))"
)


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory):
    logs = tmp_path_factory.mktemp("ray-logs")
    env = os.environ | {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", **NO_DRAIN}
    port, client_port = free_ports(2)
    address = f"127.0.0.1:{port}"
    # Short root: Ray's unix socket paths live under it and must stay below ~107 characters.
    temp = tempfile.mkdtemp(prefix="rdt", dir="/tmp")
    common = ["--num-cpus=1", "--block", "--disable-usage-stats"]
    procs = [
        subprocess.Popen(
            [RAY, "start", "--head", f"--port={port}", f"--ray-client-server-port={client_port}"]
            + ["--include-dashboard=false", f"--temp-dir={temp}", *common, *node_ports()],
            env=env,
            stdout=(logs / "head.log").open("w"),
            stderr=subprocess.STDOUT,
        )
    ]
    try:
        _wait_for_port(port, procs[0])
        procs.append(
            subprocess.Popen(
                [RAY, "start", f"--address={address}", '--resources={"node2": 2}', *common, *node_ports()],
                env=env,
                stdout=(logs / "node2.log").open("w"),
                stderr=subprocess.STDOUT,
            )
        )
        nodes = _wait_for_nodes(address, env, procs)
        yield address, env, nodes
    finally:
        for proc in reversed(procs):
            stop(proc)
        shutil.rmtree(temp, ignore_errors=True)


def _wait_for_port(port: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, "ray start --head exited early"
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(1)
    raise TimeoutError(f"Ray head did not listen on {port} within {timeout} s")


def _wait_for_nodes(address: str, env: dict, procs: list[subprocess.Popen], timeout: float = 180) -> list[str]:
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert all(p.poll() is None for p in procs), "a ray start process exited early"
        out = subprocess.run(
            [sys.executable, "-c", NODES_PROBE.format(address=address)], env=env, capture_output=True, text=True
        )
        if out.returncode == 0:
            state = json.loads(out.stdout.strip().splitlines()[-1])
            if len(state["nodes"]) == 2 and state["cpus"] >= 2:
                return state["nodes"]
        time.sleep(2)
    raise TimeoutError("the second Ray node did not join")


@pytest.mark.slow
@pytest.mark.ray
def test_members_are_placed_on_both_nodes(two_nodes, tmp_path):
    address, env, nodes = two_nodes
    job = write_job_data(tmp_path / "job", n_train=24, n_test=8)
    spec = tmp_path / "spec.json"
    # Three members of 0.5 CPU (plus 0.1 per trial) cannot fit on one 1-CPU node: the cluster must use both.
    ensemble = {"size": 3, "backbone": "tiny:bert", "diversity": "seed", "epochs": 1, "batch_size": 8}
    spec.write_text(json.dumps({"ensemble": ensemble | {"max_length": 64, "cpus_per_worker": 0.5}}))
    run = subprocess.run(
        [sys.executable, "-m", "ray_jobs.ensemble", "--spec", str(spec), "--job-dir", str(job)],
        env=env | {"RAY_ADDRESS": address},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    manifest = json.loads((job / "ensemble" / "manifest.json").read_text())
    assert sorted(manifest["nodes"]) == sorted(nodes)
    assert {m["node_id"] for m in manifest["members"]} == set(nodes)
    # Ray's raylet may print warnings to the driver's stdout after the summary, so take the last JSON line.
    summary = [line for line in run.stdout.splitlines() if line.startswith("{")][-1]
    assert json.loads(summary)["nodes"] == manifest["nodes"]
