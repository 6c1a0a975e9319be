"""The batched denoising loop: one `step` advances every given job by one denoising step.

Jobs carry their own settings, canvas, block position and random generator, so the set of jobs
can change between any two steps (iteration-level batching) and a seeded job draws the same
numbers whatever shares its forward. A job's canvas and its masked positions live on the host:
the step packs every job's rows into one forward (runner.run_step), one LM-head call on every
job's candidates, one batched token choice (sampler.choose), and reads back once.

Fast decoding (LLADA.md): a job with a cache keeps its keys and values in the pool (kv_cache.py)
at the slots the scheduler reserved for it, runs a full forward at each block's first step, then
only the block onwards (prefix) or the block (dual), reading its cache in place; a threshold or
factor decides how many tokens a step reveals; early stop ends the answer after a finished block
that holds EOS or EOT. Jobs of every mode and phase share the step's one forward.

A step is a transaction: nothing of a job changes until every job's tokens are chosen. A step
that raises (out of memory, say) leaves every job as it was, generator state included; a
forward that fails with another error fails the step's jobs, an LM-head call only its own
(`StepResult.failed`), and the others' step completes.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch

from server.engine import schedule
from server.engine.events import Reveal
from server.engine.kv_cache import PAGE_TOKENS, KVPool, pages_for
from server.engine.loader import LoadedModel
from server.engine.packed import RowInput
from server.engine.request import Request
from server.engine.runner import ForwardMetrics, Work, run_step, unconditional
from server.engine.sampler import ChoiceJob, choose, unpack
from server.engine.sampling_params import SamplingParams
from server.scheduler.kv_pages import KVPages

# Most candidate rows whose logits are computed in one LM-head call by default: a [rows, vocab]
# float32 buffer, 260 MB at LLaDA's vocabulary. Jobs beyond it go in further calls.
HEAD_ROWS = 512


@dataclass(eq=False)
class DenoiseJob(Request):
    prompt_len: int
    params: SamplingParams
    canvas: list[int]  # prompt + answer, on the host
    seed: int
    blocks: list[tuple[int, int]]  # absolute [start, end) per block
    block_steps: list[int]
    report_steps: bool = True  # build Reveal records for each step (streams)
    block: int = -1
    block_masked: list[int] = field(default_factory=list)  # masked positions of the block, increasing
    schedule: list[int] = field(default_factory=list)
    step_in_block: int = 0
    steps_done: int = 0
    finished: bool = False
    masked: int = 0  # answer positions still masked
    generator: torch.Generator | None = None  # made by the engine thread on the first step
    cache_slots: list[int] = field(default_factory=list)  # per row (two under CFG): the slot of position 0
    cache_block: int = -1  # the block whose first (full) forward filled the cache

    @property
    def answer(self) -> list[int]:
        return self.canvas[self.prompt_len :]

    @property
    def rows(self) -> int:
        return self.params.rows

    @property
    def draws(self) -> bool:
        """Whether a step of this job takes random numbers."""
        return self.params.temperature > 0 or self.params.remasking == "random"


@dataclass(frozen=True)
class StepEvent:
    job: DenoiseJob
    step: int  # 1-based count of this job's steps so far
    block: int
    revealed: int
    reveals: list[Reveal]  # only for jobs that report steps
    masked: int  # answer positions still masked after this step

    @property
    def finished(self) -> bool:
        return self.job.finished


@dataclass
class StepResult:
    events: dict[str, StepEvent]  # by request id, for the jobs that stepped
    failed: list[tuple[list[DenoiseJob], Exception]]  # jobs whose forward or head raised, and why


def cache_pages_for(prompt_len: int, params: SamplingParams) -> int:
    """KV-cache pages each of a job's rows holds while it runs (0 without a cache)."""
    return 0 if params.cache == "none" else pages_for(prompt_len + params.gen_length)


class Denoiser:
    def __init__(
        self,
        loaded: LoadedModel,
        pool: KVPool | None = None,
        head_rows: int = HEAD_ROWS,
        timing: ForwardMetrics | None = None,
    ):
        """pool: the KV cache that cached jobs' slots point into (the scheduler reserves them).
        head_rows: the most candidate rows per LM-head call (a job over it gets a call alone)."""
        self.loaded = loaded
        self.model = loaded.model
        self.pool = pool
        self.head_rows = head_rows
        self.timing = timing
        self.mask_id = loaded.special.mask
        self.eos_id = loaded.special.eos

    def new_job(
        self, prompt_ids: list[int], params: SamplingParams, report_steps: bool = True, **request
    ) -> DenoiseJob:
        """Host state only: the engine thread makes the job's generator at its first step and
        gives a cached job its slots (cache_slots) when it is admitted."""
        canvas = list(prompt_ids) + [self.mask_id] * params.gen_length
        for position, token in params.constraints:
            canvas[len(prompt_ids) + position] = token
        spans = schedule.block_spans(params.gen_length, params.block_length)
        job = DenoiseJob(
            prompt_len=len(prompt_ids),
            params=params,
            canvas=canvas,
            seed=params.seed if params.seed is not None else random.getrandbits(63),
            blocks=[(len(prompt_ids) + s, len(prompt_ids) + e) for s, e in spans],
            block_steps=schedule.steps_per_block(params.steps, len(spans)),
            report_steps=report_steps,
            masked=params.gen_length - len(params.constraints),
            **request,
        )
        self._next_block(job)
        return job

    def _next_block(self, job: DenoiseJob) -> None:
        """Move to the next block that still has masks, or finish; with early stop, finish after a
        complete block if the answer so far holds EOS or EOT, every later position set to EOS."""
        while True:
            if job.block >= 0 and job.params.early_stop:
                end = job.blocks[job.block][1]
                if any(token in self.loaded.special.stops for token in job.canvas[job.prompt_len : end]):
                    job.canvas[end:] = [self.eos_id] * (len(job.canvas) - end)
                    job.masked = 0
                    break
            if job.block + 1 == len(job.blocks):
                break
            job.block += 1
            start, end = job.blocks[job.block]
            job.block_masked = [p for p in range(start, end) if job.canvas[p] == self.mask_id]
            job.schedule = schedule.transfer_schedule(len(job.block_masked), job.block_steps[job.block])
            job.step_in_block = 0
            if job.block_masked:
                return
        job.block_masked = []
        job.finished = True

    @torch.inference_mode()
    def step(self, jobs: list[DenoiseJob]) -> StepResult:
        for job in jobs:
            if job.generator is None and job.draws:
                job.generator = torch.Generator(device=self.model.device).manual_seed(job.seed)
        saved = {job.id: job.generator.get_state() for job in jobs if job.draws}
        works = [self._work(job) for job in jobs]
        width = max(len(job.block_masked) for job in jobs)

        def decide(logits: torch.Tensor, chunk: list[Work]) -> torch.Tensor:
            stops = self.loaded.special.stops
            return choose(logits, [self._choice(work.owner) for work in chunk], self.eos_id, stops, width)

        try:
            outcome = run_step(self.model, works, self.head_rows, decide, self.pool, self.timing)
        except BaseException:
            for job in jobs:
                if job.id in saved:
                    job.generator.set_state(saved[job.id])
            raise
        events = {works[i].owner.id: self._commit(works[i].owner, row) for i, row in outcome.values.items()}
        return StepResult(events, outcome.failed)

    def _work(self, job: DenoiseJob) -> Work:
        """The job's rows for this step: the whole canvas, or with a cache mid-block only the
        positions the mode runs, attending to the cache."""
        rows = [job.canvas]
        if job.rows == 2:
            rows.append(unconditional(job.canvas, job.prompt_len, self.mask_id))
        mode = job.params.cache
        if mode == "none":
            inputs = [RowInput(tokens) for tokens in rows]
            return Work(job, inputs[0], job.block_masked, inputs[1] if len(inputs) == 2 else None)
        if job.cache_block != job.block:  # the block's first step: a full forward fills the cache
            inputs = [RowInput(tokens, cache_slot=slot) for tokens, slot in zip(rows, job.cache_slots)]
            return Work(job, inputs[0], job.block_masked, inputs[1] if len(inputs) == 2 else None)
        start, end = job.blocks[job.block]
        stop = len(job.canvas) if mode == "prefix" else end
        inputs = [
            RowInput(tokens[start:stop], start, slot, reads_cache=True, context=len(job.canvas))
            for tokens, slot in zip(rows, job.cache_slots)
        ]
        positions = [p - start for p in job.block_masked]
        return Work(job, inputs[0], positions, inputs[1] if len(inputs) == 2 else None)

    def _choice(self, job: DenoiseJob) -> ChoiceJob:
        p = job.params
        fixed = p.threshold is None and p.factor is None
        return ChoiceJob(
            candidates=len(job.block_masked),
            count=job.schedule[job.step_in_block] if fixed else 0,
            threshold=p.threshold,
            factor=p.factor,
            cfg_factor=p.cfg_scale + 1.0 if p.cfg_scale > 0 else None,
            temperature=p.temperature,
            random_remasking=p.remasking == "random",
            logits_eos_inf=p.logits_eos_inf,
            exclude_stops=p.confidence_eos_eot_inf,
            generator=job.generator,
        )

    def _commit(self, job: DenoiseJob, packed: list[float]) -> StepEvent:
        """Write the step's reveals into the job (host only: nothing here can fail halfway)."""
        order, tokens, probabilities = unpack(packed)
        count = len(order)
        positions = [job.block_masked[i] for i in order]
        for position, token in zip(positions, tokens):
            job.canvas[position] = token
        reveals = []
        if job.report_steps:
            reveals = [
                Reveal(index=p - job.prompt_len, token_id=t, confidence=c)
                for p, t, c in zip(positions, tokens, probabilities)
            ]
        revealed = set(positions)
        job.block_masked = [p for p in job.block_masked if p not in revealed]
        job.steps_done += 1
        job.step_in_block += 1
        job.masked -= count
        block = job.block
        if job.params.cache != "none":
            job.cache_block = block
        if not job.block_masked:
            self._next_block(job)
        return StepEvent(job=job, step=job.steps_done, block=block, revealed=count, reveals=reveals, masked=job.masked)


def standalone(
    loaded: LoadedModel, prompts: list[list[int]], params: list[SamplingParams]
) -> tuple[Denoiser, list[DenoiseJob]]:
    """A denoiser with a KV pool just big enough for these jobs, and the jobs, their cache slots
    reserved (tests, benches: the engine's scheduler does this for a server)."""
    need = [cache_pages_for(len(prompt), p) for prompt, p in zip(prompts, params)]
    pages = KVPages(sum(n * p.rows for n, p in zip(need, params)))
    pool = KVPool(loaded.config, pages.pages, loaded.device, loaded.dtype) if pages.pages else None
    denoiser = Denoiser(loaded, pool)
    jobs = []
    for prompt, p, n in zip(prompts, params, need):
        job = denoiser.new_job(prompt, p, report_steps=False)
        job.cache_slots = [first * PAGE_TOKENS for first in pages.allocate([n] * p.rows)] if n else []
        jobs.append(job)
    return denoiser, jobs


def run_jobs(loaded: LoadedModel, prompts: list[list[int]], params: list[SamplingParams]) -> list[DenoiseJob]:
    """Run jobs together until all finish (finished jobs leave the batch); the jobs, in order."""
    denoiser, jobs = standalone(loaded, prompts, params)
    running = [job for job in jobs if not job.finished]
    while running:
        result = denoiser.step(running)
        if result.failed:
            raise result.failed[0][1]
        running = [job for job in running if not job.finished]
    return jobs


def generate_batch(loaded: LoadedModel, prompts: list[list[int]], params: list[SamplingParams]) -> list[list[int]]:
    """The answers of run_jobs."""
    return [job.answer for job in run_jobs(loaded, prompts, params)]
