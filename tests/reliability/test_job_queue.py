"""Load: a hundred jobs submitted at once to a service with room to run two. Every one is recorded (submitted or
queued) or refused with a 429 past the queue's limit; none is lost, the queue drains oldest first, never more than
two are on Ray at once, and each driver reserves its memory on the cluster.

The service and its embedded Ray head run for real; the two submitted jobs really start, and are cancelled.
"""

from __future__ import annotations

import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from ray_jobs.cluster import ClusterResources
from ray_jobs.spec import parse_spec
from service.admission import check_cluster
from service.background import BackgroundServer
from service.errors import ApiError
from service.settings import Settings
from tests.test_service import tiny_spec, wait_for, write_prefs

pytestmark = [pytest.mark.slow, pytest.mark.ray, pytest.mark.timeout(900)]

SUBMITTED = ("pending", "running", "cancelling")
RUNNING_SLOTS, QUEUE = 2, 90
DRIVER_MEMORY = 512 << 20


def _jobs(url: str) -> list[dict[str, Any]]:
    body = httpx.get(f"{url}/v1/jobs", params={"limit": 200}, timeout=30).json()
    return body["items"]


def _submitted(url: str) -> list[dict[str, Any]]:
    jobs = _jobs(url)
    on_ray = [j for j in jobs if j["state"] in SUBMITTED]
    assert len(on_ray) <= RUNNING_SLOTS, f"{len(on_ray)} jobs on Ray at once"
    return on_ray


def _supervisor_resources(dashboard: str, headers: dict[str, str]) -> dict[str, float]:
    """Ray's supervisor actor of each submitted job (the driver runs under it) and the memory it holds."""
    from ray.util.state.api import StateApiClient
    from ray.util.state.common import ListApiOptions, StateResource

    client = StateApiClient(address=dashboard, headers={"Content-Type": "application/json", **headers})
    options = ListApiOptions(detail=True, timeout=30, filters=[("class_name", "=", "JobSupervisor")])
    actors = client.list(StateResource.ACTORS, options=options, raise_on_missing_output=False)
    return {a.name: (a.required_resources or {}).get("memory", 0.0) for a in actors}


def test_a_hundred_jobs_at_once_are_recorded_queued_or_refused_and_none_is_lost(tmp_path: Path) -> None:
    write_prefs(tmp_path / "datasets")
    settings = Settings(
        data_dir=tmp_path,
        ray_num_cpus=2,
        poll_interval_s=0.5,
        max_running_jobs=RUNNING_SLOTS,
        max_queued_jobs=QUEUE,
        max_active_jobs=1000,
        driver_memory_bytes=DRIVER_MEMORY,
    )
    server = BackgroundServer(settings).start()
    try:
        url = server.url
        started = time.monotonic()
        with ThreadPoolExecutor(16) as pool:
            answers = list(
                pool.map(lambda i: httpx.post(f"{url}/v1/jobs", json=tiny_spec(f"load-{i}"), timeout=120), range(100))
            )
        took = time.monotonic() - started
        codes = Counter(a.status_code for a in answers)
        assert codes == {202: RUNNING_SLOTS + QUEUE, 429: 100 - RUNNING_SLOTS - QUEUE}, codes
        refused = [a for a in answers if a.status_code == 429]
        assert all(f"the most it queues is {QUEUE}" in a.json()["error"]["message"] for a in refused)
        assert all(a.headers["Retry-After"] == "60" for a in refused)
        accepted = [a.json() for a in answers if a.status_code == 202]
        assert Counter(j["state"] for j in accepted) == {"pending": RUNNING_SLOTS, "queued": QUEUE}
        # Recorded means listed and with a folder; a refused job left neither.
        assert len(_jobs(url)) == RUNNING_SLOTS + QUEUE
        assert len(list(settings.jobs_dir.iterdir())) == RUNNING_SLOTS + QUEUE
        print(f"\n100 submissions from 16 threads in {took:.1f} s: {dict(codes)}")

        first = [j for j in accepted if j["state"] == "pending"]
        backend = server.app.state.backend
        reserved = _supervisor_resources(backend.address, backend.auth_headers)
        assert {f"_ray_internal_job_actor_{j['ray_submission_id']}" for j in first} <= reserved.keys()
        assert all(reserved[f"_ray_internal_job_actor_{j['ray_submission_id']}"] == DRIVER_MEMORY for j in first)
        queued = sorted((j for j in accepted if j["state"] == "queued"), key=lambda j: (j["created_at"], j["id"]))
        assert all(j["ray_submission_id"] is None for j in queued)  # nothing of theirs is on Ray

        # Free the two slots: the two oldest queued jobs are submitted next, and nothing else.
        for job in first:
            assert httpx.post(f"{url}/v1/jobs/{job['id']}/cancel", timeout=60).status_code == 202
        firsts = {f["id"] for f in first}

        def refilled() -> set[str] | None:
            ids = {j["id"] for j in _submitted(url)} - firsts
            return ids if len(ids) == RUNNING_SLOTS else None

        promoted = wait_for(refilled, 300, "both slots to be refilled from the queue")
        assert promoted == {j["id"] for j in queued[:RUNNING_SLOTS]}

        # Cancel the rest: queued jobs end at once (nothing to stop on Ray), the submitted ones when Ray stops them.
        for job in reversed(queued[RUNNING_SLOTS:]):
            assert httpx.post(f"{url}/v1/jobs/{job['id']}/cancel", timeout=60).json()["state"] == "cancelled"
        for job_id in promoted:
            httpx.post(f"{url}/v1/jobs/{job_id}/cancel", timeout=60)
        wait_for(lambda: all(j["state"] == "cancelled" for j in _jobs(url)) or None, 300, "every job to end")
        final = _jobs(url)
        assert Counter(j["state"] for j in final) == {"cancelled": RUNNING_SLOTS + QUEUE}
        never_ran = [j for j in final if j["id"] not in promoted | firsts]
        assert all(j["ray_submission_id"] is None and j["started_at"] is None for j in never_ran)
    finally:
        server.stop()


def test_a_cluster_no_driver_fits_on_is_refused_naming_the_setting() -> None:
    """Drivers reserve memory; a cluster whose largest node offers less would leave every job pending forever."""
    spec = parse_spec({**tiny_spec("big-driver"), "data": {"source": "/x.jsonl"}})
    cluster = ClusterResources.from_nodes([{"CPU": 2.0, "memory": float(1 << 30)}, {"CPU": 2.0, "memory": 2.0**31}])
    check_cluster(spec, cluster, driver_memory=1 << 31)  # fits the larger node exactly
    with pytest.raises(ApiError) as refused:
        check_cluster(spec, cluster, driver_memory=(1 << 31) + 1)
    assert refused.value.status == 503
    assert "RMDISTILL_DRIVER_MEMORY_BYTES" in refused.value.message and "2.00 GiB" in refused.value.message
