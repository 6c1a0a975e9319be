"""The sampler's math (pure functions), the denoising loop's behaviour on a real tiny model, and the
Monte-Carlo log-likelihood / greedy check."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from server.engine import schedule
from server.engine.demo import build_demo, demo_config
from server.engine.denoiser import Denoiser, generate_batch
from server.engine.likelihood import ScoreParams, Scorer, ScoringJob, score_pairs
from server.engine.packed import RowInput
from server.engine.runner import Work, head_chunks
from server.engine.sampler import ChoiceJob, choose, guide, unpack
from server.engine.sampling_params import SamplingParams

TINY = {"d_model": 32, "n_layers": 1, "n_heads": 2, "n_kv_heads": 1, "mlp_hidden_size": 64}
MASK, EOS, EOT = 126336, 126081, 126348


@pytest.fixture(scope="module")
def demo():
    return build_demo(demo_config(**TINY), seed=0)


@pytest.fixture(scope="module")
def prompt(demo) -> list[int]:
    return demo.codec.encode_chat([{"role": "user", "content": "Tell me a story."}])


# --- pure math ---------------------------------------------------------------------------------


def test_block_spans():
    assert schedule.block_spans(32, 8) == [(0, 8), (8, 16), (16, 24), (24, 32)]
    assert schedule.block_spans(20, 8) == [(0, 8), (8, 16), (16, 20)]
    assert schedule.block_spans(5, 8) == [(0, 5)]
    assert schedule.block_spans(8, 8) == [(0, 8)]
    assert schedule.block_spans(3, 1) == [(0, 1), (1, 2), (2, 3)]


def test_steps_per_block():
    assert schedule.steps_per_block(128, 4) == [32, 32, 32, 32]
    assert schedule.steps_per_block(7, 3) == [3, 2, 2]  # remainder to the first blocks
    assert schedule.steps_per_block(10, 4) == [3, 3, 2, 2]
    assert schedule.steps_per_block(2, 4) == [1, 1, 1, 1]  # never a block without a step
    assert schedule.steps_per_block(1, 1) == [1]


def test_transfer_schedule_follows_reference_rule():
    def reference(masked: int, steps: int) -> list[int]:  # LLaDA's get_num_transfer_tokens
        base, remainder = masked // steps, masked % steps
        return [base + 1 if i < remainder else base for i in range(steps)]

    for masked in range(20):
        for steps in range(1, 12):
            expected = [k for k in reference(masked, steps) if k > 0]
            assert schedule.transfer_schedule(masked, steps) == expected
            assert sum(schedule.transfer_schedule(masked, steps)) == masked
    assert schedule.transfer_schedule(8, 3) == [3, 3, 2]
    assert schedule.transfer_schedule(3, 5) == [1, 1, 1]  # zero-token steps are dropped
    assert schedule.transfer_schedule(0, 4) == []


def pick(logits: torch.Tensor, jobs: list[ChoiceJob], width: int | None = None) -> list[tuple]:
    """choose() read back: per job (indices by falling confidence, tokens, probabilities) of the
    tokens it reveals."""
    width = width or max(job.candidates for job in jobs)
    return [unpack(row) for row in choose(logits, jobs, EOS, (EOS, EOT), width).tolist()]


def test_greedy_choice_is_argmax_ranked_by_softmax_probability():
    logits = torch.randn(16, 300, generator=torch.Generator().manual_seed(1))
    ((order, tokens, probabilities),) = pick(logits.clone(), [ChoiceJob(16, count=16)])
    assert [tokens[order.index(i)] for i in range(16)] == logits.argmax(-1).tolist()
    expected = torch.softmax(logits, -1).max(-1).values
    assert order == torch.sort(expected.double(), descending=True, stable=True).indices.tolist()
    assert torch.allclose(torch.tensor(probabilities), expected[order])
    (three,) = pick(logits.clone(), [ChoiceJob(16, count=3)])
    assert three[0] == order[:3]


def test_gumbel_choice_draws_float64_noise_from_each_jobs_generator():
    logits = torch.randn(16, 300, generator=torch.Generator().manual_seed(2)) * 3
    job = ChoiceJob(16, count=16, temperature=0.7, generator=torch.Generator().manual_seed(11))
    ((order, tokens, _),) = pick(logits.clone(), [job])
    # The reference's add_gumbel_noise: exp(logits) / (-log u)^T, all in float64.
    u = torch.rand(logits.shape, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    expected = (logits.double().exp() / (-torch.log(u)) ** 0.7).argmax(-1)
    assert [tokens[order.index(i)] for i in range(16)] == expected.tolist()
    # Two jobs in one call draw from their own generators, in order: each gets what it gets alone,
    # also across the 64-row sampling slices.
    long = torch.randn(80, 300, generator=torch.Generator().manual_seed(3))
    jobs = [
        ChoiceJob(80, count=80, temperature=1.0, generator=torch.Generator().manual_seed(5)),
        ChoiceJob(16, count=16, temperature=0.7, generator=torch.Generator().manual_seed(11)),
    ]
    together = pick(torch.cat([long, logits]), jobs, width=80)
    alone = pick(long.clone(), [ChoiceJob(80, count=80, temperature=1.0, generator=torch.Generator().manual_seed(5))])
    assert together == [
        alone[0],
        pick(logits.clone(), [job.__class__(**{**vars(job), "generator": torch.Generator().manual_seed(11)})])[0],
    ]
    flat = pick(
        torch.zeros(64, 1000), [ChoiceJob(64, count=64, temperature=1.0, generator=torch.Generator().manual_seed(1))]
    )
    assert len(set(flat[0][1])) > 32  # a flat distribution is sampled, not argmax'd to token 0


def test_guidance_and_the_eos_flags():
    cond, uncond = torch.tensor([[1.0, 2.0, -3.0]]), torch.tensor([[0.5, 4.0, -3.0]])
    guided = cond.clone()
    guide(guided, uncond, [0], [3.0])  # cfg_scale 2
    assert torch.equal(guided, uncond + 3.0 * (cond - uncond))
    logits = torch.zeros(4, EOT + 1)
    logits[:, EOS] = 5.0  # EOS is every row's argmax
    logits[:, 7] = 4.0
    ((_, tokens, _),) = pick(logits.clone(), [ChoiceJob(4, count=4)])
    assert tokens == [EOS] * 4
    ((_, tokens, _),) = pick(logits.clone(), [ChoiceJob(4, count=4, logits_eos_inf=True)])
    assert tokens == [7] * 4
    # confidence_eos_eot_inf: EOS rows rank last, whatever their probability
    logits[0, EOS] = 3.0  # row 0's argmax becomes token 7
    ((order, tokens, _),) = pick(logits.clone(), [ChoiceJob(4, count=1, exclude_stops=True)])
    assert order == [0] and tokens == [7]


def test_random_remasking_ranks_by_uniform_draws_and_ties_go_to_the_lower_index():
    logits = torch.zeros(6, 10)
    ((order, _, _),) = pick(logits.clone(), [ChoiceJob(6, count=6)])
    assert order == [0, 1, 2, 3, 4, 5]  # equal confidences: ties to the lower position
    job = ChoiceJob(6, count=6, random_remasking=True, generator=torch.Generator().manual_seed(0))
    ((order, _, _),) = pick(logits.clone(), [job])
    draws = torch.rand(6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert order == torch.sort(draws, descending=True, stable=True).indices.tolist()


def confident(probabilities: list[float], vocab: int = 64) -> torch.Tensor:
    """Logits whose argmax (token 0) has exactly these softmax probabilities."""
    rows = []
    for p in probabilities:
        rest = (1 - p) / (vocab - 1)
        rows.append(torch.tensor([p] + [rest] * (vocab - 1)).log())
    return torch.stack(rows)


def test_threshold_and_factor_reveal_counts():
    # threshold: every candidate at least this confident, and always the best one
    logits = confident([0.95, 0.4, 0.92, 0.1])
    assert [len(c[0]) for c in pick(logits.clone(), [ChoiceJob(4, threshold=0.9)])] == [2]
    assert [len(c[0]) for c in pick(confident([0.3, 0.2]), [ChoiceJob(2, threshold=0.9)])] == [1]
    # factor 1: rank k passes when c_k >= 1 - 1/(k+1) (2/3, 3/4, 4/5 for ranks 2, 3, 4)
    cases = {
        (0.9, 0.8, 0.76, 0.1, 0.1): 3,  # rank 4 fails
        (0.9, 0.5, 0.4): 1,  # rank 2 fails
        (0.9, 0.7, 0.1): 3,  # only the last rank fails: all are revealed (the published quirk)
        (0.5, 0.9, 0.9, 0.9, 0.9): 5,  # likewise, sorted: 0.9, 0.9, 0.9, 0.9, 0.5
        (0.9, 0.81, 0.85, 0.9): 4,  # none fails
    }
    for confidences, expected in cases.items():
        ((order, _, _),) = pick(confident(list(confidences)), [ChoiceJob(len(confidences), factor=1.0)])
        assert len(order) == expected, confidences
    # jobs of every rule in one call, each padded to the widest
    jobs = [ChoiceJob(4, threshold=0.9), ChoiceJob(3, factor=1.0), ChoiceJob(2, count=2)]
    logits = torch.cat([confident([0.95, 0.4, 0.92, 0.1]), confident([0.9, 0.7, 0.1]), confident([0.5, 0.6])])
    assert [len(c[0]) for c in pick(logits, jobs)] == [2, 3, 2]


# --- the denoising loop ------------------------------------------------------------------------


def run(demo, prompt, params: SamplingParams):
    denoiser = Denoiser(demo)
    job = denoiser.new_job(prompt, params)
    events, finished = [], []
    while not job.finished:
        (event,) = denoiser.step([job]).events.values()
        events.append(event)
        finished.append(event.finished)  # read now: `finished` is the job's live state
    return job, events, finished


@pytest.mark.parametrize("remasking", ["low_confidence", "random"])
def test_step_events_semi_autoregressive(demo, prompt, remasking):
    params = SamplingParams(gen_length=20, block_length=8, steps=7, remasking=remasking, seed=4)
    job, events, finished = run(demo, prompt, params)
    spans = schedule.block_spans(20, 8)
    # 3 blocks get [3, 2, 2] steps; 8 masks over 3 steps, 8 over 2, 4 over 2: 7 events.
    assert len(events) == 7
    assert [len(e.reveals) for e in events] == [3, 3, 2, 4, 4, 2, 2]
    assert [e.block for e in events] == [0, 0, 0, 1, 1, 2, 2]
    assert [e.step for e in events] == list(range(1, 8))
    masked = [e.masked for e in events]
    assert masked == [20 - sum(len(e.reveals) for e in events[: i + 1]) for i in range(7)]
    assert masked[-1] == 0 and all(a > b for a, b in itertools.pairwise(masked))
    assert finished == [False] * 6 + [True]
    seen: set[int] = set()
    answer = job.answer
    for event in events:
        start, end = spans[event.block]
        for reveal in event.reveals:
            assert start <= reveal.index < end
            assert reveal.index not in seen  # revealed tokens are final
            seen.add(reveal.index)
            assert 0.0 < reveal.confidence <= 1.0
            assert answer[reveal.index] == reveal.token_id != MASK
        # Semi-AR: once a block is under way, every earlier block is complete.
        assert all(i in seen for i in range(spans[event.block][0]))
    assert seen == set(range(20))
    assert MASK not in answer


def test_step_count_when_steps_exceed_masks(demo, prompt):
    _, events, _ = run(demo, prompt, SamplingParams(gen_length=4, block_length=4, steps=9))
    assert [len(e.reveals) for e in events] == [1, 1, 1, 1]  # the zero-token steps are not run
    _, events, _ = run(demo, prompt, SamplingParams(gen_length=6, block_length=2, steps=2))
    assert [len(e.reveals) for e in events] == [2, 2, 2]  # at least one step per block


def test_greedy_generation_is_deterministic_and_batch_independent(demo, prompt):
    greedy = SamplingParams(gen_length=12, block_length=4, steps=12)
    sampled = SamplingParams(gen_length=12, block_length=12, steps=6, temperature=0.8, remasking="random", seed=9)
    other = demo.codec.encode("A much longer raw prompt, for a base model, that pads the batch.")
    alone = [generate_batch(demo, [prompt], [p])[0] for p in (greedy, sampled)]
    together = generate_batch(demo, [prompt, other, prompt], [greedy, sampled, sampled])
    assert together[0] == alone[0]
    assert generate_batch(demo, [prompt], [greedy])[0] == alone[0]
    assert generate_batch(demo, [prompt], [sampled])[0] == alone[1]
    assert together[2] == alone[1]  # a seeded job draws the same numbers whatever shares its forward


def test_constraints_are_kept_and_never_reported(demo, prompt):
    word = demo.codec.encode(" Once")
    constraints = tuple((3 + i, t) for i, t in enumerate(word)) + ((15, EOS),)
    params = SamplingParams(gen_length=16, block_length=8, steps=8, constraints=constraints)
    job, events, _ = run(demo, prompt, params)
    answer = job.answer
    for position, token in constraints:
        assert answer[position] == token
    revealed = [r.index for e in events for r in e.reveals]
    assert not set(revealed) & {p for p, _ in constraints}
    assert sorted(revealed) == sorted(set(range(16)) - {p for p, _ in constraints})
    assert events[0].masked == 16 - len(constraints) - len(events[0].reveals)


def test_fully_constrained_job_finishes_without_steps(demo, prompt):
    constraints = tuple((i, ord("a") + i) for i in range(6))
    params = SamplingParams(gen_length=6, block_length=2, steps=6, constraints=constraints)
    job = Denoiser(demo).new_job(prompt, params)
    assert job.finished and job.steps_done == 0
    assert job.answer == [t for _, t in constraints]
    assert generate_batch(demo, [prompt], [params]) == [[t for _, t in constraints]]


@pytest.mark.parametrize("cfg_scale", [0.0, 1.5])
def test_lm_head_runs_only_on_block_candidates(demo, prompt, monkeypatch, cfg_scale):
    calls: list[int] = []
    real = demo.model.logits

    def spy(hidden):
        calls.append(hidden.shape[0])
        return real(hidden)

    monkeypatch.setattr(demo.model, "logits", spy)
    denoiser = Denoiser(demo)
    params = [
        SamplingParams(gen_length=12, block_length=4, steps=6, cfg_scale=cfg_scale),
        SamplingParams(gen_length=10, block_length=5, steps=4, constraints=((1, 65),)),
    ]
    jobs = [denoiser.new_job(prompt, params[0]), denoiser.new_job(prompt[:7], params[1])]
    total_steps = 0
    while any(not j.finished for j in jobs):
        running = [j for j in jobs if not j.finished]
        expected = []
        for job in running:
            start, end = job.blocks[job.block]
            candidates = job.canvas[start:end].count(MASK)
            assert 0 < candidates <= job.params.block_length
            expected += [candidates] * job.rows
        calls.clear()
        denoiser.step(running)
        # One LM-head call for all jobs, on exactly their candidates (twice for a CFG job).
        assert calls == [sum(expected)]
        total_steps += 1
    assert total_steps == 6


# --- log-likelihood ----------------------------------------------------------------------------


def test_row_counts_follow_group_sizes(demo, prompt):
    target = demo.codec.encode(" once upon")
    pairs = [(prompt, target), (prompt, target[:1])]
    params = ScoreParams(mc_num=10, batch_size=4, seed=0)
    job = Scorer(demo).new_job(pairs, params)
    assert job.group_sizes(len(target)) == [4, 3, 3]  # ceil(10/4) = 3 groups, as equal as possible
    assert job.group_sizes(1) == [1]  # a one-token target is one exact row
    assert job.units == 10 + 1
    scorer, forwards, rows = Scorer(demo), 0, 0
    job = scorer.new_job(pairs, params)
    while not job.finished:
        rows += scorer.step([(job, 4)]).rows
        forwards += 1
    assert rows == job.rows_done == 11 and forwards == 3
    # CFG doubles the rows of each unit.
    scorer = Scorer(demo)
    job = scorer.new_job(pairs, ScoreParams(mc_num=10, batch_size=4, seed=0, cfg_scale=1.0))
    rows = 0
    while not job.finished:
        rows += scorer.step([(job, 4)]).rows
    assert rows == 22 and job.rows_done == 11


def test_mc_row_weights_make_an_unbiased_average():
    job = ScoringJob([([1, 2, 3], [4, 5, 6, 7, 8])], ScoreParams(mc_num=7, batch_size=3, seed=1), MASK)
    rows = list(job._draw_mc_rows())
    assert len(rows) == 7
    for row in rows:
        count = len(row.positions)
        assert 1 <= count <= 5
        assert all(row.ids[p] == MASK for p in row.positions) and row.ids[:3] == [1, 2, 3]
        assert row.ids.count(MASK) == count
        assert row.targets == [[1, 2, 3, 4, 5, 6, 7, 8][p] for p in row.positions]
    # Each weight is (L / masked) / (group size * groups): weight * masked / L sums to 1.
    assert math.isclose(sum(r.weight * len(r.positions) / 5 for r in rows), 1.0)


def test_one_token_target_is_exact(demo, prompt):
    target = [ord("H")]
    (result,) = score_pairs(demo, [(prompt, target)], ScoreParams(mc_num=128, batch_size=32, seed=0))
    with torch.inference_mode():
        logits = demo.model.full_logits(torch.tensor([prompt + [MASK]]))[0, -1]
    assert math.isclose(result.loglikelihood, float(logits.log_softmax(-1)[target[0]]), rel_tol=1e-5)


def test_likelihood_reproducible_and_independent_of_batching(demo, prompt):
    answer = demo.codec.encode(" once upon a")
    pairs = [(prompt, answer), (prompt[:9], answer[:3])]
    params = ScoreParams(mc_num=10, batch_size=4, seed=7)
    small = score_pairs(demo, pairs, params, max_rows=4)
    large = score_pairs(demo, pairs, params, max_rows=64)
    again = score_pairs(demo, pairs, params, max_rows=64)
    assert [r.loglikelihood for r in again] == [r.loglikelihood for r in large]
    for a, b in zip(small, large):
        assert a.loglikelihood < 0
        # Same rows drawn; only float32 rounding of different forward batch sizes may differ.
        assert math.isclose(a.loglikelihood, b.loglikelihood, rel_tol=1e-6)
    other_seed = score_pairs(demo, pairs, ScoreParams(mc_num=10, batch_size=4, seed=8))
    assert other_seed[0].loglikelihood != large[0].loglikelihood


def test_greedy_check(demo, prompt):
    length = 6
    params = SamplingParams(gen_length=length, steps=length, block_length=length, temperature=0.0)
    own = generate_batch(demo, [prompt], [params])[0]
    assert MASK not in own
    changed = list(own)
    changed[length // 2] = ord("Z") if own[length // 2] != ord("Z") else ord("Y")
    results = score_pairs(
        demo, [(prompt, own), (prompt, changed)], ScoreParams(mc_num=4, batch_size=2, greedy=True, seed=0)
    )
    assert results[0].is_greedy is True
    assert results[1].is_greedy is False
    assert results[0].loglikelihood < 0
    (plain,) = score_pairs(demo, [(prompt, own)], ScoreParams(mc_num=4, batch_size=2, seed=0))
    assert plain.is_greedy is None


def test_head_chunks_bound_the_rows_of_one_lm_head_call():
    works = [Work(None, RowInput([0]), list(range(n))) for n in (300, 200, 100, 600, 5)]
    chunks = head_chunks(works, 512)
    assert [[len(works[i].positions) for i in c] for c in chunks] == [[300, 200], [100], [600], [5]]
    # a CFG job puts its candidates through twice
    guided = [
        Work(None, RowInput([0]), list(range(200)), uncond=RowInput([0])),
        Work(None, RowInput([0]), list(range(200))),
    ]
    assert [len(c) for c in head_chunks(guided, 512)] == [1, 1]
