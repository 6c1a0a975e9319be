"""LLaDA2 served natively (block diffusion with the exact block cache): the engine loads a tiny
checkpoint in the published layout (tests/family.py) through the real loader and, at temperature 0
in fp32, gives the tokens of the independent plain reference (tests/reference/llada2.py: the
model's own `generate`, the whole window recomputed every step, one sequence at a time) under
2.0's rules and 2.1's editing; requests of mixed settings sharing steps each equal their solo
run; seeded sampling is reproducible whatever shares the step; pages are freed however a
request ends."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from server.engine.denoiser import Denoiser, generate_batch, standalone
from server.engine.engine import Engine, EngineSettings
from server.engine.events import GenerationDone
from server.engine.faults import FaultInjector, FaultyModel
from server.engine.loader import load_checkpoint
from server.engine.sampling_params import SamplingParams as P
from tests import family
from tests.reference.llada2 import LLaDA2Reference, generate_for
from tests.support import wait_for

pytestmark = pytest.mark.usefixtures("one_thread")

GEN = 70  # three blocks of 32 past a short prompt: the last one beyond gen_length


@pytest.fixture(scope="module")
def llada2(tmp_path_factory):
    folder = family.write_llada2_checkpoint(tmp_path_factory.mktemp("llada2") / "llada2")
    return load_checkpoint(folder, device="cpu", dtype="float32"), LLaDA2Reference.from_folder(folder)


def prompts(loaded) -> dict[str, list[int]]:
    codec = loaded.codec
    chat = codec.encode_chat([{"role": "user", "content": "Tell me a story about a fox."}])
    return {
        "inside_a_block": codec.encode("Once upon a time, in a forest"),
        "on_a_boundary": codec.encode("z" * 64),  # 64 tokens: the answer starts a block
        "chat": chat,
    }


def reference_answer(ref: LLaDA2Reference, loaded, prompt: list[int], params: P) -> list[int]:
    return generate_for(ref, prompt, params, loaded.special.mask, loaded.special.eos)


CASES = {
    "threshold_0.95": P(gen_length=GEN, steps=32, threshold=0.95),
    "threshold_0.5_steps_8": P(gen_length=GEN, steps=8, threshold=0.5),
    "threshold_1.0": P(gen_length=GEN, steps=32, threshold=1.0),
    "threshold_0.5_early_stop": P(gen_length=GEN, steps=32, threshold=0.5, early_stop=True),
    "steps_8_early_stop": P(gen_length=GEN, steps=8, threshold=0.95, early_stop=True),
    "editing_quality": P(gen_length=GEN, threshold=0.7, editing_threshold=0.5),
    "editing_speed": P(gen_length=GEN, threshold=0.5, editing_threshold=0.0, max_post_steps=4),
    "editing_no_post_steps_early_stop": P(
        gen_length=GEN, threshold=0.5, editing_threshold=0.5, max_post_steps=0, early_stop=True
    ),
}


@pytest.mark.parametrize("where", ["inside_a_block", "on_a_boundary", "chat"])
@pytest.mark.parametrize("case", list(CASES))
def test_engine_gives_the_reference_tokens(llada2, where, case):
    loaded, ref = llada2
    prompt, params = prompts(loaded)[where], CASES[case]
    assert generate_batch(loaded, [prompt], [params])[0] == reference_answer(ref, loaded, prompt, params)


def test_the_checkpoint_makes_the_rules_matter(llada2):
    """The cases above would prove little if every iteration committed one token or all of them,
    if nothing were edited, or if no answer held EOS: on the tiny checkpoint they all happen."""
    loaded, _ = llada2
    p = prompts(loaded)
    requests = [(prompt, CASES[case]) for prompt in p.values() for case in ("threshold_0.95", "editing_speed")]
    denoiser, jobs = standalone(loaded, [r[0] for r in requests], [r[1] for r in requests])
    per_iteration, edits = [], 0
    for job in jobs:
        job.report_steps = True
    while not all(job.finished for job in jobs):
        for event in denoiser.step([job for job in jobs if not job.finished]).events.values():
            per_iteration.append(sum(not reveal.edit for reveal in event.reveals))
            edits += sum(reveal.edit for reveal in event.reveals)
    assert max(per_iteration) > 1 and min(per_iteration) <= 1  # threshold passes vary
    assert edits > 0
    answers = [job.answer for job in jobs]
    assert any(answer[-1] == loaded.special.eos for answer in answers)
    assert any(len(answer) == GEN and loaded.special.eos not in answer for answer in answers)


def test_mixed_requests_sharing_steps_each_equal_their_solo_run(llada2):
    loaded, _ = llada2
    p = prompts(loaded)
    requests = [
        (p["inside_a_block"], CASES["threshold_0.95"]),
        (p["on_a_boundary"], CASES["threshold_0.5_steps_8"]),
        (p["chat"], CASES["editing_quality"]),
        (p["inside_a_block"][:5], P(gen_length=40, steps=32, threshold=0.5, early_stop=True)),
        (p["chat"], CASES["editing_speed"]),
        (p["on_a_boundary"][:40], P(gen_length=20, steps=4, threshold=None)),
        (p["inside_a_block"], P(gen_length=33, block_length=16, steps=16, threshold=0.9)),
        (p["chat"], P(gen_length=GEN, temperature=0.8, top_k=20, top_p=0.9, seed=7)),
    ]
    together = generate_batch(loaded, [r[0] for r in requests], [r[1] for r in requests])
    alone = [generate_batch(loaded, [prompt], [params])[0] for prompt, params in requests]
    assert together == alone


def test_seeded_sampling_is_reproducible_whatever_shares_the_step(llada2):
    loaded, _ = llada2
    p = prompts(loaded)
    sampled = P(gen_length=GEN, temperature=1.0, top_k=8, top_p=0.95, seed=11, threshold=0.5)
    other = P(gen_length=30, temperature=0.7, seed=3, editing_threshold=0.3)
    alone = generate_batch(loaded, [p["chat"]], [sampled])[0]
    assert generate_batch(loaded, [p["inside_a_block"], p["chat"], p["chat"]], [other, sampled, other])[1] == alone
    reseeded = generate_batch(loaded, [p["chat"]], [dataclasses.replace(sampled, seed=12)])[0]
    assert reseeded != alone  # the seed matters


def job_state(job) -> tuple:
    generator = job.generator.get_state().tolist() if job.generator is not None else None
    return list(job.canvas), job.block, job.kept, job.iteration, job.post_steps, generator


@pytest.mark.parametrize("fault", ["oom@2", "oom@2:head"])
def test_a_step_that_raises_leaves_every_job_as_it_was(llada2, fault):
    loaded, _ = llada2
    prompt = prompts(loaded)["chat"]
    params = [CASES["editing_quality"], P(gen_length=GEN, temperature=0.9, seed=1), CASES["threshold_0.95"]]
    clean = generate_batch(loaded, [prompt] * 3, params)
    denoiser, jobs = standalone(loaded, [prompt] * 3, params)
    real = denoiser.model
    denoiser.model = FaultyModel(real, FaultInjector(fault))
    denoiser.step(jobs)
    before = [job_state(job) for job in jobs]
    with pytest.raises(torch.OutOfMemoryError):
        denoiser.step(jobs)
    assert [job_state(job) for job in jobs] == before
    denoiser.model = real
    while not all(job.finished for job in jobs):
        denoiser.step([job for job in jobs if not job.finished])
    assert [job.answer for job in jobs] == clean


def test_early_stop_frees_its_pages_and_the_gauge_returns_to_zero(llada2):
    loaded, _ = llada2
    engine = Engine(loaded, EngineSettings(max_cache_bytes=64 * 2**20))
    engine.start()
    try:
        prompt = prompts(loaded)["inside_a_block"]
        done = []
        params = P(gen_length=200, steps=32, threshold=0.5, early_stop=True)
        engine.submit_generate(prompt, params, done.append, report_steps=False)
        wait_for(lambda: done, what="the answer")
        (event,) = done
        assert isinstance(event, GenerationDone)
        wait_for(lambda: engine.scheduler.cache_pages_in_use == 0, what="the pages to be freed")
        engine._update_gauges()
        assert engine.metrics.registry.get_sample_value("llada_kv_cache_bytes") == 0
        assert Denoiser(loaded).cache_pages(len(prompt), params) > 0
    finally:
        engine.stop()
