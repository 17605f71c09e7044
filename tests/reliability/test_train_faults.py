"""Faults injected for real into training: a Ray Train worker SIGKILLed mid-distillation, and an ensemble member's
Tune trial and another member's Train worker SIGKILLed mid-fit, on the session's real local Ray cluster.

The victims are found in this cluster's own actor table (class, owner, working directory) and must be descendants
of this test process (the session's Ray head is its child), so nothing of another Ray cluster on the machine is
ever touched. The kill is an outside SIGKILL, not an exception raised by the loop: no `finally`, no report, no
flush runs in the victim.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from support.data import write_job_data
from support.pairs import write_pairs

from ray_jobs.distill.stage import run as run_distill
from ray_jobs.ensemble.stage import run as run_ensemble
from ray_jobs.ensemble.train import load_pairs
from ray_jobs.events import EventLog, read_events
from ray_jobs.layout import JobLayout
from ray_jobs.spec import JobSpec
from ray_jobs.train_runtime import live_placement_groups

pytestmark = [pytest.mark.ray, pytest.mark.slow]

CHECKPOINT_EVERY = 6
DISTILL_STEPS = 24
# Ray Train's result queue holds one report, so once step 2c+2 is logged the report of checkpoint c has been taken
# by the controller and the checkpoint is registered: the resume must come from c or 2c, never from scratch, and
# steps 2c+1 and 2c+2 (at least) run twice, once before the kill and once after the resume.
KILL_AFTER_STEP = 2 * CHECKPOINT_EVERY + 2
MEMBER_EPOCHS = 6
# Given an event of the job's log, the pid to kill now, or None to keep waiting.
Victim = Callable[[dict[str, Any]], int | None]


def _proc_stat(pid: int) -> list[str] | None:
    """/proc/<pid>/stat from field 3 (state, parent, ...) on, or None once the process is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None


def _descends_from_this_process(pid: int) -> bool:
    """Whether `pid` is a live descendant of this process, as the session's Ray head and its workers are."""
    me = os.getpid()
    while pid > 1:
        if pid == me:
            return True
        stat = _proc_stat(pid)
        if stat is None or stat[0] == "Z":
            return False
        pid = int(stat[1])
    return False


def _alive_actors(class_name: str) -> list[dict[str, Any]]:
    """Live actors of one class in this test's cluster: in its actor table (the state API needs the dashboard,
    which the session's head runs without) and running as descendants of this process."""
    import ray._private.state

    return [
        a
        for a in ray._private.state.actors().values()
        if a["State"] == "ALIVE" and a["ActorClassName"] == class_name and _descends_from_this_process(a["Pid"])
    ]


def _train_actors() -> list[dict[str, Any]]:
    return _alive_actors("TrainController") + _alive_actors("RayTrainWorker")


def _cwd(pid: int) -> str:
    try:
        return os.readlink(f"/proc/{pid}/cwd")
    except OSError:  # exited since it was listed
        return ""


def _owned_by(actor: dict[str, Any], owner: dict[str, Any]) -> bool:
    return (actor["OwnerAddress"]["IPAddress"], actor["OwnerAddress"]["Port"]) == (
        owner["Address"]["IPAddress"],
        owner["Address"]["Port"],
    )


def _sigkill(pid: int) -> None:
    assert pid > 1, f"refusing to kill pid {pid}: 0 would be this test's own process group"
    os.kill(pid, signal.SIGKILL)
    deadline = time.time() + 30
    # A killed child stays a zombie until its parent (the raylet) reaps it: that is dead enough.
    while (stat := _proc_stat(pid)) is not None and stat[0] != "Z":
        assert time.time() < deadline, f"process {pid} survived SIGKILL"
        time.sleep(0.05)


class _KillWhen(threading.Thread):
    """Polls the job's event log and SIGKILLs each victim's process at the first event that names it; `killed`
    lists (pid, event) in kill order."""

    def __init__(self, job: Path, victims: list[Victim], timeout_s: float = 600):
        super().__init__(daemon=True)
        self.job, self.pending, self.timeout_s = job, list(victims), timeout_s
        self.killed: list[tuple[int, dict[str, Any]]] = []
        self.error: BaseException | None = None
        self.done = threading.Event()

    def run(self) -> None:
        seen = 0
        deadline = time.time() + self.timeout_s
        try:
            while self.pending and not self.done.is_set() and time.time() < deadline:
                events = list(read_events(self.job)) if (self.job / "events.jsonl").exists() else []
                for event in events[seen:]:
                    for victim in list(self.pending):
                        pid = victim(event)
                        if pid is not None:
                            _sigkill(pid)
                            self.killed.append((pid, event))
                            self.pending.remove(victim)
                seen = len(events)
                time.sleep(0.05)
        except BaseException as exc:  # surfaced by the test, which runs in another thread
            self.error = exc

    def __enter__(self) -> _KillWhen:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self.done.set()
        self.join(timeout=30)
        if self.error is not None:
            raise self.error


def _distill_metrics(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in events if e["kind"] == "metrics" and e["stage"] == "distill"]


def test_a_train_worker_killed_mid_distillation_resumes_from_its_checkpoint(ray_cluster, tiny_llama, tmp_path):
    job = tmp_path / "job"
    write_pairs(job, tiny_llama)
    spec = JobSpec(
        reference=str(tiny_llama),
        distill={
            "loss": "distill",
            "batch_size": 4,
            "lr": 2e-3,
            "max_steps": DISTILL_STEPS,
            "checkpoint_every": CHECKPOINT_EVERY,
            "max_failures": 1,
        },
    )

    def train_worker(event: dict[str, Any]) -> int | None:
        if event["kind"] != "metrics" or event["stage"] != "distill" or event["step"] < KILL_AFTER_STEP:
            return None
        (worker,) = _alive_actors("RayTrainWorker")
        return worker["Pid"]

    started = time.time()
    with _KillWhen(job, [train_worker]) as killer:
        summary = run_distill(spec, job, EventLog(job))
    assert len(killer.killed) == 1, "the run finished before the worker could be killed"
    killed_at = killer.killed[0][1]["step"]
    assert KILL_AFTER_STEP <= killed_at < DISTILL_STEPS

    events = list(read_events(job))
    resumed = [e for e in events if e.get("resumed_step") is not None]
    assert len(resumed) == 1, "one kill, one resume"
    restart = resumed[0]["resumed_step"]
    print(f"distill: worker killed after step {killed_at}, resumed at {restart}, {time.time() - started:.0f} s")
    # A checkpointed step at or after the first one the controller had surely registered, and before the kill.
    assert restart % CHECKPOINT_EVERY == 0 and CHECKPOINT_EVERY <= restart <= killed_at - 2, (restart, killed_at)
    metrics = _distill_metrics(events)
    cut = events.index(resumed[0])
    before = [e for e in metrics if events.index(e) < cut]
    after = [e for e in metrics if events.index(e) > cut]
    assert [e["step"] for e in before] == list(range(1, len(before) + 1)) and len(before) >= killed_at
    # The resumed run continues at the checkpoint and does the remaining steps once: the full count, no more.
    assert [e["step"] for e in after] == list(range(restart + 1, DISTILL_STEPS + 1))
    # Steps that ran both before the kill and after the resume saw the same weights, optimizer state, schedule and
    # batch: they measure the same loss, gradient and learning rate. A resume that reset the optimizer, the
    # scheduler or the data position (or restarted from the initial weights) would not.
    twice = sorted({e["step"] for e in before} & {e["step"] for e in after})
    assert len(twice) >= 2
    first = {e["step"]: e["values"] for e in before}
    second = {e["step"]: e["values"] for e in after}
    for step in twice:
        for key in ("loss", "grad_norm", "lr"):
            assert second[step][key] == pytest.approx(first[step][key], rel=1e-5, abs=1e-9), (step, key)

    layout = JobLayout(job)
    info = json.loads(layout.policy_info.read_text())
    assert summary["steps"] == info["steps"] == DISTILL_STEPS
    assert info["final_metrics"] == after[-1]["values"]
    assert not (job / ".partial" / "distill").exists()
    _assert_policy_is_whole(layout.policy, tiny_llama)


def _assert_policy_is_whole(policy: Path, reference: Path) -> None:
    """The published folder loads as a model and is trained: every weight file complete, and moved off π_ref."""
    from ray_jobs.models.registry import load_causal_lm

    model, _ = load_causal_lm(str(policy))
    ref, _ = load_causal_lm(str(reference))
    trained = dict(model.named_parameters())
    assert trained.keys() == dict(ref.named_parameters()).keys()
    moved = [name for name, p in ref.named_parameters() if not np.allclose(p.detach(), trained[name].detach())]
    assert moved, "the published policy is π_ref: the trained weights were not saved"


def test_killed_member_trials_are_retried_and_the_ensemble_completes(ray_cluster, tmp_path):
    job = write_job_data(tmp_path / "job")
    spec = JobSpec.model_validate(
        {
            "ensemble": {
                "size": 2,
                "backbone": "tiny:bert",
                "diversity": "bootstrap",
                "epochs": MEMBER_EPOCHS,
                "lr": 1e-3,
                "batch_size": 8,
                "max_length": 64,
                "cpus_per_worker": 0.5,
                "max_retries": 1,
                "precision": "fp32",  # the members are re-scored against their metrics to 1e-4 below
            }
        }
    )

    def trial_of(member: int) -> dict[str, Any]:
        # Tune runs each trial in its own trial directory, named member-<k> by the stage.
        # Only this stage's trials: an earlier test's finished Tune trial can outlive its run in the same cluster.
        (trial,) = [
            a
            for a in _alive_actors("ImplicitFunc")
            if a["ActorID"] not in earlier_trials and _cwd(a["Pid"]).endswith(f"member-{member}")
        ]
        return trial

    def after_first_epoch(member: int, victim: Callable[[dict[str, Any]], int]) -> Victim:
        def pick(event: dict[str, Any]) -> int | None:
            if event.get("event") == "epoch_done" and event["member"] == member and event["step"] == 1:
                return victim(trial_of(member))
            return None

        return pick

    # A TorchTrainer fitted in this process's main thread (another test's) keeps its controller alive: Ray Train's
    # SIGINT handler holds the handle. Only this stage's Train actors are its to end.
    earlier = {a["ActorID"] for a in _train_actors()}
    earlier_trials = {a["ActorID"] for a in _alive_actors("ImplicitFunc")}
    reservations = live_placement_groups()
    # A one-worker member trains inside its Tune trial (no Ray Train run of its own): each member loses that
    # process after its first epoch, and Tune retries it.
    victims = [after_first_epoch(k, lambda trial: trial["Pid"]) for k in (0, 1)]
    started = time.time()
    with _KillWhen(job, victims) as killer:
        summary = run_ensemble(spec, job, EventLog(job))
    print(f"ensemble: 2 members killed after epoch 1, both retried, {time.time() - started:.0f} s")
    assert sorted(event["member"] for _, event in killer.killed) == [0, 1], "a member finished before its kill"

    out = JobLayout(job).ensemble
    members = [json.loads((out / f"member-{k}" / "metrics.json").read_text()) for k in range(2)]
    assert [m["attempt"] for m in members] == [2, 2]
    assert [m["epochs_run"] for m in members] == [MEMBER_EPOCHS] * 2
    assert all([h["epoch"] for h in m["history"]] == list(range(1, MEMBER_EPOCHS + 1)) for m in members)
    events = list(read_events(job))
    started_msgs = sorted(e["message"] for e in events if e.get("event") == "member_started")
    assert started_msgs == [f"member {k} started (attempt {n})" for k in (0, 1) for n in (1, 2)]
    finished = sorted((e["member"], e["attempt"]) for e in events if e.get("event") == "member_finished")
    assert finished == [(0, 2), (1, 2)]
    # Nothing of the killed attempts lives on to write into the members' folders. Ray ends the actors of finished
    # runs asynchronously once their handles are dropped, so this waits a little; an orphan would stay.
    deadline = time.time() + 60
    while left := [a for a in _train_actors() if a["ActorID"] not in earlier]:
        assert time.time() < deadline, f"left running after the stage: {[a['ActorClassName'] for a in left]}"
        time.sleep(0.5)

    # Nor any resource reservation of theirs: the killed trial took Ray Train's placement-group cleaner with it, and
    # its member's 0.5-CPU worker group stayed reserved, so the next 2-CPU run on this cluster waited forever.
    assert live_placement_groups() - reservations == set()

    manifest = json.loads(JobLayout(job).manifest.read_text())
    assert summary["accuracies"] == manifest["accuracies"] == [m["accuracy"] for m in members]
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "member-0", "member-1"]
    _assert_members_are_whole(out, job, members)


def _assert_members_are_whole(out: Path, job: Path, members: list[dict[str, Any]]) -> None:
    """Each published member loads and scores the held-out pairs exactly as its metrics.json says it did."""
    from ray_jobs.models.registry import load_reward_model
    from ray_jobs.models.reward import score_pairs

    test = load_pairs(JobLayout(job).test)
    for k, metrics in enumerate(members):
        model, tokenizer = load_reward_model(out / f"member-{k}")
        r_w = score_pairs(model.eval(), tokenizer, test["prompt"], test["chosen"], max_length=64)
        r_l = score_pairs(model, tokenizer, test["prompt"], test["rejected"], max_length=64)
        np.testing.assert_allclose((r_w - r_l).numpy(), metrics["heldout_margins"], atol=1e-4)
