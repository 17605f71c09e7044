"""A policy id, once taken, is never overwritten, says nothing about who holds it, and job ids cannot be squatted.

The service runs for real (uvicorn on a socket, SQLite) against a Ray address nothing listens on: registration
needs no cluster.
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from service.background import BackgroundServer
from service.follower import register_job_policy
from service.ray_backend import free_port
from service.settings import Settings
from service.store import PolicyExists, Store

ALICE, BOB = "token-alice", "token-bob"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BackgroundServer]:
    home = tmp_path_factory.mktemp("policy-ids")
    for name in ("alice-model", "bob-model"):
        (home / "datasets" / name).mkdir(parents=True)
        (home / "datasets" / name / "config.json").write_text("{}")
    settings = Settings(data_dir=home, ray_address=f"http://127.0.0.1:{free_port()}", tokens=[ALICE, BOB])
    running = BackgroundServer(settings).start(timeout_s=120)
    yield running
    running.stop()


def register(server: BackgroundServer, token: str, **body: str) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/policies", json=body, headers={"Authorization": f"Bearer {token}"})


def test_a_taken_id_is_409_for_everyone_alike_and_keeps_its_folder(server):
    first = register(server, ALICE, path="alice-model", id="reviews-v1")
    assert first.status_code == 201, first.text
    theirs = register(server, BOB, path="bob-model", id="reviews-v1")
    mine = register(server, ALICE, path="bob-model", id="reviews-v1")
    assert theirs.status_code == mine.status_code == 409
    # Bob learns that the id is taken, as anyone choosing a name would, but the answer is Alice's own word for word.
    assert theirs.json() == mine.json()
    assert theirs.json()["error"]["message"] == "policy id reviews-v1 is not available"
    held = httpx.get(f"{server.url}/v1/policies/reviews-v1", headers={"Authorization": f"Bearer {ALICE}"}).json()
    assert held["path"].endswith("alice-model")


def test_job_ids_are_reserved_for_the_policies_jobs_produce(server):
    squat = register(server, BOB, path="bob-model", id="job-0123456789ab")
    assert squat.status_code == 422 and squat.json()["error"]["fields"][0] == {
        "field": "id",
        "message": "reserved prefix",
    }


def test_a_reference_is_served_as_its_own_policy_and_its_id_is_reserved(server, tiny_llama):
    alice = {"Authorization": f"Bearer {ALICE}"}
    assert register(server, ALICE, path="alice-model", id="tuned", base_model="tiny:llama").status_code == 201
    first = httpx.post(f"{server.url}/v1/policies/tuned/reference", headers=alice, timeout=120)
    assert first.status_code == 200, first.text
    reference = first.json()
    # The folder the job's driver used: the same model cache, the same materialised tiny model.
    assert (reference["id"], reference["path"], reference["base_model"]) == ("ref-tuned", str(tiny_llama), "tiny:llama")
    assert httpx.post(f"{server.url}/v1/policies/tuned/reference", headers=alice).json() == reference
    bob = {"Authorization": f"Bearer {BOB}"}
    assert httpx.post(f"{server.url}/v1/policies/tuned/reference", headers=bob).status_code == 404
    squat = register(server, BOB, path="bob-model", id="ref-mine")
    assert squat.status_code == 422 and squat.json()["error"]["fields"][0]["message"] == "reserved prefix"
    for policy_id, base_model, why in [("bare", None, "records no reference"), ("hubbed", "org/model", "hub id")]:
        assert register(server, ALICE, path="alice-model", id=policy_id, base_model=base_model).status_code == 201
        refused = httpx.post(f"{server.url}/v1/policies/{policy_id}/reference", headers=alice, timeout=60)
        assert refused.status_code == 409 and why in refused.json()["error"]["message"]


def test_the_store_never_overwrites_and_a_resync_registers_a_job_once(tmp_path):
    store = Store(f"sqlite:///{tmp_path / 'db.sqlite'}")
    try:
        store.add_policy(policy_id="p", path="/first", owner="a")
        with pytest.raises(PolicyExists):
            store.add_policy(policy_id="p", path="/second", owner="b")
        assert (store.get_policy("p").path, store.get_policy("p").owner) == ("/first", "a")

        job_dir = tmp_path / "job-x"
        (job_dir / "distill").mkdir(parents=True)
        (job_dir / "evaluate").mkdir()
        (job_dir / "evaluate" / "report.json").write_text('{"win_rate": {"rate": 0.5}, "samples": {"key": ["0:0"]}}')
        job = store.create_job(job_id="job-x", name="x", owner="a", spec={}, job_dir=str(job_dir))
        register_job_policy(store, job)
        register_job_policy(store, job)  # the follower's re-sync after a restart: no error, no second row
        policy = store.get_policy("job-x")
        # Per-sample scores stay in the job folder; the policy keeps the evaluation's summary.
        assert policy.summary["eval"] == {"win_rate": {"rate": 0.5}}
    finally:
        store.close()


def test_one_address_serves_job_submission_and_serving(tmp_path):
    """RAY_ADDRESS alone points serving at the jobs' cluster: a dashboard URL's host at Ray's default GCS port (a
    dashboard cannot take a driver), a GCS address as it is; RMDISTILL_SERVING_RAY_ADDRESS still overrides it."""
    from service.ray_backend import gcs_address_of
    from service.settings import ServingSettings

    assert gcs_address_of("http://ray-head.example:8265") == "ray-head.example:6379"
    assert gcs_address_of("http://[fd00::5]:8265") == "[fd00::5]:6379"
    assert gcs_address_of("10.0.0.7:6380") == "10.0.0.7:6380"
    assert gcs_address_of(None) is None
    port = free_port()
    running = BackgroundServer(Settings(data_dir=tmp_path, ray_address=f"http://127.0.0.1:{port}")).start(timeout_s=120)
    try:
        assert running.app.state.serving.ray_address == "127.0.0.1:6379"
    finally:
        running.stop()
    override = Settings(
        data_dir=tmp_path, ray_address=f"http://127.0.0.1:{port}", serving=ServingSettings(ray_address="h:7000")
    )
    running = BackgroundServer(override).start(timeout_s=120)
    try:
        assert running.app.state.serving.ray_address == "h:7000"
    finally:
        running.stop()
