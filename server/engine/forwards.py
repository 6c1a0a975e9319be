"""How a step becomes forwards: the one place that decides padding, shared by the denoiser and
the scorer (the scheduler only decides which jobs share a step).

A step is a list of `Work`: a row of tokens, the positions whose logits it needs and, under
classifier-free guidance, its unconditional copy. A row may use the KV cache (kv_cache.py): it
then starts at an absolute position, writes its keys and values at its slots, and may attend to
the slots of its whole sequence instead of to itself. Rows of similar length share a
right-padded forward (the padding hidden from attention by a key mask; rows that read the cache
go in forwards of their own); rows whose padding would waste more than MAX_PADDING_WASTE of a
forward run in separate forwards. Then one LM-head call per
`head_rows` logit rows, on the needed positions only, and the caller's `decide` turns each
call's logits into numbers on the device; all of them are read back in one copy.

A forward or head call that raises fails the owners (jobs) of its work and the rest of the
step goes on; out of memory propagates, for the engine to retry smaller.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from server.engine.kv_cache import KVBatch, KVPool

if TYPE_CHECKING:
    from server.engine.hooks import ForwardHooks
    from server.engine.model import LLaDAModel

MAX_PADDING_WASTE = 0.25


def padding_waste(real: int, rows: int, longest: int) -> float:
    """Share of a padded [rows, longest] forward's positions that are padding."""
    return 1 - real / (rows * longest)


def length_groups(lengths: list[int], max_waste: float) -> list[list[int]]:
    """Row indices in groups (shortest first) such that padding each group to its longest row
    wastes at most max_waste of the group's positions. Each group is one forward: rows of very
    different lengths do not pay for each other's padding."""
    groups: list[list[int]] = []
    real = 0
    for i in sorted(range(len(lengths)), key=lengths.__getitem__):
        if groups and padding_waste(real + lengths[i], len(groups[-1]) + 1, lengths[i]) <= max_waste:
            groups[-1].append(i)
            real += lengths[i]
            continue
        groups.append([i])
        real = lengths[i]
    return groups


def to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on the device without waiting for the device: a copy from pageable memory
    would first drain the stream (a synchronisation), one from pinned memory does not."""
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host


def index(values: list[int], device: torch.device) -> torch.Tensor:
    return to_device(torch.tensor(values, dtype=torch.long), device)


def padded_ids(rows: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """ids [rows, longest] right-padded (each row keeps positions 0..len-1, as when run alone),
    and the key mask [rows, 1, 1, longest] (True on real tokens), None when no row is padded.
    Decided from the known lengths: nothing is read back from the device."""
    longest = max(len(row) for row in rows)
    ids = index([row + [pad_id] * (longest - len(row)) for row in rows], device)
    if all(len(row) == longest for row in rows):
        return ids, None
    lengths = index([len(row) for row in rows], device)
    return ids, (torch.arange(longest, device=device) < lengths[:, None])[:, None, None, :]


def unconditional(tokens: list[int], prompt_len: int, mask_id: int) -> list[int]:
    """The classifier-free-guidance copy: every prompt position masked."""
    return [mask_id] * prompt_len + tokens[prompt_len:]


@dataclass(frozen=True, eq=False)
class RowInput:
    tokens: list[int]
    start: int = 0  # absolute position of tokens[0], for RoPE
    write: list[int] | None = None  # a cache slot per token: the row keeps its keys and values there
    read: list[int] | None = None  # the slots of positions 0..n-1 of its sequence: it attends to those


@dataclass(frozen=True, eq=False)
class Work:
    owner: object  # the job this row belongs to: failures are reported per owner
    row: RowInput
    positions: list[int]  # indices into row.tokens where logits are needed
    uncond: RowInput | None = None  # the CFG copy (same positions), if guided

    @property
    def head_rows(self) -> int:
        return len(self.positions) * (1 if self.uncond is None else 2)


@dataclass
class Outcome:
    values: dict[int, list[float]]  # id(work) -> its row of `decide`'s result, for the works that ran
    failed: list[tuple[list[object], Exception]] = field(default_factory=list)  # owners, and why


Decide = Callable[[torch.Tensor, list[Work]], torch.Tensor]


def head_chunks(works: list[Work], limit: int) -> list[list[Work]]:
    """Consecutive works packed up to limit LM-head rows; one over the limit goes alone."""
    chunks: list[list[Work]] = []
    size = limit
    for work in works:
        if size + work.head_rows > limit:
            chunks.append([])
            size = 0
        chunks[-1].append(work)
        size += work.head_rows
    return chunks


def run_step(
    model: LLaDAModel,
    works: list[Work],
    pad_id: int,
    hooks: ForwardHooks,
    head_rows: int,
    decide: Decide,
    pool: KVPool | None = None,
) -> Outcome:
    """The step's forwards, LM-head calls and `decide` calls, then its one read-back.

    `decide(logits, chunk)` gets the logits of a chunk's positions, work after work, then those
    of the chunk's unconditional copies in the same order; it returns one row per work."""
    failed: dict[int, tuple[Exception, list[object]]] = {}

    def fail(owner: object, exc: Exception) -> None:
        if not any(owner is o for _, owners in failed.values() for o in owners):
            failed.setdefault(id(exc), (exc, []))[1].append(owner)

    guided = [work for work in works if work.uncond is not None]
    rows = [(work, work.row) for work in works] + [(work, work.uncond) for work in guided]
    states = _forward(model, rows, pad_id, hooks, fail, pool)
    bad = {id(owner) for _, owners in failed.values() for owner in owners}
    if bad and states is not None:  # keep only the rows of owners whose forwards all ran
        keep, at = [], 0
        for i, (work, _) in enumerate(rows):
            if i in states.ran:
                if id(work.owner) not in bad:
                    keep.extend(range(at, at + len(work.positions)))
                at += len(work.positions)
        states.hidden = states.hidden.index_select(0, index(keep, states.hidden.device)) if keep else None
    works = [work for work in works if id(work.owner) not in bad]
    results, ran = [], []
    at_cond, at_uncond = 0, sum(len(work.positions) for work in works)
    chunks = head_chunks(works, head_rows)
    for number, chunk in enumerate(chunks, 1):
        cond = sum(len(work.positions) for work in chunk)
        uncond = sum(len(work.positions) for work in chunk if work.uncond is not None)
        hidden = states.hidden[at_cond : at_cond + cond]
        if uncond:
            hidden = torch.cat([hidden, states.hidden[at_uncond : at_uncond + uncond]])
        at_cond, at_uncond = at_cond + cond, at_uncond + uncond
        try:
            hooks.before_head(last=number == len(chunks))
            results.append(decide(model.logits(hidden), chunk))
        except torch.OutOfMemoryError:
            raise
        except Exception as exc:
            for work in chunk:
                fail(work.owner, exc)
            continue
        ran.extend(chunk)
    bad = {id(owner) for _, owners in failed.values() for owner in owners}
    values = (results[0] if len(results) == 1 else torch.cat(results)).tolist() if results else []
    return Outcome(
        {id(work): row for work, row in zip(ran, values) if id(work.owner) not in bad},
        [(owners, exc) for exc, owners in failed.values()],
    )


@dataclass
class _States:
    hidden: torch.Tensor | None  # final hidden states at the needed positions of the rows that ran, in order
    ran: set[int]  # the rows that ran


def _forward(model, rows, pad_id, hooks, fail, pool) -> _States | None:
    """The rows in length groups, one forward each, gathering the needed positions. Rows that
    read the cache are grouped apart from those that attend to themselves."""
    parts, ran_rows, device = [], [], model.device
    reading = [i for i, (_, row) in enumerate(rows) if row.read is not None]
    groups = []
    for members in (sorted(set(range(len(rows))) - set(reading)), reading):
        lengths = [len(rows[i][1].tokens) for i in members]
        groups += [[members[k] for k in group] for group in length_groups(lengths, MAX_PADDING_WASTE)]
    for group in groups:
        inputs = [rows[i][1] for i in group]
        try:
            with hooks.forward(len(group), device):
                ids, mask = padded_ids([row.tokens for row in inputs], pad_id, device)
                cache = None
                if any(row.write is not None or row.read is not None or row.start for row in inputs):
                    cache, mask = _cache_view(pool, inputs, ids.shape[1], device, mask)
                width = ids.shape[1]
                where = [k * width + p for k, i in enumerate(group) for p in rows[i][0].positions]
                parts.append(model(ids, mask, cache, keep=index(where, device)))
        except torch.OutOfMemoryError:
            raise
        except Exception as exc:
            for i in group:
                fail(rows[i][0].owner, exc)
            continue
        ran_rows.extend(group)
    if not parts:
        return None
    hidden = parts[0] if len(parts) == 1 else torch.cat(parts)
    if ran_rows != sorted(ran_rows):  # groups go by length: put the rows back in order
        offsets, start = {}, 0
        for i in sorted(ran_rows):
            offsets[i] = start
            start += len(rows[i][0].positions)
        source = [offsets[i] + k for i in ran_rows for k in range(len(rows[i][0].positions))]
        order = [0] * len(source)
        for at, target in enumerate(source):
            order[target] = at
        hidden = hidden.index_select(0, index(order, device))
    return _States(hidden, set(ran_rows))


def _cache_view(pool: KVPool, inputs: list[RowInput], width: int, device: torch.device, mask):
    """A forward's KVBatch (padded queries write to page 0) and, when the rows read the cache,
    the key mask over the slots they read."""
    positions = [[row.start + k for k in range(len(row.tokens))] + [0] * (width - len(row.tokens)) for row in inputs]
    write = [slot for row in inputs for slot in (row.write or [0] * len(row.tokens)) + [0] * (width - len(row.tokens))]
    if inputs[0].read is None:
        return KVBatch(pool, index(positions, device), index(write, device)), mask
    keys = max(len(row.read) for row in inputs)
    read = index([row.read + [0] * (keys - len(row.read)) for row in inputs], device)
    if all(len(row.read) == keys for row in inputs):
        mask = None
    else:
        lengths = index([len(row.read) for row in inputs], device)
        mask = (torch.arange(keys, device=device) < lengths[:, None])[:, None, None, :]
    return KVBatch(pool, index(positions, device), index(write, device), read), mask
