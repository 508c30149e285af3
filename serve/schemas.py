"""OpenAI-style request and response bodies for the completions API.

The request model is strict (JSON types must match: `"max_tokens": "5"` or `true` is an error),
and its static bounds appear in the OpenAPI schema so clients and fuzzers see them. Bounds that
depend on the served model (context length, the deployment's max_tokens limit) are checked by
the ingress after it knows the model, with the same error shape.
"""

from __future__ import annotations

import time
import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

# Hard ceiling on generated tokens per request; a deployment may set a lower limit.
MAX_TOKENS_CEILING = 4096
MAX_STOP_SEQUENCES = 4
MAX_STOP_CHARS = 64
MAX_SEED = 2**63 - 1


class CompletionRequest(BaseModel):
    """POST /v1/completions body (a subset of OpenAI's legacy completions API)."""

    model_config = ConfigDict(strict=True, extra="ignore")

    model: str = Field(min_length=1, max_length=256, description="served model name (GET /v1/models)")
    prompt: str = Field(min_length=1, description="prompt text; must not be empty")
    max_tokens: int = Field(16, ge=1, le=MAX_TOKENS_CEILING, description="tokens to generate")
    temperature: float = Field(1.0, ge=0.0, le=2.0, allow_inf_nan=False, description="0 = greedy decoding")
    top_p: float = Field(1.0, gt=0.0, le=1.0, allow_inf_nan=False, description="nucleus mass")
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="same seed -> same text")
    stop: str | list[str] | None = Field(None, description=f"up to {MAX_STOP_SEQUENCES} non-empty stop strings")
    stream: bool = Field(False, description="stream tokens as server-sent events")

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


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    kv_cache_bytes: int = Field(description="peak bytes of KV cache this request held")


class Choice(BaseModel):
    text: str
    index: int = 0
    logprobs: None = None
    finish_reason: Literal["stop", "length"] | None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "calibray"
    max_context: int
    max_tokens_limit: int
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


def new_completion_id() -> str:
    return f"cmpl-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())
