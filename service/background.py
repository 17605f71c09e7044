"""The service on uvicorn in a background thread of this process, over a real socket.

For what embeds the real server instead of starting `rmdistill serve`: the tests, the benchmarks, a notebook.
`stop()` runs the app's shutdown (the lifespan exit) before returning.
"""

from __future__ import annotations

import threading
import time

import uvicorn

from service.app import SHUTDOWN_GRACE_S, create_app
from service.ray_backend import free_port
from service.settings import Settings


class BackgroundServer:
    def __init__(self, settings: Settings, stop_cluster: bool = True):
        self.settings = settings
        self.port = free_port()
        self.app = create_app(settings, stop_cluster=stop_cluster)
        config = uvicorn.Config(
            self.app,
            host="127.0.0.1",
            port=self.port,
            log_level="warning",
            timeout_graceful_shutdown=SHUTDOWN_GRACE_S,
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 900) -> BackgroundServer:
        """Returns once the app answers (its lifespan start, which may start a Ray head, is done)."""
        self.thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the service did not start")
            time.sleep(0.05)
        return self

    def stop(self, timeout_s: float = 120) -> None:
        self.server.should_exit = True
        self.thread.join(timeout_s)
