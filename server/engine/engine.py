"""The engine: it owns the model, its scheduler and the one thread that runs the step loop.

Callers (the HTTP layer's engine client) use only `submit_generate`, `submit_score`, `cancel`,
`stats`, `info` and the lifecycle calls; everything they pass and receive is torch-free
(sampling_params, events, model_info, stats). A request is one object (request.py: a DenoiseJob
or a ScoringJob) keyed by its id, which is also its scheduler job's id. Each iteration asks the
scheduler for the next plan (which jobs share the step; the scheduler also reserved their KV
pages), runs it (the denoiser or the scorer turns it into one forward) and hands every request
its events through its sink, a thread-safe callable supplied by the caller.

Failures stay with the jobs they hit. A step is a transaction (denoiser.py): a forward or LM-head
call that raises fails its own jobs and the loop goes on; out of memory leaves every job as it
was and the step's jobs are retried as smaller groups, down to single jobs, and only a job that
fails alone fails. A device error that poisons the context (devices.is_fatal: anything but out
of memory on CUDA) ends the engine, as does a loop that dies: every job still held is answered
and /health says so, so that a replica is replaced.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from dataclasses import dataclass

import torch

from server.engine.denoiser import Denoiser
from server.engine.devices import is_fatal
from server.engine.errors import RequestTooLarge
from server.engine.events import GenerationDone, GenerationStep, JobFailed, ScoringDone
from server.engine.faults import FaultInjector, FaultyModel
from server.engine.kv_cache import PAGE_TOKENS, KVPool, bytes_per_token
from server.engine.likelihood import Scorer, ScoringJob
from server.engine.loader import LoadedModel
from server.engine.model_info import ModelInfo
from server.engine.request import Request, Sink
from server.engine.runner import ForwardMetrics
from server.engine.sampling_params import SamplingParams, ScoreParams
from server.engine.stats import EngineStats
from server.metrics import Metrics
from server.scheduler import Batch, Job, JobKind, Scheduler

log = logging.getLogger("llada.engine")


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


class Engine:
    def __init__(
        self, loaded: LoadedModel, settings: EngineSettings, metrics: Metrics | None = None, poll_s: float = 0.05
    ):
        """Allocates the KV-cache pool now: PoolTooLarge (a DeviceError) if it does not fit."""
        if settings.inject_faults:
            loaded = dataclasses.replace(loaded, model=FaultyModel(loaded.model, FaultInjector(settings.inject_faults)))
        self.loaded = loaded
        self.device = loaded.device
        self.info: ModelInfo = loaded.info
        self.page_bytes = bytes_per_token(loaded.config, loaded.dtype) * PAGE_TOKENS
        cache_pages = cache_budget(settings, self.device) // self.page_bytes
        self.pool = KVPool(loaded.config, cache_pages, self.device, loaded.dtype) if cache_pages else None
        self.scheduler = Scheduler(settings.max_batch_rows, settings.max_queue, cache_pages)
        self.metrics = metrics or Metrics()
        self.metrics.kv_cache_capacity_bytes.set(cache_pages * self.page_bytes)
        timing = ForwardMetrics(self.metrics)
        self.denoiser = Denoiser(loaded, self.pool, timing=timing)
        self.scorer = Scorer(loaded, timing)
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
        pages = self.denoiser.cache_pages(len(prompt_ids), params)
        if pages * params.rows > self.scheduler.max_cache_pages:
            needs = pages * params.rows * self.page_bytes / 2**20
            allows = self.scheduler.max_cache_pages * self.page_bytes / 2**20
            # a block-diffusion model always caches: only the request's length can change
            param, option = ("gen_length", "") if self.info.block_diffusion else ("cache", "use cache none, ")
            raise RequestTooLarge(
                param,
                f"this request's KV cache needs {needs:.1f} MiB but --max-cache-memory allows {allows:.1f} MiB; "
                f"{option}a shorter request, or a larger --max-cache-memory",
            )
        request = self.denoiser.new_job(prompt_ids, params, report_steps, sink=sink)
        if len(params.constraints) == params.gen_length:  # every answer position is pinned
            sink(GenerationDone(request.answer, 0, 0.0, params.approximate))
            return request.id
        job = Job(JobKind.GENERATE, len(prompt_ids) + params.gen_length, params.rows, cache_pages=pages)
        return self._submit(job, request)

    def submit_score(self, pairs: list[tuple[list[int], list[int]]], params: ScoreParams, sink: Sink) -> str:
        request = self.scorer.new_job(pairs, params, sink=sink)
        length = max(len(a) + len(b) for a, b in pairs)
        job = Job(JobKind.SCORE, length, params.rows_per_unit, units=request.units)
        return self._submit(job, request)

    def _submit(self, job: Job, request: Request) -> str:
        job.id, job.payload = request.id, request
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
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)
            while not self._stop.is_set():
                self._answer_cancelled()
                batch = self.scheduler.next_batch(timeout=self.poll_s)
                self._answer_cancelled()
                if batch is not None:
                    start = time.perf_counter()
                    self._run_batch(batch)
                    self.metrics.loop_iteration_seconds.observe(time.perf_counter() - start)
                self._update_gauges()
        except BaseException as exc:  # the loop itself broke, or the device did: health must say so
            self.death = f"{type(exc).__name__}: {exc}"
            log.exception("engine loop died")
        finally:
            if self.death is not None:
                self._fail_all("engine_dead", f"the engine stopped: {self.death}")

    def _run_batch(self, batch: Batch) -> None:
        now = time.monotonic()
        for job in batch.jobs:
            request = job.payload
            if request.started is None:
                request.started = now
                self.metrics.queue_wait_seconds.observe(now - request.submitted)
                if job.cache_runs:
                    request.cache_slots = [first * PAGE_TOKENS for first in job.cache_runs]
        if batch.kind is JobKind.GENERATE:
            self._generate(batch.jobs)
        else:
            self._score([(job, batch.units[job.id]) for job in batch.jobs])
        if self.device.type == "cuda":
            self.metrics.observe_device_memory(
                torch.cuda.memory_allocated(self.device), torch.cuda.memory_reserved(self.device)
            )

    def _generate(self, jobs: list[Job]) -> None:
        groups = [jobs]
        while groups:
            group = groups.pop(0)
            try:
                result = self.denoiser.step([job.payload for job in group])
            except torch.OutOfMemoryError:
                if len(group) == 1:
                    self._fail(group, "engine_error", "out of device memory for a single request")
                    continue
                log.warning("out of memory at %d jobs: retrying as two batches", len(group))
                _release_cached_memory(self.device)
                half = len(group) // 2
                groups[:0] = [group[:half], group[half:]]
                continue
            by_id = {job.id: job for job in group}
            for requests, exc in result.failed:
                _raise_if_fatal(exc)
                failed = [by_id[r.id] for r in requests]
                self._fail(failed, "engine_error", f"the forward pass failed: {type(exc).__name__}: {exc}")
            self._deliver(result.events, by_id)

    def _deliver(self, events, by_id: dict[str, Job]) -> None:
        now = time.monotonic()
        for request_id, event in events.items():
            request = event.job
            if event.step == 1:
                self.metrics.time_to_first_step_seconds.observe(now - request.submitted)
            if request.report_steps:
                request.sink(GenerationStep(event.step, event.block, event.reveals, event.masked, event.settled))
            self.metrics.generated_tokens_total.inc(event.revealed)
            if event.finished:
                self.scheduler.finish(request_id)
                queued = request.started - request.submitted
                request.sink(GenerationDone(request.answer, event.step, queued, request.approximate))
        self.metrics.denoise_steps_total.inc(len(events))

    def _score(self, work: list[tuple[Job, int]]) -> None:
        groups = [work]
        while groups:
            group = groups.pop(0)
            before = {job.id: job.payload.rows_done for job, _ in group}
            try:
                result = self.scorer.step([(job.payload, units) for job, units in group])
            except torch.OutOfMemoryError:
                if len(group) == 1 and group[0][1] == 1:
                    self._fail([group[0][0]], "engine_error", "out of device memory for a single scoring row")
                    continue
                log.warning("out of memory at %d scoring rows: retrying with half", sum(u for _, u in group))
                _release_cached_memory(self.device)
                if len(group) > 1:
                    half = len(group) // 2
                    groups[:0] = [group[:half], group[half:]]
                else:  # one job: fewer of its units now, the rest in later steps
                    groups.insert(0, [(group[0][0], group[0][1] // 2)])
                continue
            by_id = {job.id: job for job, _ in group}
            failed = {r.id for requests, _ in result.failed for r in requests}
            for requests, exc in result.failed:
                _raise_if_fatal(exc)
                self._fail([by_id[r.id] for r in requests], "engine_error", f"the forward pass failed: {exc}")
            for job, _ in group:
                request: ScoringJob = job.payload
                if job.id in failed:
                    continue
                self.metrics.loglikelihood_samples_total.inc(request.rows_done - before[job.id])
                if request.finished:
                    self.scheduler.finish(job.id)
                    queued = request.started - request.submitted
                    request.sink(ScoringDone(request.results, request.rows_done, queued))
                else:
                    self.scheduler.update_units(job.id, request.units)

    def _fail(self, jobs: list[Job], code: str, message: str) -> None:
        log.error("%s: failing %d job(s): %s", code, len(jobs), message)
        self.metrics.engine_errors_total.inc()
        for job in jobs:
            self.scheduler.finish(job.id)
            job.payload.sink(JobFailed(code, message))

    def _answer_cancelled(self) -> None:
        for job in self.scheduler.drain_cancelled():  # already out of the scheduler, pages freed
            self.metrics.cancelled_total.inc()
            job.payload.sink(JobFailed("cancelled", "the request was cancelled"))

    def _fail_all(self, code: str, message: str) -> None:
        self.scheduler.close()
        for job in self.scheduler.drain_all():
            job.payload.sink(JobFailed("cancelled" if job.cancelled else code, message))
        self._update_gauges()

    def _update_gauges(self) -> None:
        self.metrics.queue_depth.set(self.scheduler.queue_depth)
        self.metrics.running_jobs.set(self.scheduler.running)
        self.metrics.kv_cache_bytes.set(self.scheduler.cache_pages_in_use * self.page_bytes)


def _raise_if_fatal(exc: Exception) -> None:
    """A device error that poisons the context ends the loop (every held request is answered)."""
    if is_fatal(exc):
        raise exc


def _release_cached_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
