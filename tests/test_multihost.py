"""The whole job on a Ray cluster of three hosts: a head and two workers, each in its own network namespace with its
own address on a private bridge (tests/support/hosts.py), Ray's token authentication on. The service runs on the
head's host, pointed at the cluster by address, with its store in PostgreSQL and its artifacts in an S3 server (moto's,
on the head's address); a client submits a tiny job over HTTP. The manifest and the event log then show where the
work ran: the two reward models on the two worker hosts, and the two distillation workers likewise; the bucket holds
every stage, the event log, and the checkpoints the distillation workers wrote from their hosts.

The worker hosts do not share the service's data folder: each runs in a mount namespace of its own with an empty
folder in its place, so the members and the distillation workers read what they need from the bucket and hand their
outputs (reward models, the policy) and their events to the driver without a shared filesystem.

Where namespaces cannot be made (no root, no iproute2), the three nodes share this machine's loopback instead and
the test says so in a warning; the placement is then checked by Ray node id rather than by address.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import tempfile
import time
import warnings
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from support.data import write_prefs
from support.hosts import Host, can_make_hosts, private_hosts
from support.postgres import bin_dir, postgres_server
from support.ray_nodes import NO_DRAIN, RAY, free_ports, node_ports, stop
from support.s3 import s3_server

from clients.sdk import Client
from ray_jobs.events import read_events
from service.ray_backend import _alive_nodes
from tests.test_service import tiny_spec

pytestmark = [pytest.mark.slow, pytest.mark.ray, pytest.mark.timeout(1500)]

RMDISTILL = str(Path(RAY).parent / "rmdistill")
TOKEN = "token-multihost"


def spec() -> dict[str, Any]:
    """The service tests' tiny job with two distillation workers: its two reward models of 0.5 CPU (plus 0.1 for
    each Tune trial) and the two workers of 1 CPU cannot share one of the 1-CPU worker hosts. A checkpoint at step
    1, so one is written to the artifact root."""
    base = tiny_spec("multihost")
    return base | {"distill": {**base["distill"], "num_workers": 2, "checkpoint_every": 1}}


@contextmanager
def three_hosts() -> Iterator[tuple[list[Host], bool]]:
    why_not = can_make_hosts()
    if why_not is None:
        with private_hosts(3) as hosts:
            yield hosts, True
        return
    warnings.warn(f"three Ray nodes on one host, not three hosts: {why_not}", stacklevel=2)
    yield [Host(None, "127.0.0.1")] * 3, False


def _wait(predicate: Any, timeout_s: float, what: str, procs: list[subprocess.Popen]) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert all(p.poll() is None for p in procs), f"a process exited while waiting for {what}"
        try:
            value = predicate()
        except Exception:  # not up yet: connection refused, Ray not answering
            value = None
        if value:
            return value
        time.sleep(2)
    raise AssertionError(f"timed out waiting for {what}")


def test_a_job_spreads_over_three_hosts_with_the_store_in_postgresql(tmp_path: Path) -> None:
    if bin_dir() is None and not os.environ.get("CI"):
        pytest.skip("PostgreSQL is not installed (make test installs it as root)")
    home = tmp_path / "home"
    write_prefs(home / "datasets" / "prefs.jsonl")
    logs = tmp_path / "logs"
    logs.mkdir()
    ray_env = os.environ | {
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": secrets.token_hex(16),
        "RAY_USAGE_STATS_ENABLED": "0",
        **NO_DRAIN,
    }
    procs: list[subprocess.Popen] = []

    def start(host: Host, name: str, argv: list[str], env: dict[str, str] = ray_env) -> subprocess.Popen:
        proc = subprocess.Popen(
            host.command(argv), env=env, stdout=(logs / f"{name}.log").open("w"), stderr=subprocess.STDOUT
        )
        procs.append(proc)
        return proc

    with ExitStack() as stack, three_hosts() as (hosts, separate):
        stack.callback(lambda: [stop(p) for p in reversed(procs)])
        head, workers = hosts[0], hosts[1:]
        if separate:
            # The namespaces share this machine's host name, which resolves to 127.0.0.1: without a named interface
            # gloo (DDP's CPU backend) would advertise loopback to the other host. Real hosts have their own names.
            ray_env["GLOO_SOCKET_IFNAME"] = "eth0"
        gcs, dashboard, client_port, api_port = free_ports(4)
        dashboard_url = f"http://{head.ip}:{dashboard}"
        ray_headers = {"Authorization": f"Bearer {ray_env['RAY_AUTH_TOKEN']}"}

        def start_node(host: Host, name: str, argv: list[str], nodes: int) -> None:
            """Start a node and wait until the cluster has `nodes` alive. A loaded machine can miss Ray's fixed 30 s
            raylet-registration deadline, which ends `ray start`; one fresh try is enough in practice."""

            def joined() -> bool:
                return len(_alive_nodes(dashboard_url, ray_headers)) >= nodes

            for attempt in (1, 2):
                proc = start(host, f"{name}-{attempt}", argv)
                try:
                    _wait(lambda: head.call(joined), 240, name, [proc])  # noqa: B023 (called before the loop moves on)
                    return
                except AssertionError:
                    if proc.poll() is None or attempt == 2:
                        raise
                    procs.remove(proc)

        # Short root: Ray's unix socket paths live under it and must stay below ~107 characters.
        temp = tempfile.mkdtemp(prefix="rmh", dir="/tmp")
        stack.callback(shutil.rmtree, temp, ignore_errors=True)
        common = ["--block", "--disable-usage-stats"]
        start_node(head, "head", [RAY, "start", "--head", f"--node-ip-address={head.ip}", f"--port={gcs}",
                                  f"--dashboard-host={head.ip}", f"--dashboard-port={dashboard}",
                                  f"--ray-client-server-port={client_port}", "--num-cpus=0", f"--temp-dir={temp}",
                                  *common, *node_ports()], nodes=1)  # fmt: skip
        worker_nodes = []
        for i, worker in enumerate(workers, 1):
            argv = [RAY, "start", f"--address={head.ip}:{gcs}", f"--node-ip-address={worker.ip}", "--num-cpus=1",
                    *common, *node_ports()]  # fmt: skip
            start_node(worker, f"worker{i}", private_folder(home, argv) if separate else argv, nodes=1 + i)
            worker_nodes.append(procs[-1])

        database = stack.enter_context(postgres_server(prefix=head.command([])))
        s3 = stack.enter_context(s3_server(head))
        artifacts = s3.bucket("multihost") + "/root"
        hub = {"HF_TOKEN": "hf_" + secrets.token_hex(12), "HF_ENDPOINT": "https://hub.example.internal"}
        # The bucket's credentials, like the hub's, are set only where the service runs.
        service_env = (
            ray_env
            | hub
            | s3.env
            | {
                "RAY_ADDRESS": dashboard_url,
                "RMDISTILL_SERVING_RAY_ADDRESS": f"{head.ip}:{gcs}",
                "RMDISTILL_ARTIFACTS": artifacts,
            }
        )
        argv = [RMDISTILL, "serve", "--host", head.ip, "--port", str(api_port), "--data-dir", str(home),
                "--database-url", database, "--tokens", TOKEN]  # fmt: skip
        start(head, "service", argv, env=service_env)
        url = f"http://{head.ip}:{api_port}"

        def client_call(fn: Any) -> Any:
            def run() -> Any:
                with Client(url, token=TOKEN, timeout=30) as client:
                    return fn(client)

            return head.call(run)

        health = _wait(lambda: client_call(lambda c: c.health()), 300, "the service", procs)
        assert health["ray"]["embedded"] is False

        job = client_call(lambda c: c.submit(spec()))
        final = _wait(
            lambda: (
                (j := client_call(lambda c: c.get(job["id"])))["state"] in ("succeeded", "failed", "cancelled") and j
            ),
            1200,
            "the job",
            procs,
        )
        job_dir = Path(final["job_dir"]) if "job_dir" in final else home / "jobs" / job["id"]
        assert final["state"] == "succeeded", (final.get("error"), _tail(logs))

        manifest = json.loads((job_dir / "ensemble" / "manifest.json").read_text())
        (placed,) = [e["workers"] for e in read_events(job_dir) if e.get("stage") == "distill" and "workers" in e]
        member_nodes = [(m["node_id"], m["node_ip"]) for m in manifest["members"]]
        distill_nodes = [(w["node_id"], w["node_ip"]) for w in placed]
        # Each pair of processes ran on two different nodes, and the same two (the workers; the head has no CPU).
        assert len({n for n, _ in member_nodes}) == 2 and {n for n, _ in member_nodes} == {n for n, _ in distill_nodes}
        if separate:
            assert (
                sorted(ip for _, ip in member_nodes) == sorted(ip for _, ip in distill_nodes) == [w.ip for w in workers]
            )
        else:
            print("three Ray nodes on one host (no network namespaces here): placement checked by node id")

        # The store is PostgreSQL's: the job and its history are rows there.
        from sqlalchemy import create_engine, text

        def rows() -> tuple[str, list[str]]:
            engine = create_engine(database.replace("postgresql://", "postgresql+psycopg://"))
            try:
                with engine.connect() as connection:
                    state = connection.execute(text("SELECT state FROM jobs WHERE id = :i"), {"i": job["id"]}).scalar()
                    path = connection.execute(
                        text("SELECT to_state FROM job_transitions WHERE job_id = :i ORDER BY id"), {"i": job["id"]}
                    ).scalars()
                    return state, list(path)
            finally:
                engine.dispose()

        state, path = head.call(rows)
        assert state == "succeeded" and path[-2:] == ["running", "succeeded"]

        # The hub's token and endpoint, set only where the service runs, reached the job through its runtime
        # environment, and no answer of the service, nor anything in the job folder, carries the token.
        ray_job = head.call(lambda: httpx.get(f"{dashboard_url}/api/jobs/rmdistill-{job['id']}", headers=ray_headers))
        assert {k: ray_job.json()["runtime_env"]["env_vars"][k] for k in hub} == hub
        answers = client_call(
            lambda c: [json.dumps(c.get(job["id"])), json.dumps(c.events(job["id"])), c.logs(job["id"])]
        )
        files = [
            p.read_text(errors="replace")
            for p in job_dir.rglob("*")
            if p.is_file() and p.suffix in (".json", ".jsonl", ".yaml", ".txt", ".md")
        ]
        assert not [text for text in answers + files if hub["HF_TOKEN"] in text or s3.secret_key in text]

        # Every stage is complete in the bucket, with the event log; the distillation workers wrote their
        # checkpoints there, not into the job folder, and they left with the run once the policy was published. The
        # folders the members and rank 0 handed over to the driver through the bucket are gone from it.
        objects = s3.objects("multihost", f"root/jobs/{job['id']}/")
        markers = {k.rsplit("/", 1)[1].removesuffix(".complete") for k in objects if k.endswith(".complete")}
        assert markers == set(final["artifacts"]) and len(markers) == 6
        assert objects[f"root/jobs/{job['id']}/events.jsonl"] == (job_dir / "events.jsonl").read_bytes()
        written = [p.split("?")[0] for m, p in s3.requests() if m in ("PUT", "POST")]
        assert any(f"/jobs/{job['id']}/checkpoints/distill/" in p and p.endswith("/state.pt") for p in written)
        assert not [k for k in objects if "/checkpoints/" in k]
        assert not (job_dir / "checkpoints").exists()
        assert not [k for k in objects if "/.partial/" in k]

        if not separate:
            print("the three Ray nodes share one folder (no mount namespaces here): nothing shows they need none")
            return
        # No worker host saw the service's folder: each had its own, where it fetched the stages it read from the
        # bucket (the data for the members, the ensemble for scoring) and never the spec the service wrote. The
        # members' and rank 0's events reached the driver's log through its relay.
        for proc in worker_nodes:
            seen = subprocess.run(
                ["nsenter", "-t", str(proc.pid), "-m", "find", str(home), "-maxdepth", "4"],
                capture_output=True, text=True, check=True,
            ).stdout.split()  # fmt: skip
            cache = home / "jobs" / job["id"]
            assert str(cache / "data" / "train.parquet") in seen and str(cache / "spec.json") not in seen
            assert str(home / "datasets") not in seen
        finished = [e for e in read_events(job_dir) if e.get("event") == "member_finished"]
        assert sorted(e["member"] for e in finished) == [0, 1]
        assert {e["node_id"] for e in finished} == {n for n, _ in member_nodes}


def private_folder(folder: Path, argv: list[str]) -> list[str]:
    """argv run in a mount namespace of its own where `folder` is an empty tmpfs: a host that does not share the
    service's data folder (the processes it starts inherit the namespace)."""
    script = f'mount -t tmpfs rmd-private "{folder}" && exec "$@"'
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh", *argv]


def _port_open(ip: str, port: int) -> bool:
    import socket

    with socket.socket() as s:
        s.settimeout(2)
        return s.connect_ex((ip, port)) == 0


def _tail(logs: Path) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text()[-2000:]}" for p in sorted(logs.glob("*.log")))
