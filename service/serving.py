"""OpenAI-compatible serving of registered policies: /v1/models, /v1/completions, /v1/chat/completions and
/v1/policies/{id}/generate. The model name is the policy id; errors use OpenAI's body so its clients raise cleanly.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import datetime
from typing import Any

from fastapi import APIRouter, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.routing import APIRoute
from prometheus_client import Counter, Histogram

from service.deps import Owner, ServingDep, SettingsDep, StoreDep
from service.engines import (
    Delta,
    EngineRequestError,
    EngineUnavailableError,
    GenerationResult,
    SamplingRequest,
)
from service.metrics import metrics_label
from service.schemas import error_responses
from service.serving_client import PolicyServing
from service.serving_schemas import (
    AssistantMessage,
    ChatChoice,
    ChatCompletion,
    ChatCompletionRequest,
    ChatLogprobs,
    Completion,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    GeneratedSample,
    GenerateRequest,
    GenerateResponse,
    ModelCard,
    ModelList,
    OpenAIErrorBody,
    TokenLogprob,
    Usage,
)
from service.settings import Settings
from service.store import Policy, Store

DEFAULT_CHAT_MAX_TOKENS = 256

REQUESTS = Counter("rmdistill_serving_requests", "Serving requests", ["policy", "endpoint", "status"])
PROMPT_TOKENS = Counter("rmdistill_serving_prompt_tokens", "Prompt tokens served", ["policy"])
COMPLETION_TOKENS = Counter("rmdistill_serving_completion_tokens", "Completion tokens generated", ["policy"])
LATENCY = Histogram(
    "rmdistill_serving_request_seconds",
    "Time to a full response",
    ["policy", "endpoint"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
)


class OpenAIError(Exception):
    def __init__(
        self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None, code=None
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        return JSONResponse(OpenAIErrorBody.model_validate(body).model_dump(), status_code=self.status)


def _validation_error(exc: RequestValidationError) -> OpenAIError:
    first = exc.errors()[0]
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    message = f"{param}: {first.get('msg')}" if param else str(first.get("msg"))
    return OpenAIError(400, message, param=param, code="invalid_value")


class OpenAIRoute(APIRoute):
    """Turns validation and engine errors into OpenAI's error body on these routes only (the job API keeps its own)."""

    def get_route_handler(self) -> Callable:
        handler = super().get_route_handler()

        async def route(request: Request):
            try:
                return await handler(request)
            except RequestValidationError as exc:
                return _validation_error(exc).response()
            except OpenAIError as exc:
                return exc.response()
            except EngineRequestError as exc:
                return OpenAIError(400, str(exc)).response()
            except EngineUnavailableError as exc:
                return OpenAIError(503, str(exc), type="server_error", code="engine_unavailable").response()

        return route


# Authentication fails before these routes run, so 401 has the service's own error body; the rest are OpenAI's.
router = APIRouter(route_class=OpenAIRoute, tags=["serving"], responses=error_responses(401))
OPENAI_ERRORS: dict[int | str, dict[str, Any]] = {
    "4XX": {"model": OpenAIErrorBody, "description": "Invalid request (400) or unknown model (404)"},
    503: {"model": OpenAIErrorBody, "description": "The policy's engine could not be loaded or died"},
}
# With "stream": true the answer is OpenAI's server-sent chunks, ending with `data: [DONE]`.
STREAMED = {200: {"content": {"text/event-stream": {"schema": {"type": "string"}}}}}


def _policy(store: Store, policy_id: str, owner: str | None) -> Policy:
    policy = store.get_policy(policy_id, owner)
    if policy is None:
        raise OpenAIError(404, f"The model '{policy_id}' does not exist", param="model", code="model_not_found")
    return policy


def _created(policy) -> int:
    created = getattr(policy, "created_at", None)
    if isinstance(created, datetime):
        return int(created.timestamp())
    return int(created or 0)


def _within_budget(settings: Settings, factors: dict[str, int], param: str) -> None:
    """Refuse, before any model runs, a request asking to generate more tokens than one request may.

    The product of ``factors`` (prompts, n, max_tokens, named as the client sent them) is the most the engine would
    generate for it: what the batch it joins, everyone's requests in it, would wait for and hold memory for.
    """
    total = math.prod(factors.values())
    if total > settings.max_request_tokens:
        shown = " × ".join(f"{name} ({value})" for name, value in factors.items())
        raise OpenAIError(
            400,
            f"{param}: {shown} = {total} tokens to generate, more than the {settings.max_request_tokens} one request "
            f"may ask for; lower {', '.join(factors)}",
            param=param,
            code="invalid_value",
        )


def _sampling(body, prompt: str | None, messages, max_tokens: int, logprobs: int | None) -> SamplingRequest:
    return SamplingRequest(
        prompt=prompt,
        messages=messages,
        n=body.n,
        max_tokens=max_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        stop=body.stop,
        logprobs=logprobs,
        seed=body.seed,
    )


def _record(policy_id: str, endpoint: str, start: float, results: list[GenerationResult] | None) -> None:
    label = metrics_label(policy_id)
    REQUESTS.labels(label, endpoint, "ok" if results is not None else "error").inc()
    LATENCY.labels(label, endpoint).observe(time.perf_counter() - start)
    if results:
        PROMPT_TOKENS.labels(label).inc(sum(r.prompt_tokens for r in results))
        COMPLETION_TOKENS.labels(label).inc(sum(r.completion_tokens for r in results))


async def _run(
    serving: PolicyServing, policy: Policy, endpoint: str, reqs: list[SamplingRequest]
) -> list[GenerationResult]:
    start, results = time.perf_counter(), None
    try:
        results = list(await asyncio.gather(*(serving.generate(policy.id, str(policy.path), r) for r in reqs)))
        return results
    finally:
        _record(policy.id, endpoint, start, results)


# A stream item: (choice index, text delta), or, last, every prompt's GenerationResult.
StreamItem = tuple[int, str] | list[GenerationResult]


async def _stream(
    serving: PolicyServing, policy: Policy, endpoint: str, reqs: list[SamplingRequest]
) -> AsyncIterator[StreamItem]:
    """Deltas of every choice (prompt p's sample k is choice p * n + k), prompts one after another."""
    start, results = time.perf_counter(), []
    try:
        for p, req in enumerate(reqs):
            async for item in serving.stream(policy.id, str(policy.path), req):
                if isinstance(item, GenerationResult):
                    results.append(item)
                elif isinstance(item, Delta) and item.text:
                    yield p * req.n + item.index, item.text
    except BaseException:
        _record(policy.id, endpoint, start, None)
        raise
    _record(policy.id, endpoint, start, results)
    yield results


async def _sse(
    items: AsyncIterator[StreamItem],
    on_delta: Callable[[int, str], list[dict]],
    on_end: Callable[[list[GenerationResult]], list[dict]],
) -> StreamingResponse:
    """Server-sent events in OpenAI's framing. The first item is awaited here, so a request the engine refuses
    (prompt too long...) still gets a proper error status instead of a 200 stream."""
    first = await anext(items)

    async def events() -> AsyncIterator[str]:
        item = first
        try:
            while not isinstance(item, list):
                for chunk in on_delta(*item):
                    yield f"data: {json.dumps(chunk)}\n\n"
                item = await anext(items)
        except Exception as exc:  # the status line is gone: the error can only travel in the stream
            error = {"message": str(exc), "type": "server_error", "param": None, "code": None}
            yield f"data: {json.dumps({'error': error})}\n\n"
            return
        for chunk in on_end(item):
            yield f"data: {json.dumps(chunk)}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def _usage(results: list[GenerationResult]) -> Usage:
    prompt = sum(r.prompt_tokens for r in results)
    completion = sum(r.completion_tokens for r in results)
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


# ---------------------------------------------------------------------------------------------------------- routes
@router.get("/v1/models")
async def list_models(owner: Owner, store: StoreDep) -> ModelList:
    policies = store.list_policies(owner)
    return ModelList(
        data=[ModelCard(id=p.id, created=_created(p), owned_by=owner or "rmdistill") for p in policies],
    )


@router.post("/v1/completions", response_model=Completion, responses={**STREAMED, **OPENAI_ERRORS})
async def completions(
    body: CompletionRequest, owner: Owner, store: StoreDep, serving: ServingDep, settings: SettingsDep
) -> Any:
    policy = _policy(store, body.model, owner)
    prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
    max_tokens = body.max_tokens or 16
    _within_budget(settings, {"prompts": len(prompts), "n": body.n, "max_tokens": max_tokens}, "max_tokens")
    reqs = [_sampling(body, p, None, max_tokens, body.logprobs) for p in prompts]
    ident, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    if body.stream:
        usage = body.stream_options is not None and body.stream_options.include_usage

        def on_end(results: list[GenerationResult]) -> list[dict]:
            samples = [s for r in results for s in r.samples]
            chunks = [
                _completion_chunk(ident, created, body.model, i, "", s.finish_reason) for i, s in enumerate(samples)
            ]
            if usage:
                chunks.append({**_completion_chunk(ident, created, body.model, 0, "", None), "choices": []})
                chunks[-1]["usage"] = _usage(results).model_dump()
            return chunks

        return await _sse(
            _stream(serving, policy, "completions", reqs),
            lambda i, text: [_completion_chunk(ident, created, body.model, i, text, None)],
            on_end,
        )
    results = await _run(serving, policy, "completions", reqs)
    samples = [s for r in results for s in r.samples]
    choices = [
        CompletionChoice(
            text=s.text,
            index=i,
            logprobs=CompletionLogprobs(tokens=s.pieces, token_logprobs=s.token_logprobs)
            if body.logprobs is not None
            else None,
            finish_reason=s.finish_reason,
        )
        for i, s in enumerate(samples)
    ]
    return Completion(id=ident, created=created, model=body.model, choices=choices, usage=_usage(results))


def _completion_chunk(ident: str, created: int, model: str, index: int, text: str, finish: str | None) -> dict:
    choice = {"text": text, "index": index, "logprobs": None, "finish_reason": finish}
    return {"id": ident, "object": "text_completion", "created": created, "model": model, "choices": [choice]}


@router.post("/v1/chat/completions", response_model=ChatCompletion, responses={**STREAMED, **OPENAI_ERRORS})
async def chat_completions(
    body: ChatCompletionRequest, owner: Owner, store: StoreDep, serving: ServingDep, settings: SettingsDep
) -> Any:
    policy = _policy(store, body.model, owner)
    try:
        messages = [m.as_template_message() for m in body.messages]
    except ValueError as exc:
        raise OpenAIError(400, str(exc), param="messages") from exc
    max_tokens = body.max_completion_tokens or body.max_tokens or DEFAULT_CHAT_MAX_TOKENS
    param = "max_completion_tokens" if body.max_completion_tokens else "max_tokens"
    _within_budget(settings, {"n": body.n, param: max_tokens}, param)
    req = _sampling(body, None, messages, max_tokens, 0 if body.logprobs else None)
    ident, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    if body.stream:
        return await _sse(_stream(serving, policy, "chat", [req]), *_chat_stream_renderers(ident, created, body))
    [result] = await _run(serving, policy, "chat", [req])
    choices = [
        ChatChoice(
            index=i,
            message=AssistantMessage(content=s.text),
            logprobs=ChatLogprobs(
                content=[TokenLogprob(token=p, logprob=lp) for p, lp in zip(s.pieces, s.token_logprobs, strict=True)]
            )
            if body.logprobs and s.token_logprobs is not None
            else None,
            finish_reason=s.finish_reason,
        )
        for i, s in enumerate(result.samples)
    ]
    return ChatCompletion(id=ident, created=created, model=body.model, choices=choices, usage=_usage([result]))


def _chat_stream_renderers(ident: str, created: int, body: ChatCompletionRequest):
    """Chunk builders for a chat stream: each choice opens with the assistant role and closes with its reason."""
    opened: set[int] = set()

    def open_choice(i: int) -> list[dict]:
        if i in opened:
            return []
        opened.add(i)
        return [_chat_chunk(ident, created, body.model, i, {"role": "assistant", "content": ""}, None)]

    def on_delta(i: int, text: str) -> list[dict]:
        return [*open_choice(i), _chat_chunk(ident, created, body.model, i, {"content": text}, None)]

    def on_end(results: list[GenerationResult]) -> list[dict]:
        chunks = []
        for i, sample in enumerate(results[0].samples):
            chunks += [*open_choice(i), _chat_chunk(ident, created, body.model, i, {}, sample.finish_reason)]
        if body.stream_options is not None and body.stream_options.include_usage:
            usage = _usage(results).model_dump()
            chunks.append({**_chat_chunk(ident, created, body.model, 0, {}, None), "choices": [], "usage": usage})
        return chunks

    return on_delta, on_end


def _chat_chunk(ident: str, created: int, model: str, index: int, delta: dict, finish: str | None) -> dict:
    choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
    return {"id": ident, "object": "chat.completion.chunk", "created": created, "model": model, "choices": [choice]}


# Unset fields stay out of the body: the log-prob fields of a sample appear only when return_logprobs asks.
@router.post("/v1/policies/{policy_id}/generate", responses=OPENAI_ERRORS, response_model_exclude_unset=True)
async def generate(
    policy_id: str, body: GenerateRequest, owner: Owner, store: StoreDep, serving: ServingDep, settings: SettingsDep
) -> GenerateResponse:
    """n samples of one prompt, each optionally with its log-probability under the policy (total or per token)."""
    policy = _policy(store, policy_id, owner)
    _within_budget(settings, {"n": body.n, "max_tokens": body.max_tokens}, "max_tokens")
    try:
        messages = [m.as_template_message() for m in body.messages] if body.messages is not None else None
    except ValueError as exc:
        raise OpenAIError(400, str(exc), param="messages") from exc
    want = body.return_logprobs != "none"
    req = _sampling(body, body.prompt, messages, body.max_tokens, 0 if want else None)
    [result] = await _run(serving, policy, "generate", [req])
    samples = []
    for s in result.samples:
        sample = GeneratedSample(text=s.text, finish_reason=s.finish_reason, num_tokens=len(s.token_ids))
        if want:
            sample.logprob = float(sum(s.token_logprobs or []))
        if body.return_logprobs == "tokens":
            sample.token_ids = s.token_ids
            sample.tokens = s.pieces
            sample.token_logprobs = s.token_logprobs
        samples.append(sample)
    return GenerateResponse(
        policy=policy.id, prompt=result.prompt, engine=result.engine, samples=samples, usage=_usage([result])
    )
