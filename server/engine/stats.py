"""The engine's state as the HTTP layer reads it (health, 429 messages). Torch-free."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EngineStats:
    alive: bool
    draining: bool  # admissions closed by a drain; a loop that died is dead, not draining
    queue_depth: int
    running_jobs: int
    max_queue: int
