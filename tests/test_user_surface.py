"""The user's surface end to end, on the service a newcomer's `rmdistill demo` starts (uvicorn, SQLite, its own
Ray head, in a child process) and two tiny jobs:

- the demo itself: a job end to end, its evaluation, the policy's answer, the dashboard's address, and Ctrl+C
  stopping the service it started;
- the CLI as a newcomer uses it: init → validate → upload → submit --follow → report → download, with output and
  exit codes checked;
- the dashboard in a real browser (Playwright driving Debian's Chromium, headless) on the job the CLI made, its
  jobs list live.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from typer.testing import CliRunner

from clients.cli import app
from clients.sdk import Client
from service.ray_backend import free_port
from tests.support.data import write_prefs
from tests.test_service import tiny_spec

pytestmark = [pytest.mark.slow, pytest.mark.ray, pytest.mark.timeout(1500)]

TOKEN = "token-dana"
# Screenshots of the dashboard test land here (CI keeps the folder as the test's artifacts).
SCREENSHOTS = Path(os.environ.get("RMDISTILL_TEST_ARTIFACTS", Path(__file__).resolve().parents[1] / "test-artifacts"))
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
# The newcomer's spec made tiny: the test service's tiny models and steps, on the file the newcomer uploads.
TINY = {key: value for key, value in tiny_spec("newcomer", max_steps=3).items() if key != "name"}
TINY["data"] = {**TINY["data"], "source": "my-prefs.jsonl"}


def merge(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in changes.items():
        out[key] = merge(out.get(key) or {}, value) if isinstance(value, dict) else value
    return out


class DemoRun:
    """`rmdistill demo --wait` in a child process, as a newcomer runs it: it starts the service (with its own Ray
    head), runs a job end to end, asks the policy, then keeps the service up for the dashboard until Ctrl+C."""

    def __init__(self, url: str, process: subprocess.Popen, log: Path, home: Path):
        self.url, self.process, self.log, self.home = url, process, log, home

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def interrupt(self) -> int:
        """Ctrl+C: the demo stops the service it started; returns the demo's exit status."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
        return self.process.wait(timeout=180)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DemoRun]:
    home, work = tmp_path_factory.mktemp("surface"), tmp_path_factory.mktemp("demo")
    write_prefs(home / "datasets" / "prefs.jsonl", n=24)
    (work / "demo.yaml").write_text(yaml.safe_dump(tiny_spec("demo", max_steps=2)))
    url = f"http://127.0.0.1:{free_port()}"
    env = {
        **{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"},  # the demo starts a Ray head of its own
        "RMDISTILL_HOME": str(home),
        "RMDISTILL_TOKENS": TOKEN,
        "RMDISTILL_RAY_NUM_CPUS": "2",
        # Policies are served by transformers in a half-CPU actor: no engine start to wait for on 2 cores.
        "RMDISTILL_SERVING_ENGINE": "hf",
        "RMDISTILL_SERVING_NUM_CPUS": "0.5",
        "COLUMNS": "200",
    }
    command = [sys.executable, "-m", "clients.cli", "--url", url, "--token", TOKEN, "demo", "--spec", "demo.yaml"]
    with (work / "demo.log").open("wb") as log:
        process = subprocess.Popen(
            [*command, "--wait"], cwd=work, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
        )
    demo = DemoRun(url, process, work / "demo.log", home)
    try:
        deadline = time.monotonic() + 1200
        while "Ctrl+C stops it" not in demo.output():
            assert process.poll() is None, f"the demo exited with {process.returncode}:\n{demo.output()}"
            assert time.monotonic() < deadline, f"the demo did not finish:\n{demo.output()}"
            time.sleep(1)
        yield demo
    finally:
        demo.interrupt()


def cli(server: DemoRun, *args: str, cwd: Path) -> Any:
    """The real CLI in this process, against the real server; COLUMNS keeps rich from wrapping."""
    runner = CliRunner()
    with pytest.MonkeyPatch.context() as env:
        env.chdir(cwd)
        return runner.invoke(app, ["--url", server.url, "--token", TOKEN, *args], env={"COLUMNS": "200"})


@pytest.fixture(scope="module")
def newcomer(server: DemoRun, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Every step a newcomer takes, in order; each step's result is kept for the tests to check."""
    work = tmp_path_factory.mktemp("newcomer")
    steps: dict[str, Any] = {"work": work}
    steps["init"] = cli(server, "init", "own-data", "-o", "job.yaml", cwd=work)
    written = yaml.safe_load((work / "job.yaml").read_text())
    (work / "tiny.yaml").write_text(yaml.safe_dump(merge(written, TINY)))
    steps["validate"] = cli(server, "validate", "tiny.yaml", cwd=work)
    (work / "bad.yaml").write_text("name: bad\ndistill:\n  beta: -1\n")
    steps["invalid"] = cli(server, "validate", "bad.yaml", cwd=work)
    write_prefs(work / "my-prefs.jsonl", n=24)
    steps["upload"] = cli(server, "upload", "my-prefs.jsonl", cwd=work)
    steps["submit"] = cli(server, "submit", "tiny.yaml", "--follow", cwd=work)
    match = re.search(r"submitted (job-[0-9a-f]+)", steps["submit"].stdout)
    steps["job_id"] = job_id = match.group(1) if match else None
    steps["report"] = cli(server, "report", job_id, cwd=work)
    steps["report_json"] = cli(server, "--json", "report", job_id, cwd=work)
    steps["download"] = cli(server, "download", job_id, "-o", "out", cwd=work)
    return steps


def test_the_demo_runs_a_job_end_to_end_and_asks_its_policy(server):
    text = server.output()
    job_id = re.search(r"submitted (job-[0-9a-f]+)", text).group(1)
    assert f"the dashboard shows it live: {server.url}/#/jobs/{job_id}" in text
    assert f"job {job_id}: succeeded" in text and "evaluation on 4 prompts" in text
    answer = re.search(rf"policy {job_id} says: (.*)", text)
    assert answer and answer.group(1).strip(), text
    assert f"the dashboard: {server.url}/ " in text


def test_init_writes_a_commented_spec_that_validates(newcomer):
    init, validate, invalid = newcomer["init"], newcomer["validate"], newcomer["invalid"]
    assert init.exit_code == 0 and "wrote job.yaml" in init.stdout
    text = (newcomer["work"] / "job.yaml").read_text()
    assert text.startswith("# Your own preference file") and "source: my-prefs.jsonl" in text
    assert validate.exit_code == 0 and "valid" in validate.stdout and "tiny:llama" in validate.stdout
    assert invalid.exit_code == 2 and "distill.beta" in invalid.stderr and "must be > 0" in invalid.stderr
    again = cli_offline("init", "own-data", "-o", str(newcomer["work"] / "job.yaml"))
    assert again.exit_code == 2 and "exists" in again.stderr


def cli_offline(*args: str) -> Any:
    return CliRunner().invoke(app, list(args), env={"COLUMNS": "200"})


def test_upload_then_submit_follows_the_job_to_success(newcomer):
    upload, submit = newcomer["upload"], newcomer["submit"]
    assert upload.exit_code == 0, upload.output
    assert "24 valid rows (standard)" in upload.stdout and "data.source: my-prefs.jsonl" in upload.stdout
    assert submit.exit_code == 0, submit.output
    job_id = newcomer["job_id"]
    assert f"job {job_id}: succeeded" in submit.stdout and f"#/jobs/{job_id}" in submit.stdout


def test_report_prints_the_evaluation_table(newcomer):
    report, as_json = newcomer["report"], newcomer["report_json"]
    assert report.exit_code == 0 and as_json.exit_code == 0
    evaluation = json.loads(as_json.stdout)
    assert "samples" not in evaluation and evaluation["num_prompts"] == 4
    win = evaluation["win_rate"]
    assert win["wins"] + win["ties"] + win["losses"] == win["n"] == 4
    assert "evaluation on 4 prompts" in report.stdout
    assert f"{win['rate']:.3f} [{win['lo']:.3f}, {win['hi']:.3f}]" in report.stdout
    assert "KL(π‖π_ref)" in report.stdout


def test_download_fetches_the_policy_report_and_plots(newcomer):
    download, job_id = newcomer["download"], newcomer["job_id"]
    assert download.exit_code == 0, download.output
    folder = newcomer["work"] / "out" / job_id
    report = json.loads((folder / "evaluate" / "report.json").read_text())
    assert report["win_rate"] == json.loads(newcomer["report_json"].stdout)["win_rate"]
    assert {p.name for p in (folder / "evaluate").glob("*.png")} >= {"training_curves.png", "lengths.png"}
    with tarfile.open(folder / "distill.tar.gz") as tar:
        names = set(tar.getnames())
    assert {f"{job_id}-distill/config.json", f"{job_id}-distill/rmdistill.json"} <= names
    assert not list(folder.rglob(".*.partial"))


def test_events_policies_and_exit_codes(server, newcomer):
    job_id, work = newcomer["job_id"], newcomer["work"]
    events = cli(server, "events", job_id, cwd=work)
    assert events.exit_code == 0 and events.stdout.splitlines()[-1].split()[1:3] == ["job_finished", "succeeded"]
    lines = cli(server, "--json", "events", job_id, cwd=work).stdout.splitlines()
    assert json.loads(lines[0])["kind"] == "job_started" and json.loads(lines[-1])["kind"] == "job_finished"
    assert job_id in cli(server, "policies", cwd=work).stdout
    missing = cli(server, "download", job_id, "nothing.bin", cwd=work)
    assert missing.exit_code == 1 and "no artifact 'nothing.bin'" in missing.stderr
    gone = cli(server, "report", "job-000000000000", cwd=work)
    assert gone.exit_code == 1 and "error 404" in gone.stderr
    unreachable = cli_offline("--url", "http://127.0.0.1:9", "jobs")
    assert unreachable.exit_code == 3 and "cannot reach the service" in unreachable.stderr


# ------------------------------------------------------------------------------------------------------ dashboard
@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Debian's Chromium, headless, driven by Playwright (never Playwright's own browser download)."""
    chromium = shutil.which("chromium")
    if chromium is None:
        message = "no chromium on PATH (Debian's chromium package; make test installs it as root)"
        if os.environ.get("CI"):
            pytest.fail(message)  # CI runs the browser test, never skips it
        pytest.skip(message)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        # Playwright gives the browser a fresh, empty profile of its own.
        launched = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_FLAGS)
        yield launched
        launched.close()


def test_the_dashboard_shows_the_job_its_curves_plots_and_a_streamed_playground(server, newcomer, browser):
    job_id = newcomer["job_id"]
    assert job_id, newcomer["submit"].output
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page = browser.new_page(viewport={"width": 1360, "height": 900})
    problems: list[str] = []
    page.on("pageerror", lambda error: problems.append(str(error)))

    # Signed out, the page asks for the token; with it, the jobs list shows the finished job, every stage done.
    page.goto(f"{server.url}/")
    page.fill("#token", TOKEN)
    page.click("#login-form button")
    row = page.locator(f"tr[data-job={job_id}]")
    row.wait_for(timeout=60_000)
    assert row.locator(".badge").inner_text() == "succeeded"
    assert row.locator(".stage-pill.finished").count() == 6
    page.screenshot(path=str(SCREENSHOTS / "dashboard-jobs.png"))

    # The list is live though every job on it has ended: a job submitted from elsewhere appears, then its
    # cancellation shows, without a reload.
    with Client(server.url, TOKEN) as client:
        other = client.submit({"name": "live", **TINY})["id"]
        page.locator(f"tr[data-job={other}]").wait_for(timeout=30_000)
        client.cancel(other)
    page.wait_for_selector(f"tr[data-job={other}] .badge:text-is('cancelled')", timeout=60_000)

    # The job page: its stage timeline, curves drawn from the distillation's metrics, the ensemble, the plots.
    row.click()
    loss = page.locator("[data-chart='Loss']")
    loss.locator("canvas").first.wait_for(timeout=60_000)
    page.wait_for_function("document.querySelector(\"[data-chart='Loss']\").dataset.points > 0")
    assert int(loss.get_attribute("data-points")) == 3  # distill.max_steps points of one series
    drawn = page.evaluate(
        """() => {
            const canvas = document.querySelector("[data-chart='Loss'] canvas");
            const pixels = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height).data;
            let inked = 0;
            for (let i = 3; i < pixels.length; i += 4) if (pixels[i] > 0) inked++;
            return inked;
        }"""
    )
    assert drawn > 1000, "the loss chart's canvas is blank"
    assert page.locator("[data-chart='Per-member loss (e-DPO)']").get_attribute("data-series") == "2"
    assert page.locator("#members tr").count() == 1 + 2  # header + the two reward models
    plots = page.locator("#plots img")
    plots.first.wait_for(timeout=30_000)
    page.wait_for_function("[...document.querySelectorAll('#plots img')].every(i => i.complete && i.naturalWidth > 0)")
    assert {plots.nth(i).get_attribute("alt") for i in range(plots.count())} >= {
        "evaluate/training_curves.png",
        "evaluate/lengths.png",
        "evaluate/rewards.png",
    }
    assert "win rate vs π_ref" in page.locator("#evaluation").inner_text()
    assert "job_finished" in page.locator("#events").inner_text()
    page.screenshot(path=str(SCREENSHOTS / "dashboard-job.png"), full_page=True)

    # The playground: the policy and π_ref answer the same prompt, each streamed in several chunks.
    page.click("text=open its policy in the playground")
    page.locator("#run").wait_for()
    assert page.locator("#policy").input_value() == job_id
    page.fill("#max-tokens", "12")

    def ask_both() -> None:
        page.evaluate("document.querySelectorAll('.answer').forEach(box => delete box.dataset.done)")
        page.click("#run")
        for pane in ("#answer-policy", "#answer-reference"):
            page.wait_for_selector(f"{pane}[data-done=true]", timeout=600_000)

    ask_both()
    if any(page.get_attribute(pane, "data-chunks") == "0" for pane in ("#answer-policy", "#answer-reference")):
        # Sampled at the playground's 0.7, an untrained tiny model now and then ends its answer at once (seen once
        # in CI, for π_ref), leaving nothing to stream; greedy decoding is no way out, it repeats a newline. A second
        # draw must stream.
        ask_both()
    for pane in ("#answer-policy", "#answer-reference"):
        assert int(page.get_attribute(pane, "data-chunks")) > 1, page.locator(pane).inner_text()
        assert page.locator(f"{pane} .text").inner_text().strip() and "error" not in page.locator(pane).inner_text()
    assert page.locator("#answer-reference h3").inner_text() == "π_ref tiny:llama"
    page.screenshot(path=str(SCREENSHOTS / "dashboard-playground.png"), full_page=True)
    assert problems == []


def test_ctrl_c_stops_the_demo_and_the_service_it_started(server):
    assert server.interrupt() == 0, server.output()
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{server.url}/healthz", timeout=5)
    # The embedded head is the whole cluster: it stops at once instead of draining for other nodes' sake, and the
    # service, once disconnected, starts no Ray instance of its own on the way out.
    assert "Draining" not in (server.home / "ray-head.log").read_text(errors="replace")
    assert "Started a local Ray instance" not in (server.home / "demo-service.log").read_text(errors="replace")
