"""The job's event log: ``events.jsonl``, one JSON object per line, appended by the driver and every Ray worker.

The service reads it to report stage, progress and metrics, so its shape is a contract:
``{"ts": <unix seconds>, "kind": ..., "stage": ... | null, ...fields}`` with kinds
``job_started``, ``stage_started``, ``stage_finished``, ``stage_skipped``, ``progress`` (done, total),
``metrics`` (step, values), ``log`` (message), ``error`` (message), ``job_finished`` (status).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Iterator
from typing import Any

from ray_jobs.layout import JobLayout


def _jsonable(value: Any) -> Any:
    # NaN/inf are not JSON; a metric that blew up must still be readable, so it becomes a string.
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if hasattr(value, "item") and callable(value.item):  # numpy / torch scalars
        return _jsonable(value.item())
    return value


class EventLog:
    """Appends events to ``<job_dir>/events.jsonl``; safe to use from several processes on one filesystem. A worker on
    another node than the driver's writes through `ray_jobs.event_relay` instead (`worker_events`)."""

    def __init__(self, job_dir: str | os.PathLike[str]):
        self.path = JobLayout(job_dir).events
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # The driver's log carries the run's relay actor (set by the pipeline) for stages to give their workers.
        self.relay: Any = None

    def emit(self, kind: str, stage: str | None = None, **fields: Any) -> dict[str, Any]:
        event = {"ts": time.time(), "kind": kind, "stage": stage, **_jsonable(fields)}
        self.append(json.dumps(event, allow_nan=False) + "\n")
        return event

    def append(self, line: str) -> None:
        """Add one encoded event line."""
        # One write() on an O_APPEND descriptor: lines from concurrent workers never interleave.
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line.encode())
        finally:
            os.close(fd)

    def since_started(self, stage: str) -> list[dict[str, Any]]:
        """The events since `stage` last started (all of them when it never did): what this run of it logged."""
        events = list(read_events(self.path.parent))
        starts = [i for i, e in enumerate(events) if e["kind"] == "stage_started" and e["stage"] == stage]
        return events[starts[-1] if starts else 0 :]

    def progress(self, stage: str, done: int, total: int, **fields: Any) -> None:
        self.emit("progress", stage, done=done, total=total, **fields)

    def metrics(self, stage: str, step: int, values: dict[str, Any], **fields: Any) -> None:
        self.emit("metrics", stage, step=step, values=values, **fields)


def _parse(raw: bytes, line: int) -> dict[str, Any]:
    try:
        event = json.loads(raw)
    except ValueError:
        event = None
    if not isinstance(event, dict):
        event = {"ts": None, "kind": "unreadable", "stage": None, "line": line}
    return event


def read_events(job_dir: str | os.PathLike[str], offset: int = 0) -> Iterator[dict[str, Any]]:
    """Events from line ``offset`` on, one per line; a torn last line (a writer mid-append) is left for the next read.

    A complete line that is not an event (a short write on a full disk, a stray byte) reads as an ``unreadable``
    event, so one bad line neither stops a reader nor shifts the line numbers that offsets count.
    """
    path = JobLayout(job_dir).events
    if not path.exists():
        return
    with path.open("rb") as fh:
        for i, raw in enumerate(fh):
            if i < offset:
                continue
            if not raw.endswith(b"\n"):
                return
            yield _parse(raw, i)


class EventCursor:
    """Follows a job's event log the way `tail -f` does: each `read` parses only the complete lines appended since
    the last one, however long the log has grown (a stream polled twice a second must not re-read the file)."""

    def __init__(self, job_dir: str | os.PathLike[str], offset: int = 0):
        self.path = JobLayout(job_dir).events
        self.line = 0  # lines consumed so far; the next event's offset
        self.position = 0  # byte where the first unconsumed line starts
        self._skip_to = offset

    def read(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        events = []
        with self.path.open("rb") as fh:
            fh.seek(self.position)
            for raw in fh:
                if not raw.endswith(b"\n"):
                    break  # a writer mid-append: this line is read whole next time
                if self.line >= self._skip_to:
                    events.append(_parse(raw, self.line))
                self.line += 1
                self.position += len(raw)
        return events
