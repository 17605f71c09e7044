"""Every supported row format, turned into the normal form ``{prompt, response_a, response_b, label}``.

Each extractor reads one raw record and raises `RowProblem` naming the field as the user wrote it
(``summaries[1].text``), so errors point into the user's file. Prompts come out either as text or as a list of chat
messages; `Renderer` turns both into the exact text the responses follow.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from ray_jobs.data.errors import BAD_RECORD, DatasetError, RowProblem
from ray_jobs.data.validate import Collected, check_distinct, check_label, check_text, collect, require

FORMATS = ("standard", "implicit", "conversational", "unlabeled", "tldr_openai", "tldr_vertex")
ASSISTANT_TURN = "\n\nAssistant:"
_HH_TURN = re.compile(r"\n\n(Human|Assistant):")

Messages = list[dict[str, str]]


@dataclass
class Pair:
    prompt: str | Messages
    response_a: str
    response_b: str
    label: int | None


def detect_format(records: list[tuple[int, Any]]) -> str:
    """The format implied by the columns (the union over the first rows) and, for chosen/rejected, value types."""
    sample = [r for _, r in records[:50] if isinstance(r, dict)]
    columns = set().union(*(r.keys() for r in sample)) if sample else set()
    if {"info", "summaries", "choice"} <= columns:
        return "tldr_openai"
    if {"input_text", "candidate_0", "candidate_1"} <= columns:
        return "tldr_vertex"
    if {"response_a", "response_b"} <= columns:
        return "unlabeled"
    if {"chosen", "rejected"} <= columns:
        chosen = next((r["chosen"] for r in sample if r.get("chosen") is not None), None)
        if isinstance(chosen, list) or isinstance(next((r.get("prompt") for r in sample), None), list):
            return "conversational"
        return "standard" if "prompt" in columns else "implicit"
    raise DatasetError(
        f"cannot tell the data format from the columns {sorted(columns)}; expected prompt/chosen/rejected, "
        "chosen/rejected, prompt/response_a/response_b, info/summaries/choice or input_text/candidate_0/candidate_1"
        " (or set data.format)"
    )


def common_prompt(chosen: str, rejected: str) -> str:
    """The shared prompt of two full transcripts: their common prefix, cut at a turn boundary.

    HH-RLHF transcripts end the prompt at the last shared "\\n\\nAssistant:"; other text is cut after the last
    shared whitespace, so a response never starts mid-word.
    """
    n = 0
    for x, y in zip(chosen, rejected, strict=False):
        if x != y:
            break
        n += 1
    shared = chosen[:n]
    turn = shared.rfind(ASSISTANT_TURN)
    if turn >= 0:
        return shared[: turn + len(ASSISTANT_TURN)]
    if n == min(len(chosen), len(rejected)):
        # One text is a prefix of the other: only a whitespace cut keeps the shorter response non-empty.
        shared = shared[:-1]
    cut = max(shared.rfind(" "), shared.rfind("\n"))
    return shared[: cut + 1] if cut >= 0 else ""


def transcript_messages(prompt: str) -> Messages | None:
    """An HH-style "\\n\\nHuman: … \\n\\nAssistant:" prompt as chat messages (None when it is not one)."""
    parts = _HH_TURN.split(prompt)
    if parts[0].strip() or len(parts) < 3 or parts[-2] != "Assistant" or parts[-1].strip():
        return None
    roles, contents = parts[1:-2:2], parts[2:-2:2]
    if not roles or roles[0] != "Human":
        return None
    return [
        {"role": "user" if r == "Human" else "assistant", "content": c.strip()}
        for r, c in zip(roles, contents, strict=True)
    ]


def _messages(value: Any, where: str) -> Messages:
    if not isinstance(value, list) or not value:
        raise RowProblem(where, BAD_RECORD, "expected a non-empty list of {role, content} messages")
    out = []
    for i, message in enumerate(value):
        if not isinstance(message, dict):
            raise RowProblem(f"{where}[{i}]", BAD_RECORD, "expected a {role, content} message")
        role = check_text(require(message, "role", f"{where}[{i}].role"), f"{where}[{i}].role")
        content = check_text(require(message, "content", f"{where}[{i}].content"), f"{where}[{i}].content")
        out.append({"role": role, "content": content})
    return out


def _reply(messages: Messages, where: str) -> str:
    if len(messages) != 1 or messages[0]["role"] != "assistant":
        roles = [m["role"] for m in messages]
        raise RowProblem(where, BAD_RECORD, f"the response must be one assistant message, got roles {roles}")
    return messages[0]["content"]


def _standard(r: dict[str, Any]) -> Pair:
    prompt = check_text(require(r, "prompt"), "prompt")
    a = check_text(require(r, "chosen"), "chosen")
    b = check_text(require(r, "rejected"), "rejected")
    check_distinct(a, b, "rejected")
    return Pair(prompt, a, b, 1)


def _implicit(r: dict[str, Any]) -> Pair:
    chosen = check_text(require(r, "chosen"), "chosen")
    rejected = check_text(require(r, "rejected"), "rejected")
    check_distinct(chosen, rejected, "rejected")
    prompt = common_prompt(chosen, rejected)
    if not prompt.strip():
        raise RowProblem("chosen", BAD_RECORD, "chosen and rejected share no prompt (no common prefix)")
    where = f"chosen (after the {len(prompt)}-character shared prompt)"
    a = check_text(chosen[len(prompt) :], where)
    b = check_text(rejected[len(prompt) :], where.replace("chosen", "rejected"))
    return Pair(prompt, a, b, 1)


def _conversational(r: dict[str, Any]) -> Pair:
    chosen = _messages(require(r, "chosen"), "chosen") if isinstance(r.get("chosen"), list) else None
    rejected = _messages(require(r, "rejected"), "rejected") if isinstance(r.get("rejected"), list) else None
    if r.get("prompt") is not None:
        prompt = (
            _messages(r["prompt"], "prompt") if isinstance(r["prompt"], list) else check_text(r["prompt"], "prompt")
        )
        a = _reply(chosen, "chosen") if chosen else check_text(require(r, "chosen"), "chosen")
        b = _reply(rejected, "rejected") if rejected else check_text(require(r, "rejected"), "rejected")
    else:
        if chosen is None or rejected is None:
            raise RowProblem("chosen" if chosen is None else "rejected", BAD_RECORD, "expected a list of messages")
        shared = 0
        while shared < min(len(chosen), len(rejected)) - 1 and chosen[shared] == rejected[shared]:
            shared += 1
        if shared == 0:
            raise RowProblem("chosen", BAD_RECORD, "chosen and rejected share no prompt turns")
        prompt = chosen[:shared]
        a, b = _reply(chosen[shared:], "chosen"), _reply(rejected[shared:], "rejected")
    check_distinct(a, b, "rejected")
    return Pair(prompt, a, b, 1)


def _unlabeled(r: dict[str, Any]) -> Pair:
    prompt = check_text(require(r, "prompt"), "prompt")
    a = check_text(require(r, "response_a"), "response_a")
    b = check_text(require(r, "response_b"), "response_b")
    check_distinct(a, b, "response_b")
    return Pair(prompt, a, b, check_label(r.get("label"), "label", allow_null=True))


def tldr_prompt(subreddit: str | None, title: str | None, post: str) -> str:
    """The prompt of OpenAI's summarize-from-feedback models."""
    lines = [f"SUBREDDIT: r/{subreddit}" if subreddit else None, f"TITLE: {title.strip()}" if title else None]
    return "\n".join([line for line in lines if line] + [f"POST: {post.strip()}", "", "TL;DR:"])


def _tldr_openai(r: dict[str, Any]) -> Pair:
    info = require(r, "info")
    if not isinstance(info, dict):
        raise RowProblem("info", BAD_RECORD, "expected an object with post, title, subreddit")
    post = check_text(require(info, "post", "info.post"), "info.post")
    summaries = require(r, "summaries")
    if not isinstance(summaries, list) or len(summaries) != 2 or not all(isinstance(s, dict) for s in summaries):
        raise RowProblem("summaries", BAD_RECORD, "expected a list of two {text, ...} objects")
    a, b = (
        check_text(require(s, "text", f"summaries[{i}].text"), f"summaries[{i}].text") for i, s in enumerate(summaries)
    )
    check_distinct(a, b, "summaries[1].text")
    choice = check_label(require(r, "choice"), "choice", allow_null=False)
    return Pair(tldr_prompt(info.get("subreddit"), info.get("title"), post), a, b, 1 - choice)


def _tldr_vertex(r: dict[str, Any]) -> Pair:
    prompt = check_text(require(r, "input_text"), "input_text")
    a = check_text(require(r, "candidate_0"), "candidate_0")
    b = check_text(require(r, "candidate_1"), "candidate_1")
    check_distinct(a, b, "candidate_1")
    # choice is the index of the preferred candidate; label 1 means response_a (candidate_0) is preferred.
    return Pair(prompt, a, b, 1 - check_label(require(r, "choice"), "choice", allow_null=False))


EXTRACTORS: dict[str, Callable[[dict[str, Any]], Pair]] = {
    "standard": _standard,
    "implicit": _implicit,
    "conversational": _conversational,
    "unlabeled": _unlabeled,
    "tldr_openai": _tldr_openai,
    "tldr_vertex": _tldr_vertex,
}


def extract_pairs(
    records: list[tuple[int, Any]], format: str, *, on_error: Literal["fail", "skip"], source: str
) -> tuple[str, Collected]:
    """The records' format (detected when `format` is auto) and their pairs; bad rows raise one DatasetError naming
    each (fail) or are counted by reason (skip)."""
    if not records:
        raise DatasetError(f"{source}: no rows")
    fmt = detect_format(records) if format == "auto" else format
    if fmt not in FORMATS:
        raise DatasetError(f"unknown data format {fmt!r}; expected auto or one of {', '.join(FORMATS)}")
    return fmt, collect(records, EXTRACTORS[fmt], on_error=on_error, source=source)


class Renderer:
    """Prompt → the exact text the responses follow, through the reference tokenizer's chat template if used.

    `tokenizer` may be a model reference: it is then loaded on first use, so bad data fails before a model loads.
    """

    def __init__(self, tokenizer: Any | None, apply_chat_template: bool = True):
        self._tokenizer = tokenizer
        self.apply_chat_template = apply_chat_template
        self._cache: dict[str, str] = {}

    @property
    def tokenizer(self) -> Any | None:
        if isinstance(self._tokenizer, str | os.PathLike):
            from ray_jobs.models.registry import load_tokenizer

            self._tokenizer = load_tokenizer(self._tokenizer)
        return self._tokenizer

    @property
    def templated(self) -> bool:
        tokenizer = self.tokenizer
        return bool(self.apply_chat_template and tokenizer is not None and getattr(tokenizer, "chat_template", None))

    def __call__(self, prompt: str | Messages) -> str:
        key = prompt if isinstance(prompt, str) else repr(prompt)
        if key not in self._cache:
            self._cache[key] = self._render(prompt)
        return self._cache[key]

    def _render(self, prompt: str | Messages) -> str:
        if isinstance(prompt, str) and not self.apply_chat_template:
            return prompt
        if self.tokenizer is None:
            if not isinstance(prompt, str):
                raise DatasetError("conversational data needs a tokenizer (the job's reference model) to render")
            return prompt
        from ray_jobs.models.prompts import render_prompt

        return render_prompt(self.tokenizer, prompt, apply_chat_template=self.apply_chat_template)

    def pair(self, pair: Pair, fmt: str) -> dict[str, Any]:
        prompt, a, b = pair.prompt, pair.response_a, pair.response_b
        if fmt == "implicit" and self.templated and (messages := transcript_messages(prompt)):
            # A raw HH transcript becomes real chat turns, so the policy sees its own template, not "Human:".
            prompt, a, b = messages, a.lstrip(), b.lstrip()
        return {"prompt": self(prompt), "response_a": a, "response_b": b, "label": pair.label}
