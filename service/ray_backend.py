"""Jobs run as Ray jobs through Ray's job submission API, so their status, logs and stop are Ray's own.

Two modes:
- embedded (no ray_address): the service starts a private Ray head (`ray start --head --block` with the dashboard,
  free ports, its own --temp-dir) in a process group of its own and records it in the data folder
  (`ray-head.json`). The head outlives the service unless told otherwise, so the jobs on it keep running through a
  restart: the next service on the same data folder re-attaches to the recorded head (after checking it is that
  process and that it takes this folder's token) and its follower picks the jobs up; a stale record (the head died)
  leads to a fresh head. `LocalRayHead.stop_recorded` (`rmdistill stop-cluster`) stops it. It never runs
  `ray stop`, which would end every Ray instance on the machine, including other people's.
- cluster (ray_address = dashboard URL or GCS address): use that cluster; it outlives the service, so a restarted
  service re-attaches to jobs that kept running.

Jobs are never submitted from a driver: submission, status, logs, stop and the resource totals all go through
the dashboard's HTTP API, with the cluster's bearer token. The embedded head runs with Ray's token authentication
and a token of its own (see LocalRayHead); against an external cluster the operator sets Ray's own variables in the
service's environment (RAY_AUTH_MODE=token and RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH, as on every node), and the
service sends that token and hands RAY_AUTH_MODE / RAY_AUTH_TOKEN_PATH on to every job.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import secrets
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import psutil

from ray_jobs.artifact_store import ARTIFACTS_ENV
from ray_jobs.cluster import ClusterResources
from ray_jobs.layout import JobLayout

log = logging.getLogger("rmdistill.ray")

# Environment a job needs to find the same data folder, model cache and offline settings as the service.
# What a job's driver and workers inherit from the service's environment, through the job's runtime environment:
# never through the spec, which users read and which is stored with the job. The hub's token and endpoint let a
# cluster whose nodes hold no credentials load a private model or dataset.
PASSTHROUGH_ENV = (
    "RMDISTILL_CACHE",
    # The artifact root's credentials (ray_jobs/artifact_store.py), where nodes have none of their own.
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_ENDPOINT_URL",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
    "HF_TOKEN",
    "HF_ENDPOINT",
    "HF_HUB_OFFLINE",
    "HF_DATASETS_OFFLINE",
    "HF_HOME",
    "TOKENIZERS_PARALLELISM",
    "VLLM_CPU_KVCACHE_SPACE",
)
# The embedded head's record in the data folder: the HeadRecord fields, as JSON.
HEAD_RECORD = "ray-head.json"
# Set in `rmdistill serve`'s own process (see there); Ray's processes keep their crash handlers.
NO_RAY_SIGNAL_HANDLER = "RAY_DISABLE_FAILURE_SIGNAL_HANDLER"
# Also set there: the service always joins its cluster explicitly. With Ray's auto-connect on, Serve's metrics thread,
# still running after the service disconnects at shutdown, would start a whole new local Ray instance to report to.
NO_RAY_AUTO_CONNECT = "RAY_ENABLE_AUTO_CONNECT"
# Ray's unix socket paths must stay under 107 bytes: <temp-dir>/session_<40 chars>/sockets/plasma_store.
MAX_TEMP_DIR_LEN = 40


class RayUnavailable(RuntimeError):
    """The cluster cannot be reached (HTTP 503)."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def auth_mode() -> str:
    """The RAY_AUTH_MODE of an external cluster: the operator's (Ray's own variable), else disabled."""
    return os.environ.get("RAY_AUTH_MODE") or "disabled"


def read_token(path: Path) -> str:
    token = path.read_text().strip()
    if not token:
        raise RayUnavailable(f"the Ray auth token file {path} is empty")
    return token


def write_token(path: Path) -> None:
    """A fresh random token in an owner-only file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(secrets.token_hex(32))


def embedded_token_file(data_dir: Path) -> Path:
    return Path(data_dir) / "ray-auth-token"


def prepare_embedded_auth(data_dir: Path) -> None:
    """Give this process the embedded head's auth settings before it imports Ray: the token of the head still
    running on this data folder, else a fresh one for the head about to start.

    Ray reads RAY_AUTH_MODE and the token when it is imported, not when a driver connects: the service's own
    driver (the serving actors' owner) can only join the token-protected embedded head if the variables are set
    first. `rmdistill serve` calls this before anything imports Ray; the head then uses this token.
    """
    token_file = embedded_token_file(data_dir)
    if reusable_head(data_dir) is None:
        write_token(token_file)
    os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token_file))
    os.environ.pop("RAY_AUTH_TOKEN", None)


def _env_token() -> str | None:
    """An external cluster's token as Ray itself finds it: RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return os.environ["RAY_AUTH_TOKEN"].strip()
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    return read_token(path) if path.is_file() else None


def _alive_nodes(dashboard_url: str, headers: dict[str, str]) -> list[Any]:
    from ray.util.state.api import StateApiClient
    from ray.util.state.common import ListApiOptions, StateResource

    options = ListApiOptions(filters=[("state", "=", "ALIVE")], detail=True, timeout=10)
    client = StateApiClient(address=dashboard_url, headers={"Content-Type": "application/json", **headers})
    return client.list(StateResource.NODES, options=options, raise_on_missing_output=True)


@dataclass
class HeadRecord:
    """What `ray-head.json` in a data folder says of the embedded head started there."""

    pid: int
    started_at: float  # the process's start time: a reused pid belongs to a process started later
    temp_dir: str
    dashboard_url: str
    gcs_address: str
    num_cpus: int

    @classmethod
    def read(cls, data_dir: Path) -> HeadRecord | None:
        """None when there is no record, or one this version cannot read (which is then treated as stale)."""
        try:
            return cls(**json.loads((Path(data_dir) / HEAD_RECORD).read_text()))
        except (OSError, ValueError, TypeError):
            return None

    def process(self) -> psutil.Process | None:
        """The head's `ray start` process, if the recorded pid is still that process."""
        try:
            process = psutil.Process(self.pid)
            same = (
                abs(process.create_time() - self.started_at) < 0.01
                and f"--temp-dir={self.temp_dir}" in process.cmdline()
            )
            return process if same and process.status() != psutil.STATUS_ZOMBIE else None
        except psutil.Error:
            return None

    def accepts(self, token: str) -> bool:
        """Whether the head's dashboard takes `token` on an authenticated route: only a head started with it does."""
        request = urllib.request.Request(
            f"{self.dashboard_url}/api/jobs/", headers={"Authorization": f"Bearer {token}"}
        )
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status == 200
        except (OSError, ValueError):  # refused, 401/403 (HTTPError is an OSError), a malformed URL
            return False


def reusable_head(data_dir: Path) -> HeadRecord | None:
    """The embedded head recorded in this data folder if it still runs and takes the folder's token, else None."""
    record = HeadRecord.read(data_dir)
    token_file = embedded_token_file(data_dir)
    if record is None or record.process() is None or not token_file.is_file():
        return None
    return record if record.accepts(token_file.read_text().strip()) else None


class LocalRayHead:
    """A private single-node Ray head with the dashboard, started as its own process group.

    Locked down: Ray's token authentication is on with a fresh random token per head (a 0600 file in the data
    folder, which the head and every job read through RAY_AUTH_TOKEN_PATH), and the dashboard listens on loopback
    only. Ray's gRPC servers (GCS, raylet, object manager) listen on every interface and Ray has no setting to
    change that: the token is what keeps a machine that reaches them from joining or submitting work.

    The head is recorded in the data folder; `start` re-attaches to a recorded head that still runs and takes the
    folder's token, so a service restart leaves the head's jobs running.
    """

    def __init__(self, root: Path, num_cpus: int | None = None, env: dict[str, str] | None = None):
        self.root = Path(root)
        # 0 is a valid head: one that runs nothing (the fuzz test's cluster that can never take a job).
        self.num_cpus = num_cpus if num_cpus is not None else os.cpu_count() or 1
        self.env = env or {}
        temp = self.root / "ray"
        if len(str(temp)) > MAX_TEMP_DIR_LEN:
            temp = Path("/tmp") / f"rmd-ray-{hashlib.sha256(str(self.root).encode()).hexdigest()[:10]}"
        self.temp_dir = temp
        self.process: psutil.Process | None = None
        self.dashboard_url = ""
        self.gcs_address = ""
        self._record_file = self.root / HEAD_RECORD
        self.log_path = self.root / "ray-head.log"
        self.token_file = embedded_token_file(self.root)

    def start(self, timeout_s: float = 180.0, attempts: int = 5) -> LocalRayHead:
        """Re-attach to this folder's running head, else start one; retried because Ray gives a raylet only 30 s to
        register, which a loaded machine misses."""
        self.root.mkdir(parents=True, exist_ok=True)
        if self._reattach():
            return self
        self._kill_leftover()
        for attempt in range(1, attempts + 1):
            try:
                self._start_once(timeout_s)
            except RayUnavailable as exc:
                self.stop()
                if attempt == attempts:
                    raise
                log.warning("Ray head start %d/%d failed, retrying: %s", attempt, attempts, str(exc)[-300:])
                continue
            except BaseException:
                self.stop()
                raise
            log.info("embedded Ray head up at %s (temp dir %s)", self.dashboard_url, self.temp_dir)
            return self
        raise AssertionError("unreachable: the last attempt returns or raises")

    def _reattach(self, timeout_s: float = 30.0) -> bool:
        record = reusable_head(self.root)
        process = record.process() if record else None
        if record is None or process is None:
            return False
        self.process, self.dashboard_url, self.gcs_address = process, record.dashboard_url, record.gcs_address
        try:
            self._wait_ready(timeout_s)
        except RayUnavailable as exc:
            log.warning("the recorded Ray head runs but its node is not alive: %s", exc)
            self.process = None
            return False
        if record.num_cpus != self.num_cpus:
            log.warning(
                "the running head has %d CPUs, not the %d asked for: `rmdistill stop-cluster` and restart to change it",
                record.num_cpus,
                self.num_cpus,
            )
        log.info(
            "re-attached to the embedded Ray head at %s (pid %d) and the jobs on it", self.dashboard_url, record.pid
        )
        return True

    def _start_once(self, timeout_s: float) -> None:
        ports = {
            "port": free_port(),
            "dashboard-port": free_port(),
            "ray-client-server-port": free_port(),
            "dashboard-agent-listen-port": free_port(),
            "dashboard-agent-grpc-port": free_port(),
            "runtime-env-agent-port": free_port(),
            "metrics-export-port": free_port(),
            "node-manager-port": free_port(),
            "object-manager-port": free_port(),
        }
        ray_bin = Path(sys.executable).with_name("ray")
        cmd = [
            str(ray_bin),
            "start",
            "--head",
            "--block",
            "--include-dashboard=true",
            "--dashboard-host=127.0.0.1",
            f"--num-cpus={self.num_cpus}",
            f"--temp-dir={self.temp_dir}",
            "--disable-usage-stats",
            *(f"--{name}={port}" for name, port in ports.items()),
        ]
        self._write_token()
        env = {
            **os.environ,
            **self.env,
            **self.auth_env,
            "RAY_USAGE_STATS_ENABLED": "0",
            # On SIGTERM a Ray node first drains (30 s by default) so other nodes' Serve proxies can route around it.
            # The embedded head is the whole cluster and stops with everything on it: there is nothing to drain for.
            "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
        }
        env.pop("RAY_ADDRESS", None)
        env.pop("RAY_AUTH_TOKEN", None)  # it would win over the head's own token file
        env.pop(NO_RAY_SIGNAL_HANDLER, None)
        env.pop(NO_RAY_AUTO_CONNECT, None)
        with self.log_path.open("ab") as out:
            # cwd is where job drivers start (no working_dir is uploaded): the data folder, not the caller's cwd.
            # Its own session: the head must not get the signals meant for the service, which it outlives.
            popen = subprocess.Popen(
                cmd,
                env=env,
                cwd=self.root,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.process = psutil.Process(popen.pid)
        self.dashboard_url = f"http://127.0.0.1:{ports['dashboard-port']}"
        self.gcs_address = f"127.0.0.1:{ports['port']}"
        record = HeadRecord(
            pid=popen.pid,
            started_at=self.process.create_time(),
            temp_dir=str(self.temp_dir),
            dashboard_url=self.dashboard_url,
            gcs_address=self.gcs_address,
            num_cpus=self.num_cpus,
        )
        self._record_file.write_text(json.dumps(asdict(record)))
        self._wait_ready(timeout_s)

    @property
    def auth_env(self) -> dict[str, str]:
        """What a process needs to talk to this head: its auth mode and where its token is."""
        return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(self.token_file)}

    @property
    def auth_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {read_token(self.token_file)}"}

    @property
    def running(self) -> bool:
        """The head process still runs (is_running also tells a reused pid apart; a zombie has ended)."""
        try:
            return (
                self.process is not None and self.process.is_running() and self.process.status() != psutil.STATUS_ZOMBIE
            )
        except psutil.Error:
            return False

    def _wait_exit(self, timeout_s: float) -> bool:
        """Whether the head ended within timeout_s. Polled, not psutil's wait: an adopted head is not this process's
        child, and its zombie lasts as long as its new parent leaves it unreaped."""
        assert self.process is not None
        deadline = time.monotonic() + timeout_s
        while self.running:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.1)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(self.process.pid, os.WNOHANG)  # reaps it when it is this process's child
        return True

    def _write_token(self) -> None:
        if not (self.token_file.is_file() and self.token_file.read_text().strip()):
            write_token(self.token_file)

    def _wait_ready(self, timeout_s: float) -> None:
        # The dashboard answers before the node registers; a submission in that gap fails, so wait for an ALIVE node.
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not self.running:
                tail = self.log_path.read_text(errors="replace")[-2000:]
                raise RayUnavailable(f"the embedded Ray head exited:\n{tail}")
            try:
                request = urllib.request.Request(f"{self.dashboard_url}/api/version", headers=self.auth_headers)
                urllib.request.urlopen(request, timeout=2).read()
                if _alive_nodes(self.dashboard_url, self.auth_headers):
                    return
            except Exception:  # not up yet; any failure means "poll again"
                pass
            time.sleep(0.5)
        raise RayUnavailable(f"the embedded Ray head is not ready after {timeout_s:.0f} s (log: {self.log_path})")

    def stop(self, timeout_s: float = 40.0) -> None:
        """SIGTERM lets `ray start --block` drain and stop its own processes; SIGKILL whatever is left after that."""
        if self.running:
            assert self.process is not None
            self.process.terminate()
            if not self._wait_exit(timeout_s):
                log.warning("Ray head did not stop within %.0f s; killing it", timeout_s)
        if self.process is not None:
            # The head leads its own process group (start_new_session): end the group, then reap the head.
            with contextlib.suppress(ProcessLookupError, psutil.Error):
                os.killpg(self.process.pid, signal.SIGKILL)
            self._wait_exit(10)
            self.process = None
        self._kill_strays()
        self._record_file.unlink(missing_ok=True)

    def stop_recorded(self) -> bool:
        """Stop the head recorded in this folder, whichever service started it; False when it was not running."""
        record = HeadRecord.read(self.root)
        self.process = record.process() if record else None
        was_running = self.running
        self.stop()
        return was_running

    def _kill_strays(self) -> None:
        # Workers run in their own sessions; the private temp dir on their command line marks them as ours.
        # The trailing "/" keeps /x/ray from matching another folder's /x/ray2.
        marker = f"{self.temp_dir}/"
        for proc in psutil.process_iter(["pid", "cmdline"]):
            if any(marker in f"{part}/" for part in proc.info.get("cmdline") or ()):
                with contextlib.suppress(ProcessLookupError, psutil.Error):
                    proc.kill()

    def _kill_leftover(self) -> None:
        """A recorded head that is gone or not this folder's (a crash, a changed token) may leave processes holding
        the temp dir: end them before starting a new one."""
        if self._record_file.exists():
            log.warning("the Ray head recorded in %s is gone or unusable: starting a fresh one", self._record_file)
            self._kill_strays()
            self._record_file.unlink(missing_ok=True)


@dataclass
class RayJobInfo:
    status: str  # PENDING, RUNNING, STOPPED, SUCCEEDED, FAILED
    message: str
    exit_code: int | None


# Ray's default GCS port: where `ray start --head` (and KubeRay's head) listens unless told otherwise.
DEFAULT_GCS_PORT = 6379


def gcs_address_of(address: str | None) -> str | None:
    """The address a driver joins the cluster at, from the one jobs are submitted to, so one setting serves both:
    a GCS `host:port` as it is, a dashboard URL's host at Ray's default GCS port. None stays None."""
    if not address:
        return None
    if "://" not in address:
        return address
    from urllib.parse import urlparse

    host = urlparse(address).hostname
    if host is None:
        return None
    return f"[{host}]:{DEFAULT_GCS_PORT}" if ":" in host else f"{host}:{DEFAULT_GCS_PORT}"


def submission_id_for(job_id: str) -> str:
    """The Ray submission id of a job: fixed before submitting, so it is on record while the submission is in flight
    (a cancel then knows what to stop, and the follower what to ask Ray about)."""
    return f"rmdistill-{job_id}"


class RayBackend:
    """Submits, follows, stops and reads the logs of pipeline jobs on one Ray cluster."""

    def __init__(
        self, data_dir: Path, address: str | None = None, num_cpus: int | None = None, artifacts: str | None = None
    ):
        self.data_dir = data_dir
        self.artifacts = artifacts
        self.requested_address = address
        self.num_cpus = num_cpus
        self.head: LocalRayHead | None = None
        self._client: Any = None

    @property
    def embedded(self) -> bool:
        return self.requested_address is None

    def job_env(self) -> dict[str, str]:
        env = {k: os.environ[k] for k in PASSTHROUGH_ENV if k in os.environ}
        env.setdefault("RMDISTILL_CACHE", str(self.data_dir / "cache"))
        if self.artifacts:
            env[ARTIFACTS_ENV] = self.artifacts
        return {**env, "RMDISTILL_HOME": str(self.data_dir), **self.auth_env}

    @property
    def auth_env(self) -> dict[str, str]:
        """Ray auth settings a job's driver needs (never the token itself: nodes hold it, or a file path does)."""
        if self.head is not None:
            return self.head.auth_env
        env = {"RAY_AUTH_MODE": auth_mode()}
        if os.environ.get("RAY_AUTH_TOKEN_PATH"):
            env["RAY_AUTH_TOKEN_PATH"] = os.environ["RAY_AUTH_TOKEN_PATH"]
        return env

    @property
    def auth_headers(self) -> dict[str, str]:
        """The dashboard's bearer header for this service's own HTTP calls (submission, status, logs, nodes)."""
        if self.head is not None:
            return self.head.auth_headers
        token = _env_token() if auth_mode() == "token" else None
        return {"Authorization": f"Bearer {token}"} if token else {}

    def start(self) -> None:
        if self.embedded:
            self.head = LocalRayHead(self.data_dir, self.num_cpus, env=self.job_env())
            self.head.start()

    def stop(self) -> None:
        if self.head is not None:
            self.head.stop()
            self.head = None
        self._client = None

    @property
    def address(self) -> str:
        if self.head is not None:
            return self.head.dashboard_url
        return self.requested_address or ""

    def client(self) -> Any:
        """The JobSubmissionClient, created on first use (creating it already talks to the cluster)."""
        if self._client is None:
            from ray.job_submission import JobSubmissionClient

            if not self.address:
                raise RayUnavailable("the embedded Ray head is not running")
            try:
                headers = {"Content-Type": "application/json", **self.auth_headers}
                self._client = JobSubmissionClient(self.address, headers=headers)
            except Exception as exc:  # Ray raises ConnectionError, RuntimeError, ValueError alike
                raise RayUnavailable(f"cannot reach the Ray cluster at {self.address}: {exc}") from None
        return self._client

    def _call(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except RuntimeError as exc:
            if "does not exist" in str(exc):
                raise LookupError(str(exc)) from None
            raise
        except (ConnectionError, OSError) as exc:
            self._client = None
            raise RayUnavailable(f"cannot reach the Ray cluster at {self.address} to {what}: {exc}") from None
        except Exception as exc:
            if type(exc).__module__.startswith(("requests", "urllib3")):
                self._client = None
                raise RayUnavailable(f"cannot reach the Ray cluster at {self.address} to {what}: {exc}") from None
            raise

    def submit(self, job_id: str, job_dir: Path, driver_memory: int = 0) -> str:
        """Submit the job's driver; it reserves `driver_memory` bytes of Ray's `memory` resource (0: nothing)."""
        python = shlex.quote(sys.executable)
        entrypoint = (
            f"{python} -m ray_jobs.pipeline --spec {shlex.quote(str(JobLayout(job_dir).spec))} "
            f"--job-dir {shlex.quote(str(job_dir))}"
        )
        client = self.client()
        return self._call(
            "submit the job",
            client.submit_job,
            entrypoint=entrypoint,
            submission_id=submission_id_for(job_id),
            runtime_env={"env_vars": self.job_env()},
            metadata={"rmdistill_job_id": job_id},
            entrypoint_memory=driver_memory or None,
        )

    def info(self, submission_id: str) -> RayJobInfo | None:
        """Status of a Ray job; None when the cluster has no such job (it vanished)."""
        client = self.client()
        try:
            details = self._call("read the job status", client.get_job_info, submission_id)
        except LookupError:
            return None
        return RayJobInfo(str(details.status.value), details.message or "", details.driver_exit_code)

    def stop_job(self, submission_id: str) -> bool | None:
        """True: stop requested; False: the Ray job had ended already; None: Ray has no such job (not yet, or gone)."""
        client = self.client()
        try:
            return bool(self._call("stop the job", client.stop_job, submission_id))
        except LookupError:
            return None

    def logs(self, submission_id: str) -> str | None:
        client = self.client()
        try:
            return self._call("read the job logs", client.get_job_logs, submission_id)
        except LookupError:
            return None

    def resources(self) -> ClusterResources:
        dashboard = self.client().get_address()
        try:
            nodes = _alive_nodes(dashboard, self.auth_headers)
        except Exception as exc:  # the state API wraps HTTP failures in several types
            raise RayUnavailable(f"cannot list the nodes of the Ray cluster at {dashboard}: {exc}") from None
        return ClusterResources.from_nodes(n.resources_total or {} for n in nodes)
