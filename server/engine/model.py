"""LLaDA's bidirectional transformer in plain PyTorch.

Module names mirror the checkpoint's tensor names (`model.transformer.blocks.{i}.q_proj.weight`, ...)
so a state dict loads without renaming. `forward` returns the last hidden states; `logits` applies
the final norm and LM head to just the positions the caller needs, which is what keeps the
vocabulary-sized work off the positions that cannot be revealed.

A forward may read and write a KV cache (`KVBatch`, see kv_cache.py): rows then carry explicit
absolute positions for RoPE, write their keys and values into cache slots, and attend to the keys
and values their slots hold. Without one, each row's positions are 0..len-1 and it attends to
itself only: the exact path.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from server.engine.model_config import ModelConfig

if TYPE_CHECKING:
    from server.engine.kv_cache import KVBatch


# oneDNN's fp32 and bf16 kernels: on CPUs where MKL's sgemm runs its AVX2 code (AMD's) they are
# about twice as fast; torch.compile's CPU backend calls the same op.
_ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def padded_rows(rows: int) -> int:
    """rows rounded up to one of 8 sizes per power of two above 16, and at least 2."""
    if rows <= 16:
        return max(rows, 2)
    step = 1 << (rows.bit_length() - 4)
    return -(-rows // step) * step


class Linear(nn.Linear):
    """nn.Linear (same parameters and names) whose inference on CPU runs through oneDNN.
    Whatever autograd records keeps F.linear: the oneDNN op has no backward.

    oneDNN builds and keeps a kernel for every row count it sees (about 0.6 MB each, and more
    than its cache's 1024: memory grew by 4 GB over 3000 counts), so the rows are zero-padded to
    padded_rows (at most 12.5 % more): a bounded set of counts whatever the traffic. A row's
    numbers do not depend on the count from two rows on (one row takes another kernel), so a job
    computes the same alone as in any batch."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        recorded = torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad)
        if not (_ONEDNN and x.device.type == "cpu" and x.dtype != torch.float16 and not recorded):
            return super().forward(x)
        rows = x.numel() // x.shape[-1]
        flat = x.reshape(rows, x.shape[-1])
        if padded_rows(rows) != rows:
            flat = torch.cat([flat, flat.new_zeros(padded_rows(rows) - rows, flat.shape[1])])
        out = torch.ops.mkldnn._linear_pointwise(flat, self.weight, self.bias, "none", [], "")
        return out[:rows].view(*x.shape[:-1], out.shape[-1])


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
        self.q_proj = Linear(d, d, bias=False)
        self.k_proj = Linear(d, kv, bias=False)
        self.v_proj = Linear(d, kv, bias=False)
        self.attn_out = Linear(d, d, bias=False)
        self.ff_proj = Linear(d, config.mlp_hidden_size, bias=False)
        self.up_proj = Linear(d, config.mlp_hidden_size, bias=False)
        self.ff_out = Linear(config.mlp_hidden_size, d, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None,
        cache: KVBatch | None = None,
        layer: int = 0,
        keep: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """keep: flat indices into [batch * length]; the output is then [len(keep), d_model], those
        positions only (see LLaDAModel.forward)."""
        batch, length, _ = x.shape
        h = self.attn_norm(x)
        q = self.q_proj(h).view(batch, length, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(h).view(batch, length, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(h).view(batch, length, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:
            k, v = cache.attend(layer, k, v)
        attn = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=False, enable_gqa=self.n_kv_heads != self.n_heads
        )
        attn = attn.transpose(1, 2).reshape(batch, length, -1)
        if keep is not None:
            x, attn = x.reshape(batch * length, -1)[keep], attn.reshape(batch * length, -1)[keep]
        x = x + self.attn_out(attn)
        h = self.ff_norm(x)
        return x + self.ff_out(F.silu(self.ff_proj(h)) * self.up_proj(h))


class LLaDATransformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.wte = nn.Embedding(config.vocab_size, config.d_model)
        self.blocks = nn.ModuleList(LLaDABlock(config) for _ in range(config.n_layers))
        self.ln_f = RMSNorm(config.d_model, config.rms_norm_eps)
        self.ff_out = Linear(config.d_model, config.vocab_size, bias=False)


class _Backbone(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.transformer = LLaDATransformer(config)


class LLaDAModel(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = _Backbone(config)
        self._rotary: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def device(self) -> torch.device:
        return self.model.transformer.wte.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.transformer.wte.weight.dtype

    def rotary(self) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin for every position up to max_sequence_length, fp32 on the model's device:
        made once (weights load on the meta device first, so not in __init__)."""
        if self._rotary is None or self._rotary[0].device != self.device:
            c = self.config
            self._rotary = rotary_tables(c.head_dim, c.max_sequence_length, c.rope_theta, self.device)
        return self._rotary

    def forward(
        self,
        input_ids: torch.Tensor,
        key_mask: torch.Tensor | None = None,
        cache: KVBatch | None = None,
        keep: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Hidden states [batch, length, d_model] before the final norm; with `keep` (flat indices
        into [batch * length]) those positions' only, [len(keep), d_model]: the last layer still
        computes every position's keys and values (attention, the cache) but its output
        projection and MLP only the kept positions', the ones the LM head will read.

        key_mask: None when every key is real, else a bool mask broadcastable to
        [batch, heads, queries, keys], True on real keys (the caller knows the lengths; nothing is
        read back from the device here). Without a cache each row's positions count from 0, so
        right-padded rows compute what they would compute alone.
        """
        t = self.model.transformer
        x = t.wte(input_ids)
        cos, sin = self.rotary()
        if cache is None:
            cos, sin = cos[: input_ids.shape[1]], sin[: input_ids.shape[1]]
        else:
            cos, sin = cos[cache.positions][:, None], sin[cache.positions][:, None]
        last = len(t.blocks) - 1
        for layer, block in enumerate(t.blocks):
            x = block(x, cos, sin, key_mask, cache, layer, keep if layer == last else None)
        return x

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """LM head on the given hidden states only, as float32."""
        t = self.model.transformer
        return t.ff_out(t.ln_f(hidden)).float()

    def full_logits(self, input_ids: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Logits at every position; key_mask [batch, length] True on real tokens (tests, benches)."""
        mask = None if key_mask is None else key_mask[:, None, None, :]
        return self.logits(self(input_ids, mask))
