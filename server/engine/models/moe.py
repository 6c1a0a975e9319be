"""What the family's mixture-of-experts layers share: the SwiGLU MLP (an expert, a shared expert,
or a dense layer's MLP) and the dispatch of a step's tokens to their experts.

Dispatch is batched over the step's tokens: (token, slot) pairs sorted by expert, one matmul per
active expert, so a step's cost grows with its tokens, not with its requests. Each router
(LLaDA-MoE's softmax top-k, LLaDA2's sigmoid group-limited) only chooses experts and weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def dispatch(x: torch.Tensor, chosen: torch.Tensor, weights: torch.Tensor, experts: nn.ModuleList) -> torch.Tensor:
    """x [tokens, hidden]; chosen and weights [tokens, k]: each token's output is the weighted sum
    of its k experts' outputs. The (token, slot) pairs are sorted by expert once: one gather, each
    active expert on its contiguous slice, one weighting and one index_add (which sums a token's
    k outputs in expert order, as a loop over experts would)."""
    top_k = chosen.shape[1]
    flat = chosen.flatten()
    order = flat.argsort(stable=True)
    # the one host read of the layer: how many tokens each expert takes
    counts = torch.bincount(flat, minlength=len(experts)).tolist()
    tokens = order // top_k
    grouped = x[tokens]
    outputs = [expert(part) for expert, part, count in zip(experts, grouped.split(counts), counts) if count]
    # weighted and summed in float32, then cast back, as the published MoE blocks do in bf16
    weighted = torch.cat(outputs).float() * weights.float().flatten()[order, None]
    return torch.zeros(x.shape, dtype=torch.float32, device=x.device).index_add_(0, tokens, weighted).to(x.dtype)
