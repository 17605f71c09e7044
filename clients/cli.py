"""`rmdistill`: run the service, submit and follow jobs, chat with a policy.

Client commands talk to --url (env RMDISTILL_URL) with --token (env RMDISTILL_TOKEN); `serve` needs the
server extra and is imported only when it runs, so the client install stays light.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TextColumn
from rich.table import Table

from clients.sdk import Client, RmdistillError

if TYPE_CHECKING:
    from types import FrameType

    import uvicorn

    from service.settings import Settings

app = typer.Typer(help="rmdistill: robust preference optimization through reward-model distillation.")
console = Console()


@app.callback()
def main(
    ctx: typer.Context,
    url: str = typer.Option("http://127.0.0.1:8000", envvar="RMDISTILL_URL", help="Service URL."),
    token: str | None = typer.Option(None, envvar="RMDISTILL_TOKEN", help="Bearer token."),
) -> None:
    ctx.obj = {"url": url, "token": token}


@contextlib.contextmanager
def _client(ctx: typer.Context) -> Iterator[Client]:
    """The service client; an API error anywhere inside is printed with its fields and exits 1."""
    try:
        with Client(ctx.obj["url"], ctx.obj["token"]) as client:
            yield client
    except RmdistillError as exc:
        console.print(f"[red]error {exc.status}[/red]: {exc.message}")
        for field in exc.fields:
            console.print(f"  [bold]{field['field']}[/bold]: {field['message']}")
        raise typer.Exit(1) from None


@app.command()
def serve(
    host: str = typer.Option(None, envvar="RMDISTILL_HOST", help="Bind address (default 127.0.0.1)."),
    port: int = typer.Option(None, envvar="RMDISTILL_PORT", help="Port (default 8000)."),
    data_dir: Path = typer.Option(None, envvar="RMDISTILL_HOME", help="Data folder (default ~/.rmdistill)."),
    database_url: str = typer.Option(None, envvar="RMDISTILL_DATABASE_URL", help="SQLAlchemy URL."),
    tokens: str = typer.Option(None, envvar="RMDISTILL_TOKENS", help="Comma-separated bearer tokens."),
    ray_address: str = typer.Option(None, envvar="RAY_ADDRESS", help="Existing Ray cluster; none = embedded."),
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
    from service.ray_backend import NO_RAY_SIGNAL_HANDLER

    settings = _settings(
        host=host,
        port=port,
        data_dir=data_dir,
        database_url=database_url,
        tokens=[t.strip() for t in tokens.split(",") if t.strip()] if tokens else None,
        ray_address=ray_address,
        data_roots=tuple(data_root) if data_root else None,
        insecure=insecure,
    )
    if settings.insecure and not settings.auth_enabled:
        console.print(f"[yellow]warning[/yellow]: no tokens: anyone who reaches {settings.host} has full access")
    if settings.ray_address is None:
        from service.ray_backend import prepare_embedded_auth

        prepare_embedded_auth(settings.data_dir)
    # Once the serving driver joins the cluster, Ray's C++ crash handler would take SIGTERM too and abort the
    # process (exit -6, no shutdown). The head does not inherit this.
    os.environ.setdefault(NO_RAY_SIGNAL_HANDLER, "1")
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
        raise typer.Exit(2) from None


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
                    f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in event["values"].items()
                )
                bars.update(bar(stage), note=values[:80])
            elif kind in ("stage_finished", "stage_skipped") and stage:
                task = bar(stage)
                total = bars.tasks[task].total or 1
                bars.update(task, completed=total, total=total, note="skipped" if kind == "stage_skipped" else "done")
            elif kind in ("log", "error"):
                bars.console.print(f"[{'red' if kind == 'error' else 'dim'}]{stage or ''} {event.get('message')}")
    return client.wait(job_id)["state"]


@app.command()
def submit(
    ctx: typer.Context,
    spec: Path = typer.Argument(..., exists=True, dir_okay=False, help="Job spec (.yaml or .json)."),
    follow: bool = typer.Option(False, "--follow", "-f", help="Show progress until the job ends."),
) -> None:
    """Submit a job spec."""
    with _client(ctx) as client:
        job = client.submit(spec)
        console.print(f"submitted [bold]{job['id']}[/bold] ({job['state']})")
        if follow:
            state = _follow(client, job["id"])
            console.print(f"job {job['id']}: [bold]{state}[/bold]")
            if state != "succeeded":
                raise typer.Exit(1)


@app.command()
def status(ctx: typer.Context, job_id: str) -> None:
    """A job's state, stage, progress, metrics and artifacts."""
    with _client(ctx) as client:
        job: dict[str, Any] = client.get(job_id)
    job.pop("spec", None)
    console.print_json(json.dumps(job))


@app.command()
def jobs(
    ctx: typer.Context,
    state: str | None = typer.Option(None, help="Only jobs in this state."),
    limit: int = typer.Option(20, help="How many."),
) -> None:
    """List jobs, newest first."""
    with _client(ctx) as client:
        page = client.list(state=state, limit=limit)
    table = Table("id", "name", "state", "stage", "created")
    for job in page["items"]:
        table.add_row(job["id"], job["name"], job["state"], job["stage"] or "", job["created_at"] or "")
    console.print(table)
    console.print(f"{len(page['items'])} of {page['total']}")


@app.command()
def cancel(ctx: typer.Context, job_id: str) -> None:
    """Stop a job."""
    with _client(ctx) as client:
        console.print(f"{job_id}: {client.cancel(job_id)['state']}")


@app.command()
def logs(
    ctx: typer.Context, job_id: str, tail: int | None = typer.Option(None, help="Only the last this-many lines.")
) -> None:
    """The Ray job's driver log."""
    with _client(ctx) as client:
        typer.echo(client.logs(job_id, tail=tail))


@app.command()
def chat(
    ctx: typer.Context,
    policy: str,
    message: str,
    max_tokens: int = typer.Option(64, help="Most tokens to generate."),
) -> None:
    """Send one user message to a policy and print its answer."""
    with _client(ctx) as client:
        answer = client.chat(policy, message, max_tokens=max_tokens)
    typer.echo(answer["choices"][0]["message"]["content"])


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
    from ray_jobs.spec import SpecError

    try:
        plan = load_experiment(spec, quick)
    except SpecError as exc:
        console.print(f"[red]invalid experiment[/red]: {exc}")
        raise typer.Exit(2) from None
    with _client(ctx) as client:
        if on_service:
            outcome = _watch_experiment(client, client.submit_experiment(spec, quick)["id"])
        else:
            folder = results or Path("experiments") / plan.name
            try:
                outcome = run_experiment(plan, client, folder, log=lambda line: console.print(f"[dim]{line}"))
            except FolderInUse as exc:
                console.print(f"[red]error[/red]: {exc}")
                raise typer.Exit(2) from None
            outcome["table"] = (folder / "table.md").read_text() if (folder / "table.md").exists() else ""
    typer.echo(outcome["table"])
    if outcome["failures"]:
        console.print(f"[red]failed cells[/red]: {outcome['failures']}")
        raise typer.Exit(1)


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
    """Rebuild an experiment's table (table.md, summary.json, plot) from its cell files, and print it."""
    from ray_jobs.experiment.aggregate import write_summary

    try:
        summary = write_summary(folder)
    except ValueError as exc:
        console.print(f"[red]error[/red]: {exc}")
        raise typer.Exit(1) from None
    typer.echo((folder / "table.md").read_text())
    console.print(f"{summary['cells']} cells")
