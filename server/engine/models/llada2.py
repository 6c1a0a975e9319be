"""LLaDA2.0 / 2.1 (LLaDA2MoeModelLM, e.g. LLaDA2.0-mini) in plain PyTorch: a block-diffusion
transformer whose MLPs, past the first `first_k_dense_replace` layers, are mixtures of SwiGLU
experts with a shared expert (FAMILY.md).

Per layer: RMSNorm, one fused Q|K|V projection, a per-head RMSNorm on q and k (before RoPE),
partial RoPE (the first `partial_rotary_factor` of each head), attention, the output projection
(`dense`); RMSNorm, then the MLP. The router: sigmoid scores in fp32; for selection only the
expert bias is added, groups of experts ranked by the sum of their best two, the best
`topk_group` groups kept and the top k experts among them; the weights are the unbiased scores
of those experts renormalised, times `routed_scaling_factor`. The shared expert's output is
added. Attention is block-causal: the decoding policy (block_diffusion.py) runs each block as a
row that attends to the cached blocks before it and to itself, so the model itself never needs a
mask. Module names are the published tensor names.
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
    "score_function": ("sigmoid",),
    "router_dtype": ("fp32", None),
    "use_qkv_bias": (False,),
    "use_bias": (False,),
    "norm_head": (False,),
    "norm_softmax": (False,),
    "tie_word_embeddings": (False,),
    "rope_scaling": (None,),
    "use_sliding_window": (False,),
    "using_split_qkv_in_self_attention": (False,),
}


@dataclass(frozen=True)
class LLaDA2Config:
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    intermediate_size: int  # the dense layers' MLP
    moe_intermediate_size: int
    num_experts: int
    num_experts_per_tok: int
    head_dim: int = 0  # 0: hidden_size // num_attention_heads
    first_k_dense_replace: int = 1
    num_shared_experts: int = 0
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0
    partial_rotary_factor: float = 1.0
    rope_theta: float = 600000.0
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 16384
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    mask_token_id: int | None = None  # the tokenizer's <|mask|> when config.json does not say

    @property
    def n_layers(self) -> int:
        return self.num_hidden_layers

    @property
    def n_kv_heads(self) -> int:
        return self.num_key_value_heads

    @property
    def max_sequence_length(self) -> int:
        return self.max_position_embeddings

    @property
    def rotary_dims(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    @classmethod
    def from_json(cls, raw: dict, path: Path) -> LLaDA2Config:
        refuse_unsupported(raw, SUPPORTED_VALUES, path)
        fields = {f.name: f.type for f in dataclasses.fields(cls)}
        required = [f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING]
        missing = [key for key in required if key not in raw]
        if missing:
            raise CheckpointError(f"{path} lacks required fields: {', '.join(missing)}")
        kinds = {"float": float, "int": int, "int | None": int}
        try:
            values = {k: kinds[fields[k]](raw[k]) for k in fields if raw.get(k) is not None}
        except (TypeError, ValueError) as exc:
            raise CheckpointError(f"{path}: a numeric field has a non-numeric value: {exc}") from exc
        if not values.get("head_dim"):
            values["head_dim"] = values["hidden_size"] // values["num_attention_heads"]
        config = cls(**values)
        config.validate(path)
        return config

    def validate(self, path: Path) -> None:
        if self.num_attention_heads % self.num_key_value_heads:
            raise CheckpointError(
                f"{path}: num_attention_heads {self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads {self.num_key_value_heads}"
            )
        if not 0 < self.num_experts_per_tok <= self.num_experts:
            raise CheckpointError(f"{path}: num_experts_per_tok must be between 1 and num_experts")
        if self.num_experts % self.n_group or not 0 < self.topk_group <= self.n_group:
            raise CheckpointError(
                f"{path}: num_experts {self.num_experts} must split into n_group {self.n_group} groups, "
                f"of which topk_group {self.topk_group} are kept"
            )
        if self.num_experts_per_tok > self.topk_group * self.num_experts // self.n_group:
            raise CheckpointError(f"{path}: num_experts_per_tok exceeds the experts of topk_group groups")
        rotary = self.head_dim * self.partial_rotary_factor
        if not (0 < self.partial_rotary_factor <= 1 and rotary == int(rotary) and int(rotary) % 2 == 0):
            raise CheckpointError(
                f"{path}: partial_rotary_factor {self.partial_rotary_factor} must rotate an even number of "
                f"a head's {self.head_dim} dims"
            )


class Gate(nn.Module):
    """The sigmoid group-limited router: expert choices and their weights per token."""

    def __init__(self, config: LLaDA2Config):
        super().__init__()
        self.top_k, self.groups, self.top_groups = config.num_experts_per_tok, config.n_group, config.topk_group
        self.scale = config.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(config.num_experts, config.hidden_size))
        self.expert_bias = nn.Parameter(torch.zeros(config.num_experts))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scores = torch.sigmoid(x.float() @ self.weight.float().T)  # [tokens, experts]
        biased = scores + self.expert_bias.float()
        tokens = scores.shape[0]
        group_scores = biased.view(tokens, self.groups, -1).topk(2, dim=-1).values.sum(dim=-1)
        kept_groups = group_scores.topk(self.top_groups, dim=-1).indices
        group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, kept_groups, True)
        allowed = group_mask[:, :, None].expand(tokens, self.groups, biased.shape[1] // self.groups).reshape(tokens, -1)
        chosen = biased.masked_fill(~allowed, float("-inf")).topk(self.top_k, dim=-1).indices
        weights = scores.gather(1, chosen)
        if self.top_k > 1:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return chosen, weights * self.scale


class SparseMoE(nn.Module):
    def __init__(self, config: LLaDA2Config):
        super().__init__()
        self.gate = Gate(config)
        self.experts = Experts(config.num_experts, config.hidden_size, config.moe_intermediate_size)
        shared = config.moe_intermediate_size * config.num_shared_experts
        self.shared_experts = MLP(config.hidden_size, shared) if shared else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        chosen, weights = self.gate(x)
        out = dispatch(x, chosen, weights, self.experts)
        return out if self.shared_experts is None else out + self.shared_experts(x)


class Attention(nn.Module):
    def __init__(self, config: LLaDA2Config):
        super().__init__()
        heads, kv, dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        self.heads, self.kv_heads, self.head_dim = heads, kv, dim
        self.query_key_value = nn.Linear(config.hidden_size, (heads + 2 * kv) * dim, bias=False)
        self.query_layernorm = RMSNorm(dim, config.rms_norm_eps)
        self.key_layernorm = RMSNorm(dim, config.rms_norm_eps)
        self.dense = nn.Linear(heads * dim, config.hidden_size, bias=False)

    def forward(self, h: torch.Tensor, cos, sin, batch: PackedBatch, layer: int) -> torch.Tensor:
        qkv = self.query_key_value(h).view(h.shape[0], self.heads + 2 * self.kv_heads, self.head_dim)
        q, k, v = qkv.split([self.heads, self.kv_heads, self.kv_heads], dim=1)
        q = apply_rotary(self.query_layernorm(q), cos, sin)
        k = apply_rotary(self.key_layernorm(k), cos, sin)
        return attention(q, k, v.contiguous(), batch, layer)


class DecoderLayer(nn.Module):
    def __init__(self, config: LLaDA2Config, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attention = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        dense = layer < config.first_k_dense_replace
        self.mlp = MLP(config.hidden_size, config.intermediate_size) if dense else SparseMoE(config)

    def forward(self, x, cos, sin, batch: PackedBatch, layer: int, keep: torch.Tensor | None = None) -> torch.Tensor:
        attn = self.attention(self.input_layernorm(x), cos, sin, batch, layer)
        return residual(x, attn, keep, self.attention.dense, self.mlp, self.post_attention_layernorm)


class _Backbone(nn.Module):
    def __init__(self, config: LLaDA2Config):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class LLaDA2Model(HubLayout):
    def __init__(self, config: LLaDA2Config):
        super().__init__()
        self.config = config
        self.rotary_dims = config.rotary_dims
        self.model = _Backbone(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    @property
    def embedding(self) -> nn.Embedding:
        return self.model.word_embeddings
