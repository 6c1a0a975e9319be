"""iLLaDA (GQA, a tied head, mask id 5, its own special tokens) and LLaDA-MoE served natively:
the engine loads each tiny checkpoint (tests/family.py, the published layouts) through the real
loader and gives the tokens of the independent plain references (tests/reference/model.py,
tests/reference/llada_moe.py) at temperature 0 in fp32, in every sampler and fast mode; in one
batch mixing lengths, CFG and modes every row equals its solo run; scoring equals the reference
estimator; the checkpoints' own code is never run."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from server.engine.denoiser import run_jobs
from server.engine.likelihood import score_pairs
from server.engine.loader import load_checkpoint
from server.engine.sampling_params import SamplingParams as P
from server.engine.sampling_params import ScoreParams
from tests import family
from tests.reference import model as reference
from tests.reference.fast_sampler import reference_fast_generate_for
from tests.reference.likelihood import reference_loglikelihood
from tests.reference.sampler import reference_generate_for

WRITERS = {"illada": family.write_illada_checkpoint, "llada_moe": family.write_llada_moe_checkpoint}
THRESHOLD, FACTOR = 0.3, 2.5


class Family:
    def __init__(self, folder):
        self.folder = folder
        self.loaded = load_checkpoint(folder, device="cpu", dtype="float32")
        self.state, self.cfg = family.load_checkpoint(folder)
        codec = self.loaded.codec
        self.prompts = [codec.encode(text) for text in ("Hello there", "Once upon", "2+2=", "The quick fox")]
        self.chat = codec.encode_chat([{"role": "user", "content": "Say hi."}])

    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        return reference.reference_logits(self.state, self.cfg, ids)

    def reference(self, prompt: list[int], params: P) -> tuple[list[int], int | None]:
        if params.approximate or params.early_stop:
            return reference_fast_generate_for(self.state, self.cfg, prompt, params, self.loaded.special)
        return reference_generate_for(self.logits, prompt, params, self.loaded.special), None

    def engine(self, requests: list[tuple[list[int], P]]) -> list[tuple[list[int], int]]:
        jobs = run_jobs(self.loaded, [prompt for prompt, _ in requests], [params for _, params in requests])
        return [(job.answer, job.steps_done) for job in jobs]


@pytest.fixture(scope="module", params=list(WRITERS))
def member(request, tmp_path_factory) -> Family:
    return Family(WRITERS[request.param](tmp_path_factory.mktemp(request.param), seed=3))


SEMI_AR = dict(gen_length=24, block_length=8, steps=12)
CASES = {
    "fixed_length": P(gen_length=16, block_length=16, steps=8, seed=0),
    "semi_autoregressive": P(**SEMI_AR, seed=0),
    "cfg": P(gen_length=16, block_length=8, steps=8, cfg_scale=1.0, seed=0),
    "random_remasking": P(**SEMI_AR, remasking="random", seed=5),
    "eos_flags": P(**SEMI_AR, logits_eos_inf=True, confidence_eos_eot_inf=True, seed=0),
    "prefix": P(**SEMI_AR, cache="prefix"),
    "dual": P(**SEMI_AR, cache="dual"),
    "dual_threshold": P(**SEMI_AR, cache="dual", threshold=THRESHOLD),
    "prefix_factor": P(**SEMI_AR, cache="prefix", factor=FACTOR),
    "dual_cfg_threshold": P(gen_length=16, block_length=8, steps=8, cfg_scale=1.0, cache="dual", threshold=THRESHOLD),
    "early_stop_dual": P(**SEMI_AR, cache="dual", threshold=THRESHOLD, early_stop=True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_solo_matches_the_reference(member, case):
    params = CASES[case]
    prompt = member.prompts[len(case) % len(member.prompts)]
    answer, nfe = member.reference(prompt, params)
    ((got, steps),) = member.engine([(prompt, params)])
    assert got == answer
    if nfe is not None:
        assert steps == nfe


def test_constraints_are_kept(member):
    pinned = member.loaded.codec.encode(" pinned")
    params = P(**SEMI_AR, constraints=tuple((3 + i, t) for i, t in enumerate(pinned)), seed=0)
    answer, _ = member.reference(member.prompts[0], params)
    ((got, _),) = member.engine([(member.prompts[0], params)])
    assert got == answer and got[3 : 3 + len(pinned)] == pinned


def test_a_mixed_batch_equals_each_row_alone(member):
    cases = ["semi_autoregressive", "cfg", "dual_threshold", "prefix_factor", "dual_cfg_threshold", "fixed_length"]
    requests = [(member.prompts[i % 4] + [member.chat[0]] * i, CASES[case]) for i, case in enumerate(cases)]
    together = member.engine(requests)
    alone = [member.engine([request])[0] for request in requests]
    assert together == alone


def test_the_special_ids_are_the_checkpoints(member):
    special = member.loaded.special
    if member.cfg["architectures"] == ["LLaDAModelLM"]:
        ids = (family.ILLADA_MASK_ID, family.ILLADA_EOS_ID, family.ILLADA_EOT_ID, family.ILLADA_BOS_ID)
    else:
        ids = (family.LLADA_MOE_MASK_ID, family.LLADA_MOE_EOS_ID, family.LLADA_MOE_EOT_ID, family.LLADA_MOE_BOS_ID)
    assert (special.mask, special.eos, special.eot, special.bos) == ids
    assert member.loaded.info.family == member.cfg["architectures"][0]


def test_one_token_loglikelihood_equals_the_reference_estimator(member):
    prompt, target = member.prompts[0], member.prompts[1][:1]
    for cfg_scale in (0.0, 1.0):
        params = ScoreParams(mc_num=4, batch_size=2, cfg_scale=cfg_scale, greedy=True, seed=0)
        (got,) = score_pairs(member.loaded, [(prompt, target)], params)
        expected = reference_loglikelihood(
            member.logits,
            prompt,
            target,
            mc_num=1,
            batch_size=1,
            cfg_scale=cfg_scale,
            mask_id=member.loaded.special.mask,
            generator=torch.Generator().manual_seed(0),
        )
        assert got.loglikelihood == pytest.approx(expected, rel=1e-5, abs=1e-5)


@pytest.mark.parametrize("writer", list(WRITERS))
def test_a_checkpoints_own_code_is_never_run(writer, tmp_path):
    folder = WRITERS[writer](tmp_path / writer, with_remote_code=True)
    loaded = load_checkpoint(folder, device="cpu", dtype="float32")
    run_jobs(loaded, [loaded.codec.encode("hi")], [P(gen_length=4, steps=2)])
    assert not family.remote_code_marker(folder).exists()


def test_an_unsupported_config_value_stops_the_load_naming_it(tmp_path):
    folder = family.write_illada_checkpoint(tmp_path / "alibi")
    config = dataclasses.replace  # noqa: F841 - the edit below is plain JSON
    path = folder / "config.json"
    raw = __import__("json").loads(path.read_text())
    raw["alibi"] = True
    path.write_text(__import__("json").dumps(raw))
    with pytest.raises(Exception, match="alibi=True is not supported"):
        load_checkpoint(folder, device="cpu", dtype="float32")
