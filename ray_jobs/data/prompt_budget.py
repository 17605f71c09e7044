"""The prompt-length budget (``data.max_prompt_tokens``): prompts longer than it, in the reference tokenizer's
tokens, keep their last tokens or are dropped with their pairs, and the report counts both."""

from __future__ import annotations

from typing import Any, Literal


def apply_prompt_budget(
    rows: list[dict[str, Any]], tokenizer: Any, max_tokens: int, mode: Literal["truncate", "drop"]
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Rows whose rendered prompt fits `max_tokens`, and a report {max_tokens, mode, prompts_over, rows_truncated,
    rows_dropped}.

    Truncation cuts the prompt text at the first kept token's character offset, so the kept part is the prompt's
    own text, not a decoded approximation of it. Each distinct prompt is tokenized once.
    """
    cut_of: dict[str, str | None] = {}
    for prompt in dict.fromkeys(r["prompt"] for r in rows):
        encoded = tokenizer(prompt, add_special_tokens=False, return_offsets_mapping=True)
        offsets = encoded["offset_mapping"]
        if len(offsets) > max_tokens:
            cut_of[prompt] = prompt[offsets[-max_tokens][0] :] if mode == "truncate" else None
    kept, truncated, dropped = [], 0, 0
    for row in rows:
        if row["prompt"] not in cut_of:
            kept.append(row)
        elif mode == "drop":
            dropped += 1
        else:
            kept.append({**row, "prompt": cut_of[row["prompt"]]})
            truncated += 1
    report = {
        "max_tokens": max_tokens,
        "mode": mode,
        "prompts_over": len(cut_of),
        "rows_truncated": truncated,
        "rows_dropped": dropped,
    }
    return kept, report
