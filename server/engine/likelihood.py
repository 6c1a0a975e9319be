"""Monte-Carlo log-likelihood (LLaDA's ELBO estimator) and the greedy check, batched across
requests.

A scoring job turns each (prefix, target) pair into rows of work: MC rows (a noisy copy of the
sequence with some target positions masked) and, if asked, one greedy row per pair per forward.
Rows of any jobs share forwards, and the LM head runs only on the masked positions.

Group sizes: mc_num samples are drawn in ceil(mc_num / batch_size) stratified groups as equal as
possible (the reference needs mc_num to be a multiple of batch_size). A one-token target makes
every sample identical (the one position is always masked), so it is computed once: the same
value, exactly, without mc_num forwards.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from server.engine.events import ScoreResult
from server.engine.loader import LoadedModel
from server.engine.padding import MAX_PADDING_WASTE, hidden_at, unconditional
from server.engine.sampling import cfg_combine, select_top, spread
from server.engine.sampling_params import ScoreParams


@dataclass
class McRow:
    pair: int
    ids: torch.Tensor
    positions: torch.Tensor  # masked target positions, absolute
    targets: torch.Tensor  # the true tokens at those positions
    weight: float  # this row's share of the estimate: (L / masked) / (group size * groups)


@dataclass
class GreedyState:
    pair: int
    canvas: torch.Tensor
    target: torch.Tensor  # absolute-position targets for the answer span


@dataclass(eq=False)
class ScoringJob:
    pairs: list[tuple[list[int], list[int]]]
    params: ScoreParams
    mask_id: int
    loglikelihoods: list[float] = field(init=False)
    is_greedy: list[bool | None] = field(init=False)
    rows_done: int = 0

    def __post_init__(self) -> None:
        seed = self.params.seed if self.params.seed is not None else random.getrandbits(63)
        # Masks are drawn on the CPU: cheap, and the same on every device.
        self.generator = torch.Generator().manual_seed(seed)
        self.loglikelihoods = [0.0] * len(self.pairs)
        self.is_greedy = [None] * len(self.pairs)
        self._mc_rows: Iterator[McRow] = self._draw_mc_rows()
        self._returned: list[McRow] = []  # rows of a forward that failed, to run again
        self.mc_left = sum(sum(self.group_sizes(len(target))) for _, target in self.pairs)
        self.greedy: list[GreedyState] = []
        if self.params.greedy:
            for i, (prefix, target) in enumerate(self.pairs):
                canvas = torch.tensor(prefix + [self.mask_id] * len(target), dtype=torch.long)
                self.greedy.append(GreedyState(i, canvas, torch.tensor(target, dtype=torch.long)))
                self.is_greedy[i] = True

    def group_sizes(self, target_len: int) -> list[int]:
        if target_len == 1:
            return [1]
        groups = math.ceil(self.params.mc_num / self.params.batch_size)
        return spread(self.params.mc_num, groups)

    def _draw_mc_rows(self) -> Iterator[McRow]:
        g = self.generator
        for pair, (prefix, target) in enumerate(self.pairs):
            seq = torch.tensor(prefix + target, dtype=torch.long)
            length = len(target)
            sizes = self.group_sizes(length)
            for size in sizes:
                k = int(torch.randint(1, length + 1, (), generator=g))
                counts = torch.round(torch.linspace(float(k), k + (size - 1) * (length / size), size)).long()
                for count in ((counts - 1) % length + 1).tolist():
                    positions = torch.randperm(length, generator=g)[:count].sort().values + len(prefix)
                    noisy = seq.clone()
                    noisy[positions] = self.mask_id
                    yield McRow(pair, noisy, positions, seq[positions], (length / count) / (size * len(sizes)))

    @property
    def results(self) -> list[ScoreResult]:
        return [ScoreResult(ll, greedy) for ll, greedy in zip(self.loglikelihoods, self.is_greedy)]

    @property
    def units(self) -> int:
        """Rows of work that can go into the next forward."""
        return self.mc_left + len(self.greedy)

    @property
    def finished(self) -> bool:
        return self.units == 0

    def take(self, units: int) -> tuple[list[GreedyState], list[McRow]]:
        greedy = self.greedy[:units]
        mc = []
        while len(greedy) + len(mc) < units and self.mc_left:
            mc.append(self._returned.pop() if self._returned else next(self._mc_rows))
            self.mc_left -= 1
        return greedy, mc

    def give_back(self, mc: list[McRow]) -> None:
        self._returned.extend(reversed(mc))
        self.mc_left += len(mc)


class Scorer:
    def __init__(self, loaded: LoadedModel):
        self.model = loaded.model
        self.mask_id = loaded.special.mask
        self.pad_id = loaded.special.eos

    def new_job(self, pairs: list[tuple[list[int], list[int]]], params: ScoreParams) -> ScoringJob:
        return ScoringJob(pairs, params, self.mask_id)

    @torch.inference_mode()
    def step(self, work: list[tuple[ScoringJob, int]]) -> int:
        """One forward over the given units of each job; returns the rows run."""
        plan = [(job, *job.take(units)) for job, units in work]
        rows, positions = [], []
        for job, greedy, mc in plan:
            for item in [*greedy, *mc]:
                seq = item.canvas if isinstance(item, GreedyState) else item.ids
                where = (seq == self.mask_id).nonzero().squeeze(-1) if isinstance(item, GreedyState) else item.positions
                rows.append(seq)
                positions.append(where.to(self.model.device))
                if job.params.cfg_scale > 0:
                    rows.append(unconditional(seq, len(job.pairs[item.pair][0]), self.mask_id))
                    positions.append(positions[-1])
        try:
            selected = iter(hidden_at(self.model, rows, positions, self.pad_id, MAX_PADDING_WASTE))
        except BaseException:
            for job, _, mc in plan:
                job.give_back(mc)
            raise
        for job, greedy, mc in plan:
            for state in greedy:
                self._greedy_update(job, state, self._logits(job, selected))
            for mc_row in mc:
                self._mc_update(job, mc_row, self._logits(job, selected))
            job.greedy = [s for s in job.greedy if job.is_greedy[s.pair] and (s.canvas == self.mask_id).any()]
            job.rows_done += len(greedy) + len(mc)
        return len(rows)

    def _logits(self, job: ScoringJob, selected: Iterator[torch.Tensor]) -> torch.Tensor:
        """The next row's logits at its positions, guided by its unconditional row under CFG."""
        if job.params.cfg_scale > 0:
            return cfg_combine(
                self.model.logits(next(selected)), self.model.logits(next(selected)), job.params.cfg_scale
            )
        return self.model.logits(next(selected))

    def _mc_update(self, job: ScoringJob, mc_row: McRow, logits: torch.Tensor) -> None:
        loss = F.cross_entropy(logits, mc_row.targets.to(logits.device), reduction="sum").item()
        job.loglikelihoods[mc_row.pair] -= loss * mc_row.weight

    def _greedy_update(self, job: ScoringJob, state: GreedyState, logits: torch.Tensor) -> None:
        """Reveal the single most confident masked position; a wrong token settles it as False."""
        positions = (state.canvas == self.mask_id).nonzero().squeeze(-1)
        tokens = logits.argmax(-1)
        confidence = torch.softmax(logits, -1).gather(-1, tokens[:, None]).squeeze(-1)
        best = int(select_top(confidence, 1)[0])
        position, token = int(positions[best]), int(tokens[best])
        state.canvas[position] = token
        prefix_len = len(job.pairs[state.pair][0])
        if token != int(state.target[position - prefix_len]):
            job.is_greedy[state.pair] = False


def score_pairs(
    loaded: LoadedModel, pairs: list[tuple[list[int], list[int]]], params: ScoreParams, max_rows: int = 64
) -> list[ScoreResult]:
    """Score pairs to completion in forwards of at most max_rows rows."""
    scorer = Scorer(loaded)
    job = scorer.new_job(pairs, params)
    while not job.finished:
        scorer.step([(job, max(1, max_rows // params.rows_per_unit))])
    return job.results
