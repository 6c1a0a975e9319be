"""Guards of the fast decoding reference (tests/reference/fast_sampler.py) that the engine is tested
against: it must reduce to the exact reference sampler without caches, threshold, factor or early
stop; its cached forwards must reproduce the full forward where nothing changed; and where the
published Fast-dLLM code is defined (one row, temperature 0, low_confidence, exact divisions) it
must give that code's tokens and nfe.

Everything runs on the tiny demo models of test_reference_fidelity.py, fp32, on the CPU.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from server.engine.sampling_params import SamplingParams
from tests.engine import test_reference_fidelity as fidelity
from tests.engine.test_reference_fidelity import PROMPT_A, PROMPT_B, PROMPT_C, PROMPT_D, P, Ref
from tests.reference.fast_sampler import (
    factor_count,
    reference_fast_generate_for,
    threshold_count,
)
from tests.reference.model import (
    Weights,
    apply_rope,
    finish_layer,
    forward_at,
    full_forward,
    lm_head,
    qkv_projections,
    rope_cos_sin,
)

pytestmark = pytest.mark.usefixtures("one_thread")

# the fidelity tests' tiny models, as fixtures of this module too
demo, gqa, eos_heavy = fidelity.demo, fidelity.gqa, fidelity.eos_heavy


_answers: dict = {}  # every run is deterministic: compute each once


def fast(ref: Ref, prompt: list[int], params: SamplingParams, **fast_kw) -> tuple[list[int], int]:
    """(answer, nfe) of the fast reference; fast_kw: cache, threshold, factor, early_stop."""
    key = (id(ref), tuple(prompt), params, tuple(sorted(fast_kw.items())))
    if key not in _answers:
        params = dataclasses.replace(params, **fast_kw)
        _answers[key] = reference_fast_generate_for(ref.state, ref.cfg, prompt, params, ref.loaded.special)
    answer, nfe = _answers[key]
    return list(answer), nfe


# ---------------------------------------------------------------------------------------------
# Without caches, threshold, factor or early stop: the exact sampler
# ---------------------------------------------------------------------------------------------

# fidelity.SOLO_CASES by name, with the steps that run (the schedule's k > 0 steps)
EXACT_CASES = {
    "semi_autoregressive": 12,
    "uneven_division": 7,
    "more_steps_than_masks": 6,
    "cfg": 8,
    "constraints": 8,
    "random_remasking": 8,
    "temperature": 8,
    "temperature_skipped_steps": 8,
    "everything_random": 7,
}


@pytest.mark.parametrize("case", list(EXACT_CASES))
def test_without_fast_options_equals_the_exact_sampler(demo, case):
    prompt, params = fidelity.SOLO_CASES[case]
    answer, nfe = fast(demo, prompt, params)
    assert answer == demo.generate(prompt, params)
    assert nfe == EXACT_CASES[case]
    assert demo.mask not in answer


def test_without_fast_options_eos_flags_equal_the_exact_sampler(eos_heavy):
    params = P(gen_length=20, block_length=8, steps=7, cfg_scale=1.0, logits_eos_inf=True, confidence_eos_eot_inf=True)
    assert fast(eos_heavy, PROMPT_C, params) == (eos_heavy.generate(PROMPT_C, params), 7)


# ---------------------------------------------------------------------------------------------
# The cached forward
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["demo", "gqa"])
def test_cached_forward_on_an_unchanged_canvas_equals_the_full_forward(which, request):
    """prefix (block start .. end against the kept prefix) and dual (the block against everything
    kept) reproduce the full forward's logits and keys/values when the canvas did not change."""
    ref: Ref = request.getfixturevalue(which)
    ids = PROMPT_D + [ord("a"), ord("b"), ord("c")] + [ref.mask] * 13  # 13 prompt + 16 answer tokens
    x = torch.tensor([ids])
    lo, hi = len(PROMPT_D) + 3, len(PROMPT_D) + 8  # a block that starts after some answer tokens
    full_logits, full_kv = full_forward(ref.state, ref.cfg, x)
    full_logits = full_logits[0]

    dual_kv = full_forward(ref.state, ref.cfg, x)[1]
    dual = forward_at(ref.state, ref.cfg, x[0, lo:hi], torch.arange(lo, hi), dual_kv)
    torch.testing.assert_close(dual, full_logits[lo:hi], atol=1e-4, rtol=1e-4)
    for layer in range(len(full_kv.keys)):
        torch.testing.assert_close(dual_kv.keys[layer], full_kv.keys[layer], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(dual_kv.values[layer], full_kv.values[layer], atol=1e-5, rtol=1e-5)

    prefix = forward_at(ref.state, ref.cfg, x[0, lo:], torch.arange(lo, len(ids)), full_kv.kept_before(lo))
    torch.testing.assert_close(prefix, full_logits[lo:], atol=1e-4, rtol=1e-4)

    # a prefix cache holds nothing from the block on: running the block alone against it is refused
    with pytest.raises(ValueError, match="lacks a position"):
        forward_at(ref.state, ref.cfg, x[0, lo:hi], torch.arange(lo, hi), full_kv.kept_before(lo))


# ---------------------------------------------------------------------------------------------
# The published Fast-dLLM code (NVlabs/Fast-dLLM llada/generate.py, model/modeling_llada.py),
# transcribed for one row, temperature 0, low_confidence
# ---------------------------------------------------------------------------------------------


def _fast_dllm_model(ref: Ref, input_ids, past_key_values=None, replace_position=None):
    """Their LLaDAModelLM forward with use_cache=True: logits [B, T, V] and per layer (k, v)
    [B, Hkv, key_len, hd] BEFORE RoPE. With past_key_values and no replace_position the new k/v
    are appended after the past ones; with replace_position ([1, L] bool) they overwrite the past
    ones in place there. RoPE then rotates all keys at 0..key_len-1 and the queries at the
    query_len positions ending at key_len (or at the last replaced position + 1). No mask.
    Rows run one after another through the same layer code as the reference forward."""
    w = Weights(ref.state, ref.cfg)
    logits, presents = [], []
    for b in range(input_ids.shape[0]):
        x = w("wte.weight")[input_ids[b]]
        present = []
        for i in range(w.shape.n_layers):
            q, k, v = qkv_projections(w, i, x)
            if past_key_values is not None:
                past_key, past_value = past_key_values[i][0][b], past_key_values[i][1][b]
                if replace_position is None:
                    k = torch.cat((past_key, k), dim=-2)
                    v = torch.cat((past_value, v), dim=-2)
                else:
                    replace_indices = replace_position.nonzero(as_tuple=True)[1]
                    past_key[:, replace_indices] = k
                    k = past_key
                    past_value[:, replace_indices] = v
                    v = past_value
            present.append((k, v))
            query_len, key_len = q.shape[-2], k.shape[-2]
            pos_cos, pos_sin = rope_cos_sin(torch.arange(key_len), w.shape.head_dim, w.shape.theta)
            q_end = key_len if replace_position is None else int(replace_indices.max()) + 1
            q = apply_rope(q, pos_cos[q_end - query_len : q_end], pos_sin[q_end - query_len : q_end])
            k = apply_rope(k, pos_cos, pos_sin)
            x = finish_layer(w, i, x, q, k, v)
        logits.append(lm_head(w, x))
        presents.append(present)
    stacked = [
        tuple(torch.stack([presents[b][i][j] for b in range(len(presents))]) for j in range(2))
        for i in range(w.shape.n_layers)
    ]
    return torch.stack(logits), stacked


def _model(ref: Ref, cfg_scale: float, prompt_len: int):
    """model(x, ...) of the loops below. Fast-dLLM has no CFG; with cfg_scale > 0 the authors' CFG
    of LLaDA's generate.py is grafted on: the prompt-masked copy runs as a second row of the batch
    (so the batch's cache holds its K/V beside the row's) and logits = un + (s+1)*(cond - un)."""

    def run(x, past_key_values=None, replace_position=None):
        if cfg_scale <= 0:
            return _fast_dllm_model(ref, x, past_key_values, replace_position)
        un_x = x.clone()
        if past_key_values is None:  # cached calls start at the block, after the prompt
            un_x[:, :prompt_len] = ref.mask
        logits, present = _fast_dllm_model(ref, torch.cat([x, un_x]), past_key_values, replace_position)
        cond, un = torch.chunk(logits, 2, dim=0)
        return un + (cfg_scale + 1) * (cond - un), present

    return run


def _get_num_transfer_tokens(mask_index, steps):
    mask_num = mask_index.sum(dim=1, keepdim=True)
    base = mask_num // steps
    remainder = mask_num % steps
    num_transfer_tokens = torch.zeros(mask_num.size(0), steps, dtype=torch.int64) + base
    for i in range(mask_num.size(0)):
        num_transfer_tokens[i, : remainder[i]] += 1
    return num_transfer_tokens


def _confidence(logits, mask_index, x):
    x0 = torch.argmax(logits, dim=-1)
    # Fast-dLLM takes this softmax in float64; LLADA.md's rule is the exact sampler's float32
    # softmax, whose values are then compared in float64 as theirs are
    p = F.softmax(logits.to(torch.float32), dim=-1)
    x0_p = torch.squeeze(torch.gather(p, dim=-1, index=torch.unsqueeze(x0, -1)), -1).to(torch.float64)
    x0 = torch.where(mask_index, x0, x)
    confidence = torch.where(mask_index, x0_p, -np.inf)
    return x0, confidence


def _get_transfer_index(logits, mask_index, x, num_transfer_tokens, threshold=None):
    x0, confidence = _confidence(logits, mask_index, x)
    transfer_index = torch.zeros_like(x0, dtype=torch.bool)
    if threshold is not None:
        num_transfer_tokens = mask_index.sum(dim=1, keepdim=True)
    for j in range(confidence.shape[0]):
        _, select_index = torch.topk(confidence[j], k=int(num_transfer_tokens[j]))
        transfer_index[j, select_index] = True
        if threshold is not None:
            for k in range(1, int(num_transfer_tokens[j])):
                if confidence[j, select_index[k]] < threshold:
                    transfer_index[j, select_index[k]] = False
    return x0, transfer_index


def _get_transfer_index_dynamic(logits, mask_index, x, factor=1):
    x0, confidence = _confidence(logits, mask_index, x)
    transfer_index = torch.zeros_like(x0, dtype=torch.bool)
    num_transfer_tokens = mask_index.sum(dim=1, keepdim=True)
    for j in range(confidence.shape[0]):
        ns = list(range(1, int(num_transfer_tokens[j]) + 1))
        es = [factor / (n + 1) for n in ns]
        threshs = [1 - e for e in es]
        threshs[0] = -1  # always transfer at least one token
        sorted_conf = torch.sort(confidence[j][mask_index[j]], dim=-1, descending=True)[0]
        assert len(sorted_conf) == len(threshs)
        for top_i in range(len(threshs)):
            if sorted_conf[top_i] < threshs[top_i]:
                break
        if top_i == 0 or top_i == len(threshs) - 1:
            top_i += 1
        _, select_index = torch.topk(confidence[j], k=top_i)
        transfer_index[j, select_index] = True
    return x0, transfer_index


def _transfer(logits, mask_index, x, num_transfer_tokens, i, threshold, factor):
    """The branch every loop of generate.py repeats around its transfer-index call."""
    if factor is None:
        return _get_transfer_index(
            logits, mask_index, x, num_transfer_tokens[:, i] if threshold is None else None, threshold
        )
    return _get_transfer_index_dynamic(logits, mask_index, x, factor)


@torch.no_grad()
def _fast_dllm(ref: Ref, prompt, params: SamplingParams, *, cache, threshold=None, factor=None):
    """generate / generate_with_prefix_cache / generate_with_dual_cache for one row: (answer, nfe)."""
    assert params.temperature == 0 and params.remasking == "low_confidence" and not params.constraints
    steps, gen_length, block_length = params.steps, params.gen_length, params.block_length
    model = _model(ref, params.cfg_scale, len(prompt))
    mask_id = ref.mask
    x = torch.full((1, len(prompt) + gen_length), mask_id, dtype=torch.long)
    x[:, : len(prompt)] = torch.tensor(prompt)
    assert gen_length % block_length == 0
    num_blocks = gen_length // block_length
    assert steps % num_blocks == 0
    steps_per_block = steps // num_blocks
    nfe = 0
    for num_block in range(num_blocks):
        start = len(prompt) + num_block * block_length
        end = start + block_length
        num_transfer_tokens = _get_num_transfer_tokens(x[:, start:end] == mask_id, steps_per_block)

        if cache == "none":
            i = 0
            while True:
                nfe += 1
                mask_index = x == mask_id
                logits, _ = model(x)
                mask_index[:, end:] = 0
                x0, transfer_index = _transfer(logits, mask_index, x, num_transfer_tokens, i, threshold, factor)
                x[transfer_index] = x0[transfer_index]
                i += 1
                if (x[:, start:end] == mask_id).sum() == 0:
                    break
            continue

        logits, past_key_values = model(x)
        mask_index = x == mask_id
        mask_index[:, end:] = 0
        x0, transfer_index = _transfer(logits, mask_index, x, num_transfer_tokens, 0, threshold, factor)
        x[transfer_index] = x0[transfer_index]
        nfe += 1
        i = 1
        if cache == "prefix":
            past_key_values = [tuple(t[:, :, :start] for t in layer) for layer in past_key_values]
            while True:
                if (x[:, start:end] == mask_id).sum() == 0:
                    break
                nfe += 1
                mask_index = x[:, start:] == mask_id
                mask_index[:, block_length:] = 0
                logits, _ = model(x[:, start:], past_key_values=past_key_values)
                x0, transfer_index = _transfer(
                    logits, mask_index, x[:, start:], num_transfer_tokens, i, threshold, factor
                )
                x[:, start:][transfer_index] = x0[transfer_index]
                i += 1
        else:
            replace_position = torch.zeros_like(x, dtype=torch.bool)
            replace_position[:, start:end] = 1
            while True:
                if (x[:, start:end] == mask_id).sum() == 0:
                    break
                nfe += 1
                mask_index = x[:, start:end] == mask_id
                logits, _ = model(x[:, start:end], past_key_values=past_key_values, replace_position=replace_position)
                x0, transfer_index = _transfer(
                    logits, mask_index, x[:, start:end], num_transfer_tokens, i, threshold, factor
                )
                x[:, start:end][transfer_index] = x0[transfer_index]
                i += 1
    return x[0, len(prompt) :].tolist(), nfe


SEMI_AR = P(gen_length=24, block_length=8, steps=12)
# On these random tiny models confidences range about 0.01 to 0.8, so threshold 0.15 and factor 2.5
# reveal several tokens in many steps (the test asserts it); 0.9 would reveal one per step.
PUBLISHED_CASES = {
    f"{cache}-{name}": (PROMPT_A, SEMI_AR, {"cache": cache, **extra})
    for cache in ("none", "prefix", "dual")
    for name, extra in (("fixed", {}), ("threshold", {"threshold": 0.15}), ("factor", {"factor": 2.5}))
}
# CFG sharpens these models' predictions, so there the realistic threshold 0.9 reveals several tokens
PUBLISHED_CASES |= {
    "prefix-single-block-threshold": (
        PROMPT_B,
        P(gen_length=16, block_length=16, steps=8),
        dict(cache="prefix", threshold=0.2),
    ),
    "dual-cfg-fixed": (PROMPT_D, P(gen_length=16, block_length=8, steps=8, cfg_scale=1.5), dict(cache="dual")),
    "prefix-cfg-fixed": (PROMPT_C, P(gen_length=16, block_length=8, steps=8, cfg_scale=1.0), dict(cache="prefix")),
    "dual-cfg-threshold": (
        PROMPT_C,
        P(gen_length=16, block_length=8, steps=8, cfg_scale=1.0),
        dict(cache="dual", threshold=0.9),
    ),
    "prefix-cfg-factor": (
        PROMPT_D,
        P(gen_length=16, block_length=8, steps=8, cfg_scale=1.0),
        dict(cache="prefix", factor=0.5),
    ),
}


@pytest.mark.parametrize("case", list(PUBLISHED_CASES))
def test_matches_the_published_fast_dllm_code(demo, case):
    prompt, params, fast_kw = PUBLISHED_CASES[case]
    answer, nfe = fast(demo, prompt, params, **fast_kw)
    assert (answer, nfe) == _fast_dllm(demo, prompt, params, **fast_kw)
    if "threshold" in fast_kw or "factor" in fast_kw:
        assert nfe < params.gen_length, "no step revealed more than one token: the case is vacuous"
    else:
        assert nfe == params.steps


def test_gqa_dual_threshold_matches_the_published_code(gqa):
    fast_kw = dict(cache="dual", threshold=0.15)
    answer, nfe = fast(gqa, PROMPT_B, SEMI_AR, **fast_kw)
    assert (answer, nfe) == _fast_dllm(gqa, PROMPT_B, SEMI_AR, **fast_kw)
    assert nfe < SEMI_AR.gen_length


def test_caches_are_approximate(demo):
    """Stale keys/values change answers: prefix and dual differ from the exact sampler here."""
    for prompt, params in ((PROMPT_A, SEMI_AR), (PROMPT_D, P(gen_length=16, block_length=8, steps=8, cfg_scale=1.5))):
        for cache in ("prefix", "dual"):
            assert fast(demo, prompt, params, cache=cache)[0] != demo.generate(prompt, params), (cache, params)


def test_seeded_sampling_with_a_cache_follows_its_own_generator(demo):
    """Temperature and random remasking in cached steps draw from the seeded generator only: the
    same seed gives the same answer run after run, another seed another answer."""
    params = P(gen_length=16, block_length=8, steps=8, temperature=0.8, remasking="random", seed=1)
    fast_kw = dict(cache="dual", threshold=0.5)
    answer, nfe = fast(demo, PROMPT_B, params, **fast_kw)
    torch.manual_seed(12345)  # the global generator plays no part
    again = reference_fast_generate_for(
        demo.state, demo.cfg, PROMPT_B, dataclasses.replace(params, **fast_kw), demo.loaded.special
    )
    assert again == (answer, nfe)
    assert nfe < params.gen_length
    assert fast(demo, PROMPT_B, dataclasses.replace(params, seed=2), **fast_kw)[0] != answer


# ---------------------------------------------------------------------------------------------
# The reveal-count rules on hand-made confidences
# ---------------------------------------------------------------------------------------------


def test_threshold_count():
    assert threshold_count([0.9, 0.5, 0.5, 0.2], 0.5) == 3
    assert threshold_count([0.3, 0.2], 0.5) == 1  # the most confident one is always revealed
    assert threshold_count([float("-inf"), float("-inf")], 0.5) == 1
    assert threshold_count([1.0, 1.0], 1.0) == 2


def test_factor_count():
    # factor 1: rank k passes when ck >= 1 - 1/(k+1): k=2 needs 2/3, k=3 needs 3/4, k=4 needs 4/5
    assert factor_count([0.1, 0.7, 0.76, 0.1, 0.1], 1.0) == 3  # ranks 1..3 pass, rank 4 fails
    assert factor_count([0.9, 0.5, 0.9, 0.9, 0.9], 1.0) == 1  # rank 2 fails
    assert factor_count([0.9, 0.7, 0.1], 1.0) == 3  # the first failing rank is the last one: all
    assert factor_count([0.9, 0.1], 1.0) == 2  # likewise with two
    assert factor_count([0.9, 0.7, 0.8, 0.9], 1.0) == 4  # none fails
    assert factor_count([0.3], 1.0) == 1
    # rank 1's bound is -1: a -inf there fails, and one token is revealed (not all M, as rank 2
    # failing last would give)
    assert factor_count([float("-inf"), float("-inf")], 1.0) == 1
    assert factor_count([0.5, float("-inf")], 1.0) == 2


def test_invalid_settings_are_refused(demo):
    params = P(gen_length=4, block_length=4, steps=4)
    for bad, message in (
        (dict(threshold=0.0), "threshold"),
        (dict(threshold=1.5), "threshold"),
        (dict(factor=0.0), "factor"),
        (dict(threshold=0.5, factor=1.0), "not both"),
        (dict(cache="full"), "cache"),
    ):
        with pytest.raises(ValueError, match=message):
            reference_fast_generate_for(
                demo.state, demo.cfg, PROMPT_C, dataclasses.replace(params, **bad), demo.loaded.special
            )


# ---------------------------------------------------------------------------------------------
# Early stop (on a model where EOS and EOT are actually predicted)
# ---------------------------------------------------------------------------------------------

EARLY = P(gen_length=32, block_length=8, steps=16)
EARLY_CASES = {
    "exact": (PROMPT_A, EARLY, {}),
    "dual-threshold": (PROMPT_D, EARLY, dict(cache="dual", threshold=0.2)),
    "prefix-cfg-constraint-later": (
        PROMPT_A,
        P(gen_length=32, block_length=8, steps=16, cfg_scale=1.0, constraints=((20, ord("z")),)),
        dict(cache="prefix"),
    ),
}


def _first_stop(answer: list[int], ref: Ref) -> int:
    return next(i for i, t in enumerate(answer) if t in (ref.eos, ref.eot))


@pytest.mark.parametrize("case", list(EARLY_CASES))
def test_early_stop_ends_after_the_first_block_holding_eos(eos_heavy, case):
    prompt, params, fast_kw = EARLY_CASES[case]
    plain, plain_nfe = fast(eos_heavy, prompt, params, **fast_kw)
    stopped, nfe = fast(eos_heavy, prompt, params, **fast_kw, early_stop=True)
    # the stopping block is the first whose end has an EOS/EOT before it; the blocks up to it are
    # decoded as without early stop, everything after it is EOS (constraints there included)
    first = _first_stop(plain, eos_heavy)
    stop_end = (first // params.block_length + 1) * params.block_length
    assert stop_end < params.gen_length, "the stop must come before the last block for the case to matter"
    assert stopped[:stop_end] == plain[:stop_end]
    assert stopped[stop_end:] == [eos_heavy.eos] * (params.gen_length - stop_end)
    assert _first_stop(stopped, eos_heavy) == first  # so the text, cut at the first EOS/EOT, is the same
    assert nfe < plain_nfe
    for pos, tok in params.constraints:
        assert plain[pos] == tok and (pos < stop_end or stopped[pos] == eos_heavy.eos)


def test_early_stop_after_a_block_that_constraints_filled(demo):
    """A block with no mask runs no step; early stop still looks at it."""
    pinned = ((0, ord("A")), (1, demo.eot), (2, ord("B")), (3, ord("C")))
    params = P(gen_length=12, block_length=4, steps=6, constraints=pinned)
    answer, nfe = fast(demo, PROMPT_C, params, early_stop=True)
    assert (answer, nfe) == ([ord("A"), demo.eot, ord("B"), ord("C")] + [demo.eos] * 8, 0)
