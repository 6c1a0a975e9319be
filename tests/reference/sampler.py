"""Reference LLaDA sampler: one sequence, full logits every step, written from LLADA.md.

Follows LLADA.md "The reference sampler" plus the server's documented rules where the
published sampler is silent or requires exact divisions:

- num_blocks = ceil(gen_length / block_length) (block_length > gen_length is clamped);
  block b covers answer positions [b*block_length, min((b+1)*block_length, gen_length)).
- steps per block: steps // num_blocks, the remainder one each to the first blocks, >= 1.
- per step within a block: (masked count at block start) // block_steps, remainder one
  each to the first steps. k == 0 steps are skipped (no forward, no random draws).
- constraints {answer_pos: token} are written into the canvas before the first step.
- CFG: unconditional copy masks every prompt position; un + (s+1)*(cond-un) in float32.
- randomness: one CPU torch.Generator seeded with `seed`; per step first the Gumbel
  uniforms [n_cand, V] float64 (temperature > 0 only), then the random-remasking
  uniforms [n_cand] float64 (remasking == "random" only).
- candidates: still-masked positions of the current block in increasing order; the k most
  confident are revealed, ties toward the lower position.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

LogitsFn = Callable[[Tensor], Tensor]


def block_plan(gen_length: int, block_length: int | None, steps: int) -> list[tuple[int, int, int]]:
    """[(start, end, block_steps)] over answer positions."""
    if block_length is None or block_length <= 0 or block_length > gen_length:
        block_length = gen_length
    num_blocks = -(-gen_length // block_length)
    base, rem = divmod(steps, num_blocks)
    plan = []
    for b in range(num_blocks):
        start = b * block_length
        end = min((b + 1) * block_length, gen_length)
        block_steps = max(1, base + (1 if b < rem else 0))
        plan.append((start, end, block_steps))
    return plan


def transfer_counts(n_masked: int, block_steps: int) -> list[int]:
    base, rem = divmod(n_masked, block_steps)
    return [base + (1 if i < rem else 0) for i in range(block_steps)]


def initial_canvas(prompt_ids: list[int], gen_length: int, constraints: dict[int, int] | None, mask_id: int) -> Tensor:
    """[1, prompt + gen_length]: the prompt, then masks, with the constraints written in."""
    prompt_len = len(prompt_ids)
    x = torch.full((1, prompt_len + gen_length), mask_id, dtype=torch.long)
    x[0, :prompt_len] = torch.tensor(prompt_ids, dtype=torch.long)
    for pos, tok in (constraints or {}).items():
        x[0, prompt_len + pos] = tok
    return x


def guided_logits(cond: Tensor, un: Tensor, cfg_scale: float) -> Tensor:
    """Classifier-free guidance: un + (s+1)*(cond-un), in float32."""
    return un + (cfg_scale + 1) * (cond - un)


def choose_tokens(
    logits: Tensor,
    g: torch.Generator,
    *,
    temperature: float,
    remasking: str,
    logits_eos_inf: bool,
    confidence_eos_eot_inf: bool,
    eos_id: int,
    eot_id: int,
) -> tuple[Tensor, Tensor]:
    """One step's token choice x0 [n_cand] and confidence [n_cand] (float64) for the candidates'
    logits [n_cand, V], taking the step's uniforms from g (Gumbel first, then random remasking)."""
    logits = logits.float().clone()
    if logits_eos_inf:
        logits[:, eos_id] = float("-inf")

    if temperature > 0:
        u = torch.rand(logits.shape, generator=g, dtype=torch.float64)
        scores = logits.double().exp() / (-torch.log(u)) ** temperature
        x0 = scores.argmax(dim=-1)
    else:
        x0 = logits.argmax(dim=-1)

    if remasking == "random":
        confidence = torch.rand(logits.shape[0], generator=g, dtype=torch.float64)
    else:
        probs = torch.softmax(logits, dim=-1)
        confidence = probs.gather(-1, x0[:, None]).squeeze(-1).double()

    if confidence_eos_eot_inf:
        bad = (x0 == eos_id) | (x0 == eot_id)
        confidence = confidence.masked_fill(bad, float("-inf"))
    return x0, confidence


def most_confident_first(confidence: Tensor) -> list[int]:
    """Candidate indices by confidence, highest first; ties toward the lower position."""
    return torch.sort(confidence, descending=True, stable=True).indices.tolist()


@torch.no_grad()
def reference_generate(
    logits_fn: LogitsFn,
    prompt_ids: list[int],
    *,
    gen_length: int,
    steps: int,
    block_length: int | None,
    temperature: float = 0.0,
    cfg_scale: float = 0.0,
    remasking: str = "low_confidence",
    logits_eos_inf: bool = False,
    confidence_eos_eot_inf: bool = False,
    constraints: dict[int, int] | None = None,
    seed: int = 0,
    mask_id: int,
    eos_id: int,
    eot_id: int,
) -> list[int]:
    if remasking not in ("low_confidence", "random"):
        raise ValueError(f"unknown remasking {remasking!r}")
    if gen_length <= 0:
        return []
    prompt_len = len(prompt_ids)
    x = initial_canvas(prompt_ids, gen_length, constraints, mask_id)
    g = torch.Generator(device="cpu").manual_seed(seed)

    for start, end, block_steps in block_plan(gen_length, block_length, steps):
        lo, hi = prompt_len + start, prompt_len + end
        n_masked = int((x[0, lo:hi] == mask_id).sum())
        if n_masked == 0:
            continue
        for k in transfer_counts(n_masked, block_steps):
            if k == 0:
                continue
            # candidates: still-masked positions of this block, increasing order
            cand = (torch.nonzero(x[0, lo:hi] == mask_id).flatten() + lo).tolist()

            cond = logits_fn(x.clone())[0].float()  # [L, V]
            if cfg_scale > 0:
                un_x = x.clone()
                un_x[0, :prompt_len] = mask_id
                logits = guided_logits(cond, logits_fn(un_x)[0].float(), cfg_scale)
            else:
                logits = cond
            x0, confidence = choose_tokens(
                logits[cand],
                g,
                temperature=temperature,
                remasking=remasking,
                logits_eos_inf=logits_eos_inf,
                confidence_eos_eot_inf=confidence_eos_eot_inf,
                eos_id=eos_id,
                eot_id=eot_id,
            )
            for idx in most_confident_first(confidence)[:k]:
                x[0, cand[idx]] = int(x0[idx])

    return x[0, prompt_len:].tolist()


def sampler_keywords(params, special) -> dict:
    """reference_generate's keywords for an engine SamplingParams and a model's SpecialIds."""
    return dict(
        gen_length=params.gen_length,
        steps=params.steps,
        block_length=params.block_length,
        temperature=params.temperature,
        cfg_scale=params.cfg_scale,
        remasking=params.remasking,
        logits_eos_inf=params.logits_eos_inf,
        confidence_eos_eot_inf=params.confidence_eos_eot_inf,
        constraints=dict(params.constraints),
        seed=params.seed or 0,
        mask_id=special.mask,
        eos_id=special.eos,
        eot_id=special.eot,
    )


def reference_generate_for(logits_fn, prompt_ids: list[int], params, special) -> list[int]:
    """reference_generate with the settings of an engine SamplingParams and a model's SpecialIds
    (the adapter the fidelity tests and the engine benchmark share)."""
    return reference_generate(logits_fn, prompt_ids, **sampler_keywords(params, special))
