"""What the engine worker tells a request, in plain data (no tensors cross this boundary)."""

from __future__ import annotations

from dataclasses import dataclass

from server.engine.denoiser import Reveal
from server.engine.likelihood import ScoreResult


@dataclass(frozen=True)
class GenerationStep:
    step: int
    block: int
    reveals: list[Reveal]
    masked: int


@dataclass(frozen=True)
class GenerationDone:
    token_ids: list[int]
    steps: int
    queue_s: float


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
