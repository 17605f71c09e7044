"""The job driver: runs the stages in order on the Ray cluster it finds.

    python -m ray_jobs.pipeline --spec spec.yaml [--job-dir DIR] [--stages data,ensemble]

Re-running on the same folder skips every stage whose folder is complete (stage folders are published
atomically, see layout.py), so a crashed or cancelled job resumes where it stopped and a finished one does no
work. `reuse` in the spec starts from an earlier job's artifacts. With an artifact root (``RMDISTILL_ARTIFACTS``,
ray_jobs/artifact_store.py) each stage is uploaded as it is published, with the spec and the event log, and a stage
the job folder lacks but the root holds (a resume on another node, a reused job) is fetched instead of re-run.
The stages that sample π_ref (builtin:reviews' data stage, and generate) run back to back on one set of engines
the driver holds, started when first needed.
Exit status: 0 succeeded, 1 failed, 2 bad spec, 143 cancelled (SIGTERM, which is how Ray's job stop ends a job).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import shutil
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ray_jobs.artifact_store import ArtifactStore, redact
from ray_jobs.events import EventLog
from ray_jobs.layout import JobLayout, jobs_root
from ray_jobs.spec import JobSpec, SpecError, load_spec, parse_spec

StageFn = Callable[..., dict[str, Any]]

# Stages whose `run` takes `engines`: π_ref's sampling engines, which the driver starts once for all of them.
SAMPLING_STAGES = frozenset({"data", "generate"})


class JobCancelled(BaseException):
    """SIGTERM. Not an Exception, like KeyboardInterrupt: code that recovers from errors (engine auto's fallback to
    transformers, retries) must not swallow a cancellation and carry on."""


def stage_function(stage: str) -> StageFn:
    """`ray_jobs.<stage>.stage.run`; imported on demand so `--help` and spec errors answer without torch."""
    return importlib.import_module(f"ray_jobs.{stage}.stage").run


def planned_stages(spec: JobSpec) -> list[str]:
    """The stages this spec needs, in order.

    generate comes straight after data, before the ensemble (neither needs the other's output): the two sampling
    stages then share π_ref's engines, and no engine sits idle holding a CPU or GPU while the ensemble trains."""
    stages = ["data", "generate"]
    if spec.needs_rewards or spec.reuse.ensemble:
        stages.append("ensemble")
    stages += ["score", "distill"]
    if spec.evaluate.oracle:
        stages.append("evaluate")
    return stages


def resolve_job_ref(ref: str, stages: list[str], store: ArtifactStore | None = None) -> Path:
    """An earlier job, named by its folder or by its id under the store root, with `stages` fetched from the
    artifact root into its folder where only the root has them."""
    path = Path(ref).expanduser()
    if not path.is_dir():
        path = jobs_root() / ref
    layout = JobLayout(path)
    if store is not None:
        store.fill(layout, stages)
    if not layout.spec.is_file():
        where = f"under {jobs_root()}" + (f" or in {store}" if store else "")
        raise FileNotFoundError(f"reuse: {ref!r} is neither a job folder nor a job id {where}")
    return path


def _adopt(source_job: Path, job_dir: Path, stages: list[str], events: EventLog) -> None:
    """Copy finished stage folders of an earlier job (hard links where the filesystem allows)."""
    source, target = JobLayout(source_job), JobLayout(job_dir)
    for stage in stages:
        if target.is_complete(stage) or not source.is_complete(stage):
            continue
        with target.staging(stage) as out:
            shutil.copytree(source.stage(stage), out, dirs_exist_ok=True, copy_function=_link_or_copy)
        events.emit("log", stage, message=f"reused {stage}/ from {source_job}")


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _connect_and_check(spec: JobSpec) -> None:
    """Join the cluster, and fail now rather than wait forever on resources it can never give."""
    from ray_jobs.cluster import check_resources, connect, current_resources
    from ray_jobs.tracking import check_trackers

    check_trackers(spec.tracking)
    connect()
    check_resources(spec, current_resources())


def _write_spec(spec: JobSpec, job_dir: Path) -> None:
    path = JobLayout(job_dir).spec
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


def run_job(spec: JobSpec, job_dir: Path, only: list[str] | None = None) -> dict[str, Any]:
    """Run (or resume) a job; returns {stage: summary}. Raises on failure after logging an error event."""
    job_dir.mkdir(parents=True, exist_ok=True)
    _write_spec(spec, job_dir)
    store = ArtifactStore.from_env()
    stages = planned_stages(spec)
    layout = JobLayout(job_dir)
    if store is not None:
        # Before the first event: a job resumed where its folder is gone continues the log the root kept.
        store.fetch_files(layout)
    events = EventLog(job_dir)
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
            from ray_jobs.score.stage import check_reusable

            reused = ["data", "ensemble", "generate", "score"]
            source = resolve_job_ref(spec.reuse.pairs, reused, store)
            check_reusable(spec, JobLayout(source))
            _adopt(source, job_dir, reused, events)
        if spec.reuse.ensemble:
            _adopt(resolve_job_ref(spec.reuse.ensemble, ["ensemble"], store), job_dir, ["ensemble"], events)
        if store is not None:
            # Stages finished in an earlier run on another node come back (those --stages leaves out too: they are
            # the inputs of those it runs); adopted ones go up.
            store.sync(layout, planned_stages(spec))
        pending = [s for s in stages if not layout.is_complete(s)]
        for stage in stages:
            if stage not in pending:
                events.emit("stage_skipped", stage, reason="complete")
        if pending:
            _connect_and_check(spec)
            from ray_jobs.event_relay import start_relay

            events.relay = start_relay(job_dir)
        from ray_jobs.generate.engines import SamplingEngines

        with SamplingEngines(spec.reference, events) as engines:
            for i, stage in enumerate(pending):
                current = stage
                events.emit("stage_started", stage)
                start = time.time()
                extra = {"engines": engines} if stage in SAMPLING_STAGES else {}
                summary = stage_function(stage)(spec, job_dir, events, **extra) or {}
                if not SAMPLING_STAGES.intersection(pending[i + 1 :]):
                    if stage in SAMPLING_STAGES and "evaluate" in pending:
                        # Evaluation's π_ref samples, drawn now on the held engine instead of a new one later.
                        from ray_jobs.evaluate.stage import reference_samples

                        reference_samples(spec, job_dir, events, engines)
                    engines.close()  # the later stages need the CPUs (or GPUs) and memory the engines hold
                if not layout.is_complete(stage):
                    raise RuntimeError(f"stage {stage} returned without publishing {stage}/")
                if store is not None:
                    # A stage is finished only once it is in the root: an upload that fails fails the job.
                    uploaded = store.publish_stage(layout, stage)
                    events.emit("log", stage, message=f"uploaded {stage}/ to {redact(store.uri)}", bytes=uploaded)
                    for earlier in set(layout.published()) - {stage}:
                        store.publish_stage(layout, earlier)  # one it updated in place: evaluate rewrites the card
                seconds = round(time.time() - start, 2)
                summaries[stage] = summary
                events.emit("stage_finished", stage, seconds=seconds, summary=summary)
                if store is not None:
                    store.publish_files(layout)  # the event log so far: progress readable from the root
        current = None
    except JobCancelled:
        events.emit("job_finished", current, status="cancelled")
        _final_upload(store, layout)
        raise
    except BaseException as exc:
        events.emit("error", current, message=str(exc) or type(exc).__name__, error_type=type(exc).__name__)
        events.emit("job_finished", current, status="failed")
        _final_upload(store, layout)
        raise
    events.emit("job_finished", None, status="succeeded")
    _final_upload(store, layout)
    return summaries


def _final_upload(store: ArtifactStore | None, layout: JobLayout) -> None:
    """The event log with its last event. A root unreachable now leaves the outcome as it is (the stages it holds
    are complete or absent either way); the failure goes to the driver's log."""
    if store is None:
        return
    try:
        store.publish_files(layout)
    except Exception as exc:
        print(f"warning: could not upload the event log to {redact(store.uri)}: {exc}", file=sys.stderr)


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
    job_dir = Path(args.job_dir or jobs_root() / f"{spec.name}-{time.strftime('%Y%m%d-%H%M%S')}")
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
