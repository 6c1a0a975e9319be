"""Per-request settings as the engine takes them (validated at the HTTP layer). Torch-free: the API
builds these without importing the engine's tensor code."""

from __future__ import annotations

from dataclasses import dataclass

# The authors' defaults of block-diffusion models (LLaDA2's own `generate`, FAMILY.md); the
# other fields' defaults are SamplingParams'.
BLOCK_DIFFUSION_DEFAULTS = {"steps": 32, "block_length": 32, "threshold": 0.95, "max_post_steps": 16}


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
    # Fast decoding (LLADA.md): a KV cache, and a reveal count other than the fixed schedule.
    cache: str = "none"  # none | prefix | dual
    threshold: float | None = None  # reveal every candidate this confident (and the best one)
    factor: float | None = None  # Fast-dLLM's factor rule; not with threshold
    early_stop: bool = False  # end the answer after a finished block that holds EOS or EOT
    # Block diffusion (LLaDA2, FAMILY.md): 2.1's token editing, and the draw at temperature > 0.
    editing_threshold: float | None = None  # None: 2.0's rules, no editing
    max_post_steps: int = 16  # editing iterations after a block's last mask is filled
    top_k: int | None = None
    top_p: float | None = None

    @property
    def rows(self) -> int:
        """Rows this job puts in each forward: CFG runs an unconditional copy beside it."""
        return 2 if self.cfg_scale > 0 else 1

    @property
    def approximate(self) -> bool:
        """The answer may differ from the exact sampler's (early stop alone keeps the text exact)."""
        return self.cache != "none" or self.threshold is not None or self.factor is not None


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
