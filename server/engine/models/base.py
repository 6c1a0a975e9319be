"""What every model of the family shares around its layers: where it lives, the rotary tables,
and the padded-batch helpers that tests, benches and training use."""

from __future__ import annotations

import torch
from torch import nn

from server.engine.models.layers import rotary_tables
from server.engine.packed import PackedBatch, RowInput, pack


class PackedModel(nn.Module):
    """Subclasses set `config` (with head_dim, rope_theta, max_sequence_length) and name their
    parts: `embedding`, `layers` (each called as layer(x, cos, sin, batch, index, keep)),
    `final_norm` and `head`."""

    tied_parameters: tuple[str, ...] = ()
    rotary_dims: int | None = None  # rotated dims of a head (all when None)

    def __init__(self):
        super().__init__()
        self._rotary: tuple[torch.Tensor, torch.Tensor] | None = None

    def forward(self, batch: PackedBatch) -> torch.Tensor:
        """Hidden states before the final norm of the tokens batch.keep names, or of every token:
        the last layer still computes every token's keys and values (attention, the cache) but its
        output projection and MLP only the kept tokens'."""
        x = self.embedding(batch.ids)
        cos, sin = self.rotary_at(batch.positions)
        last = len(self.layers) - 1
        for index, layer in enumerate(self.layers):
            x = layer(x, cos, sin, batch, index, batch.keep if index == last else None)
        return x

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The LM head on the given hidden states only, as float32."""
        return self.head(self.final_norm(hidden)).float()

    def tie_weights(self) -> None:
        """Re-point aliased parameters after loading (models with a tied head override it)."""

    @property
    def device(self) -> torch.device:
        return self.embedding.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embedding.weight.dtype

    def rotary(self) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin for every position up to max_sequence_length, fp32 on the model's device:
        made once (weights load on the meta device first, so not in __init__)."""
        if self._rotary is None or self._rotary[0].device != self.device:
            c = self.config
            dims = self.rotary_dims or c.head_dim
            self._rotary = rotary_tables(dims, c.max_sequence_length, c.rope_theta, self.device)
        return self._rotary

    def rotary_at(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin [tokens, 1, dims] at the packed tokens' absolute positions."""
        cos, sin = self.rotary()
        return cos[positions][:, None], sin[positions][:, None]

    def padded_hidden(self, input_ids: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """[batch, length, hidden] for padded rows (key_mask [batch, length], True on real
        tokens, which count positions from 0; padding holds zeros): each row one sequence of a
        packed forward (training, tests, benches)."""
        real = torch.ones_like(input_ids, dtype=torch.bool) if key_mask is None else key_mask.bool()
        rows = [RowInput(ids[keep].tolist()) for ids, keep in zip(input_ids, real)]
        hidden = self(pack(rows, input_ids.device))
        out = hidden.new_zeros(*input_ids.shape, hidden.shape[-1])
        out[real] = hidden
        return out

    def full_logits(self, input_ids: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Logits at every position; key_mask [batch, length] True on real tokens (tests, benches)."""
        return self.logits(self.padded_hidden(input_ids, key_mask))


class HubLayout(PackedModel):
    """A model laid out as the transformers library writes it: `model.layers`, `model.norm` and
    an untied `lm_head` (the MoE checkpoints); subclasses name the embedding."""

    @property
    def layers(self) -> nn.ModuleList:
        return self.model.layers

    @property
    def final_norm(self) -> nn.Module:
        return self.model.norm

    @property
    def head(self) -> nn.Linear:
        return self.lm_head
