"""LLaDA-8B / LLaDA 1.5's bidirectional transformer in plain PyTorch.

Module names mirror the checkpoint's tensor names (`model.transformer.blocks.{i}.q_proj.weight`,
...) so a state dict loads without renaming. The interface every model of the family shares
(models/__init__.py): `forward(batch)` takes a packed step (server/engine/packed.py: token ids,
absolute positions, per-row cache slots) and returns the hidden states of the tokens the batch
keeps; `logits(hidden)` applies the final norm and LM head to just those rows, which keeps the
vocabulary-sized work off the positions that cannot be revealed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from server.engine.model_config import ModelConfig
from server.engine.models.base import PackedModel
from server.engine.models.layers import RMSNorm, apply_rotary, attention, residual
from server.engine.packed import PackedBatch


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

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        batch: PackedBatch,
        layer: int,
        keep: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x [tokens, d_model]; with keep, the output is [len(keep), d_model], those tokens only."""
        tokens = x.shape[0]
        h = self.attn_norm(x)
        q = self.q_proj(h).view(tokens, self.n_heads, self.head_dim)
        k = self.k_proj(h).view(tokens, self.n_kv_heads, self.head_dim)
        v = self.v_proj(h).view(tokens, self.n_kv_heads, self.head_dim)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        attn = attention(q, k, v, batch, layer)
        return residual(x, attn, keep, self.attn_out, self.mlp, self.ff_norm)

    def mlp(self, h: torch.Tensor) -> torch.Tensor:
        return self.ff_out(F.silu(self.ff_proj(h)) * self.up_proj(h))


class LLaDATransformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.wte = nn.Embedding(config.vocab_size, config.d_model)
        self.blocks = nn.ModuleList(LLaDABlock(config) for _ in range(config.n_layers))
        self.ln_f = RMSNorm(config.d_model, config.rms_norm_eps)
        # with weight_tying (iLLaDA) the head's weight is the embedding matrix: see tie_weights
        self.ff_out = nn.Linear(config.d_model, config.vocab_size, bias=False)


class _Backbone(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.transformer = LLaDATransformer(config)


class LLaDAModel(PackedModel):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = _Backbone(config)
        self.tie_weights()

    @property
    def embedding(self) -> nn.Embedding:
        return self.model.transformer.wte

    @property
    def tied_parameters(self) -> tuple[str, ...]:
        """State-dict names that alias another parameter: not stored in a checkpoint."""
        return ("model.transformer.ff_out.weight",) if self.config.weight_tying else ()

    def tie_weights(self) -> None:
        """With weight_tying, the LM head reads the embedding matrix (again, after loading)."""
        if self.config.weight_tying:
            t = self.model.transformer
            t.ff_out.weight = t.wte.weight

    @property
    def layers(self) -> nn.ModuleList:
        return self.model.transformer.blocks

    @property
    def final_norm(self) -> RMSNorm:
        return self.model.transformer.ln_f

    @property
    def head(self) -> nn.Linear:
        return self.model.transformer.ff_out
