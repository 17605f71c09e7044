"""Bad input gets a 4xx naming the problem, never a 5xx: each case here was a 500 found by fuzzing the API.

The service runs for real (uvicorn on a socket, SQLite) against a Ray address nothing listens on, which every
route below answers without.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import pytest

from ray_jobs.layout import JobLayout
from service.auth import owner_of
from service.background import BackgroundServer
from service.ray_backend import free_port
from service.settings import Settings, hash_token
from service.store import Store

TOKEN = "token-fuzz"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BackgroundServer]:
    home = tmp_path_factory.mktemp("bad-input")
    settings = Settings(data_dir=home, ray_address=f"http://127.0.0.1:{free_port()}", tokens=[TOKEN])
    server = BackgroundServer(settings).start(timeout_s=120)
    yield server
    server.stop()


def _error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    return response.json()["error"]


def test_an_offset_past_any_page_is_a_422_not_an_overflow(server):
    response = httpx.get(f"{server.url}/v1/jobs", params={"offset": 2**90}, headers=AUTH)
    assert "offset" in _error(response, 422)["message"]
    assert httpx.get(f"{server.url}/v1/jobs", params={"offset": 10**9}, headers=AUTH).json()["items"] == []


@pytest.mark.parametrize(
    ("path", "reason"),
    [
        ("x" * 300, "File name too long"),
        ("model\ud800dir", "UnicodeEncodeError"),
        ("~no-such-user-here/model", "home folder of an unknown user"),  # expanduser raised: a 500 before
    ],
    ids=["long-component", "lone-surrogate", "unknown-user-home"],
)
def test_a_path_the_filesystem_cannot_take_is_a_422_naming_the_field(server, path, reason):
    # httpx encodes the surrogate as an escape in JSON, as a client sending raw JSON would.
    body = json.dumps({"path": path}).encode()
    response = httpx.post(
        f"{server.url}/v1/policies", content=body, headers={**AUTH, "Content-Type": "application/json"}
    )
    error = _error(response, 422)
    assert error["fields"] == [{"field": "path", "message": "not a usable path"}]
    assert reason in error["message"]


def _job_with_events(server: BackgroundServer, lines: list[bytes]) -> str:
    """A job record whose folder holds the given event-log lines (written as a driver would)."""
    job_dir = server.settings.jobs_dir / "job-events"
    job_dir.mkdir(parents=True, exist_ok=True)
    JobLayout(job_dir).events.write_bytes(b"".join(lines))
    store = Store(server.settings.database_url)
    try:
        if store.get_job("job-events") is None:
            owner = owner_of(hash_token(TOKEN))
            store.create_job(job_id="job-events", name="events", owner=owner, spec={}, job_dir=str(job_dir))
    finally:
        store.close()
    return "job-events"


def test_a_corrupt_event_line_neither_stops_reading_nor_shifts_offsets(server):
    good = [json.dumps({"ts": 1.0, "kind": "stage_started", "stage": "data"}).encode() + b"\n"]
    finished = json.dumps({"ts": 2.0, "kind": "stage_finished", "stage": "data"}).encode() + b"\n"
    job_id = _job_with_events(server, [*good, b'{"ts": 1.5, "kind": "prog\n', finished])
    page = httpx.get(f"{server.url}/v1/jobs/{job_id}/events", headers=AUTH)
    assert page.status_code == 200, page.text
    kinds = [e["kind"] for e in page.json()["events"]]
    assert kinds == ["stage_started", "unreadable", "stage_finished"]
    assert page.json()["next_offset"] == 3
    detail = httpx.get(f"{server.url}/v1/jobs/{job_id}", headers=AUTH)
    assert detail.status_code == 200 and detail.json()["stages"] == {"data": "finished"}


def test_a_non_ascii_last_event_id_is_ignored_not_a_500(server):
    job_id = _job_with_events(
        server, [json.dumps({"ts": 1.0, "kind": "job_finished", "status": "failed"}).encode() + b"\n"]
    )
    for last_id in ("\u00b2", "\u0663", "9" * 5000):  # superscript two, Arabic-Indic three: both isdigit()
        headers = {**AUTH, "Last-Event-ID": last_id.encode(), "Accept": "text/event-stream"}
        with httpx.stream("GET", f"{server.url}/v1/jobs/{job_id}/events", headers=headers, timeout=30) as response:
            assert response.status_code == 200
            assert b"job_finished" in b"".join(response.iter_bytes())


def test_one_token_cannot_queue_jobs_past_its_limit(tmp_path):
    """Each job is a driver process importing torch: past `max_active_jobs` pending or running jobs, a token's next
    submission is a 429 that says why, and touches nothing; another token is not held back by it."""
    other = "token-other"
    settings = Settings(
        data_dir=tmp_path, ray_address=f"http://127.0.0.1:{free_port()}", tokens=[TOKEN, other], max_active_jobs=2
    )
    store = Store(settings.database_url)
    for i in range(2):
        store.create_job(job_id=f"job-{i}", name="q", owner=owner_of(hash_token(TOKEN)), spec={}, job_dir=str(tmp_path))
    store.close()
    server = BackgroundServer(settings).start(timeout_s=120)
    try:
        response = httpx.post(f"{server.url}/v1/jobs", json={"name": "third"}, headers=AUTH)
        assert "2 of your jobs are queued, pending or running, the limit is 2" in _error(response, 429)["message"]
        assert httpx.get(f"{server.url}/v1/jobs", headers=AUTH).json()["total"] == 2  # nothing recorded
        elsewhere = httpx.post(
            f"{server.url}/v1/jobs", json={"name": "x"}, headers={"Authorization": f"Bearer {other}"}
        )
        assert elsewhere.status_code == 503  # past the quota, on to the (unreachable) cluster
    finally:
        server.stop()


def test_the_event_stream_reads_only_what_was_appended(tmp_path):
    """The SSE stream polls twice a second: each poll must parse only new complete lines, never the whole log."""
    from ray_jobs.events import EventCursor

    log = JobLayout(tmp_path).events
    lines = [json.dumps({"ts": float(i), "kind": "progress", "done": i}).encode() + b"\n" for i in range(3)]
    log.write_bytes(b"".join(lines))
    cursor = EventCursor(tmp_path, offset=1)
    assert [e["done"] for e in cursor.read()] == [1, 2] and cursor.line == 3
    # Damage a line already read (same length): a cursor that re-read the file would now report it unreadable.
    log.write_bytes(b"x" * (len(lines[0]) - 1) + b"\n" + b"".join(lines[1:]))
    with log.open("ab") as fh:
        fh.write(b'{"ts": 3.0, "kind": "prog')  # a writer mid-append
    assert cursor.read() == []
    with log.open("ab") as fh:
        fh.write(b'ress", "done": 3}\n')
    assert cursor.read() == [{"ts": 3.0, "kind": "progress", "done": 3}] and cursor.line == 4
    assert cursor.read() == []


def test_experiment_ids_no_filesystem_takes_are_404_not_500(server):
    for eid in ("x" * 5000, "..", "a%2Fb-0123456789", "\u00b2-0123456789"):
        response = httpx.get(f"{server.url}/v1/experiments/{eid}", headers=AUTH)
        assert response.status_code == 404, (eid[:20], response.text)
        response = httpx.get(f"{server.url}/v1/experiments/{eid}/cells/c", headers=AUTH)
        assert response.status_code == 404
