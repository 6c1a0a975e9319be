"""A plain fp32 forward pass of LLaDA-MoE (LLaDA-MoE-7B-A1B), written from FAMILY.md and checked
against the published modeling_lladamoe.py.

A test oracle, not production code: one sequence, no padding, every operation spelled out. It reads
weights by their checkpoint tensor names (`model.embed_tokens.weight`, `model.layers.N.*`,
`model.norm.weight`, `lm_head.weight`) and the published config.json keys.

Per layer:
  h = RMSNorm(x)                                    input_layernorm
  q, k, v = h Wq^T, h Wk^T, h Wv^T                  self_attn.{q,k,v}_proj
  q, k = RMSNorm over head_dim of each head          self_attn.{q,k}_norm [head_dim], when qk_layernorm
  (clip_qkv clamps q, k, v when set)
  RoPE on the first partial_rotary_factor x head_dim dims of each head (half-split within them),
  theta = rope_theta, at absolute positions; the rest of each head passes through
  bidirectional softmax attention, scale 1/sqrt(head_dim), kv heads repeated for GQA
  x = x + o_proj(attention)
  h = RMSNorm(x)                                    post_attention_layernorm
  MoE layer (moe_layer_freq[i] != 0): p = softmax(h Wgate^T) in fp32 over all experts; the top
  num_experts_per_tok (with moe_router_enable_expert_bias, the bias is added to p first and the
  biased values are the weights, as the published code does); weights are NOT renormalised (the
  published block hard-codes norm_topk_prob = False); out = sum_e w_e * SwiGLU_e(h), with
  SwiGLU(h) = down(silu(gate(h)) * up(h))
  dense layer: out = SwiGLU(h) with mlp.{gate,up,down}_proj
  shared_expert_intermediate_size not null: out += shared_expert SwiGLU(h)
  x = x + out
logits = lm_head(RMSNorm(x))   model.norm; untied head; position-aligned (no shift).

The module offers what tests/reference/model.py offers (`forward_at`, `full_forward`,
`reference_logits`, `KVCache`), with the same signatures; model.py's `forward_at` and
`full_forward` hand a LLaDA-MoE config.json to these, so the samplers in sampler.py,
fast_sampler.py and likelihood.py run on a LLaDA-MoE checkpoint unchanged.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from tests.reference.model import KVCache, attention, rms_norm

ARCHITECTURE = "LLaDAMoEModelLM"


def is_llada_moe(cfg: dict) -> bool:
    """Dispatch on `architectures` (model_type is "llada" in some published copies)."""
    return ARCHITECTURE in (cfg.get("architectures") or [])


def _get(cfg: dict, name: str, default=None):
    value = cfg.get(name)
    return default if value is None else value


@dataclasses.dataclass(frozen=True)
class MoEShape:
    """The config.json values the forward needs. Field names n_layers / n_kv_heads / head_dim
    match model.Shape, so model.KVCache.empty takes it."""

    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    rotary_dim: int
    theta: float
    eps: float
    n_experts: int
    top_k: int
    moe_layers: tuple[bool, ...]
    shared_expert: bool
    expert_bias: bool
    qk_norm: bool
    clip_qkv: float | None

    @classmethod
    def of(cls, cfg: dict) -> MoEShape:
        if not is_llada_moe(cfg):
            raise ValueError(f"not a LLaDA-MoE config.json: architectures {cfg.get('architectures')}")
        hidden = int(cfg["hidden_size"])
        n_heads = int(cfg["num_attention_heads"])
        n_kv_heads = int(_get(cfg, "num_key_value_heads", n_heads))
        n_layers = int(cfg["num_hidden_layers"])
        if hidden % n_heads or n_heads % n_kv_heads:
            raise ValueError("hidden_size must divide into num_attention_heads, and those into num_key_value_heads")
        head_dim = hidden // n_heads
        # the published attention always uses hidden_size // num_attention_heads
        if cfg.get("head_dim") is not None and int(cfg["head_dim"]) != head_dim:
            raise ValueError(f"head_dim {cfg['head_dim']} != hidden_size // num_attention_heads {head_dim}")
        factor = float(_get(cfg, "partial_rotary_factor", 1.0))
        rotary_dim = int(head_dim * factor)
        if not 0 < rotary_dim <= head_dim or rotary_dim % 2:
            raise ValueError(f"partial_rotary_factor {factor} gives rotary dim {rotary_dim} of head dim {head_dim}")
        if cfg.get("rope_scaling") is not None:
            raise ValueError(f"rope_scaling {cfg['rope_scaling']!r} is not a published LLaDA-MoE setting")
        if _get(cfg, "hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act {cfg['hidden_act']!r}: only silu is known")
        if cfg.get("attention_bias"):
            raise ValueError("attention_bias=true is not a published LLaDA-MoE layout")
        if cfg.get("tie_word_embeddings"):
            raise ValueError("tie_word_embeddings=true is not a published LLaDA-MoE layout (untied lm_head)")
        score = _get(cfg, "moe_router_score_function", "softmax")
        if score != "softmax":
            raise ValueError(f"moe_router_score_function {score!r}: the published block only does softmax")
        if cfg.get("norm_topk_prob"):
            raise ValueError("norm_topk_prob=true: the published block ignores it and never renormalises")
        freq = cfg.get("moe_layer_freq")
        if freq is None:
            freq = [1] * n_layers
        if len(freq) != n_layers:
            raise ValueError(f"moe_layer_freq has {len(freq)} entries for {n_layers} layers")
        shared = cfg.get("shared_expert_intermediate_size")
        clip = cfg.get("clip_qkv")
        return cls(
            n_layers=n_layers,
            n_heads=n_heads,
            n_kv_heads=n_kv_heads,
            head_dim=head_dim,
            rotary_dim=rotary_dim,
            theta=float(cfg["rope_theta"]),
            eps=float(_get(cfg, "rms_norm_eps", 1e-5)),
            n_experts=int(cfg["num_experts"]),
            top_k=int(cfg["num_experts_per_tok"]),
            moe_layers=tuple(bool(f) for f in freq),
            shared_expert=shared is not None and int(shared) > 0,
            expert_bias=bool(cfg.get("moe_router_enable_expert_bias")),
            qk_norm=bool(cfg.get("qk_layernorm")),
            clip_qkv=None if clip is None else float(clip),
        )


class Weights:
    """The checkpoint's tensors by name, in fp32 on the CPU, and the config's shape."""

    def __init__(self, state_dict: dict[str, Tensor], cfg: dict):
        self._state = state_dict
        self.shape = MoEShape.of(cfg)

    def __call__(self, name: str) -> Tensor:
        return self._state[name].detach().to(device="cpu", dtype=torch.float32)

    def has(self, name: str) -> bool:
        return name in self._state


def rope_cos_sin(positions: Tensor, rotary_dim: int, theta: float) -> tuple[Tensor, Tensor]:
    """cos/sin [Q, rotary_dim] at absolute positions: inv_freq_j = 1/theta^(2j/rotary_dim)."""
    j2 = torch.arange(0, rotary_dim, 2, dtype=torch.float32)
    inv_freq = 1.0 / (theta ** (j2 / rotary_dim))
    angles = positions.to(torch.float32)[:, None] * inv_freq[None, :]
    both = torch.cat([angles, angles], dim=-1)
    return both.cos(), both.sin()


def apply_partial_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x [heads, Q, head_dim]: rotate the first cos.shape[-1] dims (half-split), pass the rest."""
    r = cos.shape[-1]
    rot, rest = x[..., :r], x[..., r:]
    first, second = rot[..., : r // 2], rot[..., r // 2 :]
    rotated = rot * cos + torch.cat([-second, first], dim=-1) * sin
    return torch.cat([rotated, rest], dim=-1)


def swiglu(w: Weights, prefix: str, h: Tensor) -> Tensor:
    gate = h @ w(prefix + "gate_proj.weight").T
    up = h @ w(prefix + "up_proj.weight").T
    return (gate * torch.sigmoid(gate) * up) @ w(prefix + "down_proj.weight").T


def route(w: Weights, i: int, h: Tensor) -> tuple[Tensor, Tensor]:
    """Layer i's router for rows h [Q, d]: (expert ids [Q, k], weights [Q, k]), fp32.

    softmax over all experts of h Wgate^T, top-k of it; weights are the (unrenormalised)
    probabilities, biased by mlp.expert_bias when the config enables it.
    """
    s = w.shape
    scores = torch.softmax((h @ w(f"model.layers.{i}.mlp.gate.weight").T).float(), dim=-1)  # [Q, E]
    if s.expert_bias:
        scores = scores + w(f"model.layers.{i}.mlp.expert_bias")
    weights, experts = torch.topk(scores, s.top_k, dim=-1)
    return experts, weights


def moe_block(w: Weights, i: int, h: Tensor) -> Tensor:
    """sum over each row's chosen experts of weight x SwiGLU expert, one row at a time."""
    experts, weights = route(w, i, h)
    out = torch.zeros_like(h)
    for row in range(h.shape[0]):
        for slot in range(experts.shape[1]):
            e = int(experts[row, slot])
            expert_out = swiglu(w, f"model.layers.{i}.mlp.experts.{e}.", h[row : row + 1])[0]
            out[row] += weights[row, slot] * expert_out
    return out


def qkv(w: Weights, i: int, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Layer i's q [H, Q, hd], k and v [Hkv, Q, hd] of the rows x [Q, d], q/k normed, before RoPE."""
    s, layer, n_rows = w.shape, f"model.layers.{i}.self_attn.", x.shape[0]
    h = rms_norm(x, w(f"model.layers.{i}.input_layernorm.weight"), s.eps)
    q = (h @ w(layer + "q_proj.weight").T).view(n_rows, s.n_heads, s.head_dim)
    k = (h @ w(layer + "k_proj.weight").T).view(n_rows, s.n_kv_heads, s.head_dim)
    v = (h @ w(layer + "v_proj.weight").T).view(n_rows, s.n_kv_heads, s.head_dim)
    if s.qk_norm:
        # one RMSNorm per head, over its head_dim values, with a [head_dim] weight shared by heads
        q = rms_norm(q, w(layer + "q_norm.weight"), s.eps)
        k = rms_norm(k, w(layer + "k_norm.weight"), s.eps)
    if s.clip_qkv is not None:
        q, k, v = (t.clamp(-s.clip_qkv, s.clip_qkv) for t in (q, k, v))
    return q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)


def finish_layer(w: Weights, i: int, x: Tensor, q: Tensor, keys: Tensor, values: Tensor) -> Tensor:
    """Layer i's output for the rows x [Q, d] given their roped queries and every position's
    roped keys and values [Hkv, L, hd]."""
    s, n_rows = w.shape, x.shape[0]
    repeat = s.n_heads // s.n_kv_heads
    if repeat > 1:
        keys = keys.repeat_interleave(repeat, dim=0)
        values = values.repeat_interleave(repeat, dim=0)
    att = attention(q, keys, values).transpose(0, 1).reshape(n_rows, s.n_heads * s.head_dim)
    x = x + att @ w(f"model.layers.{i}.self_attn.o_proj.weight").T
    h = rms_norm(x, w(f"model.layers.{i}.post_attention_layernorm.weight"), s.eps)
    if s.moe_layers[i]:
        out = moe_block(w, i, h)
    else:
        out = swiglu(w, f"model.layers.{i}.mlp.", h)
    if s.shared_expert and s.moe_layers[i]:
        out = out + swiglu(w, f"model.layers.{i}.shared_expert.", h)
    return x + out


def lm_head(w: Weights, x: Tensor) -> Tensor:
    return rms_norm(x, w("model.norm.weight"), w.shape.eps) @ w("lm_head.weight").T


def empty_cache(cfg: dict, seq_len: int) -> KVCache:
    return KVCache.empty(MoEShape.of(cfg), seq_len)


@torch.no_grad()
def forward_at(
    state_dict: dict[str, Tensor], cfg: dict, token_ids: Tensor, positions: Tensor, cache: KVCache
) -> Tensor:
    """Logits [Q, V] of the rows token_ids [Q] at absolute positions [Q] of one sequence; the same
    contract as tests.reference.model.forward_at (keys/values written into `cache` at the rows'
    positions, every other position must already be there)."""
    w = Weights(state_dict, cfg)
    s = w.shape
    x = w("model.embed_tokens.weight")[token_ids.to("cpu")]
    cos, sin = rope_cos_sin(positions, s.rotary_dim, s.theta)
    for i in range(s.n_layers):
        q, k, v = qkv(w, i, x)
        cache.keys[i][:, positions] = apply_partial_rope(k, cos, sin)
        cache.values[i][:, positions] = v
        if torch.isnan(cache.keys[i]).any() or torch.isnan(cache.values[i]).any():
            raise ValueError(f"layer {i}: the cache lacks a position that this forward does not compute")
        x = finish_layer(w, i, x, apply_partial_rope(q, cos, sin), cache.keys[i], cache.values[i])
    return lm_head(w, x)


@torch.no_grad()
def full_forward(state_dict: dict[str, Tensor], cfg: dict, input_ids: Tensor) -> tuple[Tensor, KVCache]:
    """fp32 forward of one unpadded sequence [1, L]: logits [1, L, V] and every position's keys/values."""
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError(f"the reference forward takes one sequence [1, L], got {tuple(input_ids.shape)}")
    seq_len = input_ids.shape[1]
    cache = empty_cache(cfg, seq_len)
    logits = forward_at(state_dict, cfg, input_ids[0], torch.arange(seq_len), cache)
    return logits.unsqueeze(0), cache


def reference_logits(state_dict: dict[str, Tensor], cfg: dict, input_ids: Tensor) -> Tensor:
    """fp32 LLaDA-MoE forward for one unpadded sequence: input_ids [1, L] -> logits [1, L, V]."""
    return full_forward(state_dict, cfg, input_ids)[0]


@torch.no_grad()
def router_choices(state_dict: dict[str, Tensor], cfg: dict, input_ids: Tensor) -> list[tuple[Tensor, Tensor]]:
    """Per MoE layer, (expert ids [L, k], weights [L, k]) of one sequence [1, L] (for tests)."""
    w = Weights(state_dict, cfg)
    s = w.shape
    seq_len = input_ids.shape[1]
    cache = empty_cache(cfg, seq_len)
    positions = torch.arange(seq_len)
    x = w("model.embed_tokens.weight")[input_ids[0]]
    cos, sin = rope_cos_sin(positions, s.rotary_dim, s.theta)
    choices = []
    for i in range(s.n_layers):
        q, k, v = qkv(w, i, x)
        cache.keys[i][:, positions] = apply_partial_rope(k, cos, sin)
        cache.values[i][:, positions] = v
        if s.moe_layers[i]:
            # the router sees post_attention_layernorm of the residual after attention
            repeat = s.n_heads // s.n_kv_heads
            keys = cache.keys[i].repeat_interleave(repeat, dim=0)
            values = cache.values[i].repeat_interleave(repeat, dim=0)
            att = attention(apply_partial_rope(q, cos, sin), keys, values).transpose(0, 1).reshape(seq_len, -1)
            mid = x + att @ w(f"model.layers.{i}.self_attn.o_proj.weight").T
            h = rms_norm(mid, w(f"model.layers.{i}.post_attention_layernorm.weight"), s.eps)
            choices.append(route(w, i, h))
        x = finish_layer(w, i, x, apply_partial_rope(q, cos, sin), cache.keys[i], cache.values[i])
    return choices


__all__ = [
    "KVCache",
    "MoEShape",
    "forward_at",
    "full_forward",
    "is_llada_moe",
    "reference_logits",
    "router_choices",
]
