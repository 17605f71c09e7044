"""Follows every non-final job: Ray's status plus the job's event log decide its state, recorded as transitions.

The same pass runs once at start-up before the service answers, which is the reconciliation: a job that kept
running while the service was down is followed again; one whose Ray job vanished is marked failed with the reason
(or given the final status its event log recorded, when it finished before the cluster forgot it).
"""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path
from typing import Any

from ray_jobs.artifact_store import ArtifactStore
from ray_jobs.layout import JobLayout
from service.launch import Launcher
from service.progress import summarize
from service.ray_backend import RayBackend, RayUnavailable
from service.store import Job, Store, utcnow

log = logging.getLogger("rmdistill.follower")

RAY_TO_STATE = {"SUCCEEDED": "succeeded", "FAILED": "failed", "STOPPED": "cancelled"}
# A job row without a Ray submission id this long after creation was never submitted (the service died mid-way).
UNSUBMITTED_GRACE_S = 120
# What registering a job's policy reads: the policy folder, and the evaluation report for its summary.
POLICY_STAGES = ("distill", "evaluate")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def register_job_policy(store: Store, job: Job) -> None:
    """A succeeded job's policy folder becomes a servable policy whose id is the job id."""
    layout = JobLayout(job.job_dir)
    if not layout.policy.is_dir() or store.get_policy(job.id) is not None:
        return  # no policy, or registered already (a re-sync after a restart)
    meta = _read_json(layout.policy_info)
    # The per-sample scores stay in the job folder (GET /v1/jobs/{id}/results): the policy row keeps the summary.
    report = {k: v for k, v in _read_json(layout.report).items() if k != "samples"}
    summary = {"policy": meta, "eval": report}
    spec = job.spec or {}
    store.add_policy(
        policy_id=job.id,
        job_id=job.id,
        owner=job.owner,
        path=str(layout.policy),
        base_model=meta.get("reference") or spec.get("reference"),
        loss=meta.get("loss") or (spec.get("distill") or {}).get("loss"),
        summary=summary,
    )


class JobFollower:
    def __init__(
        self,
        store: Store,
        backend: RayBackend,
        interval_s: float = 1.0,
        launcher: Launcher | None = None,
        artifacts: ArtifactStore | None = None,
    ) -> None:
        self.store, self.backend, self.interval_s = store, backend, interval_s
        # The artifact root a driver on another node published into, when this node's job folder lacks the policy.
        self.artifacts = artifacts
        # Without a launcher nothing leaves the queue (a follower that only reconciles, as the tests' is).
        self.launcher = launcher
        self._warned_unavailable = False

    async def run(self) -> None:
        """Follow jobs until cancelled. A failed pass (a database error, anything) is logged and the next pass
        tries again: one bad moment must not end job tracking for the life of the service."""
        while True:
            try:
                await asyncio.to_thread(self.sync_all)
            except Exception:
                log.exception("a pass over the active jobs failed; retrying in %s s", self.interval_s)
            await asyncio.sleep(self.interval_s)

    def sync_all(self) -> None:
        for job in self.store.active_jobs():
            try:
                self.sync(job)
            except RayUnavailable as exc:
                # The cluster may come back (a restarting head): keep the jobs as they are and retry next pass.
                if not self._warned_unavailable:
                    log.warning("cannot follow jobs: %s", exc)
                self._warned_unavailable = True
                return
            except Exception:
                log.exception("following job %s failed", job.id)
        self._warned_unavailable = False
        if self.launcher is not None:
            # After the pass, so the slots of jobs that just ended are free for the queue's oldest.
            self.launcher.promote()

    def sync(self, job: Job) -> None:
        if job.state == "queued":
            return  # nothing on Ray to follow yet; `Launcher.promote` submits it
        view = summarize(job.job_dir)
        if view["stage"] != job.stage:
            self.store.update_job(job.id, stage=view["stage"])
        if job.ray_submission_id is None:
            if self._age_s(job) > UNSUBMITTED_GRACE_S:
                self._fail(job, "the job was never submitted to Ray (the service stopped while submitting it)")
            return
        info = self.backend.info(job.ray_submission_id)
        if info is None and job.state == "pending" and self._age_s(job) < UNSUBMITTED_GRACE_S:
            return  # its submission may still be in flight: the id is recorded before Ray hears of the job
        if info is None:
            if view["finished"] in RAY_TO_STATE.values():
                self._finish(job, view["finished"], "final status from the event log; the Ray job is gone", view)
            elif job.state == "pending" and view["events"] == 0:
                self._fail(job, "the job never reached Ray (the service stopped while submitting it)")
            else:
                reason = (
                    f"the Ray job {job.ray_submission_id} no longer exists on the cluster at {self.backend.address}"
                )
                self._fail(job, reason)
            return
        if info.status == "RUNNING":
            self.store.transition(job.id, "running", "Ray job running", expect="pending")
        elif info.status in RAY_TO_STATE:
            self._finish(job, RAY_TO_STATE[info.status], f"Ray job {info.status}: {info.message}".strip(), view)

    @staticmethod
    def _age_s(job: Job) -> float:
        return (utcnow() - job.created_at).total_seconds()

    def _finish(self, job: Job, state: str, reason: str, view: dict[str, Any]) -> None:
        if state == "succeeded":
            if self.artifacts is not None:
                self.artifacts.fill(JobLayout(job.job_dir), POLICY_STAGES)
            register_job_policy(self.store, job)
            self.store.transition(job.id, "succeeded", reason, error=None)
        elif state == "failed":
            self._fail(job, view["error"] or reason)
        else:
            self.store.transition(job.id, state, reason)

    def _fail(self, job: Job, reason: str) -> None:
        self.store.transition(job.id, "failed", reason, error=reason)
