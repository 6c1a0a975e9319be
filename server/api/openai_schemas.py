"""Request and response bodies of `POST /v1/completions` and `POST /v1/chat/completions` in
OpenAI's shapes. The requests take every setting of /v1/generate (SamplingSettings: the diffusion
settings, temperature, seed) as extra fields under the same names; OpenAI fields this server cannot
honour are declared so that a request using them gets a 400 naming them (see UNSUPPORTED)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from server.api.schemas import FiniteFloat, SamplingSettings, TokenId


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    include_usage: bool = False


class OpenAIRequest(SamplingSettings):
    model: str = Field(description="the served model's name (GET /v1/models)")
    max_tokens: int | None = Field(default=None, ge=1, description="the answer length (gen_length)")
    n: int = Field(default=1, ge=1, le=128, description="answers per prompt, with seeds seed, seed+1, ...")
    stop: str | list[str] | None = Field(default=None, description="up to 4 strings; the text ends before the first")
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # Accepted only at the values that leave the answer as it is (UNSUPPORTED).
    presence_penalty: FiniteFloat | None = None
    frequency_penalty: FiniteFloat | None = None
    logit_bias: dict[str, FiniteFloat] | None = None


class CompletionRequest(OpenAIRequest):
    prompt: str | list[str] | list[TokenId] | list[list[TokenId]]
    echo: bool | None = None
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None


class TextPart(BaseModel):
    """A content part; only type "text" can be read (others are answered 400)."""

    model_config = ConfigDict(extra="allow", strict=True)
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]


class ChatCompletionRequest(OpenAIRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1, description="the answer length (gen_length)")
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list[dict] | None = None
    tool_choice: str | dict | None = None
    response_format: dict | None = None


# field -> (is the value one that changes nothing, why other values cannot be honoured)
UNSUPPORTED: dict[str, tuple[Callable[[object], bool], str]] = {
    "logprobs": (lambda v: v is None or v is False, "the sampler reports no per-token log-probabilities"),
    "top_logprobs": (lambda v: v is None or v == 0, "the sampler reports no per-token log-probabilities"),
    "echo": (lambda v: v is None or v is False, "the prompt is not returned"),
    "best_of": (lambda v: v is None or v == 1, "answers are not ranked; use n"),
    "suffix": (lambda v: not v, "there is no insertion mode; use constraints"),
    "tools": (lambda v: not v, "there is no tool calling"),
    "tool_choice": (lambda v: v is None or v == "none", "there is no tool calling"),
    "response_format": (lambda v: v is None or v.get("type") == "text", "only plain text is produced"),
    "presence_penalty": (lambda v: not v, "there are no repetition penalties"),
    "frequency_penalty": (lambda v: not v, "there are no repetition penalties"),
    "logit_bias": (lambda v: not v, "there is no logit bias; use constraints"),
}


class CompletionUsage(BaseModel):
    prompt_tokens: int
    completion_tokens: int = Field(description="answer tokens denoised: max_tokens per choice")
    total_tokens: int


FinishReason = Literal["stop", "length"]


class OpenAIResponse(BaseModel):
    id: str
    created: int
    model: str
    usage: CompletionUsage


class OpenAIChoice(BaseModel):
    index: int
    finish_reason: FinishReason
    logprobs: None = None


class CompletionChoice(OpenAIChoice):
    text: str


class Completion(OpenAIResponse):
    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(OpenAIChoice):
    message: AssistantMessage


class ChatCompletion(OpenAIResponse):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatChoice]
