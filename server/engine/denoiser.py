"""The batched denoising step: one `step` advances every given job by one iteration of its
decoding policy, all of them in one packed forward.

A policy holds a sampler family's rules (full_canvas.py: LLaDA's whole canvas and its fast modes;
block_diffusion.py: LLaDA2's blocks with their exact cache). It makes a job, says which rows and
positions the job runs this step (`work`), turns the step's logits into choices on the device
(`decider`) and writes them into the job on the host (`commit`). One server serves one
checkpoint, so one policy serves every job of a step. Jobs carry their own settings and random
generator, so the set of jobs can change between any two steps (iteration-level batching) and a
seeded job draws the same numbers whatever shares its forward.

A step is a transaction: nothing of a job changes until every job's tokens are chosen. A step
that raises (out of memory, say) leaves every job as it was, generator state included; a
forward that fails with another error fails the step's jobs, an LM-head call only its own
(`StepResult.failed`), and the others' step completes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from server.engine.block_diffusion import BlockDiffusion
from server.engine.full_canvas import FullCanvas
from server.engine.kv_cache import PAGE_TOKENS, KVPool
from server.engine.loader import LoadedModel
from server.engine.request import Request, StepEvent
from server.engine.runner import Decide, ForwardMetrics, Work, run_step
from server.engine.sampling_params import SamplingParams
from server.scheduler.kv_pages import KVPages

# Most candidate rows whose logits are computed in one LM-head call by default: a [rows, vocab]
# float32 buffer, 260 MB at LLaDA's vocabulary. Jobs beyond it go in further calls.
HEAD_ROWS = 512


class Policy(Protocol):
    def cache_pages(self, prompt_len: int, params: SamplingParams) -> int: ...
    def new_job(
        self, prompt_ids: list[int], params: SamplingParams, report_steps: bool = True, **request
    ) -> Request: ...
    def work(self, job) -> Work: ...
    def decider(self, jobs: list) -> Decide: ...
    def commit(self, job, row: list[float]) -> StepEvent: ...


@dataclass
class StepResult:
    events: dict[str, StepEvent]  # by request id, for the jobs that stepped
    failed: list[tuple[list[Request], Exception]]  # jobs whose forward or head raised, and why


def policy_for(loaded: LoadedModel) -> Policy:
    return BlockDiffusion(loaded) if loaded.info.block_diffusion else FullCanvas(loaded)


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
        self.model = loaded.model
        self.policy = policy_for(loaded)
        self.pool = pool
        self.head_rows = head_rows
        self.timing = timing

    def cache_pages(self, prompt_len: int, params: SamplingParams) -> int:
        """KV-cache pages each of a job's rows holds while it runs."""
        return self.policy.cache_pages(prompt_len, params)

    def new_job(self, prompt_ids: list[int], params: SamplingParams, report_steps: bool = True, **request):
        """Host state only: the engine thread makes the job's generator at its first step and
        gives a cached job its slots (cache_slots) when it is admitted."""
        return self.policy.new_job(prompt_ids, params, report_steps, **request)

    @torch.inference_mode()
    def step(self, jobs: list) -> StepResult:
        for job in jobs:
            if job.generator is None and job.draws:
                job.generator = torch.Generator(device=self.model.device).manual_seed(job.seed)
        saved = {job.id: job.generator.get_state() for job in jobs if job.draws}
        works = [self.policy.work(job) for job in jobs]
        try:
            outcome = run_step(self.model, works, self.head_rows, self.policy.decider(jobs), self.pool, self.timing)
        except BaseException:
            for job in jobs:
                if job.id in saved:
                    job.generator.set_state(saved[job.id])
            raise
        events = {works[i].owner.id: self.policy.commit(works[i].owner, row) for i, row in outcome.values.items()}
        return StepResult(events, outcome.failed)


def standalone(loaded: LoadedModel, prompts: list[list[int]], params: list[SamplingParams]) -> tuple[Denoiser, list]:
    """A denoiser with a KV pool just big enough for these jobs, and the jobs, their cache slots
    reserved (tests, benches: the engine's scheduler does this for a server)."""
    policy = policy_for(loaded)
    need = [policy.cache_pages(len(prompt), p) for prompt, p in zip(prompts, params)]
    pages = KVPages(sum(n * p.rows for n, p in zip(need, params)))
    pool = KVPool(loaded.config, pages.pages, loaded.device, loaded.dtype) if pages.pages else None
    denoiser = Denoiser(loaded, pool)
    jobs = []
    for prompt, p, n in zip(prompts, params, need):
        job = denoiser.new_job(prompt, p, report_steps=False)
        job.cache_slots = [first * PAGE_TOKENS for first in pages.allocate([n] * p.rows)] if n else []
        jobs.append(job)
    return denoiser, jobs


def run_jobs(loaded: LoadedModel, prompts: list[list[int]], params: list[SamplingParams]) -> list:
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
