"""How a step becomes one forward: the one place that packs rows, shared by the denoiser and the
scorer (the scheduler only decides which jobs share a step).

A step is a list of `Work`: a row (packed.RowInput: its tokens, absolute start, cache slot and
whether it reads its cache), the positions whose logits it needs and, under classifier-free
guidance, its unconditional copy. Every row of the step, whatever its length, cache phase or CFG
copy, goes into one packed forward (no padding); then one LM-head call per `head_rows` logit
rows, on the needed positions only, and the caller's `decide` turns each call's logits into
numbers on the device; all of them are read back in one copy.

Failures: out of memory propagates, for the engine to retry smaller. Another error of the forward
fails every owner of the step; one of an LM-head call fails the owners of that call's chunk, and
the rest of the step goes on.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from server.engine.device_io import index
from server.engine.kv_cache import KVPool
from server.engine.packed import RowInput, pack
from server.metrics import Metrics


def unconditional(tokens: list[int], prompt_len: int, mask_id: int) -> list[int]:
    """The classifier-free-guidance copy: every prompt position masked."""
    return [mask_id] * prompt_len + tokens[prompt_len:]


@dataclass(frozen=True, eq=False)
class Work:
    owner: object  # the job this row belongs to: failures are reported per owner
    row: RowInput
    positions: list[int]  # indices into row.tokens where logits are needed
    uncond: RowInput | None = None  # the CFG copy (same positions), if guided
    fills: tuple[RowInput, ...] = ()  # rows run only to write their keys and values to the cache

    @property
    def head_rows(self) -> int:
        return len(self.positions) * (1 if self.uncond is None else 2)


@dataclass
class Outcome:
    values: dict[int, list[float]]  # index of the work -> its row of `decide`'s result, for the works that ran
    failed: list[tuple[list[object], Exception]] = field(default_factory=list)  # owners, and why


Decide = Callable[[torch.Tensor, list[Work]], torch.Tensor]


def head_chunks(works: list[Work], limit: int) -> list[list[int]]:
    """Consecutive works (by index) packed up to limit LM-head rows; one over the limit goes alone."""
    chunks: list[list[int]] = []
    size = limit
    for i, work in enumerate(works):
        if size + work.head_rows > limit:
            chunks.append([])
            size = 0
        chunks[-1].append(i)
        size += work.head_rows
    return chunks


class ForwardMetrics:
    """Rows and duration of every forward. On CUDA the time comes from events read after the
    step's one device-to-host copy, so timing adds no synchronisation."""

    def __init__(self, metrics: Metrics | None):
        self.metrics = metrics
        self._pending: tuple[torch.cuda.Event, torch.cuda.Event] | None = None  # CUDA: the last forward's

    def run(self, forward: Callable[[], torch.Tensor], rows: int, device: torch.device) -> torch.Tensor:
        if self.metrics is None:
            return forward()
        self.metrics.batch_rows.observe(rows)
        if device.type != "cuda":
            began = time.perf_counter()
            try:
                return forward()
            finally:
                self.metrics.forward_duration_seconds.observe(time.perf_counter() - began)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        try:
            return forward()
        finally:
            end.record()
            self._pending = (start, end)

    def step_finished(self) -> None:
        """After the step's read-back (or its failure): the recorded events have completed."""
        pending = self._pending
        if pending is not None:
            self._pending = None
            pending[1].synchronize()
            self.metrics.forward_duration_seconds.observe(pending[0].elapsed_time(pending[1]) / 1000)


def run_step(
    model: torch.nn.Module,
    works: list[Work],
    head_rows: int,
    decide: Decide,
    pool: KVPool | None = None,
    timing: ForwardMetrics | None = None,
) -> Outcome:
    """The step's forward, LM-head calls and `decide` calls, then its one read-back.

    `decide(logits, chunk)` gets the logits of a chunk's positions, work after work, then those
    of the chunk's unconditional copies in the same order; it returns one row per work."""
    timing = timing or ForwardMetrics(None)
    try:
        return _run(model, works, head_rows, decide, pool, timing)
    finally:
        timing.step_finished()


def _run(model, works, head_rows, decide, pool, timing) -> Outcome:
    guided = [work for work in works if work.uncond is not None]
    fills = [row for work in works for row in work.fills]
    rows = [work.row for work in works] + [work.uncond for work in guided] + fills
    keep = [work.positions for work in works] + [work.positions for work in guided] + [[]] * len(fills)
    device = model.device
    try:
        batch = pack(rows, device, pool, keep)
        hidden = timing.run(lambda: model(batch), len(rows), device)
    except torch.OutOfMemoryError:
        raise
    except Exception as exc:
        return Outcome({}, [(_owners(works), exc)])
    starts_cond, at = [], 0
    for work in works:
        starts_cond.append(at)
        at += len(work.positions)
    starts_uncond = {}
    for work in guided:
        starts_uncond[id(work)] = at
        at += len(work.positions)
    results, ran, failed = [], [], []
    for chunk in head_chunks(works, head_rows):
        members = [works[i] for i in chunk]
        cond = [r for i in chunk for r in range(starts_cond[i], starts_cond[i] + len(works[i].positions))]
        uncond = [
            r
            for work in members
            if work.uncond is not None
            for r in range(starts_uncond[id(work)], starts_uncond[id(work)] + len(work.positions))
        ]
        rows_of_chunk = cond + uncond
        try:
            if rows_of_chunk == list(range(rows_of_chunk[0], rows_of_chunk[0] + len(rows_of_chunk))):
                chunk_hidden = hidden[rows_of_chunk[0] : rows_of_chunk[0] + len(rows_of_chunk)]
            else:
                chunk_hidden = hidden.index_select(0, index(rows_of_chunk, device))
            results.append(decide(model.logits(chunk_hidden), members))
        except torch.OutOfMemoryError:
            raise
        except Exception as exc:
            failed.append((_owners(members), exc))
            continue
        ran.extend(chunk)
    values = (results[0] if len(results) == 1 else torch.cat(results)).tolist() if results else []
    bad = {id(owner) for owners, _ in failed for owner in owners}  # a job fails whole, not in part
    return Outcome({i: row for i, row in zip(ran, values) if id(works[i].owner) not in bad}, failed)


def _owners(works: list[Work]) -> list[object]:
    owners: list[object] = []
    for work in works:
        if not any(work.owner is o for o in owners):
            owners.append(work.owner)
    return owners
