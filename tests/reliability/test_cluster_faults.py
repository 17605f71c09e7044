"""Faults of the cluster under a running service, injected for real on a Ray head this test starts at fixed ports
(the service is in RAY_ADDRESS mode, as against any external cluster): a job's driver killed with SIGKILL, then the
whole cluster killed and started again at the same address.

Expected: the killed driver's job fails with Ray's reason and no stage it was in is presented as complete; while
the cluster is away submissions get a 503 naming it and jobs are kept as they were; when it returns, the job that
was running on it fails saying so, and the job that was queued runs.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from service.background import BackgroundServer
from service.ray_backend import _alive_nodes, free_port, write_token
from service.settings import Settings
from tests.test_service import tiny_spec, wait_for, write_prefs

pytestmark = [pytest.mark.slow, pytest.mark.ray, pytest.mark.timeout(1200)]

JOB_TIMEOUT_S = 600


class ExternalHead:
    """`ray start --head` at ports fixed for its life, so a restart comes back at the same address."""

    def __init__(self, token_file: Path) -> None:
        self.temp_dir = Path(tempfile.mkdtemp(prefix="rmd-ext-", dir="/tmp"))
        self.ports = {name: free_port() for name in ("port", "dashboard-port", "node-manager-port")}
        self.ports |= {"object-manager-port": free_port(), "runtime-env-agent-port": free_port()}
        self.ports |= {"dashboard-agent-listen-port": free_port(), "dashboard-agent-grpc-port": free_port()}
        self.ports |= {"metrics-export-port": free_port(), "ray-client-server-port": free_port()}
        self.env = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_file)}
        self.dashboard = f"http://127.0.0.1:{self.ports['dashboard-port']}"
        self.headers = {"Authorization": f"Bearer {token_file.read_text().strip()}"}
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        command = [str(Path(sys.executable).with_name("ray")), "start", "--head", "--block", "--num-cpus=2"]
        command += ["--include-dashboard=true", "--dashboard-host=127.0.0.1", "--disable-usage-stats"]
        command += [f"--temp-dir={self.temp_dir}", *(f"--{k}={v}" for k, v in self.ports.items())]
        env = {**os.environ, **self.env, "RAY_USAGE_STATS_ENABLED": "0"}
        env.pop("RAY_ADDRESS", None)
        log = (self.temp_dir / "head.log").open("ab")
        self.process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        wait_for(self._alive, 240, "the Ray head to come up")

    def _alive(self) -> bool:
        try:
            return bool(_alive_nodes(self.dashboard, self.headers))
        except Exception:  # not up yet: the state API raises several types before the head answers
            return False

    def kill(self) -> None:
        """SIGKILL to every process of this head (a machine losing power, not a graceful stop)."""
        if self.process is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        marker = str(self.temp_dir)  # workers run in their own sessions; the temp dir marks them as this head's
        for proc in psutil.process_iter(["cmdline"]):
            if any(marker in part for part in proc.info.get("cmdline") or ()):
                with contextlib.suppress(psutil.Error):
                    proc.kill()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    home = tmp_path_factory.mktemp("cluster-faults")
    write_prefs(home / "datasets")
    token_file = home / "ray-token"
    write_token(token_file)
    head = ExternalHead(token_file)
    head.start()
    settings = Settings(data_dir=home, ray_address=head.dashboard, poll_interval_s=0.5, max_running_jobs=1)
    with pytest.MonkeyPatch.context() as env:
        # As the operator of a token-authenticated cluster would: Ray's own variables, the head's token file.
        for name, value in head.env.items():
            env.setenv(name, value)
        server = BackgroundServer(settings).start()
        try:
            yield {"head": head, "server": server, "url": server.url}
        finally:
            server.stop()
            head.kill()


def _job(url: str, job_id: str) -> dict[str, Any]:
    response = httpx.get(f"{url}/v1/jobs/{job_id}", timeout=30)
    assert response.status_code == 200, response.text
    return response.json()


def _submit(url: str, name: str) -> dict[str, Any]:
    # Enough distillation steps that the job is still running when the fault lands.
    response = httpx.post(f"{url}/v1/jobs", json=tiny_spec(name, max_steps=400), timeout=120)
    assert response.status_code == 202, response.text
    return response.json()


def _driver_of(job_dir: str) -> psutil.Process | None:
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = proc.info.get("cmdline") or []
        if "ray_jobs.pipeline" in cmdline and job_dir in cmdline:
            return proc
    return None


def test_a_killed_driver_fails_its_job_with_the_reason_and_no_stage_is_left_looking_complete(cluster) -> None:
    url = cluster["url"]
    job = _submit(url, "driver-killed")
    detail = wait_for(lambda: (d := _job(url, job["id"]))["stage"] == "ensemble" and d, JOB_TIMEOUT_S, "a stage")
    driver = wait_for(lambda: _driver_of(job["job_dir"]), 60, "the driver process")
    driver.kill()
    final = wait_for(lambda: (d := _job(url, job["id"]))["state"] in ("failed", "succeeded") and d, 120, "the end")
    assert final["state"] == "failed"
    # SIGKILL, as Ray reports it: -9 from the driver itself, 137 (128 + 9) when a shell ran it.
    assert re.search(r"failed with exit code (-9|137)\b", final["error"]), final["error"]
    # The stage the driver died in was never published: no folder of it presented as a finished artifact.
    assert final["stages"]["ensemble"] != "finished" and "ensemble" not in final["artifacts"]
    assert detail["state"] == "running"


def test_a_stopped_cluster_keeps_jobs_refuses_submissions_and_on_return_fails_or_runs_them(cluster) -> None:
    url, head = cluster["url"], cluster["head"]
    running = _submit(url, "on-the-cluster")
    wait_for(lambda: _job(url, running["id"])["state"] == "running", JOB_TIMEOUT_S, "the job to run")
    queued = _submit(url, "in-the-queue")  # max_running_jobs is 1: this one waits in the service's queue
    assert queued["state"] == "queued"

    head.kill()
    refused = httpx.post(f"{url}/v1/jobs", json=tiny_spec("while-away"), timeout=120)
    assert refused.status_code == 503 and head.dashboard in refused.json()["error"]["message"]
    time.sleep(5)  # ten follower passes against a cluster that is not there
    assert _job(url, running["id"])["state"] == "running"  # kept as it was: the cluster may come back
    assert _job(url, queued["id"])["state"] == "queued"

    head.start()
    failed = wait_for(lambda: (d := _job(url, running["id"]))["state"] == "failed" and d, 120, "the lost job")
    assert "no longer exists on the cluster" in failed["error"] and head.dashboard in failed["error"]
    # The queued job was never on the lost cluster: it is submitted to the returned one and runs.
    wait_for(lambda: _job(url, queued["id"])["state"] == "running", JOB_TIMEOUT_S, "the queued job to run")
    assert httpx.post(f"{url}/v1/jobs/{queued['id']}/cancel", timeout=60).status_code == 202
    wait_for(lambda: _job(url, queued["id"])["state"] == "cancelled", 120, "the queued job to stop")
