"""What the family's mixture-of-experts layers share: the SwiGLU MLP (a shared expert or a dense
layer's MLP), the routed experts, and the dispatch of a step's tokens to them.

Dispatch is batched over the step's tokens: (token, slot) pairs sorted by expert, each expert on
its contiguous slice, so a step's cost grows with its tokens, not with its requests. Each router
(LLaDA-MoE's softmax top-k, LLaDA2's sigmoid group-limited) only chooses experts and weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from server.engine.cpu_kernels import onednn_linear, onednn_runs


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Experts(nn.Module):
    """`count` SwiGLU experts, their weights stacked: `gate_up` [count, 2 * intermediate, hidden]
    (an expert's gate rows, then its up rows: one matmul runs both) and `down` [count, hidden,
    intermediate]. The state dict and loading use the published per-expert names
    (`E.gate_proj.weight`, `E.up_proj.weight`, `E.down_proj.weight`), which are views of the
    stacked tensors: a checkpoint's tensors are copied into them, never held twice.

    forward runs each expert on its slice of the rows, so it reads the per-expert counts on the
    host; on CUDA in bf16 the loader swaps in GroupedExperts, whose offsets stay on the device."""

    def __init__(self, count: int, hidden: int, intermediate: int):
        super().__init__()
        self.intermediate = intermediate
        self.gate_up = nn.Parameter(torch.empty(count, 2 * intermediate, hidden))
        self.down = nn.Parameter(torch.empty(count, hidden, intermediate))
        self._register_state_dict_hook(_published_names)

    def __len__(self) -> int:
        return self.gate_up.shape[0]

    def project(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.linear(x, weight)

    def forward(self, rows: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """rows [n, hidden] sorted by expert; counts [experts]: how many rows each expert takes."""
        outputs = []
        for expert, part in enumerate(rows.split(counts.tolist())):
            if len(part):
                gate, up = self.project(part, self.gate_up[expert]).chunk(2, dim=-1)
                outputs.append(self.project(F.silu(gate) * up, self.down[expert]))
        return torch.cat(outputs)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected, errors):
        half = self.intermediate
        for expert in range(len(self)):
            for name, stacked, rows in (
                ("gate_proj", "gate_up", slice(0, half)),
                ("up_proj", "gate_up", slice(half, 2 * half)),
                ("down_proj", "down", slice(None)),
            ):
                tensor = state_dict.get(f"{prefix}{expert}.{name}.weight")
                if tensor is None:
                    continue
                target = getattr(self, stacked)
                if target.is_meta:  # built on the meta device: the first tensor read places it
                    target = nn.Parameter(torch.empty(target.shape, dtype=tensor.dtype, device=tensor.device))
                    setattr(self, stacked, target)
                with torch.no_grad():
                    target[expert, rows].copy_(tensor)


def _published_names(module: Experts, state: dict, prefix: str, local_metadata: dict) -> dict:
    gate_up, down = state.pop(prefix + "gate_up"), state.pop(prefix + "down")
    half = module.intermediate
    for expert in range(len(module)):
        state[f"{prefix}{expert}.gate_proj.weight"] = gate_up[expert, :half]
        state[f"{prefix}{expert}.up_proj.weight"] = gate_up[expert, half:]
        state[f"{prefix}{expert}.down_proj.weight"] = down[expert]
    return state


class OneDNNExperts(Experts):
    """Experts whose matmuls run through oneDNN: the CPU swap (cpu_kernels.py)."""

    def project(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return onednn_linear(x, weight)


class GroupedExperts(Experts):
    """Experts in two grouped GEMMs, the group offsets on the device: no host read per layer (a
    sync on CUDA). torch's grouped_mm runs bf16 on CUDA (sm80 and later)."""

    def forward(self, rows: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        offsets = counts.cumsum(0).to(torch.int32)
        gate, up = F.grouped_mm(rows, self.gate_up.transpose(1, 2), offs=offsets).chunk(2, dim=-1)
        return F.grouped_mm(F.silu(gate) * up, self.down.transpose(1, 2), offs=offsets)


def use_expert_kernels(model: nn.Module) -> nn.Module:
    """At load: each Experts module takes the fastest path its device has (in place)."""
    for module in model.modules():
        if type(module) is Experts:
            weight = module.gate_up
            if weight.device.type == "cpu" and onednn_runs(weight.dtype):
                module.__class__ = OneDNNExperts
            elif weight.device.type == "cuda" and weight.dtype == torch.bfloat16:
                module.__class__ = GroupedExperts
    return model


def dispatch(x: torch.Tensor, chosen: torch.Tensor, weights: torch.Tensor, experts: Experts) -> torch.Tensor:
    """x [tokens, hidden]; chosen and weights [tokens, k]: each token's output is the weighted sum
    of its k experts' outputs. The (token, slot) pairs are sorted by expert once: one gather, the
    experts on their contiguous slices, one weighting and one index_add (which sums a token's k
    outputs in expert order, as a loop over experts would). Nothing here reads the device."""
    top_k = chosen.shape[1]
    flat = chosen.flatten()
    order = flat.argsort(stable=True)
    tokens = order // top_k
    counts = flat.new_zeros(len(experts)).index_add_(0, flat, torch.ones_like(flat))
    outputs = experts(x[tokens], counts)
    # weighted and summed in float32, then cast back, as the published MoE blocks do in bf16
    weighted = outputs.float() * weights.float().flatten()[order, None]
    return torch.zeros(x.shape, dtype=torch.float32, device=x.device).index_add_(0, tokens, weighted).to(x.dtype)
