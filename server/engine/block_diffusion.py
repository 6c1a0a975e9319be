"""LLaDA2's decoding policy: block diffusion with the exact cache (FAMILY.md, "LLaDA2.0 mini /
flash and LLaDA2.1"), as the model's own `generate` does it, many requests per step.

Blocks of `block_length` are aligned to absolute positions; the canvas is the prompt and masks
up to the end of the block that holds position prompt + gen_length. The first block decoded is
the one the prompt ends in (its prompt tokens stay). Attention is block-causal, so a finished
block's keys and values depend only on its final tokens: each job keeps them in its run of the
KV pool (reserved at admission) and a step runs only the current block, one row that reads every
earlier block from the cache in place. A block's keys are written by the forward that ran its
final tokens; if its last iteration changed tokens, the next step runs the finished block's
final tokens once more beside the next block (one forward; the finished block's row writes its
keys before the next block's row reads them, layer by layer), and a job's first step runs its
prompt's whole blocks the same way.

Per block, iterations until no mask is left: 2.0's rule (block_sampler.py) commits every masked
position above `threshold` if at least the schedule's count pass (the block's length over
`steps`, remainder to the first steps), else the count most probable. With `editing_threshold`
set (2.1), the count is 1, written answer positions of the block may be edited, and once the
block has no mask, iterations go on while edits happen, at most `max_post_steps` of them.
Under 2.0 the job ends after a block that holds EOS (`generate` stops there), and with
`early_stop` as soon as an EOS is committed with no mask before it; under 2.1 it ends after a
block only with `early_stop`, once the answer so far holds EOS and no mask. The answer is the
first gen_length positions, cut after the first EOS.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from server.engine import schedule
from server.engine.block_sampler import COMMIT, EDIT, BlockChoice, choose_block, unpack
from server.engine.events import Reveal
from server.engine.kv_cache import pages_for
from server.engine.loader import LoadedModel
from server.engine.packed import RowInput
from server.engine.request import Request, StepEvent
from server.engine.runner import Decide, Work
from server.engine.sampling_params import SamplingParams

# 2.1 iterations of a block, per position, past which a block ends with masks left (the model
# keeps committing the mask token); the published loop would not end.
MAX_EDIT_ITERATIONS = 64


@dataclass(eq=False)
class BlockJob(Request):
    prompt_len: int
    params: SamplingParams
    canvas: list[int]  # prompt + masks to the end of the last block, on the host
    seed: int
    block_steps: list[int]  # 2.0: the schedule of commits per iteration of a block
    eos_id: int
    mask_id: int
    report_steps: bool = True
    block: int = 0  # the block being decoded: positions [block * L, (block + 1) * L)
    kept: int = 0  # positions [0, kept) have their final keys and values in the cache
    iteration: int = 0  # iterations of the current block so far
    post_steps: int = 0  # 2.1: iterations after the block's last mask was filled
    steps_done: int = 0
    finished: bool = False
    generator: torch.Generator | None = None
    cache_slots: list[int] | None = None  # the slot of position 0 (one row)
    approximate = False  # the published sampler, token for token

    @property
    def length(self) -> int:
        return self.params.block_length

    @property
    def span(self) -> tuple[int, int]:
        return self.block * self.length, (self.block + 1) * self.length

    @property
    def edits(self) -> bool:
        return self.params.editing_threshold is not None

    @property
    def rows(self) -> int:
        return 1

    @property
    def draws(self) -> bool:
        return self.params.temperature > 0

    @property
    def answer(self) -> list[int]:
        tokens = self.canvas[self.prompt_len : self.prompt_len + self.params.gen_length]
        return tokens[: tokens.index(self.eos_id) + 1] if self.eos_id in tokens else tokens

    def masked_in_block(self) -> list[int]:
        start, end = self.span
        return [p for p in range(max(start, self.prompt_len), end) if self.canvas[p] == self.mask_id]

    def candidates(self) -> list[int]:
        """The block's positions whose logits this iteration needs: its masked answer positions,
        and with editing its written ones too."""
        start, end = self.span
        first = max(start, self.prompt_len)
        if self.edits:
            return list(range(first, end))
        return [p for p in range(first, end) if self.canvas[p] == self.mask_id]


class BlockDiffusion:
    def __init__(self, loaded: LoadedModel):
        self.mask_id = loaded.special.mask
        self.eos_id = loaded.special.eos

    @staticmethod
    def cache_pages(prompt_len: int, params: SamplingParams) -> int:
        return pages_for(canvas_length(prompt_len, params))

    def new_job(self, prompt_ids: list[int], params: SamplingParams, report_steps: bool = True, **request) -> BlockJob:
        total = canvas_length(len(prompt_ids), params)
        steps = min(params.steps, params.gen_length)  # as `generate` caps them
        return BlockJob(
            prompt_len=len(prompt_ids),
            params=params,
            canvas=list(prompt_ids) + [self.mask_id] * (total - len(prompt_ids)),
            seed=params.seed if params.seed is not None else random.getrandbits(63),
            block_steps=schedule.spread(params.block_length, steps),
            eos_id=self.eos_id,
            mask_id=self.mask_id,
            report_steps=report_steps,
            block=len(prompt_ids) // params.block_length,
            **request,
        )

    def work(self, job: BlockJob) -> Work:
        """The current block as one row reading the cache, after the rows of every earlier block
        whose final keys are not kept yet."""
        length, slot = job.length, job.cache_slots[0]
        fills = tuple(
            RowInput(job.canvas[s : s + length], s, slot, reads_cache=True, context=s + length)
            for s in range(job.kept, job.block * length, length)
        )
        start, end = job.span
        row = RowInput(job.canvas[start:end], start, slot, reads_cache=True, context=end)
        return Work(job, row, [p - start for p in job.candidates()], fills=fills)

    def decider(self, jobs: list[BlockJob]) -> Decide:
        width = max(job.length for job in jobs)

        def decide(logits: torch.Tensor, chunk: list[Work]) -> torch.Tensor:
            return choose_block(logits, [self._choice(work.owner) for work in chunk], width)

        return decide

    def _choice(self, job: BlockJob) -> BlockChoice:
        p = job.params
        current = [job.canvas[q] for q in job.candidates()]
        return BlockChoice(
            masked=[token == self.mask_id for token in current],
            current=current,
            count=1 if job.edits else job.block_steps[job.iteration],
            threshold=p.threshold,
            editing_threshold=p.editing_threshold,
            temperature=p.temperature,
            top_k=p.top_k,
            top_p=p.top_p,
            generator=job.generator,
        )

    def commit(self, job: BlockJob, row: list[float]) -> StepEvent:
        """Write the iteration's commits and edits into the job (host only), then move on."""
        tokens, probabilities, actions = unpack(row)
        job.kept = max(job.kept, job.span[0])  # this step's forward ran the earlier blocks' final tokens
        had_masks = bool(job.masked_in_block())
        reveals, changed, committed, eos = [], 0, 0, False
        for position, token, probability, action in zip(job.candidates(), tokens, probabilities, actions):
            if action not in (COMMIT, EDIT):
                continue
            job.canvas[position] = token
            changed += 1
            eos |= action == COMMIT and token == self.eos_id
            index = position - job.prompt_len
            committed += action == COMMIT and index < job.params.gen_length
            if job.report_steps and index < job.params.gen_length:
                reveals.append(Reveal(index=index, token_id=token, confidence=probability, edit=action == EDIT))
        job.steps_done += 1
        job.iteration += 1
        block = job.block
        if not had_masks:
            job.post_steps += 1
        if changed == 0:  # this forward ran the block's final tokens: its keys are exact
            job.kept = job.span[1] if not job.masked_in_block() else job.kept
        self._advance(job, had_masks, changed, eos)
        settled = None
        if job.edits and not job.finished:  # an edit may still change the current block
            settled = min(job.params.gen_length, max(0, job.span[0] - job.prompt_len))
        return StepEvent(job, job.steps_done, block, committed, reveals, self._masked(job), job.finished, settled)

    def _advance(self, job: BlockJob, had_masks: bool, changed: int, committed_eos: bool) -> None:
        p = job.params
        if not job.edits and p.early_stop and committed_eos and self._eos_settled(job):
            job.finished = True
            return
        if not self._block_done(job, had_masks, changed):
            return
        end = job.span[1]
        written = job.canvas[job.prompt_len : end]
        if job.edits:  # 2.1 stops after a block only with early stop, once nothing before it is masked
            stop = p.early_stop and self.mask_id not in written and self.eos_id in written
        else:  # 2.0 stops after any block that holds EOS
            stop = self.eos_id in written
        if stop or end >= len(job.canvas):
            job.finished = True
            return
        job.block += 1
        job.iteration = 0
        job.post_steps = 0

    @staticmethod
    def _block_done(job: BlockJob, had_masks: bool, changed: int) -> bool:
        masked = bool(job.masked_in_block())
        if not job.edits:
            return not masked or job.iteration == len(job.block_steps)
        if job.iteration >= MAX_EDIT_ITERATIONS * job.length + job.params.max_post_steps:
            return True  # only a model that keeps writing the mask token gets here
        if masked:
            return False
        if had_masks:  # the last mask was just filled: iterations for edits follow, if any may
            return job.params.max_post_steps == 0
        return changed == 0 or job.post_steps >= job.params.max_post_steps

    def _eos_settled(self, job: BlockJob) -> bool:
        """An EOS in the answer with no mask before it."""
        answer = job.canvas[job.prompt_len :]
        return self.eos_id in answer and self.mask_id not in answer[: answer.index(self.eos_id)]

    def _masked(self, job: BlockJob) -> int:
        if job.finished:
            return 0
        return job.canvas[job.prompt_len : job.prompt_len + job.params.gen_length].count(self.mask_id)


def canvas_length(prompt_len: int, params: SamplingParams) -> int:
    """The prompt and answer rounded up to whole blocks."""
    length = params.block_length
    return -(-(prompt_len + params.gen_length) // length) * length
