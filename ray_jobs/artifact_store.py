"""The artifact root: a job's published outputs kept beyond the machine that made them (``RMDISTILL_ARTIFACTS``).

The job folder (`ray_jobs.layout`) stays the working copy every process reads and writes. With an artifact root set
(``s3://bucket/prefix``, ``gs://...``, ``hdfs://...``, a plain path, or any fsspec protocol), each stage's folder is
uploaded there as soon as it is published, with the spec and the event log, and Ray Train's and Tune's run storage
(distillation's checkpoints, the ensemble's trials) lives there instead of in the job folder. Any process that
needs a stage its local job folder lacks (a resumed job on another node, a job that reuses an earlier one, the
service listing or sending artifacts, a serving replica loading a policy) fetches it into the local folder, which is
therefore a cache: deleting it loses nothing that was published.

    <root>/jobs/<job-id>/spec.json, events.jsonl
    <root>/jobs/<job-id>/<stage>/...             the stage folder's files
    <root>/jobs/<job-id>/<stage>.complete        written last: {"files": {path: bytes}, "mtime_ns": {path: ...}}
    <root>/jobs/<job-id>/checkpoints/, .ray/     Ray Train / Tune run storage

A stage is complete in the root only when its marker exists, and the marker is written after every file is up (and
deleted before a re-publish starts), so a failed or interrupted upload never looks finished; a fetch checks every
file the marker lists against its size before the local copy is published, atomically as in `JobLayout.staging`.

Credentials come from the environment only, as each filesystem reads them (for S3: AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, AWS_ENDPOINT_URL for an S3-compatible server, AWS_DEFAULT_REGION): never
from the URI, the spec or the job folder. The filesystems are pyarrow's (the ones Ray Train takes), with fsspec's
behind pyarrow's adapter for a scheme pyarrow does not know.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from ray_jobs.layout import EVENTS_FILE, JOBS_DIR, SPEC_FILE, JobLayout
from ray_jobs.names import STAGES

ARTIFACTS_ENV = "RMDISTILL_ARTIFACTS"
COMPLETE_SUFFIX = ".complete"
CHUNK_BYTES = 8 << 20
# What a job folder holds besides its stages that the root keeps too.
JOB_FILES = (SPEC_FILE, EVENTS_FILE)
# Schemes pyarrow opens with a filesystem of its own; fsspec's registry names the rest it can open.
PYARROW_SCHEMES = frozenset({"file", "s3", "gs", "gcs", "hdfs", "viewfs", "abfs", "abfss"})


class ArtifactError(RuntimeError):
    """A stage in the root whose files do not match its completion marker, or one asked to go up unfinished. (An
    unreachable root is the filesystem's OSError.)"""


def open_filesystem(uri: str) -> tuple[Any, str]:
    """(pyarrow filesystem, path on it) for a URI: pyarrow's own where it has one, else fsspec's through pyarrow's
    adapter (Ray Train takes either)."""
    import pyarrow as pa
    import pyarrow.fs as pafs

    try:
        return pafs.FileSystem.from_uri(uri)
    except pa.ArrowInvalid:  # a scheme pyarrow has no filesystem for (memory://, an fsspec plugin's)
        import fsspec

        fs, path = fsspec.core.url_to_fs(uri)
        return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path


def redact(uri: str) -> str:
    """The URI without any user:password part, for messages and logs."""
    scheme, sep, rest = uri.partition("://")
    return f"{scheme}{sep}{rest.rpartition('@')[2]}" if sep else uri


def check_uri(uri: str) -> None:
    """Raise ValueError for a URI no filesystem here can open, without reaching it (opening an s3:// root already
    asks the bucket for its region)."""
    import fsspec

    scheme = uri.partition("://")[0] if "://" in uri else "file"
    if scheme not in PYARROW_SCHEMES and scheme not in fsspec.available_protocols():
        raise ValueError(f"no filesystem for the scheme {scheme!r}")


class ArtifactStore:
    """One artifact root: uploads published stages, fetches them into local job folders. The filesystem is opened
    on first use, so making a store reaches nothing."""

    def __init__(self, uri: str):
        self.uri = uri.rstrip("/")
        check_uri(self.uri)

    @functools.cached_property
    def _opened(self) -> tuple[Any, str]:
        fs, root = open_filesystem(self.uri)
        return fs, root.rstrip("/")

    @property
    def fs(self) -> Any:
        return self._opened[0]

    @property
    def root(self) -> str:
        return self._opened[1]

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> ArtifactStore | None:
        """The root ``RMDISTILL_ARTIFACTS`` names, or None (everything stays in the job folder)."""
        uri = env.get(ARTIFACTS_ENV, "").strip()
        return cls(uri) if uri else None

    def __repr__(self) -> str:
        return f"ArtifactStore({redact(self.uri)!r})"

    # ----------------------------------------------------------------------------------------------- paths

    def job_path(self, layout: JobLayout) -> str:
        """The job's folder in the root: named by its id, the job folder's own name."""
        return f"{self.root}/{JOBS_DIR}/{layout.root.name}"

    def remote(self, layout: JobLayout, local: str | os.PathLike[str]) -> str:
        """Where a path inside the job folder lives in the root."""
        relative = Path(local).resolve().relative_to(layout.root.resolve())
        return f"{self.job_path(layout)}/{relative.as_posix()}"

    def _marker(self, layout: JobLayout, folder: Path) -> str:
        return self.remote(layout, folder) + COMPLETE_SUFFIX

    # ----------------------------------------------------------------------------------------------- upload

    def publish_stage(self, layout: JobLayout, stage: str) -> int:
        """Bring a published stage folder's copy in the root up to date, its completion marker last; returns the
        bytes uploaded.

        Files the root holds with the same size and modification time are kept, so a stage that a later one updated
        in place (evaluation rewrites the policy card) sends only what changed, and an unchanged one nothing. Before
        anything changes the marker is deleted: the stage is incomplete in the root until every file is up."""
        if not layout.is_complete(stage):
            raise ArtifactError(f"{layout.stage(stage)} is not published: only a finished stage goes to {self}")
        return self.publish_folder(layout, layout.stage(stage))

    def publish_folder(self, layout: JobLayout, folder: Path) -> int:
        """`publish_stage` for any folder of the job: a worker's output handed to a driver on another node
        (`ray_jobs.handover`)."""
        local = {}
        for file in sorted(folder.rglob("*")):
            if file.is_file():
                info = file.stat()
                local[file.relative_to(folder).as_posix()] = (info.st_size, info.st_mtime_ns)
        target, marker = self.remote(layout, folder), self._marker(layout, folder)
        before = self.folder_entries(layout, folder)
        if before == local:
            return 0
        self._delete_file(marker)
        if before is None:
            self.remove(target)  # what an upload that died before its marker left
        changed = [name for name, entry in local.items() if (before or {}).get(name) != entry]
        for name in changed:
            with (folder / name).open("rb") as source, self.fs.open_output_stream(f"{target}/{name}") as sink:
                shutil.copyfileobj(source, sink, CHUNK_BYTES)
        for name in set(before or {}) - set(local):
            self._delete_file(f"{target}/{name}")
        document = {
            "files": {n: size for n, (size, _) in local.items()},
            "mtime_ns": {n: t for n, (_, t) in local.items()},
        }
        self._write_bytes(marker, json.dumps(document, indent=1).encode())
        return sum(local[name][0] for name in changed)

    def publish_files(self, layout: JobLayout, names: Iterable[str] = JOB_FILES) -> None:
        """Upload the job's spec and event log (whichever exist) as they are now, replacing the previous copies."""
        for name in names:
            local = layout.root / name
            if local.is_file():
                self._write_bytes(self.remote(layout, local), local.read_bytes())

    # ----------------------------------------------------------------------------------------------- fetch

    def completed(self, layout: JobLayout, stage: str) -> dict[str, tuple[int, int]] | None:
        """(bytes, modification time) of each file of the stage in the root, as the uploader saw them; None when
        the stage is not complete there."""
        return self.folder_entries(layout, layout.stage(stage))

    def folder_entries(self, layout: JobLayout, folder: Path) -> dict[str, tuple[int, int]] | None:
        """`completed` for any folder of the job."""
        raw = self._read_bytes(self._marker(layout, folder))
        if raw is None:
            return None
        document = json.loads(raw)
        return {name: (size, document["mtime_ns"][name]) for name, size in document["files"].items()}

    def fetch_stage(self, layout: JobLayout, stage: str) -> bool:
        """Make the stage's local folder exist, downloading it when missing; False when neither has it complete.

        The download lands in a folder of its own under ``.partial/`` and is renamed into place: a reader sees the
        stage whole or not at all, and two processes fetching the same stage at once both end with one copy."""
        if layout.is_complete(stage):
            return True
        return self.fetch_folder(layout, layout.stage(stage))

    def fetch_folder(self, layout: JobLayout, folder: Path) -> bool:
        """Download a folder of the job that is complete in the root into place (replacing an empty local one);
        False when the root has no complete copy."""
        entries = self.folder_entries(layout, folder)
        if entries is None:
            return False
        files = {name: size for name, (size, _) in entries.items()}
        outside = [name for name in files if ".." in Path(name).parts or Path(name).is_absolute()]
        if outside:  # a marker is read from the store: none of its names may lead out of the folder
            names = ", ".join(sorted(outside)[:5])
            raise ArtifactError(f"{folder.name}/ in {self} lists files outside that folder: {names}")
        partial = layout.root / ".partial"
        partial.mkdir(parents=True, exist_ok=True)
        download = Path(tempfile.mkdtemp(prefix=f"{folder.name}-fetch-", dir=partial))
        source = self.remote(layout, folder)
        try:
            for name in files:
                (download / name).parent.mkdir(parents=True, exist_ok=True)
                # A listed file that is missing is reported with the others below, by its size.
                with (
                    contextlib.suppress(FileNotFoundError),
                    self.fs.open_input_stream(f"{source}/{name}") as stream,
                    (download / name).open("wb") as sink,
                ):
                    shutil.copyfileobj(stream, sink, CHUNK_BYTES)
            wrong = [name for name, size in files.items() if _size(download / name) != size]
            if wrong:
                raise ArtifactError(
                    f"{folder.name}/ in {self} does not match its completion marker: {', '.join(sorted(wrong)[:5])}"
                )
            for name, (_, mtime) in entries.items():
                # As the uploader saw them: the copy then counts as up to date and is never sent back.
                os.utime(download / name, ns=(mtime, mtime))
            folder.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.replace(download, folder)
            except OSError:
                if not folder.is_dir() or not any(folder.iterdir()):  # not another fetch that won the race
                    raise
        finally:
            shutil.rmtree(download, ignore_errors=True)
        return True

    def discard_folder(self, layout: JobLayout, folder: Path) -> None:
        """Delete a folder's copy in the root, its marker first."""
        self._delete_file(self._marker(layout, folder))
        self.remove(self.remote(layout, folder))

    def fetch_files(self, layout: JobLayout, names: Iterable[str] = JOB_FILES) -> list[str]:
        """Download the job files the local folder lacks (spec, event log); returns those fetched."""
        fetched = []
        for name in names:
            local = layout.root / name
            if local.exists():
                continue
            raw = self._read_bytes(self.remote(layout, local))
            if raw is None:
                continue
            local.parent.mkdir(parents=True, exist_ok=True)
            tmp = local.with_name(f".{name}.{os.getpid()}.fetch")
            tmp.write_bytes(raw)
            os.replace(tmp, local)
            fetched.append(name)
        return fetched

    def fill(self, layout: JobLayout, stages: Iterable[str] = STAGES) -> list[str]:
        """Bring the local job folder up to what the root holds: its job files and the given stages; returns the
        stages fetched."""
        self.fetch_files(layout)
        return [s for s in stages if not layout.is_complete(s) and self.fetch_stage(layout, s)]

    def sync(self, layout: JobLayout, stages: Iterable[str]) -> None:
        """Fetch the stages only the root holds, bring the root's copy of the others up to date (a job run before the
        root was set, a stage adopted from another job), and upload the job files."""
        for stage in stages:
            if layout.is_complete(stage):
                self.publish_stage(layout, stage)
            else:
                self.fetch_stage(layout, stage)
        self.publish_files(layout)

    # ----------------------------------------------------------------------------------------------- run storage

    def run_storage(self, layout: JobLayout, local: str | os.PathLike[str]) -> tuple[str, Any]:
        """(path, filesystem) for Ray Train's or Tune's ``storage_path``/``storage_filesystem`` in place of a
        folder inside the job folder."""
        return self.remote(layout, local), self.fs

    def remove(self, path: str) -> None:
        import pyarrow.fs as pafs

        if self.fs.get_file_info(path).type != pafs.FileType.NotFound:
            self.fs.delete_dir(path)

    # ----------------------------------------------------------------------------------------------- helpers

    def _read_bytes(self, path: str) -> bytes | None:
        import pyarrow.fs as pafs

        if self.fs.get_file_info(path).type != pafs.FileType.File:
            return None
        with self.fs.open_input_stream(path) as stream:
            return stream.read()

    def _write_bytes(self, path: str, data: bytes) -> None:
        with self.fs.open_output_stream(path) as stream:
            stream.write(data)

    def _delete_file(self, path: str) -> None:
        import pyarrow.fs as pafs

        if self.fs.get_file_info(path).type == pafs.FileType.File:
            self.fs.delete_file(path)


def _size(path: Path) -> int | None:
    return path.stat().st_size if path.is_file() else None


def run_storage(layout: JobLayout, local: Path) -> tuple[str, Any]:
    """Ray Train/Tune storage for a folder of the job: in the artifact root when one is set (every node reaches it,
    and it outlives the node), else the local folder itself (filesystem None: Ray's own for a local path)."""
    store = ArtifactStore.from_env()
    if store is None:
        return str(local.resolve()), None
    return store.run_storage(layout, local)


def remove_run_storage(layout: JobLayout, local: Path) -> None:
    """Delete what `run_storage` gave for `local`, wherever it is."""
    store = ArtifactStore.from_env()
    if store is None:
        shutil.rmtree(local, ignore_errors=True)
    else:
        store.remove(store.remote(layout, local))


def ensure_local(path: str | os.PathLike[str]) -> None:
    """Fetch the job stage a path lies in (``<job-id>/<stage>/...``: a policy's ``distill/``, a reward model's
    ``ensemble/member-<k>``) from the artifact root when this node lacks it, as a serving replica, a scoring actor
    or an evaluation engine on a node that never held the job folder does; any other path is left to its reader
    (a folder that exists, or one the root does not hold, costs one marker lookup at most)."""
    folder = Path(path)
    stage = next((p for p in (folder, *folder.parents) if p.name in STAGES and p.parent.name), None)
    if stage is None or stage.is_dir():
        return
    store = ArtifactStore.from_env()
    if store is not None:
        store.fetch_stage(JobLayout(stage.parent), stage.name)


def dataset_source(layout: JobLayout, path: Path) -> tuple[str, Any]:
    """(path, filesystem) for Ray Data to read a published file of the job from: the artifact root's copy when its
    stage is complete there, since read tasks run on any node and only the root is on all of them; else the local
    path (filesystem None)."""
    store = ArtifactStore.from_env()
    stage = Path(path).resolve().relative_to(layout.root.resolve()).parts[0]
    if store is None or store.completed(layout, stage) is None:
        return str(path), None
    return store.remote(layout, path), store.fs
