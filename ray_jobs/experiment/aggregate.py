"""The table an experiment's finished cells make: win rate per (ρ, arm, α) and the paired difference from DPO.

Each finished grid cell leaves one JSON file in the experiment folder (its evaluation plus the per-sample oracle
scores of policy and reference). This module pools the cells of one (rho, arm, alpha) group over seeds and
reports, with 95% percentile-bootstrap intervals:

- the oracle win rate against π_ref, resampling *prompts* within each seed: the samples of one prompt are
  correlated (same prompt, same reference sample), so they move together, and each seed keeps its own sample
  count, so a seed with a high win rate cannot crowd out one with a low rate in a replicate;
- the difference from the baseline arm (DPO), *paired*: cells of the same (rho, seed) share the reference samples
  and their keys, so the per-sample win difference is taken on the same keys and one set of resampled prompts
  serves both arms. Unpaired intervals add both arms' prompt-to-prompt variance and are far too wide to tell arms
  apart on a few hundred prompts.

Pure numpy; matplotlib is imported only to draw the plot. Nothing here imports torch or Ray, so the service and a
laptop read results without them.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

SUMMARY_FILE = "summary.json"
TABLE_FILE = "table.md"
SEED_TABLE_FILE = "table-by-seed.md"
PLOT_FILE = "win_rate_vs_rho.png"

_CHUNK = 1 << 20  # bootstrap index draws held in memory at once, per stratum


def load_cells(folder: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Every cell result in ``folder``, sorted by cell id.

    Files that are not cell results (this module's own ``summary.json``, anything whose JSON has no ``"cell"`` key)
    are skipped, so the aggregate can be rewritten in the folder it reads. A file that is not valid JSON raises:
    silently dropping a cell would change the table without saying so.
    """
    cells: list[dict[str, Any]] = []
    for path in sorted(Path(folder).glob("*.json")):
        if path.name == SUMMARY_FILE or not path.is_file():
            continue
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"{path}: malformed JSON ({exc})") from exc
        if isinstance(data, dict) and "cell" in data:
            cells.append(data)
    cells.sort(key=lambda c: str(c["cell"]))
    seen: set[str] = set()
    for cell in cells:
        if str(cell["cell"]) in seen:
            raise ValueError(f"{folder}: two files hold cell {cell['cell']!r}; it would be counted twice")
        seen.add(str(cell["cell"]))
    return cells


def prompt_of(key: str) -> str:
    """The prompt part of a sample key ``"<prompt>:<sample>"``: the resampling unit of the bootstrap.

    Everything before the last ``':'``; a key without one is its own prompt.
    """
    return key.rpartition(":")[0] if ":" in key else key


def per_sample_wins(cell: dict[str, Any]) -> np.ndarray:
    """1 where the policy's oracle score beats the reference's on that sample, 0.5 for a tie, else 0.

    The same convention as the evaluate stage's win rate, so the pooled mean equals the cells' reported rates.
    """
    policy, reference, _ = _samples(cell)
    return np.where(policy > reference, 1.0, np.where(policy == reference, 0.5, 0.0))


def stratified_bootstrap(
    strata: Sequence[tuple[np.ndarray, np.ndarray]], n_boot: int, rng: np.random.Generator
) -> np.ndarray:
    """``n_boot`` bootstrap replicates of a pooled mean, resampling clusters with replacement within each stratum.

    Each stratum (a seed) is ``(sums, counts)``: per prompt, the sum of its samples' values and how many samples it
    has. A replicate draws as many prompts as the stratum has, with replacement, in every stratum, and returns the
    total of the drawn sums over the total of the drawn counts: the same ratio as the point estimate, so a prompt's
    samples enter or leave together and no stratum's weight is resampled away.
    """
    if n_boot < 1:
        raise ValueError(f"n_boot must be at least 1, got {n_boot}")
    total = np.zeros(n_boot)
    count = np.zeros(n_boot)
    for sums, counts in strata:
        sums = np.asarray(sums, dtype=float)
        counts = np.asarray(counts, dtype=float)
        n_units = len(sums)
        if n_units == 0:
            continue
        step = max(1, _CHUNK // n_units)
        for start in range(0, n_boot, step):
            stop = min(n_boot, start + step)
            idx = rng.integers(0, n_units, size=(stop - start, n_units))
            total[start:stop] += sums[idx].sum(axis=1)
            count[start:stop] += counts[idx].sum(axis=1)
    if not np.all(count > 0):
        raise ValueError("bootstrap over no samples")
    return total / count


def summarize(
    cells: Iterable[dict[str, Any]], baseline_arm: str = "dpo", n_boot: int = 2000, seed: int = 0
) -> list[dict[str, Any]]:
    """One row per (rho, arm, alpha): pooled win rate, paired difference from the baseline, and the cells' means.

    Seeds are the replicates of a group; their samples are pooled (each sample counts once, so a seed evaluated on
    more prompts weighs more) and the interval resamples prompts within each seed. The baseline cell for a seed is
    the baseline arm's cell of the same rho and seed, whatever its alpha (the one with the lowest alpha if there
    are several, plain DPO when present). Every interval draws from a fresh ``np.random.default_rng(seed)``, so a
    row does not change when other arms are added to the grid and the result is the same on every call.
    """
    groups: dict[tuple[Any, str, Any], dict[Any, dict[str, Any]]] = {}
    baselines: dict[tuple[Any, Any], list[dict[str, Any]]] = {}
    for cell in cells:
        rho, arm, alpha, cell_seed = _params(cell)
        group = groups.setdefault((rho, arm, alpha), {})
        if cell_seed in group:
            raise ValueError(
                f"cells {group[cell_seed]['cell']!r} and {cell['cell']!r} are both rho={rho}, arm={arm}, "
                f"alpha={alpha}, seed={cell_seed}"
            )
        group[cell_seed] = cell
        if arm == baseline_arm:
            baselines.setdefault((rho, cell_seed), []).append(cell)
    baseline_of = {k: min(v, key=lambda c: _sort_value(_params(c)[2])) for k, v in baselines.items()}

    rows = []
    for (rho, arm, alpha), by_seed in groups.items():
        seeds = sorted(by_seed, key=_sort_value)
        members = [by_seed[s] for s in seeds]
        strata = []
        for cell in members:
            _, _, keys = _samples(cell)
            strata.append(_clusters(keys, per_sample_wins(cell)))
        wins = sum(float(s.sum()) for s, _ in strata)
        n = int(sum(c.sum() for _, c in strata))
        win_lo, win_hi = _interval(stratified_bootstrap(strata, n_boot, np.random.default_rng(seed)))

        is_baseline = arm == baseline_arm
        diff = diff_lo = diff_hi = None
        paired_seeds: list[Any] = []
        paired_n = unmatched = 0
        if not is_baseline:
            diff_strata = []
            for s, cell in zip(seeds, members, strict=True):
                base = baseline_of.get((rho, s))
                if base is None:
                    continue
                keys, delta, missing = _paired_differences(cell, base)
                unmatched += missing
                if not keys:
                    continue
                paired_seeds.append(s)
                paired_n += len(keys)
                diff_strata.append(_clusters(keys, delta))
            if diff_strata:
                diff = sum(float(s.sum()) for s, _ in diff_strata) / paired_n
                diff_lo, diff_hi = _interval(stratified_bootstrap(diff_strata, n_boot, np.random.default_rng(seed)))

        row: dict[str, Any] = {
            "rho": rho,
            "arm": arm,
            "alpha": alpha,
            "seeds": seeds,
            "n": n,
            "win_rate": wins / n,
            "win_lo": win_lo,
            "win_hi": win_hi,
            "baseline_arm": baseline_arm,
            "is_baseline": is_baseline,
            "diff_vs_baseline": diff,
            "diff_lo": diff_lo,
            "diff_hi": diff_hi,
            "paired_seeds": None if is_baseline else paired_seeds,
            "paired_n": None if is_baseline else paired_n,
            "unmatched_keys": None if is_baseline else unmatched,
            "mean_tokens": _mean(members, ("lengths", "policy_mean_tokens")),
            "reference_mean_tokens": _mean(members, ("lengths", "reference_mean_tokens")),
            "kl": _mean(members, ("kl", "estimate")),
            "chosen_logratio": _mean(members, ("chosen_logratio",)),
            "train_pairs": _mean(members, ("train", "pairs")),
            "cells": [str(c["cell"]) for c in members],
        }
        row["verdict"] = verdict(row)
        rows.append(row)
    rows.sort(key=_row_order)
    return rows


def summarize_by_seed(
    cells: Iterable[dict[str, Any]], baseline_arm: str = "dpo", n_boot: int = 2000, seed: int = 0
) -> list[dict[str, Any]]:
    """One row per cell: each seed's cells summarised on their own, as :func:`summarize` would with only that seed.

    The pooled table answers whether an effect holds over seeds; this one shows whether it holds on each, which is
    what a write-up quoting one seed's figure needs to point at.
    """
    by_seed: dict[Any, list[dict[str, Any]]] = {}
    for cell in cells:
        by_seed.setdefault(_params(cell)[3], []).append(cell)
    rows = [row for s in by_seed for row in summarize(by_seed[s], baseline_arm=baseline_arm, n_boot=n_boot, seed=seed)]
    rows.sort(key=_row_order)
    return rows


def verdict(row: dict[str, Any]) -> str:
    """What the paired interval says: better or worse than the baseline only when it excludes zero."""
    if row.get("is_baseline"):
        return "baseline"
    lo, hi = row.get("diff_lo"), row.get("diff_hi")
    if lo is None or hi is None:
        return "no baseline"
    if lo > 0:
        return "better than baseline"
    if hi < 0:
        return "worse"
    return "inconclusive"


def render_markdown(rows: Sequence[dict[str, Any]], baseline_arm: str | None = None) -> str:
    """The experiment's table as GitHub markdown, rows by rho, arm, alpha, then seeds, measurements to 3 decimals.

    The Δ column is named after the baseline arm the rows were compared with (``baseline_arm`` overrides it).
    """
    if baseline_arm is None:
        baseline_arm = next((str(r["baseline_arm"]) for r in rows if r.get("baseline_arm")), "dpo")
    header = [
        "rho",
        "arm",
        "alpha",
        "seeds",
        "win rate [95% CI]",
        f"Δ vs {baseline_arm.upper()} [95% CI] (paired)",
        "verdict",
        "mean tokens",
        "KL",
        "log π/π_ref (chosen)",
        "pairs",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in sorted(rows, key=_row_order):
        diff = "—"
        if row.get("diff_vs_baseline") is not None:
            diff = (
                f"{row['diff_vs_baseline']:+.3f} [{row['diff_lo']:+.3f}, {row['diff_hi']:+.3f}]{_partial_pairing(row)}"
            )
        cells = [
            _param(row.get("rho")),
            str(row["arm"]),
            _param(row.get("alpha")),
            ", ".join(str(s) for s in row["seeds"]),
            f"{row['win_rate']:.3f} [{row['win_lo']:.3f}, {row['win_hi']:.3f}]",
            diff,
            verdict(row),
            _number(row.get("mean_tokens")),
            _number(row.get("kl")),
            _number(row.get("chosen_logratio")),
            _count(row.get("train_pairs")),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_win_rate(rows: Sequence[dict[str, Any]], path: str | os.PathLike[str]) -> None:
    """Win rate against rho, one line per (arm, alpha) with its 95% interval: the paper's Figure 2 for this grid.

    Rows without a rho have no place on the x axis and are left out.
    """
    import matplotlib

    matplotlib.use("Agg")  # no display on workers or CI
    import matplotlib.pyplot as plt

    lines: dict[tuple[str, Any], list[dict[str, Any]]] = {}
    for row in sorted(rows, key=_row_order):
        if row.get("rho") is not None:
            lines.setdefault((str(row["arm"]), row.get("alpha")), []).append(row)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for (arm, alpha), series in lines.items():
        x = [float(r["rho"]) for r in series]
        y = np.array([r["win_rate"] for r in series])
        yerr = np.array([y - [r["win_lo"] for r in series], [r["win_hi"] for r in series] - y])
        label = arm if alpha is None else f"{arm} (α={_param(alpha)})"
        ax.errorbar(x, y, yerr=np.clip(yerr, 0, None), marker="o", capsize=3, label=label)
    ax.axhline(0.5, color="grey", linewidth=0.8, linestyle="--")
    ax.set_xlabel("ρ: fraction of training pairs where the longer response is preferred")
    ax.set_ylabel("oracle win rate vs π_ref (95% CI)")
    if lines:
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no rows with a rho", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_summary(
    folder: str | os.PathLike[str], baseline_arm: str = "dpo", n_boot: int = 2000, seed: int = 0
) -> dict[str, Any]:
    """Aggregate the cells in ``folder`` and write summary.json, table.md, table-by-seed.md and win_rate_vs_rho.png.

    summary.json holds the returned object ``{"rows": [...], "cells": <number of cells>}``. Re-running is safe:
    the outputs are not cell results, so they are not read back as input.
    """
    folder = Path(folder)
    cells = load_cells(folder)
    if not cells:
        raise ValueError(f"no cell results in {folder}")
    rows = summarize(cells, baseline_arm=baseline_arm, n_boot=n_boot, seed=seed)
    summary = {"rows": rows, "cells": len(cells)}
    _write_text(folder / SUMMARY_FILE, json.dumps(summary, indent=2) + "\n")
    _write_text(folder / TABLE_FILE, render_markdown(rows, baseline_arm=baseline_arm))
    by_seed = summarize_by_seed(cells, baseline_arm=baseline_arm, n_boot=n_boot, seed=seed)
    _write_text(folder / SEED_TABLE_FILE, render_markdown(by_seed, baseline_arm=baseline_arm))
    plot_win_rate(rows, folder / PLOT_FILE)
    return summary


def _params(cell: dict[str, Any]) -> tuple[Any, str, Any, Any]:
    params = cell.get("params") or {}
    arm = params.get("arm") or params.get("loss")
    if arm is None:
        raise ValueError(f"cell {cell.get('cell')!r}: params name no arm (or loss)")
    return params.get("rho"), str(arm), params.get("alpha"), params.get("seed")


def _samples(cell: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, list[str]]:
    samples = cell.get("samples") or {}
    keys, policy, reference = samples.get("key"), samples.get("policy"), samples.get("reference")
    if keys is None or policy is None or reference is None:
        raise ValueError(f"cell {cell.get('cell')!r}: no per-sample scores (samples.key/policy/reference)")
    if not len(keys) == len(policy) == len(reference):
        raise ValueError(
            f"cell {cell.get('cell')!r}: samples have {len(keys)} keys, {len(policy)} policy and "
            f"{len(reference)} reference scores"
        )
    if not keys:
        raise ValueError(f"cell {cell.get('cell')!r}: no samples")
    keys = [str(k) for k in keys]
    if len(set(keys)) != len(keys):
        raise ValueError(f"cell {cell.get('cell')!r}: duplicate sample keys")
    return np.asarray(policy, dtype=float), np.asarray(reference, dtype=float), keys


def _clusters(keys: Sequence[str], values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per prompt (in first-seen order): the sum of its samples' values and its number of samples."""
    index: dict[str, int] = {}
    inverse = np.array([index.setdefault(prompt_of(k), len(index)) for k in keys], dtype=int)
    sums = np.bincount(inverse, weights=np.asarray(values, dtype=float), minlength=len(index))
    counts = np.bincount(inverse, minlength=len(index)).astype(float)
    return sums, counts


def _paired_differences(cell: dict[str, Any], base: dict[str, Any]) -> tuple[list[str], np.ndarray, int]:
    """Keys both cells scored (in the cell's order), cell minus baseline win on each, and how many keys only one has."""
    _, _, keys = _samples(cell)
    _, _, base_keys = _samples(base)
    wins, base_wins = per_sample_wins(cell), per_sample_wins(base)
    base_index = {k: i for i, k in enumerate(base_keys)}
    common = [i for i, k in enumerate(keys) if k in base_index]
    joined = [keys[i] for i in common]
    delta = wins[common] - base_wins[[base_index[k] for k in joined]]
    return joined, delta, len(keys) + len(base_keys) - 2 * len(joined)


def _interval(replicates: np.ndarray) -> tuple[float, float]:
    lo, hi = np.percentile(replicates, [2.5, 97.5])
    return float(lo), float(hi)


def _mean(cells: Sequence[dict[str, Any]], path: tuple[str, ...]) -> float | None:
    """Mean over the cells that report the value at ``path``; None when none does."""
    values = []
    for cell in cells:
        value: Any = cell
        for part in path:
            value = value.get(part) if isinstance(value, dict) else None
        if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
            values.append(float(value))
    return sum(values) / len(values) if values else None


def _sort_value(value: Any) -> tuple[int, Any]:
    """Sorts numbers by value, then strings, with None last, without comparing across types."""
    if value is None:
        return (2, 0)
    if isinstance(value, int | float):
        return (0, value)
    return (1, str(value))


def _row_order(row: dict[str, Any]) -> tuple[Any, ...]:
    seeds = tuple(_sort_value(s) for s in row["seeds"])
    return (_sort_value(row.get("rho")), str(row["arm"]), _sort_value(row.get("alpha")), seeds)


def _param(value: Any) -> str:
    if value is None:
        return "—"
    return f"{value:g}" if isinstance(value, int | float) else str(value)


def _number(value: float | None) -> str:
    return "—" if value is None else f"{value:.3f}"


def _count(value: float | None) -> str:
    if value is None:
        return "—"
    return str(int(value)) if float(value).is_integer() else f"{value:.3f}"


def _partial_pairing(row: dict[str, Any]) -> str:
    """A note when the difference rests on fewer seeds than the win rate."""
    paired = row.get("paired_seeds") or []
    if len(paired) == len(row["seeds"]):
        return ""
    return f" (seeds {', '.join(str(s) for s in paired)})"


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
