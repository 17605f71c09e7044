"""Bodies of the serving endpoints in OpenAI's shapes: requests (its field names and limits, validated before any engine
is touched) and responses."""

from __future__ import annotations

import json
import os
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# The largest completion one request may ask for; the policy's context length may cap it further.
MAX_TOKENS_LIMIT = int(os.environ.get("RMDISTILL_SERVING_MAX_TOKENS", "2048"))
MAX_STOP = 4


def _unsupported(*accepted: Any) -> Any:
    """A field OpenAI defines that this server does not implement: refused (400 naming it) rather than ignored,
    unless null or one of the ``accepted`` values, which clients send when they do not use the feature."""
    shown = f" ({', '.join(json.dumps(a) for a in accepted)} accepted)" if accepted else ""
    extra = {"x-unsupported": True, "x-accepted": list(accepted)}
    return Field(
        None, description=f"Not supported: a request that sets it is refused with 400{shown}.", json_schema_extra=extra
    )


class _Sampling(BaseModel):
    # OpenAI clients send fields that change nothing here (user, metadata...); refusing them would break clients.
    # Fields that would change the answer and are not implemented are declared below and refused instead.
    model_config = ConfigDict(extra="ignore")

    max_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_LIMIT, description="Most tokens to generate per choice.")
    temperature: float = Field(1.0, ge=0.0, le=2.0, description="0: greedy.")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling mass.")
    n: int = Field(1, ge=1, le=16, description="Choices per prompt.")
    stop: str | list[str] | None = Field(
        None, validate_default=True, description=f"Up to {MAX_STOP} strings; the text ends before the first."
    )
    seed: int | None = Field(
        None, description="Same seed, same request: same samples, on either engine and whatever else is running."
    )
    logit_bias: Any = _unsupported({})
    presence_penalty: float | None = _unsupported(0.0)
    frequency_penalty: float | None = _unsupported(0.0)

    @field_validator("temperature", "top_p", mode="before")
    @classmethod
    def _null_is_default(cls, value: Any, info) -> Any:
        return cls.model_fields[info.field_name].default if value is None else value

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, value: str | list[str] | None) -> list[str]:
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences, got {len(stops)}")
        if any(not s for s in stops):
            raise ValueError("stop sequences must be non-empty strings")
        return stops

    @field_validator("*")
    @classmethod
    def _refuse_unsupported(cls, value: Any, info) -> Any:
        extra = cls.model_fields[info.field_name].json_schema_extra
        unsupported = isinstance(extra, dict) and extra.get("x-unsupported") and value is not None
        # Compared with their types: 1 == True, and a bool accepted must not let a number through.
        if unsupported and not any(value == a and type(value) is type(a) for a in extra["x-accepted"]):
            raise ValueError("not supported by this server")
        return value


class StreamOptions(BaseModel):
    include_usage: bool = Field(False, description="End the stream with a chunk holding the request's usage.")


MAX_PROMPTS = 16


class CompletionRequest(_Sampling):
    model: str
    prompt: str | list[str] | list[int] | list[list[int]] = Field(
        ..., description=f"One prompt, or up to {MAX_PROMPTS}; each a string or a list of token ids."
    )
    max_tokens: int | None = Field(
        None, ge=0, le=MAX_TOKENS_LIMIT, description="Most tokens per choice (default 16); 0 only with echo."
    )
    stream: bool = False
    stream_options: StreamOptions | None = None
    logprobs: int | None = Field(
        None, ge=0, le=5, description="Each token's log-prob under the policy, and this many most likely alternatives."
    )
    echo: bool = Field(False, description="Return the prompt before the completion (with its log-probs if asked).")
    suffix: str | None = _unsupported()
    best_of: int | None = _unsupported(1)

    @field_validator("prompt")
    @classmethod
    def _prompts(cls, value: Any) -> Any:
        prompts = [value] if isinstance(value, str) or (value and isinstance(value[0], int)) else value
        if not 1 <= len(prompts) <= MAX_PROMPTS:
            raise ValueError(f"prompt must be one prompt or a list of 1 to {MAX_PROMPTS}, got {len(prompts)}")
        if any(isinstance(p, list) and (not p or min(p) < 0) for p in prompts):
            raise ValueError("a token-id prompt must be a non-empty list of non-negative ids")
        return value

    def prompts(self) -> list[str | list[int]]:
        """The prompts as a list, each a string or token ids."""
        if isinstance(self.prompt, str) or (self.prompt and isinstance(self.prompt[0], int)):
            return [self.prompt]  # type: ignore[list-item]
        return list(self.prompt)  # type: ignore[arg-type]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[dict[str, Any]]

    def as_template_message(self) -> dict[str, str]:
        """Text parts joined: the chat templates of these policies take plain strings."""
        if isinstance(self.content, str):
            return {"role": self.role, "content": self.content}
        texts = [p.get("text", "") for p in self.content if p.get("type") == "text"]
        if len(texts) != len(self.content):
            raise ValueError("only text content parts are supported")
        return {"role": "system" if self.role == "developer" else self.role, "content": "".join(texts)}


class ChatCompletionRequest(_Sampling):
    model: str
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_completion_tokens: int | None = Field(
        None, ge=1, le=MAX_TOKENS_LIMIT, description="Most tokens per choice; wins over max_tokens (default 256)."
    )
    stream: bool = False
    stream_options: StreamOptions | None = None
    logprobs: bool = Field(False, description="Each generated token's log-prob under the policy.")
    top_logprobs: int | None = Field(None, ge=0, le=20, description="With logprobs: this many likeliest alternatives.")
    tools: Any = _unsupported([])
    tool_choice: Any = _unsupported("none")
    functions: Any = _unsupported([])
    function_call: Any = _unsupported("none")
    parallel_tool_calls: Any = _unsupported(True, False)
    response_format: Any = _unsupported({"type": "text"})
    audio: Any = _unsupported()
    prediction: Any = _unsupported()


class GenerateRequest(_Sampling):
    """``/v1/policies/{id}/generate``: n samples of one prompt (raw, or chat messages rendered by the template)."""

    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    max_tokens: int = Field(64, ge=1, le=MAX_TOKENS_LIMIT)
    return_logprobs: Literal["none", "total", "tokens"] = Field(
        "none", description="total: each sample's summed log-prob under the policy; tokens: also per token"
    )

    @model_validator(mode="after")
    def _one_input(self) -> GenerateRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt or messages")
        return self


# ---------------------------------------------------------------------------------------------------- responses
FinishReason = Literal["stop", "length"]


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ModelCard(BaseModel):
    id: str = Field(description="The policy id, to send as `model`.")
    object: Literal["model"] = "model"
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None] = Field(description="None for the prompt's first token (echo).")
    top_logprobs: list[dict[str, float] | None] | None = Field(
        None, description="Per token, its likeliest alternatives (when logprobs >= 1)."
    )
    text_offset: list[int] = Field(default_factory=list, description="Where each token starts in `text`.")


class CompletionChoice(BaseModel):
    text: str
    index: int
    logprobs: CompletionLogprobs | None
    finish_reason: FinishReason


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob]


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None
    finish_reason: FinishReason


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class GeneratedSample(BaseModel):
    """The log-prob fields are present only when `return_logprobs` asks for them."""

    text: str
    finish_reason: FinishReason
    num_tokens: int
    logprob: float | None = Field(None, description="total or tokens: the sample's summed log-prob under the policy")
    token_ids: list[int] | None = Field(None, description="tokens only")
    tokens: list[str] | None = Field(None, description="tokens only: each token's text piece")
    token_logprobs: list[float] | None = Field(None, description="tokens only: each token's log-prob")


class GenerateResponse(BaseModel):
    policy: str
    prompt: str = Field(description="The prompt as the policy saw it (messages rendered by its chat template).")
    engine: str
    samples: list[GeneratedSample]
    usage: Usage


class OpenAIErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class OpenAIErrorBody(BaseModel):
    """OpenAI's error body, which its clients turn into their own exceptions."""

    error: OpenAIErrorDetail
