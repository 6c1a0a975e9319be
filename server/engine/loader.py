"""Loading a LLaDA checkpoint folder: config, tokenizer and (sharded) safetensors weights.

Weights go straight from each memory-mapped shard to the target device and dtype, one tensor at
a time, into a model whose parameters start on the meta device: the weights are never held
twice. Nothing in the folder is executed; `auto_map` and `modeling_llada.py` are ignored. The registry
(models/) picks the architecture from config.json; on CPU the linears then take oneDNN's kernels
(cpu_kernels.py).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from server.engine.cpu_kernels import use_onednn_linears
from server.engine.devices import resolve_device, resolve_dtype
from server.engine.errors import CheckpointError, read_json_object
from server.engine.model_config import ModelConfig
from server.engine.model_info import ModelInfo
from server.engine.models import architecture_for, architecture_of, build_model
from server.engine.models.moe import use_expert_kernels
from server.engine.text_codec import BOS_TOKEN, MASK_TOKENS, SpecialIds, TextCodec

log = logging.getLogger("llada.engine")

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


@dataclass
class LoadedModel:
    name: str
    model: torch.nn.Module  # one of models/: forward(PackedBatch), logits(hidden)
    codec: TextCodec
    config: ModelConfig
    special: SpecialIds

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    @property
    def info(self) -> ModelInfo:
        return ModelInfo(
            name=self.name,
            family=architecture_of(self.config).name,
            block_diffusion=architecture_of(self.config).block_diffusion,
            vocab_size=self.config.vocab_size,
            max_sequence_length=self.config.max_sequence_length,
            special=self.special,
            codec=self.codec,
            device=str(self.device),
            dtype=str(self.dtype).removeprefix("torch."),
        )


def resolve_special_ids(config, codec: TextCodec) -> SpecialIds:
    """Special ids come from the checkpoint: config.json's where it gives them, else the
    tokenizer's; where both give one, they must agree. Nothing is assumed from LLaDA-8B's ids."""
    max_id = codec.max_token_id
    if max_id >= config.vocab_size:
        raise CheckpointError(
            f"the tokenizer has token id {max_id} but config.json's vocab_size is {config.vocab_size}"
        )
    mask_token, mask_in_tokenizer = codec.mask_token()
    mask = config.mask_token_id if config.mask_token_id is not None else mask_in_tokenizer
    if mask is None:
        raise CheckpointError(
            f"neither config.json (mask_token_id) nor the tokenizer (mask_token, or one of {MASK_TOKENS}) "
            "names the mask token: a diffusion model needs it"
        )
    if mask_in_tokenizer is not None and mask_in_tokenizer != mask:
        raise CheckpointError(
            f"tokenizer has {mask_token} at id {mask_in_tokenizer} but config.json says mask_token_id {mask}"
        )
    eos_in_tokenizer = codec.tokenizer.eos_token_id
    eos = config.eos_token_id if config.eos_token_id is not None else eos_in_tokenizer
    if eos is None:
        raise CheckpointError("neither config.json (eos_token_id) nor the tokenizer (eos_token) names EOS")
    if eos_in_tokenizer is not None and eos_in_tokenizer != eos:
        raise CheckpointError(
            f"tokenizer's eos_token has id {eos_in_tokenizer} but config.json says eos_token_id {eos}"
        )
    for name, value in (("mask_token_id", mask), ("eos_token_id", eos)):
        if not 0 <= value < config.vocab_size:
            raise CheckpointError(f"{name} {value} is outside vocab_size {config.vocab_size}")
    bos = codec.tokenizer.bos_token_id
    return SpecialIds(
        mask=mask, eos=eos, eot=codec.end_of_turn(), bos=bos if bos is not None else codec.token_id(BOS_TOKEN)
    )


def ready(model: torch.nn.Module) -> torch.nn.Module:
    """The loaded model as the engine runs it: inference only, its device's kernels swapped in."""
    return use_expert_kernels(use_onednn_linears(model.eval().requires_grad_(False)))


def read_config_json(folder: Path) -> dict:
    path = folder / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{folder} has no config.json: is it a LLaDA checkpoint folder?")
    return read_json_object(path)


def expected_shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    """The tensors a checkpoint must hold: the model's state dict less the tied aliases."""
    tied = set(model.tied_parameters)
    return {name: tuple(t.shape) for name, t in model.state_dict().items() if name not in tied}


def shard_files(folder: Path) -> list[Path]:
    index = folder / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as exc:
            raise CheckpointError(f"{index} is not a safetensors index (needs a weight_map): {exc}") from exc
        files = [folder / name for name in dict.fromkeys(weight_map.values())]
    elif (folder / SINGLE_FILE).is_file():
        files = [folder / SINGLE_FILE]
    else:
        raise CheckpointError(f"{folder} has neither {SINGLE_FILE} nor {INDEX_FILE}: no weights to load")
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise CheckpointError(f"{index} lists shards that are not in {folder}: {', '.join(missing)}")
    return files


def read_shard(
    path: Path, shapes: dict[str, tuple[int, ...]], device: torch.device, dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    with safe_open(str(path), framework="pt", device="cpu") as shard:
        for name in shard.keys():
            if name not in shapes:
                raise CheckpointError(f"{path.name}: unexpected tensor {name!r}, not part of this architecture")
            shape = tuple(shard.get_slice(name).get_shape())
            if shape != shapes[name]:
                raise CheckpointError(
                    f"{path.name}: tensor {name!r} has shape {list(shape)}, config.json implies {list(shapes[name])}"
                )
            tensors[name] = shard.get_tensor(name).to(device=device, dtype=dtype)
    return tensors


def load_weights(model: torch.nn.Module, files: list[Path], device: torch.device, dtype: torch.dtype) -> None:
    shapes = expected_shapes(model)
    loaded: set[str] = set()
    total_bytes = sum(f.stat().st_size for f in files)
    done_bytes, start = 0, time.monotonic()
    for number, path in enumerate(files, 1):
        try:
            tensors = read_shard(path, shapes, device, dtype)
        except SafetensorError as exc:
            raise CheckpointError(f"{path.name} is not a readable safetensors file (truncated?): {exc}") from exc
        model.load_state_dict(tensors, strict=False, assign=True)
        loaded.update(tensors)
        del tensors
        done_bytes += path.stat().st_size
        log.info(
            "loaded shard %d/%d %s (%.0f%% of %.2f GB, %.1fs)",
            number,
            len(files),
            path.name,
            100 * done_bytes / total_bytes,
            total_bytes / 1e9,
            time.monotonic() - start,
        )
    missing = sorted(set(shapes) - loaded)
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise CheckpointError(f"the checkpoint lacks tensors: {shown}")
    model.tie_weights()


def load_checkpoint(path: str | Path, device: str = "auto", dtype: str = "auto") -> LoadedModel:
    folder = Path(path)
    if not folder.is_dir():
        raise CheckpointError(f"model folder {folder} does not exist or is not a folder")
    raw = read_config_json(folder)
    config = architecture_for(raw, folder / "config.json").config_class.from_json(raw, folder / "config.json")
    codec = TextCodec.from_folder(folder)
    special = resolve_special_ids(config, codec)
    files = shard_files(folder)
    target_device = resolve_device(device)
    target_dtype = resolve_dtype(dtype, target_device)
    with torch.device("meta"):
        model = build_model(config)
    load_weights(model, files, target_device, target_dtype)
    return LoadedModel(name=folder.resolve().name, model=ready(model), codec=codec, config=config, special=special)
