"""A step is a transaction: a step that raises leaves every job exactly as it was (canvas, block,
counters, generator state, scoring rows and sums), and the engine's retry of an out-of-memory
step as smaller groups gives every job the tokens of a run without faults. A job that fails
fails without the loop: the loop lives and its KV-cache pages go back. A KV pool that cannot be
allocated stops the engine's start."""

from __future__ import annotations

import copy
import dataclasses
import threading

import pytest
import torch

from server.engine.denoiser import Denoiser, generate_batch
from server.engine.engine import Engine, EngineSettings
from server.engine.errors import PoolTooLarge
from server.engine.events import GenerationDone, JobFailed, ScoringDone
from server.engine.faults import FaultInjector, FaultyModel
from server.engine.full_canvas import DenoiseJob
from server.engine.likelihood import Scorer, ScoringJob, score_pairs
from server.engine.sampling_params import SamplingParams, ScoreParams

PROMPT = list(b"Hello there")


def denoise_state(job: DenoiseJob) -> dict:
    state = {k: copy.deepcopy(v) for k, v in vars(job).items() if k != "generator"}
    state["generator"] = None if job.generator is None else job.generator.get_state().clone()
    return state


def assert_same(before: dict, after: dict) -> None:
    assert before.keys() == after.keys()
    for key in before:
        if isinstance(before[key], torch.Tensor):
            assert torch.equal(before[key], after[key]), key
        else:
            assert before[key] == after[key], key


def with_faults(loaded, spec: str | None):
    return dataclasses.replace(loaded, model=FaultyModel(loaded.model, FaultInjector(spec)))


# Counted from the failing step's forward (one per step, whatever its rows). head_rows=1 gives
# each job an LM-head call of its own, and a `:head` fault strikes the step's last one: the two
# seeded jobs' tokens are already chosen (their generators drawn) when it raises.
@pytest.mark.parametrize("fault", ["oom@1", "oom@1:head", "die@1:head"])
def test_a_step_that_raises_leaves_every_job_as_it_was(tiny_model, fault):
    denoiser = Denoiser(with_faults(tiny_model, None), head_rows=1)
    seeded = dict(temperature=0.9, remasking="random")
    jobs = [
        denoiser.new_job(PROMPT, SamplingParams(gen_length=12, steps=6, **seeded, seed=3)),
        denoiser.new_job(
            PROMPT[:4], SamplingParams(gen_length=8, block_length=8, steps=4, cfg_scale=1.0, **seeded, seed=5)
        ),
        denoiser.new_job(PROMPT, SamplingParams(gen_length=16, block_length=8, steps=16)),
    ]
    assert len(denoiser.step(jobs).events) == 3
    assert denoiser.model.faults.forwards == 1  # three lengths, a CFG copy: one forward
    before = [denoise_state(job) for job in jobs]
    denoiser.model = FaultyModel(tiny_model.model, FaultInjector(fault))
    with pytest.raises(BaseException, match="injected"):
        denoiser.step(jobs)
    for job, state in zip(jobs, before):
        assert_same(state, denoise_state(job))
    # and the jobs go on to the answers of a run that never failed
    while any(not job.finished for job in jobs):
        denoiser.step([job for job in jobs if not job.finished])
    clean = generate_batch(tiny_model, [PROMPT, PROMPT[:4], PROMPT], [job.params for job in jobs])
    assert [job.answer for job in jobs] == clean


def score_state(job: ScoringJob) -> dict:
    return {
        "loglikelihoods": list(job.loglikelihoods),
        "is_greedy": list(job.is_greedy),
        "rows_done": job.rows_done,
        "mc_left": job.mc_left,
        "greedy": copy.deepcopy(job.greedy),
    }


@pytest.mark.parametrize("fault", ["oom@1", "oom@1:head"])
def test_a_scoring_step_that_raises_gives_its_rows_back(tiny_model, fault):
    pairs = [(PROMPT, list(b" once upon")), (PROMPT[:5], list(b"ab"))]
    params = ScoreParams(mc_num=6, batch_size=3, greedy=True, cfg_scale=0.5, seed=5)
    counting = Scorer(with_faults(tiny_model, None))
    counting.step([(counting.new_job(pairs, params), 4)])
    assert counting.model.faults.forwards == 1  # two lengths and their CFG copies: one forward
    scorer = Scorer(with_faults(tiny_model, fault))
    job = scorer.new_job(pairs, params)
    before = score_state(job)
    with pytest.raises(torch.OutOfMemoryError):
        scorer.step([(job, 4)])
    assert score_state(job) == before
    while not job.finished:
        scorer.step([(job, 4)])
    clean = score_pairs(tiny_model, pairs, params, max_rows=8)
    assert [r.is_greedy for r in job.results] == [r.is_greedy for r in clean]
    for got, want in zip(job.results, clean):  # the same rows, in forwards of other sizes
        assert got.loglikelihood == pytest.approx(want.loglikelihood, rel=1e-5)


def run_engine(loaded, requests: list[tuple[list[int], SamplingParams]], **settings) -> tuple[list[object], Engine]:
    """Submit every request before the loop starts (so they share the first step), wait for
    every answer and stop the engine; each request's last event, and the stopped engine."""
    engine = Engine(loaded, EngineSettings(**settings))
    results: list[list] = [[] for _ in requests]
    done = threading.Semaphore(0)

    def sink_for(i):
        def sink(event):
            results[i].append(event)
            if isinstance(event, (GenerationDone, ScoringDone, JobFailed)):
                done.release()

        return sink

    for i, (prompt, params) in enumerate(requests):
        engine.submit_generate(prompt, params, sink_for(i), report_steps=False)
    engine.start()
    try:
        for _ in requests:
            assert done.acquire(timeout=60)
        assert engine.alive
    finally:
        engine.stop()
    return [events[-1] for events in results], engine


def test_oom_in_the_head_with_jobs_at_different_points_loses_nothing(tiny_model):
    # Step 4 finishes the first job and is mid-block for the others; its LM head runs out of
    # memory after the body ran. The retry as smaller groups must give every job its tokens.
    requests = [
        (PROMPT, SamplingParams(gen_length=4, block_length=4, steps=4)),
        (PROMPT, SamplingParams(gen_length=16, block_length=8, steps=16)),
        (PROMPT[:8], SamplingParams(gen_length=16, block_length=8, steps=8, temperature=0.8, seed=11)),
        (
            PROMPT[:6],
            SamplingParams(gen_length=12, block_length=12, steps=6, cfg_scale=1.0, remasking="random", seed=2),
        ),
    ]
    clean = generate_batch(tiny_model, [p for p, _ in requests], [s for _, s in requests])
    # oom@4-5: the step of four jobs, then its first half (two jobs) run out; the single jobs run.
    for fault in ("oom@4:head", "oom@4", "oom@4-5:head"):
        finals, _ = run_engine(tiny_model, requests, inject_faults=fault)
        assert all(isinstance(event, GenerationDone) for event in finals), (fault, finals)
        assert [event.token_ids for event in finals] == clean, fault
        assert finals[0].steps == 4


CACHED = [
    (PROMPT, SamplingParams(gen_length=16, block_length=8, steps=8, cache="dual")),
    (PROMPT[:4], SamplingParams(gen_length=24, block_length=8, steps=12, cache="prefix", threshold=0.2)),
    (PROMPT[:6], SamplingParams(gen_length=16, block_length=4, steps=8, cache="dual", cfg_scale=1.0)),
    (PROMPT, SamplingParams(gen_length=8, block_length=8, steps=8)),  # exact
]


# Cached jobs at block starts and mid-block share the faulty steps with an exact one. A forward's
# error fails its own jobs (the step's: they share one forward); out-of-memory fails the jobs that
# still run out alone.
@pytest.mark.parametrize("fault", ["error@3", "oom@3-8", "oom@3-8:head"])
def test_a_fault_with_cached_jobs_in_flight_frees_their_cache(tiny_model, fault):
    finals, engine = run_engine(tiny_model, CACHED, inject_faults=fault)
    clean = generate_batch(tiny_model, [p for p, _ in CACHED], [s for _, s in CACHED])
    failed = [i for i, event in enumerate(finals) if isinstance(event, JobFailed)]
    assert any(CACHED[i][1].cache != "none" for i in failed), finals
    assert len(failed) == len(CACHED) if fault.startswith("error") else len(failed) < len(CACHED), finals
    for event, tokens in zip(finals, clean):
        if isinstance(event, JobFailed):
            assert event.code == "engine_error", event
        else:
            assert event.token_ids == tokens
    # the failed jobs' pages went back with them, the others' when they finished
    assert engine.metrics.registry.get_sample_value("llada_kv_cache_bytes") == 0


def test_a_pool_that_cannot_be_allocated_stops_the_start(tiny_model):
    # A cache budget beyond the address space (as one above a GPU's free memory): the engine is
    # not made, and the message says what to change.
    with pytest.raises(PoolTooLarge, match="lower --max-cache-memory"):
        Engine(tiny_model, EngineSettings(max_cache_bytes=2**52))


def test_fault_specs_name_forwards_ranges_and_the_head():
    faults = FaultInjector("error@2, oom@4-5:head, die@7, fatal@9")
    outcomes = []
    for _ in range(11):
        try:
            faults.before_forward()
            faults.after_forward(3)
            faults.before_head(3)
            outcomes.append("ok")
        except BaseException as exc:  # noqa: BLE001 - die is a BaseException on purpose
            outcomes.append(f"{type(exc).__name__}: {exc}")
    assert outcomes == [
        "ok",
        "InjectedFault: injected failure at forward 2",
        "ok",
        "OutOfMemoryError: injected out-of-memory at the LM head after forward 4",
        "OutOfMemoryError: injected out-of-memory at the LM head after forward 5",
        "ok",
        "InjectedDeath: injected engine death at forward 7",
        "ok",
        "DeviceFailure: injected device failure at forward 9: the device context is lost",
        "DeviceFailure: injected device failure at forward 10 (poisoned since forward 9): the device context is lost",
        "DeviceFailure: injected device failure at forward 11 (poisoned since forward 9): the device context is lost",
    ]
    faults = FaultInjector("oom@1:head")
    faults.before_forward()
    faults.after_forward(5)
    faults.before_head(2)  # the step's earlier head calls run: their tokens get chosen
    with pytest.raises(torch.OutOfMemoryError, match="LM head after forward 1"):
        faults.before_head(3)  # the call that reads the forward's last rows
    for bad in ("boom@1", "oom@0", "oom@5-3", "oom", "oom@2:tail"):
        with pytest.raises(ValueError, match="KIND@N or KIND@N-M"):
            FaultInjector(bad)
