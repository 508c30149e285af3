"""OpenAI request and response bodies: legacy completions and chat completions.

Requests are strict (JSON types must match: `"max_tokens": "5"` or `true` is an error) and closed:
a parameter this server does not implement (`suffix`, `tools`, `response_format`, ...) is a 400
naming it, never silently ignored. Static bounds appear in the OpenAPI schema so clients and
fuzzers see them. Bounds that depend on the served model (context, vocabulary, the deployment's
max_tokens limit) are checked by the model replica, with the same error shape.

`user` is accepted: OpenAI defines it as an end-user id for abuse monitoring, with no effect on
the output, which is what it has here.
"""

from __future__ import annotations

import time
import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# Hard ceiling on generated tokens per request; a deployment may set a lower limit.
MAX_TOKENS_CEILING = 4096
MAX_STOP_SEQUENCES = 4
MAX_STOP_CHARS = 64
MAX_SEED = 2**63 - 1
MAX_CHOICES = 16  # n and best_of, per prompt
MAX_PROMPTS = 16  # prompts in one completions request
MAX_COMPLETION_LOGPROBS = 5  # OpenAI's limit for `logprobs` on /v1/completions
MAX_TOP_LOGPROBS = 20  # and for `top_logprobs` on chat

Prompt = str | list[str] | list[int] | list[list[int]]


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")

    include_usage: bool = Field(False, description="send a last chunk with the usage and no choices")


class _Sampling(BaseModel):
    """Fields both endpoints share."""

    model_config = ConfigDict(strict=True, extra="forbid")

    model: str = Field(min_length=1, max_length=256, description="served model id (GET /v1/models)")
    temperature: float = Field(1.0, ge=0.0, le=2.0, allow_inf_nan=False, description="0 = greedy decoding")
    top_p: float = Field(1.0, gt=0.0, le=1.0, allow_inf_nan=False, description="nucleus mass")
    n: int = Field(1, ge=1, le=MAX_CHOICES, description="choices per prompt")
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0, allow_inf_nan=False)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0, allow_inf_nan=False)
    logit_bias: dict[str, float] | None = Field(None, description="token id (as a string) -> bias in [-100, 100]")
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="same seed -> same text (choice i: seed + i)")
    stop: str | list[str] | None = Field(None, description=f"up to {MAX_STOP_SEQUENCES} non-empty stop strings")
    stream: bool = Field(False, description="stream tokens as server-sent events")
    stream_options: StreamOptions | None = None
    user: str | None = Field(None, max_length=256, description="end-user id (no effect on the output)")

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, v: str | list[str] | None) -> list[str] | None:
        stops = [v] if isinstance(v, str) else v
        if stops is None:
            return None
        if len(stops) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences, got {len(stops)}")
        for s in stops:
            if not s or len(s) > MAX_STOP_CHARS:
                raise ValueError(f"each stop sequence must have 1..{MAX_STOP_CHARS} characters, got {s!r}")
        return list(stops)

    @field_validator("logit_bias")
    @classmethod
    def _check_bias(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        for k, b in (v or {}).items():
            if not (k.isascii() and k.isdigit()):
                raise ValueError(f"keys are token ids as strings, got {k!r}")
            if not -100.0 <= b <= 100.0:
                raise ValueError(f"bias for token {k} is {b}; must be in [-100, 100]")
        return v

    @model_validator(mode="after")
    def _check_stream_options(self):
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options: only allowed with stream=true")
        return self

    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(_Sampling):
    """POST /v1/completions body (OpenAI's legacy completions API)."""

    prompt: Prompt = Field(description="text, list of texts, token ids, or list of token-id lists; never empty")
    max_tokens: int = Field(16, ge=1, le=MAX_TOKENS_CEILING, description="tokens to generate")
    best_of: int | None = Field(
        None, ge=1, le=MAX_CHOICES, description="sample best_of per prompt, return the n of highest log-probability"
    )
    logprobs: int | None = Field(
        None, ge=0, le=MAX_COMPLETION_LOGPROBS, description="log-probability of each token and this many alternatives"
    )
    echo: bool = Field(False, description="prepend the prompt to the text (and its logprobs)")

    @field_validator("prompt")
    @classmethod
    def _check_prompt(cls, v: Prompt) -> Prompt:
        items = [v] if isinstance(v, str) or (v and isinstance(v[0], int)) else v
        if not items:
            raise ValueError("must not be empty")
        if len(items) > MAX_PROMPTS:
            raise ValueError(f"at most {MAX_PROMPTS} prompts, got {len(items)}")
        for p in items:
            if len(p) == 0:
                raise ValueError("must not be empty")
            if not isinstance(p, str) and min(p) < 0:
                raise ValueError(f"token ids must be >= 0, got {min(p)}")
        return v

    @model_validator(mode="after")
    def _check_best_of(self):
        if self.best_of is not None:
            if self.best_of < self.n:
                raise ValueError(f"best_of: {self.best_of} must be >= n ({self.n})")
            if self.stream and self.best_of > 1:
                raise ValueError("best_of: cannot be used with stream=true (the best choice is known only at the end)")
        return self

    def prompts(self) -> list[str | list[int]]:
        """The prompt as a list of prompts (each text or token ids)."""
        v = self.prompt
        return [v] if isinstance(v, str) or isinstance(v[0], int) else list(v)


class TextPart(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")

    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = Field(None, max_length=64)

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatCompletionRequest(_Sampling):
    """POST /v1/chat/completions body. max_completion_tokens (or the older max_tokens); none given:
    the deployment's limit, within the context."""

    messages: list[ChatMessage] = Field(min_length=1, max_length=256)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_CEILING)
    max_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_CEILING, description="deprecated alias")
    logprobs: bool = Field(False, description="log-probability of each output token")
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS, description="alternatives per token")

    @model_validator(mode="after")
    def _check(self):
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs: requires logprobs=true")
        if None not in (self.max_tokens, self.max_completion_tokens) and self.max_tokens != self.max_completion_tokens:
            raise ValueError("max_tokens: differs from max_completion_tokens; give one")
        return self

    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


# -- responses ---------------------------------------------------------------------------------------
class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    kv_cache_bytes: int = Field(0, description="peak bytes of KV cache the request's sequences held")


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class Choice(BaseModel):
    text: str
    index: int = 0
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob]


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: Literal["stop", "length"]


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(BaseModel):
    index: int
    delta: Delta
    logprobs: ChatLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "calibray"
    max_context: int
    max_tokens_limit: int
    chat: bool = Field(description="whether the model has a chat template (POST /v1/chat/completions)")
    calibration: dict[str, str]


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


def new_id(prefix: str = "cmpl") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())
