"""Monte-Carlo log-likelihood (LLaDA's ELBO estimator) and the greedy check, batched across
requests.

A scoring job turns each (prefix, target) pair into rows of work: MC rows (a noisy copy of the
sequence with some target positions masked) and, if asked, one greedy row per pair per forward.
Rows of any jobs share one packed forward (runner.run_step) and one LM-head call per HEAD_ROWS
positions, which runs only on the masked positions; the results are read back once per step.

A step is a transaction, as the denoiser's: rows are taken from the jobs, and results written
into them only once every row's numbers are back; a step that raises gives the rows back.

Group sizes: mc_num samples are drawn in ceil(mc_num / batch_size) stratified groups as equal as
possible (the reference needs mc_num to be a multiple of batch_size). A one-token target makes
every sample identical (the one position is always masked), so it is computed once: the same
value, exactly, without mc_num forwards.
"""

from __future__ import annotations

import functools
import itertools
import math
import random
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from server.engine.device_io import index
from server.engine.events import ScoreResult
from server.engine.loader import LoadedModel
from server.engine.packed import RowInput
from server.engine.request import Request
from server.engine.runner import ForwardMetrics, Work, run_step, unconditional
from server.engine.sampler import ChoiceJob, choose, guide
from server.engine.sampling_params import ScoreParams
from server.engine.schedule import spread

# Most masked positions whose logits are computed in one LM-head call (see denoiser.HEAD_ROWS).
HEAD_ROWS = 512


@dataclass
class McRow:
    pair: int
    ids: list[int]
    positions: list[int]  # masked target positions, absolute
    targets: list[int]  # the true tokens at those positions
    weight: float  # this row's share of the estimate: (L / masked) / (group size * groups)


@dataclass
class GreedyState:
    pair: int
    canvas: list[int]
    start: int  # the answer's first position

    def masked(self, mask_id: int) -> list[int]:
        return [p for p in range(self.start, len(self.canvas)) if self.canvas[p] == mask_id]


@dataclass(eq=False)
class ScoringJob(Request):
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
        self.is_greedy = [True if self.params.greedy else None] * len(self.pairs)
        self._mc_rows: Iterator[McRow] = self._draw_mc_rows()
        self._returned: list[McRow] = []  # rows of a step that failed, to run again
        self.mc_left = sum(sum(self.group_sizes(len(target))) for _, target in self.pairs)
        self.greedy: list[GreedyState] = []
        if self.params.greedy:
            for i, (prefix, target) in enumerate(self.pairs):
                self.greedy.append(GreedyState(i, prefix + [self.mask_id] * len(target), len(prefix)))

    def group_sizes(self, target_len: int) -> list[int]:
        if target_len == 1:
            return [1]
        groups = math.ceil(self.params.mc_num / self.params.batch_size)
        return spread(self.params.mc_num, groups)

    def _draw_mc_rows(self) -> Iterator[McRow]:
        g = self.generator
        for pair, (prefix, target) in enumerate(self.pairs):
            seq = prefix + target
            length = len(target)
            sizes = self.group_sizes(length)
            for size in sizes:
                k = int(torch.randint(1, length + 1, (), generator=g))
                counts = torch.round(torch.linspace(float(k), k + (size - 1) * (length / size), size)).long()
                for count in ((counts - 1) % length + 1).tolist():
                    positions = (torch.randperm(length, generator=g)[:count].sort().values + len(prefix)).tolist()
                    noisy = list(seq)
                    for p in positions:
                        noisy[p] = self.mask_id
                    weight = (length / count) / (size * len(sizes))
                    yield McRow(pair, noisy, positions, [seq[p] for p in positions], weight)

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


@dataclass
class ScoreStep:
    rows: int  # forward rows that ran (a CFG unit is two)
    failed: list[tuple[list[ScoringJob], Exception]]  # jobs whose forward or head raised, and why


class Scorer:
    def __init__(self, loaded: LoadedModel, timing: ForwardMetrics | None = None):
        self.model = loaded.model
        self.mask_id = loaded.special.mask
        self.pad_id = loaded.special.eos
        self.timing = timing

    def new_job(self, pairs: list[tuple[list[int], list[int]]], params: ScoreParams, **request) -> ScoringJob:
        return ScoringJob(pairs, params, self.mask_id, **request)

    @torch.inference_mode()
    def step(self, work: list[tuple[ScoringJob, int]]) -> ScoreStep:
        """One step's worth of the given units of each job: rows taken now, results written once
        every row's numbers are back."""
        taken = [(job, *job.take(units)) for job, units in work]
        works, rows_of = [], {}
        for job, greedy, mc in taken:
            for row in [*greedy, *mc]:
                tokens = row.canvas if isinstance(row, GreedyState) else row.ids
                positions = row.masked(self.mask_id) if isinstance(row, GreedyState) else row.positions
                prompt_len = len(job.pairs[row.pair][0])
                guided = job.params.cfg_scale > 0
                uncond = RowInput(unconditional(tokens, prompt_len, self.mask_id)) if guided else None
                works.append(Work(job, RowInput(tokens), positions, uncond))
                rows_of[id(works[-1])] = row
        try:
            decide = functools.partial(self._decide, rows_of=rows_of)
            outcome = run_step(self.model, works, HEAD_ROWS, decide, timing=self.timing)
        except BaseException:
            for job, _, mc in taken:
                job.give_back(mc)
            raise
        for i, value in outcome.values.items():
            self._commit(works[i], rows_of[id(works[i])], value)
        failed = {id(job) for jobs, _ in outcome.failed for job in jobs}
        ran = 0
        for job, greedy, mc in taken:
            if id(job) not in failed:
                job.greedy = [s for s in job.greedy if job.is_greedy[s.pair] and self.mask_id in s.canvas]
                job.rows_done += len(greedy) + len(mc)
                ran += job.params.rows_per_unit * (len(greedy) + len(mc))
        return ScoreStep(ran, outcome.failed)

    def _decide(self, logits: torch.Tensor, chunk: list[Work], rows_of: dict[int, McRow | GreedyState]) -> torch.Tensor:
        """[works, 2] float64: an MC row's loss (and 0); a greedy row's most confident masked index
        and its token (the token choice of a step revealing one, at temperature 0)."""
        device = logits.device
        starts = list(itertools.accumulate((len(work.positions) for work in chunk), initial=0))
        cond = logits[: starts[-1]]

        def rows(items: list[int]) -> list[int]:
            return [r for i in items for r in range(starts[i], starts[i + 1])]

        guided = [i for i, work in enumerate(chunk) if work.uncond is not None]
        if guided:
            factors = [chunk[i].owner.params.cfg_scale + 1.0 for i in guided for _ in chunk[i].positions]
            guide(cond, logits[starts[-1] :], rows(guided), factors)
        out = torch.zeros((len(chunk), 2), dtype=torch.float64, device=device)
        mc = [i for i, work in enumerate(chunk) if isinstance(rows_of[id(work)], McRow)]
        if mc:
            targets = index([t for i in mc for t in rows_of[id(chunk[i])].targets], device)
            owner = index([i for i in mc for _ in chunk[i].positions], device)
            loss = F.cross_entropy(cond.index_select(0, index(rows(mc), device)), targets, reduction="none")
            out[:, 0].index_add_(0, owner, loss.double())
        greedy = [i for i, work in enumerate(chunk) if isinstance(rows_of[id(work)], GreedyState)]
        if greedy:
            width = max(len(chunk[i].positions) for i in greedy)
            picks = [ChoiceJob(candidates=len(chunk[i].positions)) for i in greedy]
            best = choose(cond.index_select(0, index(rows(greedy), device)), picks, self.pad_id, (), width)
            out.index_copy_(0, index(greedy, device), best[:, [0, width]])
        return out

    def _commit(self, work: Work, row: McRow | GreedyState, value: list[float]) -> None:
        job: ScoringJob = work.owner
        if isinstance(row, McRow):
            job.loglikelihoods[row.pair] -= value[0] * row.weight
            return
        position, token = work.positions[int(value[0])], int(value[1])
        row.canvas[position] = token
        prefix, target = job.pairs[row.pair]
        if token != target[position - len(prefix)]:
            job.is_greedy[row.pair] = False


def score_pairs(
    loaded: LoadedModel, pairs: list[tuple[list[int], list[int]]], params: ScoreParams, max_rows: int = 64
) -> list[ScoreResult]:
    """Score pairs to completion in forwards of at most max_rows rows."""
    scorer = Scorer(loaded)
    job = scorer.new_job(pairs, params)
    while not job.finished:
        result = scorer.step([(job, max(1, max_rows // params.rows_per_unit))])
        if result.failed:
            raise result.failed[0][1]
    return job.results
