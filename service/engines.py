"""A served policy, whichever engine generates for it: the request and result types, the folder a policy loads
from (a LoRA adapter merged into its base), and what every engine shares once it has produced token ids: text
deltas that never run past a stop string, log-probs, the finished samples.

The engines (`service/hf_engine.py`, `service/vllm_engine.py`) only turn a prompt's token ids into a stream of
`Token`s and `SampleEnd`s; `ServedPolicy` does the rest. The Ray Serve deployments (`service/policy_app.py`) hold
one `ServedPolicy` per loaded policy.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol


class EngineRequestError(ValueError):
    """The request cannot be served by this policy (prompt too long, no chat template...): a client error."""


class EngineUnavailableError(RuntimeError):
    """The policy's engine could not be loaded or died twice in a row: a server-side error."""


class VLLMRefusedError(EngineUnavailableError):
    """vLLM cannot load this policy (missing, or a model its build rejects): engine auto serves it with transformers."""


@dataclass(frozen=True)
class LoraAdapter:
    """A policy kept as a LoRA adapter, applied per request on its base model's engine (vLLM's multi-LoRA)."""

    name: str
    path: str


@dataclass
class SamplingRequest:
    """One client request; ``prompt`` is sent as is, ``messages`` go through the policy's chat template."""

    prompt: str | None = None
    # Token ids sent as the prompt, used as they are (OpenAI's token-array prompts; evaluation harnesses send them).
    prompt_ids: list[int] | None = None
    messages: list[dict[str, Any]] | None = None
    n: int = 1
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    # None: no log-probs; k >= 0: each generated token's log-prob and its k most likely alternatives.
    logprobs: int | None = None
    seed: int | None = None
    # Also return the prompt's tokens with their log-probs (OpenAI's completions `echo`).
    echo: bool = False
    # The adapter to apply, when the policy is one served on its base model's engine.
    lora: LoraAdapter | None = None


@dataclass
class Token:
    """One generated token of sample ``index``: its log-prob (unwarped: temperature and top-p not applied) and the
    most likely alternatives at its position, when the request asked for them."""

    index: int
    token_id: int
    logprob: float | None = None
    top: dict[int, float] | None = None


@dataclass
class SampleEnd:
    """Sample ``index`` is complete; ``eos``: the model ended it (else the token cap did), with ``token`` the end
    token and its log-probs when the request asked for them."""

    index: int
    eos: bool
    token: Token | None = None


@dataclass
class Sample:
    text: str
    # One text piece per token: "".join(pieces) == text.
    pieces: list[str]
    token_ids: list[int]
    token_logprobs: list[float] | None
    # Per token, the most likely alternatives (piece -> log-prob); only when the request asked for k > 0.
    top_logprobs: list[dict[str, float]] | None
    finish_reason: str  # "stop" (EOS or a stop string) or "length"
    # The end-of-sequence token's log-prob and alternatives, when it ended the sample and log-probs were asked.
    eos_logprob: float | None = None
    eos_top_logprobs: dict[str, float] | None = None


@dataclass
class PromptEcho:
    """The prompt as tokens, for `echo`: the first token has no log-prob (nothing precedes it)."""

    pieces: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None] | None


@dataclass
class GenerationResult:
    prompt: str
    prompt_tokens: int
    samples: list[Sample]
    engine: str
    echo: PromptEcho | None = None

    @property
    def completion_tokens(self) -> int:
        return sum(len(s.token_ids) for s in self.samples)


@dataclass
class Delta:
    """New text of sample ``index`` while it generates, with the tokens that arrived since the last delta (their
    text may lag them by what could still become a stop string)."""

    index: int
    text: str
    tokens: list[str]
    token_logprobs: list[float] | None = None
    top_logprobs: list[dict[str, float]] | None = None


class Engine(Protocol):
    """What `ServedPolicy` needs of an engine."""

    name: str
    tokenizer: Any
    max_model_len: int

    def tokens(self, ids: list[int], req: SamplingRequest) -> AsyncIterator[Token | SampleEnd]:
        """The request's tokens as they are generated, every sample ending with a SampleEnd (EOS not included)."""
        ...

    async def prompt_logprobs(
        self, ids: list[int], top: int, lora: LoraAdapter | None
    ) -> list[tuple[float, dict[int, float]] | None]:
        """Per prompt token, its log-prob given the tokens before it and the ``top`` most likely there."""
        ...

    def close(self) -> None: ...


# --------------------------------------------------------------------------------------------------- model folders
def materialise(path: str) -> Path:
    """A plain HF folder for ``path``: itself, or a PEFT adapter merged into its base (cached by content)."""
    from ray_jobs.models.registry import resolve_model_path

    return Path(resolve_model_path(path))


def adapter_base(path: str | Path) -> str | None:
    """The base model a LoRA adapter folder applies to (its rmdistill.json, else its adapter_config.json), or None
    when the folder is not an adapter."""
    from ray_jobs.models.registry import ADAPTER_CONFIG
    from ray_jobs.models.registry import adapter_base as base_of

    folder = Path(path)
    return base_of(folder) if (folder / ADAPTER_CONFIG).is_file() else None


# -------------------------------------------------------------------------------------------------------- decoding
def eos_ids(tokenizer: Any, generation_config: Any = None) -> set[int]:
    """Every id that ends a sample: the generation config's (one or a list) and the tokenizer's."""
    found = getattr(generation_config, "eos_token_id", None)
    ids = set(found if isinstance(found, list) else [found] if found is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


def incremental_pieces(tokenizer: Any, token_ids: list[int]) -> list[str]:
    """Split the decoded text into one piece per token, holding back pieces that end inside a UTF-8 character."""
    pieces, emitted = [], ""
    for k in range(1, len(token_ids) + 1):
        text = tokenizer.decode(token_ids[:k], skip_special_tokens=True)
        if text.endswith("\ufffd") and k < len(token_ids):
            pieces.append("")
            continue
        pieces.append(text[len(emitted) :] if text.startswith(emitted) else "")
        emitted = text if text.startswith(emitted) else emitted
    return pieces


def truncate_at_stop(pieces: list[str], stops: list[str]) -> tuple[int, int] | None:
    """(tokens to keep, characters of the last kept piece) at the earliest stop string, or None."""
    text = "".join(pieces)
    hits = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    if not hits:
        return None
    cut, seen = min(hits), 0
    for k, piece in enumerate(pieces):
        if seen + len(piece) >= cut:
            return k + 1, cut - seen
        seen += len(piece)
    return len(pieces), len(pieces[-1]) if pieces else 0


class _SampleState:
    """One sample while it streams: its tokens, and the text already sent, held back where a stop string may start."""

    def __init__(self, tokenizer: Any, stops: list[str]) -> None:
        self.tokenizer, self.stops = tokenizer, stops
        self.holdback = max((len(s) for s in stops), default=1) - 1
        self.tokens: list[Token] = []
        self.decoded = ""
        self.emitted = 0
        self.stopped = False
        self.end: SampleEnd | None = None

    def push(self, token: Token) -> tuple[str, str] | None:
        """(text now safe to send, this token's piece), or None once a stop string has ended the sample."""
        if self.stopped:
            return None
        self.tokens.append(token)
        text = self.tokenizer.decode([t.token_id for t in self.tokens], skip_special_tokens=True)
        if text.endswith("\ufffd"):  # inside a multi-byte character: nothing is final yet
            return "", ""
        piece = text[len(self.decoded) :] if text.startswith(self.decoded) else ""
        self.decoded = text
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        self.stopped = bool(hits)
        safe = min(hits) if hits else len(text) - self.holdback
        if safe <= self.emitted:
            return "", piece
        delta, self.emitted = text[self.emitted : safe], safe
        return delta, piece


async def _nothing(n: int) -> AsyncIterator[Token | SampleEnd]:
    for k in range(n):
        yield SampleEnd(k, eos=False)


def _named_top(tokenizer: Any, top: dict[int, float] | None) -> dict[str, float] | None:
    return None if top is None else {tokenizer.decode([t]): lp for t, lp in top.items()}


class ServedPolicy:
    """A loaded policy: prompts rendered and checked, the engine's tokens turned into deltas and samples."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    @property
    def name(self) -> str:
        return self.engine.name

    def prepare(self, req: SamplingRequest) -> tuple[str, list[int]]:
        tok = self.engine.tokenizer
        if req.prompt_ids is not None:
            ids = list(req.prompt_ids)
            if ids and max(ids) >= len(tok):
                raise EngineRequestError(
                    f"prompt token id {max(ids)} is outside this policy's vocabulary of {len(tok)} tokens"
                )
            prompt = tok.decode(ids, skip_special_tokens=True)
        elif req.messages is not None:
            if not getattr(tok, "chat_template", None):
                raise EngineRequestError("this policy's tokenizer has no chat template: use /v1/completions")
            prompt = tok.apply_chat_template(req.messages, tokenize=False, add_generation_prompt=True)
            # The template already writes every special token the model expects.
            ids = tok(prompt, add_special_tokens=False)["input_ids"]
        else:
            prompt = req.prompt or ""
            ids = tok(prompt)["input_ids"]
        if not ids:
            raise EngineRequestError("the prompt is empty after tokenization")
        limit = self.engine.max_model_len
        if len(ids) + req.max_tokens > limit:
            raise EngineRequestError(
                f"prompt ({len(ids)} tokens) + max_tokens ({req.max_tokens}) exceeds this policy's context of {limit}"
            )
        return prompt, ids

    async def generate(self, req: SamplingRequest) -> GenerationResult:
        result = None
        async for item in self.stream(req):
            result = item
        assert isinstance(result, GenerationResult)
        return result

    async def stream(self, req: SamplingRequest) -> AsyncIterator[Delta | GenerationResult]:
        """Deltas as tokens are generated, then the GenerationResult.

        A sample's deltas join to exactly its final text: text that could still turn into a stop string is held
        back until it cannot, and whatever the tokens did not deliver comes at the end.
        """
        prompt, ids = self.prepare(req)
        echo = await self._echo(ids, req) if req.echo else None
        if echo is not None:  # every choice's text starts with the prompt
            for k in range(req.n):
                yield Delta(k, "".join(echo.pieces), echo.pieces, echo.token_logprobs, echo.top_logprobs)
        tok = self.engine.tokenizer
        states = [_SampleState(tok, req.stop) for _ in range(req.n)]
        want_lp, want_top = req.logprobs is not None, bool(req.logprobs)
        # max_tokens 0 (echo only): the prompt's log-probs are the answer, nothing is generated.
        events = self.engine.tokens(ids, req) if req.max_tokens else _nothing(req.n)
        async for event in events:
            state = states[event.index]
            if isinstance(event, SampleEnd):
                state.end = event
                continue
            pushed = state.push(event)
            if pushed is None:
                continue
            text, piece = pushed
            yield Delta(
                event.index,
                text,
                [piece],
                [event.logprob] if want_lp else None,
                [_named_top(tok, event.top) or {}] if want_top else None,
            )
        samples = [self._finish(state, req) for state in states]
        for k, (state, sample) in enumerate(zip(states, samples, strict=True)):
            if rest := sample.text[state.emitted :]:
                yield Delta(k, rest, [])
        yield GenerationResult(prompt, len(ids), samples, self.engine.name, echo)

    def _finish(self, state: _SampleState, req: SamplingRequest) -> Sample:
        tok = self.engine.tokenizer
        ids = [t.token_id for t in state.tokens]
        pieces = incremental_pieces(tok, ids)
        lps = [t.logprob for t in state.tokens] if req.logprobs is not None else None
        tops = [_named_top(tok, t.top) or {} for t in state.tokens] if req.logprobs else None
        end = state.end.token if state.end is not None and state.end.eos else None
        reason = "stop" if state.end is not None and state.end.eos else "length"
        cut = truncate_at_stop(pieces, req.stop)
        if cut is not None:
            keep, chars = cut
            pieces = pieces[: keep - 1] + [pieces[keep - 1][:chars]] if keep else []
            ids, reason, end = ids[:keep], "stop", None
            lps = lps[:keep] if lps is not None else None
            tops = tops[:keep] if tops is not None else None
        eos_lp = end.logprob if end is not None and req.logprobs is not None else None
        eos_top = _named_top(tok, end.top) if end is not None and req.logprobs else None
        return Sample("".join(pieces), pieces, ids, lps, tops, reason, eos_lp, eos_top)

    async def _echo(self, ids: list[int], req: SamplingRequest) -> PromptEcho:
        tok = self.engine.tokenizer
        pieces = incremental_pieces(tok, ids)
        if req.logprobs is None:
            return PromptEcho(pieces, [None] * len(ids), None)
        scored = await self.engine.prompt_logprobs(ids, req.logprobs, req.lora)
        lps = [s[0] if s else None for s in scored]
        tops = [_named_top(tok, s[1]) if s else None for s in scored] if req.logprobs else None
        return PromptEcho(pieces, lps, tops)

    def close(self) -> None:
        self.engine.close()
