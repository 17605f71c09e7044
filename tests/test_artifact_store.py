"""The artifact root against moto's S3 server on loopback over real HTTP (tests/support/s3.py): published stages go
up whole with their completion marker last, come back into an empty job folder, and a stage without its marker (an
upload that died) or with files that do not match it is never taken for finished. No Ray.
"""

from __future__ import annotations

import io
import json
import shutil
import tarfile
import uuid
from pathlib import Path

import httpx
import pytest
from pydantic import ValidationError

from ray_jobs.artifact_store import (
    ARTIFACTS_ENV,
    ArtifactError,
    ArtifactStore,
    ensure_local,
    open_filesystem,
    redact,
    run_storage,
)
from ray_jobs.events import EventLog, read_events
from ray_jobs.handover import hand_over, take_over
from ray_jobs.layout import JobLayout
from ray_jobs.models.registry import resolve_model_path
from ray_jobs.pipeline import planned_stages, run_job
from ray_jobs.spec import parse_spec
from service.background import BackgroundServer
from service.ray_backend import free_port
from service.settings import Settings
from service.store import Store

SCORE_FILES = {
    "pairs.parquet": b"PAR1" + bytes(range(256)) * 40,
    "scored_with.json": b'{"reference": "tiny:llama"}',
    "nested/deeper/notes.txt": b"kept with its folders",
}


@pytest.fixture
def root(s3, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh bucket, the process holding the server's credentials the way a deployment does: its environment."""
    for name, value in s3.env.items():
        monkeypatch.setenv(name, value)
    return s3.bucket(f"art-{uuid.uuid4().hex[:12]}") + "/prefix"


def published(layout: JobLayout, stage: str, files: dict[str, bytes]) -> None:
    with layout.staging(stage) as out:
        for name, content in files.items():
            (out / name).parent.mkdir(parents=True, exist_ok=True)
            (out / name).write_bytes(content)


def bucket_of(uri: str) -> str:
    return uri.removeprefix("s3://").split("/")[0]


def test_a_published_stage_goes_up_whole_with_its_marker_last(s3, root: str, tmp_path: Path) -> None:
    layout = JobLayout(tmp_path / "job-1")
    published(layout, "score", SCORE_FILES)
    store = ArtifactStore(root)
    before = len(s3.requests())
    assert store.publish_stage(layout, "score") == sum(len(v) for v in SCORE_FILES.values())

    objects = s3.objects(bucket_of(root), "prefix/jobs/job-1/")
    stage_objects = {k.removeprefix("prefix/jobs/job-1/score/"): v for k, v in objects.items() if "/score/" in k}
    assert stage_objects == SCORE_FILES
    marker = json.loads(objects["prefix/jobs/job-1/score.complete"])
    assert marker["files"] == {name: len(content) for name, content in SCORE_FILES.items()}
    # The server's own record of the upload: every file was written before the marker, nothing after it.
    # (pyarrow writes in multipart uploads: an object appears with the POST that completes its upload.)
    puts = [path.split("?")[0] for method, path in s3.requests()[before:] if method in ("PUT", "POST")]
    assert puts[-1].endswith("/jobs/job-1/score.complete")
    assert sum("/jobs/job-1/score/" in p for p in puts[:-1]) >= len(SCORE_FILES)


def test_a_republished_stage_is_incomplete_until_its_new_files_are_up(s3, root: str, tmp_path: Path) -> None:
    layout = JobLayout(tmp_path / "job-2")
    published(layout, "score", SCORE_FILES)
    store = ArtifactStore(root)
    store.publish_stage(layout, "score")
    published(layout, "score", {"pairs.parquet": b"rescored"})
    before = len(s3.requests())
    store.publish_stage(layout, "score")

    calls = [(method, path.split("?")[0]) for method, path in s3.requests()[before:]]
    marker_writes = [i for i, (m, p) in enumerate(calls) if p.endswith("score.complete") and m in ("PUT", "POST")]
    marker_deletes = [i for i, (m, p) in enumerate(calls) if p.endswith("score.complete") and m == "DELETE"]
    file_writes = [i for i, (m, p) in enumerate(calls) if "/score/pairs.parquet" in p and m in ("PUT", "POST")]
    assert marker_deletes[0] < file_writes[0] < marker_writes[-1]
    # The old files are gone, not left beside the new one.
    objects = s3.objects(bucket_of(root), "prefix/jobs/job-2/score/")
    assert objects == {"prefix/jobs/job-2/score/pairs.parquet": b"rescored"}


def test_a_stage_updated_in_place_sends_only_what_changed(s3, root: str, tmp_path: Path) -> None:
    """Evaluation rewrites the published policy's card: the root's copy follows with that one file, and a stage
    that did not change costs no write at all."""
    layout = JobLayout(tmp_path / "job-15")
    published(layout, "distill", {"model.safetensors": b"w" * 5000, "README.md": b"card"})
    store = ArtifactStore(root)
    store.publish_stage(layout, "distill")
    before = len(s3.requests())
    assert store.publish_stage(layout, "distill") == 0
    assert [m for m, _ in s3.requests()[before:] if m in ("PUT", "POST", "DELETE")] == []

    (layout.policy / "README.md").write_bytes(b"card with results")
    before = len(s3.requests())
    assert store.publish_stage(layout, "distill") == len(b"card with results")
    written = {p.split("?")[0] for m, p in s3.requests()[before:] if m in ("PUT", "POST")}
    assert {w.rsplit("/", 1)[1] for w in written if not w.endswith("/")} == {"README.md", "distill.complete"}
    objects = s3.objects(bucket_of(root), "prefix/jobs/job-15/")
    assert objects["prefix/jobs/job-15/distill/README.md"] == b"card with results"
    assert json.loads(objects["prefix/jobs/job-15/distill.complete"])["files"]["README.md"] == 17


def test_a_stage_comes_back_into_an_empty_job_folder(root: str, tmp_path: Path) -> None:
    made = JobLayout(tmp_path / "node-a" / "job-3")
    published(made, "score", SCORE_FILES)
    EventLog(made.root).emit("job_started", None)
    made.spec.write_text('{"name": "x"}')
    store = ArtifactStore(root)
    store.publish_stage(made, "score")
    store.publish_files(made)

    cache = JobLayout(tmp_path / "node-b" / "job-3")  # same job id, nothing on this "node"
    assert store.fill(cache) == ["score"]
    assert cache.published() == {"score": cache.stage("score")}
    folder = cache.stage("score")
    fetched = {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    assert fetched == SCORE_FILES
    assert cache.spec.read_text() == '{"name": "x"}'
    assert [e["kind"] for e in read_events(cache.root)] == ["job_started"]
    assert list((cache.root / ".partial").iterdir()) == []  # the download folder was renamed into place
    # A second fill finds it local and fetches nothing; the copy counts as up to date, so nothing goes back.
    assert store.fill(cache) == []
    assert store.publish_stage(cache, "score") == 0


def test_a_stage_without_its_marker_is_missing(s3, root: str, tmp_path: Path) -> None:
    """An upload that died before its marker: the files are there, and still nothing counts as finished."""
    store = ArtifactStore(root)
    bucket = bucket_of(root)
    for name, content in SCORE_FILES.items():
        s3.client().put_object(Bucket=bucket, Key=f"prefix/jobs/job-4/score/{name}", Body=content)
    layout = JobLayout(tmp_path / "job-4")
    assert store.completed(layout, "score") is None
    assert store.fetch_stage(layout, "score") is False
    assert store.fill(layout) == [] and layout.published() == {}


def test_a_stage_whose_files_do_not_match_its_marker_is_refused(s3, root: str, tmp_path: Path) -> None:
    made = JobLayout(tmp_path / "a" / "job-5")
    published(made, "score", SCORE_FILES)
    store = ArtifactStore(root)
    store.publish_stage(made, "score")
    bucket = bucket_of(root)
    s3.client().put_object(Bucket=bucket, Key="prefix/jobs/job-5/score/pairs.parquet", Body=b"PAR1 cut short")
    s3.client().delete_object(Bucket=bucket, Key="prefix/jobs/job-5/score/scored_with.json")

    cache = JobLayout(tmp_path / "b" / "job-5")
    with pytest.raises(ArtifactError, match="does not match its completion marker: pairs.parquet, scored_with.json"):
        store.fetch_stage(cache, "score")
    assert not cache.stage("score").exists() and list((cache.root / ".partial").iterdir()) == []


def test_a_marker_naming_files_outside_its_stage_is_refused(s3, root: str, tmp_path: Path) -> None:
    marker = json.dumps({"files": {"../../escaped.txt": 3}, "mtime_ns": {"../../escaped.txt": 0}}).encode()
    s3.client().put_object(Bucket=bucket_of(root), Key="prefix/jobs/job-14/score.complete", Body=marker)
    cache = JobLayout(tmp_path / "job-14")
    with pytest.raises(ArtifactError, match="score/ in .* lists files outside that folder: ../../escaped.txt"):
        ArtifactStore(root).fetch_stage(cache, "score")
    assert not (tmp_path / "escaped.txt").exists() and not cache.stage("score").exists()


def test_only_a_finished_stage_is_uploaded(root: str, tmp_path: Path) -> None:
    layout = JobLayout(tmp_path / "job-6")
    (layout.root / ".partial" / "score").mkdir(parents=True)
    with pytest.raises(ArtifactError, match="is not published"):
        ArtifactStore(root).publish_stage(layout, "score")


def test_a_resumed_job_whose_folder_is_gone_takes_everything_from_the_root(
    s3, root: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The driver on a node that never saw the job: every stage finished elsewhere comes back, none runs again,
    and the event log goes on from the one the root kept."""
    spec = parse_spec(
        {"name": "resume", "reference": "tiny:llama", "data": {"source": str(tmp_path / "p.jsonl")}, "ensemble": {}}
    )
    first = JobLayout(tmp_path / "node-a" / "job-7")
    first.root.mkdir(parents=True)
    first.spec.write_text(json.dumps(spec.model_dump(mode="json")))
    EventLog(first.root).emit("job_finished", None, status="failed")
    store = ArtifactStore(root)
    stages = planned_stages(spec)
    for stage in stages:
        published(first, stage, {f"{stage}.out": stage.encode()})
        store.publish_stage(first, stage)
    store.publish_files(first)

    again = tmp_path / "node-b" / "job-7"
    monkeypatch.setenv(ARTIFACTS_ENV, root)
    assert run_job(spec, again) == {}
    layout = JobLayout(again)
    assert sorted(layout.published()) == sorted(stages)
    assert (layout.stage("distill") / "distill.out").read_bytes() == b"distill"
    kinds = [(e["kind"], e.get("stage")) for e in read_events(again)]
    assert kinds[0] == ("job_finished", None)  # the earlier run's log, continued
    assert [s for k, s in kinds if k == "stage_skipped"] == stages
    assert kinds[-1] == ("job_finished", None)
    # The root's copy of the log is the whole log, this run's end included.
    kept = s3.objects(bucket_of(root), "prefix/jobs/job-7/events.jsonl")["prefix/jobs/job-7/events.jsonl"]
    assert kept == layout.events.read_bytes()


def test_run_storage_is_in_the_root_when_one_is_set(root: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    layout = JobLayout(tmp_path / "job-8")
    assert run_storage(layout, layout.checkpoints) == (str(layout.checkpoints.resolve()), None)
    monkeypatch.setenv(ARTIFACTS_ENV, root)
    path, fs = run_storage(layout, layout.checkpoints)
    assert path == f"{root.removeprefix('s3://')}/jobs/job-8/checkpoints" and fs.type_name == "s3"


def test_an_fsspec_only_scheme_works_through_pyarrows_adapter(tmp_path: Path) -> None:
    fs, path = open_filesystem("memory://rmdistill-test/root")
    assert fs.type_name == "py::fsspec+memory" and path == "/rmdistill-test/root"
    store = ArtifactStore("memory://rmdistill-test/root")
    made = JobLayout(tmp_path / "a" / "job-9")
    published(made, "evaluate", {"report.json": b"{}"})
    store.publish_stage(made, "evaluate")
    cache = JobLayout(tmp_path / "b" / "job-9")
    assert store.fill(cache) == ["evaluate"] and (cache.stage("evaluate") / "report.json").read_bytes() == b"{}"


def test_credentials_never_appear_in_what_the_store_says(s3, root: str, tmp_path: Path) -> None:
    assert redact("s3://AKIA:very-secret@bucket/prefix") == "s3://bucket/prefix"
    store = ArtifactStore(root)
    layout = JobLayout(tmp_path / "job-10")
    with pytest.raises(ArtifactError) as err:
        store.publish_stage(layout, "distill")
    for text in (repr(store), str(err.value)):
        assert s3.secret_key not in text and s3.access_key not in text


@pytest.mark.parametrize(
    ("stage", "files", "asked"),
    [
        # A serving replica resolving a policy it never saw.
        ("distill", {"config.json": b'{"model_type": "llama"}', "model.safetensors": b"weights"}, "distill"),
        # A scoring actor loading one member: the whole ensemble stage comes, the way it was published.
        ("ensemble", {"manifest.json": b"{}", "member-1/config.json": b'{"model_type": "bert"}'}, "ensemble/member-1"),
    ],
)
def test_a_node_that_never_saw_the_job_fetches_the_stage_a_model_lies_in(
    root: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stage: str, files: dict[str, bytes], asked: str
) -> None:
    made = JobLayout(tmp_path / "driver" / "job-11")
    published(made, stage, files)
    ArtifactStore(root).publish_stage(made, stage)
    monkeypatch.setenv(ARTIFACTS_ENV, root)

    here = JobLayout(tmp_path / "elsewhere" / "job-11")
    assert resolve_model_path(here.root / asked) == here.root / asked
    assert {name: (here.stage(stage) / name).read_bytes() for name in files} == files
    # A path that is no job's stage is its reader's business: nothing is fetched or made.
    other = tmp_path / "elsewhere" / "my-model"
    ensure_local(other)
    assert not other.exists()


def test_the_service_serves_a_finished_job_whose_folder_is_gone(s3, root: str, tmp_path: Path) -> None:
    """The service refills a job folder from the root: the job view folds the fetched event log, the artifact list
    comes from the completion markers without downloading a stage, a file and the policy's archive download byte for
    byte, and a stage the root does not hold stays unlisted."""
    settings = Settings(data_dir=tmp_path / "home", ray_address=f"http://127.0.0.1:{free_port()}", artifacts=root)
    layout = JobLayout(settings.jobs_dir / "job-12")
    events = EventLog(layout.root)
    events.emit("job_started", None)
    files = {"distill": {"config.json": b"{}", "model.safetensors": b"w" * 3000}, "evaluate": {"report.json": b"{}"}}
    store = ArtifactStore(root)
    for stage, content in files.items():
        events.emit("stage_started", stage)
        published(layout, stage, content)
        store.publish_stage(layout, stage)
        events.emit("stage_finished", stage)
    events.emit("job_finished", None, status="succeeded")
    store.publish_files(layout)
    jobs = Store(settings.database_url)
    try:
        jobs.create_job(job_id="job-12", name="gone", owner=None, spec={}, job_dir=str(layout.root))
        jobs.transition("job-12", "succeeded", "test")
    finally:
        jobs.close()
    shutil.rmtree(layout.root)

    server = BackgroundServer(settings).start(timeout_s=120)
    try:
        with httpx.Client(base_url=server.url, timeout=60) as api:
            job = api.get("/v1/jobs/job-12").json()
            assert job["stages"] == {"distill": "finished", "evaluate": "finished"}
            listed = {a["path"]: a["bytes"] for a in api.get("/v1/jobs/job-12/artifacts").json()["items"]}
            assert listed == {
                "distill/config.json": 2,
                "distill/model.safetensors": 3000,
                "evaluate/report.json": 2,
                "distill.tar.gz": None,
                "evaluate.tar.gz": None,
            }
            # Listed from the completion markers: nothing was downloaded to list it.
            assert not layout.stage("distill").exists() and not layout.stage("evaluate").exists()
            assert api.get("/v1/jobs/job-12/artifacts/distill/model.safetensors").content == b"w" * 3000
            archive = api.get("/v1/jobs/job-12/artifacts/distill.tar.gz").content
        with tarfile.open(fileobj=io.BytesIO(archive), mode="r:gz") as tar:
            names = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
        assert names == {f"job-12-distill/{k}": v for k, v in files["distill"].items()}
    finally:
        server.stop()


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("s3://AKIAEXAMPLE:hunter2@bucket/prefix", "holds credentials"),
        ("nosuchscheme://bucket/prefix", "'nosuchscheme://bucket/prefix': no filesystem for the scheme 'nosuchscheme'"),
    ],
)
def test_the_service_refuses_an_artifact_root_it_cannot_use(tmp_path: Path, uri: str, message: str) -> None:

    with pytest.raises(ValidationError, match=message) as err:
        Settings(data_dir=tmp_path, artifacts=uri)
    assert "hunter2" not in str(err.value)


def test_an_unreachable_root_is_a_503_naming_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "rmdistill-test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-a-secret")
    settings = Settings(data_dir=tmp_path, ray_address=f"http://127.0.0.1:{free_port()}", artifacts="s3://nowhere/root")
    jobs = Store(settings.database_url)
    try:
        jobs.create_job(job_id="job-13", name="gone", owner=None, spec={}, job_dir=str(settings.jobs_dir / "job-13"))
        jobs.transition("job-13", "succeeded", "test")
    finally:
        jobs.close()
    server = BackgroundServer(settings).start(timeout_s=120)
    try:
        response = httpx.get(f"{server.url}/v1/jobs/job-13/artifacts", timeout=120)
    finally:
        server.stop()
    assert response.status_code == 503
    assert response.json()["error"]["message"].startswith("the artifact root s3://nowhere/root cannot be read")


def test_a_worker_elsewhere_hands_its_folder_to_the_driver_through_the_root(
    s3, root: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A member trained on another node: its folder goes up under the staging path, the driver's staging gets it
    whole, and the root's copy is then deleted. On the driver's own node nothing goes up."""
    monkeypatch.setenv(ARTIFACTS_ENV, root)
    worker, driver = JobLayout(tmp_path / "worker" / "job-15"), JobLayout(tmp_path / "driver" / "job-15")
    staged = Path(".partial") / "ensemble" / "member-1"
    (worker.root / staged).mkdir(parents=True)
    (worker.root / staged / "metrics.json").write_text('{"accuracy": 0.75}')
    (worker.root / staged / "model.safetensors").write_bytes(b"r" * 500)

    assert not hand_over(worker, worker.root / staged, driver_node=None)  # no driver elsewhere: a shared folder
    assert hand_over(worker, worker.root / staged, driver_node="the-driver's-node")
    prefix = "prefix/jobs/job-15/.partial/ensemble/member-1"
    assert set(s3.objects(bucket_of(root), prefix)) == {f"{prefix}.complete", f"{prefix}/metrics.json",
                                                        f"{prefix}/model.safetensors"}  # fmt: skip

    (driver.root / ".partial" / "ensemble").mkdir(parents=True)
    take_over(driver, driver.root / staged)
    assert (driver.root / staged / "model.safetensors").read_bytes() == b"r" * 500
    assert json.loads((driver.root / staged / "metrics.json").read_text()) == {"accuracy": 0.75}
    assert s3.objects(bucket_of(root), prefix) == {}
    take_over(driver, driver.root / staged)  # present already: left as it is
    assert (driver.root / staged / "metrics.json").is_file()
