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
from prometheus_client import Counter, Gauge, Histogram

from service.deps import Owner, ServingDep, SettingsDep, StoreDep
from service.engines import (
    Delta,
    EngineRequestError,
    EngineUnavailableError,
    GenerationResult,
    SamplingRequest,
)
from service.metrics import metrics_label
from service.openai_logprobs import (
    chat_logprobs,
    choice_tokens,
    completion_logprobs,
    delta_chat_logprobs,
    delta_completion_logprobs,
)
from service.schemas import error_responses
from service.serving_client import PolicyServing
from service.serving_schemas import (
    AssistantMessage,
    ChatChoice,
    ChatCompletion,
    ChatCompletionRequest,
    Completion,
    CompletionChoice,
    CompletionRequest,
    GeneratedSample,
    GenerateRequest,
    GenerateResponse,
    ModelCard,
    ModelList,
    OpenAIErrorBody,
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
TIME_TO_FIRST_TOKEN = Histogram(
    "rmdistill_serving_time_to_first_token_seconds",
    "Streamed requests: time from arrival to the first text sent",
    ["policy"],
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 120),
)
INTER_TOKEN_LATENCY = Histogram(
    "rmdistill_serving_inter_token_latency_seconds",
    "Streamed requests: time between successive chunks of one choice",
    ["policy"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
)
QUEUE_DEPTH = Gauge(
    "rmdistill_serving_queue_depth",
    "Requests this API process has accepted and not yet answered: waiting for a replica or generating",
    ["policy"],
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


def _sampling(
    body, prompt: str | list[int] | None, messages, max_tokens: int, logprobs: int | None, echo: bool = False
) -> SamplingRequest:
    return SamplingRequest(
        prompt=prompt if isinstance(prompt, str) else None,
        prompt_ids=prompt if isinstance(prompt, list) else None,
        messages=messages,
        n=body.n,
        max_tokens=max_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        stop=body.stop,
        logprobs=logprobs,
        seed=body.seed,
        echo=echo,
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
    depth = QUEUE_DEPTH.labels(metrics_label(policy.id))
    depth.inc()
    try:
        results = list(await asyncio.gather(*(serving.generate(policy.id, str(policy.path), r) for r in reqs)))
        return results
    finally:
        depth.dec()
        _record(policy.id, endpoint, start, results)


# A stream item: (choice index, delta), or, last, every prompt's GenerationResult.
StreamItem = tuple[int, Delta] | list[GenerationResult]


async def _stream(
    serving: PolicyServing, policy: Policy, endpoint: str, reqs: list[SamplingRequest]
) -> AsyncIterator[StreamItem]:
    """Deltas of every choice (prompt p's sample k is choice p * n + k), prompts one after another; times the first
    text and the gaps between a choice's chunks."""
    label = metrics_label(policy.id)
    start, results = time.perf_counter(), []
    last: dict[int, float] = {}
    depth = QUEUE_DEPTH.labels(label)
    depth.inc()
    try:
        for p, req in enumerate(reqs):
            async for item in serving.stream(policy.id, str(policy.path), req):
                if isinstance(item, GenerationResult):
                    results.append(item)
                    continue
                choice, now = p * req.n + item.index, time.perf_counter()
                if item.text:
                    if not last:
                        TIME_TO_FIRST_TOKEN.labels(label).observe(now - start)
                    elif choice in last:
                        INTER_TOKEN_LATENCY.labels(label).observe(now - last[choice])
                    last[choice] = now
                yield choice, item
    except BaseException:
        _record(policy.id, endpoint, start, None)
        raise
    finally:
        depth.dec()
    _record(policy.id, endpoint, start, results)
    yield results


async def _sse(
    items: AsyncIterator[StreamItem],
    on_delta: Callable[[int, Delta], list[dict]],
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
    return ModelList(data=[_card(p, owner) for p in policies])


@router.get("/v1/models/{model_id}", responses=OPENAI_ERRORS)
async def get_model(model_id: str, owner: Owner, store: StoreDep) -> ModelCard:
    return _card(_policy(store, model_id, owner), owner)


def _card(policy: Policy, owner: str | None) -> ModelCard:
    return ModelCard(id=policy.id, created=_created(policy), owned_by=owner or "rmdistill")


@router.post("/v1/completions", response_model=Completion, responses={**STREAMED, **OPENAI_ERRORS})
async def completions(
    body: CompletionRequest, owner: Owner, store: StoreDep, serving: ServingDep, settings: SettingsDep
) -> Any:
    policy = _policy(store, body.model, owner)
    prompts = body.prompts()
    max_tokens = 16 if body.max_tokens is None else body.max_tokens
    if max_tokens == 0 and not body.echo:
        raise OpenAIError(400, "max_tokens: 0 is only allowed with echo", param="max_tokens", code="invalid_value")
    _within_budget(settings, {"prompts": len(prompts), "n": body.n, "max_tokens": max_tokens}, "max_tokens")
    reqs = [_sampling(body, p, None, max_tokens, body.logprobs, body.echo) for p in prompts]
    ident, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    if body.stream:
        return await _sse(_stream(serving, policy, "completions", reqs), *_completion_renderers(ident, created, body))
    results = await _run(serving, policy, "completions", reqs)
    choices = []
    for result in results:
        for sample in result.samples:
            text, pieces, lps, tops = choice_tokens(result, sample, body.echo)
            logprobs = completion_logprobs(pieces, lps, tops) if body.logprobs is not None else None
            choices.append(
                CompletionChoice(text=text, index=len(choices), logprobs=logprobs, finish_reason=sample.finish_reason)
            )
    return Completion(id=ident, created=created, model=body.model, choices=choices, usage=_usage(results))


def _completion_renderers(ident: str, created: int, body: CompletionRequest):
    """Chunk builders for a completions stream: text (and log-probs) as it comes, then each choice's reason."""
    sent: dict[int, int] = {}  # characters of each choice's text sent so far, where its next offsets start

    def chunk(index: int, text: str, logprobs: dict | None, finish: str | None) -> dict:
        choice = {"text": text, "index": index, "logprobs": logprobs, "finish_reason": finish}
        return {"id": ident, "object": "text_completion", "created": created, "model": body.model, "choices": [choice]}

    def on_delta(i: int, delta: Delta) -> list[dict]:
        start = sent.get(i, 0)
        sent[i] = start + len(delta.text)
        if not delta.text and delta.token_logprobs is None:  # held-back text, and no log-probs to send
            return []
        return [chunk(i, delta.text, delta_completion_logprobs(delta, start), None)]

    def on_end(results: list[GenerationResult]) -> list[dict]:
        samples = [s for r in results for s in r.samples]
        chunks = [chunk(i, "", None, s.finish_reason) for i, s in enumerate(samples)]
        if body.stream_options is not None and body.stream_options.include_usage:
            chunks.append({**chunk(0, "", None, None), "choices": [], "usage": _usage(results).model_dump()})
        return chunks

    return on_delta, on_end


@router.post("/v1/chat/completions", response_model=ChatCompletion, responses={**STREAMED, **OPENAI_ERRORS})
async def chat_completions(
    body: ChatCompletionRequest, owner: Owner, store: StoreDep, serving: ServingDep, settings: SettingsDep
) -> Any:
    policy = _policy(store, body.model, owner)
    try:
        messages = [m.as_template_message() for m in body.messages]
    except ValueError as exc:
        raise OpenAIError(400, str(exc), param="messages") from exc
    if body.top_logprobs and not body.logprobs:
        raise OpenAIError(400, "top_logprobs: needs logprobs: true", param="top_logprobs", code="invalid_value")
    max_tokens = body.max_completion_tokens or body.max_tokens or DEFAULT_CHAT_MAX_TOKENS
    param = "max_completion_tokens" if body.max_completion_tokens else "max_tokens"
    _within_budget(settings, {"n": body.n, param: max_tokens}, param)
    req = _sampling(body, None, messages, max_tokens, (body.top_logprobs or 0) if body.logprobs else None)
    ident, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    if body.stream:
        return await _sse(_stream(serving, policy, "chat", [req]), *_chat_stream_renderers(ident, created, body))
    [result] = await _run(serving, policy, "chat", [req])
    choices = [
        ChatChoice(
            index=i,
            message=AssistantMessage(content=s.text),
            logprobs=chat_logprobs(s.pieces, s.token_logprobs, s.top_logprobs)
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

    def chunk(index: int, delta: dict, finish: str | None, logprobs: dict | None = None) -> dict:
        choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        return {
            "id": ident,
            "object": "chat.completion.chunk",
            "created": created,
            "model": body.model,
            "choices": [choice],
        }

    def open_choice(i: int) -> list[dict]:
        if i in opened:
            return []
        opened.add(i)
        return [chunk(i, {"role": "assistant", "content": ""}, None)]

    def on_delta(i: int, delta: Delta) -> list[dict]:
        if not delta.text and delta.token_logprobs is None:  # held-back text, and no log-probs to send
            return []
        return [*open_choice(i), chunk(i, {"content": delta.text}, None, delta_chat_logprobs(delta))]

    def on_end(results: list[GenerationResult]) -> list[dict]:
        chunks = []
        for i, sample in enumerate(results[0].samples):
            chunks += [*open_choice(i), chunk(i, {}, sample.finish_reason)]
        if body.stream_options is not None and body.stream_options.include_usage:
            chunks.append({**chunk(0, {}, None), "choices": [], "usage": _usage(results).model_dump()})
        return chunks

    return on_delta, on_end


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
