"""The built-in demo model and the text codec: determinism, LLaDA's special ids, the chat template,
UTF-8 round trips, answer decoding and lm-eval's (context, continuation) split."""

from __future__ import annotations

import time

import pytest
import torch

from server.engine.demo import build_demo, demo_config

TINY = {"d_model": 32, "n_layers": 1, "n_heads": 2, "n_kv_heads": 1, "mlp_hidden_size": 64}
BOS, EOS, MASK, HEADER_START, HEADER_END, EOT = 126080, 126081, 126336, 126346, 126347, 126348


@pytest.fixture(scope="module")
def demo():
    return build_demo(demo_config(**TINY), seed=0)


@pytest.fixture(scope="module")
def codec(demo):
    return demo.codec


def logits_of(loaded) -> torch.Tensor:
    ids = loaded.codec.encode_chat([{"role": "user", "content": "Hi there"}]) + [MASK] * 8
    with torch.inference_mode():
        return loaded.model.full_logits(torch.tensor([ids]))


def test_demo_builds_fast_and_is_deterministic_per_seed(demo):
    start = time.monotonic()
    same = build_demo(demo_config(**TINY), seed=0)
    assert time.monotonic() - start < 15
    other = build_demo(demo_config(**TINY), seed=1)
    assert torch.equal(logits_of(demo), logits_of(same))
    assert not torch.equal(logits_of(demo), logits_of(other))
    assert demo.name == "llada-demo"
    assert demo.config.vocab_size == 126464
    assert demo.model.config.d_model == 32 and len(demo.model.model.transformer.blocks) == 1


def test_default_demo_shape():
    config = demo_config()
    assert (config.vocab_size, config.mask_token_id, config.eos_token_id) == (126464, MASK, EOS)
    assert demo_config(n_layers=3).n_layers == 3


def test_special_ids_are_llada_ids(demo, codec):
    special = demo.special
    assert (special.mask, special.eos, special.eot, special.bos) == (MASK, EOS, EOT, BOS)
    assert special.stops == (EOS, EOT)
    assert codec.token_id("<|mdm_mask|>") == MASK
    assert codec.token_id("<|endoftext|>") == EOS
    assert codec.token_id("<|startoftext|>") == BOS
    assert codec.token_id("<|start_header_id|>") == HEADER_START
    assert codec.token_id("<|end_header_id|>") == HEADER_END
    assert codec.token_id("<|eot_id|>") == EOT
    assert codec.tokenizer.eos_token_id == EOS and codec.tokenizer.pad_token_id == EOS
    # Special tokens in text are single tokens.
    assert codec.encode("<|eot_id|>") == [EOT]
    assert codec.encode("<|mdm_mask|>") == [MASK]


def test_chat_template_one_turn(codec):
    messages = [{"role": "user", "content": "  What is 2+2?\n "}]
    expected = (
        "<|startoftext|><|start_header_id|>user<|end_header_id|>\n\nWhat is 2+2?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    assert codec.has_chat_template
    assert codec.chat_text(messages) == expected
    ids = codec.encode_chat(messages)
    assert ids == (
        [BOS, HEADER_START]
        + codec.encode("user")
        + [HEADER_END]
        + codec.encode("\n\nWhat is 2+2?")
        + [EOT, HEADER_START]
        + codec.encode("assistant")
        + [HEADER_END]
        + codec.encode("\n\n")
    )
    assert ids.count(BOS) == 1  # the template writes BOS; encoding must not add another


def test_chat_template_multi_turn(codec):
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hi "},
        {"role": "assistant", "content": " Hello!"},
        {"role": "user", "content": "Bye"},
    ]
    expected = (
        "<|startoftext|>"
        "<|start_header_id|>system<|end_header_id|>\n\nYou are terse.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nBye<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    assert codec.chat_text(messages) == expected
    ids = codec.encode_chat(messages)
    assert ids.count(BOS) == 1 and ids[0] == BOS
    assert ids.count(EOT) == 4 and ids.count(HEADER_START) == 5


@pytest.mark.parametrize(
    "text",
    ["Hello, world!", "héllo wörld — naïve café", "日本語のテキスト 🙂🚀", "tabs\tand\nnewlines\r\n  ", ""],
)
def test_utf8_round_trip(codec, text):
    ids = codec.encode(text)
    assert len(ids) == len(text.encode("utf-8"))  # the demo's tokenizer is one token per byte
    assert codec.decode(ids) == text


def test_decode_skips_special_tokens(codec):
    ids = [BOS] + codec.encode("ab") + [MASK, EOT] + codec.encode("c") + [EOS]
    assert codec.decode(ids) == "abc"
    assert codec.decode(ids, skip_special_tokens=False) == "<|startoftext|>ab<|mdm_mask|><|eot_id|>c<|endoftext|>"


def test_answer_text_stops_at_first_stop_token(demo, codec):
    stops = demo.special.stops
    hello, world = codec.encode("Hello"), codec.encode(" world")
    assert codec.answer_text(hello + [EOS] + world + [EOT], stops) == ("Hello", True)
    assert codec.answer_text(hello + [EOT] + world + [EOS, EOS], stops) == ("Hello", True)
    assert codec.answer_text(hello + world, stops) == ("Hello world", False)
    assert codec.answer_text([EOS] * 4, stops) == ("", True)
    assert codec.answer_text(codec.encode("naïve 🙂") + [EOS], stops) == ("naïve 🙂", True)


def test_encode_pair_moves_trailing_spaces(codec):
    context, continuation = "Question: 2+2 =  ", "4"
    context_ids, continuation_ids = codec.encode_pair(context, continuation)
    assert context_ids == codec.encode("Question: 2+2 =")
    assert continuation_ids == codec.encode("  4")
    whole = codec.tokenizer("Question: 2+2 =  4")["input_ids"]
    assert whole == context_ids + continuation_ids
    assert continuation_ids == whole[len(context_ids) :]


def test_encode_pair_without_trailing_space(codec):
    context_ids, continuation_ids = codec.encode_pair("The sky is", " blue")
    assert context_ids == codec.encode("The sky is")
    assert continuation_ids == codec.encode(" blue")
    whole = codec.tokenizer("The sky is blue")["input_ids"]
    assert continuation_ids == whole[len(context_ids) :]
