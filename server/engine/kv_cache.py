"""Keys and values of the fast decoding modes (LLADA.md "Fast decoding"), kept per job.

One pool holds every cached row's keys and values for all layers, in pages of PAGE_TOKENS token
slots (in the spirit of gpt-fast's KVCache: a small buffer written at explicit positions, here
shared by many jobs). A job owns pages for each of its rows (two under CFG) covering its whole
sequence, so slot(position) is a page lookup; a forward writes its rows' new keys and values at
their slots and attends to the keys and values at the slots of every position of the row. Page
0 is never handed out: padded query positions and rows that keep no cache write there.

Prefix and dual caches are the same layout: at a block's first step a full forward writes every
position; later steps write the positions they run (prefix: block start to the end; dual: the
block) and attend to all, so each row sees the kept prefix (and, dual, the kept stale suffix)
plus its own fresh keys, as the published algorithm does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from server.engine.model_config import ModelConfig

PAGE_TOKENS = 16


def bytes_per_token(config: ModelConfig, dtype: torch.dtype) -> int:
    """Keys and values of one position, every layer."""
    return config.n_layers * 2 * config.n_kv_heads * config.head_dim * torch.empty((), dtype=dtype).element_size()


def pages_for(tokens: int) -> int:
    return math.ceil(tokens / PAGE_TOKENS)


class KVPool:
    """Made by the engine thread at the first cached job; every call is from that thread."""

    def __init__(self, config: ModelConfig, pages: int, device: torch.device, dtype: torch.dtype):
        self.page_bytes = bytes_per_token(config, dtype) * PAGE_TOKENS
        slots = (pages + 1) * PAGE_TOKENS
        shape = (config.n_layers, slots, config.n_kv_heads, config.head_dim)
        # Untouched pages of a CPU buffer this size cost address space only; a CUDA one is
        # reserved here, as the budget says.
        self.keys = torch.empty(shape, dtype=dtype, device=device)
        self.values = torch.empty(shape, dtype=dtype, device=device)
        self.free = list(range(pages, 0, -1))

    def allocate(self, tokens: int) -> list[int]:
        """Pages for one row of `tokens` positions; the scheduler's admission keeps them available."""
        count = pages_for(tokens)
        if count > len(self.free):
            raise RuntimeError(f"KV cache pool exhausted: {count} pages asked, {len(self.free)} free")
        pages, self.free = self.free[-count:], self.free[:-count]
        return pages

    def release(self, pages: list[int]) -> None:
        self.free.extend(pages)

    @property
    def bytes_in_use(self) -> int:
        return (self.keys.shape[1] // PAGE_TOKENS - 1 - len(self.free)) * self.page_bytes


def slots(pages: list[int], start: int, end: int) -> list[int]:
    """Cache slots of positions start..end-1 of a row that owns `pages`."""
    return [pages[p // PAGE_TOKENS] * PAGE_TOKENS + p % PAGE_TOKENS for p in range(start, end)]


@dataclass(frozen=True)
class KVBatch:
    """What one forward does with the cache: RoPE at `positions` [rows, queries], each query's
    new keys and values written at `write` [rows * queries] (page 0 for padding and rows that keep
    none), and, when `read` [rows, keys] is given, attention over the keys at those slots instead
    of the forward's own."""

    pool: KVPool
    positions: torch.Tensor
    write: torch.Tensor
    read: torch.Tensor | None = None

    def attend(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v [rows, kv_heads, queries, head_dim] after RoPE -> the keys and values to attend to."""
        keys, values = self.pool.keys[layer], self.pool.values[layer]
        keys.index_copy_(0, self.write, k.transpose(1, 2).reshape(-1, *keys.shape[1:]))
        values.index_copy_(0, self.write, v.transpose(1, 2).reshape(-1, *values.shape[1:]))
        if self.read is None:
            return k, v
        return keys[self.read].transpose(1, 2), values[self.read].transpose(1, 2)
