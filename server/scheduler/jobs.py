"""The scheduler's vocabulary: jobs, the batch handed to the engine worker, and its errors.

Everything here is plain data. The engine's request (its per-job state) is ``Job.payload``; the
scheduler never looks inside it, which is what keeps this package free of torch.
"""

from __future__ import annotations

import enum
import time
import uuid
from dataclasses import dataclass, field


class JobKind(enum.Enum):
    """What a job's forward rows do. Kinds never share a forward (their inputs differ)."""

    GENERATE = "generate"
    SCORE = "score"


def _new_id() -> str:
    return uuid.uuid4().hex


@dataclass(eq=False)  # identity equality: two jobs with equal fields are still two requests
class Job:
    """One request as the scheduler sees it.

    ``rows_per_unit`` is 2 when classifier-free guidance needs a conditional and an
    unconditional row, else 1. ``units`` is how much work a job wants in one forward:
    a generate job always wants exactly one unit (one denoising step of its rows), a score job
    wants as many Monte-Carlo rows as remain (the worker lowers it via ``update_units``).
    """

    kind: JobKind
    length: int
    rows_per_unit: int
    units: int = 1
    cache_pages: int = 0  # KV-cache pages each of its rows holds while it runs (fast decoding)
    payload: object = None
    id: str = field(default_factory=_new_id)
    enqueued_at: float = field(default_factory=time.monotonic)
    cancelled: bool = False
    cache_runs: list[int] = field(default_factory=list)  # first page of each row's run, from admission

    @property
    def rows(self) -> int:
        """Rows this job would occupy if all its units ran in one forward."""
        return self.units * self.rows_per_unit


@dataclass
class Batch:
    """The jobs that share one step, and how many units each one gets in it (the engine turns
    the step into forwards)."""

    kind: JobKind
    jobs: list[Job]
    units: dict[str, int]
    rows: int


class QueueFull(Exception):
    """The admission queue is at its bound; the API answers 429 with ``Retry-After``."""

    def __init__(self, retry_after: float, message: str | None = None) -> None:
        self.retry_after = retry_after
        super().__init__(message or f"queue is full; retry after {retry_after:.2f}s")


class SchedulerClosed(Exception):
    """``submit`` after ``close()``: the server is draining or shutting down (the API answers 503)."""
