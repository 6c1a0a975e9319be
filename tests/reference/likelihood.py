"""Reference Monte-Carlo log-likelihood (ELBO) estimator and greedy check, from LLADA.md.

Mirrors the authors' `get_log_likelihood` / `suffix_greedy_prediction` with every random
draw taken from the passed torch.Generator (never the global RNG).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

LogitsFn = Callable[[Tensor], Tensor]


def _logits_rows(logits_fn: LogitsFn, rows: Tensor, prompt_len: int, cfg_scale: float, mask_id: int) -> Tensor:
    """Full logits for each row (one sequence per call), with CFG when cfg_scale > 0."""
    out = []
    for r in range(rows.shape[0]):
        row = rows[r : r + 1]
        cond = logits_fn(row.clone())[0].float()
        if cfg_scale > 0:
            un_row = row.clone()
            un_row[0, :prompt_len] = mask_id
            un = logits_fn(un_row)[0].float()
            cond = un + (cfg_scale + 1) * (cond - un)
        out.append(cond)
    return torch.stack(out)  # [b, L, V]


@torch.no_grad()
def reference_loglikelihood(
    logits_fn: LogitsFn,
    prefix: list[int],
    target: list[int],
    *,
    mc_num: int,
    batch_size: int,
    cfg_scale: float,
    mask_id: int,
    generator: torch.Generator,
) -> float:
    if not target:
        raise ValueError("empty target")
    if mc_num % batch_size != 0:
        raise ValueError("mc_num must be a multiple of batch_size")
    b = batch_size
    p = len(prefix)
    tl = len(target)
    seq = torch.tensor(prefix + target, dtype=torch.long)[None, :].repeat(b, 1)

    losses = []
    for _ in range(mc_num // batch_size):
        # stratified mask counts: k uniform in [1, tl], then round(linspace(k, k+(b-1)*tl/b)), wrapped into [1, tl]
        k = int(torch.randint(1, tl + 1, (), generator=generator))
        counts = torch.round(torch.linspace(float(k), k + (b - 1) * (tl / b), steps=b)).long()
        counts = ((counts - 1) % tl) + 1
        assert int(counts.min()) >= 1 and int(counts.max()) <= tl

        is_mask = torch.zeros(b, p + tl, dtype=torch.bool)
        for r in range(b):
            perm = torch.randperm(tl, generator=generator)
            is_mask[r, p + perm[: int(counts[r])]] = True
        noisy = torch.where(is_mask, torch.full_like(seq, mask_id), seq)

        logits = _logits_rows(logits_fn, noisy, p, cfg_scale, mask_id)  # [b, L, V]
        p_mask = (counts.float() / tl)[:, None].expand(b, p + tl)
        ce = F.cross_entropy(logits[is_mask], seq[is_mask], reduction="none") / p_mask[is_mask]
        losses.append(float(ce.sum()) / b)
    return -sum(losses) / len(losses)


@torch.no_grad()
def reference_is_greedy(
    logits_fn: LogitsFn, prefix: list[int], target: list[int], *, cfg_scale: float, mask_id: int
) -> bool:
    """Reveal the single most confident masked answer position per forward; compare to target."""
    p = len(prefix)
    seq = torch.full((1, p + len(target)), mask_id, dtype=torch.long)
    seq[0, :p] = torch.tensor(prefix, dtype=torch.long)
    for _ in range(len(target)):
        masked = torch.nonzero(seq[0] == mask_id).flatten()
        logits = _logits_rows(logits_fn, seq, p, cfg_scale, mask_id)[0][masked]  # [n, V]
        x0 = logits.argmax(dim=-1)
        conf = torch.softmax(logits.float(), dim=-1).gather(-1, x0[:, None]).squeeze(-1)
        best = int(torch.sort(conf, descending=True, stable=True).indices[0])
        seq[0, masked[best]] = x0[best]
    return seq[0, p:].tolist() == list(target)
