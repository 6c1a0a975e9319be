"""The built-in demo model (no --model): the trained weights shipped in the package load as a full
LLaDA model, answer a chat request with text that stops, score held-out documentation text
better than the random-weight model by the margin docs/BENCHMARKS.md states, and beat the demo
model they replaced (67b0ec7's, issue 23) on held-out text and on telling questions apart."""

from __future__ import annotations

import pytest
import torch

from server.engine.demo import DEMO_NAME, DEMO_WEIGHTS, build_demo, load_demo
from server.engine.sampling_params import SamplingParams
from server.engine.startup import load_model
from training.quality import ANSWER_SETTINGS, answer_figures, bits_per_byte, chat_answers, held_out_pairs, question_sets

# docs/BENCHMARKS.md "The demo model": trained 3.27 against random 18.59 bits per byte on 64 passages;
# asserted with room for the fewer passages and samples drawn here.
ELBO_MARGIN_BITS = 10.0
QUESTIONS = ["What does json.dumps do?", "Explain os.path.join.", "What is the if topic?"]
# The demo model before issue 23 (67b0ec7: 2.3 M parameters, 24 CPU-minutes) on exactly the
# measures below: ELBO of the first 16 held-out passages, mc_num 16, seed 0 (seed 1: 3.441; the
# shipped model 2.715 and 2.734), and 84 distinct answers to 100 distinct train questions.
PREVIOUS_ELBO_BITS = 3.377
PREVIOUS_ELBO_SEED1 = 3.441
# Far outside the estimate's noise: between seeds it moves by PREVIOUS_ELBO_SEED1 - PREVIOUS_ELBO_BITS.
ELBO_GAIN_BITS = 0.3
ASKED = 24


@pytest.fixture(scope="module")
def demo():
    return load_demo()


def test_the_shipped_weights_are_small_and_the_server_loads_them_without_a_model(demo):
    assert DEMO_WEIGHTS.stat().st_size <= 20_000_000
    assert demo.name == DEMO_NAME and demo.config.vocab_size == 126464
    assert demo.model.model.transformer.ff_out.weight.shape[0] == 126464
    assert (demo.special.mask, demo.special.eos, demo.special.eot) == (126336, 126081, 126348)
    served = load_model(None, device="cpu", dtype="float32")
    for name, tensor in demo.model.state_dict().items():
        assert torch.equal(tensor, served.model.state_dict()[name]), name


def test_a_chat_answer_is_printable_text_that_stops_before_gen_length(demo):
    gen_length = 64
    answers = chat_answers(demo, QUESTIONS, SamplingParams(gen_length=gen_length, steps=64, block_length=32))
    for question, (tokens, text, _) in zip(QUESTIONS, answers):
        stop = next(i for i, t in enumerate(tokens) if t in demo.special.stops)
        assert 0 < stop < gen_length, (question, tokens)
        assert text.isprintable() and len(text.split()) >= 2, (question, text)


def test_its_held_out_elbo_is_below_the_random_models(demo):
    pairs = held_out_pairs(8)
    trained = bits_per_byte(demo, pairs, mc_num=8)
    random_weights = bits_per_byte(build_demo(), pairs, mc_num=8)
    assert trained < random_weights - ELBO_MARGIN_BITS, (trained, random_weights)


def test_its_held_out_elbo_beats_the_previous_demo_model(demo):
    assert abs(PREVIOUS_ELBO_SEED1 - PREVIOUS_ELBO_BITS) < ELBO_GAIN_BITS / 3
    elbo = bits_per_byte(demo, held_out_pairs(16), mc_num=16, seed=0)
    assert elbo < PREVIOUS_ELBO_BITS - ELBO_GAIN_BITS, (elbo, PREVIOUS_ELBO_BITS)


def test_different_questions_get_different_answers(demo):
    """The previous model gave many questions the same answer (84 distinct of 100)."""
    figures, answers = answer_figures(demo, question_sets(ASKED)["train"], ANSWER_SETTINGS["exact"])
    assert figures.distinct >= 0.9 * ASKED, answers
