"""Tests of the LLaDA2 reference itself (tests/reference/llada2.py) on the tiny LLaDA2 folder.

The reference was checked token for token against the published modeling_llada2_moe.py /
modeling_llada21_moe.py (see the module docstring); these tests pin the rules that comparison
relied on, so that an edit to the reference that breaks one of them fails here.
"""

from __future__ import annotations

import pytest
import torch

from tests.family import llada2_ids, write_llada2_checkpoint
from tests.reference.llada2 import LLaDA2Reference, block_causal_mask, generate, transfer_schedule

pytestmark = pytest.mark.usefixtures("one_thread")

IDS = llada2_ids()
MASK, EOS = IDS["mask"], IDS["eos"]


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> LLaDA2Reference:
    return LLaDA2Reference.from_folder(write_llada2_checkpoint(tmp_path_factory.mktemp("llada2")))


def _prompts(n: int, seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (5 + 5 * i,), generator=g).tolist() for i in range(n)]


def test_block_causal_mask_shape():
    m = block_causal_mask(6, 2)
    assert m[0].tolist() == [True, True, False, False, False, False]
    assert m[3].tolist() == [True, True, True, True, False, False]
    assert m[5].all()


def test_later_block_does_not_change_earlier_logits(model):
    B = 8
    x = torch.randint(0, 256, (24,), generator=torch.Generator().manual_seed(0))
    base = model.forward(x, block_length=B)
    later = x.clone()
    later[20] = (later[20] + 1) % 256  # block 2
    out = model.forward(later, block_length=B)
    # (equal up to rounding: the expert batches' sizes change, so their matmuls may round differently)
    torch.testing.assert_close(out[:16], base[:16], rtol=0, atol=1e-4)  # blocks 0, 1 do not see block 2
    assert (out[16:] - base[16:]).abs().max() > 1e-2
    same = x.clone()
    same[13] = (same[13] + 1) % 256  # block 1: its own block and later ones change
    out = model.forward(same, block_length=B)
    torch.testing.assert_close(out[:8], base[:8], rtol=0, atol=1e-4)
    assert (out[8:12] - base[8:12]).abs().max() > 1e-2  # positions before 13 in block 1 see it
    # and without the mask (block_length None) every position sees position 20
    assert (model.forward(later, block_length=None)[:8] - model.forward(x, block_length=None)[:8]).abs().max() > 1e-2


def test_router_selects_with_bias_but_weighs_without(model, tmp_path):
    cfg, layer = model.cfg, 1
    state = dict(model.state)
    bias = torch.zeros(cfg["num_experts"])
    bias[5] = 10.0  # expert 5 chosen for every token, whatever its sigmoid score
    state[f"model.layers.{layer}.mlp.gate.expert_bias"] = bias
    biased = LLaDA2Reference(state, cfg)
    h = torch.randn(12, cfg["hidden_size"], generator=torch.Generator().manual_seed(3))
    experts, weights = biased.route(layer, h)
    assert (experts == 5).any(dim=1).all()
    s = torch.sigmoid(h @ state[f"model.layers.{layer}.mlp.gate.weight"].T)
    chosen = s.gather(1, experts)
    expected = chosen / chosen.sum(1, keepdim=True) * cfg["routed_scaling_factor"]
    torch.testing.assert_close(weights, expected)  # unbiased scores, renormalised, scaled
    torch.testing.assert_close(weights.sum(1), torch.full((12,), float(cfg["routed_scaling_factor"])))
    # with no bias, the chosen experts are the top-k of the group-limited sigmoid scores
    state[f"model.layers.{layer}.mlp.gate.expert_bias"] = torch.zeros(cfg["num_experts"])
    plain_experts, _ = LLaDA2Reference(state, cfg).route(layer, h)
    assert not torch.equal(plain_experts.sort(1).values, experts.sort(1).values)


def test_router_is_group_limited(model):
    cfg, layer = model.cfg, 2
    h = torch.randn(40, cfg["hidden_size"], generator=torch.Generator().manual_seed(4))
    experts, _ = model.route(layer, h)
    group_size = cfg["num_experts"] // cfg["n_group"]
    for row in experts.tolist():
        assert len({e // group_size for e in row}) <= cfg["topk_group"]


def test_transfer_schedule():
    assert transfer_schedule(32, 32) == [1] * 32
    assert transfer_schedule(32, 5) == [7, 7, 6, 6, 6]
    assert sum(transfer_schedule(32, 7)) == 32


def test_threshold_one_commits_one_token_per_iteration(model):
    for prompt in _prompts(3):
        trace: list = []
        answer = generate(
            model,
            prompt,
            gen_length=40,
            block_length=16,
            steps=16,
            threshold=1.0,
            mask_id=MASK,
            eos_id=EOS,
            trace=trace,
        )
        assert trace and all(len(t["committed"]) == 1 for t in trace)
        assert MASK not in answer


def test_threshold_commits_several_tokens_sometimes(model):
    # the tiny checkpoint is sharp enough for parallel commits at 0.9, not always the whole block
    counts = []
    for prompt in _prompts(4):
        trace: list = []
        generate(
            model,
            prompt,
            gen_length=32,
            block_length=16,
            steps=16,
            threshold=0.9,
            mask_id=MASK,
            eos_id=EOS,
            trace=trace,
        )
        counts += [len(t["committed"]) for t in trace]
    assert max(counts) > 1 and min(counts) == 1
    assert any(1 < c < 16 for c in counts)


def test_editing_never_touches_prompt_tokens(model):
    edited_somewhere = False
    for prompt in _prompts(4, seed=2):
        P = len(prompt)
        trace: list = []
        generate(
            model,
            prompt,
            gen_length=24,
            block_length=16,
            threshold=0.5,
            editing_threshold=0.0,
            max_post_steps=4,
            mask_id=MASK,
            eos_id=EOS,
            trace=trace,
        )
        for t in trace:
            assert all(p >= P for p in t["edited"])
            edited_somewhere |= bool(t["edited"])
    assert edited_somewhere  # editing_threshold 0 does edit on this model: the check above means something


def test_answer_cut_at_first_eos(model):
    ended = 0
    for prompt in _prompts(6):
        answer = generate(
            model, prompt, gen_length=64, block_length=32, steps=32, threshold=0.9, mask_id=MASK, eos_id=EOS
        )
        assert len(answer) <= 64
        if EOS in answer:
            assert answer.index(EOS) == len(answer) - 1
            ended += 1
            early = generate(
                model,
                prompt,
                gen_length=64,
                block_length=32,
                steps=32,
                threshold=0.9,
                mask_id=MASK,
                eos_id=EOS,
                eos_early_stop=True,
            )
            assert early == answer
        else:
            assert len(answer) == 64
    assert ended >= 1  # the tiny checkpoint ends some answers early


def test_max_post_steps_zero_means_no_forward_after_last_mask(model):
    prompt = _prompts(1)[0]
    trace: list = []
    generate(
        model,
        prompt,
        gen_length=16,
        block_length=16,
        threshold=0.9,
        editing_threshold=0.0,
        max_post_steps=0,
        mask_id=MASK,
        eos_id=EOS,
        trace=trace,
    )
    assert all(t["masked"] > 0 for t in trace)
