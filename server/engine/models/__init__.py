"""The family's architectures behind one interface, and the registry that picks one from a
checkpoint's config.json (`architectures` first, then `model_type`: FAMILY.md).

Every model is a plain-PyTorch nn.Module with `forward(batch: PackedBatch) -> hidden states of
the kept tokens`, `logits(hidden) -> float32 logits`, `config`, `device` and `dtype`; its module
names are the checkpoint's tensor names, so a state dict loads as it is stored.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from torch import nn

from server.engine.errors import CheckpointError
from server.engine.model_config import ModelConfig
from server.engine.models.llada import LLaDAModel
from server.engine.models.llada2 import LLaDA2Config, LLaDA2Model
from server.engine.models.llada_moe import LLaDAMoEConfig, LLaDAMoEModel


@dataclass(frozen=True)
class Architecture:
    name: str  # as config.json's `architectures` names it
    model_types: tuple[str, ...]
    config_class: type  # with from_json(raw config.json dict, path)
    model_class: type[nn.Module]
    block_diffusion: bool = False  # decoded block by block (block_diffusion.py), else on a full canvas


ARCHITECTURES = (
    Architecture("LLaDAModelLM", ("llada",), ModelConfig, LLaDAModel),
    # its copies in the wild say model_type "llada" or "lladamoe" (or "llada_moe"): named by
    # `architectures`, it is never taken for LLaDA-8B's by model_type alone
    Architecture("LLaDAMoEModelLM", ("llada", "lladamoe", "llada_moe"), LLaDAMoEConfig, LLaDAMoEModel),
    Architecture("LLaDA2MoeModelLM", ("llada2_moe",), LLaDA2Config, LLaDA2Model, block_diffusion=True),
)


def architecture_for(raw: dict, path: Path) -> Architecture:
    """`architectures` picks; `model_type`, when given, must be one that architecture is known by
    (copies in the wild disagree on it, so it never picks alone when `architectures` is given)."""
    named = [a for a in raw.get("architectures") or [] if isinstance(a, str)]
    model_type = raw.get("model_type")
    for arch in ARCHITECTURES:  # in order: model_type "llada" alone means LLaDA-8B's layout
        if (arch.name in named or not named) and (model_type in arch.model_types or (named and model_type is None)):
            return arch
    known = ", ".join(f"{a.name} (model_type {'/'.join(a.model_types)})" for a in ARCHITECTURES)
    what = f"architectures {named} with model_type {model_type!r}" if named else f"model_type {model_type!r}"
    raise CheckpointError(f"{path}: {what} is not supported; this server loads {known}")


def architecture_of(config) -> Architecture:
    return next(arch for arch in ARCHITECTURES if type(config) is arch.config_class)


def build_model(config) -> nn.Module:
    """The architecture's module for a parsed config (on the current default device)."""
    return architecture_of(config).model_class(config)
