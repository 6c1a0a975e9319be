"""LLaDA2's token choice for every job of a step at once (FAMILY.md, "2.0 sampler" and 2.1's
editing): each job's settings as batched tensors, one call for the batch, one read-back.

Input: the LM head's logits of the step's candidates, job after job: the current block's answer
positions that are masked and, for a job that edits, those already written. Per candidate a
token (argmax at temperature 0; else the published `generate`'s draw: logits / temperature,
top-k, then top-p filtering, softmax, one multinomial draw per position from the job's own
generator) and its probability under that same distribution. Then the commit rule: a masked
position commits when its probability is above the threshold, provided at least `count` do;
otherwise the `count` most probable masked positions commit (ties to the lower position). An
edit replaces a written position whose token differs from its choice and whose probability is
above the editing threshold.

Output, [jobs, 3 * width] float64: per candidate its token, its probability and its action
(0 none, 1 commit, 2 edit), each padded to width.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from server.engine.device_io import to_device

NONE, COMMIT, EDIT = 0, 1, 2


@dataclass(frozen=True)
class BlockChoice:
    masked: list[bool]  # per candidate: masked (may commit) or already written (may be edited)
    current: list[int]  # per candidate: its token now (the mask id where masked)
    count: int  # commit at least this many masked positions (the schedule's, or 1 under 2.1)
    threshold: float | None  # None: the schedule alone decides
    editing_threshold: float | None = None
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    generator: torch.Generator | None = None

    @property
    def candidates(self) -> int:
        return len(self.masked)


def choose_block(logits: torch.Tensor, jobs: list[BlockChoice], width: int) -> torch.Tensor:
    device = logits.device
    n = sum(job.candidates for job in jobs)
    tokens = logits[:n].argmax(dim=-1)
    probabilities = torch.empty(n, dtype=torch.float32, device=device)
    at = 0
    for job in jobs:
        rows = slice(at, at + job.candidates)
        if job.temperature > 0:
            tokens[rows], probabilities[rows] = _draw(logits[rows], job)
        else:
            probabilities[rows] = torch.softmax(logits[rows], dim=-1).gather(-1, tokens[rows, None]).squeeze(-1)
        at += job.candidates

    def per_job(values: list[list], dtype, fill) -> torch.Tensor:
        padded = [row + [fill] * (width - len(row)) for row in values]
        return to_device(torch.tensor(padded, dtype=dtype), device)

    masked = per_job([job.masked for job in jobs], torch.bool, False)
    current = per_job([job.current for job in jobs], torch.long, -1)
    slot = torch.cat([torch.arange(job.candidates) + j * width for j, job in enumerate(jobs)])
    slot = to_device(slot, device)
    token_grid = torch.zeros(len(jobs) * width, dtype=torch.long, device=device).index_copy_(0, slot, tokens)
    token_grid = token_grid.view(len(jobs), width)
    prob_grid = torch.zeros(len(jobs) * width, dtype=torch.float32, device=device).index_copy_(0, slot, probabilities)
    prob_grid = prob_grid.view(len(jobs), width)

    settings = torch.tensor(
        [
            [
                job.count,
                job.threshold if job.threshold is not None else float("inf"),
                job.editing_threshold if job.editing_threshold is not None else float("inf"),
            ]
            for job in jobs
        ],
        dtype=torch.float64,
    )
    settings = to_device(settings, device)
    count, threshold, editing = settings[:, 0:1], settings[:, 1:2], settings[:, 2:3]

    confidence = torch.where(masked, prob_grid.double(), float("-inf"))
    high = confidence > threshold
    # ranks by falling confidence, ties to the lower position (a stable sort)
    order = torch.sort(confidence, dim=1, descending=True, stable=True).indices
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(width, device=device).expand(len(jobs), width))
    take = torch.minimum(count, masked.sum(dim=1, keepdim=True).double())
    by_rank = rank < take
    commit = torch.where(high.sum(dim=1, keepdim=True) >= count, high, by_rank & masked)
    edit = ~masked & (current >= 0) & (token_grid != current) & (prob_grid.double() > editing)
    action = torch.where(commit, COMMIT, torch.where(edit, EDIT, NONE))
    return torch.cat([token_grid.double(), prob_grid.double(), action.double()], dim=1)


def _draw(logits: torch.Tensor, job: BlockChoice) -> tuple[torch.Tensor, torch.Tensor]:
    """The published sampler at temperature > 0, in float32: the token drawn and its probability."""
    logits = logits / job.temperature if job.temperature != 1 else logits
    if job.top_k is not None and job.top_k > 0:
        kth = torch.topk(logits, min(job.top_k, logits.shape[-1])).values[..., -1, None]
        logits = torch.where(logits < kth, float("-inf"), logits)
    if job.top_p is not None and job.top_p < 1:
        ordered, indices = torch.sort(logits, descending=True)
        beyond = torch.cumsum(F.softmax(ordered, dim=-1), dim=-1) > job.top_p
        beyond[..., 1:] = beyond[..., :-1].clone()
        beyond[..., 0] = False
        logits = logits.masked_fill(torch.zeros_like(beyond).scatter(-1, indices, beyond), float("-inf"))
    probabilities = F.softmax(logits, dim=-1)
    tokens = torch.multinomial(probabilities, 1, generator=job.generator)
    return tokens.squeeze(-1), probabilities.gather(-1, tokens).squeeze(-1)


def unpack(row: list[float]) -> tuple[list[int], list[float], list[int]]:
    """One job's row, read back: per candidate its token, probability and action."""
    width = len(row) // 3
    return [int(t) for t in row[:width]], row[width : 2 * width], [int(a) for a in row[2 * width :]]
