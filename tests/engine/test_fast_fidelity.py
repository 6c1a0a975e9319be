"""The engine's fast decoding (prefix and dual KV caches, threshold and factor reveal counts,
early stop) against the independent plain reference of tests/reference/fast_sampler.py, token for
token and nfe for nfe at temperature 0 in fp32; in batches that mix modes, phases, lengths and
exact jobs, every row equals its solo run; seeded sampling in every mode is reproducible and
does not depend on what shares the batch."""

from __future__ import annotations

import dataclasses

import pytest

from server.engine.denoiser import run_jobs
from server.engine.sampling_params import SamplingParams
from tests.engine import test_reference_fidelity as fidelity
from tests.engine.test_reference_fidelity import PROMPT_A, PROMPT_B, PROMPT_C, PROMPT_D, P, Ref
from tests.reference.fast_sampler import reference_fast_generate_for

demo, eos_heavy = fidelity.demo, fidelity.eos_heavy

# On these random tiny models confidences rarely pass 0.9; these reveal several tokens a step.
THRESHOLD, FACTOR = 0.15, 2.5
_reference: dict = {}


def reference(ref: Ref, prompt: list[int], params: SamplingParams) -> tuple[list[int], int]:
    key = (id(ref), tuple(prompt), params)
    if key not in _reference:
        _reference[key] = reference_fast_generate_for(ref.state, ref.cfg, prompt, params, ref.loaded.special)
    return _reference[key]


def engine(ref: Ref, requests: list[tuple[list[int], SamplingParams]]) -> list[tuple[list[int], int]]:
    jobs = run_jobs(ref.loaded, [prompt for prompt, _ in requests], [params for _, params in requests])
    return [(job.answer, job.steps_done) for job in jobs]


SEMI_AR = dict(gen_length=24, block_length=8, steps=12)
CASES = {
    "prefix": (PROMPT_A, P(**SEMI_AR, cache="prefix")),
    "dual": (PROMPT_A, P(**SEMI_AR, cache="dual")),
    "none_threshold": (PROMPT_B, P(**SEMI_AR, threshold=THRESHOLD)),
    "prefix_threshold": (PROMPT_B, P(**SEMI_AR, cache="prefix", threshold=THRESHOLD)),
    "dual_threshold": (PROMPT_D, P(**SEMI_AR, cache="dual", threshold=THRESHOLD)),
    "none_factor": (PROMPT_C, P(**SEMI_AR, factor=FACTOR)),
    "prefix_factor": (PROMPT_A, P(**SEMI_AR, cache="prefix", factor=FACTOR)),
    "dual_factor": (PROMPT_D, P(**SEMI_AR, cache="dual", factor=FACTOR)),
    "dual_single_block": (PROMPT_B, P(gen_length=16, block_length=16, steps=8, cache="dual")),
    "prefix_cfg": (PROMPT_A, P(gen_length=16, block_length=8, steps=8, cfg_scale=1.5, cache="prefix")),
    "dual_cfg_threshold": (
        PROMPT_C,
        P(gen_length=16, block_length=8, steps=8, cfg_scale=1.0, cache="dual", threshold=THRESHOLD),
    ),
    "dual_constraints_factor": (
        PROMPT_B,
        P(**SEMI_AR, cache="dual", factor=FACTOR, constraints=((0, ord("A")), (9, ord("z")), (20, 200))),
    ),
    "prefix_eos_flags": (PROMPT_C, P(**SEMI_AR, cache="prefix", logits_eos_inf=True, confidence_eos_eot_inf=True)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_solo_matches_the_fast_reference(demo, case):
    prompt, params = CASES[case]
    expected = reference(demo, prompt, params)
    assert engine(demo, [(prompt, params)]) == [expected]
    if params.threshold is not None or params.factor is not None:
        assert expected[1] < params.gen_length - len(params.constraints)  # some steps revealed several


EARLY = dict(gen_length=24, block_length=8, steps=12, early_stop=True)


@pytest.mark.parametrize(
    "params",
    [P(**EARLY), P(**EARLY, cache="dual", threshold=THRESHOLD), P(**EARLY, cache="prefix", cfg_scale=1.0)],
    ids=["exact", "dual_threshold", "prefix_cfg"],
)
def test_early_stop_matches_the_reference(eos_heavy, params):
    expected = reference(eos_heavy, PROMPT_C, params)
    assert engine(eos_heavy, [(PROMPT_C, params)]) == [expected]
    without = reference(eos_heavy, PROMPT_C, dataclasses.replace(params, early_stop=False))
    assert expected[1] < without[1]  # it stopped: fewer forwards ran


MIXED = [
    (PROMPT_A, P(**SEMI_AR)),  # exact
    (PROMPT_C, P(gen_length=8, block_length=8, steps=8, cfg_scale=1.5)),  # exact, CFG
    (PROMPT_B, P(**SEMI_AR, cache="dual", threshold=THRESHOLD)),
    (PROMPT_D, P(gen_length=16, block_length=4, steps=8, cache="prefix")),
    (PROMPT_A, P(gen_length=32, block_length=16, steps=8, cache="dual", factor=FACTOR, cfg_scale=0.5)),
    (PROMPT_C, P(gen_length=12, block_length=4, steps=12, cache="prefix", threshold=THRESHOLD, early_stop=True)),
    (PROMPT_B, P(gen_length=20, block_length=8, steps=7, temperature=0.7, remasking="random", seed=3, cache="dual")),
]


def test_a_batch_of_every_mode_phase_and_length_gives_each_row_its_solo_answer(demo):
    # Blocks of 4, 8 and 16 and reveal counts that differ put the cached jobs at block starts
    # (full forwards) and mid-block (cached forwards) in the same steps, beside exact jobs.
    together = engine(demo, MIXED)
    for (prompt, params), got in zip(MIXED, together):
        assert got == engine(demo, [(prompt, params)])[0], params
        if params.temperature == 0:
            assert got == reference(demo, prompt, params), params
        else:
            assert got[0] == reference(demo, prompt, params)[0], params


@pytest.mark.parametrize(
    "reveal", [{}, {"threshold": THRESHOLD}, {"factor": FACTOR}], ids=["fixed", "threshold", "factor"]
)
@pytest.mark.parametrize("cache", ["none", "prefix", "dual"])
def test_seeded_sampling_is_reproducible_and_batch_independent_in_every_mode(demo, cache, reveal):
    params = P(
        gen_length=16, block_length=8, steps=8, temperature=0.9, remasking="random", seed=1234, cache=cache, **reveal
    )
    solo = engine(demo, [(PROMPT_B, params)])[0]
    assert solo == engine(demo, [(PROMPT_B, params)])[0] == reference(demo, PROMPT_B, params)
    for position in (0, 2):
        rows = [MIXED[2], MIXED[6]]
        rows.insert(position, (PROMPT_B, params))
        assert engine(demo, rows)[position] == solo, position
    assert engine(demo, [(PROMPT_B, dataclasses.replace(params, seed=4321))])[0] != solo
