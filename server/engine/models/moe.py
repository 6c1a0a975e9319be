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
    of its k experts' outputs."""
    top_k = chosen.shape[1]
    weights = weights.to(x.dtype).flatten()
    flat = chosen.flatten()
    order = flat.argsort(stable=True)  # (token, slot) pairs grouped by expert
    # the one host read of the layer: how many tokens each expert takes
    counts = torch.bincount(flat, minlength=len(experts)).tolist()
    out = torch.zeros_like(x)
    at = 0
    for expert, count in zip(experts, counts):
        if count:
            pairs = order[at : at + count]
            tokens = pairs // top_k
            out.index_add_(0, tokens, expert(x[tokens]) * weights[pairs, None])
            at += count
    return out
