"""LLaDA's decoding policy (LLaDA-8B, 1.5, iLLaDA, LLaDA-MoE): the whole answer canvas, masked
at first, revealed block by block (semi-autoregressive) on a fixed schedule of tokens per step.

A job carries its own settings, canvas, block position and random generator; its canvas and its
masked positions live on the host. Each step the job runs its rows (two under classifier-free
guidance), the LM head reads its block's masked positions, and one batched token choice for all
the step's jobs (sampler.choose) ranks them and says how many to reveal.

Fast decoding (LLADA.md): a job with a cache keeps its keys and values in the pool (kv_cache.py)
at the slots the scheduler reserved for it, runs a full forward at each block's first step, then
only the block onwards (prefix) or the block (dual), reading its cache in place; a threshold or
factor decides how many tokens a step reveals; early stop ends the answer after a finished block
that holds EOS or EOT.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch

from server.engine import schedule
from server.engine.events import Reveal
from server.engine.kv_cache import pages_for
from server.engine.loader import LoadedModel
from server.engine.packed import RowInput
from server.engine.request import Request, StepEvent
from server.engine.runner import Decide, Work, unconditional
from server.engine.sampler import ChoiceJob, choose, unpack
from server.engine.sampling_params import SamplingParams


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
    def approximate(self) -> bool:
        return self.params.approximate

    @property
    def draws(self) -> bool:
        """Whether a step of this job takes random numbers."""
        return self.params.temperature > 0 or self.params.remasking == "random"


class FullCanvas:
    def __init__(self, loaded: LoadedModel):
        self.loaded = loaded
        self.mask_id = loaded.special.mask
        self.eos_id = loaded.special.eos

    @staticmethod
    def cache_pages(prompt_len: int, params: SamplingParams) -> int:
        """KV-cache pages each of a job's rows holds while it runs (0 without a cache)."""
        return 0 if params.cache == "none" else pages_for(prompt_len + params.gen_length)

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

    def decider(self, jobs: list[DenoiseJob]) -> Decide:
        """The step's token choice: every job's candidates ranked by confidence, padded to the
        step's widest block so that every chunk's rows line up."""
        width = max(len(job.block_masked) for job in jobs)
        stops = self.loaded.special.stops

        def decide(logits: torch.Tensor, chunk: list[Work]) -> torch.Tensor:
            return choose(logits, [self._choice(work.owner) for work in chunk], self.eos_id, stops, width)

        return decide

    def work(self, job: DenoiseJob) -> Work:
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

    def commit(self, job: DenoiseJob, packed: list[float]) -> StepEvent:
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
        return StepEvent(job, job.steps_done, block, count, reveals, job.masked, job.finished)
