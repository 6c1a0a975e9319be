"""A packed step: every row of a step in one forward, with no padding.

The rows' tokens are laid end to end ([tokens] ids and absolute positions), so every linear sees
only real tokens; `seqs` tells attention where each row's tokens are and which keys it attends
to (its own, or its cache's, read in place: kv_cache.py), grouped into the runs one attention
call serves, decided once per step. `keep` names the tokens whose hidden
states the LM head will read. The host builds the small index lists once per step and sends
them in one copy.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from server.engine.device_io import to_device
from server.engine.kv_cache import CacheWrites, KVPool


@dataclass(frozen=True, eq=False)
class RowInput:
    """One row of a step, as the runner receives it."""

    tokens: list[int]
    start: int = 0  # absolute position of tokens[0] (RoPE)
    cache_slot: int | None = None  # the row keeps keys and values in the cache, position p at cache_slot + p
    reads_cache: bool = False  # attends to its cache's first `context` slots instead of its own keys
    context: int = 0  # the whole sequence's length, when it reads the cache


@dataclass(frozen=True)
class Seq:
    """Where one row sits in the packed step."""

    offset: int  # its first token in the packed tensors
    length: int  # its tokens in this step
    slot: int | None  # first cache slot of its sequence (position 0), None without a cache
    reads_cache: bool
    context: int


@dataclass(frozen=True)
class Run:
    """Consecutive rows that one attention call serves: `count` rows of `length` tokens that
    attend to themselves, or one row that reads its cache (`reader`)."""

    offset: int
    count: int
    length: int
    reader: Seq | None = None


@dataclass
class PackedBatch:
    ids: torch.Tensor  # [tokens]
    positions: torch.Tensor  # [tokens] absolute positions
    runs: list[Run]  # what each attention call serves, in token order
    keep: torch.Tensor | None  # [kept] indices into the tokens; None: every token's hidden state
    cache: CacheWrites | None


def attention_runs(seqs: list[Seq]) -> list[Run]:
    """Consecutive rows of one length that attend to themselves share a run; a row that reads
    its cache is a run of its own."""
    runs: list[Run] = []
    for seq in seqs:
        if seq.reads_cache:
            runs.append(Run(seq.offset, 1, seq.length, seq))
        elif runs and runs[-1].reader is None and runs[-1].length == seq.length:
            runs[-1] = Run(runs[-1].offset, runs[-1].count + 1, seq.length)
        else:
            runs.append(Run(seq.offset, 1, seq.length))
    return runs


def pack(
    rows: list[RowInput],
    device: torch.device,
    pool: KVPool | None = None,
    keep: list[list[int]] | None = None,
) -> PackedBatch:
    """keep: per row the indices into its tokens whose hidden states are wanted, in row order."""
    ids, positions, write_rows, write_slots, kept, seqs = [], [], [], [], [], []
    for i, row in enumerate(rows):
        offset = len(ids)
        ids.extend(row.tokens)
        positions.extend(range(row.start, row.start + len(row.tokens)))
        if row.cache_slot is not None:
            write_rows.extend(range(offset, offset + len(row.tokens)))
            first = row.cache_slot + row.start
            write_slots.extend(range(first, first + len(row.tokens)))
        if keep is not None:
            kept.extend(offset + p for p in keep[i])
        seqs.append(Seq(offset, len(row.tokens), row.cache_slot, row.reads_cache, row.context))
    sizes = [len(ids), len(positions), len(write_rows), len(write_slots), len(kept)]
    host = torch.tensor(ids + positions + write_rows + write_slots + kept, dtype=torch.long)
    parts = to_device(host, device).split(sizes)
    cache = CacheWrites(pool, parts[2], parts[3]) if pool is not None else None
    return PackedBatch(parts[0], parts[1], attention_runs(seqs), parts[4] if keep is not None else None, cache)
