"""The built-in demo model: a tiny LLaDA trained on Python's documentation (weights shipped
beside this file), the random-weight builder for tests, and a LLaDA-format writer.

Its tokenizer is byte-level (one token per byte, ids 0-255) and carries LLaDA's special tokens
at LLaDA's ids with LLaDA's chat template, so prompts, chat, stop tokens and the mask behave as
with the real checkpoint. The tokenizer produces 262 of LLaDA's 126464 ids, so the shipped file
holds one embedding and one LM-head row for each of those and a single row that every other id
shares (trained tied: training/train_demo.py); loading expands them into a full LLaDA model.
`save_checkpoint` writes any LoadedModel as a folder the real loader reads; tests and users make
checkpoints of any size with it.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

from server.engine.loader import INDEX_FILE, SINGLE_FILE, LoadedModel, ready, resolve_special_ids
from server.engine.model_config import ModelConfig
from server.engine.models.llada import LLaDAModel
from server.engine.text_codec import TextCodec

DEMO_NAME = "llada-demo"
DEMO_WEIGHTS = Path(__file__).with_name("demo_weights.safetensors")
# The vocabulary-sized tensors, stored by row for the ids the tokenizer produces.
VOCAB_TENSORS = ("model.transformer.wte.weight", "model.transformer.ff_out.weight")

# LLaDA's special tokens at LLaDA's ids.
SPECIAL_TOKENS = {
    "<|startoftext|>": 126080,
    "<|endoftext|>": 126081,
    "<|mdm_mask|>": 126336,
    "<|start_header_id|>": 126346,
    "<|end_header_id|>": 126347,
    "<|eot_id|>": 126348,
}

# LLaDA-8B-Instruct's chat template.
CHAT_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
)

TOKENIZER_CONFIG = {
    "tokenizer_class": "PreTrainedTokenizerFast",
    "bos_token": "<|startoftext|>",
    "eos_token": "<|endoftext|>",
    "pad_token": "<|endoftext|>",
    "add_bos_token": False,
    "add_eos_token": False,
    "model_max_length": 4096,
    "chat_template": CHAT_TEMPLATE,
}


def demo_config(**overrides) -> ModelConfig:
    """The demo shape; any field can be overridden to make bigger or smaller checkpoints."""
    base = ModelConfig(
        d_model=64,
        n_layers=2,
        n_heads=4,
        n_kv_heads=4,
        mlp_hidden_size=176,
        vocab_size=126464,
        max_sequence_length=4096,
        mask_token_id=126336,
        eos_token_id=126081,
        pad_token_id=126081,
    )
    return dataclasses.replace(base, **overrides)


def _byte_to_unicode() -> dict[int, str]:
    # GPT-2's printable stand-ins for raw bytes, which byte-level BPE vocabularies are written in.
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = list(printable), 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, chars)}


def build_byte_tokenizer() -> Tokenizer:
    vocab = {char: byte for byte, char in _byte_to_unicode().items()}
    vocab.update(SPECIAL_TOKENS)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(token, special=True) for token in SPECIAL_TOKENS])
    return tokenizer


def write_tokenizer(folder: Path) -> None:
    build_byte_tokenizer().save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(TOKENIZER_CONFIG, indent=2))


def init_weights(model: LLaDAModel, seed: int) -> None:
    """Random weights scaled so the demo's predictions are confident and vary by position, and an
    LM head that only ever favours printable ASCII, newline, EOS and EOT: its answers are
    nonsense, but visible nonsense that stops."""
    generator = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        if param.dim() == 1:  # RMSNorm weights
            param.data.fill_(1.0)
        elif "wte" in name:
            param.data.normal_(0.0, 1.0, generator=generator)
        else:
            gain = 3.0 if ("q_proj" in name or "k_proj" in name) else 2.0
            param.data.normal_(0.0, gain * param.shape[1] ** -0.5, generator=generator)
    head = model.model.transformer.ff_out.weight.data
    emitted = torch.zeros(head.shape[0], dtype=torch.bool)
    emitted[[*range(32, 127), ord("\n"), SPECIAL_TOKENS["<|endoftext|>"], SPECIAL_TOKENS["<|eot_id|>"]]] = True
    head.mul_(2.0).masked_fill_(~emitted[:, None], 0.0)


def tokenizer_ids() -> list[int]:
    """The ids the byte-level tokenizer can produce, in the order of the shipped rows."""
    return [*range(256), *sorted(SPECIAL_TOKENS.values())]


def expand_vocab(rows: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[len(tokenizer_ids()) + 1, d] rows -> [vocab_size, d]: the last row is every other id's."""
    full = rows[-1].expand(vocab_size, -1).clone()
    full[tokenizer_ids()] = rows[:-1]
    return full


def demo_codec() -> TextCodec:
    """The demo tokenizer, loaded the way a checkpoint folder's tokenizer is."""
    with tempfile.TemporaryDirectory() as tmp:
        write_tokenizer(Path(tmp))
        return TextCodec.from_folder(Path(tmp))


def _demo_loaded(model: LLaDAModel, config: ModelConfig) -> LoadedModel:
    codec = demo_codec()
    return LoadedModel(
        name=DEMO_NAME, model=model, codec=codec, config=config, special=resolve_special_ids(config, codec)
    )


def build_demo(
    config: ModelConfig | None = None,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> LoadedModel:
    """The demo architecture with random weights from `seed` (tests, benchmarks, any size)."""
    config = config or demo_config()
    config.validate()
    with torch.device("meta"):
        model = LLaDAModel(config)
    model.to_empty(device="cpu")
    init_weights(model, seed)
    model.to(device=device, dtype=dtype)
    return _demo_loaded(ready(model), config)


def save_demo_weights(state: dict[str, torch.Tensor], config: ModelConfig, path: Path = DEMO_WEIGHTS) -> None:
    """Write a demo model whose vocabulary tensors hold one row per tokenizer id plus the shared row."""
    rows = len(tokenizer_ids()) + 1
    for name in VOCAB_TENSORS:
        if state[name].shape[0] != rows:
            raise ValueError(f"{name} has {state[name].shape[0]} rows; the demo format stores {rows}")
    tensors = {name: t.detach().to("cpu").contiguous() for name, t in state.items()}
    save_file(tensors, str(path), metadata={"config": json.dumps(dataclasses.asdict(config))})


def load_demo(
    dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", path: Path = DEMO_WEIGHTS
) -> LoadedModel:
    """The trained demo model, as a full LLaDA model of LLaDA's vocabulary."""
    with safe_open(str(path), framework="pt", device="cpu") as weights:
        config = ModelConfig(**json.loads(weights.metadata()["config"]))
        state = {name: weights.get_tensor(name) for name in weights.keys()}
    for name in VOCAB_TENSORS:
        state[name] = expand_vocab(state[name], config.vocab_size)
    with torch.device("meta"):
        model = LLaDAModel(config)
    model.load_state_dict({k: v.to(device=device, dtype=dtype) for k, v in state.items()}, assign=True)
    return _demo_loaded(ready(model), config)


def save_checkpoint(
    loaded: LoadedModel, folder: str | Path, max_shard_bytes: int | None = None, dtype: torch.dtype | None = None
) -> Path:
    """Write a LLaDA-format folder: config.json, tokenizer files and safetensors weights, sharded
    with an index when the weights exceed max_shard_bytes."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(loaded.config.to_json_dict(), indent=2))
    write_tokenizer(folder)
    tied = set(loaded.model.tied_parameters)
    state = {
        name: t.detach().to("cpu", dtype or t.dtype).contiguous()
        for name, t in loaded.model.state_dict().items()
        if name not in tied
    }
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if max_shard_bytes and shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], str(folder / SINGLE_FILE), metadata={"format": "pt"})
        return folder
    weight_map = {}
    for number, shard in enumerate(shards, 1):
        filename = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(folder / filename), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, filename))
    index = {
        "metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())},
        "weight_map": weight_map,
    }
    (folder / INDEX_FILE).write_text(json.dumps(index, indent=2))
    return folder
