"""Tiny checkpoints of the newer LLaDA family members, in each one's published folder layout.

Every builder writes a folder a real checkpoint would look like (config.json with the published
keys, `model.safetensors` under the published tensor names, `tokenizer.json` and
`tokenizer_config.json` with a chat template), at a size a CPU runs in milliseconds, with random
fp32 weights drawn from `seed`. FAMILY.md says what each member needs; the notes below say where
these folders follow a published file and where they had to guess.

- iLLaDA (`write_illada_checkpoint`): LLaDA's layout and config keys (`LLaDAModelLM`,
  `model_type` "llada"), with grouped-query attention (`n_kv_heads` < `n_heads`) and a tied LM
  head (`weight_tying` true: no `model.transformer.ff_out.weight`, the head is
  `model.transformer.wte.weight`). `mask_token_id` is 5 as the LLaDA README says. iLLaDA's
  tokenizer files were not found anywhere public here, so the special-token strings and every
  other special id are invented (ILLADA_SPECIAL_TOKENS), and the chat template is LLaDA's
  Llama-3-shaped one written with those strings.
- LLaDA-MoE (`write_llada_moe_checkpoint`): the keys of the published
  `configuration_lladamoe.py` and the tensor names of `modeling_lladamoe.py`. config.json has no
  `mask_token_id` (published copies lack it): the mask id is the tokenizer's `<|mask|>`.
  The special-token strings are the published ones (`<|startoftext|>`, `<|endoftext|>`,
  `<|mask|>`, `<|role_end|>`, `<role>`/`</role>`), at tiny ids that keep the published offsets
  (mask = BOS + 4, EOS = BOS + 1); the chat template is written in the published turn shape
  (the real template was not found).

`with_remote_code=True` adds an `auto_map` to config.json and the checkpoint's own
`configuration_*.py` / `modeling_*.py`; importing either writes `remote_code_marker(folder)`,
so a test can assert that the server never executed them.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

WEIGHTS_FILE = "model.safetensors"
REMOTE_CODE_MARKER = "REMOTE_CODE_WAS_EXECUTED"


def remote_code_marker(folder: Path) -> Path:
    """The file the folder's remote code writes if anything ever imports it."""
    return Path(folder).resolve() / REMOTE_CODE_MARKER


# --------------------------------------------------------------------------------------------
# tokenizers: one token per byte plus special tokens at fixed ids


def _byte_stand_ins() -> dict[int, str]:
    """Byte -> the printable character byte-level BPE vocabularies write it as (GPT-2's table)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in keep}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def build_tokenizer(byte_offset: int, special_tokens: dict[str, int]) -> Tokenizer:
    """Byte-level tokenizer: byte b is id byte_offset + b; the special tokens sit at their ids."""
    vocab = {char: byte_offset + b for b, char in _byte_stand_ins().items()}
    taken = set(vocab.values())
    for token, token_id in special_tokens.items():
        if token_id in taken:
            raise ValueError(f"special token {token} at id {token_id} collides with a byte token")
        vocab[token] = token_id
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in special_tokens])
    return tokenizer


def _write_tokenizer(folder: Path, tokenizer: Tokenizer, tokenizer_config: dict) -> None:
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))


# --------------------------------------------------------------------------------------------
# random weights


class _Draw:
    """Seeded fp32 tensors: matrices ~ N(0, gain^2 / fan_in), norm weights near 1."""

    def __init__(self, seed: int):
        self.g = torch.Generator().manual_seed(seed)

    def matrix(self, rows: int, cols: int, gain: float = 1.0) -> torch.Tensor:
        return torch.randn(rows, cols, generator=self.g) * (gain / math.sqrt(cols))

    def embedding(self, rows: int, cols: int) -> torch.Tensor:
        return torch.randn(rows, cols, generator=self.g)

    def norm(self, size: int) -> torch.Tensor:
        # not all ones, so a norm applied over the wrong axis or skipped changes the output
        return 1.0 + 0.2 * torch.randn(size, generator=self.g)


def _save_weights(folder: Path, tensors: dict[str, torch.Tensor]) -> None:
    state = {name: t.to(torch.float32).contiguous() for name, t in tensors.items()}
    save_file(state, str(folder / WEIGHTS_FILE), metadata={"format": "pt"})


# --------------------------------------------------------------------------------------------
# remote code that must never run


def _write_remote_code(
    folder: Path, config: dict, config_module: str, model_module: str, config_class: str, model_class: str
) -> None:
    marker = str(remote_code_marker(folder))
    body = (
        '"""Stands in for a checkpoint\'s own remote code: a server must never import it."""\n'
        "from pathlib import Path\n\n"
        f"Path({marker!r}).write_text('executed: ' + __name__ + '\\n')\n"
        "raise RuntimeError('this checkpoint\\'s remote code was executed')\n"
    )
    (folder / f"{config_module}.py").write_text(body)
    (folder / f"{model_module}.py").write_text(body)
    config["auto_map"] = {
        "AutoConfig": f"{config_module}.{config_class}",
        "AutoModel": f"{model_module}.{model_class}",
        "AutoModelForCausalLM": f"{model_module}.{model_class}",
    }


# --------------------------------------------------------------------------------------------
# iLLaDA: LLaDA's layout, grouped-query attention, tied embedding / LM head, mask id 5

# Invented strings (iLLaDA's tokenizer files were not found); ids below 16, mask at 5.
ILLADA_SPECIAL_TOKENS = {
    "<|bos|>": 0,
    "<|pad|>": 1,
    "<|eos|>": 2,
    "<|start_header|>": 3,
    "<|end_header|>": 4,
    "<|mask|>": 5,
    "<|eot|>": 6,
    **{f"<|reserved_{i}|>": i for i in range(7, 16)},
}
ILLADA_BYTE_OFFSET = 16  # byte b is token 16 + b (ids 16..271)
ILLADA_SHAPE = dict(
    d_model=32,
    n_layers=2,
    n_heads=4,
    n_kv_heads=2,  # grouped-query attention: 2 query heads per kv head, head dim 8
    mlp_hidden_size=48,  # not mlp_ratio * d_model: the loader must read mlp_hidden_size
    vocab_size=320,
)
ILLADA_MASK_ID = 5
ILLADA_BOS_ID = 0
ILLADA_PAD_ID = 1
ILLADA_EOS_ID = 2
ILLADA_EOT_ID = 6

# LLaDA-8B-Instruct's template (Llama-3 shaped) written with the invented strings.
ILLADA_CHAT_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header|>' + message['role'] + '<|end_header|>\n\n'"
    "+ message['content'] | trim + '<|eot|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}{{ '<|start_header|>assistant<|end_header|>\n\n' }}"
)


def illada_config() -> dict:
    """config.json of the tiny iLLaDA: LLaDA's published keys (GSAI-ML configuration_llada.py)."""
    s = ILLADA_SHAPE
    return {
        "architectures": ["LLaDAModelLM"],
        "model_type": "llada",
        "activation_type": "silu",
        "alibi": False,
        "alibi_bias_max": 8.0,
        "attention_dropout": 0.0,
        "attention_layer_norm": False,
        "attention_layer_norm_with_affine": True,
        "bias_for_layer_norm": False,
        "block_group_size": 1,
        "block_type": "llama",
        "d_model": s["d_model"],
        "embedding_dropout": 0.0,
        "embedding_size": s["vocab_size"],
        "eos_token_id": ILLADA_EOS_ID,
        "flash_attention": False,
        "include_bias": False,
        "include_qkv_bias": False,
        "init_cutoff_factor": None,
        "init_device": "meta",
        "init_fn": "mitchell",
        "init_std": 0.02,
        "input_emb_norm": False,
        "layer_norm_type": "rms",
        "layer_norm_with_affine": True,
        "mask_token_id": ILLADA_MASK_ID,
        "max_sequence_length": 8192,
        "mlp_hidden_size": s["mlp_hidden_size"],
        "mlp_ratio": 4,
        "multi_query_attention": None,
        "n_heads": s["n_heads"],
        "n_kv_heads": s["n_kv_heads"],
        "n_layers": s["n_layers"],
        "pad_token_id": ILLADA_PAD_ID,
        "precision": "amp_bf16",
        "residual_dropout": 0.0,
        "rms_norm_eps": 1e-5,
        "rope": True,
        "rope_full_precision": True,
        "rope_theta": 500000.0,
        "scale_logits": False,
        "torch_dtype": "bfloat16",
        "use_cache": False,
        "vocab_size": s["vocab_size"],
        "weight_tying": True,
    }


def illada_tokenizer_config() -> dict:
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|bos|>",
        "eos_token": "<|eos|>",
        "pad_token": "<|pad|>",
        "add_bos_token": False,
        "add_eos_token": False,
        "model_max_length": 8192,
        "chat_template": ILLADA_CHAT_TEMPLATE,
    }


def illada_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights under LLaDA's tensor names; no `model.transformer.ff_out.weight` (tied)."""
    s = ILLADA_SHAPE
    d, hidden, head_dim = s["d_model"], s["mlp_hidden_size"], s["d_model"] // s["n_heads"]
    kv = s["n_kv_heads"] * head_dim
    draw = _Draw(seed)
    state = {"model.transformer.wte.weight": draw.embedding(s["vocab_size"], d)}
    # With a tied head and random weights a masked position's residual stream predicts the mask
    # token itself (the row's own embedding wins the dot product); a trained iLLaDA never does.
    # A short mask row keeps the tiny model away from that degenerate answer.
    state["model.transformer.wte.weight"][ILLADA_MASK_ID] *= 0.05
    for i in range(s["n_layers"]):
        blk = f"model.transformer.blocks.{i}."
        state[blk + "attn_norm.weight"] = draw.norm(d)
        state[blk + "q_proj.weight"] = draw.matrix(d, d, gain=2.0)
        state[blk + "k_proj.weight"] = draw.matrix(kv, d, gain=2.0)
        state[blk + "v_proj.weight"] = draw.matrix(kv, d)
        state[blk + "attn_out.weight"] = draw.matrix(d, d)
        state[blk + "ff_norm.weight"] = draw.norm(d)
        state[blk + "ff_proj.weight"] = draw.matrix(hidden, d)
        state[blk + "up_proj.weight"] = draw.matrix(hidden, d)
        state[blk + "ff_out.weight"] = draw.matrix(d, hidden)
    state["model.transformer.ln_f.weight"] = draw.norm(d)
    return state


def write_illada_checkpoint(folder: Path, seed: int = 0, *, with_remote_code: bool = False) -> Path:
    """A tiny iLLaDA-layout folder (GQA, tied head, mask id 5) with random weights from `seed`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = illada_config()
    if with_remote_code:
        _write_remote_code(folder, config, "configuration_llada", "modeling_llada", "LLaDAConfig", "LLaDAModelLM")
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    _write_tokenizer(folder, build_tokenizer(ILLADA_BYTE_OFFSET, ILLADA_SPECIAL_TOKENS), illada_tokenizer_config())
    _save_weights(folder, illada_state_dict(seed))
    return folder


# --------------------------------------------------------------------------------------------
# LLaDA-MoE: OLMoE-style decoder, per-head q/k RMSNorm, softmax top-k router, untied head

# The published strings; tiny ids with the published offsets (real: 156891 BOS, 156892 EOS/pad,
# 156895 mask). Ids 0..255 are the bytes.
LLADA_MOE_SPECIAL_TOKENS = {
    "<|startoftext|>": 300,
    "<|endoftext|>": 301,
    "<role>": 302,
    "</role>": 303,
    "<|mask|>": 304,
    "<|role_end|>": 305,
}
LLADA_MOE_BYTE_OFFSET = 0
LLADA_MOE_BOS_ID = 300
LLADA_MOE_EOS_ID = 301
LLADA_MOE_MASK_ID = 304
LLADA_MOE_EOT_ID = 305
LLADA_MOE_SHAPE = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,  # head dim 8; no GQA, as the published model
    num_key_value_heads=4,
    num_experts=8,
    num_experts_per_tok=2,
    expert_intermediate_size=16,
    dense_intermediate_size=64,
    vocab_size=320,
)

# The published turn shape: <role>HUMAN</role>...<|role_end|><role>ASSISTANT</role> (the real
# template was not found: no default system turn is added here).
LLADA_MOE_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{% set role = 'HUMAN' %}"
    "{% else %}{% set role = message['role'] | upper %}{% endif %}"
    "{{ '<role>' + role + '</role>' + message['content'] + '<|role_end|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<role>ASSISTANT</role>' }}{% endif %}"
)


def llada_moe_config(moe_layer_freq: list[int] | None = None, shape: dict | None = None) -> dict:
    """config.json of the tiny LLaDA-MoE: the keys of the published configuration_lladamoe.py.
    shape: LLADA_MOE_SHAPE's keys, for other sizes (benchmarks).

    No `mask_token_id` (published copies lack it; the tokenizer's `<|mask|>` is the mask).
    """
    s = shape or LLADA_MOE_SHAPE
    layers = s["num_hidden_layers"]
    return {
        "architectures": ["LLaDAMoEModelLM"],
        "model_type": "llada",
        "vocab_size": s["vocab_size"],
        "hidden_size": s["hidden_size"],
        "dense_intermediate_size": s["dense_intermediate_size"],
        "expert_intermediate_size": s["expert_intermediate_size"],
        "shared_expert_intermediate_size": None,
        "num_hidden_layers": layers,
        "num_attention_heads": s["num_attention_heads"],
        "num_key_value_heads": s["num_key_value_heads"],
        "hidden_act": "silu",
        "max_position_embeddings": 8192,
        "initializer_range": 0.02,
        "rms_norm_eps": 1e-6,
        "use_cache": False,
        "pad_token_id": LLADA_MOE_EOS_ID,
        "bos_token_id": LLADA_MOE_BOS_ID,
        "eos_token_id": LLADA_MOE_EOS_ID,
        "tie_word_embeddings": False,
        "rope_theta": 50000,
        "partial_rotary_factor": 1.0,
        "rope_scaling": None,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "clip_qkv": None,
        "num_experts_per_tok": s["num_experts_per_tok"],
        "num_experts": s["num_experts"],
        "output_router_logits": False,
        "router_aux_loss_coef": 0.01,
        "norm_topk_prob": None,
        "qk_layernorm": True,
        "moe_layer_freq": list(moe_layer_freq) if moe_layer_freq is not None else [1] * layers,
        "moe_router_enable_expert_bias": None,
        "moe_router_score_function": "softmax",
        "routed_scaling_factor": 1,
        "torch_dtype": "bfloat16",
    }


def llada_moe_tokenizer_config() -> dict:
    # as the dllm project observed of the published files: no mask_token field (the mask is found
    # by its string `<|mask|>`), EOS doubles as pad
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "add_bos_token": False,
        "add_eos_token": False,
        "model_max_length": 8192,
        "chat_template": LLADA_MOE_CHAT_TEMPLATE,
    }


def llada_moe_state_dict(
    seed: int = 0, moe_layer_freq: list[int] | None = None, shape: dict | None = None
) -> dict[str, torch.Tensor]:
    """Random weights under modeling_lladamoe.py's names (LLaDAMoEModelLM.state_dict())."""
    s = shape or LLADA_MOE_SHAPE
    d, heads, kv_heads = s["hidden_size"], s["num_attention_heads"], s["num_key_value_heads"]
    head_dim = d // heads
    freq = moe_layer_freq if moe_layer_freq is not None else [1] * s["num_hidden_layers"]
    draw = _Draw(seed)
    state = {"model.embed_tokens.weight": draw.embedding(s["vocab_size"], d)}
    for i in range(s["num_hidden_layers"]):
        layer = f"model.layers.{i}."
        state[layer + "input_layernorm.weight"] = draw.norm(d)
        state[layer + "self_attn.q_proj.weight"] = draw.matrix(heads * head_dim, d, gain=2.0)
        state[layer + "self_attn.k_proj.weight"] = draw.matrix(kv_heads * head_dim, d, gain=2.0)
        state[layer + "self_attn.v_proj.weight"] = draw.matrix(kv_heads * head_dim, d)
        state[layer + "self_attn.o_proj.weight"] = draw.matrix(d, d)
        state[layer + "self_attn.q_norm.weight"] = draw.norm(head_dim)
        state[layer + "self_attn.k_norm.weight"] = draw.norm(head_dim)
        state[layer + "post_attention_layernorm.weight"] = draw.norm(d)
        if freq[i]:
            # a router gain of 4 spreads the softmax so the top-k choice varies by token
            state[layer + "mlp.gate.weight"] = draw.matrix(s["num_experts"], d, gain=4.0)
            for e in range(s["num_experts"]):
                expert = f"{layer}mlp.experts.{e}."
                state[expert + "gate_proj.weight"] = draw.matrix(s["expert_intermediate_size"], d, gain=2.0)
                state[expert + "up_proj.weight"] = draw.matrix(s["expert_intermediate_size"], d, gain=2.0)
                state[expert + "down_proj.weight"] = draw.matrix(d, s["expert_intermediate_size"], gain=2.0)
        else:
            state[layer + "mlp.gate_proj.weight"] = draw.matrix(s["dense_intermediate_size"], d)
            state[layer + "mlp.up_proj.weight"] = draw.matrix(s["dense_intermediate_size"], d)
            state[layer + "mlp.down_proj.weight"] = draw.matrix(d, s["dense_intermediate_size"])
    state["model.norm.weight"] = draw.norm(d)
    state["lm_head.weight"] = draw.matrix(s["vocab_size"], d, gain=4.0)
    return state


def write_llada_moe_checkpoint(
    folder: Path,
    seed: int = 0,
    *,
    with_remote_code: bool = False,
    moe_layer_freq: list[int] | None = None,
    shape: dict | None = None,
) -> Path:
    """A tiny LLaDA-MoE-layout folder with random weights from `seed`.

    moe_layer_freq: per layer 1 (MoE) or 0 (dense SwiGLU of dense_intermediate_size); the
    published model is MoE in every layer, the default here. shape: other sizes (benchmarks).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = llada_moe_config(moe_layer_freq, shape)
    if with_remote_code:
        _write_remote_code(
            folder, config, "configuration_lladamoe", "modeling_lladamoe", "LLaDAConfig", "LLaDAMoEModelLM"
        )
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    _write_tokenizer(
        folder, build_tokenizer(LLADA_MOE_BYTE_OFFSET, LLADA_MOE_SPECIAL_TOKENS), llada_moe_tokenizer_config()
    )
    _save_weights(folder, llada_moe_state_dict(seed, moe_layer_freq, shape))
    return folder


def load_checkpoint(folder: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(state dict, config.json) of a folder written here, for the references."""
    from safetensors.torch import load_file

    folder = Path(folder)
    return load_file(str(folder / WEIGHTS_FILE)), json.loads((folder / "config.json").read_text())


# --------------------------------------------------------------------------------------------
# LLaDA2.0 / 2.1: fused QKV, per-head q/k RMSNorm, partial RoPE, GQA, dense layer 0, sigmoid
# group-limited router with expert bias, shared expert, untied head; block diffusion sampling
#
# config.json: the keys of the released LLaDA2.0-mini config (inclusionAI/dFactory
# configs/model_configs/llada2_mini/config.json, whose model_type there is the training variant
# "llada2_moe_veomni"; the checkpoints say "llada2_moe") plus `use_qk_norm` / `router_dtype`.
# Released configs list pad_token_id (= EOS) but no bos / eos / mask ids: the tokenizer gives them
# (`<|mask|>` by its string, as LLaDA-MoE). Tensor names: `LLaDA2MoeModelLM.state_dict()` of the
# published modeling_llada2_moe.py. Special-token strings are the published ones at tiny ids with
# the published offsets from BOS (real: BOS 156891, EOS 156892, mask 156895; the ids of `<role>`,
# `</role>`, `<|role_end|>` were not found and are invented as for LLaDA-MoE); the bench shape
# (vocabulary 157184) puts BOS / EOS / mask at the real ids. The chat template is written in the
# published turn shape `<role>SYSTEM</role>...<|role_end|><role>HUMAN</role>...<|role_end|>
# <role>ASSISTANT</role>` (the real template was not found; no default system turn is added).

LLADA2_SPECIAL_OFFSETS = {
    "<|startoftext|>": 0,
    "<|endoftext|>": 1,
    "<role>": 2,
    "</role>": 3,
    "<|mask|>": 4,
    "<|role_end|>": 5,
}
LLADA2_BYTE_OFFSET = 0
LLADA2_REAL_BOS_ID = 156891
LLADA2_BOS_ID = 300
LLADA2_EOS_ID = 301
LLADA2_MASK_ID = 304
LLADA2_ROLE_END_ID = 305

LLADA2_SHAPE = dict(
    vocab_size=320,
    hidden_size=48,  # != num_attention_heads x head_dim (64): a loader must read head_dim
    num_hidden_layers=3,  # layer 0 dense, layers 1-2 MoE
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    partial_rotary_factor=0.5,  # RoPE on 8 of 16 dims
    intermediate_size=96,
    moe_intermediate_size=32,
    num_experts=8,
    num_experts_per_tok=2,
    n_group=4,
    topk_group=2,
    num_shared_experts=1,
    first_k_dense_replace=1,
    bos_token_id=LLADA2_BOS_ID,
    # scales of the random weights (see llada2_state_dict)
    head_gain=10.0,
    eos_gain=2.2,
)
# benchmark size: real vocabulary and special ids, 64 experts in 4 groups
LLADA2_BENCH_SHAPE = dict(
    vocab_size=157184,
    hidden_size=256,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=64,
    partial_rotary_factor=0.5,
    intermediate_size=512,
    moe_intermediate_size=64,
    num_experts=64,
    num_experts_per_tok=8,
    n_group=4,
    topk_group=2,
    num_shared_experts=1,
    first_k_dense_replace=1,
    bos_token_id=LLADA2_REAL_BOS_ID,
    head_gain=40.0,
    eos_gain=1.0,
)


def llada2_special_tokens(shape: dict | None = None) -> dict[str, int]:
    bos = (shape or LLADA2_SHAPE)["bos_token_id"]
    return {token: bos + offset for token, offset in LLADA2_SPECIAL_OFFSETS.items()}


def llada2_ids(shape: dict | None = None) -> dict[str, int]:
    """bos / eos / mask / role_end ids of a LLaDA2 folder written with `shape`."""
    bos = (shape or LLADA2_SHAPE)["bos_token_id"]
    return {"bos": bos, "eos": bos + 1, "mask": bos + 4, "role_end": bos + 5}


LLADA2_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{% set role = 'HUMAN' %}"
    "{% else %}{% set role = message['role'] | upper %}{% endif %}"
    "{{ '<role>' + role + '</role>' + message['content'] + '<|role_end|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<role>ASSISTANT</role>' }}{% endif %}"
)


def llada2_config(shape: dict | None = None) -> dict:
    """config.json of a LLaDA2 folder: the released LLaDA2.0-mini keys, tiny values."""
    s = shape or LLADA2_SHAPE
    return {
        "architectures": ["LLaDA2MoeModelLM"],
        "attention_dropout": 0.0,
        "num_hidden_layers": s["num_hidden_layers"],
        "hidden_size": s["hidden_size"],
        "intermediate_size": s["intermediate_size"],
        "first_k_dense_replace": s["first_k_dense_replace"],
        "hidden_act": "silu",
        "max_position_embeddings": 16384,
        "model_type": "llada2_moe",
        "moe_intermediate_size": s["moe_intermediate_size"],
        "norm_topk_prob": True,
        "num_experts_per_tok": s["num_experts_per_tok"],
        "norm_head": False,
        "num_attention_heads": s["num_attention_heads"],
        "num_experts": s["num_experts"],
        "num_key_value_heads": s["num_key_value_heads"],
        "rope_theta": 600000,
        "rope_scaling": None,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.52.3",
        "use_bias": False,
        "use_rmsnorm": True,
        "rms_norm_eps": 1e-06,
        "head_dim": s["head_dim"],
        "num_shared_experts": s["num_shared_experts"],
        "use_cache": False,
        "use_qkv_bias": False,
        "use_qk_norm": True,
        "embedding_dropout": 0.0,
        "norm_softmax": False,
        "output_dropout": 0.0,
        "vocab_size": s["vocab_size"],
        "rotary_dim": int(s["head_dim"] * s["partial_rotary_factor"]),
        "using_split_qkv_in_self_attention": False,
        "router_dtype": "fp32",
        "moe_router_enable_expert_bias": True,
        "routed_scaling_factor": 2.5,
        "n_group": s["n_group"],
        "topk_group": s["topk_group"],
        "score_function": "sigmoid",
        "initializer_range": 0.02,
        "max_window_layers": 28,
        "output_router_logits": False,
        "pad_token_id": llada2_ids(s)["eos"],
        "partial_rotary_factor": s["partial_rotary_factor"],
        "use_sliding_window": False,
    }


def llada2_tokenizer_config(shape: dict | None = None) -> dict:
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "add_bos_token": False,
        "add_eos_token": False,
        "model_max_length": 16384,
        "chat_template": LLADA2_CHAT_TEMPLATE,
    }


def llada2_state_dict(seed: int = 0, shape: dict | None = None) -> dict[str, torch.Tensor]:
    """Random weights under the published LLaDA2MoeModelLM names.

    The LM head is scaled by `head_gain` so that a masked position's softmax is often sharp (at
    threshold 0.5-0.95 some iterations commit several tokens, others one); the EOS row is
    `eos_gain` times longer so that some answers end within ~64 tokens; the mask token's row and
    the rows of ids no token string stands for are zero, so the model never predicts them.
    expert_bias is non-zero, so that selection (biased) and weighting (unbiased) differ."""
    s = shape or LLADA2_SHAPE
    d, hd = s["hidden_size"], s["head_dim"]
    nh, nkv = s["num_attention_heads"], s["num_key_value_heads"]
    E, V = s["num_experts"], s["vocab_size"]
    ids = llada2_ids(s)
    draw = _Draw(seed)
    state = {"model.word_embeddings.weight": draw.embedding(V, d)}
    for i in range(s["num_hidden_layers"]):
        p = f"model.layers.{i}."
        state[p + "input_layernorm.weight"] = draw.norm(d)
        state[p + "attention.query_key_value.weight"] = torch.cat(
            [draw.matrix(nh * hd, d, gain=2.0), draw.matrix(nkv * hd, d, gain=2.0), draw.matrix(nkv * hd, d)]
        )
        state[p + "attention.query_layernorm.weight"] = draw.norm(hd)
        state[p + "attention.key_layernorm.weight"] = draw.norm(hd)
        state[p + "attention.dense.weight"] = draw.matrix(d, nh * hd)
        state[p + "post_attention_layernorm.weight"] = draw.norm(d)
        if i < s["first_k_dense_replace"]:
            state[p + "mlp.gate_proj.weight"] = draw.matrix(s["intermediate_size"], d)
            state[p + "mlp.up_proj.weight"] = draw.matrix(s["intermediate_size"], d)
            state[p + "mlp.down_proj.weight"] = draw.matrix(d, s["intermediate_size"])
        else:
            state[p + "mlp.gate.weight"] = draw.matrix(E, d, gain=2.0)
            state[p + "mlp.gate.expert_bias"] = 0.3 * torch.randn(E, generator=draw.g)
            m = s["moe_intermediate_size"]
            for e in range(E):
                q = f"{p}mlp.experts.{e}."
                state[q + "gate_proj.weight"] = draw.matrix(m, d, gain=2.0)
                state[q + "up_proj.weight"] = draw.matrix(m, d, gain=2.0)
                state[q + "down_proj.weight"] = draw.matrix(d, m)
            m_shared = m * s["num_shared_experts"]
            state[p + "mlp.shared_experts.gate_proj.weight"] = draw.matrix(m_shared, d)
            state[p + "mlp.shared_experts.up_proj.weight"] = draw.matrix(m_shared, d)
            state[p + "mlp.shared_experts.down_proj.weight"] = draw.matrix(d, m_shared)
    state["model.norm.weight"] = draw.norm(d)
    head = draw.matrix(V, d, gain=s["head_gain"])
    head[ids["eos"]] *= s["eos_gain"]
    # ids no token string stands for (between the bytes and the special tokens, after them) and
    # the mask token: zero rows, never the argmax of a row of sharp logits
    known = set(range(LLADA2_BYTE_OFFSET, LLADA2_BYTE_OFFSET + 256)) | set(llada2_special_tokens(s).values())
    unknown = torch.tensor([i for i in range(V) if i not in known or i == ids["mask"]], dtype=torch.long)
    head[unknown] = 0.0
    state["lm_head.weight"] = head
    return state


def write_llada2_checkpoint(folder: Path, *, shape: dict | None = None, seed: int = 0) -> Path:
    """A LLaDA2-layout folder (`LLaDA2MoeModelLM`, model_type llada2_moe) with random fp32
    weights from `seed`. shape: LLADA2_SHAPE (default, tiny) or LLADA2_BENCH_SHAPE (real
    vocabulary and special ids); `llada2_ids(shape)` gives its bos / eos / mask / role_end ids."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    s = shape or LLADA2_SHAPE
    (folder / "config.json").write_text(json.dumps(llada2_config(s), indent=2))
    _write_tokenizer(folder, build_tokenizer(LLADA2_BYTE_OFFSET, llada2_special_tokens(s)), llada2_tokenizer_config(s))
    _save_weights(folder, llada2_state_dict(seed, s))
    return folder
