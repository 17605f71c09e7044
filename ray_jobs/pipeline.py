"""The job driver: runs the stages in order on the Ray cluster it finds.

    python -m ray_jobs.pipeline --spec spec.yaml [--job-dir DIR] [--stages data,ensemble]

Re-running on the same folder skips every stage whose folder is complete (stage folders are published
atomically, see artifacts.py), so a crashed or cancelled job resumes where it stopped and a finished one does no
work. `reuse` in the spec starts from an earlier job's artifacts. Exit status: 0 succeeded, 1 failed,
2 bad spec, 143 cancelled (SIGTERM, which is how Ray's job stop ends a job).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ray_jobs import artifacts
from ray_jobs.events import EventLog
from ray_jobs.spec import JobSpec, SpecError, load_spec, parse_spec

StageFn = Callable[[JobSpec, Path, EventLog], dict[str, Any]]


class JobCancelled(Exception):
    pass


class PreflightError(RuntimeError):
    """The cluster can never run this spec: fail now rather than wait on a placement group forever."""


def _stage_functions() -> dict[str, StageFn]:
    # Imported here so `--help` and spec errors answer without loading torch.
    from ray_jobs.data import prepare_data
    from ray_jobs.distill import run_distill
    from ray_jobs.ensemble import run_ensemble
    from ray_jobs.evaluate import run_evaluation
    from ray_jobs.generate import run_generation
    from ray_jobs.score import run_scoring

    return {
        "data": prepare_data,
        "ensemble": run_ensemble,
        "samples": run_generation,
        "pairs": run_scoring,
        "distill": run_distill,
        "evaluate": run_evaluation,
    }


def planned_stages(spec: JobSpec) -> list[str]:
    """The stages this spec needs, in order."""
    stages = ["data"]
    if spec.needs_rewards or spec.reuse.ensemble:
        stages.append("ensemble")
    stages += ["samples", "pairs", "distill"]
    if spec.evaluate.oracle:
        stages.append("evaluate")
    return stages


def resolve_job_ref(ref: str) -> Path:
    """An earlier job, named by its folder or by its id under the store root."""
    path = Path(ref).expanduser()
    if not path.is_dir():
        path = artifacts.home() / "jobs" / ref
    if not (path / "spec.json").is_file():
        raise FileNotFoundError(f"reuse: {ref!r} is neither a job folder nor a job id under {artifacts.home()}/jobs")
    return path


def _complete(job_dir: Path, stage: str) -> bool:
    return artifacts.is_complete(job_dir, artifacts.STAGE_FOLDERS[stage])


def _adopt(source_job: Path, job_dir: Path, stages: list[str], events: EventLog) -> None:
    """Copy finished stage folders of an earlier job (hard links where the filesystem allows)."""
    for stage in stages:
        folder = artifacts.STAGE_FOLDERS[stage]
        src = artifacts.stage_dir(source_job, folder)
        if _complete(job_dir, stage) or not src.is_dir():
            continue
        with artifacts.staging(job_dir, folder) as out:
            shutil.copytree(src, out, dirs_exist_ok=True, copy_function=_link_or_copy)
        events.emit("log", stage, message=f"reused {folder}/ from {source_job}")


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _connect_ray() -> None:
    import ray

    if ray.is_initialized():
        return
    # Inside a Ray job (or with RAY_ADDRESS) attach to that cluster; otherwise start a private local one.
    # A bare ray.init() would instead attach to whatever `ray start` head this machine happens to run.
    address = os.environ.get("RAY_ADDRESS") or "local"
    previous = signal.getsignal(signal.SIGTERM)
    ray.init(address=address, log_to_driver=False, configure_logging=False)
    if previous is _on_sigterm:
        # ray.init swaps in its own SIGTERM handler (sys.exit(1)); a job stop must still read as a cancel.
        signal.signal(signal.SIGTERM, _on_sigterm)


def preflight(spec: JobSpec) -> None:
    import ray

    total = ray.cluster_resources()
    gpus, cpus = total.get("GPU", 0.0), total.get("CPU", 0.0)
    wants_gpu = spec.distill.use_gpu or spec.ensemble.gpus_per_worker > 0
    if wants_gpu and gpus == 0:
        raise PreflightError(
            "the spec asks for GPUs (distill.use_gpu / ensemble.gpus_per_worker) but the cluster has none"
        )
    member_cpus = spec.ensemble.workers_per_member * spec.ensemble.cpus_per_worker
    if spec.needs_rewards and member_cpus > cpus:
        raise PreflightError(
            f"one ensemble member needs {member_cpus:g} CPUs (workers_per_member × cpus_per_worker) "
            f"but the cluster has {cpus:g}"
        )
    if spec.distill.num_workers > max(cpus, 1):
        raise PreflightError(f"distill.num_workers={spec.distill.num_workers} exceeds the cluster's {cpus:g} CPUs")


def _write_spec(spec: JobSpec, job_dir: Path) -> None:
    path = job_dir / "spec.json"
    document = spec.model_dump(mode="json")
    if path.exists():
        # The service writes the submitted document (possibly partial) before starting us: compare meanings.
        if parse_spec(json.loads(path.read_text())) != spec:
            raise SpecError(
                [{"field": "spec", "message": f"{job_dir} already holds a different spec; use a new --job-dir"}]
            )
        return
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(document, indent=2))
    os.replace(tmp, path)


def run_job(
    spec: JobSpec, job_dir: Path, only: list[str] | None = None, stage_fns: dict[str, StageFn] | None = None
) -> dict[str, Any]:
    """Run (or resume) a job; returns {stage: summary}. Raises on failure after logging an error event."""
    job_dir.mkdir(parents=True, exist_ok=True)
    _write_spec(spec, job_dir)
    events = EventLog(job_dir)
    stages = planned_stages(spec)
    if only:
        unknown = sorted(set(only) - set(stages))
        if unknown:
            raise SpecError([{"field": "stages", "message": f"{unknown} not in this job's stages {stages}"}])
        stages = [s for s in stages if s in only]
    events.emit("job_started", None, stages=stages, pid=os.getpid())
    summaries: dict[str, Any] = {}
    current: str | None = None
    try:
        if spec.reuse.pairs:
            _adopt(resolve_job_ref(spec.reuse.pairs), job_dir, ["data", "ensemble", "samples", "pairs"], events)
        if spec.reuse.ensemble:
            _adopt(resolve_job_ref(spec.reuse.ensemble), job_dir, ["ensemble"], events)
        pending = [s for s in stages if not _complete(job_dir, s)]
        for stage in stages:
            if stage not in pending:
                events.emit("stage_skipped", stage, reason="complete")
        if pending:
            _connect_ray()
            preflight(spec)
            fns = stage_fns or _stage_functions()
        for stage in pending:
            current = stage
            events.emit("stage_started", stage)
            start = time.time()
            summary = fns[stage](spec, job_dir, events) or {}
            if not _complete(job_dir, stage):
                raise RuntimeError(f"stage {stage} returned without publishing {artifacts.STAGE_FOLDERS[stage]}/")
            seconds = round(time.time() - start, 2)
            summaries[stage] = summary
            events.emit("stage_finished", stage, seconds=seconds, summary=summary)
        current = None
    except JobCancelled:
        events.emit("job_finished", current, status="cancelled")
        raise
    except BaseException as exc:
        events.emit("error", current, message=str(exc) or type(exc).__name__, error_type=type(exc).__name__)
        events.emit("job_finished", current, status="failed")
        raise
    events.emit("job_finished", None, status="succeeded")
    return summaries


def _on_sigterm(signum: int, frame: Any) -> None:
    raise JobCancelled()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ray_jobs.pipeline", description=__doc__.splitlines()[0])
    parser.add_argument("--spec", required=True, help="job spec (.yaml or .json)")
    parser.add_argument("--job-dir", help="job folder (default: <RMDISTILL_HOME>/jobs/<name>-<time>)")
    parser.add_argument("--stages", help="comma-separated subset of stages to run (default: all)")
    args = parser.parse_args(argv)
    try:
        spec = load_spec(args.spec)
    except (SpecError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    job_dir = Path(args.job_dir or artifacts.home() / "jobs" / f"{spec.name}-{time.strftime('%Y%m%d-%H%M%S')}")
    signal.signal(signal.SIGTERM, _on_sigterm)
    only = [s.strip() for s in args.stages.split(",")] if args.stages else None
    try:
        summaries = run_job(spec, job_dir.resolve(), only)
    except JobCancelled:
        print("cancelled", file=sys.stderr)
        return 143
    except SpecError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    print(json.dumps({"job_dir": str(job_dir), "stages": summaries}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
