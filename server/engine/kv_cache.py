"""Keys and values of the fast decoding modes (LLADA.md "Fast decoding"), kept per row.

One pool holds every cached row's keys and values for all layers, allocated once when the engine
starts (in the spirit of gpt-fast's KVCache: a buffer written at explicit positions, here shared
by many requests). The scheduler's KV manager (server/scheduler/kv_pages.py) hands each cached
row a contiguous run of pages covering its whole sequence, at admission, and takes it back when
the request ends; so position p of a row lives at slot first + p, and a row's keys are a view of
the pool that attention reads in place.

Prefix and dual caches are the same layout: at a block's first step a full forward writes every
position; later steps write the positions they run (prefix: block start to the end; dual: the
block) and attend to the row's whole sequence in the cache, so each row sees the kept prefix
(and, dual, the kept stale suffix) plus its own fresh keys, as the published algorithm does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from server.engine.errors import PoolTooLarge

if TYPE_CHECKING:
    from server.engine.packed import Seq

PAGE_TOKENS = 16


def bytes_per_token(config, dtype: torch.dtype) -> int:
    """Keys and values of one position, every layer (config: any model's, with n_layers,
    n_kv_heads and head_dim)."""
    return config.n_layers * 2 * config.n_kv_heads * config.head_dim * torch.empty((), dtype=dtype).element_size()


def pages_for(tokens: int) -> int:
    return math.ceil(tokens / PAGE_TOKENS)


class KVPool:
    def __init__(self, config, pages: int, device: torch.device, dtype: torch.dtype):
        self.page_bytes = bytes_per_token(config, dtype) * PAGE_TOKENS
        self.pages = pages
        shape = (config.n_layers, pages * PAGE_TOKENS, config.n_kv_heads, config.head_dim)
        try:
            self.keys = torch.empty(shape, dtype=dtype, device=device)
            self.values = torch.empty(shape, dtype=dtype, device=device)
        except (RuntimeError, torch.OutOfMemoryError) as exc:
            raise PoolTooLarge(
                f"the KV cache pool of {pages * self.page_bytes / 2**20:.0f} MiB could not be allocated on "
                f"{device} ({type(exc).__name__}); lower --max-cache-memory"
            ) from exc

    @property
    def bytes(self) -> int:
        return self.pages * self.page_bytes

    def read(self, layer: int, seq: Seq) -> tuple[torch.Tensor, torch.Tensor]:
        """A row's keys and values for its whole sequence: views of the pool, not copies."""
        run = slice(seq.slot, seq.slot + seq.context)
        return self.keys[layer, run], self.values[layer, run]


@dataclass(frozen=True)
class CacheWrites:
    """Where a packed step's cached rows write: the packed tokens `rows` go to `slots`."""

    pool: KVPool
    rows: torch.Tensor
    slots: torch.Tensor

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        if self.rows.numel():
            self.pool.keys[layer].index_copy_(0, self.slots, k.index_select(0, self.rows))
            self.pool.values[layer].index_copy_(0, self.slots, v.index_select(0, self.rows))

    def read(self, layer: int, seq: Seq) -> tuple[torch.Tensor, torch.Tensor]:
        return self.pool.read(layer, seq)
