"""Putting jobs on the cluster: at most `max_running_jobs` submitted to Ray at once, the rest queued, oldest first.

Every job is a driver process that imports torch, and each stage sizes itself to the whole cluster; a hundred
submitted at once would crowd the nodes and Ray would time out the ones it cannot start. So the service keeps its
own queue: a job past the limit is recorded as `queued` (nothing on Ray), and the follower submits the oldest
queued job whenever a submitted one ends. Past `max_queued_jobs` a submission is refused (429), never dropped.

The limits are counted under one lock in this process: a deployment with several API replicas sharing one
database needs a row lock instead (the Postgres deployment's job, not SQLite's).
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from service.errors import ApiError
from service.ray_backend import RayBackend, RayUnavailable, submission_id_for
from service.settings import Settings
from service.store import Job, Store

log = logging.getLogger("rmdistill.launch")

# One process's submissions and promotions are counted and recorded one at a time.
_SLOTS = threading.Lock()


class Launcher:
    """Admits jobs to the queue or the cluster, and submits them to Ray."""

    def __init__(self, store: Store, backend: RayBackend, settings: Settings) -> None:
        self.store, self.backend, self.settings = store, backend, settings

    def admit(self, *, job_id: str, name: str, owner: str | None, spec: dict, job_dir: str) -> Job:
        """Record the job, queued or pending; a pending one is submitted at once. 429 when the queue is full."""
        limit, queue = self.settings.max_running_jobs, self.settings.max_queued_jobs
        with _SLOTS:
            submitted, queued = self.store.count_submitted(), self.store.count_queued()
            waits = submitted >= limit or queued > 0  # first come, first served: nobody overtakes the queue
            if waits and queued >= queue:
                raise ApiError(
                    429,
                    f"the service has {submitted} jobs running and {queued} queued, the most it queues is {queue}: "
                    "submit again when some have finished",
                    headers={"Retry-After": "60"},
                )
            reason = f"queued: {submitted} jobs submitted, the limit is {limit}" if waits else "submitted"
            self.store.create_job(
                job_id=job_id,
                name=name,
                owner=owner,
                spec=spec,
                job_dir=job_dir,
                # The submission id is on record before Ray hears of the job: a cancel mid-submission knows it.
                ray_submission_id=None if waits else submission_id_for(job_id),
                state="queued" if waits else "pending",
                reason=reason,
            )
        if not waits:
            self.launch(job_id, job_dir, fail_if_unavailable=True)
        job = self.store.get_job(job_id)
        assert job is not None
        return job

    def promote(self) -> list[str]:
        """Submit queued jobs, oldest first, while submitted ones are under the limit; the ids submitted."""
        launched: list[str] = []
        while True:
            with _SLOTS:
                if self.store.count_submitted() >= self.settings.max_running_jobs:
                    return launched
                job = self.store.oldest_queued()
                if job is None:
                    return launched
                moved = self.store.transition(
                    job.id,
                    "pending",
                    "a running slot freed up",
                    expect="queued",
                    ray_submission_id=submission_id_for(job.id),
                )
            if not moved:
                continue  # cancelled in between: look at the next one
            if not self.launch(job.id, job.job_dir, fail_if_unavailable=False):
                return launched  # the cluster is away: the job waits, queued again, for the next pass
            launched.append(job.id)

    def launch(self, job_id: str, job_dir: str, *, fail_if_unavailable: bool) -> bool:
        """Submit a pending job to Ray; False when the cluster could not be reached and the job is queued again.

        A submission answered by the API (`fail_if_unavailable`) fails the job and raises 503 instead: the caller
        hears at once that nothing will run.
        """
        submission_id = submission_id_for(job_id)
        try:
            self.backend.submit(job_id, Path(job_dir), driver_memory=self.settings.driver_memory_bytes)
        except RayUnavailable as exc:
            if fail_if_unavailable:
                self.store.transition(job_id, "failed", str(exc), error=str(exc))
                raise
            log.warning("job %s stays queued: %s", job_id, exc)
            self.store.transition(
                job_id, "queued", f"back in the queue: {exc}", expect="pending", ray_submission_id=None
            )
            return False
        except Exception as exc:
            # An error does not prove the job is not on the cluster (a timeout after Ray accepted it): ask first.
            if not self._landed(submission_id):
                reason = f"Ray refused the job: {exc}"
                self.store.transition(job_id, "failed", reason, error=reason)
                if fail_if_unavailable:
                    raise ApiError(503, reason) from None
                return True
        job = self.store.get_job(job_id)
        if job is not None and job.state in ("cancelling", "cancelled"):
            self.backend.stop_job(submission_id)  # cancelled while the submission was in flight: stop it now
        return True

    def _landed(self, submission_id: str) -> bool:
        try:
            return self.backend.info(submission_id) is not None
        except RayUnavailable:
            return False
