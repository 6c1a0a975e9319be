"""The engine: it owns the model, its scheduler and the one thread that runs the step loop.

Callers (the HTTP layer's engine client) use only `submit_generate`, `submit_score`, `cancel`,
`stats`, `info` and the lifecycle calls; everything they pass and receive is torch-free
(sampling_params, events, model_info, stats). Each iteration asks the scheduler which jobs share
the next step, runs it (the denoiser or the scorer turns it into forwards), and hands every job
its events through its sink, a thread-safe callable supplied by the caller.

Failures stay with the jobs they hit. A step is a transaction (denoiser.py): a forward or LM-head
call that raises fails its own jobs and the rest of the step goes on; out of memory leaves every
job as it was and the step's jobs are retried as smaller groups, down to single jobs, and only a
job that fails alone fails. If the loop itself dies, every job still held is answered.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from server.engine.denoiser import DenoiseJob, Denoiser, cache_pages_for
from server.engine.errors import RequestTooLarge
from server.engine.events import GenerationDone, GenerationStep, JobFailed, ScoringDone
from server.engine.faults import FaultInjector
from server.engine.hooks import ForwardHooks
from server.engine.kv_cache import PAGE_TOKENS, bytes_per_token
from server.engine.likelihood import Scorer, ScoringJob
from server.engine.loader import LoadedModel
from server.engine.model_info import ModelInfo
from server.engine.sampling_params import SamplingParams, ScoreParams
from server.engine.stats import EngineStats
from server.metrics import Metrics
from server.scheduler import Batch, Job, JobKind, Scheduler

log = logging.getLogger("llada.engine")

Sink = Callable[[object], None]


@dataclass(frozen=True)
class EngineSettings:
    max_batch_rows: int = 16
    max_queue: int = 64
    max_cache_bytes: int | None = None  # None: a share of free CUDA memory, or CPU_CACHE_BYTES
    inject_faults: str | None = None  # test only: see faults.py


CPU_CACHE_BYTES = 2 * 2**30
CUDA_CACHE_SHARE = 0.4  # of the device memory free once the model is loaded


def cache_budget(settings: EngineSettings, device: torch.device) -> int:
    if settings.max_cache_bytes is not None:
        return settings.max_cache_bytes
    if device.type == "cuda":
        return int(CUDA_CACHE_SHARE * torch.cuda.mem_get_info(device)[0])
    return CPU_CACHE_BYTES


@dataclass(eq=False)
class WorkItem:
    sink: Sink
    submitted: float
    prompt_ids: list[int] | None = None  # generation: made into a DenoiseJob by the engine thread
    params: SamplingParams | None = None
    report_steps: bool = False  # a JSON request needs only its final event
    engine_job: DenoiseJob | ScoringJob | None = None
    started: float | None = None


class Engine:
    def __init__(
        self, loaded: LoadedModel, settings: EngineSettings, metrics: Metrics | None = None, poll_s: float = 0.05
    ):
        self.loaded = loaded
        self.info: ModelInfo = loaded.info
        self.page_bytes = bytes_per_token(loaded.config, loaded.dtype) * PAGE_TOKENS
        cache_pages = cache_budget(settings, loaded.device) // self.page_bytes
        self.scheduler = Scheduler(settings.max_batch_rows, settings.max_queue, cache_pages)
        self.metrics = metrics or Metrics()
        self.metrics.kv_cache_capacity_bytes.set(cache_pages * self.page_bytes)
        hooks = ForwardHooks(FaultInjector(settings.inject_faults), self.metrics)
        self.denoiser = Denoiser(loaded, hooks, cache_pages)
        self.scorer = Scorer(loaded, hooks)
        self.poll_s = poll_s
        self.death: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="llada-engine", daemon=True)

    # ------------------------------------------------------------------ caller side

    def start(self) -> None:
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and self.death is None

    @property
    def draining(self) -> bool:
        """Admissions closed by close()/drain(); a loop that died is dead, not draining."""
        return self.scheduler.closed and self.death is None

    def stats(self) -> EngineStats:
        return EngineStats(
            alive=self.alive,
            draining=self.draining,
            queue_depth=self.scheduler.queue_depth,
            running_jobs=self.scheduler.running,
            max_queue=self.scheduler.max_queue,
        )

    def submit_generate(self, prompt_ids: list[int], params: SamplingParams, sink: Sink, report_steps: bool) -> str:
        """report_steps: send a GenerationStep per step (streams); otherwise only the final event,
        which spares the event loop a wake-up per step. Raises RequestTooLarge for a cache that
        could never fit."""
        pages = cache_pages_for(len(prompt_ids), params)
        if pages > self.scheduler.max_cache_pages:
            needs, allows = pages * self.page_bytes / 2**20, self.scheduler.max_cache_pages * self.page_bytes / 2**20
            raise RequestTooLarge(
                "cache",
                f"this request's KV cache needs {needs:.1f} MiB but --max-cache-memory allows {allows:.1f} MiB; "
                "use cache none, a shorter request, or a larger --max-cache-memory",
            )
        job = Job(
            JobKind.GENERATE,
            length=len(prompt_ids) + params.gen_length,
            rows_per_unit=params.rows,
            cache_pages=pages,
            payload=WorkItem(sink, time.monotonic(), list(prompt_ids), params, report_steps),
        )
        if len(params.constraints) == params.gen_length:  # every answer position is pinned
            sink(GenerationDone([token for _, token in sorted(params.constraints)], 0, 0.0, params.approximate))
            return job.id
        return self._submit(job)

    def submit_score(self, pairs: list[tuple[list[int], list[int]]], params: ScoreParams, sink: Sink) -> str:
        engine_job = self.scorer.new_job(pairs, params)
        job = Job(
            JobKind.SCORE,
            length=max(len(a) + len(b) for a, b in pairs),
            rows_per_unit=params.rows_per_unit,
            units=engine_job.units,
            payload=WorkItem(sink, time.monotonic(), engine_job=engine_job),
        )
        return self._submit(job)

    def _submit(self, job: Job) -> str:
        self.scheduler.submit(job)
        self._update_gauges()
        return job.id

    def cancel(self, job_id: str) -> None:
        self.scheduler.cancel(job_id)

    def close(self) -> None:
        """Stop admitting new work (draining); accepted work still runs."""
        self.scheduler.close()

    def drain(self, grace_s: float) -> bool:
        """Stop admitting, let accepted work finish for up to grace_s; True if all finished."""
        self.close()
        deadline = time.monotonic() + grace_s
        while self.scheduler.pending() and time.monotonic() < deadline and self.alive:
            time.sleep(0.05)
        return not self.scheduler.pending()

    def stop(self) -> None:
        """End the loop; whatever is still held is answered with a shutdown error."""
        self._stop.set()
        self._thread.join(timeout=30)
        self._fail_all("shutdown", "the server shut down before this request finished")

    # ------------------------------------------------------------------ engine thread

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self._answer_cancelled()
                batch = self.scheduler.next_batch(timeout=self.poll_s)
                self._answer_cancelled()
                if batch is not None:
                    start = time.perf_counter()
                    self._run_batch(batch)
                    self.metrics.loop_iteration_seconds.observe(time.perf_counter() - start)
                self._update_gauges()
        except BaseException as exc:  # the loop itself broke: health must say so
            self.death = f"{type(exc).__name__}: {exc}"
            log.exception("engine loop died")
        finally:
            if self.death is not None:
                self._fail_all("engine_dead", f"the engine stopped: {self.death}")

    def _run_batch(self, batch: Batch) -> None:
        now = time.monotonic()
        jobs = []
        for job in batch.jobs:
            item: WorkItem = job.payload
            if item.started is None:
                item.started = now
                self.metrics.queue_wait_seconds.observe(now - item.submitted)
            if item.engine_job is None:  # made here, so the device is touched by this thread only
                try:
                    item.engine_job = self.denoiser.new_job(item.prompt_ids, item.params, item.report_steps)
                except Exception as exc:  # the first cached job allocates the KV pool: it may not fit
                    self._fail([job], "engine_error", f"the request could not start: {type(exc).__name__}: {exc}")
                    continue
            jobs.append(job)
        if not jobs:
            return
        if batch.kind is JobKind.GENERATE:
            self._generate(jobs)
        else:
            self._score([(job, batch.units[job.id]) for job in jobs])
        if self.loaded.device.type == "cuda":
            self.metrics.observe_device_memory(torch.cuda.memory_allocated(), torch.cuda.memory_reserved())

    def _generate(self, jobs: list[Job]) -> None:
        groups = [jobs]
        while groups:
            group = groups.pop(0)
            by_engine_job = {id(job.payload.engine_job): job for job in group}
            try:
                result = self.denoiser.step([job.payload.engine_job for job in group])
            except torch.OutOfMemoryError:
                if len(group) == 1:
                    self._fail(group, "engine_error", "out of device memory for a single request")
                    continue
                log.warning("out of memory at %d jobs: retrying as two batches", len(group))
                _release_cached_memory(self.loaded.device)
                half = len(group) // 2
                groups[:0] = [group[:half], group[half:]]
                continue
            for engine_jobs, exc in result.failed:
                failed = [by_engine_job[id(j)] for j in engine_jobs]
                self._fail(failed, "engine_error", f"the forward pass failed: {type(exc).__name__}: {exc}")
            self._deliver(result.events, by_engine_job)

    def _deliver(self, events, by_engine_job: dict[int, Job]) -> None:
        now = time.monotonic()
        for event in events:
            job = by_engine_job[id(event.job)]
            item: WorkItem = job.payload
            if event.step == 1:
                self.metrics.time_to_first_step_seconds.observe(now - item.submitted)
            if item.report_steps:
                item.sink(GenerationStep(event.step, event.block, event.reveals, event.masked))
            self.metrics.generated_tokens_total.inc(event.revealed)
            if event.finished:
                self._leave(job)
                done = GenerationDone(
                    event.job.answer, event.step, item.started - item.submitted, item.params.approximate
                )
                item.sink(done)
        self.metrics.denoise_steps_total.inc(len(events))

    def _score(self, work: list[tuple[Job, int]]) -> None:
        groups = [work]
        while groups:
            group = groups.pop(0)
            scoring = {id(job.payload.engine_job): job for job, _ in group}
            before = {job.id: job.payload.engine_job.rows_done for job, _ in group}
            try:
                result = self.scorer.step([(job.payload.engine_job, units) for job, units in group])
            except torch.OutOfMemoryError:
                if len(group) == 1 and group[0][1] == 1:
                    self._fail([group[0][0]], "engine_error", "out of device memory for a single scoring row")
                    continue
                log.warning("out of memory at %d scoring rows: retrying with half", sum(u for _, u in group))
                _release_cached_memory(self.loaded.device)
                if len(group) > 1:
                    half = len(group) // 2
                    groups[:0] = [group[:half], group[half:]]
                else:  # one job: fewer of its units now, the rest in later steps
                    groups.insert(0, [(group[0][0], group[0][1] // 2)])
                continue
            failed = {id(job) for jobs, _ in result.failed for job in jobs}
            for jobs, exc in result.failed:
                self._fail([scoring[id(j)] for j in jobs], "engine_error", f"the forward pass failed: {exc}")
            for job, _ in group:
                engine_job: ScoringJob = job.payload.engine_job
                if id(engine_job) in failed:
                    continue
                self.metrics.loglikelihood_samples_total.inc(engine_job.rows_done - before[job.id])
                if engine_job.finished:
                    self._leave(job)
                    item: WorkItem = job.payload
                    item.sink(ScoringDone(engine_job.results, engine_job.rows_done, item.started - item.submitted))
                else:
                    self.scheduler.update_units(job.id, engine_job.units)

    def _leave(self, job: Job) -> None:
        """The one way out of the scheduler for a job that ran: its cache pages go back too."""
        self.scheduler.finish(job.id)
        self._release(job)

    def _release(self, job: Job) -> None:
        if isinstance(job.payload.engine_job, DenoiseJob):
            self.denoiser.release(job.payload.engine_job)

    def _fail(self, jobs: list[Job], code: str, message: str) -> None:
        log.error("%s: failing %d job(s): %s", code, len(jobs), message)
        self.metrics.engine_errors_total.inc()
        for job in jobs:
            self._leave(job)
            job.payload.sink(JobFailed(code, message))

    def _answer_cancelled(self) -> None:
        for job in self.scheduler.drain_cancelled():  # already out of the scheduler
            self._release(job)
            self.metrics.cancelled_total.inc()
            job.payload.sink(JobFailed("cancelled", "the request was cancelled"))

    def _fail_all(self, code: str, message: str) -> None:
        self.scheduler.close()
        for job in self.scheduler.drain_all():
            self._release(job)
            job.payload.sink(JobFailed("cancelled" if job.cancelled else code, message))
        self._update_gauges()

    def _update_gauges(self) -> None:
        self.metrics.queue_depth.set(self.scheduler.queue_depth)
        self.metrics.running_jobs.set(self.scheduler.running)
        pool = self.denoiser.pool
        self.metrics.kv_cache_bytes.set(pool.bytes_in_use if pool else 0)


def _release_cached_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
