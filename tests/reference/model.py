"""A plain fp32 forward pass of LLaDA, written from LLADA.md ("Forward pass").

This is a test oracle, not production code: one sequence, no padding, no caches, every
operation spelled out (manual softmax attention, explicit half-split RoPE, explicit k/v
head repetition). It reads weights by their checkpoint tensor names only.
"""

from __future__ import annotations

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


def rope_cos_sin(seq_len: int, head_dim: int, theta: float) -> tuple[Tensor, Tensor]:
    """cos/sin tables [seq_len, head_dim] for positions 0..seq_len-1 (half-split layout)."""
    j = torch.arange(0, head_dim, 2, dtype=torch.float32)  # 2j for j = 0..head_dim/2-1
    inv_freq = 1.0 / (theta ** (j / head_dim))
    positions = torch.arange(seq_len, dtype=torch.float32)
    freqs = positions[:, None] * inv_freq[None, :]  # [L, head_dim/2]
    emb = torch.cat([freqs, freqs], dim=-1)  # [L, head_dim]
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

    q: [n_heads, L, hd], k/v: [n_heads, L, hd] -> [n_heads, L, hd]. No mask at all.
    """
    head_dim = q.shape[-1]
    scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(head_dim)  # [H, L, L]
    scores = scores - scores.max(dim=-1, keepdim=True).values
    weights = scores.exp()
    weights = weights / weights.sum(dim=-1, keepdim=True)
    return torch.matmul(weights, v)


@torch.no_grad()
def reference_logits(state_dict: dict[str, Tensor], cfg: dict, input_ids: Tensor) -> Tensor:
    """fp32 LLaDA forward for one unpadded sequence: input_ids [1, L] -> logits [1, L, V]."""
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError(f"reference_logits takes one sequence [1, L], got {tuple(input_ids.shape)}")

    def w(name: str) -> Tensor:
        return state_dict[PREFIX + name].detach().to(device="cpu", dtype=torch.float32)

    d_model = int(cfg["d_model"])
    n_layers = int(cfg["n_layers"])
    n_heads = int(cfg["n_heads"])
    n_kv_heads = int(_cfg_get(cfg, "n_kv_heads", n_heads))
    theta = float(_cfg_get(cfg, "rope_theta", 10000.0))
    eps = float(_cfg_get(cfg, "rms_norm_eps", 1e-5))
    head_dim = d_model // n_heads
    if n_heads % n_kv_heads != 0:
        raise ValueError("n_heads must be a multiple of n_kv_heads")
    repeat = n_heads // n_kv_heads

    ids = input_ids[0].to("cpu")
    seq_len = ids.shape[0]
    x = w("wte.weight")[ids]  # [L, d]  (no embedding scaling)
    cos, sin = rope_cos_sin(seq_len, head_dim, theta)

    for i in range(n_layers):
        blk = f"blocks.{i}."
        # attention
        h = rms_norm(x, w(blk + "attn_norm.weight"), eps)
        q = h @ w(blk + "q_proj.weight").T  # [L, n_heads*hd]
        k = h @ w(blk + "k_proj.weight").T  # [L, n_kv_heads*hd]
        v = h @ w(blk + "v_proj.weight").T
        q = q.view(seq_len, n_heads, head_dim).transpose(0, 1)  # [H, L, hd]
        k = k.view(seq_len, n_kv_heads, head_dim).transpose(0, 1)  # [Hkv, L, hd]
        v = v.view(seq_len, n_kv_heads, head_dim).transpose(0, 1)
        q = apply_rope(q, cos, sin)
        k = apply_rope(k, cos, sin)
        if repeat > 1:
            # kv head j serves query heads j*repeat .. j*repeat + repeat-1
            k = k.repeat_interleave(repeat, dim=0)
            v = v.repeat_interleave(repeat, dim=0)
        att = attention(q, k, v)  # [H, L, hd]
        att = att.transpose(0, 1).reshape(seq_len, n_heads * head_dim)
        x = x + att @ w(blk + "attn_out.weight").T
        # SwiGLU MLP
        h = rms_norm(x, w(blk + "ff_norm.weight"), eps)
        gate = h @ w(blk + "ff_proj.weight").T
        up = h @ w(blk + "up_proj.weight").T
        act = gate * torch.sigmoid(gate)  # SiLU
        x = x + (act * up) @ w(blk + "ff_out.weight").T

    x = rms_norm(x, w("ln_f.weight"), eps)
    logits = x @ w("ff_out.weight").T  # untied LM head
    return logits.unsqueeze(0)
