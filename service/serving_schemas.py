"""Bodies of the serving endpoints in OpenAI's shapes: requests (its field names and limits, validated before any engine
is touched) and responses."""

from __future__ import annotations

import os
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# The largest completion one request may ask for; the policy's context length may cap it further.
MAX_TOKENS_LIMIT = int(os.environ.get("RMDISTILL_SERVING_MAX_TOKENS", "2048"))
MAX_STOP = 4


class _Sampling(BaseModel):
    # OpenAI clients send fields this server ignores (user, presence_penalty...); refusing them would break clients.
    model_config = ConfigDict(extra="ignore")

    max_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_LIMIT)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=16)
    stop: str | list[str] | None = Field(None, validate_default=True)
    seed: int | None = None

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


class StreamOptions(BaseModel):
    include_usage: bool = False


class CompletionRequest(_Sampling):
    model: str
    prompt: str | list[str] = Field(..., description="one prompt, or up to 16")
    stream: bool = False
    stream_options: StreamOptions | None = None
    logprobs: int | None = Field(None, ge=0, le=1, description="0 or 1: the sampled token's log-prob")
    echo: Literal[False] = False

    @field_validator("prompt")
    @classmethod
    def _prompts(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, list) and not 1 <= len(value) <= 16:
            raise ValueError(f"prompt must be a string or a list of 1 to 16 strings, got {len(value)}")
        return value


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
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_LIMIT)
    stream: bool = False
    stream_options: StreamOptions | None = None
    logprobs: bool = False


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
    token_logprobs: list[float] | None
    top_logprobs: None = None
    text_offset: list[int] = Field(default_factory=list)


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


class TokenLogprob(BaseModel):
    token: str
    logprob: float


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
