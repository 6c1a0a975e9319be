"""Batching policy: pure functions that decide admission and which jobs share a forward.

No state and no locks here, so each rule is unit-testable on its own; ``Scheduler`` keeps the
state (who is running, in what priority order, which kind ran last) and calls these.

Rules, and why they cannot starve anyone:

* Admission is FIFO *per kind*. A job never overtakes an earlier job of its own kind (the
  first one that does not fit blocks the rest of its kind for this round), so a head job waits
  only for capacity, never for later arrivals. Kinds do not block each other: generate and score
  never share a forward and each has its own row budget, so a score job queued behind a
  generate job that cannot fit yet takes nothing from it.
* Generate capacity: a generate job is admitted only while the running generate jobs' rows
  stay <= ``max_rows``. Therefore all running generate jobs always fit into one forward by row
  count, and when padding allows it they all step every iteration.
* Score capacity: score work is time-sliced by units, so a score job is admitted while the
  running score jobs' outstanding rows leave room in the next score forward. That keeps just
  enough score jobs running to fill a forward and leaves the rest visible as queue depth
  (and therefore subject to the bound and to 429).
* Padding: rows of different lengths are padded to the longest in the forward. If the whole
  running generate set would waste more than ``max_waste`` of the forward's token positions,
  the forward is built around the most overdue job (the *anchor*, always included) and filled
  with same-length jobs first, then the nearest lengths, while waste stays within the bound.
  The caller rotates stepped jobs to the back of the priority order, so every running job
  becomes the anchor within (number of running jobs) generate forwards.
* Kinds alternate (round-robin) when both have work, so a flood of either kind gets at most
  every other forward.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from .jobs import Job, JobKind

# Waste is a ratio of integers; this absorbs float rounding when it lands exactly on the bound.
_EPS = 1e-9


def padding_waste(entries: Iterable[tuple[Job, int]]) -> float:
    """1 - real tokens / (rows * padded_length) for ``(job, units)`` pairs sharing a forward."""
    real = rows = padded = 0
    for job, units in entries:
        n = units * job.rows_per_unit
        if n <= 0:
            continue
        real += n * job.length
        rows += n
        padded = max(padded, job.length)
    if rows == 0:
        return 0.0
    return 1.0 - real / (rows * padded)


def _waste(real: int, rows: int, padded: int) -> float:
    return 1.0 - real / (rows * padded) if rows else 0.0


def admit(waiting: Iterable[Job], generate_rows: int, score_rows: int, max_rows: int) -> list[Job]:
    """Which waiting jobs (oldest first) join the running set now.

    ``generate_rows``: rows of the running generate jobs. ``score_rows``: outstanding rows
    (units * rows_per_unit) of the running score jobs. See the module docstring for the rules.
    """
    admitted: list[Job] = []
    blocked: set[JobKind] = set()
    for job in waiting:
        if job.cancelled or job.kind in blocked:
            continue
        if job.kind is JobKind.GENERATE:
            if generate_rows + job.rows_per_unit <= max_rows:
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


def select_generate(jobs: Sequence[Job], max_rows: int, max_waste: float) -> list[Job]:
    """Choose the generate jobs that step in this forward.

    ``jobs`` is in priority order, most overdue first; ``jobs[0]`` (the anchor) is always in
    the result, which is what guarantees progress. Result keeps the priority order of ``jobs``.
    """
    if not jobs:
        return []
    # Common case first: everyone fits and padding is acceptable -> everyone steps.
    total_rows = sum(j.rows_per_unit for j in jobs)
    if total_rows <= max_rows and padding_waste((j, 1) for j in jobs) <= max_waste + _EPS:
        return list(jobs)

    anchor = jobs[0]
    chosen = {anchor.id}
    rows = anchor.rows_per_unit
    real = anchor.rows_per_unit * anchor.length
    padded = anchor.length
    # Same length as the anchor first, then nearest lengths; sorted() is stable, so equal
    # distances keep priority order (the more overdue job wins the tie).
    for job in sorted(jobs[1:], key=lambda j: abs(j.length - anchor.length)):
        n = job.rows_per_unit
        if rows + n > max_rows:
            continue
        new_padded = max(padded, job.length)
        new_real = real + n * job.length
        if _waste(new_real, rows + n, new_padded) > max_waste + _EPS:
            continue
        chosen.add(job.id)
        rows, real, padded = rows + n, new_real, new_padded
    return [j for j in jobs if j.id in chosen]


def pack_score(jobs: Sequence[Job], max_rows: int, max_waste: float) -> dict[str, int]:
    """Grant score units FIFO up to ``max_rows`` rows: job id -> units in this forward.

    The first job with work gets as many units as fit (it alone cannot waste padding). Later
    jobs fill the remaining rows, each with the most units that keep padding within
    ``max_waste``; a job granted fewer units than it has simply continues in a later forward.
    Jobs with no units left (``units == 0``) are skipped.
    """
    grants: dict[str, int] = {}
    rows = real = padded = 0
    for job in jobs:
        if job.cancelled or job.units <= 0:
            continue
        fit = min(job.units, (max_rows - rows) // job.rows_per_unit)
        new_padded = max(padded, job.length)
        # Adding shorter rows raises waste with every unit and adding rows at the new maximum
        # lowers it, so scanning down from the most that fit finds the largest allowed grant.
        for k in range(fit, 0, -1):
            n = k * job.rows_per_unit
            if not grants or _waste(real + n * job.length, rows + n, new_padded) <= max_waste + _EPS:
                grants[job.id] = k
                rows, real, padded = rows + n, real + n * job.length, new_padded
                break
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
