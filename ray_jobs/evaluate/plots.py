"""PNG plots for the evaluation report: training curves from the event log, reward and length distributions."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ray_jobs.events import read_events

CURVES = (
    ("loss", "loss"),
    ("beta_h_mean", "mean β·h"),
    ("logp_shift_chosen", "log π − log π_ref (chosen)"),
    ("logp_shift_rejected", "log π − log π_ref (rejected)"),
    ("logp_shift_a", "log π − log π_ref (a, unlabelled)"),
    ("logp_shift_b", "log π − log π_ref (b, unlabelled)"),
    ("forward_kl", "forward KL(π_ref‖π)"),
)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display on workers or CI
    import matplotlib.pyplot as plt

    return plt


def training_series(job_dir: Path) -> dict[str, tuple[list[int], list[float]]]:
    """Each distill metric's (steps, values) from events.jsonl; a retried step keeps its latest value."""
    by_key: dict[str, dict[int, float]] = {}
    for event in read_events(job_dir):
        if event.get("kind") != "metrics" or event.get("stage") != "distill":
            continue
        for key, _ in CURVES:
            value = event["values"].get(key)
            if isinstance(value, int | float):
                by_key.setdefault(key, {})[int(event["step"])] = float(value)
    return {k: (sorted(v), [v[s] for s in sorted(v)]) for k, v in by_key.items()}


def _curves(path: Path, series: dict[str, tuple[list[int], list[float]]]) -> None:
    plt = _pyplot()
    shown = [(k, title) for k, title in CURVES if k in series]
    fig, axes = plt.subplots(len(shown) or 1, 1, figsize=(7, 2.2 * max(len(shown), 1)), squeeze=False)
    for ax, (key, title) in zip(axes[:, 0], shown, strict=False):
        steps, values = series[key]
        ax.plot(steps, values, marker="." if len(steps) < 30 else None)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
    if not shown:
        axes[0, 0].text(0.5, 0.5, "no training metrics in events.jsonl", ha="center", va="center")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _histogram(path: Path, policy: list[float], reference: list[float], xlabel: str) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.hist([policy, reference], bins=20, label=["policy", "reference"], alpha=0.8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("responses")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def write_plots(out: Path, job_dir: Path, scores: dict[str, list[float]], lengths: dict[str, Any]) -> list[str]:
    """Write the PNGs into `out`; returns their file names."""
    names = ["training_curves.png", "lengths.png"]
    _curves(out / names[0], training_series(job_dir))
    _histogram(out / names[1], lengths["policy"]["tokens"], lengths["reference"]["tokens"], "response length (tokens)")
    if scores:
        names.append("rewards.png")
        _histogram(out / names[2], scores["policy"], scores["reference"], "oracle reward")
    return names
