"""The routed experts of the MoE families (server/engine/models/moe.py): stacked weights under the
published per-expert names, each device's path giving the same outputs, and dispatch that reads
nothing back from the device on the grouped path (a host sync per MoE layer on CUDA)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from server.engine.cpu_kernels import onednn_runs
from server.engine.models.moe import Experts, GroupedExperts, OneDNNExperts, dispatch, use_expert_kernels

COUNT, HIDDEN, INTERMEDIATE = 6, 16, 8


def published(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    state = {}
    for e in range(COUNT):
        state[f"{e}.gate_proj.weight"] = torch.randn(INTERMEDIATE, HIDDEN, generator=g)
        state[f"{e}.up_proj.weight"] = torch.randn(INTERMEDIATE, HIDDEN, generator=g)
        state[f"{e}.down_proj.weight"] = torch.randn(HIDDEN, INTERMEDIATE, generator=g)
    return state


def loaded(kind: type[Experts] = Experts) -> Experts:
    with torch.device("meta"):
        experts = Experts(COUNT, HIDDEN, INTERMEDIATE)
    experts.load_state_dict(published(), assign=True)
    experts.__class__ = kind
    return experts


def plain(state: dict[str, torch.Tensor], x: torch.Tensor, chosen: torch.Tensor, weights: torch.Tensor):
    """Each token's weighted sum over its experts, one token and one expert at a time."""
    out = torch.zeros_like(x)
    for t in range(len(x)):
        for e, w in zip(chosen[t].tolist(), weights[t]):
            gate = F.linear(x[t], state[f"{e}.gate_proj.weight"])
            up = F.linear(x[t], state[f"{e}.up_proj.weight"])
            out[t] += w * F.linear(F.silu(gate) * up, state[f"{e}.down_proj.weight"])
    return out


def routed(tokens: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, HIDDEN, generator=g)
    chosen = torch.stack([torch.randperm(COUNT, generator=g)[:2] for _ in range(tokens)])
    chosen[:, 0] = torch.where(chosen[:, 0] == 5, chosen[:, 0], chosen[:, 0] % 5)  # expert 5 often idle
    weights = torch.rand(tokens, 2, generator=g)
    return x, chosen, weights


def test_the_state_dict_has_the_published_names_as_views_of_the_stacked_weights():
    experts = loaded()
    state = experts.state_dict()
    want = published()
    assert sorted(state) == sorted(want)
    for name, tensor in want.items():
        assert torch.equal(state[name], tensor), name
    # views, not copies: the checkpoint is held once
    storage = experts.gate_up.untyped_storage().data_ptr()
    assert state["3.up_proj.weight"].untyped_storage().data_ptr() == storage
    assert dict(experts.named_parameters()).keys() == {"gate_up", "down"}


@pytest.mark.parametrize("tokens", [1, 3, 40])
def test_every_path_gives_each_token_its_experts_weighted_sum(tokens):
    x, chosen, weights = routed(tokens)
    want = plain(published(), x, chosen, weights)
    kinds = [Experts, GroupedExperts] + ([OneDNNExperts] if onednn_runs(torch.float32) else [])
    for kind in kinds:
        got = dispatch(x, chosen, weights, loaded(kind))
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=kind.__name__)


def test_grouped_dispatch_reads_nothing_back_and_the_loop_reads_the_counts():
    """On the meta device a tensor has no values: any read of one raises. (bf16: grouped_mm's
    dtype on CUDA, where the loader uses it.)"""
    x, chosen, weights = routed(12)
    x, chosen, weights = x.to("meta", torch.bfloat16), chosen.to("meta"), weights.to("meta")
    with torch.device("meta"):
        grouped, looped = (kind(COUNT, HIDDEN, INTERMEDIATE).bfloat16() for kind in (GroupedExperts, Experts))
    assert dispatch(x, chosen, weights, grouped).shape == x.shape
    with pytest.raises((RuntimeError, NotImplementedError)):
        dispatch(x, chosen, weights, looped)


def test_the_loader_swaps_in_the_cpu_kernels():
    experts = use_expert_kernels(loaded())
    assert type(experts) is (OneDNNExperts if onednn_runs(torch.float32) else Experts)
