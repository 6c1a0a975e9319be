"""Per-request settings as the engine takes them (validated at the HTTP layer). Torch-free: the API
builds these without importing the engine's tensor code."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SamplingParams:
    """Defaults are those of LLaDA's README (LLADA.md)."""

    gen_length: int = 128
    steps: int = 128
    block_length: int = 32
    temperature: float = 0.0
    cfg_scale: float = 0.0
    remasking: str = "low_confidence"
    logits_eos_inf: bool = False
    confidence_eos_eot_inf: bool = False
    seed: int | None = None
    # (answer position, token id) pairs written before the first step and never remasked.
    constraints: tuple[tuple[int, int], ...] = ()

    @property
    def rows(self) -> int:
        """Rows this job puts in each forward: CFG runs an unconditional copy beside it."""
        return 2 if self.cfg_scale > 0 else 1


@dataclass(frozen=True)
class ScoreParams:
    mc_num: int = 128
    batch_size: int = 32
    cfg_scale: float = 0.0
    greedy: bool = False
    seed: int | None = None

    @property
    def rows_per_unit(self) -> int:
        return 2 if self.cfg_scale > 0 else 1
