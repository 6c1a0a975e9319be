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
from server.engine.models.layers import RMSNorm, apply_rotary, attention, rotary_tables
from server.engine.packed import PackedBatch, RowInput, pack


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
        if keep is not None:
            x, attn = x[keep], attn[keep]
        x = x + self.attn_out(attn)
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

    def forward(self, batch: PackedBatch) -> torch.Tensor:
        """Hidden states before the final norm of the tokens batch.keep names ([kept, d_model]),
        or of every token: the last layer still computes every token's keys and values
        (attention, the cache) but its output projection and MLP only the kept tokens'."""
        t = self.model.transformer
        x = t.wte(batch.ids)
        cos, sin = self.rotary()
        cos, sin = cos[batch.positions][:, None], sin[batch.positions][:, None]
        last = len(t.blocks) - 1
        for layer, block in enumerate(t.blocks):
            x = block(x, cos, sin, batch, layer, batch.keep if layer == last else None)
        return x

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """LM head on the given hidden states only, as float32."""
        t = self.model.transformer
        return t.ff_out(t.ln_f(hidden)).float()

    def padded_hidden(self, input_ids: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """[batch, length, d_model] for padded rows (key_mask [batch, length], True on real tokens,
        which count positions from 0; padding holds zeros): each row one sequence of a packed
        forward (training, tests, benches)."""
        real = torch.ones_like(input_ids, dtype=torch.bool) if key_mask is None else key_mask.bool()
        rows = [RowInput(ids[keep].tolist()) for ids, keep in zip(input_ids, real)]
        hidden = self(pack(rows, input_ids.device))
        out = hidden.new_zeros(*input_ids.shape, hidden.shape[-1])
        out[real] = hidden
        return out

    def full_logits(self, input_ids: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Logits at every position; key_mask [batch, length] True on real tokens (tests, benches)."""
        return self.logits(self.padded_hidden(input_ids, key_mask))
