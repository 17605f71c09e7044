"""Artifacts and uploads over a real socket: a job's published files and archives for its owner only, nothing
outside them by any spelling, and datasets uploaded into the owner's own data area, validated before any job can
name them.

The service runs for real (uvicorn, SQLite) against a Ray address nothing listens on; the finished job's folder is
written as the driver leaves one.
"""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from ray_jobs.events import EventLog
from ray_jobs.layout import JobLayout
from service.auth import owner_of
from service.background import BackgroundServer
from service.ray_backend import free_port
from service.settings import Settings, hash_token
from service.store import Store
from tests.support.data import write_prefs

ALICE, BOB = "token-alice", "token-bob"
UPLOAD_LIMIT = 64 << 10
BODY_LIMIT = 16 << 10
PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256))


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BackgroundServer]:
    home = tmp_path_factory.mktemp("artifacts")
    settings = Settings(
        data_dir=home,
        ray_address=f"http://127.0.0.1:{free_port()}",
        tokens=[ALICE, BOB],
        max_upload_bytes=UPLOAD_LIMIT,
        max_body_bytes=BODY_LIMIT,
    )
    server = BackgroundServer(settings).start(timeout_s=120)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def api(server: BackgroundServer) -> Iterator[httpx.Client]:
    # Generous timeouts: the first submission imports Ray's job client, seconds on a loaded machine.
    with httpx.Client(base_url=server.url, timeout=120) as client:
        yield client


@pytest.fixture(scope="module")
def job(server: BackgroundServer) -> dict[str, Any]:
    """Alice's finished job: a policy, a report, a plot and scored pairs published; an ensemble still staging; a
    symlink in a published folder that leads out of the job."""
    layout = JobLayout(server.settings.jobs_dir / "job-art")
    EventLog(layout.root).emit("job_started", None)
    files = {
        "distill/config.json": b'{"model_type": "llama"}',
        "distill/model.safetensors": bytes(range(256)) * 64,
        "distill/rmdistill.json": b'{"reference": "tiny:llama", "loss": "e-dpo"}',
        "evaluate/report.json": json.dumps({"win_rate": {"rate": 0.75}}).encode(),
        "evaluate/training_curves.png": PNG,
        "score/pairs.parquet": b"PAR1 not really",
    }
    for name, content in files.items():
        (layout.root / name).parent.mkdir(parents=True, exist_ok=True)
        (layout.root / name).write_bytes(content)
    (layout.root / ".partial" / "ensemble").mkdir(parents=True)
    (layout.root / ".partial" / "ensemble" / "manifest.json").write_text("{}")
    (layout.root / "evaluate" / "leak.json").symlink_to(server.settings.data_dir / "rmdistill.db")
    store = Store(server.settings.database_url)
    try:
        store.create_job(
            job_id="job-art", name="art", owner=owner_of(hash_token(ALICE)), spec={}, job_dir=str(layout.root)
        )
    finally:
        store.close()
    return {"id": "job-art", "files": files}


def test_the_owner_lists_published_files_and_one_archive_per_stage(api, server, job):
    response = api.get(f"/v1/jobs/{job['id']}/artifacts", headers=auth(ALICE))
    assert response.status_code == 200, response.text
    items = {a["path"]: a for a in response.json()["items"]}
    # No staging folder, no symlink out of the job; the policy is the distill folder's archive.
    assert set(items) == {*job["files"], "distill.tar.gz", "evaluate.tar.gz", "score.tar.gz"}
    kinds = {path: a["kind"] for path, a in items.items()}
    assert kinds["evaluate/report.json"] == "report" and kinds["evaluate/training_curves.png"] == "plot"
    assert kinds["score/pairs.parquet"] == "pairs" and kinds["distill.tar.gz"] == "policy"
    assert items["distill/model.safetensors"]["bytes"] == 256 * 64 and items["distill.tar.gz"]["bytes"] is None
    assert items["evaluate/report.json"]["url"] == f"/v1/jobs/{job['id']}/artifacts/evaluate/report.json"


def test_files_download_byte_for_byte_with_their_media_type(api, server, job):
    for path, media in [("evaluate/report.json", "application/json"), ("evaluate/training_curves.png", "image/png")]:
        response = api.get(f"/v1/jobs/{job['id']}/artifacts/{path}", headers=auth(ALICE))
        assert response.status_code == 200 and response.content == job["files"][path]
        assert response.headers["content-type"] == media


def test_the_policy_downloads_as_a_tar_gz_of_its_folder(api, server, job):
    response = api.get(f"/v1/jobs/{job['id']}/artifacts/distill.tar.gz", headers=auth(ALICE))
    assert response.status_code == 200 and response.headers["content-type"] == "application/gzip"
    assert 'filename="job-art-distill.tar.gz"' in response.headers["content-disposition"]
    with tarfile.open(fileobj=io.BytesIO(response.content), mode="r:gz") as tar:
        contents = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    expected = {f"job-art-{k}": v for k, v in job["files"].items() if k.startswith("distill/")}
    assert contents == expected


@pytest.mark.parametrize(
    "path",
    [
        "../../rmdistill.db",  # the service's database, two folders up
        "evaluate/../events.jsonl",
        "evaluate/leak.json",  # a symlink out of the job, by name
        ".partial/ensemble/manifest.json",  # not published
        "ensemble.tar.gz",
        "/etc/passwd",
        "distill",
    ],
)
def test_nothing_outside_the_published_artifacts_is_served(api, server, job, path):
    # Sent as written, and with its slashes escaped (httpx would normalise the dots away; a hostile client does not).
    for spelling in (path, path.replace("/", "%2F")):
        raw = f"/v1/jobs/{job['id']}/artifacts/{spelling}".replace("//", "/").encode()
        response = api.get(httpx.URL(server.url).copy_with(raw_path=raw), headers=auth(ALICE))
        assert response.status_code == 404, (spelling, response.text)
        body = response.json()["error"]
        assert body["fields"] in ([{"field": "path", "message": "not an artifact of this job"}], []), spelling


def test_another_owner_sees_no_artifacts(api, server, job):
    for path in ("", "/evaluate/report.json", "/distill.tar.gz"):
        response = api.get(f"/v1/jobs/{job['id']}/artifacts{path}", headers=auth(BOB))
        assert response.status_code == 404 and response.json()["error"]["message"] == f"job {job['id']} not found"
    assert api.get(f"/v1/jobs/{job['id']}/artifacts").status_code == 401


# ------------------------------------------------------------------------------------------------------- uploads
def _upload(api: httpx.Client, name: str, content: bytes, token: str = ALICE, **params: str) -> httpx.Response:
    return api.put(f"/v1/datasets/{name}", content=content, headers=auth(token), params=params)


def _listing(api: httpx.Client, token: str) -> list[str]:
    return [d["name"] for d in api.get("/v1/datasets", headers=auth(token)).json()["items"]]


def _leftovers(server: BackgroundServer, token: str) -> list[str]:
    folder = server.settings.uploads_of(owner_of(hash_token(token)))
    return sorted(p.name for p in folder.iterdir() if p.is_file()) if folder.is_dir() else []


def _spec_on(source: str) -> dict[str, Any]:
    return {
        "name": "mine",
        "reference": "tiny:llama",
        "data": {"source": source},
        "ensemble": {"backbone": "tiny:bert"},
    }


def test_an_upload_is_validated_then_usable_by_its_owner_only(api, server, tmp_path):
    content = write_prefs(tmp_path / "prefs.jsonl", n=24).read_bytes()
    response = _upload(api, "mine.jsonl", content)
    assert response.status_code == 201, response.text
    body = response.json()
    assert (body["name"], body["source"], body["bytes"], body["format"], body["rows"]) == (
        "mine.jsonl",
        "mine.jsonl",
        len(content),
        "standard",
        24,
    )
    assert _listing(api, ALICE) == ["mine.jsonl"] and _listing(api, BOB) == []
    # Alice's spec names it and gets past admission (the cluster is what is missing here); Bob's cannot reach it.
    mine = api.post("/v1/jobs", json=_spec_on("mine.jsonl"), headers=auth(ALICE))
    assert mine.status_code == 503 and "Ray is unavailable" in mine.json()["error"]["message"]
    theirs = api.post("/v1/jobs", json=_spec_on("mine.jsonl"), headers=auth(BOB))
    assert theirs.status_code == 422 and theirs.json()["error"]["fields"][0]["field"] == "data.source"
    absolute = str(server.settings.uploads_of(owner_of(hash_token(ALICE))) / "mine.jsonl")
    stolen = api.post("/v1/jobs", json=_spec_on(absolute), headers=auth(BOB))
    assert stolen.status_code == 403 and stolen.json()["error"]["fields"][0]["field"] == "data.source"

    deleted = api.delete("/v1/datasets/mine.jsonl", headers=auth(ALICE))
    assert deleted.status_code == 204 and _listing(api, ALICE) == []
    assert api.delete("/v1/datasets/mine.jsonl", headers=auth(ALICE)).status_code == 404


def test_bad_uploads_are_refused_naming_the_problem_and_leave_nothing(api, server):
    good = json.dumps({"prompt": "p", "chosen": "yes", "rejected": "no"})
    bad_rows = "\n".join([good, json.dumps({"prompt": "p", "chosen": "", "rejected": "no"}), "{not json"]).encode()
    response = _upload(api, "bad.jsonl", bad_rows)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert [f["field"] for f in error["fields"]] == ["row 2", "row 3"]
    assert "2 of 3 rows are invalid" in error["message"] and "bad.jsonl" in error["message"]
    assert "incoming" not in error["message"]  # the server's temporary path is not shown

    for name, content, status, field in [
        ("notes.txt", good.encode(), 422, "name"),  # a suffix the data stage cannot read
        ("empty.jsonl", b"", 422, "body"),
        ("columns.jsonl", json.dumps({"question": "q", "answer": "a"}).encode(), 422, None),
        ("huge.jsonl", (good + "\n").encode() * (UPLOAD_LIMIT // len(good) + 1), 413, None),
    ]:
        response = _upload(api, name, content)
        assert response.status_code == status, (name, response.text)
        if field:
            assert response.json()["error"]["fields"][0]["field"] == field
    assert "cannot tell the data format" in _upload(api, "columns.jsonl", b'{"q": 1}').json()["error"]["message"]
    # A name is one file name: no folder, no traversal.
    escape = httpx.URL(f"{server.url}/").copy_with(raw_path=b"/v1/datasets/..%2Fjobs%2Fx.jsonl")
    assert api.put(escape, content=good.encode(), headers=auth(ALICE)).status_code in (404, 422)
    assert _listing(api, ALICE) == [] and _leftovers(server, ALICE) == []


def test_an_upload_in_a_named_format_is_read_in_it(api, server):
    rows = [{"prompt": "Say hi", "response_a": "hi", "response_b": "hello"}] * 3
    content = "".join(json.dumps(r) + "\n" for r in rows).encode()
    response = _upload(api, "unlabeled.jsonl", content, format="unlabeled")
    assert response.status_code == 201 and (response.json()["format"], response.json()["rows"]) == ("unlabeled", 3)
    refused = _upload(api, "as-standard.jsonl", content, format="standard")
    assert refused.status_code == 422 and refused.json()["error"]["fields"][0]["field"] == "row 1"
    api.delete("/v1/datasets/unlabeled.jsonl", headers=auth(ALICE))


def test_uploads_have_their_own_size_limit_and_other_bodies_keep_theirs(api, server, tmp_path):
    content = write_prefs(tmp_path / "big.jsonl", n=400).read_bytes()
    assert BODY_LIMIT < len(content) < UPLOAD_LIMIT
    response = _upload(api, "big.jsonl", content)
    assert response.status_code == 201 and response.json()["rows"] == 400
    big_spec = {"name": "x" * BODY_LIMIT}
    assert api.post("/v1/jobs", json=big_spec, headers=auth(ALICE)).status_code == 413
    api.delete("/v1/datasets/big.jsonl", headers=auth(ALICE))
