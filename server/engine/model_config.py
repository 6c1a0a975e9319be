"""LLaDA's shape and special ids, read from a checkpoint's config.json: LLaDA-8B, LLaDA 1.5 and
iLLaDA share the architecture and the config keys of LLaDA's published `modeling_llada.py`."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from server.engine.errors import CheckpointError, refuse_unsupported

# Keys of LLaDA's config space whose other values this server does not implement: key -> the
# values it does (a key left out of config.json takes LLaDA's default, the first value).
SUPPORTED_VALUES = {
    "include_bias": (False,),
    "bias_for_layer_norm": (False, None),
    "layer_norm_type": ("rms",),
    "activation_type": ("silu", "swiglu"),
    "block_type": ("llama",),
    "rope": (True,),
    "alibi": (False,),
    "attention_layer_norm": (False,),
    "clip_qkv": (None,),
    "scale_logits": (False,),
    "multi_query_attention": (None, False),
    "rope_full_precision": (True,),
}


@dataclass(frozen=True)
class ModelConfig:
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    mlp_hidden_size: int
    vocab_size: int
    rope_theta: float = 500000.0
    rms_norm_eps: float = 1e-5
    max_sequence_length: int = 4096
    weight_tying: bool = False  # the LM head is the embedding matrix (iLLaDA)
    # None: the tokenizer names it (loader.resolve_special_ids)
    mask_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def validate(self) -> None:
        for name in ("d_model", "n_layers", "n_heads", "n_kv_heads", "mlp_hidden_size", "vocab_size"):
            if getattr(self, name) < 1:
                raise CheckpointError(f"config.json: {name} must be a positive integer, got {getattr(self, name)}")
        if self.d_model % self.n_heads:
            raise CheckpointError(f"config.json: d_model {self.d_model} is not divisible by n_heads {self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise CheckpointError(
                f"config.json: n_heads {self.n_heads} is not a multiple of n_kv_heads {self.n_kv_heads}"
            )
        if self.head_dim % 2:
            raise CheckpointError(f"config.json: head dim {self.head_dim} must be even for rotary embeddings")

    def to_json_dict(self) -> dict:
        """The config.json a real LLaDA checkpoint carries, for this shape."""
        ids = {
            k: getattr(self, k)
            for k in ("mask_token_id", "eos_token_id", "pad_token_id")
            if getattr(self, k) is not None
        }
        return {
            "architectures": ["LLaDAModelLM"],
            "model_type": "llada",
            "d_model": self.d_model,
            "n_layers": self.n_layers,
            "n_heads": self.n_heads,
            "n_kv_heads": self.n_kv_heads,
            "mlp_hidden_size": self.mlp_hidden_size,
            "mlp_ratio": self.mlp_hidden_size // self.d_model,
            "vocab_size": self.vocab_size,
            "embedding_size": self.vocab_size,
            "rope_theta": self.rope_theta,
            "rms_norm_eps": self.rms_norm_eps,
            "max_sequence_length": self.max_sequence_length,
            **ids,
            "weight_tying": self.weight_tying,
            "include_bias": False,
            "layer_norm_type": "rms",
            "activation_type": "silu",
            "block_type": "llama",
            "rope": True,
            "torch_dtype": "bfloat16",
        }

    @classmethod
    def from_json(cls, raw: dict, path: Path) -> ModelConfig:
        """The shape from a LLaDA config.json (already parsed; `path` names it in errors)."""
        refuse_unsupported(raw, SUPPORTED_VALUES, path)
        required = ("d_model", "n_layers", "n_heads", "vocab_size")
        missing = [key for key in required if key not in raw]
        if missing:
            raise CheckpointError(f"{path} lacks required fields: {', '.join(missing)}")
        try:
            n_heads = int(raw["n_heads"])
            d_model = int(raw["d_model"])
            fields = {f.name: f.type for f in dataclasses.fields(cls)}
            kinds = {"float": float, "bool": bool}
            values = {k: kinds.get(fields[k], int)(raw[k]) for k in fields if raw.get(k) is not None}
            values.update(
                d_model=d_model,
                n_layers=int(raw["n_layers"]),
                n_heads=n_heads,
                n_kv_heads=int(raw.get("n_kv_heads") or n_heads),
                mlp_hidden_size=int(raw.get("mlp_hidden_size") or int(raw.get("mlp_ratio", 4)) * d_model),
                vocab_size=int(raw.get("embedding_size") or raw["vocab_size"]),
            )
        except (TypeError, ValueError) as exc:
            raise CheckpointError(f"{path}: a numeric field has a non-numeric value: {exc}") from exc
        config = cls(**values)
        config.validate()
        return config
