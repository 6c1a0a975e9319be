"""The bounded admission queue and the Retry-After estimate that goes with it.

Neither class locks: the ``Scheduler`` owns one condition variable and calls these only while
holding it, so a second lock here would only add a lock-ordering hazard.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Iterable, Iterator

from .jobs import Job, QueueFull


class DepartureRate:
    """Estimates how long until a queue slot frees, from recent departures of running jobs.

    A waiting slot frees when the head job is admitted, and that happens when a running job
    leaves; so the mean interval between recent departures is the natural guess for
    Retry-After. Until two departures are seen there is no rate, and ``default`` is used.
    """

    def __init__(self, window: int = 32, default: float = 1.0, floor: float = 0.05, ceiling: float = 60.0) -> None:
        if window < 2:
            raise ValueError("window must be >= 2")
        self._times: deque[float] = deque(maxlen=window)
        self._default = default
        self._floor = floor
        self._ceiling = ceiling

    def record(self, now: float) -> None:
        self._times.append(now)

    def retry_after(self) -> float:
        """Seconds, always > 0: clients told "0" would retry in a tight loop."""
        if len(self._times) < 2:
            estimate = self._default
        else:
            estimate = (self._times[-1] - self._times[0]) / (len(self._times) - 1)
        return min(self._ceiling, max(self._floor, estimate))


class AdmissionQueue:
    """FIFO of jobs that are accepted but not yet running, with a hard bound.

    Backed by an ``OrderedDict`` so that cancelling a waiting job is O(1) and arrival order is
    kept for FIFO admission.
    """

    def __init__(self, max_size: int) -> None:
        if max_size < 1:
            raise ValueError("max_queue must be >= 1")
        self.max_size = max_size
        self._jobs: OrderedDict[str, Job] = OrderedDict()

    def push(self, job: Job, retry_after: float) -> None:
        """Append ``job``; raise ``QueueFull`` at once when the bound is reached (never block)."""
        if len(self._jobs) >= self.max_size:
            raise QueueFull(retry_after)
        self._jobs[job.id] = job

    def remove(self, job_id: str) -> Job | None:
        return self._jobs.pop(job_id, None)

    def remove_many(self, jobs: Iterable[Job]) -> None:
        for job in jobs:
            self._jobs.pop(job.id, None)

    def jobs(self) -> list[Job]:
        """Waiting jobs, oldest first."""
        return list(self._jobs.values())

    def __iter__(self) -> Iterator[Job]:
        """Waiting jobs, oldest first, without copying (do not mutate while iterating)."""
        return iter(self._jobs.values())

    def clear(self) -> list[Job]:
        jobs = list(self._jobs.values())
        self._jobs.clear()
        return jobs

    def __contains__(self, job_id: object) -> bool:
        return job_id in self._jobs

    def __len__(self) -> int:
        return len(self._jobs)
