"""The policy card: ``README.md`` in the policy folder, so the folder can be shared as it is.

It says what the policy was trained from and how (reference, loss, data, reward models, training metrics) and how
it did (the evaluation), read from the job folder's own records. The distill stage writes it with the policy; the
evaluate stage writes it again with its results. The front matter is the Hugging Face hub's model-card metadata.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ray_jobs.layout import ADAPTER_DIR, POLICY_CARD_FILE, POLICY_INFO_FILE, JobLayout


def _read(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def _number(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def policy_card(layout: JobLayout, policy: Path) -> str:
    """The card's Markdown for the policy in `policy` (which may still be staging) of the job in `layout`."""
    info = _read(policy / POLICY_INFO_FILE) or {}
    spec = _read(layout.spec) or {}
    data = _read(layout.data_summary)
    manifest = _read(layout.manifest)
    report = _read(layout.report)
    adapter_only = (policy / "adapter_config.json").is_file()
    lines = [
        "---",
        f"base_model: {info.get('reference', spec.get('reference'))}",
        f"library_name: {'peft' if adapter_only else 'transformers'}",
        f"tags: [rmdistill, {info.get('loss')}]",
        "---",
        "",
        f"# {spec.get('name', layout.root.name)} (job {layout.root.name})",
        "",
        f"A policy trained by rmdistill from the reference **{info.get('reference')}** with the loss "
        f"**{info.get('loss')}** (β = {info.get('beta')}, α = {info.get('alpha')}"
        + (f", family {info.get('family')}" if info.get("loss") == "e-dpo" else "")
        + ").",
        "",
        "## Loading",
        "",
        *_loading(policy, adapter_only),
        "",
        "## Data",
        "",
        *_data(spec.get("data", {}), data),
        "",
        "## Reward models",
        "",
        *_rewards(manifest),
        "",
        "## Training",
        "",
        f"{info.get('steps')} optimizer steps, learning rate {info.get('lr')}, batch {info.get('batch_size')} × "
        f"{info.get('gradient_accumulation_steps')} accumulation, {info.get('num_workers')} worker(s), "
        + (f"LoRA rank {info['lora']['r']}." if info.get("lora") else "all weights trained."),
        "",
        *_table({k: v for k, v in (info.get("final_metrics") or {}).items() if not isinstance(v, list)}),
        "",
        "## Evaluation",
        "",
        *_evaluation(report),
        "",
    ]
    return "\n".join(lines)


def _loading(policy: Path, adapter_only: bool) -> list[str]:
    if adapter_only:
        return [
            "This folder is a PEFT (LoRA) adapter over the reference: "
            "`peft.AutoPeftModelForCausalLM.from_pretrained(folder)`.",
        ]
    lines = ["A whole model: `transformers.AutoModelForCausalLM.from_pretrained(folder)`."]
    if (policy / ADAPTER_DIR / "adapter_config.json").is_file():
        lines.append(f"The LoRA adapter alone is in `{ADAPTER_DIR}/` (PEFT format).")
    return lines


def _data(section: dict[str, Any], summary: dict[str, Any] | None) -> list[str]:
    if summary is None:
        return [f"Source {section.get('source')} (no data summary recorded)."]
    lines = [
        f"Source `{summary.get('source')}` ({summary.get('format')}): {summary.get('train')} training and "
        f"{summary.get('test')} held-out pairs, split by prompt."
    ]
    if summary.get("length_bias"):
        lines.append(f"Induced length bias ρ = {section.get('length_bias', {}).get('rho')} on the training split.")
    if summary.get("prompt_budget"):
        budget = summary["prompt_budget"]
        cut = budget["rows_truncated"] or budget["rows_dropped"]
        lines.append(f"Prompt budget {budget['max_tokens']} tokens: {cut} pairs {budget['mode']}d.")
    return lines


def _rewards(manifest: dict[str, Any] | None) -> list[str]:
    if manifest is None:
        return ["None: the loss learns from the preference labels."]
    rows = [
        f"| {m['member']} | {m.get('source', 'trained')} | {m['backbone']} | {_number(m['accuracy'])} |"
        for m in manifest["members"]
    ]
    return [
        f"An ensemble of {manifest['size']}; the ensemble mean ranks "
        f"{_number(manifest['ensemble_mean_accuracy'])} of {manifest['test_pairs']} held-out pairs correctly.",
        "",
        "| member | source | model | held-out accuracy |",
        "|---|---|---|---|",
        *rows,
    ]


def _table(values: dict[str, Any]) -> list[str]:
    if not values:
        return []
    return ["| metric | value |", "|---|---|", *(f"| {k} | {_number(v)} |" for k, v in values.items())]


def _evaluation(report: dict[str, Any] | None) -> list[str]:
    if report is None:
        return ["Not evaluated yet."]
    lines = [f"{report['num_prompts']} prompts ({report['prompts']}), {report['samples_per_prompt']} sample(s) each."]
    if report.get("win_rate"):
        w = report["win_rate"]
        lines.append(
            f"Win rate over the reference by {report['oracle']}: {_number(w['rate'])} "
            f"(95% interval {_number(w['lo'])}–{_number(w['hi'])}, n = {w['n']})."
        )
    lines.append(f"KL(π‖π_ref) estimate: {_number(report['kl']['estimate'])}.")
    lengths = report.get("lengths", {})
    if lengths:
        lines.append(
            f"Mean length in tokens: policy {_number(lengths['policy']['mean_tokens'])}, reference "
            f"{_number(lengths['reference']['mean_tokens'])}."
        )
    return lines


def write_policy_card(layout: JobLayout, policy: Path) -> Path:
    """Write (or rewrite) ``policy/README.md``; atomically, since a published policy may be read meanwhile."""
    target = policy / POLICY_CARD_FILE
    tmp = target.with_suffix(".md.tmp")
    tmp.write_text(policy_card(layout, policy), encoding="utf-8")
    os.replace(tmp, target)
    return target
