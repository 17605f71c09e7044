"""Log-probs in OpenAI's two shapes: completions' parallel lists (tokens, token_logprobs, top_logprobs, text_offset)
and chat's list of token entries with their alternatives, for whole answers and for stream chunks alike."""

from __future__ import annotations

import itertools
from typing import Any

from service.engines import Delta, GenerationResult, Sample
from service.serving_schemas import ChatLogprobs, CompletionLogprobs, TokenLogprob, TopLogprob


def choice_tokens(
    result: GenerationResult, sample: Sample, echo: bool
) -> tuple[str, list[str], list[float | None], list[dict[str, float] | None] | None]:
    """A completion choice's text and per-token lists: the prompt's first when echoed, then the sample's, then the
    end-of-sequence token when one ended it (as vLLM reports it: harnesses count on one entry per token sent and
    generated, `max_tokens` 1 included)."""
    text, pieces = sample.text, list(sample.pieces)
    lps: list[float | None] = list(sample.token_logprobs or [])
    tops = list(sample.top_logprobs) if sample.top_logprobs is not None else None
    if sample.eos_logprob is not None:
        pieces.append("")
        lps.append(sample.eos_logprob)
        if tops is not None:
            tops.append(sample.eos_top_logprobs or {})
    if echo and result.echo is not None:
        text = "".join(result.echo.pieces) + text
        pieces = result.echo.pieces + pieces
        lps = result.echo.token_logprobs + lps
        if tops is not None:
            tops = (result.echo.top_logprobs or [None] * len(result.echo.pieces)) + tops  # type: ignore[operator]
    return text, pieces, lps, tops


def completion_logprobs(
    pieces: list[str], lps: list[float | None], tops: list[dict[str, float] | None] | None, start: int = 0
) -> CompletionLogprobs:
    """``start``: where the first piece begins in the choice's text (a stream chunk continues the text before it)."""
    offsets = list(itertools.accumulate((len(p) for p in pieces[:-1]), initial=start)) if pieces else []
    return CompletionLogprobs(tokens=pieces, token_logprobs=lps, top_logprobs=tops, text_offset=offsets)


def delta_completion_logprobs(delta: Delta, start: int) -> dict[str, Any] | None:
    if delta.token_logprobs is None:
        return None
    return completion_logprobs(delta.tokens, list(delta.token_logprobs), delta.top_logprobs, start).model_dump()


def _entry(piece: str, logprob: float, top: dict[str, float] | None) -> TokenLogprob:
    alternatives = [TopLogprob(token=t, logprob=lp, bytes=list(t.encode())) for t, lp in (top or {}).items()]
    return TokenLogprob(token=piece, logprob=logprob, bytes=list(piece.encode()), top_logprobs=alternatives)


def chat_logprobs(pieces: list[str], lps: list[float], tops: list[dict[str, float]] | None) -> ChatLogprobs:
    return ChatLogprobs(
        content=[_entry(p, lp, tops[k] if tops else None) for k, (p, lp) in enumerate(zip(pieces, lps, strict=True))]
    )


def delta_chat_logprobs(delta: Delta) -> dict[str, Any] | None:
    if delta.token_logprobs is None:
        return None
    return chat_logprobs(delta.tokens, list(delta.token_logprobs), delta.top_logprobs).model_dump()
