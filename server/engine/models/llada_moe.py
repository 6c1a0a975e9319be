"""LLaDA-MoE (LLaDAMoEModelLM, e.g. LLaDA-MoE-7B-A1B) in plain PyTorch: a bidirectional
transformer whose MLPs are mixtures of SwiGLU experts (FAMILY.md).

Per layer: RMSNorm, q/k/v projections, a per-head RMSNorm on q and k (over head_dim, before
RoPE), RoPE, bidirectional attention (models/layers.py), the output projection; RMSNorm, then
the experts: a softmax router over all experts in fp32, the top k per token, weights not
renormalised (the published block ignores config.json's norm_topk_prob and
moe_router_score_function), each token's output the weighted sum of its experts'.
Expert dispatch is batched over the step's tokens (models/moe.py). Module names are
the published tensor names (`model.layers.N.mlp.experts.E.gate_proj.weight`, ...).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from server.engine.errors import CheckpointError, refuse_unsupported
from server.engine.models.base import HubLayout
from server.engine.models.layers import RMSNorm, apply_rotary, attention, residual
from server.engine.models.moe import MLP, Experts, dispatch
from server.engine.packed import PackedBatch

# Keys of the published configuration whose other values this server does not implement.
SUPPORTED_VALUES = {
    "hidden_act": ("silu",),
    "qk_layernorm": (True,),
    "moe_router_enable_expert_bias": (False, None),
    "shared_expert_intermediate_size": (None, -1, 0),
    "attention_bias": (False,),
    "clip_qkv": (None,),
    "tie_word_embeddings": (False,),
    "router_num_group": (None,),
    "rope_scaling": (None,),
}


@dataclass(frozen=True)
class LLaDAMoEConfig:
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    num_experts: int
    num_experts_per_tok: int
    expert_intermediate_size: int
    dense_intermediate_size: int = 8192
    moe_layer_freq: tuple[int, ...] = ()  # 1: a MoE layer, 0: a dense one (empty: all MoE)
    rope_theta: float = 50000.0
    partial_rotary_factor: float = 1.0
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 8192
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    # Published copies disagree on config.json's mask_token_id (one says EOS's id): the
    # tokenizer's <|mask|> is the one (FAMILY.md), so it is never read from config.json.
    mask_token_id: int | None = None

    # the names the engine reads of every architecture's config
    @property
    def n_layers(self) -> int:
        return self.num_hidden_layers

    @property
    def n_kv_heads(self) -> int:
        return self.num_key_value_heads

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def max_sequence_length(self) -> int:
        return self.max_position_embeddings

    def is_moe(self, layer: int) -> bool:
        return not self.moe_layer_freq or bool(self.moe_layer_freq[layer])

    @classmethod
    def from_json(cls, raw: dict, path: Path) -> LLaDAMoEConfig:
        refuse_unsupported(raw, SUPPORTED_VALUES, path)
        fields = {f.name: f.type for f in dataclasses.fields(cls)}
        required = [f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING]
        missing = [key for key in required if key not in raw]
        if missing:
            raise CheckpointError(f"{path} lacks required fields: {', '.join(missing)}")
        kinds = {"float": float, "bool": bool, "int": int, "int | None": int}
        try:
            values = {
                k: kinds[fields[k]](raw[k])
                for k in fields
                if k not in ("moe_layer_freq", "mask_token_id") and raw.get(k) is not None
            }
            values["moe_layer_freq"] = tuple(int(v) for v in raw.get("moe_layer_freq") or ())
        except (TypeError, ValueError) as exc:
            raise CheckpointError(f"{path}: a numeric field has a non-numeric value: {exc}") from exc
        config = cls(**values)
        if config.hidden_size % config.num_attention_heads or config.num_attention_heads % config.num_key_value_heads:
            raise CheckpointError(
                f"{path}: hidden_size {config.hidden_size}, num_attention_heads {config.num_attention_heads} and "
                f"num_key_value_heads {config.num_key_value_heads} do not divide into heads"
            )
        if config.moe_layer_freq and len(config.moe_layer_freq) != config.num_hidden_layers:
            raise CheckpointError(f"{path}: moe_layer_freq needs one entry per layer ({config.num_hidden_layers})")
        if not 0 < config.num_experts_per_tok <= config.num_experts:
            raise CheckpointError(f"{path}: num_experts_per_tok must be between 1 and num_experts")
        rotary = config.head_dim * config.partial_rotary_factor
        if not (0 < config.partial_rotary_factor <= 1 and rotary == int(rotary) and int(rotary) % 2 == 0):
            raise CheckpointError(
                f"{path}: partial_rotary_factor {config.partial_rotary_factor} must rotate an even number of "
                f"a head's {config.head_dim} dims"
            )
        return config


class SparseMoE(nn.Module):
    def __init__(self, config: LLaDAMoEConfig):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.gate = nn.Linear(config.hidden_size, config.num_experts, bias=False)
        self.experts = Experts(config.num_experts, config.hidden_size, config.expert_intermediate_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [tokens, hidden]: each token through its top-k experts (softmax weights, not renormalised)."""
        weights, chosen = torch.softmax(self.gate(x).float(), dim=-1).topk(self.top_k, dim=-1)
        return dispatch(x, chosen, weights, self.experts)


class Attention(nn.Module):
    def __init__(self, config: LLaDAMoEConfig):
        super().__init__()
        d, heads, kv, dim = config.hidden_size, config.num_attention_heads, config.num_key_value_heads, config.head_dim
        self.heads, self.kv_heads, self.head_dim = heads, kv, dim
        self.q_proj = nn.Linear(d, heads * dim, bias=False)
        self.k_proj = nn.Linear(d, kv * dim, bias=False)
        self.v_proj = nn.Linear(d, kv * dim, bias=False)
        self.o_proj = nn.Linear(heads * dim, d, bias=False)
        self.q_norm = RMSNorm(dim, config.rms_norm_eps)
        self.k_norm = RMSNorm(dim, config.rms_norm_eps)

    def forward(self, h: torch.Tensor, cos, sin, batch: PackedBatch, layer: int) -> torch.Tensor:
        tokens = h.shape[0]
        q = self.q_norm(self.q_proj(h).view(tokens, self.heads, self.head_dim))
        k = self.k_norm(self.k_proj(h).view(tokens, self.kv_heads, self.head_dim))
        v = self.v_proj(h).view(tokens, self.kv_heads, self.head_dim)
        return attention(apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v, batch, layer)


class DecoderLayer(nn.Module):
    def __init__(self, config: LLaDAMoEConfig, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        if config.is_moe(layer):
            self.mlp = SparseMoE(config)
        else:
            self.mlp = MLP(config.hidden_size, config.dense_intermediate_size)

    def forward(self, x, cos, sin, batch: PackedBatch, layer: int, keep: torch.Tensor | None = None) -> torch.Tensor:
        attn = self.self_attn(self.input_layernorm(x), cos, sin, batch, layer)
        return residual(x, attn, keep, self.self_attn.o_proj, self.mlp, self.post_attention_layernorm)


class _Backbone(nn.Module):
    def __init__(self, config: LLaDAMoEConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class LLaDAMoEModel(HubLayout):
    def __init__(self, config: LLaDAMoEConfig):
        super().__init__()
        self.config = config
        self.rotary_dims = int(config.head_dim * config.partial_rotary_factor)
        self.model = _Backbone(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    @property
    def embedding(self) -> nn.Embedding:
        return self.model.embed_tokens
