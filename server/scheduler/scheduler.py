"""The thread-safe scheduler: admission queue + running set + batching policy, behind one lock.

Two threads use it. The asyncio event loop thread calls ``submit`` and ``cancel`` (both return
at once, never block on the worker). The engine worker thread runs the loop::

    while True:
        batch = scheduler.next_batch(timeout=0.1)
        for job in scheduler.drain_cancelled():
            answer_cancelled(job)                     # free engine state, resolve the request
        if batch is None:
            if scheduler.closed and not scheduler.pending():
                break                                 # drained after close(): exit
            continue
        run_step(batch)                               # generate: one step per job;
        for job in batch.jobs:                        # score: batch.units[job.id] rows each
            if done(job):
                scheduler.finish(job.id)              # leaves at once, frees rows for the next step
            elif job.kind is JobKind.SCORE:
                scheduler.update_units(job.id, remaining_rows(job))

Iteration-level batching: a job admitted at one ``next_batch`` is in that very batch, and a
finished job frees its rows for the next call. Work accepted before ``close()`` is still served, so a draining server
finishes in-flight requests.

KV-cache pages: the scheduler's KV manager (kv_pages.py) reserves a job's pages when it is
admitted (``Job.cache_runs``) and takes them back when it leaves: ``finish``, a cancellation
reaped here, or ``drain_all``. No other place frees them.

Over-sized jobs: ``submit`` rejects with ``ValueError`` a job whose ``rows_per_unit`` exceeds
``max_batch_rows`` or whose cache pages exceed ``max_cache_pages`` (chosen over "run it
alone": such a job would break the memory budget the bound exists to protect). The API should
validate earlier and answer 400. A job within the bounds that does not fit now waits.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable

from . import policy
from .admission import AdmissionQueue, DepartureRate
from .jobs import Batch, Job, JobKind, SchedulerClosed
from .kv_pages import KVPages


class Scheduler:
    def __init__(
        self,
        max_batch_rows: int,
        max_queue: int,
        max_cache_pages: int = 0,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_batch_rows < 1:
            raise ValueError("max_batch_rows must be >= 1")
        self.max_batch_rows = max_batch_rows
        self.max_cache_pages = max_cache_pages
        self._kv = KVPages(max_cache_pages)
        self._clock = clock  # only for the Retry-After estimate; injectable for tests

        # One condition guards everything below: the state is small and every operation is
        # short, so finer locking would buy nothing and risk inconsistent snapshots.
        self._cond = threading.Condition()
        self._waiting = AdmissionQueue(max_queue)
        self._departures = DepartureRate()
        self._running: dict[str, Job] = {}
        self._running_generate: list[Job] = []  # all of them step every generate iteration
        self._running_score: list[Job] = []  # admission order = FIFO unit packing
        self._seq: dict[str, int] = {}  # submit order, to hand jobs to the engine in a stable order
        self._counter = itertools.count()
        self._cancelled: list[Job] = []
        self._last_kind: JobKind | None = None
        self._closed = False

    # ----------------------------------------------------------------- event-loop side

    def submit(self, job: Job) -> None:
        """Queue ``job``. Never blocks.

        Raises ``SchedulerClosed`` after ``close()``, ``QueueFull`` (with ``retry_after``) when
        ``max_queue`` jobs are already waiting, ``ValueError`` for a job that can never run.
        """
        with self._cond:
            if self._closed:
                raise SchedulerClosed("scheduler is closed")
            self._validate(job)
            if job.id in self._running or job.id in self._waiting:
                raise ValueError(f"job {job.id} is already submitted")
            self._waiting.push(job, self._departures.retry_after())
            self._seq[job.id] = next(self._counter)
            self._cond.notify_all()

    def cancel(self, job_id: str) -> Job | None:
        """Mark a job cancelled; ``None`` if the scheduler does not know it (e.g. finished).

        A waiting job leaves the queue now. A running job may be mid-forward on the worker, so
        it is only marked, and leaves at the worker's next ``next_batch``. Either way it is
        handed out once by ``drain_cancelled``.
        """
        with self._cond:
            job = self._waiting.remove(job_id)
            if job is not None:
                job.cancelled = True
                self._seq.pop(job_id, None)
                self._cancelled.append(job)
                self._cond.notify_all()
                return job
            job = self._running.get(job_id)
            if job is not None:
                job.cancelled = True
                self._cond.notify_all()
            return job

    def close(self) -> None:
        """Stop accepting work and wake a blocked ``next_batch``. Accepted work still runs."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    # ----------------------------------------------------------------- worker side

    def next_batch(self, timeout: float | None) -> Batch | None:
        """Admit waiting jobs, drop cancelled ones and return the jobs that step now.

        Blocks up to ``timeout`` seconds (``None``: until something happens) while there is no
        work. Returns ``None`` on timeout, at once when closed with no work left, and at once
        when cancelled jobs await ``drain_cancelled()`` (so the worker answers them promptly).
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while True:
                self._reap_cancelled()
                self._admit()
                batch = self._build_batch()
                if batch is not None:
                    return batch
                if self._closed or self._cancelled:
                    return None
                if deadline is None:
                    self._cond.wait()
                else:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        return None
                    self._cond.wait(remaining)

    def update_units(self, job_id: str, units: int) -> None:
        """Set how many units of work a score job still has (0 = none until updated again)."""
        if units < 0:
            raise ValueError("units must be >= 0")
        with self._cond:
            job = self._running.get(job_id)
            if job is None:
                # Waiting jobs may be updated too; unknown ids (already finished) are ignored
                # so the worker never has to special-case a race with cancel().
                job = next((j for j in self._waiting.jobs() if j.id == job_id), None)
                if job is None:
                    return
            if job.kind is not JobKind.SCORE:
                raise ValueError("update_units applies to score jobs only")
            job.units = units
            self._cond.notify_all()

    def finish(self, job_id: str) -> None:
        """Remove a job now; its rows are free for the very next ``next_batch``. Idempotent."""
        with self._cond:
            job = self._running.pop(job_id, None)
            if job is None:
                job = self._waiting.remove(job_id)
                if job is not None:
                    self._seq.pop(job_id, None)
                    self._cond.notify_all()
                return
            self._forget_running(job)
            self._departures.record(self._clock())
            self._cond.notify_all()

    def drain_cancelled(self) -> list[Job]:
        """Cancelled jobs not yet handed out (each exactly once), oldest cancellation first."""
        with self._cond:
            jobs, self._cancelled = self._cancelled, []
            return jobs

    # ----------------------------------------------------------------- shutdown / introspection

    def pending(self) -> list[Job]:
        """Every running then waiting job (not yet finished or handed out as cancelled)."""
        with self._cond:
            return list(self._running.values()) + self._waiting.jobs()

    def drain_all(self) -> list[Job]:
        """Remove and return every job the scheduler holds, cancelled-but-undrained included.

        For a dead worker: after ``close()``, answer each returned job with an error; the
        gauges (``queue_depth``, ``running``) are 0 afterwards.
        """
        with self._cond:
            for job in self._running.values():
                self._release_pages(job)
            jobs = self._cancelled + list(self._running.values()) + self._waiting.clear()
            self._cancelled = []
            self._running.clear()
            self._running_generate.clear()
            self._running_score.clear()
            self._seq.clear()
            self._cond.notify_all()
            return jobs

    @property
    def queue_depth(self) -> int:
        with self._cond:
            return len(self._waiting)

    @property
    def running(self) -> int:
        with self._cond:
            return len(self._running)

    @property
    def cache_pages_in_use(self) -> int:
        with self._cond:
            return self._kv.in_use

    @property
    def closed(self) -> bool:
        with self._cond:
            return self._closed

    @property
    def max_queue(self) -> int:
        return self._waiting.max_size

    # ----------------------------------------------------------------- internals (lock held)

    def _validate(self, job: Job) -> None:
        if job.length < 1:
            raise ValueError("job.length must be >= 1")
        if job.rows_per_unit < 1:
            raise ValueError("job.rows_per_unit must be >= 1")
        if job.rows_per_unit > self.max_batch_rows:
            raise ValueError(f"job needs {job.rows_per_unit} rows per unit but max_batch_rows is {self.max_batch_rows}")
        if job.cache_pages * job.rows_per_unit > self.max_cache_pages:
            pages = job.cache_pages * job.rows_per_unit
            raise ValueError(f"job needs {pages} KV-cache pages but the budget is {self.max_cache_pages}")
        if job.kind is JobKind.GENERATE and job.units != 1:
            raise ValueError("generate jobs have exactly 1 unit")
        if job.units < 0:
            raise ValueError("job.units must be >= 0")
        if job.cancelled:
            raise ValueError("job is already cancelled")

    def _forget_running(self, job: Job) -> None:
        self._release_pages(job)
        self._seq.pop(job.id, None)
        lst = self._running_generate if job.kind is JobKind.GENERATE else self._running_score
        lst[:] = [j for j in lst if j is not job]

    def _reap_cancelled(self) -> None:
        for job in [j for j in self._running.values() if j.cancelled]:
            del self._running[job.id]
            self._forget_running(job)
            self._departures.record(self._clock())
            self._cancelled.append(job)

    def _admit(self) -> None:
        if not len(self._waiting):
            return
        generate_rows = sum(j.rows_per_unit for j in self._running_generate)
        score_rows = sum(j.rows for j in self._running_score)
        admitted = policy.admit(iter(self._waiting), generate_rows, score_rows, self.max_batch_rows, self._reserve)
        self._waiting.remove_many(admitted)
        for job in admitted:
            self._running[job.id] = job
            # New generate jobs go behind everyone (they are no more overdue than a job that
            # stepped last iteration), so arrivals can never push an older job out.
            (self._running_generate if job.kind is JobKind.GENERATE else self._running_score).append(job)

    def _reserve(self, job: Job) -> bool:
        if not job.cache_pages:
            return True
        runs = self._kv.allocate([job.cache_pages] * job.rows_per_unit)
        if runs is None:
            return False
        job.cache_runs = runs
        return True

    def _release_pages(self, job: Job) -> None:
        self._kv.release([(first, job.cache_pages) for first in job.cache_runs])
        job.cache_runs = []

    def _build_batch(self) -> Batch | None:
        generate_ready = bool(self._running_generate)
        score_ready = any(j.units > 0 for j in self._running_score)
        kind = policy.choose_kind(generate_ready, score_ready, self._last_kind)
        if kind is None:
            return None
        if kind is JobKind.GENERATE:
            chosen = list(self._running_generate)
            units = {j.id: 1 for j in chosen}
        else:
            units = policy.pack_score(self._running_score, self.max_batch_rows)
            chosen = [j for j in self._running_score if j.id in units]
        self._last_kind = kind
        jobs = sorted(chosen, key=lambda j: self._seq[j.id])
        return Batch(kind=kind, jobs=jobs, units=units, rows=sum(units[j.id] * j.rows_per_unit for j in jobs))
