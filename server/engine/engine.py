"""The engine: it owns the model, its scheduler and the one thread that runs the step loop.

Callers (the HTTP layer's engine client) use only `submit_generate`, `submit_score`, `cancel`,
`stats`, `info` and the lifecycle calls; everything they pass and receive is torch-free
(sampling_params, events, model_info). Each iteration asks the scheduler which jobs share the
next step, runs it, and hands every job its events through its sink, a thread-safe callable
supplied by the caller. Failures stay inside the batch they happen in: an out-of-memory forward
is retried as two halves, any other error fails that batch's jobs only, and if the loop itself
dies every job still held is answered.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from server.engine.denoiser import DenoiseJob, Denoiser
from server.engine.events import GenerationDone, GenerationStep, JobFailed, ScoringDone
from server.engine.faults import FaultInjector
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
    max_padding_waste: float = 1.0
    inject_faults: str | None = None  # test only: see faults.py


@dataclass(eq=False)
class WorkItem:
    engine_job: DenoiseJob | ScoringJob
    sink: Sink
    submitted: float
    report_steps: bool = False  # a JSON request needs only its final event
    started: float | None = None


class Engine:
    def __init__(
        self, loaded: LoadedModel, settings: EngineSettings, metrics: Metrics | None = None, poll_s: float = 0.05
    ):
        self.loaded = loaded
        self.info: ModelInfo = loaded.info
        self.scheduler = Scheduler(settings.max_batch_rows, settings.max_queue, settings.max_padding_waste)
        self.metrics = metrics or Metrics()
        self.faults = FaultInjector(settings.inject_faults)
        self.poll_s = poll_s
        self.denoiser = Denoiser(loaded)
        self.scorer = Scorer(loaded)
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
        which spares the event loop a wake-up per step."""
        engine_job = self.denoiser.new_job(prompt_ids, params)
        job = Job(
            JobKind.GENERATE,
            length=len(engine_job.canvas),
            rows_per_unit=params.rows,
            payload=WorkItem(engine_job, sink, time.monotonic(), report_steps),
        )
        if engine_job.finished:  # every answer position was pinned: nothing to denoise
            sink(GenerationDone(engine_job.answer, 0, 0.0))
            return job.id
        return self._submit(job)

    def submit_score(self, pairs: list[tuple[list[int], list[int]]], params: ScoreParams, sink: Sink) -> str:
        engine_job = self.scorer.new_job(pairs, params)
        job = Job(
            JobKind.SCORE,
            length=max(len(a) + len(b) for a, b in pairs),
            rows_per_unit=params.rows_per_unit,
            units=engine_job.units,
            payload=WorkItem(engine_job, sink, time.monotonic()),
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

    # ------------------------------------------------------------------ worker thread

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
        for job in batch.jobs:
            item: WorkItem = job.payload
            if item.started is None:
                item.started = now
                self.metrics.queue_wait_seconds.observe(now - item.submitted)
        self.metrics.batch_rows.observe(batch.rows)
        if batch.kind is JobKind.GENERATE:
            self._generate_step(batch.jobs)
        else:
            self._score_step(batch)
        if self.loaded.device.type == "cuda":
            self.metrics.observe_device_memory(torch.cuda.memory_allocated(), torch.cuda.memory_reserved())

    def _forward(self, run: Callable[[], object]) -> object:
        self.faults.before_forward()
        start = time.perf_counter()
        result = run()
        elapsed = time.perf_counter() - start
        self.metrics.forward_duration_seconds.observe(elapsed)
        return result

    def _generate_step(self, jobs: list[Job]) -> None:
        engine_jobs = [job.payload.engine_job for job in jobs]
        before = [j.steps_done for j in engine_jobs]
        try:
            events = self._forward(lambda: self.denoiser.step(engine_jobs))
        except torch.OutOfMemoryError:
            # Retry the jobs that did not advance, as two smaller batches.
            left = [job for job, j, b in zip(jobs, engine_jobs, before) if j.steps_done == b]
            if len(left) <= 1:
                self._fail(left, "engine_error", "out of device memory for a single request")
                return
            log.warning("out of memory at %d jobs: retrying as two batches", len(left))
            _release_cached_memory(self.loaded.device)
            half = len(left) // 2
            self._generate_step(left[:half])
            self._generate_step(left[half:])
            return
        except Exception as exc:
            self._fail(jobs, "engine_error", f"the forward pass failed: {type(exc).__name__}: {exc}")
            return
        now = time.monotonic()
        for job, event in zip(jobs, events):
            item: WorkItem = job.payload
            if event.step == 1:
                self.metrics.time_to_first_step_seconds.observe(now - item.submitted)
            if item.report_steps:
                item.sink(GenerationStep(event.step, event.block, event.reveals, event.masked))
            self.metrics.generated_tokens_total.inc(len(event.reveals))
            if event.finished:
                self.scheduler.finish(job.id)
                item.sink(GenerationDone(event.job.answer, event.step, item.started - item.submitted))
        self.metrics.denoise_steps_total.inc(len(events))

    def _score_step(self, batch: Batch) -> None:
        work = [(job.payload.engine_job, batch.units[job.id]) for job in batch.jobs]
        try:
            self._forward(lambda: self.scorer.step(work))
        except torch.OutOfMemoryError:
            if sum(units for _, units in work) <= 1:
                self._fail(batch.jobs, "engine_error", "out of device memory for a single scoring row")
                return
            log.warning("out of memory at %d scoring rows: retrying with half", batch.rows)
            _release_cached_memory(self.loaded.device)
            halved = {job.id: max(1, units // 2) for job, (_, units) in zip(batch.jobs, work)}
            self._score_step(Batch(batch.kind, batch.jobs, halved, batch.rows // 2, batch.padded_length))
            return
        except Exception as exc:
            self._fail(batch.jobs, "engine_error", f"the forward pass failed: {type(exc).__name__}: {exc}")
            return
        for job in batch.jobs:
            item: WorkItem = job.payload
            scoring: ScoringJob = item.engine_job
            self.metrics.loglikelihood_samples_total.inc(batch.units[job.id])
            if scoring.finished:
                self.scheduler.finish(job.id)
                item.sink(ScoringDone(scoring.results, scoring.rows_done, item.started - item.submitted))
            else:
                self.scheduler.update_units(job.id, scoring.units)

    def _fail(self, jobs: list[Job], code: str, message: str) -> None:
        log.error("%s: failing %d job(s): %s", code, len(jobs), message)
        self.metrics.engine_errors_total.inc()
        for job in jobs:
            self.scheduler.finish(job.id)
            job.payload.sink(JobFailed(code, message))

    def _answer_cancelled(self) -> None:
        for job in self.scheduler.drain_cancelled():
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


def _release_cached_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
