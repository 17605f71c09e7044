"""The experiment table: pooled win rates, paired differences from DPO, and bootstrap intervals checked by hand."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from ray_jobs.experiment.aggregate import (
    load_cells,
    per_sample_wins,
    render_markdown,
    stratified_bootstrap,
    summarize,
    summarize_by_seed,
    verdict,
    write_summary,
)

# Oracle scores against a reference scored 0 on every sample: -1 loses, 0 ties, 1 wins.
LOSS, TIE, WIN = -1.0, 0.0, 1.0


def make_cell(
    arm: str,
    policy: list[float],
    *,
    rho: float = 0.8,
    seed: int = 1,
    alpha: float = 0.0,
    keys: list[str] | None = None,
    reference: list[float] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """A cell result as the grid writes it; keys default to one sample per prompt, "<i>:0"."""
    keys = keys if keys is not None else [f"{i}:0" for i in range(len(policy))]
    reference = reference if reference is not None else [0.0] * len(policy)
    cell = {
        "cell": f"rho{rho}-{arm}-a{alpha}-s{seed}",
        "experiment": "robustness",
        "params": {"rho": rho, "arm": arm, "loss": arm.split("-min")[0], "alpha": alpha, "seed": seed},
        "job_id": f"job-{arm}-{seed}",
        "commit": "abc",
        "wall_seconds": 1.0,
        "train": {"pairs": 412, "rho_achieved": rho},
        "win_rate": {"rate": float(np.mean(per_sample_wins({"samples": _samples(keys, policy, reference)})))},
        "kl": {"estimate": 0.3, "stderr": 0.05},
        "lengths": {"policy_mean_tokens": 31.0, "reference_mean_tokens": 28.0},
        "chosen_logratio": -0.12,
        "samples": _samples(keys, policy, reference),
    }
    cell.update(extra)
    return cell


def _samples(keys: list[str], policy: list[float], reference: list[float]) -> dict[str, list[Any]]:
    return {"key": list(keys), "policy": list(policy), "reference": list(reference)}


def row_of(rows: list[dict[str, Any]], arm: str, rho: float = 0.8, alpha: float = 0.0) -> dict[str, Any]:
    (row,) = [r for r in rows if r["arm"] == arm and r["rho"] == rho and r["alpha"] == alpha]
    return row


def write_cells(folder: Path, cells: list[dict[str, Any]]) -> None:
    for cell in cells:
        (folder / f"{cell['cell']}.json").write_text(json.dumps(cell))


def test_per_sample_wins_counts_ties_as_half():
    cell = make_cell("dpo", [2.0, 1.0, 3.0, -0.5], reference=[1.0, 1.0, 4.0, -0.5])
    assert per_sample_wins(cell).tolist() == [1.0, 0.5, 0.0, 0.5]


def test_a_constant_per_prompt_gain_gives_an_exact_paired_interval_where_unpaired_ones_are_wide():
    # The baseline loses prompts 0-9 and ties 10-19 (rate 0.25); the arm ties where the baseline loses and wins
    # where it ties (rate 0.75): +0.5 on every prompt. Each arm's own interval is wide (half its prompts are worth
    # 0.5 more than the other half), so an unpaired bootstrap could not exclude much; resampling the same prompts
    # for both arms gives exactly +0.5 in every replicate. The arm lists its keys in reverse: pairing goes by key,
    # not by position (by position the differences would be 1 and 0, and the interval wide).
    base = make_cell("dpo", [LOSS] * 10 + [TIE] * 10)
    keys = [f"{i}:0" for i in range(20)]
    arm = make_cell("e-dpo-min", list(reversed([TIE] * 10 + [WIN] * 10)), alpha=0.01, keys=list(reversed(keys)))
    rows = summarize([base, arm])
    b, a = row_of(rows, "dpo"), row_of(rows, "e-dpo-min", alpha=0.01)

    assert b["win_rate"] == 0.25 and a["win_rate"] == 0.75
    assert a["diff_vs_baseline"] == 0.5
    assert (a["diff_lo"], a["diff_hi"]) == (0.5, 0.5)
    assert a["win_hi"] - a["win_lo"] > 0.15 and b["win_hi"] - b["win_lo"] > 0.15
    assert a["paired_seeds"] == [1] and a["paired_n"] == 20 and a["unmatched_keys"] == 0
    assert verdict(a) == "better than baseline"
    assert b["diff_vs_baseline"] is None and verdict(b) == "baseline"


def test_an_arm_identical_to_the_baseline_differs_by_exactly_zero():
    rng = np.random.default_rng(3)
    policy = rng.normal(size=60).round(1).tolist()  # rounding leaves some ties
    reference = rng.normal(size=60).round(1).tolist()
    base = make_cell("dpo", policy, reference=reference)
    arm = make_cell("p-dpo", policy, reference=reference, alpha=0.1)
    a = row_of(summarize([base, arm]), "p-dpo", alpha=0.1)
    assert a["win_rate"] == row_of(summarize([base, arm]), "dpo")["win_rate"]
    assert (a["diff_vs_baseline"], a["diff_lo"], a["diff_hi"]) == (0.0, 0.0, 0.0)
    assert a["win_hi"] > a["win_lo"]
    assert verdict(a) == "inconclusive"


def test_seeds_are_pooled_by_sample_and_resampled_within_their_own_stratum():
    # Seed 1 wins all of its 30 prompts, seed 2 loses all of its 10. Pooled: 30/40 = 0.75 (not the 0.5 mean of the
    # seed rates). Resampling prompts within each seed keeps 30 wins and 10 losses in every replicate, so the
    # interval is exactly [0.75, 0.75]; resampling the 40 prompts as one pool would not.
    cells = [make_cell("dpo", [WIN] * 30, seed=1), make_cell("dpo", [LOSS] * 10, seed=2)]
    (row,) = summarize(cells)
    assert row["seeds"] == [1, 2] and row["n"] == 40
    assert row["win_rate"] == 0.75
    assert (row["win_lo"], row["win_hi"]) == (0.75, 0.75)
    assert row["cells"] == ["rho0.8-dpo-a0.0-s1", "rho0.8-dpo-a0.0-s2"]


def test_the_samples_of_one_prompt_move_together():
    # 20 prompts of two samples each, one won and one lost: every prompt is worth exactly 0.5, so resampling
    # prompts gives 0.5 in every replicate. Resampling the 40 samples one by one would give an interval ~0.3 wide.
    keys = [f"{p}:{s}" for p in range(20) for s in range(2)]
    (row,) = summarize([make_cell("dpo", [WIN, LOSS] * 20, keys=keys)])
    assert row["n"] == 40 and row["win_rate"] == 0.5
    assert (row["win_lo"], row["win_hi"]) == (0.5, 0.5)


def test_the_bootstrap_distribution_of_a_tiny_example_matches_the_hand_computation():
    # Prompt A: one sample, won. Prompt B: three samples, all lost. Drawing 2 prompts with replacement gives
    # {A, A} -> 2/2 = 1 (p 1/4), {A, B} -> 1/4 (p 1/2), {B, B} -> 0/6 = 0 (p 1/4). A bootstrap of samples, or one
    # that averaged per-prompt rates, would produce other values.
    reps = stratified_bootstrap([(np.array([1.0, 0.0]), np.array([1.0, 3.0]))], 20000, np.random.default_rng(0))
    values, counts = np.unique(reps, return_counts=True)
    assert values.tolist() == [0.0, 0.25, 1.0]
    assert counts / len(reps) == pytest.approx([0.25, 0.5, 0.25], abs=0.015)


def test_pairing_uses_the_shared_keys_and_counts_the_rest():
    # The baseline scored prompts 0-9; the arm scored 0-8 and an extra prompt 10. Differences on the 9 shared
    # keys: the arm wins prompts 0-2 that the baseline lost, and agrees elsewhere: +3/9.
    base = make_cell("dpo", [LOSS] * 3 + [WIN] * 7)
    arm = make_cell("e-dpo-min", [WIN] * 3 + [WIN] * 6 + [LOSS], keys=[f"{i}:0" for i in [*range(9), 10]])
    a = row_of(summarize([base, arm]), "e-dpo-min")
    assert a["paired_n"] == 9 and a["unmatched_keys"] == 2
    assert a["diff_vs_baseline"] == pytest.approx(3 / 9)
    assert a["n"] == 10 and a["win_rate"] == pytest.approx(0.9)  # the win rate still uses all of the arm's samples


def test_seeds_without_a_baseline_are_left_out_of_the_difference_and_recorded():
    cells = [
        make_cell("dpo", [LOSS] * 10, seed=1),
        make_cell("ipo", [WIN] * 10, seed=1),
        make_cell("ipo", [LOSS] * 10, seed=2),  # no DPO cell for seed 2
        make_cell("ipo", [WIN] * 10, rho=0.2),  # no DPO cell at rho 0.2 at all
    ]
    rows = summarize(cells)
    ipo = row_of(rows, "ipo")
    assert ipo["seeds"] == [1, 2] and ipo["win_rate"] == 0.5
    assert ipo["paired_seeds"] == [1] and ipo["diff_vs_baseline"] == 1.0 and (ipo["diff_lo"], ipo["diff_hi"]) == (1, 1)
    lonely = row_of(rows, "ipo", rho=0.2)
    assert lonely["diff_vs_baseline"] is None and lonely["paired_seeds"] == []
    assert verdict(lonely) == "no baseline"
    assert "+1.000 [+1.000, +1.000] (seeds 1)" in render_markdown(rows)


def test_the_baseline_is_matched_by_rho_and_seed_whatever_the_arms_alpha():
    base = make_cell("dpo", [LOSS] * 10, alpha=0.0)
    arms = [make_cell("e-dpo-min", [WIN] * 5 + [LOSS] * 5, alpha=a) for a in (0.01, 0.1)]
    rows = summarize([base, *arms])
    assert [(r["arm"], r["alpha"]) for r in rows] == [("dpo", 0.0), ("e-dpo-min", 0.01), ("e-dpo-min", 0.1)]
    for alpha in (0.01, 0.1):
        assert row_of(rows, "e-dpo-min", alpha=alpha)["diff_vs_baseline"] == 0.5


def test_summaries_are_deterministic_and_a_row_does_not_depend_on_the_other_arms():
    rng = np.random.default_rng(1)
    base = make_cell("dpo", rng.normal(size=50).tolist())
    arm = make_cell("e-dpo-min", rng.normal(size=50).tolist())
    other = make_cell("ipo", rng.normal(size=50).tolist())
    first = summarize([base, arm], n_boot=500, seed=7)
    assert summarize([base, arm], n_boot=500, seed=7) == first
    assert row_of(summarize([base, arm, other], n_boot=500, seed=7), "e-dpo-min") == row_of(first, "e-dpo-min")


def test_verdict_needs_the_paired_interval_to_exclude_zero():
    assert verdict({"diff_lo": 0.01, "diff_hi": 0.2}) == "better than baseline"
    assert verdict({"diff_lo": -0.2, "diff_hi": -0.01}) == "worse"
    assert verdict({"diff_lo": 0.0, "diff_hi": 0.2}) == "inconclusive"
    assert verdict({"diff_lo": -0.1, "diff_hi": 0.1}) == "inconclusive"
    assert verdict({"is_baseline": True, "diff_lo": None, "diff_hi": None}) == "baseline"


def test_load_cells_skips_what_is_not_a_cell_and_names_a_malformed_file(tmp_path):
    write_cells(tmp_path, [make_cell("ipo", [WIN]), make_cell("dpo", [LOSS])])
    (tmp_path / "summary.json").write_text(json.dumps({"rows": [], "cells": 2}))
    (tmp_path / "notes.json").write_text(json.dumps({"comment": "not a cell"}))
    (tmp_path / "table.md").write_text("| rho |\n")
    (tmp_path / "win_rate_vs_rho.png").write_bytes(b"\x89PNG")
    assert [c["cell"] for c in load_cells(tmp_path)] == ["rho0.8-dpo-a0.0-s1", "rho0.8-ipo-a0.0-s1"]

    (tmp_path / "broken.json").write_text('{"cell": "x", ')
    with pytest.raises(ValueError, match="broken.json"):
        load_cells(tmp_path)


def test_write_summary_writes_the_table_the_json_and_the_plot(tmp_path):
    base = make_cell("dpo", [LOSS] * 10 + [TIE] * 10)
    arm = make_cell("e-dpo-min", [TIE] * 10 + [WIN] * 10, alpha=0.01, chosen_logratio=-0.25)
    low = make_cell("dpo", [WIN] * 4, rho=0.2)
    write_cells(tmp_path, [base, arm, low])

    result = write_summary(tmp_path)
    assert result["cells"] == 3
    assert [(r["rho"], r["arm"]) for r in result["rows"]] == [(0.2, "dpo"), (0.8, "dpo"), (0.8, "e-dpo-min")]
    assert json.loads((tmp_path / "summary.json").read_text()) == result
    assert (tmp_path / "win_rate_vs_rho.png").read_bytes()[:4] == b"\x89PNG"

    table = (tmp_path / "table.md").read_text().splitlines()
    assert table[0] == (
        "| rho | arm | alpha | seeds | win rate [95% CI] | Δ vs DPO [95% CI] (paired) | verdict | mean tokens | KL "
        "| log π/π_ref (chosen) | pairs |"
    )
    assert table[2] == "| 0.2 | dpo | 0 | 1 | 1.000 [1.000, 1.000] | — | baseline | 31.000 | 0.300 | -0.120 | 412 |"
    # The arm's own interval is a bootstrap percentile: half its 20 prompts are worth 0.5, half 1, so it is close
    # to the normal 0.75 ± 1.96 · 0.25/√20 = [0.640, 0.860].
    match = re.fullmatch(
        r"\| 0\.8 \| e-dpo-min \| 0\.01 \| 1 \| 0\.750 \[(0\.\d{3}), (0\.\d{3})\] \| \+0\.500 \[\+0\.500, \+0\.500\] "
        r"\| better than baseline \| 31\.000 \| 0\.300 \| -0\.250 \| 412 \|",
        table[4],
    )
    assert match, table[4]
    assert [float(v) for v in match.groups()] == pytest.approx([0.640, 0.860], abs=0.03)

    # The outputs are not read back as cells: a second run sees the same three cells.
    assert write_summary(tmp_path)["cells"] == 3


def test_the_by_seed_table_gives_each_seed_its_own_row_and_difference(tmp_path):
    # Seed 1: the arm wins every sample DPO loses (+1 each); seed 2: both tie everywhere (0 each). Pooled, +0.5.
    cells = [
        make_cell("dpo", [LOSS] * 8, seed=1),
        make_cell("e-dpo-min", [WIN] * 8, seed=1),
        make_cell("dpo", [TIE] * 8, seed=2),
        make_cell("e-dpo-min", [TIE] * 8, seed=2),
    ]
    assert row_of(summarize(cells), "e-dpo-min")["diff_vs_baseline"] == pytest.approx(0.5)
    rows = summarize_by_seed(cells)
    assert [(r["arm"], r["seeds"], r["diff_vs_baseline"], r["diff_lo"], r["diff_hi"]) for r in rows] == [
        ("dpo", [1], None, None, None),
        ("dpo", [2], None, None, None),
        ("e-dpo-min", [1], 1.0, 1.0, 1.0),
        ("e-dpo-min", [2], 0.0, 0.0, 0.0),
    ]
    # Each seed's rows are exactly what that seed alone gives.
    assert rows[1] == summarize(cells[2:])[0] and rows[3] == summarize(cells[2:])[1]

    write_cells(tmp_path, cells)
    write_summary(tmp_path)
    table = (tmp_path / "table-by-seed.md").read_text().splitlines()
    assert len(table) == 2 + 4
    assert table[4] == (
        "| 0.8 | e-dpo-min | 0 | 1 | 1.000 [1.000, 1.000] | +1.000 [+1.000, +1.000] | better than baseline "
        "| 31.000 | 0.300 | -0.120 | 412 |"
    )
    assert table[5].startswith("| 0.8 | e-dpo-min | 0 | 2 | 0.500 [0.500, 0.500] | +0.000 [+0.000, +0.000] |")
    # The pooled table still has one row per arm.
    assert len((tmp_path / "table.md").read_text().splitlines()) == 2 + 2


def test_write_summary_refuses_a_folder_without_cells(tmp_path):
    (tmp_path / "summary.json").write_text("{}")
    with pytest.raises(ValueError, match=f"no cell results in {tmp_path}"):
        write_summary(tmp_path)
