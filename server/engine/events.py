"""What the engine tells a request, in plain data: no tensors cross this boundary, and importing
it does not import torch."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Reveal:
    index: int  # answer position
    token_id: int
    confidence: float  # the model's probability of the token
    edit: bool = False  # replaces a token written earlier (LLaDA2.1's editing)


@dataclass(frozen=True)
class GenerationStep:
    step: int
    block: int
    reveals: list[Reveal]
    masked: int
    settled: int | None = None  # answer positions that no later step can change; None: up to the first mask


@dataclass(frozen=True)
class GenerationDone:
    token_ids: list[int]
    steps: int  # forwards that ran for it (usage.nfe)
    queue_s: float
    approximate: bool = False  # a cache, threshold or factor was used (SamplingParams.approximate)


@dataclass(frozen=True)
class ScoreResult:
    loglikelihood: float
    is_greedy: bool | None


@dataclass(frozen=True)
class ScoringDone:
    results: list[ScoreResult]
    rows: int
    queue_s: float


@dataclass(frozen=True)
class JobFailed:
    """code: engine_error | cancelled | timeout | shutdown | engine_dead."""

    code: str
    message: str


TERMINAL = (GenerationDone, ScoringDone, JobFailed)
