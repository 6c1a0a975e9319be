"""What the HTTP layer may know of the served model: its name, vocabulary, special ids and
tokenizer. Torch-free; the nn.Module stays inside the engine."""

from __future__ import annotations

from dataclasses import dataclass

from server.engine.text_codec import SpecialIds, TextCodec


@dataclass(frozen=True)
class ModelInfo:
    name: str
    family: str  # the architecture, as config.json's `architectures` names it
    block_diffusion: bool  # decoded block by block with an exact cache (LLaDA2), not on a full canvas
    vocab_size: int
    max_sequence_length: int
    special: SpecialIds
    codec: TextCodec
    device: str
    dtype: str
