"""The service's contract without a Ray cluster: the OpenAPI document, the bodies the routes send, the admission
rule it shares with the job driver, and the names it shares with the pipeline and the clients.

The app is built with `create_app` and driven in-process without its lifespan (which would start Ray): the store,
the backend and the job folders are real, the backend points at an address nothing listens on and is never called.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from clients import sdk
from ray_jobs import names
from ray_jobs.cluster import ClusterResources
from ray_jobs.events import EventLog
from ray_jobs.layout import JobLayout
from ray_jobs.spec import parse_spec
from service import store as store_module
from service.admission import check_cluster
from service.app import create_app
from service.auth import owner_of
from service.engines import VLLMRefusedError
from service.errors import ApiError, error_body
from service.follower import register_job_policy
from service.policy_app import VLLMPolicies
from service.ray_backend import RayBackend, free_port
from service.settings import ServingSettings, Settings, hash_token
from service.store import Store

TOKEN = "token-carol"
# What each route answers on success: (status, schema name in components).
SUCCESS = {
    ("post", "/v1/jobs"): ("202", "JobDetail"),
    ("get", "/v1/jobs"): ("200", "JobPage"),
    ("get", "/v1/jobs/{job_id}"): ("200", "JobDetail"),
    ("get", "/v1/jobs/{job_id}/events"): ("200", "EventPage"),
    ("post", "/v1/jobs/{job_id}/cancel"): ("202", "JobDetail"),
    ("get", "/v1/jobs/{job_id}/results"): ("200", "JobResults"),
    ("post", "/v1/experiments"): ("202", "ExperimentStatus"),
    ("get", "/v1/experiments/{experiment_id}"): ("200", "ExperimentStatus"),
    ("get", "/v1/experiments/{experiment_id}/cells/{cell_id}"): ("200", "ExperimentCell"),
    ("post", "/v1/experiments/{experiment_id}/stop"): ("202", "ExperimentStatus"),
    ("get", "/v1/policies"): ("200", "PolicyList"),
    ("post", "/v1/policies"): ("201", "PolicyView"),
    ("get", "/v1/policies/{policy_id}"): ("200", "PolicyView"),
    ("get", "/v1/models"): ("200", "ModelList"),
    ("get", "/v1/models/{model_id}"): ("200", "ModelCard"),
    ("post", "/v1/completions"): ("200", "Completion"),
    ("post", "/v1/chat/completions"): ("200", "ChatCompletion"),
    ("post", "/v1/policies/{policy_id}/generate"): ("200", "GenerateResponse"),
    ("get", "/healthz"): ("200", "Health"),
}
TEXT_ROUTES = {("get", "/v1/jobs/{job_id}/logs"), ("get", "/metrics")}


@pytest.fixture(scope="module")
def openapi(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return create_app(Settings(data_dir=tmp_path_factory.mktemp("doc"))).openapi()


def _operations(doc: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(method, path): op for path, ops in doc["paths"].items() for method, op in ops.items()}


# ------------------------------------------------------------------------------------------------------ OpenAPI
def test_every_json_route_names_its_response_schema(openapi: dict[str, Any]) -> None:
    operations = _operations(openapi)
    assert set(operations) == set(SUCCESS) | TEXT_ROUTES
    for key, (status, schema) in SUCCESS.items():
        content = operations[key]["responses"][status]["content"]["application/json"]
        assert content["schema"] == {"$ref": f"#/components/schemas/{schema}"}, key
    for key in TEXT_ROUTES:
        assert set(operations[key]["responses"]["200"]["content"]) == {"text/plain"}, key


def test_error_responses_are_documented_with_the_bodies_sent(openapi: dict[str, Any]) -> None:
    operations = _operations(openapi)
    for key, op in operations.items():
        for status, response in op["responses"].items():
            if status.startswith(("4", "5")):
                # Errors are JSON even on the text routes, and always name a schema (never FastAPI's default).
                assert set(response["content"]) == {"application/json"}, (key, status)
                ref = response["content"]["application/json"]["schema"]["$ref"]
                assert ref.rsplit("/", 1)[1] in ("ErrorBody", "OpenAIErrorBody"), (key, status)
    assert "HTTPValidationError" not in openapi["components"]["schemas"]
    assert operations[("get", "/v1/jobs/{job_id}")]["responses"]["404"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/ErrorBody"
    }
    assert "409" in operations[("post", "/v1/jobs")]["responses"]
    # The serving routes answer OpenAI's error body, except authentication, which fails before they run.
    chat = operations[("post", "/v1/chat/completions")]["responses"]
    assert chat["4XX"]["content"]["application/json"]["schema"]["$ref"].endswith("/OpenAIErrorBody")
    assert chat["401"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorBody")


def test_job_states_come_from_one_place(openapi: dict[str, Any]) -> None:
    assert sdk.FINAL_STATES is store_module.FINAL_STATES is names.FINAL_STATES
    schemas = openapi["components"]["schemas"]
    assert tuple(schemas["JobBrief"]["properties"]["state"]["enum"]) == names.JOB_STATES
    [state] = [p for p in _operations(openapi)[("get", "/v1/jobs")]["parameters"] if p["name"] == "state"]
    assert tuple(state["schema"]["anyOf"][0]["enum"]) == names.JOB_STATES


# ---------------------------------------------------------------------------------------------------- admission
def _spec(loss: str, **sections: dict[str, Any]) -> Any:
    return parse_spec({"name": "admission", "reference": "tiny:llama", "distill": {"loss": loss}, **sections})


SMALL = ClusterResources.from_nodes([{"CPU": 2.0}])
BIG_ENSEMBLE = {"ensemble": {"size": 8, "workers_per_member": 4, "cpus_per_worker": 4, "gpus_per_worker": 1}}


def test_a_dpo_spec_is_not_refused_for_an_ensemble_it_never_trains() -> None:
    check_cluster(_spec("dpo", **BIG_ENSEMBLE), SMALL)


def test_refusals_are_409_naming_the_field() -> None:
    with pytest.raises(ApiError) as err:
        check_cluster(_spec("e-dpo", **BIG_ENSEMBLE), SMALL)
    message = "asks for GPUs but the cluster has 2 CPUs and 0 GPUs on 1 node(s)"
    assert err.value.status == 409
    assert error_body(err.value.message, err.value.fields) == {
        "error": {
            "message": f"ensemble.gpus_per_worker: {message}",
            "fields": [{"field": "ensemble.gpus_per_worker", "message": message}],
        }
    }
    with pytest.raises(ApiError) as err:
        check_cluster(_spec("dpo", generation={"replicas": 8}), SMALL)
    assert (err.value.status, err.value.fields[0]["field"]) == (409, "generation.replicas")


# ------------------------------------------------------------------------------------------------------ engines
@pytest.mark.vllm
def test_engine_vllm_that_cannot_load_the_policy_is_unavailable(
    tmp_path: Path, tiny_llama: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """vLLM's replica refuses a policy it cannot load with the reason (engine "vllm" answers it as a 503; auto sends
    the policy to transformers), and refuses it again at once."""
    pytest.importorskip("vllm")
    # make_llm sets these for the process; restored after the test so later tests see the environment they had.
    for name in ("VLLM_CPU_KVCACHE_SPACE", "VLLM_CPU_OMP_THREADS_BIND", "VLLM_ENABLE_V1_MULTIPROCESSING"):
        monkeypatch.delenv(name, raising=False)
    replica = VLLMPolicies(ServingSettings(engine="vllm", max_model_len=64), gpus=0)
    with pytest.raises(VLLMRefusedError, match="vLLM could not run") as first:
        replica._build("p", tmp_path)  # an empty folder: no config.json
    # Remembered: asked again, even once the folder would load, it answers the same at once without trying.
    shutil.copytree(tiny_llama, tmp_path, dirs_exist_ok=True)
    with pytest.raises(VLLMRefusedError) as again:
        replica._build("p", tmp_path)
    assert str(again.value) == str(first.value)


# ------------------------------------------------------------------------------------------------------- bodies
@pytest.fixture
def service(tmp_path: Path) -> Any:
    settings = Settings(data_dir=tmp_path, tokens=[TOKEN], ray_address=f"http://127.0.0.1:{free_port()}")
    app = create_app(settings)
    app.state.store = Store(settings.database_url)
    app.state.backend = RayBackend(settings.data_dir, settings.ray_address)
    yield TestClient(app, headers={"Authorization": f"Bearer {TOKEN}"}), app.state.store, settings
    app.state.store.close()


def _finished_job(store: Store, settings: Settings) -> tuple[str, JobLayout]:
    """A job as the driver leaves it: events, published stage folders, the policy and the report."""
    layout = JobLayout(settings.jobs_dir / "job-1")
    events = EventLog(layout.root)
    events.emit("job_started", None)
    for stage in ("data", "distill", "evaluate"):
        events.emit("stage_started", stage)
        layout.stage(stage).mkdir(parents=True)
        events.emit("stage_finished", stage)
    events.progress("distill", 2, 2)
    events.metrics("distill", 2, {"loss": 0.5})
    layout.policy_info.write_text(json.dumps({"reference": "tiny:llama", "loss": "dpo"}))
    layout.report.write_text(json.dumps({"win_rate": 0.75}))
    owner = owner_of(hash_token(TOKEN))
    store.create_job(job_id="job-1", name="done", owner=owner, spec={"name": "done"}, job_dir=str(layout.root))
    store.update_job("job-1", ray_submission_id="rmdistill-job-1")
    store.transition("job-1", "running", "Ray job running")
    job = store.get_job("job-1")
    assert job is not None
    register_job_policy(store, job)
    store.transition("job-1", "succeeded", "Ray job SUCCEEDED")
    return "job-1", layout


def test_job_and_policy_bodies(service: Any) -> None:
    client, store, settings = service
    job_id, layout = _finished_job(store, settings)
    job = store.get_job(job_id)
    detail = client.get(f"/v1/jobs/{job_id}").json()
    brief = {
        "id": job_id,
        "name": "done",
        "state": "succeeded",
        "stage": "evaluate",
        "error": None,
        "ray_submission_id": "rmdistill-job-1",
        # Times keep Python's isoformat ("+00:00"), as the API always sent them.
        **{f"{t}_at": getattr(job, f"{t}_at").isoformat() for t in ("created", "updated", "started", "finished")},
    }
    transitions = [(t["from"], t["to"]) for t in detail.pop("transitions")]
    assert transitions == [(None, "pending"), ("pending", "running"), ("running", "succeeded")]
    assert detail == {
        **brief,
        "stages": {"data": "finished", "distill": "finished", "evaluate": "finished"},
        "progress": {"distill": {"done": 2, "total": 2}},
        "metrics": {"distill": {"loss": 0.5, "step": 2}},
        "job_dir": str(layout.root),
        "artifacts": {s: str(layout.stage(s)) for s in ("data", "distill", "evaluate")},
        "policy_id": job_id,
        "spec": {"name": "done"},
    }
    assert client.get("/v1/jobs", params={"state": "succeeded"}).json() == {
        "items": [{**brief, "stage": None}],  # the follower, which records the stage, did not run here
        "total": 1,
        "limit": 50,
        "offset": 0,
    }
    page = client.get(f"/v1/jobs/{job_id}/events", params={"offset": 8}).json()
    assert [e["kind"] for e in page["events"]] == ["metrics"]
    assert (page["offset"], page["next_offset"], page["state"]) == (8, 9, "succeeded")

    policy = client.get(f"/v1/policies/{job_id}").json()
    assert policy == {
        "id": job_id,
        "job_id": job_id,
        "path": str(layout.policy),
        "base_model": "tiny:llama",
        "loss": "dpo",
        "summary": {"policy": {"reference": "tiny:llama", "loss": "dpo"}, "eval": {"win_rate": 0.75}},
        "created_at": store.get_policy(job_id).created_at.isoformat(),
        "metrics_label": "p" + hashlib.sha256(job_id.encode()).hexdigest()[:12],
    }
    assert client.get("/v1/policies").json() == {"items": [policy]}
    [model] = client.get("/v1/models").json()["data"]
    assert model == {
        "id": job_id,
        "object": "model",
        "created": model["created"],
        "owned_by": owner_of(hash_token(TOKEN)),
    }


def test_ops_cancel_and_error_bodies(service: Any) -> None:
    client, store, settings = service
    assert client.get("/healthz", headers={"Authorization": ""}).json() == {
        "status": "ok",
        "ray": {"address": settings.ray_address, "embedded": False},
        "auth": True,
    }
    store.create_job(job_id="job-2", name="queued", owner=owner_of(hash_token(TOKEN)), spec={}, job_dir="/nowhere")
    cancelled = client.post("/v1/jobs/job-2/cancel")
    assert cancelled.status_code == 202 and cancelled.json()["state"] == "cancelled"
    again = client.post("/v1/jobs/job-2/cancel")
    assert (again.status_code, again.json()) == (
        409,
        {"error": {"message": "job job-2 is already cancelled", "fields": []}},
    )
    missing = client.get("/v1/jobs/nope")
    assert (missing.status_code, missing.json()) == (404, {"error": {"message": "job nope not found", "fields": []}})
    anonymous = client.get("/v1/policies", headers={"Authorization": ""})
    assert anonymous.status_code == 401 and anonymous.json()["error"]["message"].startswith("missing bearer token")
    invalid = client.post("/v1/jobs", json={"distill": {"beta": -1}})
    assert invalid.status_code == 422
    [field] = invalid.json()["error"]["fields"]
    assert field["field"] == "distill.beta" and field["message"].startswith("must be > 0")
