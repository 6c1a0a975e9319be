"""Batching policy: pure functions that decide admission and which jobs share a step.

No state and no locks here, so each rule is unit-testable on its own; ``Scheduler`` keeps the
state (who is running, in what priority order, which kind ran last) and calls these.

Rules, and why they cannot starve anyone:

* Admission is FIFO *per kind*. A job never overtakes an earlier job of its own kind (the
  first one that does not fit blocks the rest of its kind for this round), so a head job waits
  only for capacity, never for later arrivals. Kinds do not block each other: generate and score
  never share a forward and each has its own row budget, so a score job queued behind a
  generate job that cannot fit yet takes nothing from it.
* Generate capacity: a generate job is admitted only while the running generate jobs' rows
  stay <= ``max_rows`` and its KV-cache pages (fast decoding) can be reserved now (``reserve``:
  the scheduler's KV manager). Therefore all running generate jobs always fit into one step by
  row count, they all step every iteration, and every admitted job holds its cache.
* Score capacity: score work is time-sliced by units, so a score job is admitted while the
  running score jobs' outstanding rows leave room in the next score forward. That keeps just
  enough score jobs running to fill a forward and leaves the rest visible as queue depth
  (and therefore subject to the bound and to 429).
* Every running generate job steps every iteration, all in one packed forward
  (server/engine/runner.py).
* Kinds alternate (round-robin) when both have work, so a flood of either kind gets at most
  every other step.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

from .jobs import Job, JobKind


def admit(
    waiting: Iterable[Job],
    generate_rows: int,
    score_rows: int,
    max_rows: int,
    reserve: Callable[[Job], bool] = lambda job: True,
) -> list[Job]:
    """Which waiting jobs (oldest first) join the running set now.

    ``generate_rows``: rows of the running generate jobs. ``score_rows``: outstanding rows
    (units * rows_per_unit) of the running score jobs. ``reserve(job)`` takes a generate job's
    KV-cache pages, or says they do not fit now. See the module docstring for the rules.
    """
    admitted: list[Job] = []
    blocked: set[JobKind] = set()
    for job in waiting:
        if job.cancelled or job.kind in blocked:
            continue
        if job.kind is JobKind.GENERATE:
            if generate_rows + job.rows_per_unit <= max_rows and reserve(job):
                generate_rows += job.rows_per_unit
                admitted.append(job)
            else:
                blocked.add(job.kind)
        else:
            if score_rows < max_rows:
                score_rows += job.rows
                admitted.append(job)
            else:
                blocked.add(job.kind)
        if len(blocked) == len(JobKind):
            break
    return admitted


def pack_score(jobs: Sequence[Job], max_rows: int) -> dict[str, int]:
    """Grant score units FIFO up to ``max_rows`` rows: job id -> units in this forward.

    The first job with work gets as many units as fit; later jobs fill the remaining rows, and a
    job granted fewer units than it has simply continues in a later step. Jobs with no units left
    (``units == 0``) are skipped.
    """
    grants: dict[str, int] = {}
    rows = 0
    for job in jobs:
        if job.cancelled or job.units <= 0:
            continue
        fit = min(job.units, (max_rows - rows) // job.rows_per_unit)
        if fit > 0:
            grants[job.id] = fit
            rows += fit * job.rows_per_unit
        if rows >= max_rows:
            break
    return grants


def choose_kind(generate_ready: bool, score_ready: bool, last_kind: JobKind | None) -> JobKind | None:
    """Round-robin between kinds that have work; ``None`` when neither has any."""
    if generate_ready and score_ready:
        return JobKind.SCORE if last_kind is JobKind.GENERATE else JobKind.GENERATE
    if generate_ready:
        return JobKind.GENERATE
    if score_ready:
        return JobKind.SCORE
    return None
