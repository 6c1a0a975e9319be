"""Request and response bodies of the HTTP contract (DESIGN.md), field for field.

The schema checks types and ranges (422 when it fails); what depends on the configured limits
or the tokenizer is checked by server/api/validation.py (400).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

Strict = ConfigDict(extra="forbid", strict=True)
FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]
Seed = Annotated[int, Field(ge=0, le=2**63 - 1)]
TokenId = Annotated[int, Field(ge=0)]


class Message(BaseModel):
    model_config = Strict
    role: Literal["system", "user", "assistant"]
    content: str


class Constraint(BaseModel):
    """A token (or the tokens of a word) pinned at an answer position."""

    model_config = Strict
    position: int = Field(ge=0)
    text: str | None = Field(default=None, min_length=1)
    token_id: TokenId | None = None

    @model_validator(mode="after")
    def _one_of(self) -> Constraint:
        if (self.text is None) == (self.token_id is None):
            raise ValueError("give exactly one of text or token_id")
        return self


class PromptFields(BaseModel):
    model_config = Strict
    prompt: str | None = None
    messages: list[Message] | None = Field(default=None, min_length=1)


class DiffusionSettings(BaseModel):
    """The denoising settings every generation route takes (the OpenAI routes as extra fields)."""

    model_config = Strict
    steps: int = Field(default=128, ge=1)
    block_length: int | None = Field(default=None, ge=1, description="default: min(32, gen_length)")
    cfg_scale: FiniteFloat = Field(default=0.0, ge=0.0, le=100.0)
    remasking: Literal["low_confidence", "random"] = "low_confidence"
    logits_eos_inf: bool = False
    confidence_eos_eot_inf: bool = False
    constraints: list[Constraint] = Field(default_factory=list)
    # Fast decoding (LLADA.md); left out: the server's --default-* settings. Checked by validation.py.
    cache: str | None = Field(default=None, description='KV cache: "none", "prefix" or "dual"')
    threshold: FiniteFloat | None = Field(default=None, description="reveal every masked position this confident")
    factor: FiniteFloat | None = Field(default=None, description="Fast-dLLM's factor rule; not with threshold")
    early_stop: bool | None = Field(default=None, description="end the answer after a finished block with EOS")
    # Block diffusion (LLaDA2); refused by the full-canvas models.
    editing_threshold: FiniteFloat | None = Field(
        default=None,
        ge=0.0,
        le=1.0,
        description="LLaDA2.1's token editing; null: none (left out: the server's default)",
    )
    max_post_steps: int | None = Field(default=None, ge=0, description="editing iterations after a block is filled")
    top_k: int | None = Field(default=None, ge=1, description="at temperature > 0, draw from the k most likely tokens")


class SamplingSettings(DiffusionSettings):
    """Every setting of an answer but its prompt and length; the OpenAI routes share these names."""

    temperature: FiniteFloat = Field(default=0.0, ge=0.0, le=100.0)
    top_p: FiniteFloat | None = Field(default=None, gt=0.0, le=1.0, description="nucleus sampling (block diffusion)")
    seed: Seed | None = None


class GenerateRequest(PromptFields, SamplingSettings):
    input_ids: list[TokenId] | None = None
    gen_length: int = Field(default=128, ge=1)
    stream: bool = False


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    nfe: int


class Timing(BaseModel):
    queue_s: float
    total_s: float


class GenerateResponse(BaseModel):
    id: str
    model: str
    text: str
    token_ids: list[int]
    finish_reason: Literal["stop", "length"]
    approximate: bool  # a cache, threshold or factor was used: the answer may differ from the exact sampler's
    usage: Usage
    timing: Timing


class UnmaskedToken(BaseModel):
    index: int
    token_id: int
    text: str
    confidence: float
    edit: bool = False  # replaces a token written in an earlier step (LLaDA2.1's editing)


class StepData(BaseModel):
    step: int
    block: int
    unmasked: list[UnmaskedToken]
    masked: int


class ScoreItem(BaseModel):
    model_config = Strict
    context: str | None = None
    continuation: str | None = None
    context_ids: list[TokenId] | None = None
    continuation_ids: list[TokenId] | None = None

    @model_validator(mode="after")
    def _one_form(self) -> ScoreItem:
        text = self.context is not None or self.continuation is not None
        ids = self.context_ids is not None or self.continuation_ids is not None
        if text == ids:
            raise ValueError("give either context and continuation, or context_ids and continuation_ids")
        if text and (self.context is None or self.continuation is None):
            raise ValueError("give both context and continuation")
        if ids and (self.context_ids is None or self.continuation_ids is None):
            raise ValueError("give both context_ids and continuation_ids")
        return self


class LoglikelihoodRequest(BaseModel):
    model_config = Strict
    requests: list[ScoreItem] = Field(min_length=1)
    mc_num: int = Field(default=128, ge=1)
    batch_size: int = Field(default=32, ge=1)
    cfg_scale: FiniteFloat = Field(default=0.0, ge=0.0, le=100.0)
    greedy: bool = False
    seed: Seed | None = None


class ScoreResultBody(BaseModel):
    loglikelihood: float
    is_greedy: bool | None
    context_tokens: int
    continuation_tokens: int


class ScoreUsage(BaseModel):
    prompt_tokens: int
    forward_rows: int


class LoglikelihoodResponse(BaseModel):
    id: str
    model: str
    results: list[ScoreResultBody]
    usage: ScoreUsage
    timing: Timing


class TokenizeRequest(PromptFields):
    add_special_tokens: bool = False


class TokenizeResponse(BaseModel):
    tokens: list[int]
    count: int


class DetokenizeRequest(BaseModel):
    model_config = Strict
    tokens: list[TokenId]


class DetokenizeResponse(BaseModel):
    prompt: str


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "llada-server"
    family: str = Field(description="the checkpoint's architecture (config.json `architectures`), e.g. LLaDAModelLM")
    block_diffusion: bool = Field(description="decoded block by block (LLaDA2) rather than on LLaDA's full canvas")
    defaults: dict[str, float | int | str | bool | None] = Field(
        description="the sampling settings a request that leaves them out gets (its family's, and the server's)"
    )


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class Health(BaseModel):
    status: Literal["ready", "draining", "dead"]
    model: str
    device: str
    dtype: str
    queue_depth: int
    running_jobs: int


class ErrorDetail(BaseModel):
    message: str
    type: Literal["invalid_request_error", "authentication_error", "overloaded", "timeout", "server_error"]
    param: str | None
    code: str


class ErrorEnvelope(BaseModel):
    error: ErrorDetail
