"""The batched denoising loop: one `step` advances every given job by one denoising step.

Jobs carry their own settings, canvas, block position and random generator, so the set of
jobs can change between any two steps (iteration-level batching) and a seeded job draws the
same numbers whatever shares its forward. Rows of different lengths are right-padded and the
padding is hidden from attention by the key mask, so every row computes what it would alone.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch

from server.engine import sampling
from server.engine.events import Reveal
from server.engine.loader import LoadedModel
from server.engine.padding import MAX_PADDING_WASTE, hidden_at, unconditional
from server.engine.sampling_params import SamplingParams


@dataclass(frozen=True)
class StepEvent:
    job: DenoiseJob
    step: int  # 1-based count of this job's steps so far
    block: int
    reveals: list[Reveal]
    masked: int  # answer positions still masked after this step

    @property
    def finished(self) -> bool:
        return self.job.finished


@dataclass(eq=False)
class DenoiseJob:
    prompt_len: int
    params: SamplingParams
    canvas: torch.Tensor  # [prompt_len + gen_length], long, on the model's device
    generator: torch.Generator
    blocks: list[tuple[int, int]]  # absolute [start, end) per block
    block_steps: list[int]
    block: int = -1
    schedule: list[int] = field(default_factory=list)
    step_in_block: int = 0
    steps_done: int = 0
    finished: bool = False
    masked: int = 0  # answer positions still masked; counted, not re-read from the device

    @property
    def answer(self) -> list[int]:
        return self.canvas[self.prompt_len :].tolist()

    @property
    def rows(self) -> int:
        return self.params.rows


# Most candidate rows whose logits are computed in one LM-head call: a [rows, vocab] float32
# buffer, 260 MB at LLaDA's vocabulary. Jobs beyond it go in further calls.
HEAD_ROWS = 512
# Candidate rows sampled at a time: bounds the [rows, vocab] float64 buffers of a long block.
SAMPLE_ROWS = 64


@dataclass(frozen=True)
class HeadPlan:
    job: DenoiseJob
    candidates: torch.Tensor  # absolute positions that can be revealed this step
    first_row: int  # the job's row among the step's rows (its unconditional row follows)

    @property
    def size(self) -> int:
        """Rows this job puts through the LM head."""
        return len(self.candidates) * self.job.rows


def head_groups(plans: list[HeadPlan], limit: int) -> list[list[HeadPlan]]:
    """Consecutive plans packed up to limit rows; a plan over the limit goes alone."""
    groups: list[list[HeadPlan]] = []
    size = limit
    for plan in plans:
        if size + plan.size > limit:
            groups.append([])
            size = 0
        groups[-1].append(plan)
        size += plan.size
    return groups


class Denoiser:
    def __init__(self, loaded: LoadedModel):
        self.loaded = loaded
        self.model = loaded.model
        self.mask_id = loaded.special.mask
        self.eos_id = loaded.special.eos

    def new_job(self, prompt_ids: list[int], params: SamplingParams) -> DenoiseJob:
        device = self.model.device
        canvas = torch.full((len(prompt_ids) + params.gen_length,), self.mask_id, dtype=torch.long)
        canvas[: len(prompt_ids)] = torch.tensor(prompt_ids, dtype=torch.long)
        for position, token in params.constraints:
            canvas[len(prompt_ids) + position] = token
        seed = params.seed if params.seed is not None else random.getrandbits(63)
        spans = sampling.block_spans(params.gen_length, params.block_length)
        job = DenoiseJob(
            prompt_len=len(prompt_ids),
            params=params,
            canvas=canvas.to(device),
            generator=torch.Generator(device=device).manual_seed(seed),
            blocks=[(len(prompt_ids) + s, len(prompt_ids) + e) for s, e in spans],
            block_steps=sampling.steps_per_block(params.steps, len(spans)),
            masked=params.gen_length - len(params.constraints),
        )
        self._next_block(job)
        return job

    def _next_block(self, job: DenoiseJob) -> None:
        """Move to the next block that still has masks, or finish."""
        while job.block + 1 < len(job.blocks):
            job.block += 1
            start, end = job.blocks[job.block]
            masked = int((job.canvas[start:end] == self.mask_id).sum())
            job.schedule = sampling.transfer_schedule(masked, job.block_steps[job.block])
            job.step_in_block = 0
            if job.schedule:
                return
        job.finished = True

    @torch.inference_mode()
    def step(self, jobs: list[DenoiseJob]) -> list[StepEvent]:
        """The forward over all jobs' rows (in length groups, see padding.hidden_at), the LM
        head on their candidate positions only (several jobs per call), then each job reveals its
        scheduled tokens."""
        rows, row_candidates, plans = [], [], []
        for job in jobs:
            start, end = job.blocks[job.block]
            candidates = (job.canvas[start:end] == self.mask_id).nonzero().squeeze(-1) + start
            rows.append(job.canvas)
            if job.params.cfg_scale > 0:
                rows.append(unconditional(job.canvas, job.prompt_len, self.mask_id))
            row_candidates += [candidates] * job.rows
            plans.append(HeadPlan(job, candidates, len(rows) - job.rows))
        selected = hidden_at(self.model, rows, row_candidates, self.eos_id, MAX_PADDING_WASTE)
        events = []
        for group in head_groups(plans, HEAD_ROWS):
            # A job's candidates, then the same positions of its unconditional row.
            inputs = [selected[plan.first_row + r] for plan in group for r in range(plan.job.rows)]
            logits = self.model.logits(torch.cat(inputs))
            for plan, part in zip(group, logits.split([plan.size for plan in group])):
                events.append(self._reveal(plan.job, plan.candidates, part))
        return events

    def _reveal(self, job: DenoiseJob, candidates: torch.Tensor, logits: torch.Tensor) -> StepEvent:
        params = job.params
        if params.cfg_scale > 0:
            conditional, unconditional_logits = logits.chunk(2)
            logits = sampling.cfg_combine(conditional, unconditional_logits, params.cfg_scale)
        if params.logits_eos_inf:
            logits[:, self.eos_id] = float("-inf")
        # In slices, so the float64 noise and the softmax never span a whole long block at once;
        # the generator draws the same numbers in slices as in one go.
        tokens, probabilities = [], []
        for part in logits.split(SAMPLE_ROWS):
            tokens.append(sampling.choose_tokens(part, params.temperature, job.generator))
            probabilities.append(sampling.token_probabilities(part, tokens[-1]))
        tokens, probabilities = torch.cat(tokens), torch.cat(probabilities)
        excluded = self.loaded.special.stops if params.confidence_eos_eot_inf else ()
        confidence = sampling.ranking_confidence(probabilities, tokens, params.remasking, job.generator, excluded)
        chosen = sampling.select_top(confidence, job.schedule[job.step_in_block])
        positions = candidates[chosen]
        job.canvas[positions] = tokens[chosen]
        job.steps_done += 1
        job.step_in_block += 1
        reveals = [
            Reveal(index=p - job.prompt_len, token_id=t, confidence=c)
            for p, t, c in zip(positions.tolist(), tokens[chosen].tolist(), probabilities[chosen].tolist())
        ]
        block = job.block
        if job.step_in_block == len(job.schedule):
            self._next_block(job)
        job.masked -= len(reveals)
        return StepEvent(job=job, step=job.steps_done, block=block, reveals=reveals, masked=job.masked)


def generate_batch(loaded: LoadedModel, prompts: list[list[int]], params: list[SamplingParams]) -> list[list[int]]:
    """Run jobs together until all finish (finished jobs leave the batch); answers in order."""
    denoiser = Denoiser(loaded)
    jobs = [denoiser.new_job(prompt, p) for prompt, p in zip(prompts, params)]
    running = [job for job in jobs if not job.finished]
    while running:
        denoiser.step(running)
        running = [job for job in running if not job.finished]
    return [job.answer for job in jobs]
