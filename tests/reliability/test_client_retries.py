"""The SDK's `wait` outlives a service restart: an experiment waits hours on its jobs through one client, and a
dropped connection (the grid's CLI once died of one) must cost a retry, not the run."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

from clients.sdk import Client
from service.background import BackgroundServer
from service.ray_backend import free_port
from service.settings import Settings
from service.store import Store


def _server_on(settings: Settings, port: int) -> BackgroundServer:
    server = BackgroundServer(settings)
    server.port = server.server.config.port = port  # the restarted service comes back at the same address
    return server.start(timeout_s=120)


def test_wait_polls_through_a_service_restart(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, ray_address=f"http://127.0.0.1:{free_port()}", poll_interval_s=60)
    store = Store(settings.database_url)
    store.create_job(job_id="job-long", name="long", owner=None, spec={}, job_dir=str(tmp_path / "jobs" / "x"))
    port = free_port()
    first = _server_on(settings, port)
    outcome: dict[str, Any] = {}

    def wait() -> None:
        try:
            with Client(first.url) as client:
                outcome["job"] = client.wait("job-long", timeout=300, poll_s=0.2)
        except Exception as exc:  # what the test reports if the wait gives up
            outcome["error"] = exc

    waiter = threading.Thread(target=wait)
    waiter.start()
    time.sleep(1.0)
    first.stop()
    store.transition("job-long", "failed", "ended while the service was down", error="ended while down")
    time.sleep(2.0)  # several polls find nobody listening
    assert waiter.is_alive() and not outcome, outcome
    second = _server_on(settings, port)
    try:
        waiter.join(60)
        assert "error" not in outcome, outcome.get("error")
        assert outcome["job"]["state"] == "failed" and outcome["job"]["error"] == "ended while down"
    finally:
        second.stop()
        store.close()
