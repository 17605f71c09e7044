"""What a valid spec must still pass before it runs: its paths stay inside the data roots, and the cluster can
ever provide what it asks for (a job must never wait forever on a placement group it cannot get).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

from ray_jobs.cluster import ClusterResources, ResourceError, check_resources
from ray_jobs.names import HUB_ID, MODEL_PREFIXES
from ray_jobs.spec import JobSpec
from service.errors import ApiError

# A relative value with one of these suffixes is meant as a file, never a hub id: it must exist in a data root.
FILE_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv", ".gz", ".txt", ".arrow", ".safetensors", ".bin")


def _ref_fields(spec: JobSpec) -> Iterator[tuple[str, str]]:
    yield "data.source", spec.data.source
    yield "reference", spec.reference
    if spec.ensemble.size:
        yield "ensemble.backbone", spec.ensemble.backbone
    for i, member in enumerate(spec.ensemble.members):
        if member.backbone:
            yield f"ensemble.members.{i}.backbone", member.backbone
        if member.model:
            yield f"ensemble.members.{i}.model", member.model
    if spec.evaluate.oracle:
        yield "evaluate.oracle", spec.evaluate.oracle
    if spec.data.relabel:
        yield "data.relabel", spec.data.relabel


def _inside(path: Path, roots: tuple[Path, ...]) -> bool:
    return any(path.is_relative_to(root) for root in roots)


def _confine(field: str, value: str, roots: tuple[Path, ...]) -> str:
    """The absolute path a local reference means, or the value unchanged when it is a builtin/hub reference."""
    if value.startswith(MODEL_PREFIXES):
        return value
    try:
        return _resolve_in_roots(field, value, roots)
    except (OSError, UnicodeError) as exc:
        # A name the filesystem cannot take (too long, lone surrogates): a bad request, not a server fault.
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
        raise ApiError(
            422, f"{field}: not a usable path ({reason})", [{"field": field, "message": "not a usable path"}]
        ) from None


def _resolve_in_roots(field: str, value: str, roots: tuple[Path, ...]) -> str:
    if "://" in value or "\\" in value or "\x00" in value:
        raise ApiError(
            403,
            f"{field}: {value!r} is not a path inside the data roots",
            [{"field": field, "message": "forbidden path"}],
        )
    try:
        raw = Path(value).expanduser()
    except RuntimeError:  # `~name/...` for a user this machine does not have
        raise ApiError(
            422,
            f"{field}: {value!r} is in the home folder of an unknown user",
            [{"field": field, "message": "not a usable path"}],
        ) from None
    explicit = raw.is_absolute() or value.startswith((".", "~")) or ".." in raw.parts
    candidates = [raw] if raw.is_absolute() else [root / raw for root in roots]
    for candidate in candidates:
        resolved = candidate.resolve()
        if not _inside(resolved, roots):
            # Resolved symlinks and `..` count: the target, not the spelling, must lie in a root.
            if explicit or resolved.exists():
                roots_text = ", ".join(str(r) for r in roots)
                raise ApiError(
                    403,
                    f"{field}: {value!r} resolves outside the data roots ({roots_text})",
                    [{"field": field, "message": "path outside the data roots"}],
                )
            continue
        if resolved.exists():
            return str(resolved)
    if explicit or value.endswith(FILE_SUFFIXES) or not HUB_ID.match(value):
        raise ApiError(
            422,
            f"{field}: {value!r} was not found in the data roots ({', '.join(str(r) for r in roots)})",
            [{"field": field, "message": "not found in the data roots"}],
        )
    return value  # a hub id


def confine_path(field: str, value: str, roots: tuple[Path, ...]) -> str:
    """An existing local path inside the data roots, as an absolute path; 403/422 naming `field` otherwise."""
    roots = tuple(r.resolve() for r in roots)
    confined = _confine(field, value, roots)
    if not Path(confined).is_absolute():
        raise ApiError(
            422,
            f"{field}: {value!r} was not found in the data roots",
            [{"field": field, "message": "not found in the data roots"}],
        )
    return confined


# MLflow stores a job may log to besides a local SQLite file: servers and databases the operator's network reaches.
REMOTE_TRACKING = ("http://", "https://", "databricks", "postgresql://", "postgresql+", "mysql://", "mysql+", "mssql")


def confine_tracking_uri(uri: str, roots: tuple[Path, ...]) -> str:
    """A remote MLflow store as it is, or a SQLite store's file confined to the data roots, as an absolute URI.

    A relative SQLite path lies in the first root (the owner's data area). Any other local store could make a job
    write wherever the service may, so it is refused.
    """
    field = "tracking.mlflow.tracking_uri"
    if uri.startswith(REMOTE_TRACKING):
        return uri
    if not uri.startswith("sqlite:///") or "\x00" in uri:
        raise ApiError(
            422,
            f"{field}: {uri!r} is neither a tracking server or database URL nor a SQLite store (sqlite:///PATH)",
            [{"field": field, "message": "unsupported tracking URI"}],
        )
    raw = Path(uri.removeprefix("sqlite:///")).expanduser()
    resolved = (raw if raw.is_absolute() else roots[0] / raw).resolve()
    if not _inside(resolved, roots):
        raise ApiError(
            403,
            f"{field}: {uri!r} resolves outside the data roots ({', '.join(str(r) for r in roots)})",
            [{"field": field, "message": "path outside the data roots"}],
        )
    return f"sqlite:///{resolved}"


def confine_spec(spec: JobSpec, roots: tuple[Path, ...], job_dir_of: Callable[[str], str | None]) -> JobSpec:
    """Rewrite every local path of the spec to its absolute location inside a data root, or refuse the spec.

    `job_dir_of(job_id)` gives the folder of one of the caller's own jobs (for reuse.*), None otherwise.
    """
    roots = tuple(r.resolve() for r in roots)
    data = spec.model_dump(mode="json")
    for field, value in _ref_fields(spec):
        confined = _confine(field, value, roots)
        target = data
        *parents, leaf = field.split(".")
        for part in parents:
            target = target[int(part)] if part.isdigit() else target[part]
        target[leaf] = confined
    if spec.evaluate.prompts not in ("auto", "held_out") and not spec.evaluate.prompts.startswith(MODEL_PREFIXES):
        data["evaluate"]["prompts"] = confine_path("evaluate.prompts", spec.evaluate.prompts, roots)
    for name in ("ensemble", "pairs"):
        value = getattr(spec.reuse, name)
        if value is not None:
            data["reuse"][name] = job_dir_of(value) or confine_path(f"reuse.{name}", value, roots)
    mlflow = spec.tracking.mlflow
    if mlflow is not None and mlflow.tracking_uri is not None:
        data["tracking"]["mlflow"]["tracking_uri"] = confine_tracking_uri(mlflow.tracking_uri, roots)
    return JobSpec.model_validate(data)


def check_cluster(spec: JobSpec, cluster: ClusterResources, driver_memory: int = 0) -> None:
    """409 naming the field when the cluster could never place what the spec asks (the driver's own rule), or
    503 when no node could hold a job's driver (the service's own setting, no field of the spec)."""
    if driver_memory > cluster.max_node_memory:
        raise ApiError(
            503,
            f"each job's driver reserves {driver_memory / 2**30:.2f} GiB of memory (RMDISTILL_DRIVER_MEMORY_BYTES) "
            f"but the largest node of the cluster offers {cluster.max_node_memory / 2**30:.2f} GiB: "
            "no job could start",
        )
    try:
        check_resources(spec, cluster)
    except ResourceError as exc:
        raise ApiError(409, str(exc), [{"field": exc.field, "message": exc.message}]) from None
