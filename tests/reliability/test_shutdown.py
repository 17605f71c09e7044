"""SIGTERM stops `rmdistill serve` in seconds, even with an event stream open, and leaves the embedded Ray head
running with its jobs; the next `rmdistill serve` on the same data folder re-attaches to that head and follows the
jobs to their end. A recorded head that is not running is replaced, never signalled; `--stop-cluster` stops it.

The real CLI in subprocesses over real sockets, on a temporary data folder with a 1-CPU head. The job is a plain Ray
job (a shell loop that waits for a file) recorded in the store the way the service records a submission: the
restart is what is under test, and a pipeline job would take minutes to run here.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

import httpx
import psutil
import pytest

from service.ray_backend import HEAD_RECORD, HeadRecord, LocalRayHead, free_port, read_token
from service.store import Store
from tests.support.service import RMDISTILL, Service
from tests.test_service import wait_for

pytestmark = [pytest.mark.slow, pytest.mark.ray, pytest.mark.timeout(900)]

# SIGTERM to exit, measured here on 2 busy cores: 2.3 s with an event stream open (2 s of it the grace open requests
# get), 0.5 s after serving a policy, 4–5.5 s stopping the head. Before: the exit waited for the stream's job to end
# (not within 120 s), took 33 s with a job running and no stream, and after serving a policy aborted (-6) or hung.
# Bounds of correctness, not speed.
LEAVE_HEAD_EXIT_S = 10
STOP_HEAD_EXIT_S = 60


def head_processes(home: Path) -> list[psutil.Process]:
    """Every process of this folder's head: their command lines name its private temp dir."""
    marker = f"{LocalRayHead(home).temp_dir}/"
    found = []
    for process in psutil.process_iter(["cmdline"]):
        if any(marker in f"{part}/" for part in process.info.get("cmdline") or ()):
            found.append(process)
    return found


def reused_pid_record(home: Path) -> HeadRecord:
    """A record whose pid now belongs to another process (this test's): a head that died and whose pid was reused."""
    record = HeadRecord(
        pid=os.getpid(),
        started_at=psutil.Process().create_time(),
        temp_dir=str(LocalRayHead(home).temp_dir),
        dashboard_url=f"http://127.0.0.1:{free_port()}",
        gcs_address=f"127.0.0.1:{free_port()}",
        num_cpus=1,
    )
    home.mkdir(parents=True, exist_ok=True)
    (home / HEAD_RECORD).write_text(json.dumps(asdict(record)))
    return record


@pytest.fixture
def home(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path
    # Whatever the outcome, nothing of this folder's head outlives the test.
    for process in head_processes(tmp_path):
        process.kill()


def ray_job_status(record: HeadRecord, headers: dict[str, str], submission_id: str) -> str:
    return httpx.get(f"{record.dashboard_url}/api/jobs/{submission_id}", headers=headers, timeout=10).json()["status"]


def test_sigterm_leaves_the_head_and_its_job_running_and_the_next_service_finishes_following_it(
    home: Path, tiny_llama: Path
) -> None:
    stale = reused_pid_record(home)
    first = Service(home)
    record = HeadRecord.read(home)
    assert record is not None and record.pid != stale.pid and record.process() is not None  # a fresh head
    headers = {"Authorization": f"Bearer {read_token(home / 'ray-auth-token')}"}
    assert record.accepts(read_token(home / "ray-auth-token")) and not record.accepts("0" * 64)

    # A running job, recorded before it is submitted, as the service does.
    release = home / "release"
    store = Store(f"sqlite:///{home / 'rmdistill.db'}")
    store.create_job(job_id="job-held", name="held", owner=None, spec={}, job_dir=str(home / "jobs" / "job-held"))
    store.update_job("job-held", ray_submission_id="rmdistill-job-held")
    store.close()
    submission = {
        "entrypoint": f"while [ ! -e {release} ]; do sleep 0.2; done",
        "submission_id": "rmdistill-job-held",
    }
    httpx.post(f"{record.dashboard_url}/api/jobs/", json=submission, headers=headers, timeout=30).raise_for_status()
    wait_for(lambda: first.get("/v1/jobs/job-held")["state"] == "running", 60, "the first service to see it run")

    # An event stream stays open as long as its job runs: the exit must not wait for it.
    streaming = threading.Event()

    def follow() -> None:
        # The shutdown under test cuts this stream: that is the point, not an error.
        with (
            contextlib.suppress(httpx.HTTPError),
            httpx.stream("GET", f"{first.url}/v1/jobs/job-held/events?stream=true", timeout=None) as response,
        ):
            streaming.set()
            for _ in response.iter_bytes():
                pass

    threading.Thread(target=follow, daemon=True).start()
    assert streaming.wait(30)
    assert first.sigterm() < LEAVE_HEAD_EXIT_S

    assert record.process() is not None, "the head stopped with the service"
    assert ray_job_status(record, headers, "rmdistill-job-held") == "RUNNING"
    store = Store(f"sqlite:///{home / 'rmdistill.db'}")
    assert store.get_job("job-held").state == "running"  # not failed as orphaned
    store.close()

    # A service killed outright (SIGKILL: no shutdown code runs) leaves the head and the job as they were too.
    killed = Service(home)
    assert killed.get("/healthz")["ray"]["address"] == record.dashboard_url
    killed.process.kill()
    assert killed.process.wait(30) == -signal.SIGKILL
    assert record.process() is not None and ray_job_status(record, headers, "rmdistill-job-held") == "RUNNING"

    # This one also serves a policy: its process then holds a Ray driver, whose signal handlers must not take over.
    serving = {"RMDISTILL_SERVING_ENGINE": "hf", "RMDISTILL_SERVING_NUM_CPUS": "1"}
    second = Service(home, "--data-root", str(tiny_llama.parent), env=serving)
    assert second.get("/healthz")["ray"]["address"] == record.dashboard_url  # the same head, re-attached
    assert HeadRecord.read(home) == record
    release.touch()

    def ended() -> dict | None:
        job = second.get("/v1/jobs/job-held")
        return job if job["state"] not in ("pending", "running") else None

    job = wait_for(ended, 60, "the job to end")
    assert job["state"] == "succeeded", job
    assert [t["to"] for t in job["transitions"]] == ["pending", "running", "succeeded"]
    policy = {"id": "tiny", "path": str(tiny_llama)}
    httpx.post(f"{second.url}/v1/policies", json=policy, timeout=30).raise_for_status()
    completion = {"model": "tiny", "prompt": "Hello", "max_tokens": 2}
    httpx.post(f"{second.url}/v1/completions", json=completion, timeout=300).raise_for_status()
    assert second.sigterm() < LEAVE_HEAD_EXIT_S

    third = Service(home, "--stop-cluster")
    assert third.get("/healthz")["ray"]["address"] == record.dashboard_url
    assert third.sigterm() < STOP_HEAD_EXIT_S
    wait_for(lambda: not head_processes(home), 10, "every process of the head to end")
    assert not (home / HEAD_RECORD).exists()


def test_stop_cluster_leaves_a_process_that_reused_the_heads_pid_alone(home: Path) -> None:
    reused_pid_record(home)
    result = subprocess.run([RMDISTILL, "stop-cluster", "--data-dir", str(home)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "no embedded Ray head was running" in result.stdout
    assert not (home / HEAD_RECORD).exists()  # the stale record is gone; this process, the pid's owner, lives on
