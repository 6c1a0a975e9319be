"""A plain fp32 reference of LLaDA2.0 / LLaDA2.1 (`LLaDA2MoeModelLM`): the forward pass and the
model's own block-diffusion `generate`, written from FAMILY.md and checked token for token against
the published `modeling_llada2_moe.py` (2.0; yks23/Information-Gain-Sampler f1cb636 and
ZHZisZZ/dllm 62ebe4f) and `modeling_llada21_moe.py` (2.1; ZHZisZZ/dllm 62ebe4f, the copy with the
fixed block mask).

A test oracle, not production code: one sequence, no cache, every operation spelled out, no import
from `server/`. It reads the checkpoint's tensors by their published names and config.json by the
published keys.

Forward, per layer (all in fp32):
  h = RMSNorm(x)                                          input_layernorm
  qkv = h Wqkv^T (+ bias when use_qkv_bias)               attention.query_key_value, rows Q | K | V:
        Q num_attention_heads x head_dim, K and V num_key_value_heads x head_dim each
  q, k = RMSNorm over head_dim of each head, one [head_dim] weight shared by the heads
        (attention.query_layernorm / key_layernorm, when use_qk_norm, default true), before RoPE
  RoPE on the first int(partial_rotary_factor x head_dim) dims of each head, half-split within
        them (rotate_half over those dims), theta rope_theta, absolute positions 0..L-1
  softmax(q k^T / sqrt(head_dim) + block mask) v, kv heads repeated (GQA)
  x = x + attention.dense(att) (+ bias when use_bias: the published config class defaults
        use_bias to TRUE, the released configs say false)
  h = RMSNorm(x)                                          post_attention_layernorm
  layer < first_k_dense_replace: out = SwiGLU(h) with mlp.{gate,up,down}_proj
  else: sigmoid group-limited router (`route`), out = sum_e w_e SwiGLU_e(h) over the chosen
        experts + mlp.shared_experts SwiGLU(h) (intermediate moe_intermediate_size x
        num_shared_experts)
  x = x + out
logits = lm_head(RMSNorm(x))    model.norm, untied lm_head, position-aligned (no shift)

Block mask: a query in block i = position // block_length sees every key in blocks <= i.

`generate` is the published `LLaDA2MoeModelLM.generate` for one sequence, recomputing the whole
window (every block up to the current one) at every iteration; see its docstring for the rules.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from torch import Tensor

ARCHITECTURE = "LLaDA2MoeModelLM"


def is_llada2(cfg: dict) -> bool:
    return ARCHITECTURE in (cfg.get("architectures") or [])


def _get(cfg: dict, name: str, default=None):
    value = cfg.get(name)
    return default if value is None else value


@dataclasses.dataclass(frozen=True)
class LLaDA2Shape:
    """What the forward needs from config.json (defaults are the published config class's)."""

    vocab_size: int
    hidden: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    rotary_dim: int
    theta: float
    eps: float
    qk_norm: bool
    qkv_bias: bool
    dense_bias: bool
    first_dense: int
    n_experts: int
    top_k: int
    n_group: int
    topk_group: int
    scaling: float
    shared_experts: int

    @classmethod
    def of(cls, cfg: dict) -> LLaDA2Shape:
        if not is_llada2(cfg):
            raise ValueError(f"not a LLaDA2 config.json: architectures {cfg.get('architectures')}")
        hidden = int(cfg["hidden_size"])
        n_heads = int(cfg["num_attention_heads"])
        n_kv = int(cfg["num_key_value_heads"])
        if n_kv <= 0 or n_heads % n_kv:
            raise ValueError(f"num_key_value_heads {n_kv} must divide num_attention_heads {n_heads}")
        head_dim = int(_get(cfg, "head_dim", hidden // n_heads))
        factor = float(_get(cfg, "partial_rotary_factor", 1.0))
        rotary_dim = int(head_dim * factor)  # transformers' default RoPE init: int(head_dim * factor)
        if rotary_dim <= 0 or rotary_dim % 2:
            raise ValueError(f"partial_rotary_factor {factor} x head_dim {head_dim} is not a positive even dim")
        if cfg.get("rotary_dim") is not None and int(cfg["rotary_dim"]) != rotary_dim:
            # the released configs carry rotary_dim too; the published code ignores it
            raise ValueError(f"rotary_dim {cfg['rotary_dim']} != partial_rotary_factor x head_dim {rotary_dim}")
        if cfg.get("rope_scaling") is not None:
            raise ValueError(f"rope_scaling {cfg['rope_scaling']!r} is not a released LLaDA2 setting")
        if _get(cfg, "hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act {cfg['hidden_act']!r}: only silu is known")
        if _get(cfg, "score_function", "sigmoid") != "sigmoid":
            raise ValueError(f"score_function {cfg['score_function']!r}: the published gate is sigmoid only")
        if cfg.get("tie_word_embeddings"):
            raise ValueError("tie_word_embeddings=true is not a LLaDA2 layout (untied lm_head)")
        n_experts = cfg.get("num_experts")
        n_group = int(_get(cfg, "n_group", 8))
        if n_experts is not None and int(n_experts) % n_group:
            raise ValueError(f"num_experts {n_experts} does not split into n_group {n_group}")
        shared = cfg.get("num_shared_experts")
        return cls(
            vocab_size=int(cfg["vocab_size"]),
            hidden=hidden,
            n_layers=int(cfg["num_hidden_layers"]),
            n_heads=n_heads,
            n_kv_heads=n_kv,
            head_dim=head_dim,
            rotary_dim=rotary_dim,
            theta=float(_get(cfg, "rope_theta", 10000.0)),
            eps=float(_get(cfg, "rms_norm_eps", 1e-5)),
            qk_norm=bool(_get(cfg, "use_qk_norm", True)),
            qkv_bias=bool(_get(cfg, "use_qkv_bias", False)),
            dense_bias=bool(_get(cfg, "use_bias", True)),
            # no num_experts: every layer dense
            first_dense=int(_get(cfg, "first_k_dense_replace", 0)) if n_experts is not None else 1 << 30,
            n_experts=int(n_experts or 0),
            top_k=int(_get(cfg, "num_experts_per_tok", 2)),
            n_group=n_group,
            topk_group=int(_get(cfg, "topk_group", 4)),
            scaling=float(_get(cfg, "routed_scaling_factor", 2.5)),
            shared_experts=int(shared or 0),
        )


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    x = x.float()
    return weight * (x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + eps))


def rope(x: Tensor, positions: Tensor, rotary_dim: int, theta: float) -> Tensor:
    """x [heads, L, head_dim]: rotate the first rotary_dim dims (half-split), pass the rest.
    inv_freq_j = 1 / theta^(2j / rotary_dim), j < rotary_dim / 2."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.float32) / rotary_dim))
    angles = positions.float()[:, None] * inv_freq[None, :]
    cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()
    rot, rest = x[..., :rotary_dim], x[..., rotary_dim:]
    half = rotary_dim // 2
    rotated = rot * cos + torch.cat([-rot[..., half:], rot[..., :half]], -1) * sin
    return torch.cat([rotated, rest], -1)


def block_causal_mask(length: int, block_length: int) -> Tensor:
    """[L, L] bool: query i may see key j iff j // block_length <= i // block_length."""
    blocks = torch.arange(length) // block_length
    return blocks[None, :] <= blocks[:, None]


class LLaDA2Reference:
    """The checkpoint's tensors (fp32, CPU) and config; `forward` gives logits [L, V]."""

    def __init__(self, state_dict: dict[str, Tensor], cfg: dict):
        self.cfg = cfg
        self.shape = LLaDA2Shape.of(cfg)
        self.state = {name: t.detach().to("cpu", torch.float32) for name, t in state_dict.items()}

    @classmethod
    def from_folder(cls, folder: str | Path) -> LLaDA2Reference:
        from safetensors.torch import load_file

        folder = Path(folder)
        cfg = json.loads((folder / "config.json").read_text())
        state: dict[str, Tensor] = {}
        for f in sorted(folder.glob("*.safetensors")):
            state.update(load_file(str(f)))
        return cls(state, cfg)

    def w(self, name: str) -> Tensor:
        return self.state[name]

    # ---- pieces -------------------------------------------------------------------------------

    def swiglu(self, prefix: str, h: Tensor) -> Tensor:
        gate = h @ self.w(prefix + "gate_proj.weight").T
        up = h @ self.w(prefix + "up_proj.weight").T
        return (torch.nn.functional.silu(gate) * up) @ self.w(prefix + "down_proj.weight").T

    def route(self, i: int, h: Tensor) -> tuple[Tensor, Tensor]:
        """Layer i's router on rows h [L, hidden]: (experts [L, k], weights [L, k]).

        s = sigmoid(h Wg^T) in fp32. Selection uses s + expert_bias: group score = sum of the top 2
        biased scores in each of n_group contiguous groups; the topk_group best groups stay; the
        top k biased scores among their experts are chosen. Weights use the UNBIASED s of the
        chosen experts, divided by their sum + 1e-20 (only when k > 1), times
        routed_scaling_factor. (norm_topk_prob is not read by the published code.)"""
        sh, layer = self.shape, f"model.layers.{i}.mlp.gate."
        scores = torch.sigmoid(h.float() @ self.w(layer + "weight").float().T)  # [L, E]
        biased = scores + self.w(layer + "expert_bias")
        n_rows = h.shape[0]
        grouped = biased.view(n_rows, sh.n_group, sh.n_experts // sh.n_group)
        group_scores = grouped.topk(2, dim=-1).values.sum(-1)  # [L, n_group]
        keep_groups = group_scores.topk(sh.topk_group, dim=-1).indices
        group_keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter(1, keep_groups, True)
        expert_keep = group_keep.repeat_interleave(sh.n_experts // sh.n_group, dim=1)
        experts = biased.masked_fill(~expert_keep, float("-inf")).topk(sh.top_k, dim=-1).indices
        chosen = scores.gather(1, experts)
        if sh.top_k > 1:
            chosen = chosen / (chosen.sum(-1, keepdim=True) + 1e-20)
        return experts, chosen * sh.scaling

    def moe(self, i: int, h: Tensor) -> Tensor:
        experts, weights = self.route(i, h)
        out = torch.zeros_like(h)
        for e in range(self.shape.n_experts):
            rows, slots = (experts == e).nonzero(as_tuple=True)
            if rows.numel():
                y = self.swiglu(f"model.layers.{i}.mlp.experts.{e}.", h[rows])
                out.index_add_(0, rows, weights[rows, slots, None] * y)
        if self.shape.shared_experts:
            out = out + self.swiglu(f"model.layers.{i}.mlp.shared_experts.", h)
        return out

    def attention(self, i: int, h: Tensor, positions: Tensor, visible: Tensor) -> Tensor:
        sh, p = self.shape, f"model.layers.{i}.attention."
        n = h.shape[0]
        qkv = h @ self.w(p + "query_key_value.weight").T
        if sh.qkv_bias:
            qkv = qkv + self.w(p + "query_key_value.bias")
        qkv = qkv.view(n, sh.n_heads + 2 * sh.n_kv_heads, sh.head_dim).transpose(0, 1)
        q = qkv[: sh.n_heads]
        k = qkv[sh.n_heads : sh.n_heads + sh.n_kv_heads]
        v = qkv[sh.n_heads + sh.n_kv_heads :]
        if sh.qk_norm:
            q = rms_norm(q, self.w(p + "query_layernorm.weight"), sh.eps)
            k = rms_norm(k, self.w(p + "key_layernorm.weight"), sh.eps)
        q = rope(q, positions, sh.rotary_dim, sh.theta)
        k = rope(k, positions, sh.rotary_dim, sh.theta)
        rep = sh.n_heads // sh.n_kv_heads
        k, v = k.repeat_interleave(rep, dim=0), v.repeat_interleave(rep, dim=0)
        scores = (q @ k.transpose(1, 2)) * sh.head_dim**-0.5
        scores = scores.masked_fill(~visible, float("-inf"))
        att = torch.softmax(scores, dim=-1) @ v  # [H, L, hd]
        out = att.transpose(0, 1).reshape(n, sh.n_heads * sh.head_dim) @ self.w(p + "dense.weight").T
        if sh.dense_bias:
            out = out + self.w(p + "dense.bias")
        return out

    def layer_input_to_mlp(self, i: int, x: Tensor, positions: Tensor, visible: Tensor) -> tuple[Tensor, Tensor]:
        """(residual after attention, post_attention_layernorm of it)."""
        sh, p = self.shape, f"model.layers.{i}."
        h = rms_norm(x, self.w(p + "input_layernorm.weight"), sh.eps)
        x = x + self.attention(i, h, positions, visible)
        return x, rms_norm(x, self.w(p + "post_attention_layernorm.weight"), sh.eps)

    # ---- whole model --------------------------------------------------------------------------

    @torch.no_grad()
    def forward(self, token_ids, *, block_length: int | None) -> Tensor:
        """Logits [L, V] (fp32) of one sequence at positions 0..L-1. block_length None: every query
        sees every key (what the published forward does with no attention mask on its SDPA path)."""
        ids = torch.as_tensor(token_ids, dtype=torch.long).view(-1)
        n = ids.numel()
        positions = torch.arange(n)
        visible = torch.ones(n, n, dtype=torch.bool) if block_length is None else block_causal_mask(n, block_length)
        x = self.w("model.word_embeddings.weight")[ids]
        for i in range(self.shape.n_layers):
            x, h = self.layer_input_to_mlp(i, x, positions, visible)
            if i < self.shape.first_dense:
                x = x + self.swiglu(f"model.layers.{i}.mlp.", h)
            else:
                x = x + self.moe(i, h)
        return rms_norm(x, self.w("model.norm.weight"), self.shape.eps) @ self.w("lm_head.weight").T

    @torch.no_grad()
    def routing(self, token_ids, *, block_length: int | None) -> dict[int, tuple[Tensor, Tensor]]:
        """Per MoE layer i: route(i, h) of the sequence (for tests)."""
        ids = torch.as_tensor(token_ids, dtype=torch.long).view(-1)
        n = ids.numel()
        positions = torch.arange(n)
        visible = torch.ones(n, n, dtype=torch.bool) if block_length is None else block_causal_mask(n, block_length)
        x = self.w("model.word_embeddings.weight")[ids]
        out = {}
        for i in range(self.shape.n_layers):
            x, h = self.layer_input_to_mlp(i, x, positions, visible)
            if i < self.shape.first_dense:
                x = x + self.swiglu(f"model.layers.{i}.mlp.", h)
            else:
                out[i] = self.route(i, h)
                x = x + self.moe(i, h)
        return out


# --------------------------------------------------------------------------------------------
# sampling


def transfer_schedule(block_length: int, steps: int) -> list[int]:
    """2.0: tokens to commit at each of `steps` iterations: block_length // steps each, the first
    block_length % steps iterations one more."""
    base, rem = divmod(block_length, steps)
    return [base + (1 if s < rem else 0) for s in range(steps)]


def pick_tokens(
    logits: Tensor, *, temperature: float, top_k: int | None, top_p: float | None, generator
) -> tuple[Tensor, Tensor]:
    """(token [B], probability [B]) for each row of logits [B, V].

    temperature 0: argmax (first index on ties), probability = softmax(logits) over the whole
    vocabulary (the mask token included) at that token; top_k / top_p are not used.
    temperature > 0: logits / temperature (skipped when it is 1), then top-k (keep logits >= the
    k-th largest; k None or <= 0: off), then top-p (sort descending, cumulative softmax, drop the
    tokens whose cumulative sum BEFORE them already exceeds p, i.e. keep up to and including the
    first token where the cumulative sum passes p; p None or >= 1: off), softmax, one
    torch.multinomial draw per row over all B rows at once (rows in position order) from
    `generator`; probability = the filtered softmax at the drawn token."""
    logits = logits.float()
    if temperature == 0.0:
        token = logits.argmax(dim=-1)
        return token, torch.softmax(logits, dim=-1).gather(-1, token[:, None])[:, 0]
    if temperature != 1.0:
        logits = logits / temperature
    if top_k is not None and top_k > 0:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        drop_sorted = cumulative > top_p
        drop_sorted[:, 1:] = drop_sorted[:, :-1].clone()
        drop_sorted[:, 0] = False
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    token = torch.multinomial(probs, num_samples=1, generator=generator)[:, 0]
    return token, probs.gather(-1, token[:, None])[:, 0]


def _most_confident(positions: list[int], conf: dict[int, float], k: int) -> list[int]:
    """The k most confident of `positions`; equal confidences: the lower position first (the
    published code uses torch.topk, whose order among ties is not specified)."""
    return sorted(positions, key=lambda p: (-conf[p], p))[:k]


@torch.no_grad()
def generate(
    model: LLaDA2Reference,
    prompt_ids,
    *,
    gen_length: int,
    block_length: int = 32,
    steps: int = 32,
    threshold: float = 0.95,
    editing_threshold: float | None = None,
    max_post_steps: int = 16,
    eos_early_stop: bool = False,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
    mask_id: int,
    eos_id: int,
    trace: list | None = None,
) -> list[int]:
    """The published `LLaDA2MoeModelLM.generate` for one sequence (minimal_topk 1); returns the
    answer tokens. editing_threshold None: LLaDA2.0 rules; a number: LLaDA2.1 rules.

    Canvas: P = len(prompt), n_blocks = ceil((P + gen_length) / block_length), canvas length
    n_blocks x block_length, prompt then mask_id. Blocks are at absolute positions; the first block
    worked on is P // block_length (the one holding the prompt's end, whose prompt tokens stay; if
    P is a multiple of block_length, the next one). Each iteration runs the model over the canvas
    up to the end of the current block with the block-causal mask and picks (token, prob) for every
    position of the current block (`pick_tokens`).

    2.0 (steps = min(steps, gen_length), schedule = transfer_schedule(block_length, steps)); per
    block, for s in range(steps): masked = the block's positions holding mask_id; none: the block
    is done (no forward). high = masked positions with prob > threshold (strict); if
    len(high) >= schedule[s] commit all of high, else the min(schedule[s], len(masked)) most
    confident masked. eos_early_stop: if a token committed now is eos_id, e = the first eos_id at
    or after P; if no mask_id in [P, e): return canvas[P : e + 1] (this may run past gen_length,
    into the canvas's last block: the published code does so). After each block: if any eos_id in
    canvas[P : block end], stop (whatever eos_early_stop says).

    2.1 (steps unused): per block, post = 0, loop: old = block tokens; masked as above; if none:
    post += 1; if post > max_post_steps: block done (no forward). Forward. If masked: high = masked
    with prob > threshold; commit high if non-empty, else the single most confident masked.
    Edits: positions of the block at or after P, not masked at the iteration's start, with
    prob > editing_threshold and token != old token, take the new token. If there were no masked
    positions and no edit: block done. After each block: if eos_early_stop, no mask_id in
    canvas[P : block end] and an eos_id in it: stop.

    Answer (both, when not returned early): canvas[P : P + gen_length], cut after its first eos_id
    (inclusive); no eos: all gen_length tokens (mask_id left in place if any were never filled).

    trace: when a list, one dict per iteration is appended (block, masked, committed, edited).
    """
    prompt = [int(t) for t in torch.as_tensor(prompt_ids).view(-1).tolist()]
    P, B = len(prompt), block_length
    n_blocks = (P + gen_length + B - 1) // B
    x = prompt + [mask_id] * (n_blocks * B - P)
    editing = editing_threshold is not None
    steps = min(steps, gen_length)
    schedule = transfer_schedule(B, steps) if steps > 0 else []

    def predict(lo: int, hi: int) -> tuple[list[int], dict[int, float]]:
        logits = model.forward(x[:hi], block_length=B)[lo:hi]
        tok, prob = pick_tokens(logits, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
        return (
            {lo + j: int(tok[j]) for j in range(hi - lo)},
            {lo + j: float(prob[j]) for j in range(hi - lo)},
        )

    for b in range(P // B, n_blocks):
        lo, hi = b * B, (b + 1) * B
        if not editing:
            for s in range(steps):
                masked = [p for p in range(lo, hi) if x[p] == mask_id]
                if not masked:
                    break
                tok, prob = predict(lo, hi)
                high = [p for p in masked if prob[p] > threshold]
                chosen = high if len(high) >= schedule[s] else _most_confident(masked, prob, schedule[s])
                for p in chosen:
                    x[p] = tok[p]
                if trace is not None:
                    trace.append(dict(block=b, masked=len(masked), committed=sorted(chosen), edited=[]))
                if eos_early_stop and any(tok[p] == eos_id for p in chosen):
                    e = next(p for p in range(P, hi) if x[p] == eos_id)
                    if all(x[q] != mask_id for q in range(P, e)):
                        return x[P : e + 1]
            if any(x[p] == eos_id for p in range(P, hi)):
                break
        else:
            post, iterations = 0, 0
            while True:
                old = x[lo:hi]
                masked = [p for p in range(lo, hi) if x[p] == mask_id]
                if not masked:
                    post += 1
                if post > max_post_steps:
                    break
                iterations += 1
                if iterations > 64 * B + max_post_steps:  # only a model that writes mask_id gets here
                    raise RuntimeError("2.1 block did not finish (the model keeps predicting mask_id)")
                tok, prob = predict(lo, hi)
                chosen: list[int] = []
                if masked:
                    chosen = [p for p in masked if prob[p] > threshold] or _most_confident(masked, prob, 1)
                masked_set = set(masked)
                edits = [
                    p
                    for p in range(max(lo, P), hi)
                    if p not in masked_set and prob[p] > editing_threshold and tok[p] != old[p - lo]
                ]
                for p in chosen + edits:
                    x[p] = tok[p]
                if trace is not None:
                    trace.append(dict(block=b, masked=len(masked), committed=sorted(chosen), edited=edits))
                if not masked and not edits:
                    break
            if eos_early_stop:
                part = x[P:hi]
                if mask_id not in part and eos_id in part:
                    break

    answer = x[P : P + gen_length]
    if eos_id in answer:
        answer = answer[: answer.index(eos_id) + 1]
    return answer


def generate_for(model: LLaDA2Reference, prompt_ids, params, mask_id: int, eos_id: int) -> list[int]:
    """`generate` at temperature 0 with the settings of an object that has the engine's sampling
    field names (gen_length, block_length, steps, threshold, editing_threshold, max_post_steps,
    early_stop); only those attributes are read."""
    return generate(
        model,
        prompt_ids,
        gen_length=params.gen_length,
        block_length=params.block_length,
        steps=params.steps,
        threshold=params.threshold,
        editing_threshold=params.editing_threshold,
        max_post_steps=params.max_post_steps,
        eos_early_stop=params.early_stop,
        mask_id=mask_id,
        eos_id=eos_id,
    )


__all__ = [
    "ARCHITECTURE",
    "LLaDA2Reference",
    "LLaDA2Shape",
    "block_causal_mask",
    "generate",
    "generate_for",
    "is_llada2",
    "pick_tokens",
    "transfer_schedule",
]
