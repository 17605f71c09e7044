"""What a job offers for download: the files of its published stage folders, and each such folder as one archive.

Only published stages count (a folder that exists is complete: ray_jobs.layout.JobLayout.staging), so nothing
half-written is ever offered. With an artifact root (RMDISTILL_ARTIFACTS), a finished job's folder is a cache that
`refill` brings back from the root where this node lacks a stage, its spec or its event log.
A requested name is resolved against that list, never joined onto the job folder as given, and a symlink out of
the folder is refused by its target: no name reaches another file on the server.
"""

from __future__ import annotations

import contextlib
import gzip
import mimetypes
import queue
import tarfile
import threading
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ray_jobs.artifact_store import ArtifactError, ArtifactStore, redact
from ray_jobs.layout import REPORT_FILE, JobLayout
from ray_jobs.names import STAGES
from service.errors import ApiError

if TYPE_CHECKING:
    from service.store import Job

ARCHIVE_SUFFIX = ".tar.gz"
# Model weights hardly compress; the fastest level keeps a policy's archive from costing minutes of CPU.
ARCHIVE_COMPRESSLEVEL = 1
CHUNK_BYTES = 1 << 20
# Chunks an archive may run ahead of a slow client: bounds the memory one download holds.
MAX_CHUNKS_AHEAD = 8


@dataclass(frozen=True)
class Artifact:
    path: str  # as the client names it: "<stage>/<file>" or "<stage>.tar.gz"
    kind: str
    source: Path  # the file, or for an archive the stage folder
    archive: bool
    bytes: int | None  # None for archives, which are built while they are sent

    @property
    def media_type(self) -> str:
        if self.archive:
            return "application/gzip"
        return mimetypes.guess_type(self.source.name)[0] or "application/octet-stream"


def _kind(stage: str, relative: Path) -> str:
    if stage == "evaluate" and relative.name == REPORT_FILE:
        return "report"
    if relative.suffix == ".png":
        return "plot"
    if stage == "score" and relative.name == "pairs.parquet":
        return "pairs"
    return "file"


def _files(folder: Path) -> Iterator[tuple[Path, Path]]:
    """(file, its path relative to `folder`) for every file in it; symlinks leading out of it are left out."""
    for file in sorted(folder.rglob("*")):
        if file.is_file() and file.resolve().is_relative_to(folder.resolve()):
            yield file, file.relative_to(folder)


def _root_unreadable(artifacts: ArtifactStore, exc: Exception) -> ApiError:
    return ApiError(503, f"the artifact root {redact(artifacts.uri)} cannot be read: {exc}")


def refill(job: Job, artifacts: ArtifactStore | None, stages: Iterable[str] = ()) -> None:
    """Fetch a finished job's spec and event log, and `stages`, from the artifact root where its folder here lacks
    them (deleted, or written on another node). A running job's folder is its driver's to write: a copy of its log
    fetched now would never be refreshed, so it is left alone."""
    if artifacts is None or not job.is_final:
        return
    try:
        artifacts.fill(JobLayout(job.job_dir), stages)
    except (OSError, ArtifactError) as exc:  # pyarrow's filesystems raise OSError for an unreachable store
        raise _root_unreadable(artifacts, exc) from None


def stages_in_root(job: Job, artifacts: ArtifactStore | None) -> dict[str, dict[str, int]]:
    """{stage: {file: bytes}} of a finished job's stages that only the artifact root holds, read from their
    completion markers: listing them downloads nothing (a policy is fetched when it is downloaded)."""
    if artifacts is None or not job.is_final:
        return {}
    layout = JobLayout(job.job_dir)
    found = {}
    try:
        for stage in STAGES:
            if not layout.is_complete(stage) and (entries := artifacts.completed(layout, stage)) is not None:
                found[stage] = {name: size for name, (size, _) in entries.items()}
    except (OSError, ValueError) as exc:  # an unreachable store; a marker that is not JSON
        raise _root_unreadable(artifacts, exc) from None
    return found


def list_artifacts(job_dir: str | Path, in_root: Mapping[str, Mapping[str, int]] | None = None) -> list[Artifact]:
    """Every file of every published stage, then one archive per stage: `distill.tar.gz` is the policy. `in_root`
    (`stages_in_root`) adds the stages published only in the artifact root, their files where they will be fetched."""
    files: list[Artifact] = []
    archives: list[Artifact] = []
    layout = JobLayout(job_dir)
    for stage in STAGES:
        folder = layout.stage(stage)
        if folder.is_dir():
            entries = [(relative, file.stat().st_size) for file, relative in _files(folder)]
        elif stage in (in_root or {}):
            entries = [(Path(name), size) for name, size in sorted(in_root[stage].items())]
        else:
            continue
        for relative, size in entries:
            path = f"{stage}/{relative.as_posix()}"
            files.append(Artifact(path, _kind(stage, relative), folder / relative, False, size))
        kind = "policy" if stage == "distill" else "archive"
        archives.append(Artifact(f"{stage}{ARCHIVE_SUFFIX}", kind, folder, True, None))
    return files + archives


def find_artifact(job_dir: str | Path, name: str) -> Artifact | None:
    """The artifact a client asked for by its listed path, or None (also for any name that is not listed)."""
    return next((a for a in list_artifacts(job_dir) if a.path == name), None)


class _QueueWriter:
    """A write-only file whose writes become chunks on a bounded queue; `cancel` makes the next write fail."""

    def __init__(self, chunks: queue.Queue[bytes | BaseException | None]):
        self.chunks, self.cancelled = chunks, threading.Event()

    def put(self, item: bytes | BaseException | None) -> None:
        while not self.cancelled.is_set():
            try:
                self.chunks.put(item, timeout=0.5)
                return
            except queue.Full:
                continue
        raise BrokenPipeError("the client stopped reading")

    def write(self, data: bytes) -> int:
        self.put(bytes(data))
        return len(data)

    def flush(self) -> None:
        pass


def stream_archive(folder: Path, arcname: str) -> Iterator[bytes]:
    """A .tar.gz of `folder` (entries under `arcname/`) as chunks, built in a thread while they are sent: a policy
    of gigabytes is never held in memory or written to disk. Closing the iterator stops the builder."""
    chunks: queue.Queue[bytes | BaseException | None] = queue.Queue(maxsize=MAX_CHUNKS_AHEAD)
    writer = _QueueWriter(chunks)

    def build() -> None:
        try:
            with (
                gzip.GzipFile(fileobj=writer, mode="wb", compresslevel=ARCHIVE_COMPRESSLEVEL, mtime=0) as gz,
                tarfile.open(fileobj=gz, mode="w|", bufsize=CHUNK_BYTES) as tar,
            ):
                for file, relative in _files(folder):
                    tar.add(file, arcname=f"{arcname}/{relative.as_posix()}", recursive=False)
            writer.put(None)
        except BaseException as exc:  # handed to the reader, which raises it in the response
            with contextlib.suppress(BrokenPipeError):
                writer.put(exc)

    thread = threading.Thread(target=build, name=f"archive-{arcname}", daemon=True)
    thread.start()
    try:
        while (chunk := chunks.get()) is not None:
            if isinstance(chunk, BaseException):
                raise chunk
            yield chunk
    finally:
        writer.cancelled.set()
        thread.join(timeout=5)
