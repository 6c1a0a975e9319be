"""The sampler's schedule: blocks, steps per block and tokens per step, as pure functions (the
token choice itself is sampler.py).

Division rules where the reference asserts exact division (documented in README):
- blocks: ceil(gen_length / block_length) blocks of block_length, the last one shorter;
- steps per block: steps // num_blocks, the remainder one each to the first blocks, at least 1;
- tokens per step inside a block: masked count // block steps, the remainder one each to the
  first steps (the reference's rule). Steps that would reveal nothing are not run.
"""

from __future__ import annotations


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
