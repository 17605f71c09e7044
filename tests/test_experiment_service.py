"""An experiment end to end: the `rmdistill experiment` CLI runs a grid as ordinary jobs of a real service, a second
run resumes (skips every finished cell), and POST /v1/experiments runs the same grid inside the service."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from test_service import TOKEN_A, TOKEN_B, Server, embedded_server, tiny_spec, wait_for

from clients.sdk import RmdistillError

pytestmark = [pytest.mark.slow, pytest.mark.ray, pytest.mark.timeout(1500)]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    running = embedded_server(tmp_path_factory.mktemp("exp-svc"))
    yield running
    running.stop()


def tiny_experiment() -> dict[str, Any]:
    base = tiny_spec("cell")
    base.pop("name")
    # Dataset pairs only (every arm the same pairs), one KL sample per prompt for the alpha > 0 cell.
    base["generation"] = {"engine": "hf", "samples_per_prompt": 0, "max_new_tokens": 6, "kl_samples_per_prompt": 1}
    base["data"]["length_bias"] = {"min_ratio": 1.1}  # the tiny data always prefers the longer response: rho 1
    base["evaluate"].update(samples_per_prompt=2, temperature=1.0, chosen_pairs=4)
    return {
        "name": "tiny-study",
        "base": base,
        "grid": {
            "rho": [1.0],
            "arms": [
                {"name": "dpo", "loss": "dpo"},
                {"name": "e-dpo-min", "loss": "e-dpo", "family": "min", "alpha": [0.1]},
            ],
        },
        "quick": {"grid": {"arms": [{"name": "dpo", "loss": "dpo"}]}},
    }


def run_cli(server: Server, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "RMDISTILL_URL": server.url, "RMDISTILL_TOKEN": TOKEN_A, "COLUMNS": "200"}
    cli = Path(sys.executable).with_name("rmdistill")
    return subprocess.run([str(cli), *args], env=env, capture_output=True, text=True, timeout=1200)


def test_cli_runs_the_grid_as_jobs_and_resumes(server: Server, tmp_path: Path) -> None:
    spec_file = tmp_path / "experiment.yaml"
    spec_file.write_text(yaml.safe_dump(tiny_experiment()))
    results = tmp_path / "results"
    first = run_cli(server, "experiment", str(spec_file), "--results", str(results))
    assert first.returncode == 0, first.stdout + first.stderr
    cells = {p.stem: json.loads(p.read_text()) for p in results.glob("rho*.json")}
    assert sorted(cells) == ["rho1-dpo-a0-s0", "rho1-e-dpo-min-a0.1-s0"]
    dpo, edpo = cells["rho1-dpo-a0-s0"], cells["rho1-e-dpo-min-a0.1-s0"]
    assert dpo["params"] == {"rho": 1.0, "arm": "dpo", "loss": "dpo", "family": None, "alpha": 0.0, "seed": 0}
    # Both cells judged against the very same reference samples, so the table's difference is paired.
    assert dpo["samples"]["key"] == edpo["samples"]["key"] == [f"{i}:{j}" for i in range(4) for j in range(2)]
    assert dpo["samples"]["reference"] == edpo["samples"]["reference"]
    assert dpo["train"]["rho_achieved"] == 1.0 and dpo["train"]["pairs"] == edpo["train"]["pairs"] > 0
    with server.client() as client:
        # The e-dpo cell led its group (rewards and KL samples); the dpo cell reused its data, members and pairs.
        reuse = client.get(dpo["job_id"])["spec"]["reuse"]["pairs"]
        assert reuse == client.get(edpo["job_id"])["job_dir"]
        jobs_before = client.list(limit=100)["total"]
    summary = json.loads((results / "summary.json").read_text())
    rows = {r["arm"]: r for r in summary["rows"]}
    assert rows["dpo"]["verdict"] == "baseline" and rows["e-dpo-min"]["paired_n"] == 8
    wins = [
        (p > r) + 0.5 * (p == r) for p, r in zip(edpo["samples"]["policy"], edpo["samples"]["reference"], strict=True)
    ]
    assert rows["e-dpo-min"]["win_rate"] == pytest.approx(sum(wins) / 8)
    assert "| 1 | e-dpo-min | 0.1 |" in (results / "table.md").read_text()

    again = run_cli(server, "experiment", str(spec_file), "--results", str(results))
    assert again.returncode == 0, again.stdout + again.stderr
    assert "2 cells, 2 already done" in again.stdout
    with server.client() as client:
        assert client.list(limit=100)["total"] == jobs_before  # nothing resubmitted

    # A run resumed after its group's leader finished starts from the leader's job, not from scratch: the dpo cell
    # cannot lead (it takes no KL samples), so without that it would refit and rescore on its own.
    (results / "rho1-dpo-a0-s0.json").unlink()
    third = run_cli(server, "experiment", str(spec_file), "--results", str(results))
    assert third.returncode == 0, third.stdout + third.stderr
    assert f"(reusing {edpo['job_id']})" in third.stdout
    redone = json.loads((results / "rho1-dpo-a0-s0.json").read_text())
    assert redone["job_id"] != dpo["job_id"] and redone["samples"]["reference"] == dpo["samples"]["reference"]
    with server.client() as client:
        assert client.get(redone["job_id"])["spec"]["reuse"]["pairs"] == client.get(edpo["job_id"])["job_dir"]
        assert client.list(limit=100)["total"] == jobs_before + 1


def test_the_service_runs_an_experiment_over_rest(server: Server) -> None:
    with server.client() as client:
        started = client.submit_experiment(tiny_experiment(), quick=True)
        assert started["id"].startswith("tiny-study-quick-") and started["cells"] == 1
        done = wait_for(
            lambda: (s := client.experiment(started["id"]))["state"] != "running" and s, 900, "the experiment"
        )
        assert done["state"] == "finished" and done["done"] == ["rho1-dpo-a0-s0"] and not done["failures"]
        assert [r["arm"] for r in done["rows"]] == ["dpo"] and "| 1 | dpo |" in done["table"]
        cell = client._request("GET", f"/v1/experiments/{started['id']}/cells/rho1-dpo-a0-s0").json()
        assert client.get(cell["job_id"])["state"] == "succeeded"
        # Submitting the same document again resumes it: every cell is done, so no job is submitted.
        jobs = client.list(limit=100)["total"]
        again = client.submit_experiment(tiny_experiment(), quick=True)
        assert again["id"] == started["id"]
        wait_for(lambda: client.experiment(started["id"])["state"] == "finished", 60, "the resumed experiment")
        assert client.list(limit=100)["total"] == jobs
    with server.client(TOKEN_B) as other, pytest.raises(RmdistillError) as err:
        other.experiment(started["id"])
    assert err.value.status == 404
    with server.client() as client, pytest.raises(RmdistillError) as err:
        client.submit_experiment({**tiny_experiment(), "grid": {"rho": [2.0], "arms": []}})
    assert err.value.status == 422 and err.value.fields[0]["field"].startswith("grid.")
