"""Token choice for every candidate of a step at once (in the manner of vLLM's sampler: each job's
settings as batched tensors, one call for the batch).

Input: the LM head's logits of the step's candidates, job after job (each job's candidates in
increasing position), then the unconditional rows of the CFG jobs in the same order. Output: per
job its candidates ranked by confidence, their tokens and probabilities, and how many of them to
reveal, packed in one float64 tensor so that the step reads the device back once.

The math is the reference sampler's, operation for operation, so that rows give the same tokens
as the reference run alone: CFG in float32, Gumbel noise in float64 from each job's own
generator (for all jobs first, then the random-remasking draws: per job that is the reference's
order), softmax of the un-noised logits, ties to the lower position.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from server.engine.device_io import index, to_device

# Candidate rows sampled (float64 noise) or soft-maxed at a time: bounds the [rows, vocab]
# buffers of a long block.
SAMPLE_ROWS = 64


@dataclass(frozen=True)
class ChoiceJob:
    """One job's part of a step's choice; the defaults pick the single most confident argmax."""

    candidates: int
    count: int = 1  # how many to reveal, unless a threshold or a factor decides
    threshold: float | None = None
    factor: float | None = None
    cfg_factor: float | None = None  # cfg_scale + 1 under CFG
    temperature: float = 0.0
    random_remasking: bool = False
    logits_eos_inf: bool = False
    exclude_stops: bool = False  # confidence_eos_eot_inf
    generator: torch.Generator | None = None  # needed when the job draws: temperature > 0 or random remasking


def choose(
    logits: torch.Tensor, jobs: list[ChoiceJob], eos_id: int, stop_ids: tuple[int, ...], width: int
) -> torch.Tensor:
    """[jobs, 3 * width + 1] float64: per job its candidate indices by falling confidence, their
    tokens and probabilities (each padded to width), and the number to reveal (see `unpack`)."""
    device = logits.device
    starts, n = [], 0
    for job in jobs:
        starts.append(n)
        n += job.candidates
    cond = logits[:n]

    cfg = [(job, start) for job, start in zip(jobs, starts) if job.cfg_factor is not None]
    if cfg:
        rows = [start + r for job, start in cfg for r in range(job.candidates)]
        guide(cond, logits[n:], rows, [job.cfg_factor for job, _ in cfg for _ in range(job.candidates)])

    per_row = [(start, job) for job, start in zip(jobs, starts)]
    if any(job.logits_eos_inf for job in jobs):
        cond[:, eos_id].masked_fill_(_row_mask(per_row, lambda job: job.logits_eos_inf, n, device), float("-inf"))

    tokens = cond.argmax(dim=-1)
    sampled = [(job, start) for job, start in zip(jobs, starts) if job.temperature > 0]
    if sampled:
        _gumbel_tokens(cond, tokens, sampled)

    probabilities = torch.empty(n, dtype=torch.float32, device=device)
    for a in range(0, n, SAMPLE_ROWS):
        b = min(n, a + SAMPLE_ROWS)
        probabilities[a:b] = torch.softmax(cond[a:b], dim=-1).gather(-1, tokens[a:b, None]).squeeze(-1)

    confidence = probabilities.double()
    for job, start in zip(jobs, starts):
        if job.random_remasking:
            draws = torch.rand(job.candidates, generator=job.generator, dtype=torch.float64, device=device)
            confidence[start : start + job.candidates] = draws
    if any(job.exclude_stops for job in jobs):
        excluded = _row_mask(per_row, lambda job: job.exclude_stops, n, device)
        is_stop = torch.isin(tokens, index(list(stop_ids), device))
        confidence.masked_fill_(excluded & is_stop, float("-inf"))

    slot = index([j * width + r for j, job in enumerate(jobs) for r in range(job.candidates)], device)
    by_slot = torch.full((len(jobs) * width,), float("-inf"), dtype=torch.float64, device=device)
    by_slot = by_slot.index_copy_(0, slot, confidence).view(len(jobs), width)
    ranked, order = torch.sort(by_slot, dim=1, descending=True, stable=True)

    def by_rank(values: torch.Tensor) -> torch.Tensor:
        padded = torch.zeros(len(jobs) * width, dtype=torch.float64, device=device)
        return padded.index_copy_(0, slot, values.double()).view(len(jobs), width).gather(1, order)

    counts = to_device(torch.tensor([job.count for job in jobs], dtype=torch.long), device)
    if any(job.threshold is not None or job.factor is not None for job in jobs):
        counts = _dynamic_counts(ranked, jobs, counts)
    return torch.cat([order.double(), by_rank(tokens), by_rank(probabilities), counts[:, None].double()], dim=1)


def guide(cond: torch.Tensor, uncond: torch.Tensor, rows: list[int], factors: list[float]) -> None:
    """Classifier-free guidance in place on cond's given rows, whose unconditional rows are
    uncond's rows in the same order: uncond + factor * (cond - uncond) with factor = cfg_scale + 1,
    in float32, in the reference sampler's order of operations."""
    device = cond.device
    where = index(rows, device)
    factor = to_device(torch.tensor(factors, dtype=torch.float32)[:, None], device)
    cond.index_copy_(0, where, cond.index_select(0, where).sub_(uncond).mul_(factor).add_(uncond))


def _dynamic_counts(ranked: torch.Tensor, jobs: list[ChoiceJob], counts: torch.Tensor) -> torch.Tensor:
    """Reveal counts of the threshold and factor rules (LLADA.md "Fast decoding") from each job's
    confidences sorted descending, [jobs, width], -inf past its candidates; compared in float64."""
    device = ranked.device
    if any(job.threshold is not None for job in jobs):
        bound = to_device(torch.tensor([job.threshold or 0.0 for job in jobs], dtype=torch.float64), device)
        passing = (ranked >= bound[:, None]).sum(dim=1).clamp(min=1)
        uses = to_device(torch.tensor([job.threshold is not None for job in jobs]), device)
        counts = torch.where(uses, passing, counts)
    if any(job.factor is not None for job in jobs):
        # rank k (1-based) passes when c_k >= 1 - f/(k+1), rank 1's bound being -1 as published
        f = to_device(torch.tensor([job.factor or 0.0 for job in jobs], dtype=torch.float64), device)
        k = torch.arange(1, ranked.shape[1] + 1, device=device, dtype=torch.float64)
        bounds = 1 - f[:, None] / (k + 1)
        bounds[:, 0] = -1.0
        fails = torch.cat([ranked < bounds, torch.ones(len(jobs), 1, dtype=torch.bool, device=device)], dim=1)
        first = fails.int().argmax(dim=1)  # 0-based rank of the first failure (padding fails)
        # reveal the ranks before it; one if rank 1 fails; all if only the last fails (the quirk)
        candidates = to_device(torch.tensor([job.candidates for job in jobs]), device)
        by_factor = torch.where(first == 0, 1, torch.where(first >= candidates - 1, candidates, first))
        uses = to_device(torch.tensor([job.factor is not None for job in jobs]), device)
        counts = torch.where(uses, by_factor, counts)
    return counts


def unpack(row: list[float]) -> tuple[list[int], list[int], list[float]]:
    """One job's row of `choose`'s result, read back: the revealed candidates (indices), their
    tokens and probabilities."""
    width = (len(row) - 1) // 3
    count = int(row[-1])
    order = [int(i) for i in row[:count]]
    return order, [int(t) for t in row[width : width + count]], row[2 * width : 2 * width + count]


def _row_mask(per_row, wanted, n: int, device: torch.device) -> torch.Tensor:
    """[n] bool: True on the candidate rows of the jobs `wanted` picks."""
    flags = [wanted(job) for start, job in per_row for _ in range(job.candidates)]
    return to_device(torch.tensor(flags, dtype=torch.bool), device)


def _gumbel_tokens(cond: torch.Tensor, tokens: torch.Tensor, sampled: list[tuple[ChoiceJob, int]]) -> None:
    """argmax(exp(logits) / (-log u)^T) for the rows of jobs with temperature > 0, in float64, in
    slices of SAMPLE_ROWS rows across jobs; each job draws its u from its own generator, in row
    order, so it gets the numbers the reference draws in one go."""
    pieces = [
        (job, start + a, min(job.candidates, a + SAMPLE_ROWS) - a)
        for job, start in sampled
        for a in range(0, job.candidates, SAMPLE_ROWS)
    ]
    slices, rows = [[]], 0
    for piece in pieces:
        if rows + piece[2] > SAMPLE_ROWS:
            slices.append([])
            rows = 0
        slices[-1].append(piece)
        rows += piece[2]
    vocab, device = cond.shape[1], cond.device
    for pieces in slices:
        noise = [
            torch.rand((count, vocab), generator=job.generator, dtype=torch.float64, device=device)
            for job, _, count in pieces
        ]
        noise = noise[0] if len(noise) == 1 else torch.cat(noise)
        noise.log_().neg_()
        at = 0
        for job, _, count in pieces:
            if job.temperature != 1:  # x ** 1 is x exactly; skipping the pow saves a third of the time
                noise[at : at + count].pow_(job.temperature)
            at += count
        rows = index([start + r for _, start, count in pieces for r in range(count)], device)
        tokens.index_copy_(0, rows, cond.index_select(0, rows).double().exp_().div_(noise).argmax(dim=-1))
