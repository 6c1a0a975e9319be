"""A plain fp32 forward pass of LLaDA, written from LLADA.md ("Forward pass" and "Fast decoding").

This is a test oracle, not production code: one sequence, no padding, every operation spelled
out (manual softmax attention, explicit half-split RoPE, explicit k/v head repetition). It reads
weights by their checkpoint tensor names only.

One function runs any set of positions of the sequence: `forward_at` computes the given rows at
their absolute positions, writes their keys/values into a per-layer cache of the whole sequence
and lets them attend to every position of that cache. The full forward is the case where every
position is a row; the KV-cached steps of fast decoding run a part of the sequence against keys
and values kept from an earlier forward.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import Tensor

PREFIX = "model.transformer."


def _cfg_get(cfg: dict, name: str, default=None):
    value = cfg.get(name, default)
    if value is None:
        value = default
    return value


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """x * rsqrt(mean(x^2, last dim) + eps) in fp32, cast back, then times weight."""
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + eps)
    return normed.to(x.dtype) * weight


def rope_cos_sin(positions: Tensor, head_dim: int, theta: float) -> tuple[Tensor, Tensor]:
    """cos/sin tables [len(positions), head_dim] at the given absolute positions (half-split layout)."""
    j = torch.arange(0, head_dim, 2, dtype=torch.float32)  # 2j for j = 0..head_dim/2-1
    inv_freq = 1.0 / (theta ** (j / head_dim))
    freqs = positions.to(torch.float32)[:, None] * inv_freq[None, :]  # [Q, head_dim/2]
    emb = torch.cat([freqs, freqs], dim=-1)  # [Q, head_dim]
    return emb.cos(), emb.sin()


def rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    x1 = x[..., :half]
    x2 = x[..., half:]
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x: [heads, L, head_dim]; rotation computed in fp32."""
    x32 = x.float()
    return (x32 * cos + rotate_half(x32) * sin).to(x.dtype)


def attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Bidirectional scaled dot-product attention, manual softmax.

    q: [n_heads, Q, hd], k/v: [n_heads, L, hd] -> [n_heads, Q, hd]. No mask at all.
    """
    head_dim = q.shape[-1]
    scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(head_dim)  # [H, Q, L]
    scores = scores - scores.max(dim=-1, keepdim=True).values
    weights = scores.exp()
    weights = weights / weights.sum(dim=-1, keepdim=True)
    return torch.matmul(weights, v)


@dataclasses.dataclass(frozen=True)
class Shape:
    """The dimensions of a checkpoint's config.json that the forward needs."""

    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    theta: float
    eps: float

    @classmethod
    def of(cls, cfg: dict) -> Shape:
        n_heads = int(cfg["n_heads"])
        n_kv_heads = int(_cfg_get(cfg, "n_kv_heads", n_heads))
        if n_heads % n_kv_heads != 0:
            raise ValueError("n_heads must be a multiple of n_kv_heads")
        return cls(
            n_layers=int(cfg["n_layers"]),
            n_heads=n_heads,
            n_kv_heads=n_kv_heads,
            head_dim=int(cfg["d_model"]) // n_heads,
            theta=float(_cfg_get(cfg, "rope_theta", 10000.0)),
            eps=float(_cfg_get(cfg, "rms_norm_eps", 1e-5)),
        )


@dataclasses.dataclass
class KVCache:
    """Per layer, the keys (after RoPE) and values of every position of one sequence.

    keys[i], values[i]: [n_kv_heads, L, head_dim]. A position that is not kept holds NaN, so
    a forward that read it before writing it would turn its logits into NaN.
    """

    keys: list[Tensor]
    values: list[Tensor]

    @classmethod
    def empty(cls, shape: Shape, seq_len: int) -> KVCache:
        size = (shape.n_kv_heads, seq_len, shape.head_dim)
        return cls(
            keys=[torch.full(size, math.nan) for _ in range(shape.n_layers)],
            values=[torch.full(size, math.nan) for _ in range(shape.n_layers)],
        )

    def kept_before(self, end: int) -> KVCache:
        """A copy that keeps positions 0..end-1 only."""
        keys = [k.clone() for k in self.keys]
        values = [v.clone() for v in self.values]
        for k, v in zip(keys, values):
            k[:, end:] = math.nan
            v[:, end:] = math.nan
        return KVCache(keys=keys, values=values)


class Weights:
    """The checkpoint's tensors by name, in fp32 on the CPU, and the config's shape."""

    def __init__(self, state_dict: dict[str, Tensor], cfg: dict):
        self._state = state_dict
        self.shape = Shape.of(cfg)
        self.tied = bool(cfg.get("weight_tying"))

    def __call__(self, name: str) -> Tensor:
        return self._state[PREFIX + name].detach().to(device="cpu", dtype=torch.float32)


def qkv_projections(w: Weights, i: int, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Layer i's q [H, Q, hd], k and v [Hkv, Q, hd] of the rows x [Q, d], before RoPE."""
    s, blk, n_rows = w.shape, f"blocks.{i}.", x.shape[0]
    h = rms_norm(x, w(blk + "attn_norm.weight"), s.eps)
    q = h @ w(blk + "q_proj.weight").T  # [Q, n_heads*hd]
    k = h @ w(blk + "k_proj.weight").T  # [Q, n_kv_heads*hd]
    v = h @ w(blk + "v_proj.weight").T
    q = q.view(n_rows, s.n_heads, s.head_dim).transpose(0, 1)
    k = k.view(n_rows, s.n_kv_heads, s.head_dim).transpose(0, 1)
    v = v.view(n_rows, s.n_kv_heads, s.head_dim).transpose(0, 1)
    return q, k, v


def finish_layer(w: Weights, i: int, x: Tensor, q: Tensor, keys: Tensor, values: Tensor) -> Tensor:
    """Layer i's output for the rows x [Q, d]: their queries q (after RoPE) attend to keys (after
    RoPE) and values [Hkv, L, hd], then the residual, the SwiGLU MLP and its residual."""
    s, blk, n_rows = w.shape, f"blocks.{i}.", x.shape[0]
    repeat = s.n_heads // s.n_kv_heads
    if repeat > 1:
        # kv head j serves query heads j*repeat .. j*repeat + repeat-1
        keys = keys.repeat_interleave(repeat, dim=0)
        values = values.repeat_interleave(repeat, dim=0)
    att = attention(q, keys, values)  # [H, Q, hd]
    att = att.transpose(0, 1).reshape(n_rows, s.n_heads * s.head_dim)
    x = x + att @ w(blk + "attn_out.weight").T
    h = rms_norm(x, w(blk + "ff_norm.weight"), s.eps)
    gate = h @ w(blk + "ff_proj.weight").T
    up = h @ w(blk + "up_proj.weight").T
    act = gate * torch.sigmoid(gate)  # SiLU
    return x + (act * up) @ w(blk + "ff_out.weight").T


def lm_head(w: Weights, x: Tensor) -> Tensor:
    """Logits [Q, V] of the last layer's rows x [Q, d]."""
    # weight_tying (iLLaDA): the LM head is the embedding matrix; else the untied ff_out
    head = w("wte.weight") if w.tied else w("ff_out.weight")
    return rms_norm(x, w("ln_f.weight"), w.shape.eps) @ head.T


def _is_llada_moe(cfg: dict) -> bool:
    """A LLaDA-MoE config.json (dispatched on architectures): tests/reference/llada_moe.py runs it."""
    return "LLaDAMoEModelLM" in (cfg.get("architectures") or [])


@torch.no_grad()
def forward_at(
    state_dict: dict[str, Tensor], cfg: dict, token_ids: Tensor, positions: Tensor, cache: KVCache
) -> Tensor:
    """Logits [Q, V] of the rows token_ids [Q] at absolute positions [Q] of one sequence.

    In every layer the rows' keys (after RoPE at their positions) and values are written into
    `cache` at their positions, replacing what it held there; then the rows attend to every
    position of the cache, in position order. Every other position must be kept in the cache.
    """
    if _is_llada_moe(cfg):
        from tests.reference import llada_moe

        return llada_moe.forward_at(state_dict, cfg, token_ids, positions, cache)
    w = Weights(state_dict, cfg)
    x = w("wte.weight")[token_ids.to("cpu")]  # [Q, d]  (no embedding scaling)
    cos, sin = rope_cos_sin(positions, w.shape.head_dim, w.shape.theta)
    for i in range(w.shape.n_layers):
        q, k, v = qkv_projections(w, i, x)
        cache.keys[i][:, positions] = apply_rope(k, cos, sin)
        cache.values[i][:, positions] = v
        if torch.isnan(cache.keys[i]).any() or torch.isnan(cache.values[i]).any():
            raise ValueError(f"layer {i}: the cache lacks a position that this forward does not compute")
        x = finish_layer(w, i, x, apply_rope(q, cos, sin), cache.keys[i], cache.values[i])
    return lm_head(w, x)


@torch.no_grad()
def full_forward(state_dict: dict[str, Tensor], cfg: dict, input_ids: Tensor) -> tuple[Tensor, KVCache]:
    """fp32 forward of one unpadded sequence [1, L]: logits [1, L, V] and every position's keys/values."""
    if _is_llada_moe(cfg):
        from tests.reference import llada_moe

        return llada_moe.full_forward(state_dict, cfg, input_ids)
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError(f"the reference forward takes one sequence [1, L], got {tuple(input_ids.shape)}")
    seq_len = input_ids.shape[1]
    cache = KVCache.empty(Shape.of(cfg), seq_len)
    logits = forward_at(state_dict, cfg, input_ids[0], torch.arange(seq_len), cache)
    return logits.unsqueeze(0), cache


def reference_logits(state_dict: dict[str, Tensor], cfg: dict, input_ids: Tensor) -> Tensor:
    """fp32 LLaDA forward for one unpadded sequence: input_ids [1, L] -> logits [1, L, V]."""
    return full_forward(state_dict, cfg, input_ids)[0]
