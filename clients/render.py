"""How the CLI shows the service's answers in a terminal (rich tables and lines); `--json` bypasses all of this."""

from __future__ import annotations

import datetime as dt
from typing import Any

from rich.console import Group
from rich.table import Table
from rich.text import Text

from ray_jobs.names import STAGES

STATE_STYLES = {"succeeded": "green", "failed": "red", "cancelled": "yellow", "running": "cyan"}


def _num(value: Any, digits: int = 3) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.{digits}f}" if abs(value) >= 10**-digits or value == 0 else f"{value:.2e}"
    return str(value)


def state(value: str) -> Text:
    return Text(value, style=STATE_STYLES.get(value, ""))


def event_line(event: dict[str, Any]) -> str:
    """One event of a job's log as a line: time, stage, what happened."""
    ts = event.get("ts")
    when = dt.datetime.fromtimestamp(ts).strftime("%H:%M:%S") if isinstance(ts, int | float) else "--:--:--"
    kind, stage = event.get("kind", "?"), event.get("stage") or ""
    if kind == "metrics":
        values = ", ".join(
            f"{k}={_num(v, 4)}" for k, v in (event.get("values") or {}).items() if not isinstance(v, list)
        )
        detail = f"step {event.get('step')}: {values}"
    elif kind == "progress":
        detail = f"{event.get('done')}/{event.get('total')}"
    elif kind == "stage_finished":
        detail = f"done in {event.get('seconds', 0):.0f} s" if isinstance(event.get("seconds"), int | float) else "done"
    elif kind == "job_finished":
        detail = str(event.get("status", ""))
    else:
        detail = str(event.get("message") or "")
    return f"{when} {stage:<9} {kind:<15} {detail}".rstrip()


def job_view(job: dict[str, Any]) -> Group:
    """A job's state, each stage with its progress, its latest metrics, and where its policy is."""
    head = Text.assemble((job["id"], "bold"), f"  {job['name']}  ", state(job["state"]))
    stages = Table("stage", "status", "progress", "latest metrics", box=None, pad_edge=False)
    for stage in STAGES:
        status = job["stages"].get(stage)
        progress = job["progress"].get(stage) or {}
        done, total = progress.get("done"), progress.get("total")
        metrics = job["metrics"].get(stage) or {}
        shown = ", ".join(f"{k}={_num(v)}" for k, v in metrics.items() if not isinstance(v, list | dict))
        stages.add_row(stage, status or "—", f"{done}/{total}" if total else "", shown[:100])
    lines: list[Any] = [head, stages]
    if job.get("error"):
        lines.append(Text(f"error: {job['error']}", style="red"))
    if job.get("policy_id"):
        lines.append(Text(f"policy: {job['policy_id']} (rmdistill chat {job['policy_id']} '...')"))
    return Group(*lines)


def jobs_table(items: list[dict[str, Any]]) -> Table:
    table = Table("id", "name", "state", "stage", "created")
    for job in items:
        table.add_row(job["id"], job["name"], state(job["state"]), job["stage"] or "", job["created_at"] or "")
    return table


def report_table(report: dict[str, Any]) -> Table:
    """The evaluation report as a table: the policy against π_ref on the same prompts."""
    n = report.get("num_prompts")
    table = Table("", "policy", "π_ref", title=f"evaluation on {n} prompts × {report.get('samples_per_prompt', 1)}")
    win = report.get("win_rate")
    if win:
        table.add_row(
            f"win rate vs π_ref ({report.get('oracle')})",
            f"{win['rate']:.3f} [{win['lo']:.3f}, {win['hi']:.3f}]",
            f"wins {win['wins']}, ties {win['ties']}, losses {win['losses']}",
        )
    reward = report.get("reward")
    if reward:
        table.add_row("mean oracle reward", _num(reward["policy_mean"]), _num(reward["reference_mean"]))
    kl = report.get("kl") or {}
    table.add_row("KL(π‖π_ref), nats", f"{_num(kl.get('estimate'))} ± {_num(kl.get('stderr'))}", "0")
    lengths = report.get("lengths") or {}
    policy, reference = lengths.get("policy") or {}, lengths.get("reference") or {}
    table.add_row(
        "mean length, tokens (cut at the cap)",
        f"{_num(policy.get('mean_tokens'), 1)} ({policy.get('capped')})",
        f"{_num(reference.get('mean_tokens'), 1)} ({reference.get('capped')})",
    )
    table.add_row("log π − log π_ref on chosen responses", _num(report.get("chosen_logratio")), "0")
    return table


def policies_table(items: list[dict[str, Any]]) -> Table:
    table = Table("id", "job", "base model", "loss", "win rate", "created")
    for policy in items:
        win = ((policy.get("summary") or {}).get("eval") or {}).get("win_rate") or {}
        created = policy["created_at"][:19].replace("T", " ")
        rate = _num(win.get("rate")) if win else "—"
        table.add_row(
            policy["id"], policy["job_id"] or "", policy["base_model"] or "", policy["loss"] or "", rate, created
        )
    return table


def size(n: int | None) -> str:
    if n is None:
        return "(archive)"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)
