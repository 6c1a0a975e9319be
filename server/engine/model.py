"""LLaDA's bidirectional transformer in plain PyTorch.

Module names mirror the checkpoint's tensor names (`model.transformer.blocks.{i}.q_proj.weight`, ...)
so a state dict loads without renaming. `forward` returns the last hidden states; `logits` applies
the final norm and LM head to just the positions the caller needs, which is what keeps the
vocabulary-sized work off the positions that cannot be revealed.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from server.engine.model_config import ModelConfig

# On CUDA one attention kernel serves padded rows (key mask) and unpadded ones alike, so a row
# computes the same numbers in any batch: flash attention takes no mask, and cuDNN's, which
# PyTorch prefers on recent GPUs, also builds a graph for every new shape (75 ms median, 0.9 s
# worst on an H200), and a server sees new lengths all the time. CPU keeps PyTorch's choice,
# batch-invariant as is.
CUDA_ATTENTION = [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 and cast back before the weight, as the published model does.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rotary_tables(head_dim: int, length: int, theta: float, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(length, device=device, dtype=torch.float32), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x32 = x.float()
    half = x32.shape[-1] // 2
    rotated = torch.cat([-x32[..., half:], x32[..., :half]], dim=-1)
    return (x32 * cos + rotated * sin).to(x.dtype)


class LLaDABlock(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        d, kv = config.d_model, config.n_kv_heads * config.head_dim
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        self.attn_norm = RMSNorm(d, config.rms_norm_eps)
        self.ff_norm = RMSNorm(d, config.rms_norm_eps)
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, kv, bias=False)
        self.v_proj = nn.Linear(d, kv, bias=False)
        self.attn_out = nn.Linear(d, d, bias=False)
        self.ff_proj = nn.Linear(d, config.mlp_hidden_size, bias=False)
        self.up_proj = nn.Linear(d, config.mlp_hidden_size, bias=False)
        self.ff_out = nn.Linear(config.mlp_hidden_size, d, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        batch, length, _ = x.shape
        h = self.attn_norm(x)
        q = self.q_proj(h).view(batch, length, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(h).view(batch, length, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(h).view(batch, length, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        attn = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=False, enable_gqa=self.n_kv_heads != self.n_heads
        )
        x = x + self.attn_out(attn.transpose(1, 2).reshape(batch, length, -1))
        h = self.ff_norm(x)
        return x + self.ff_out(F.silu(self.ff_proj(h)) * self.up_proj(h))


class LLaDATransformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.wte = nn.Embedding(config.vocab_size, config.d_model)
        self.blocks = nn.ModuleList(LLaDABlock(config) for _ in range(config.n_layers))
        self.ln_f = RMSNorm(config.d_model, config.rms_norm_eps)
        self.ff_out = nn.Linear(config.d_model, config.vocab_size, bias=False)


class _Backbone(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.transformer = LLaDATransformer(config)


class LLaDAModel(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = _Backbone(config)

    @property
    def device(self) -> torch.device:
        return self.model.transformer.wte.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.transformer.wte.weight.dtype

    def forward(self, input_ids: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Hidden states [batch, length, d_model] before the final norm.

        key_mask [batch, length] is True for real tokens; padded keys are excluded from
        attention. Each row's positions count from 0, so right-padded rows compute what they
        would compute alone.
        """
        t = self.model.transformer
        x = t.wte(input_ids)
        cos, sin = rotary_tables(self.config.head_dim, input_ids.shape[1], self.config.rope_theta, x.device)
        mask = None if key_mask is None or bool(key_mask.all()) else key_mask[:, None, None, :]
        with sdpa_kernel(CUDA_ATTENTION) if x.is_cuda else contextlib.nullcontext():
            for block in t.blocks:
                x = block(x, cos, sin, mask)
        return x

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """LM head on the given hidden states only, as float32."""
        t = self.model.transformer
        return t.ff_out(t.ln_f(hidden)).float()

    def full_logits(self, input_ids: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.logits(self(input_ids, key_mask))
