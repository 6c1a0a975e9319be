"""The sampler's math as pure functions over tensors and integers.

Division rules where the reference asserts exact division (documented in README):
- blocks: ceil(gen_length / block_length) blocks of block_length, the last one shorter;
- steps per block: steps // num_blocks, the remainder one each to the first blocks, at least 1;
- tokens per step inside a block: masked count // block steps, the remainder one each to the
  first steps (the reference's rule). Steps that would reveal nothing are not run.
"""

from __future__ import annotations

import torch


def block_spans(gen_length: int, block_length: int) -> list[tuple[int, int]]:
    """[start, end) of each block, in answer positions."""
    block_length = min(block_length, gen_length)
    return [(start, min(start + block_length, gen_length)) for start in range(0, gen_length, block_length)]


def spread(total: int, parts: int) -> list[int]:
    """total split into parts as evenly as possible, the remainder one each to the first parts."""
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


def steps_per_block(steps: int, num_blocks: int) -> list[int]:
    return [max(1, n) for n in spread(steps, num_blocks)]


def transfer_schedule(masked: int, steps: int) -> list[int]:
    """How many tokens each step of a block reveals; steps that reveal none are dropped."""
    return [k for k in spread(masked, steps) if k > 0]


def cfg_combine(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    return uncond + (scale + 1.0) * (cond - uncond)


def choose_tokens(logits: torch.Tensor, temperature: float, generator: torch.Generator | None) -> torch.Tensor:
    """x0 per position: argmax, or argmax of exp(logits) / (-log u)^temperature in float64.

    In place on fresh [positions, vocab] float64 buffers: this is the step's largest allocation."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    noise = torch.rand(logits.shape, generator=generator, dtype=torch.float64, device=logits.device)
    noise = noise.log_().neg_()
    if temperature != 1:  # x ** 1 is x exactly; skipping the pow saves a third of the time
        noise = noise.pow_(temperature)
    return logits.double().exp_().div_(noise).argmax(dim=-1)


def token_probabilities(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    return torch.softmax(logits.float(), dim=-1).gather(-1, tokens[:, None]).squeeze(-1)


def ranking_confidence(
    probabilities: torch.Tensor,
    tokens: torch.Tensor,
    remasking: str,
    generator: torch.Generator | None,
    excluded_tokens: tuple[int, ...] = (),
) -> torch.Tensor:
    """What positions compete on: p(x0) for low_confidence, uniform noise for random; positions
    whose x0 is an excluded token (confidence_eos_eot_inf) rank last."""
    if remasking == "random":
        confidence = torch.rand(tokens.shape, generator=generator, dtype=torch.float64, device=tokens.device)
    else:
        confidence = probabilities.double()
    for token in excluded_tokens:
        confidence = confidence.masked_fill(tokens == token, float("-inf"))
    return confidence


def select_top(confidence: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k most confident entries; ties go to the lower index."""
    return torch.sort(confidence, descending=True, stable=True).indices[:k]
