"""Reference of the fast decoding algorithms: one sequence, plain loops, written from LLADA.md
("Fast decoding") and the published Fast-dLLM `llada/generate.py`.

Everything sampler.py documents holds here too (block plan, step spreading, candidates, constraints,
CFG copy with the prompt masked, token choice and confidence, the RNG contract: per step the Gumbel
uniforms [n_cand, V] float64, then the random-remasking uniforms [n_cand] float64, from one CPU
generator seeded with `seed`). On top of it:

- cache "none": every step is a full forward of the whole sequence, as in sampler.py.
  "prefix" / "dual": a block's first step is a full forward of the whole sequence whose logits
  drive that step; it also fills the cache. prefix keeps the keys/values of the positions before
  the block, and each later step of the block runs the positions block start .. end of sequence.
  dual keeps every position, and each later step runs the block's positions only, whose new
  keys/values replace the block's entries (the suffix stays as the block's first step left it).
  RoPE at absolute positions; the cache is rebuilt at every block start.
- CFG: the unconditional row has its own cache and its own forwards; the two rows' logits are
  combined (float32) before the step's draws, so CFG adds no draws.
- reveal count: fixed schedule (sampler.py), or `threshold`, or `factor` (rules below). With a
  threshold or factor a block ends when it holds no mask; every step reveals at least one token.
  Confidences (float64 holding the float32 softmax, or the float64 uniforms) are compared with
  t and 1 - f/(k+1) in float64.
- early_stop: checked after every block once it holds no mask (also a block that needed no step
  because constraints filled it): if the answer up to that block's end holds EOS or EOT, every
  later answer position becomes EOS, constraints there included, and decoding ends.
- nfe: the steps that ran (a full or cached forward of the sequence, and of its CFG copy in the
  same step, counted once). A block that holds no mask at its start runs no step.
"""

from __future__ import annotations

import torch
from torch import Tensor

from tests.reference.model import KVCache, forward_at, full_forward
from tests.reference.sampler import (
    block_plan,
    choose_tokens,
    guided_logits,
    initial_canvas,
    most_confident_first,
    sampler_keywords,
    transfer_counts,
)

CACHE_MODES = ("none", "prefix", "dual")


def threshold_count(ranked: list[float], threshold: float) -> int:
    """Reveal every confidence >= threshold, and always the most confident one."""
    return max(1, sum(1 for c in ranked if c >= threshold))


def factor_count(ranked: list[float], factor: float) -> int:
    """Fast-dLLM's factor rule on the confidences sorted descending, c1 >= c2 >= ... >= cM.

    Rank k passes when ck >= 1 - factor/(k+1); rank 1's bound is -1, so only a -inf confidence
    fails there. Reveal the ranks before the first failing one; if rank 1 fails, reveal one; if
    the first failing rank is M (or none fails), reveal all M (the published quirk).
    """
    m = len(ranked)
    for k in range(1, m + 1):
        bound = -1.0 if k == 1 else 1 - factor / (k + 1)
        if ranked[k - 1] < bound:
            if k == 1:
                return 1
            if k == m:
                return m
            return k - 1
    return m


def _rows(x: Tensor, prompt_len: int, cfg_scale: float, mask_id: int) -> list[Tensor]:
    """The sequence and, with CFG, its unconditional copy (every prompt position masked)."""
    if cfg_scale <= 0:
        return [x.clone()]
    un_x = x.clone()
    un_x[0, :prompt_len] = mask_id
    return [x.clone(), un_x]


@torch.no_grad()
def reference_fast_generate(
    state_dict: dict[str, Tensor],
    cfg: dict,
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
    cache: str = "none",
    threshold: float | None = None,
    factor: float | None = None,
    early_stop: bool = False,
) -> tuple[list[int], int]:
    """(answer token ids, nfe) of one sequence under the fast decoding rules of this module."""
    if remasking not in ("low_confidence", "random"):
        raise ValueError(f"unknown remasking {remasking!r}")
    if cache not in CACHE_MODES:
        raise ValueError(f"unknown cache {cache!r}; use one of {CACHE_MODES}")
    if threshold is not None and factor is not None:
        raise ValueError("give threshold or factor, not both")
    if threshold is not None and not 0 < threshold <= 1:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    if factor is not None and not factor > 0:
        raise ValueError(f"factor must be > 0, got {factor}")
    if gen_length <= 0:
        return [], 0
    prompt_len = len(prompt_ids)
    seq_len = prompt_len + gen_length
    x = initial_canvas(prompt_ids, gen_length, constraints, mask_id)
    g = torch.Generator(device="cpu").manual_seed(seed)
    nfe = 0

    for start, end, block_steps in block_plan(gen_length, block_length, steps):
        lo, hi = prompt_len + start, prompt_len + end
        schedule = transfer_counts(int((x[0, lo:hi] == mask_id).sum()), block_steps)
        caches: list[KVCache] = []  # one per row, filled by the block's first step
        step = 0
        while bool((x[0, lo:hi] == mask_id).any()):
            # candidates: still-masked positions of this block, increasing order
            cand = (torch.nonzero(x[0, lo:hi] == mask_id).flatten() + lo).tolist()
            rows = _rows(x, prompt_len, cfg_scale, mask_id)

            if cache == "none" or step == 0:
                row_logits, caches = [], []
                for row in rows:
                    logits, kv = full_forward(state_dict, cfg, row)
                    row_logits.append(logits[0, cand])
                    caches.append(kv.kept_before(lo) if cache == "prefix" else kv)
            else:
                q_lo, q_hi = lo, (seq_len if cache == "prefix" else hi)
                positions = torch.arange(q_lo, q_hi)
                at = [c - q_lo for c in cand]
                row_logits = [
                    forward_at(state_dict, cfg, row[0, q_lo:q_hi], positions, kv)[at] for row, kv in zip(rows, caches)
                ]
            logits = row_logits[0] if cfg_scale <= 0 else guided_logits(row_logits[0], row_logits[1], cfg_scale)

            x0, confidence = choose_tokens(
                logits,
                g,
                temperature=temperature,
                remasking=remasking,
                logits_eos_inf=logits_eos_inf,
                confidence_eos_eot_inf=confidence_eos_eot_inf,
                eos_id=eos_id,
                eot_id=eot_id,
            )
            order = most_confident_first(confidence)
            ranked = [float(confidence[i]) for i in order]
            if threshold is not None:
                n = threshold_count(ranked, threshold)
            elif factor is not None:
                n = factor_count(ranked, factor)
            else:
                # the schedule's k > 0 steps reveal exactly the block's masks, so the block ends
                # with its last k > 0 step and the skipped k == 0 steps never come up here
                n = schedule[step]
            for idx in order[:n]:
                x[0, cand[idx]] = int(x0[idx])
            nfe += 1
            step += 1

        answer_so_far = x[0, prompt_len:hi]
        if early_stop and bool(((answer_so_far == eos_id) | (answer_so_far == eot_id)).any()):
            x[0, hi:] = eos_id
            break

    return x[0, prompt_len:].tolist(), nfe


def reference_fast_generate_for(
    state_dict: dict[str, Tensor], cfg: dict, prompt_ids: list[int], params, special
) -> tuple[list[int], int]:
    """reference_fast_generate with the settings of an engine SamplingParams (fast decoding fields
    included) and a model's SpecialIds."""
    fast = dict(cache=params.cache, threshold=params.threshold, factor=params.factor, early_stop=params.early_stop)
    return reference_fast_generate(state_dict, cfg, prompt_ids, **sampler_keywords(params, special), **fast)
