"""The layers the family's models share, in plain PyTorch: RMSNorm, rotary embeddings, and
attention over a packed step (server/engine/packed.py).

Attention runs per sequence over its own keys: a row that attends to itself uses the keys it
computed in this forward; a row that reads its cache attends to the cache's slots for its whole
sequence, read in place (a view of the pool, never a copy). Grouped-query heads are folded into
the query length (each KV head with its group's queries), so every attention call has equal head
counts and never falls back to the math kernel for GQA.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from server.engine.packed import PackedBatch


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 and cast back before the weight, as the published models do.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rotary_tables(head_dim: int, length: int, theta: float, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [length, head_dim] for positions 0..length-1 (half-split layout), fp32."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(length, device=device, dtype=torch.float32), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [tokens, heads, head_dim]; cos, sin [tokens, 1, dims]: the first `dims` of each head
    rotate (partial RoPE when dims < head_dim), the rest pass through."""
    dims = cos.shape[-1]
    x32 = x[..., :dims].float()
    half = dims // 2
    rotated = torch.cat([-x32[..., half:], x32[..., :half]], dim=-1)
    out = (x32 * cos + rotated * sin).to(x.dtype)
    return out if dims == x.shape[-1] else torch.cat([out, x[..., dims:]], dim=-1)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Bidirectional attention of m sequences of equal length: q [m, n, heads, d], k and v
    [m, keys, kv_heads, d] (any strides: views of a cache are read as they are) ->
    [m * n, heads * d]."""
    m, n, heads, dim = q.shape
    kv_heads = k.shape[2]
    group = heads // kv_heads
    # head h uses KV head h // group (repeat_interleave, as the published models expand them)
    folded = q.view(m, n, kv_heads, group, dim).permute(0, 2, 3, 1, 4).reshape(m, kv_heads, group * n, dim)
    out = F.scaled_dot_product_attention(folded, k.transpose(1, 2), v.transpose(1, 2))
    return out.view(m, kv_heads, group, n, dim).permute(0, 3, 1, 2, 4).reshape(m * n, heads * dim)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: PackedBatch, layer: int) -> torch.Tensor:
    """q [tokens, heads, d], k and v [tokens, kv_heads, d] of the packed step (after RoPE) ->
    [tokens, heads * d]. Rows that keep a cache write their keys and values to it first.
    Consecutive rows of one length that attend to themselves share one call (views of the packed
    tensors); a row that reads its cache has a call of its own over its view of the pool."""
    if batch.cache is not None:
        batch.cache.write(layer, k, v)
    out = q.new_empty(q.shape[0], q.shape[1] * q.shape[2])
    for run in batch.runs:
        rows = slice(run.offset, run.offset + run.count * run.length)
        if run.reader is not None:
            keys, values = batch.cache.read(layer, run.reader)
            keys, values = keys[None], values[None]
        else:
            keys, values = k[rows].unflatten(0, (run.count, run.length)), v[rows].unflatten(0, (run.count, run.length))
        out[rows] = attend(q[rows].unflatten(0, (run.count, run.length)), keys, values)
    return out


def residual(x: torch.Tensor, attn: torch.Tensor, keep: torch.Tensor | None, out_proj, mlp, mlp_norm) -> torch.Tensor:
    """The rest of a pre-norm layer after attention: x + out_proj(attn), then + mlp(mlp_norm(x)),
    for the kept tokens only (the last layer's keep) or every token."""
    if keep is not None:
        x, attn = x[keep], attn[keep]
    x = x + out_proj(attn)
    return x + mlp(mlp_norm(x))
