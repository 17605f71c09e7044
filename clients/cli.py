"""`rmdistill`: run the service, write and check specs, submit and follow jobs, fetch what they made, chat with a
policy.

Client commands talk to --url (env RMDISTILL_URL) with --token (env RMDISTILL_TOKEN); `serve` needs the server
extra and is imported only when it runs, so the client install stays light. `--json` (before the command) prints
the service's answers as JSON for scripts.

Exit codes: 0 success; 1 the service answered with an error, or a followed job (or experiment cell) did not
succeed; 2 invalid input found before anything was sent (a spec that does not validate, a file that cannot be
read or would be overwritten, a bad option); 3 the service could not be reached.
"""

from __future__ import annotations

import contextlib
import enum
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
import httpx
import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TextColumn
from rich.table import Table
from typer.core import TyperGroup

from clients import render
from clients.sdk import Client, RmdistillError
from clients.specs import CASES, example

if TYPE_CHECKING:
    from types import FrameType

    import uvicorn

    from service.settings import Settings

EXIT_FAILED, EXIT_INVALID, EXIT_UNREACHABLE = 1, 2, 3
EXIT_CODES = (
    "Exit codes: 0 success; 1 the service answered with an error, or the job did not succeed; 2 invalid input "
    "(nothing was sent); 3 the service could not be reached."
)
DEFAULT_DOWNLOADS = ("policy", "report", "plot")

console = Console()
errors = Console(stderr=True)


class CliProblem(Exception):
    """Something the user can fix, found by the CLI itself: printed as is, exiting with `code`."""

    def __init__(self, message: str, code: int = EXIT_INVALID):
        super().__init__(message)
        self.code = code


class _Commands(TyperGroup):
    """The one error handler of every command: the service's errors with the fields they name, invalid specs,
    an unreachable service and the CLI's own findings each end in one message and a documented exit code."""

    def invoke(self, ctx: click.Context) -> Any:
        from ray_jobs.spec import SpecError

        try:
            return super().invoke(ctx)
        except RmdistillError as exc:
            errors.print(f"[red]error {exc.status}[/red]: {exc.message}")
            for field in exc.fields:
                errors.print(f"  [bold]{field['field']}[/bold]: {field['message']}")
            raise typer.Exit(EXIT_FAILED) from None
        except SpecError as exc:
            errors.print("[red]invalid spec[/red]:")
            for field in exc.errors:
                errors.print(f"  [bold]{field['field']}[/bold]: {field['message']}")
            raise typer.Exit(EXIT_INVALID) from None
        except httpx.TransportError as exc:
            url = (ctx.obj or {}).get("url")
            errors.print(f"[red]cannot reach the service at {url}[/red]: {exc} (is `rmdistill serve` running?)")
            raise typer.Exit(EXIT_UNREACHABLE) from None
        except CliProblem as exc:
            errors.print(f"[red]error[/red]: {exc}")
            raise typer.Exit(exc.code) from None


app = typer.Typer(
    cls=_Commands,
    help="rmdistill: robust preference optimization through reward-model distillation.",
    epilog=EXIT_CODES,
    no_args_is_help=True,
)


@app.callback()
def main(
    ctx: typer.Context,
    url: str = typer.Option("http://127.0.0.1:8000", envvar="RMDISTILL_URL", help="Service URL."),
    token: str | None = typer.Option(None, envvar="RMDISTILL_TOKEN", help="Bearer token."),
    as_json: bool = typer.Option(False, "--json", help="Print answers as JSON (for scripts)."),
) -> None:
    ctx.obj = {"url": url.rstrip("/"), "token": token, "json": as_json}


def _client(ctx: typer.Context) -> Client:
    """The service client, closed when the command ends."""
    client = Client(ctx.obj["url"], ctx.obj["token"])
    ctx.call_on_close(client.close)
    return client


def _show(ctx: typer.Context, data: Any, view: Callable[[Any], Any] | None = None) -> None:
    """`data` as JSON with --json, else as `view` renders it for the terminal."""
    if ctx.obj["json"] or view is None:
        typer.echo(json.dumps(data, indent=2))
    else:
        console.print(view(data))


@app.command()
def serve(
    host: str = typer.Option(None, envvar="RMDISTILL_HOST", help="Bind address (default 127.0.0.1)."),
    port: int = typer.Option(None, envvar="RMDISTILL_PORT", help="Port (default 8000)."),
    data_dir: Path = typer.Option(None, envvar="RMDISTILL_HOME", help="Data folder (default ~/.rmdistill)."),
    database_url: str = typer.Option(None, envvar="RMDISTILL_DATABASE_URL", help="SQLAlchemy URL."),
    tokens: str = typer.Option(None, envvar="RMDISTILL_TOKENS", help="Comma-separated bearer tokens."),
    ray_address: str = typer.Option(None, envvar="RAY_ADDRESS", help="Existing Ray cluster; none = embedded."),
    artifacts: str = typer.Option(
        None,
        envvar="RMDISTILL_ARTIFACTS",
        help="Artifact root (s3://bucket/prefix, ...) keeping every job's artifacts; credentials from AWS_* variables.",
    ),
    data_root: list[Path] = typer.Option(None, help="Extra folders specs may read data from (repeatable)."),
    insecure: bool = typer.Option(
        None, "--insecure", envvar="RMDISTILL_INSECURE", help="Allow a non-loopback bind without tokens."
    ),
    stop_cluster: bool = typer.Option(
        False,
        "--stop-cluster",
        help="On exit, stop the embedded Ray head and the jobs on it (by default they keep running, and the next "
        "`serve` on this data folder re-attaches to them).",
    ),
) -> None:
    """Start the service (FastAPI on uvicorn). SIGTERM or Ctrl+C stops it in seconds; the embedded Ray head and its
    jobs keep running unless --stop-cluster."""
    import uvicorn

    from service.app import SHUTDOWN_GRACE_S, create_app
    from service.ray_backend import NO_RAY_AUTO_CONNECT, NO_RAY_SIGNAL_HANDLER

    settings = _settings(
        host=host,
        port=port,
        data_dir=data_dir,
        database_url=database_url,
        tokens=[t.strip() for t in tokens.split(",") if t.strip()] if tokens else None,
        ray_address=ray_address,
        artifacts=artifacts,
        data_roots=tuple(data_root) if data_root else None,
        insecure=insecure,
    )
    console.print(f"rmdistill on http://{settings.host}:{settings.port}/ (the dashboard; the API's docs at /docs)")
    if settings.insecure and not settings.auth_enabled:
        console.print(f"[yellow]warning[/yellow]: no tokens: anyone who reaches {settings.host} has full access")
    if settings.ray_address is None:
        from service.ray_backend import prepare_embedded_auth

        prepare_embedded_auth(settings.data_dir)
    # Once the serving driver joins the cluster, Ray's C++ crash handler would take SIGTERM too and abort the
    # process (exit -6, no shutdown). The head does not inherit this.
    os.environ.setdefault(NO_RAY_SIGNAL_HANDLER, "1")
    os.environ.setdefault(NO_RAY_AUTO_CONNECT, "0")
    config = uvicorn.Config(
        create_app(settings, stop_cluster=stop_cluster),
        host=settings.host,
        port=settings.port,
        timeout_graceful_shutdown=SHUTDOWN_GRACE_S,
    )
    _run_until_signalled(uvicorn.Server(config))


def _run_until_signalled(server: uvicorn.Server) -> None:
    """Run uvicorn with its event loop in a worker thread, SIGTERM and SIGINT handled here in the main thread.

    `ray.init` (the serving driver joins the cluster on first use, mid-request) replaces the main thread's SIGTERM
    handler with one that raises SystemExit inside the event loop, which leaves the loop hung instead of shut down.
    Called from another thread it leaves signal handlers alone, so SIGTERM keeps meaning "shut down gracefully".
    """
    received: list[int] = []

    def handle(sig: int, frame: FrameType | None) -> None:
        received.append(sig)
        server.handle_exit(sig, frame)  # a second Ctrl+C forces the exit, as under uvicorn.run

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, handle)
    thread = threading.Thread(target=server.run, name="uvicorn")
    thread.start()
    thread.join()
    if not server.started:
        from uvicorn.main import STARTUP_FAILURE

        raise typer.Exit(STARTUP_FAILURE)
    if received:
        # As uvicorn.run does, end by the signal that asked for the exit, now that the shutdown is done: this also
        # skips the seconds Python's own teardown of torch and Ray takes.
        signal.signal(received[0], signal.SIG_DFL)
        signal.raise_signal(received[0])


@app.command("stop-cluster")
def stop_cluster(
    data_dir: Path = typer.Option(None, envvar="RMDISTILL_HOME", help="Data folder (default ~/.rmdistill)."),
) -> None:
    """Stop the embedded Ray head that `serve` left running on this data folder, and the jobs on it (the next
    `serve` marks them failed)."""
    from service.ray_backend import LocalRayHead

    folder = _settings(data_dir=data_dir).data_dir
    if LocalRayHead(folder).stop_recorded():
        typer.echo(f"stopped the embedded Ray head of {folder}")
    else:
        typer.echo(f"no embedded Ray head was running for {folder}")


def _settings(**overrides: Any) -> Settings:
    """The service settings (environment plus these options), or exit 2 with what is wrong."""
    from pydantic import ValidationError

    from service.settings import Settings

    try:
        return Settings.from_env(**overrides)
    except ValidationError as exc:
        console.print(f"[red]error[/red]: {exc.errors()[0]['msg'].removeprefix('Value error, ')}")
        raise typer.Exit(EXIT_INVALID) from None


# ------------------------------------------------------------------------------------------------------------- specs
Case = enum.StrEnum("Case", {name: name for name in CASES})


@app.command()
def init(
    case: Case = typer.Argument("quickstart", help="; ".join(f"{k}: {v}" for k, v in CASES.items())),
    output: Path | None = typer.Option(None, "--output", "-o", help="Where to write it (default: <case>.yaml)."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing file."),
) -> None:
    """Write a commented job spec for a case, to edit and submit."""
    case = case.value
    target = output or Path(f"{case}.yaml")
    if target.exists() and not force:
        raise CliProblem(f"{target} exists; pass --force to overwrite it")
    target.write_text(example(case).read_text(encoding="utf-8"), encoding="utf-8")
    console.print(f"wrote {target} ({CASES[case]}); check it with `rmdistill validate {target}`")


@app.command()
def validate(
    ctx: typer.Context,
    spec: Path = typer.Argument(..., exists=True, dir_okay=False, help="Job spec (.yaml or .json)."),
) -> None:
    """Check a spec offline with the service's own validation (paths and cluster fit are checked on submission)."""
    from ray_jobs.spec import load_spec

    job = load_spec(spec)
    full = job.model_dump(mode="json")
    _show(ctx, {"valid": True, "spec": full}, lambda _: _describe_spec(spec, full))


def _describe_spec(path: Path, spec: dict[str, Any]) -> str:
    d, e = spec["distill"], spec["ensemble"]
    members = f"{e['size']} × {e['backbone']}" if e["size"] else "no reward models"
    return (
        f"[green]valid[/green]: {path} — job {spec['name']!r}: {spec['reference']} on {spec['data']['source']}, "
        f"{d['loss']} (β {d['beta']}) against {members}"
    )


@app.command()
def schema(
    experiment: bool = typer.Option(False, "--experiment", help="The experiment spec's schema instead."),
) -> None:
    """The JSON schema of a job spec (every field with its description and default), as POST /v1/jobs takes it."""
    if experiment:
        from ray_jobs.experiment.grid import ExperimentSpec as model
    else:
        from ray_jobs.spec import JobSpec as model
    typer.echo(json.dumps(model.model_json_schema(), indent=2))


@app.command("serving-config")
def serving_config() -> None:
    """The Serve config of the serving applications for this environment's RMDISTILL_SERVING_* settings, as a
    RayService's serveConfigV2 or `serve deploy` takes it; an API with the same settings and
    RMDISTILL_SERVING_DEPLOY=false serves through them."""
    import yaml

    from service.policy_app import serve_config
    from service.settings import ServingSettings

    typer.echo(yaml.safe_dump(serve_config(ServingSettings.from_env()), sort_keys=False), nl=False)


# -------------------------------------------------------------------------------------------------------------- jobs
def _follow(client: Client, job_id: str) -> str:
    """Show the job's stages as progress bars until it ends; returns the final state."""
    tasks: dict[str, TaskID] = {}
    with Progress(TextColumn("{task.description:<10}"), BarColumn(), TextColumn("{task.fields[note]}")) as bars:

        def bar(stage: str) -> TaskID:
            if stage not in tasks:
                tasks[stage] = bars.add_task(stage, total=None, note="")
            return tasks[stage]

        for event in client.follow(job_id):
            kind, stage = event.get("kind"), event.get("stage")
            if kind == "stage_started":
                bar(stage)
            elif kind == "progress" and stage:
                bars.update(bar(stage), completed=event.get("done"), total=event.get("total"))
            elif kind == "metrics" and stage:
                values = ", ".join(
                    f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                    for k, v in event["values"].items()
                    if not isinstance(v, list)
                )
                bars.update(bar(stage), note=values[:80])
            elif kind in ("stage_finished", "stage_skipped") and stage:
                task = bar(stage)
                total = bars.tasks[task].total or 1
                bars.update(task, completed=total, total=total, note="skipped" if kind == "stage_skipped" else "done")
            elif kind in ("log", "error"):
                bars.console.print(f"[{'red' if kind == 'error' else 'dim'}]{stage or ''} {event.get('message')}")
    return client.wait(job_id)["state"]


def _dashboard(ctx: typer.Context, job_id: str | None = None) -> str:
    return f"{ctx.obj['url']}/" + (f"#/jobs/{job_id}" if job_id else "")


@app.command()
def submit(
    ctx: typer.Context,
    spec: Path = typer.Argument(..., exists=True, dir_okay=False, help="Job spec (.yaml or .json)."),
    follow: bool = typer.Option(False, "--follow", "-f", help="Show progress until the job ends."),
) -> None:
    """Submit a job spec (exit 1 if, followed, the job does not succeed)."""
    client = _client(ctx)
    job = client.submit(spec)
    if ctx.obj["json"]:
        final = client.wait(job["id"]) if follow else job
        _show(ctx, final)
        state = final["state"]
    else:
        console.print(f"submitted [bold]{job['id']}[/bold] ({job['state']}); watch it at {_dashboard(ctx, job['id'])}")
        if not follow:
            return
        state = _follow(client, job["id"])
        console.print(f"job {job['id']}: [bold]{state}[/bold]")
    if follow and state != "succeeded":
        raise typer.Exit(EXIT_FAILED)


@app.command()
def status(ctx: typer.Context, job_id: str) -> None:
    """A job's state, each stage's progress and latest metrics, and its policy."""
    _show(ctx, _client(ctx).get(job_id), render.job_view)


@app.command()
def jobs(
    ctx: typer.Context,
    state: str | None = typer.Option(None, help="Only jobs in this state."),
    limit: int = typer.Option(20, help="How many."),
) -> None:
    """List jobs, newest first."""
    page = _client(ctx).list(state=state, limit=limit)
    _show(ctx, page, lambda p: render.jobs_table(p["items"]))
    if not ctx.obj["json"]:
        console.print(f"{len(page['items'])} of {page['total']}")


@app.command()
def events(
    ctx: typer.Context,
    job_id: str,
    follow: bool = typer.Option(False, "--follow", "-f", help="Keep printing events as they happen, to the end."),
    offset: int = typer.Option(0, help="Start at this event (0 = the first)."),
) -> None:
    """A job's event log, one line per event (JSON lines with --json)."""
    client = _client(ctx)
    stream = client.follow(job_id, offset) if follow else iter(client.events(job_id, offset=offset)["events"])
    for event in stream:
        typer.echo(json.dumps(event) if ctx.obj["json"] else render.event_line(event))


@app.command()
def report(ctx: typer.Context, job_id: str) -> None:
    """A finished job's evaluation: win rate against π_ref with its interval, rewards, KL, lengths."""
    evaluation = _client(ctx).report(job_id)
    evaluation.pop("samples", None)  # per-sample scores: GET /v1/jobs/{id}/results has them
    _show(ctx, evaluation, render.report_table)


@app.command()
def cancel(ctx: typer.Context, job_id: str) -> None:
    """Stop a job."""
    job = _client(ctx).cancel(job_id)
    _show(ctx, job, lambda j: f"{job_id}: {j['state']}")


@app.command()
def logs(
    ctx: typer.Context, job_id: str, tail: int | None = typer.Option(None, help="Only the last this-many lines.")
) -> None:
    """The Ray job's driver log."""
    typer.echo(_client(ctx).logs(job_id, tail=tail))


# --------------------------------------------------------------------------------------------- artifacts and data
def _wanted(artifacts: list[dict[str, Any]], names: list[str]) -> list[dict[str, Any]]:
    """The artifacts named by path or by kind (policy, report, plot, pairs, ...), in listing order."""
    unknown = [n for n in names if not any(n in (a["path"], a["kind"]) for a in artifacts)]
    if unknown:
        listed = ", ".join(a["path"] for a in artifacts) or "none yet"
        raise CliProblem(f"no artifact {', '.join(map(repr, unknown))}; this job has: {listed}", EXIT_FAILED)
    return [a for a in artifacts if a["path"] in names or a["kind"] in names]


@app.command()
def download(
    ctx: typer.Context,
    job_id: str,
    names: list[str] = typer.Argument(
        None, help="Artifacts by path or kind (policy, report, plot, pairs); default: policy, report and plots."
    ),
    output: Path = typer.Option(Path("."), "--output", "-o", help="Folder to write <job id>/... into."),
    list_only: bool = typer.Option(False, "--list", help="Only list what the job offers."),
) -> None:
    """Download a job's artifacts: the policy (distill.tar.gz, a Hugging Face folder), the report, plots, pairs."""
    client = _client(ctx)
    artifacts = client.artifacts(job_id)
    if list_only:
        table = Table("path", "kind", "size")
        for a in artifacts:
            table.add_row(a["path"], a["kind"], render.size(a["bytes"]))
        _show(ctx, artifacts, lambda _: table)
        return
    saved = []
    for artifact in _wanted(artifacts, names or list(DEFAULT_DOWNLOADS)):
        path = client.download(job_id, artifact["path"], output / job_id / artifact["path"])
        saved.append({"path": artifact["path"], "file": str(path), "bytes": path.stat().st_size})
        if not ctx.obj["json"]:
            console.print(f"{path}  {render.size(path.stat().st_size)}")
    if ctx.obj["json"]:
        _show(ctx, saved)


@app.command()
def upload(
    ctx: typer.Context,
    file: Path = typer.Argument(..., exists=True, dir_okay=False, help="Preference file (.jsonl/.json/.parquet/.csv)."),
    name: str | None = typer.Option(None, help="Name in your data area (default: the file's name)."),
    format: str = typer.Option("auto", help="Row format (auto detects it; see `rmdistill schema`)."),
) -> None:
    """Upload a preference file into your data area; the service checks every row, then specs can name it."""
    dataset = _client(ctx).upload(file, name=name, format=format)
    _show(
        ctx,
        dataset,
        lambda d: (
            f"uploaded {d['name']}: {d['rows']} valid rows ({d['format']}); "
            f"use it as [bold]data.source: {d['source']}[/bold]"
        ),
    )


@app.command()
def datasets(ctx: typer.Context) -> None:
    """Your uploaded datasets."""
    items = _client(ctx).datasets()
    table = Table("data.source", "rows", "format", "size", "uploaded")
    for d in items:
        table.add_row(d["source"], str(d["rows"]), d["format"] or "", render.size(d["bytes"]), d["uploaded_at"][:19])
    _show(ctx, items, lambda _: table)


# ---------------------------------------------------------------------------------------------------------- policies
@app.command()
def policies(ctx: typer.Context) -> None:
    """Registered policies, with the win rate their job measured."""
    _show(ctx, _client(ctx).policies(), render.policies_table)


@app.command()
def chat(
    ctx: typer.Context,
    policy: str,
    message: str,
    max_tokens: int = typer.Option(64, help="Most tokens to generate."),
) -> None:
    """Send one user message to a policy and print its answer."""
    answer = _client(ctx).chat(policy, message, max_tokens=max_tokens)
    _show(ctx, answer, lambda a: a["choices"][0]["message"]["content"])


# -------------------------------------------------------------------------------------------------------------- demo
DEMO_PROMPT = "In one sentence, review a small seaside café."


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/healthz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _start_service(url: str, log: Path, timeout_s: float = 300) -> subprocess.Popen:
    """`rmdistill serve` on the URL's port in a child process (which stops its Ray head on exit), once healthy."""
    port = httpx.URL(url).port or 8000
    log.parent.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "clients.cli", "serve", "--port", str(port), "--stop-cluster"]
    with log.open("ab") as out:
        child = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + timeout_s
    while not _healthy(url):
        if child.poll() is not None or time.monotonic() > deadline:
            child.terminate()
            raise CliProblem(f"the service did not start (see {log})", EXIT_UNREACHABLE)
        time.sleep(1)
    return child


@app.command()
def demo(
    ctx: typer.Context,
    spec: Path | None = typer.Option(None, help="Job spec (default: the quickstart shipped with rmdistill)."),
    wait: bool | None = typer.Option(
        None,
        "--wait/--no-wait",
        help="Keep a service the demo started running for the dashboard until Ctrl+C. Default: only when run from "
        "a terminal, so a script or CI running the demo gets its exit status instead of waiting forever.",
    ),
) -> None:
    """The quickstart end to end: start a local service if none answers at --url, submit, follow, print the
    evaluation and ask the trained policy for a review. The dashboard's address is printed first."""
    url = ctx.obj["url"]
    child = None
    if not _healthy(url):
        if httpx.URL(url).host not in ("127.0.0.1", "localhost"):
            raise CliProblem(f"nothing answers at {url}", EXIT_UNREACHABLE)
        from ray_jobs.layout import home

        log = home() / "demo-service.log"
        console.print(f"starting the service at {url} (log: {log}); the first start takes a minute")
        child = _start_service(url, log)
    try:
        client = _client(ctx)
        job = client.submit(spec or _packaged_quickstart())
        console.print(f"submitted [bold]{job['id']}[/bold]; the dashboard shows it live: {_dashboard(ctx, job['id'])}")
        state = _follow(client, job["id"])
        console.print(f"job {job['id']}: [bold]{state}[/bold]")
        if state != "succeeded":
            errors.print(client.logs(job["id"], tail=40))
            raise typer.Exit(EXIT_FAILED)
        console.print(render.report_table(client.report(job["id"])))
        answer = client.chat(job["id"], DEMO_PROMPT, max_tokens=96, temperature=0.7)
        console.print(f"\n{DEMO_PROMPT}\npolicy {job['id']} says: {answer['choices'][0]['message']['content']}")
        console.print(f"\nthe dashboard: [bold]{_dashboard(ctx)}[/bold] (jobs, curves, plots and a playground)")
        if wait is None:
            wait = sys.stdin.isatty()
        if child is not None and wait:
            console.print("the service keeps running for it; Ctrl+C stops it")
            with contextlib.suppress(KeyboardInterrupt):
                child.wait()
    finally:
        if child is not None and child.poll() is None:
            child.send_signal(signal.SIGTERM)
            child.wait(timeout=120)


def _packaged_quickstart() -> dict[str, Any]:
    import yaml

    return yaml.safe_load(example("quickstart").read_text(encoding="utf-8"))


@app.command()
def experiment(
    ctx: typer.Context,
    spec: Path = typer.Argument(
        ..., exists=True, dir_okay=False, help="Experiment spec (.yaml), e.g. examples/experiment.yaml."
    ),
    quick: bool = typer.Option(False, "--quick", help="Run the spec's quick grid (minutes) instead of the full one."),
    results: Path | None = typer.Option(
        None, help="Folder for the cell files and the table (default: experiments/<name>); re-runs skip done cells."
    ),
    on_service: bool = typer.Option(
        False, "--on-service", help="Let the service run the grid (POST /v1/experiments) and only watch it."
    ),
) -> None:
    """Run a robustness grid (ρ × arm × α × seed), each cell an ordinary job; resumable, ends with the table."""
    from ray_jobs.experiment.grid import load_experiment
    from ray_jobs.experiment.runner import FolderInUse, run_experiment

    plan = load_experiment(spec, quick)
    client = _client(ctx)
    if on_service:
        outcome = _watch_experiment(client, client.submit_experiment(spec, quick)["id"])
    else:
        folder = results or Path("experiments") / plan.name
        try:
            outcome = run_experiment(plan, client, folder, log=lambda line: console.print(f"[dim]{line}"))
        except FolderInUse as exc:
            raise CliProblem(str(exc)) from None
        outcome["table"] = (folder / "table.md").read_text() if (folder / "table.md").exists() else ""
    typer.echo(outcome["table"])
    if outcome["failures"]:
        errors.print(f"[red]failed cells[/red]: {outcome['failures']}")
        raise typer.Exit(EXIT_FAILED)


def _watch_experiment(client: Client, experiment_id: str) -> dict[str, Any]:
    """Poll a service-run experiment until it ends, printing each cell as it finishes."""
    import time

    seen: set[str] = set()
    while True:
        state = client.experiment(experiment_id)
        for cell in state["done"]:
            if cell not in seen:
                seen.add(cell)
                console.print(f"[dim]cell {cell} done ({len(seen)}/{state['cells']})")
        if state["state"] != "running":
            return state
        time.sleep(5.0)


@app.command()
def table(
    folder: Path = typer.Argument(..., exists=True, file_okay=False, help="An experiment's results folder."),
) -> None:
    """Rebuild an experiment's tables from its cell files and print the one pooled over seeds.

    Writes table.md (pooled), table-by-seed.md (one row per cell), summary.json and the plot.
    """
    from ray_jobs.experiment.aggregate import write_summary

    try:
        summary = write_summary(folder)
    except ValueError as exc:
        raise CliProblem(str(exc), EXIT_FAILED) from None
    typer.echo((folder / "table.md").read_text())
    console.print(f"{summary['cells']} cells")


if __name__ == "__main__":  # `python -m clients.cli`, as `rmdistill demo` starts the service
    app()
