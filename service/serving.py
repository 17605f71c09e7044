"""OpenAI-compatible serving of registered policies: /v1/models, /v1/completions, /v1/chat/completions and
/v1/policies/{id}/generate. The model name is the policy id; errors use OpenAI's body so its clients raise cleanly.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import datetime
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.routing import APIRoute
from prometheus_client import Counter, Histogram

from service.auth import current_owner
from service.engines import EngineRequestError, EngineUnavailableError, GenerationResult, SamplingRequest
from service.serving_schemas import ChatCompletionRequest, CompletionRequest, GenerateRequest

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
        return JSONResponse(body, status_code=self.status)


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


router = APIRouter(route_class=OpenAIRoute, tags=["serving"])


def _policy(request: Request, policy_id: str, owner: str | None):
    policy = request.app.state.store.get_policy(policy_id, owner)
    if policy is None:
        raise OpenAIError(404, f"The model '{policy_id}' does not exist", param="model", code="model_not_found")
    return policy


def _created(policy) -> int:
    created = getattr(policy, "created_at", None)
    if isinstance(created, datetime):
        return int(created.timestamp())
    return int(created or 0)


def _sampling(body, prompt: str | None, messages, max_tokens: int, logprobs: bool) -> SamplingRequest:
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


async def _run(request: Request, policy, endpoint: str, reqs: list[SamplingRequest]) -> list[GenerationResult]:
    engines = request.app.state.engines
    start, status = time.perf_counter(), "error"
    try:
        results = await asyncio.gather(*(engines.generate(policy.id, str(policy.path), r) for r in reqs))
        status = "ok"
    finally:
        REQUESTS.labels(policy.id, endpoint, status).inc()
        LATENCY.labels(policy.id, endpoint).observe(time.perf_counter() - start)
    PROMPT_TOKENS.labels(policy.id).inc(sum(r.prompt_tokens for r in results))
    COMPLETION_TOKENS.labels(policy.id).inc(sum(r.completion_tokens for r in results))
    return list(results)


def _usage(results: list[GenerationResult]) -> dict[str, int]:
    prompt = sum(r.prompt_tokens for r in results)
    completion = sum(r.completion_tokens for r in results)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _sse(chunks: list[dict[str, Any]]) -> StreamingResponse:
    async def events() -> AsyncIterator[str]:
        for chunk in chunks:
            yield f"data: {json.dumps(chunk)}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


# ---------------------------------------------------------------------------------------------------------- routes
@router.get("/v1/models")
async def list_models(request: Request, owner: str | None = Depends(current_owner)) -> dict[str, Any]:
    policies = request.app.state.store.list_policies(owner)
    data = [{"id": p.id, "object": "model", "created": _created(p), "owned_by": owner or "rmdistill"} for p in policies]
    return {"object": "list", "data": data}


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request, owner: str | None = Depends(current_owner)):
    policy = _policy(request, body.model, owner)
    prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
    max_tokens = body.max_tokens or 16
    results = await _run(
        request,
        policy,
        "completions",
        [_sampling(body, p, None, max_tokens, body.logprobs is not None) for p in prompts],
    )
    ident, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    samples = [s for r in results for s in r.samples]
    if body.stream:
        chunks = [
            _completion_chunk(ident, created, body.model, i, piece, None)
            for i, s in enumerate(samples)
            for piece in s.pieces
            if piece
        ]
        chunks += [_completion_chunk(ident, created, body.model, i, "", s.finish_reason) for i, s in enumerate(samples)]
        if body.stream_options and body.stream_options.include_usage:
            chunks.append({**_completion_chunk(ident, created, body.model, 0, "", None), "choices": []})
            chunks[-1]["usage"] = _usage(results)
        return _sse(chunks)
    choices = [
        {
            "text": s.text,
            "index": i,
            "logprobs": {
                "tokens": s.pieces,
                "token_logprobs": s.token_logprobs,
                "top_logprobs": None,
                "text_offset": [],
            }
            if body.logprobs is not None
            else None,
            "finish_reason": s.finish_reason,
        }
        for i, s in enumerate(samples)
    ]
    return {
        "id": ident,
        "object": "text_completion",
        "created": created,
        "model": body.model,
        "choices": choices,
        "usage": _usage(results),
    }


def _completion_chunk(ident: str, created: int, model: str, index: int, text: str, finish: str | None) -> dict:
    choice = {"text": text, "index": index, "logprobs": None, "finish_reason": finish}
    return {"id": ident, "object": "text_completion", "created": created, "model": model, "choices": [choice]}


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request, owner: str | None = Depends(current_owner)):
    policy = _policy(request, body.model, owner)
    try:
        messages = [m.as_template_message() for m in body.messages]
    except ValueError as exc:
        raise OpenAIError(400, str(exc), param="messages") from exc
    max_tokens = body.max_completion_tokens or body.max_tokens or DEFAULT_CHAT_MAX_TOKENS
    [result] = await _run(request, policy, "chat", [_sampling(body, None, messages, max_tokens, body.logprobs)])
    ident, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    if body.stream:
        chunks = []
        for i, s in enumerate(result.samples):
            chunks.append(_chat_chunk(ident, created, body.model, i, {"role": "assistant", "content": ""}, None))
            chunks += [_chat_chunk(ident, created, body.model, i, {"content": p}, None) for p in s.pieces if p]
            chunks.append(_chat_chunk(ident, created, body.model, i, {}, s.finish_reason))
        if body.stream_options and body.stream_options.include_usage:
            chunks.append(
                {**_chat_chunk(ident, created, body.model, 0, {}, None), "choices": [], "usage": _usage([result])}
            )
        return _sse(chunks)
    choices = [
        {
            "index": i,
            "message": {"role": "assistant", "content": s.text},
            "logprobs": {
                "content": [{"token": p, "logprob": lp} for p, lp in zip(s.pieces, s.token_logprobs, strict=True)]
            }
            if body.logprobs and s.token_logprobs is not None
            else None,
            "finish_reason": s.finish_reason,
        }
        for i, s in enumerate(result.samples)
    ]
    return {
        "id": ident,
        "object": "chat.completion",
        "created": created,
        "model": body.model,
        "choices": choices,
        "usage": _usage([result]),
    }


def _chat_chunk(ident: str, created: int, model: str, index: int, delta: dict, finish: str | None) -> dict:
    choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
    return {"id": ident, "object": "chat.completion.chunk", "created": created, "model": model, "choices": [choice]}


@router.post("/v1/policies/{policy_id}/generate")
async def generate(
    policy_id: str, body: GenerateRequest, request: Request, owner: str | None = Depends(current_owner)
) -> dict[str, Any]:
    """n samples of one prompt, each optionally with its log-probability under the policy (total or per token)."""
    policy = _policy(request, policy_id, owner)
    try:
        messages = [m.as_template_message() for m in body.messages] if body.messages is not None else None
    except ValueError as exc:
        raise OpenAIError(400, str(exc), param="messages") from exc
    want = body.return_logprobs != "none"
    [result] = await _run(request, policy, "generate", [_sampling(body, body.prompt, messages, body.max_tokens, want)])
    samples = []
    for s in result.samples:
        sample: dict[str, Any] = {"text": s.text, "finish_reason": s.finish_reason, "num_tokens": len(s.token_ids)}
        if want:
            sample["logprob"] = float(sum(s.token_logprobs or []))
        if body.return_logprobs == "tokens":
            sample["token_ids"] = s.token_ids
            sample["tokens"] = s.pieces
            sample["token_logprobs"] = s.token_logprobs
        samples.append(sample)
    return {
        "policy": policy.id,
        "prompt": result.prompt,
        "engine": result.engine,
        "samples": samples,
        "usage": _usage([result]),
    }
