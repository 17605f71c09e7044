"""End to end through HTTP: uvicorn on a free port, real SQLite, real Ray heads started with `ray start`, the real
pipeline on a tiny spec.

The embedded-mode server starts its own Ray head (`ray start`, its own ports and temp dir); the restart test runs
a second service in RAY_ADDRESS mode against that head, which the second service did not start and which outlives
its restart. The head is not the session's in-process `ray_cluster`, and this process never calls ray.init on it:
it talks to it over the dashboard's HTTP API only.
"""

from __future__ import annotations

import io
import json
import shutil
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from clients.sdk import Client, RmdistillError
from service.admission import confine_tracking_uri
from service.background import BackgroundServer
from service.ray_backend import free_port
from service.settings import Settings
from service.store import Store
from tests.support.s3 import S3Server

# The first full job dominates: minutes on a busy 2-core machine.
pytestmark = [pytest.mark.slow, pytest.mark.ray, pytest.mark.timeout(1200)]

TOKEN_A, TOKEN_B = "token-alice", "token-bob"
JOB_TIMEOUT_S = 600


class Server(BackgroundServer):
    def client(self, token: str | None = TOKEN_A) -> Client:
        return Client(self.url, token=token or "")


def write_prefs(root: Path, n: int = 24) -> Path:
    """A small standard-format preference file inside the data root."""
    root.mkdir(parents=True, exist_ok=True)
    path = root / "prefs.jsonl"
    adjectives = ["great", "lovely", "fine", "dull", "awful", "bright", "calm", "odd"]
    with path.open("w") as fh:
        for i in range(n):
            good, bad = adjectives[i % 4], adjectives[4 + i % 4]
            row = {
                "prompt": f"Review {i}: the film was",
                "chosen": f" {good} and I liked it a lot.",
                "rejected": f" {bad}.",
            }
            fh.write(json.dumps(row) + "\n")
    return path


def tiny_spec(name: str, max_steps: int = 2) -> dict[str, Any]:
    return {
        "name": name,
        "reference": "tiny:llama",
        "data": {"source": "prefs.jsonl", "test_fraction": 0.25, "apply_chat_template": False},
        # Half-CPU workers let both members train at once on the 2-CPU heads.
        "ensemble": {
            "size": 2,
            "backbone": "tiny:bert",
            "epochs": 1,
            "batch_size": 8,
            "max_length": 64,
            "cpus_per_worker": 0.5,
        },
        "generation": {"engine": "hf", "samples_per_prompt": 2, "max_new_tokens": 6, "max_prompts": 4},
        "score": {"max_length": 64},
        "distill": {"loss": "e-dpo", "max_steps": max_steps, "batch_size": 4, "max_length": 64},
        "evaluate": {"oracle": "builtin:vader", "num_prompts": 4, "max_new_tokens": 6},
    }


def wait_for(predicate: Any, timeout_s: float, what: str) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def ray_status(dashboard_url: str, submission_id: str, headers: dict[str, str]) -> str:
    body = httpx.get(f"{dashboard_url}/api/jobs/{submission_id}", headers=headers, timeout=10).json()
    return body["status"]


# -------------------------------------------------------------------------------------------------------------
# No cluster behind RAY_ADDRESS


def test_unreachable_ray_is_503_and_reads_still_work(tmp_path: Path) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    server = Server(Settings(data_dir=tmp_path, ray_address=dead, poll_interval_s=0.2)).start()
    try:
        write_prefs(tmp_path / "datasets")
        with server.client(None) as client:
            with pytest.raises(RmdistillError) as err:
                client.submit(tiny_spec("nowhere"))
            assert err.value.status == 503
            assert "Ray is unavailable" in err.value.message and dead in err.value.message
            assert client.list()["total"] == 0  # refused before a job row or folder was made
            assert client.health()["ray"] == {"address": dead, "embedded": False}
        assert list((tmp_path / "jobs").iterdir()) == []
    finally:
        server.stop()


# -------------------------------------------------------------------------------------------------------------
# Embedded mode: the service starts (and stops) its own Ray head


def embedded_server(home: Path, artifacts: str | None = None) -> Server:
    """A service with two tokens that starts its own 2-CPU Ray head, and prefs.jsonl in its data root."""
    write_prefs(home / "datasets")
    settings = Settings(
        data_dir=home, tokens=[TOKEN_A, TOKEN_B], ray_num_cpus=2, poll_interval_s=0.5, artifacts=artifacts
    )
    return Server(settings).start()


@pytest.fixture(scope="module")
def embedded(tmp_path_factory: pytest.TempPathFactory, s3: S3Server) -> Iterator[Server]:
    """The service with its artifacts in moto's S3 server: its credentials in the service's environment only, as a
    deployment gives them (the embedded head, and so every job, inherits them from there)."""
    home = tmp_path_factory.mktemp("svc")
    with pytest.MonkeyPatch.context() as env:
        for name, value in s3.env.items():
            env.setenv(name, value)
        server = embedded_server(home, artifacts=s3.bucket("svc-artifacts") + "/root")
        yield server
        server.stop()
    head_pid = json.loads((home / "ray-head.json").read_text())["pid"] if (home / "ray-head.json").exists() else None
    assert head_pid is None, "the embedded Ray head was not stopped with the service"


@pytest.fixture(scope="module")
def completed(embedded: Server) -> dict[str, Any]:
    """One tiny job submitted over HTTP and followed over SSE to its end (a checkpoint at step 1: one is written)."""
    spec = tiny_spec("tiny-e2e")
    spec["distill"]["checkpoint_every"] = 1
    with embedded.client() as client:
        job = client.submit(spec)
        assert job["state"] == "pending" and job["ray_submission_id"] == f"rmdistill-{job['id']}"
        events = list(client.follow(job["id"]))
        final = client.wait(job["id"], timeout=60)
        dashboard = client.health()["ray"]["address"]
    backend = embedded.app.state.backend
    return {
        "submitted": job,
        "events": events,
        "job": final,
        "dashboard": dashboard,
        "ray_headers": backend.auth_headers,
        "ray_env": backend.auth_env,
    }


def test_a_local_mlflow_store_lies_in_the_owners_area_or_a_data_root(tmp_path: Path) -> None:
    area, shared = tmp_path / "uploads" / "alice", tmp_path / "datasets"
    roots = (area, shared)
    assert confine_tracking_uri("sqlite:///runs/mlflow.db", roots) == f"sqlite:///{area}/runs/mlflow.db"
    assert confine_tracking_uri(f"sqlite:///{shared}/m.db", roots) == f"sqlite:///{shared}/m.db"
    assert confine_tracking_uri("https://mlflow.example.com", roots) == "https://mlflow.example.com"


class TestEmbedded:
    def test_health_is_open_and_metrics_need_a_token(self, embedded: Server) -> None:
        health = httpx.get(f"{embedded.url}/healthz").json()
        assert health["status"] == "ok" and health["ray"]["embedded"] is True and health["auth"] is True
        assert httpx.get(f"{embedded.url}/v1/jobs").status_code == 401
        assert httpx.get(f"{embedded.url}/metrics").status_code == 401
        assert httpx.get(f"{embedded.url}/openapi.json").json()["paths"]["/v1/jobs"]

    def test_tokens(self, embedded: Server) -> None:
        for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": f"Basic {TOKEN_A}"}):
            response = httpx.get(f"{embedded.url}/v1/jobs", headers=headers)
            assert response.status_code == 401
            assert response.json()["error"]["message"].startswith(("missing bearer token", "invalid bearer token"))
        assert httpx.get(f"{embedded.url}/v1/jobs", headers={"Authorization": f"Bearer {TOKEN_A}"}).status_code == 200

    def test_bad_spec_is_422_naming_the_field(self, embedded: Server) -> None:
        with embedded.client() as client:
            for spec, field, message in [
                ({"distill": {"beta": -1}}, "distill.beta", "must be > 0"),
                ({"distill": {"betta": 1}}, "distill.betta", "unknown field"),
                ({"ensemble": {"size": 2, "members": [{}, {}, {}]}}, "ensemble", "3 overrides"),
            ]:
                with pytest.raises(RmdistillError) as err:
                    client.submit(spec)
                assert err.value.status == 422
                assert err.value.fields[0]["field"] == field and message in err.value.fields[0]["message"]
        bad_json = httpx.post(
            f"{embedded.url}/v1/jobs",
            content=b"{not json",
            headers={"Authorization": f"Bearer {TOKEN_A}", "Content-Type": "application/json"},
        )
        assert bad_json.status_code == 422 and bad_json.json()["error"]["fields"][0]["field"] == "body"
        assert (
            httpx.get(f"{embedded.url}/v1/jobs?limit=0", headers={"Authorization": f"Bearer {TOKEN_A}"}).json()[
                "error"
            ]["fields"][0]["field"]
            == "limit"
        )

    def test_paths_outside_the_data_roots_are_refused(self, embedded: Server) -> None:
        home = embedded.settings.data_dir
        (home / "datasets" / "escape.jsonl").symlink_to(home / "rmdistill.db")
        before = set((home / "jobs").iterdir())
        with embedded.client() as client:
            for field, source, status in [
                ("data.source", "/etc/passwd", 403),
                ("data.source", "../rmdistill.db", 403),
                ("data.source", "escape.jsonl", 403),  # a symlink out of the root counts by its target
                ("data.source", "missing.jsonl", 422),
                ("reference", str(home / "jobs"), 403),
                ("evaluate.oracle", "~/.ssh", 403),
                ("evaluate.prompts", "/etc/hostname", 403),
                ("evaluate.prompts", "prompts-missing.txt", 422),
                ("data.relabel", "/etc", 403),
            ]:
                spec = tiny_spec("paths")
                target = spec
                *parents, leaf = field.split(".")
                for part in parents:
                    target = target[part]
                target[leaf] = source
                with pytest.raises(RmdistillError) as err:
                    client.submit(spec)
                assert (err.value.status, err.value.fields[0]["field"]) == (status, field), source
            for uri, status in [
                ("sqlite:////etc/mlflow.db", 403),
                ("sqlite:///../../mlflow.db", 403),
                ("file:///tmp/mlruns", 422),
                ("/tmp/mlruns", 422),
            ]:
                spec = tiny_spec("tracking")
                spec["tracking"] = {"mlflow": {"tracking_uri": uri}}
                with pytest.raises(RmdistillError) as err:
                    client.submit(spec)
                assert (err.value.status, err.value.fields[0]["field"]) == (status, "tracking.mlflow.tracking_uri"), uri
            with pytest.raises(RmdistillError) as err:
                client.register_policy("/etc")
            assert err.value.status == 403 and err.value.fields[0]["field"] == "path"
        assert set((home / "jobs").iterdir()) == before

    def test_impossible_resources_are_refused(self, embedded: Server) -> None:
        with embedded.client() as client:
            for section, values, field in [
                ("distill", {"use_gpu": True}, "distill.use_gpu"),
                ("distill", {"num_workers": 64}, "distill.num_workers"),
                ("ensemble", {"gpus_per_worker": 1}, "ensemble.gpus_per_worker"),
                ("ensemble", {"workers_per_member": 5}, "ensemble.workers_per_member"),  # 5 × 0.5 CPUs
            ]:
                spec = tiny_spec("big")
                spec[section].update(values)
                with pytest.raises(RmdistillError) as err:
                    client.submit(spec)
                assert err.value.status == 409 and err.value.fields[0]["field"] == field
                assert "the cluster has 2 CPUs and 0 GPUs" in err.value.message

    def test_body_limit(self, embedded: Server) -> None:
        response = httpx.post(
            f"{embedded.url}/v1/jobs",
            json={"name": "x" * (2 << 20)},
            headers={"Authorization": f"Bearer {TOKEN_A}"},
        )
        assert response.status_code == 413 and "limit" in response.json()["error"]["message"]

    def test_job_succeeds_with_artifacts(self, embedded: Server, completed: dict[str, Any]) -> None:
        job, events = completed["job"], completed["events"]
        assert job["state"] == "succeeded", job.get("error")
        kinds = [e["kind"] for e in events]
        assert kinds[0] == "job_started" and kinds[-1] == "job_finished" and events[-1]["status"] == "succeeded"
        started = [e["stage"] for e in events if e["kind"] == "stage_started"]
        assert {"data", "ensemble", "distill"} <= set(started)
        job_dir = Path(job["job_dir"])
        assert job_dir == embedded.settings.data_dir / "jobs" / job["id"]
        for stage in ("data", "ensemble", "generate", "score", "distill", "evaluate"):
            assert job["artifacts"][stage] == str(job_dir / stage) and (job_dir / stage).is_dir()
        assert len(list((job_dir / "ensemble").glob("member-*"))) == 2
        assert (job_dir / "evaluate" / "report.json").is_file()
        assert [t["to"] for t in job["transitions"]] == ["pending", "running", "succeeded"]
        assert job["started_at"] <= job["finished_at"]
        # The served spec is the confined one: the relative dataset path became absolute inside the root.
        assert json.loads((job_dir / "spec.json").read_text())["data"]["source"] == str(
            embedded.settings.data_dir / "datasets" / "prefs.jsonl"
        )
        with embedded.client() as client:
            page = client.events(job["id"])
            assert page["events"] == events and page["next_offset"] == len(events)
            assert client.events(job["id"], offset=len(events) - 1)["events"] == events[-1:]
            full = client.logs(job["id"])
            assert "Running entrypoint" in full
            assert client.logs(job["id"], tail=3) == "".join(full.splitlines(keepends=True)[-3:])
            assert [j["id"] for j in client.list(state="succeeded", name="tiny-e2e")["items"]] == [job["id"]]
            assert client.list(state="failed", name="tiny-e2e")["total"] == 0
            policy = client.policy(job["id"])
            assert policy["path"] == str(job_dir / "distill") and policy["loss"] == "e-dpo"
            assert policy["base_model"] == "tiny:llama"
            assert job["id"] in [p["id"] for p in client.policies()]
        metrics = httpx.get(f"{embedded.url}/metrics", headers={"Authorization": f"Bearer {TOKEN_A}"}).text
        assert 'rmdistill_jobs{state="succeeded"} 1.0' in metrics
        assert 'rmdistill_http_request_duration_seconds_count{method="POST",route="/v1/jobs",status="202"}' in metrics

    def test_artifacts_are_in_the_bucket_and_refill_a_deleted_job_folder(
        self, embedded: Server, completed: dict[str, Any], s3: S3Server
    ) -> None:
        job = completed["job"]
        job_dir = Path(job["job_dir"])
        prefix = f"root/jobs/{job['id']}"
        objects = s3.objects("svc-artifacts", prefix + "/")
        # Every published stage, file for file, with a completion marker listing exactly those files.
        for stage in job["artifacts"]:
            local = {p.relative_to(job_dir / stage).as_posix(): p for p in (job_dir / stage).rglob("*") if p.is_file()}
            marker = json.loads(objects[f"{prefix}/{stage}.complete"])
            assert marker["files"] == {name: path.stat().st_size for name, path in local.items()}, stage
            for name, path in local.items():
                assert objects[f"{prefix}/{stage}/{name}"] == path.read_bytes(), f"{stage}/{name}"
        assert {"config.json", "rmdistill.json"} <= {k.rsplit("/", 1)[1] for k in objects if "/distill/" in k}
        assert objects[f"{prefix}/events.jsonl"] == (job_dir / "events.jsonl").read_bytes()
        assert objects[f"{prefix}/spec.json"] == (job_dir / "spec.json").read_bytes()
        # Ray Train's checkpoints went to the bucket, not into the job folder, and left it once the policy was
        # published.
        written = [p.split("?")[0] for m, p in s3.requests() if m in ("PUT", "POST")]
        assert any(p.startswith(f"/svc-artifacts/{prefix}/checkpoints/distill/") for p in written)
        assert any(p.endswith("/state.pt") for p in written if "/checkpoints/distill/" in p)
        assert not [k for k in objects if "/checkpoints/" in k]
        assert not (job_dir / "checkpoints").exists()
        uploads = [e.get("message", "") for e in completed["events"] if e.get("message", "").startswith("uploaded ")]
        assert sorted(uploads) == sorted(f"uploaded {s}/ to s3://svc-artifacts/root" for s in job["artifacts"])
        with embedded.client() as client:
            logs = client.logs(job["id"])
        for text in (logs, (job_dir / "events.jsonl").read_text(), json.dumps(job)):
            assert s3.secret_key not in text

        # The job folder is a cache: deleted, it comes back from the bucket when the service is asked for it.
        aside = job_dir.with_name(job_dir.name + "-aside")
        job_dir.rename(aside)
        try:
            with embedded.client() as client:
                assert client.get(job["id"])["stages"] == job["stages"]
            api = httpx.Client(base_url=embedded.url, headers={"Authorization": f"Bearer {TOKEN_A}"}, timeout=120)
            with api:
                listed = {a["path"] for a in api.get(f"/v1/jobs/{job['id']}/artifacts").json()["items"]}
                report = api.get(f"/v1/jobs/{job['id']}/artifacts/evaluate/report.json")
                policy = api.get(f"/v1/jobs/{job['id']}/artifacts/distill.tar.gz")
            kept = {
                f"{p.relative_to(aside).as_posix()}"
                for stage in job["artifacts"]
                for p in (aside / stage).rglob("*")
                if p.is_file()
            }
            assert listed == kept | {f"{stage}.tar.gz" for stage in job["artifacts"]}
            assert report.status_code == 200 and report.content == (aside / "evaluate" / "report.json").read_bytes()
            with tarfile.open(fileobj=io.BytesIO(policy.content), mode="r:gz") as tar:
                unpacked = {m.name.split("/", 1)[1]: tar.extractfile(m).read() for m in tar.getmembers()}
            assert unpacked == {
                p.relative_to(aside / "distill").as_posix(): p.read_bytes()
                for p in (aside / "distill").rglob("*")
                if p.is_file()
            }
        finally:
            shutil.rmtree(job_dir, ignore_errors=True)
            aside.rename(job_dir)

    def test_other_owners_get_404(self, embedded: Server, completed: dict[str, Any]) -> None:
        job_id = completed["job"]["id"]
        with embedded.client(TOKEN_B) as bob:
            for call in (bob.get, bob.events, bob.logs, bob.cancel, bob.policy):
                with pytest.raises(RmdistillError) as err:
                    call(job_id)
                assert err.value.status == 404
            assert bob.list()["total"] == 0 and bob.policies() == []
            with pytest.raises(RmdistillError) as err:
                list(bob.follow(job_id))
            assert err.value.status == 404
            # Reusing someone else's job by id does not resolve to their folder.
            spec = tiny_spec("steal")
            spec["reuse"] = {"pairs": job_id}
            with pytest.raises(RmdistillError) as err:
                bob.submit(spec)
            assert err.value.status == 422 and err.value.fields[0]["field"] == "reuse.pairs"

    def test_cli(self, embedded: Server, completed: dict[str, Any], tmp_path: Path) -> None:
        from typer.testing import CliRunner

        from clients.cli import app

        runner = CliRunner()
        base = ["--url", embedded.url, "--token", TOKEN_A]
        job_id = completed["job"]["id"]
        status = runner.invoke(app, [*base, "--json", "status", job_id])
        assert status.exit_code == 0 and json.loads(status.stdout)["state"] == "succeeded"
        listing = runner.invoke(app, [*base, "jobs", "--state", "succeeded"], env={"COLUMNS": "200"})
        assert listing.exit_code == 0 and job_id in listing.stdout
        bad = tmp_path / "bad.yaml"
        bad.write_text("name: bad\ndistill:\n  beta: -1\n")
        refused = runner.invoke(app, [*base, "submit", str(bad)], env={"COLUMNS": "200"})
        assert refused.exit_code == 1 and "error 422" in refused.stderr and "distill.beta" in refused.stderr
        assert refused.stdout == ""  # errors go to stderr: scripts read only answers from stdout
        assert runner.invoke(app, ["--url", embedded.url, "jobs"]).exit_code == 1  # no token: 401

    def test_cancel_stops_the_ray_job(self, embedded: Server, completed: dict[str, Any]) -> None:
        with embedded.client() as client:
            job = client.submit(tiny_spec("to-cancel", max_steps=500))
            wait_for(lambda: client.get(job["id"])["stage"] is not None, 180, "the job to start a stage")
            assert client.cancel(job["id"])["state"] == "cancelling"
            final = client.wait(job["id"], timeout=120)
            with pytest.raises(RmdistillError) as err:
                client.cancel(job["id"])
            assert err.value.status == 409
        assert final["state"] == "cancelled"
        assert [t["to"] for t in final["transitions"]][-2:] == ["cancelling", "cancelled"]
        assert "distill" not in final["artifacts"] and final["policy_id"] is None
        assert ray_status(completed["dashboard"], job["ray_submission_id"], completed["ray_headers"]) == "STOPPED"


# -------------------------------------------------------------------------------------------------------------
# RAY_ADDRESS mode: a separately started head that outlives a service restart


def test_a_cancel_while_the_submission_is_in_flight_stops_the_job(
    embedded: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Cancel lands between the job's record and Ray's acceptance: the job must end cancelled and stopped on Ray,
    not marked cancelled while Ray runs it untracked."""
    import threading

    backend = embedded.app.state.backend
    real_submit = backend.submit

    def slow_submit(job_id: str, job_dir: Path, **options: Any) -> str:
        time.sleep(3.0)  # a slow cluster: the submission is still in flight when the cancel arrives
        return real_submit(job_id, job_dir, **options)

    monkeypatch.setattr(backend, "submit", slow_submit)
    answers: list[dict[str, Any]] = []
    with embedded.client() as client:
        submitting = threading.Thread(target=lambda: answers.append(client.submit(tiny_spec("race"))))
        submitting.start()
        [job] = wait_for(lambda: client.list(name="race")["items"], 10, "the job record")
        assert client.cancel(job["id"])["state"] == "cancelled"
        submitting.join(timeout=60)
        assert answers and answers[0]["ray_submission_id"] == f"rmdistill-{job['id']}"
        assert client.get(job["id"])["state"] == "cancelled"
        headers = backend.auth_headers
        dashboard = client.health()["ray"]["address"]
    stopped = wait_for(
        lambda: ray_status(dashboard, f"rmdistill-{job['id']}", headers) in ("STOPPED", "FAILED"), 60, "Ray to stop it"
    )
    assert stopped


def test_the_embedded_head_takes_nothing_without_its_token(completed: dict[str, Any]) -> None:
    """Ray's job API and state API on the embedded head answer only with its token: anyone else reaching the
    machine can neither submit a job (any shell command) nor list the cluster. The token file is owner-only."""
    dashboard, headers = completed["dashboard"], completed["ray_headers"]
    job = {"entrypoint": "echo pwned"}
    refused = httpx.post(f"{dashboard}/api/jobs/", json=job, timeout=10)
    assert refused.status_code in (401, 403), refused.text
    assert httpx.get(f"{dashboard}/api/v0/nodes", timeout=10).status_code in (401, 403)
    assert httpx.get(f"{dashboard}/api/jobs/", headers=headers, timeout=10).status_code == 200
    token_file = Path(completed["ray_env"]["RAY_AUTH_TOKEN_PATH"])
    assert completed["ray_env"]["RAY_AUTH_MODE"] == "token" and token_file.stat().st_mode & 0o077 == 0


def test_restart_reattaches_to_a_running_job(
    tmp_path_factory: pytest.TempPathFactory, completed: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A second service with its own data folder and database, pointed (RAY_ADDRESS mode) at a head it did not
    start: the first service's. One head for the whole file keeps it fast; the head outlives this service's
    restart either way. The job reuses the first job's scored pairs (a data root here), so only distillation runs."""
    home = tmp_path_factory.mktemp("ext")
    write_prefs(home / "datasets")
    earlier = Path(completed["job"]["job_dir"])
    dashboard = completed["dashboard"]
    settings = Settings(data_dir=home, ray_address=dashboard, data_roots=(earlier,), poll_interval_s=0.5)
    # As an operator of an external token-authenticated cluster would: Ray's own variables, the head's token file.
    for name, value in completed["ray_env"].items():
        monkeypatch.setenv(name, value)
    # No evaluation: the restart only needs a stage long enough to restart the service during.
    spec = {**tiny_spec("restarted"), "reuse": {"pairs": str(earlier)}, "evaluate": {"oracle": None}}
    first = Server(settings).start()
    with first.client(None) as client:
        job = client.submit(spec)
        wait_for(lambda: client.get(job["id"])["state"] == "running", 120, "the job to run")
    first.stop()
    assert ray_status(dashboard, job["ray_submission_id"], completed["ray_headers"]) in ("PENDING", "RUNNING")

    # A job the store thinks is running but that Ray never heard of: reconciliation must fail it.
    store = Store(settings.database_url)
    store.create_job(job_id="job-ghost", name="ghost", owner=None, spec={}, job_dir=str(home / "jobs" / "ghost"))
    store.update_job("job-ghost", ray_submission_id="rmdistill-job-ghost")
    store.transition("job-ghost", "running", "test")
    store.close()

    second = Server(settings).start()
    try:
        with second.client(None) as client:
            ghost = client.get("job-ghost")  # reconciled before the first request was served
            assert ghost["state"] == "failed" and "no longer exists" in ghost["error"]
            events = list(client.follow(job["id"]))
            final = client.wait(job["id"], timeout=JOB_TIMEOUT_S)
        assert final["state"] == "succeeded", final.get("error")
        assert events[-1]["kind"] == "job_finished" and events[-1]["status"] == "succeeded"
        assert [t["to"] for t in final["transitions"]] == ["pending", "running", "succeeded"]
        assert {"score", "distill"} <= set(final["artifacts"]) and final["policy_id"] == job["id"]
        reused = {e["stage"] for e in events if e["kind"] == "log" and "reused" in e.get("message", "")}
        assert {"data", "ensemble", "generate", "score"} <= reused
        assert "ensemble" not in {e["stage"] for e in events if e["kind"] == "stage_started"}
    finally:
        second.stop()
    assert ray_status(dashboard, job["ray_submission_id"], completed["ray_headers"]) == "SUCCEEDED"  # Ray agrees
