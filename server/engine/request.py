"""What every engine request carries besides its work: its id (the scheduler's job id), where its
events go, and when it arrived and started. DenoiseJob and ScoringJob extend it, so a request is
one object from submission to its last event."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from server.engine.events import Reveal

Sink = Callable[[object], None]


def discard(event: object) -> None:
    """The sink of a request run outside a server (tests, benches): its events go nowhere."""


@dataclass(eq=False, kw_only=True)
class Request:
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    sink: Sink = discard
    submitted: float = field(default_factory=time.monotonic)
    started: float | None = None


@dataclass(frozen=True)
class StepEvent:
    """What one step did to a generation request (a decoding policy's `commit` makes it)."""

    job: Request
    step: int  # 1-based count of this job's steps so far
    block: int
    revealed: int  # masked positions written this step (edits not counted)
    reveals: list[Reveal]  # only for jobs that report steps
    masked: int  # answer positions still masked after this step
    finished: bool
    settled: int | None = None  # answer positions no later step can change (None: up to the first mask)
