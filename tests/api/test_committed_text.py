"""The text an OpenAI stream sends as a diffusion answer settles: only the revealed prefix, never
half a UTF-8 character, stop strings held back until decided, and pieces that add up to the text
the same answer gets without streaming. Uses the tiny demo model's byte-level tokenizer."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models
from transformers import PreTrainedTokenizerFast

from server.api.committed_text import CommittedText, answer_text
from server.api.errors import ApiError
from server.api.stop_strings import cut_at_stop, undecided_tail
from server.engine.events import Reveal
from server.engine.text_codec import TextCodec

HELLO = list("héllo".encode())  # the demo tokenizer has one token per byte: é is two tokens


def reveal(text: CommittedText, *positions: int, tokens: list[int]) -> str:
    return text.reveal([Reveal(index=p, token_id=tokens[p], confidence=1.0) for p in positions])


@pytest.fixture
def committed(tiny_model):
    def make(gen_length: int, stop: tuple[str, ...] = (), constraints: tuple = ()) -> CommittedText:
        return CommittedText(tiny_model.codec, tiny_model.special.stops, stop, gen_length, constraints)

    return make


def test_stop_strings_end_the_text_before_the_first_to_complete():
    assert cut_at_stop("hello world", ("o w", "wor")) == ("hell", True)
    assert cut_at_stop("abcd", ("abcd", "bc")) == ("a", True)  # bc completes before abcd
    assert cut_at_stop("aab", ("ab", "aab")) == ("", True)  # same end: the longer one
    assert cut_at_stop("abcd", ("x",)) == ("abcd", False)
    assert cut_at_stop("abcd", ()) == ("abcd", False)


def test_the_undecided_tail_is_the_longest_start_of_a_stop_string():
    assert undecided_tail("hello wo", ("world",)) == 2
    assert undecided_tail("hello wo", ("world", "o wor")) == 4  # "o wo"
    assert undecided_tail("hello", ("world",)) == 0
    assert undecided_tail("hello", ()) == 0


def test_only_the_prefix_up_to_the_first_masked_position_is_sent(committed):
    tokens = HELLO + [ord("!")]
    text = committed(len(tokens))
    assert reveal(text, 5, 4, tokens=tokens) == ""  # "o" and "!" wait for positions 0-3
    assert reveal(text, 0, tokens=tokens) == "h"
    assert reveal(text, 2, 3, tokens=tokens) == ""  # position 1 is still masked
    assert reveal(text, 1, tokens=tokens) == "éllo"
    assert text.finish_reason is None
    assert reveal(text, 5, tokens=tokens) == ""  # already known
    assert text.sent == "héllo"


def test_half_a_multibyte_character_is_never_sent(committed):
    text = committed(len(HELLO))
    assert reveal(text, 0, 1, tokens=HELLO) == "h"  # the first byte of é alone is not a character
    assert reveal(text, 2, tokens=HELLO) == "é"


def test_a_stop_string_across_steps_is_held_back_then_cuts_the_answer(committed):
    tokens = list("one two three".encode())
    text = committed(len(tokens), stop=("two",))
    assert reveal(text, *range(5), tokens=tokens) == "one "  # "t" could begin "two"
    assert reveal(text, 5, tokens=tokens) == ""  # "tw" still could
    assert reveal(text, 6, tokens=tokens) == ""  # "two": decided, nothing more to send
    assert text.finish_reason == "stop" and text.sent == "one "
    assert reveal(text, *range(7, len(tokens)), tokens=tokens) == ""
    assert text.finish(tokens) == ""


def test_a_held_back_tail_that_does_not_become_a_stop_string_is_sent(committed):
    tokens = list("one tea".encode())
    text = committed(len(tokens), stop=("two",))
    assert reveal(text, *range(5), tokens=tokens) == "one "
    assert reveal(text, 5, 6, tokens=tokens) == "tea"
    assert text.finish_reason == "length"


def test_eos_in_the_prefix_decides_the_answer(committed, tiny_model):
    tokens = [ord("h"), ord("i"), tiny_model.special.eos, ord("x")]
    text = committed(len(tokens))
    assert reveal(text, 0, 1, 2, tokens=tokens) == "hi"
    assert text.finish_reason == "stop"
    assert reveal(text, 3, tokens=tokens) == "" and text.finish(tokens) == ""


def test_constraints_count_as_revealed_from_the_start(committed):
    tokens = list("hi".encode())
    text = committed(2, constraints=((0, tokens[0]),))
    assert reveal(text, 1, tokens=tokens) == "hi"
    assert text.finish_reason == "length"


def test_finish_sends_what_is_left(committed):
    tokens = list("abc".encode())
    text = committed(3)
    assert reveal(text, 0, tokens=tokens) == "a"
    assert text.finish(tokens) == "bc" and text.finish_reason == "length"


# Answers mixing one-byte and multi-byte characters, sometimes an EOS or EOT, revealed in any order
# and any grouping, with stop strings taken from the answer itself or made up.
@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_the_sent_pieces_add_up_to_the_unstreamed_answer(tiny_model, data):
    codec, stops = tiny_model.codec, tiny_model.special.stops
    words = data.draw(st.text(alphabet="ab é日\n", max_size=12))
    tokens = list(words.encode())
    for _ in range(data.draw(st.integers(0, 2))):
        tokens.insert(data.draw(st.integers(0, len(tokens))), data.draw(st.sampled_from(stops)))
    if not tokens:
        tokens = [ord("a")]
    stop_strings = tuple(data.draw(st.lists(st.text(alphabet="ab é日\n", min_size=1, max_size=3), max_size=3)))
    order = data.draw(st.permutations(range(len(tokens))))
    cuts = sorted(data.draw(st.sets(st.integers(1, len(tokens)), max_size=len(tokens))))
    text = CommittedText(codec, stops, stop_strings, len(tokens), ())
    sent = ""
    for start, end in zip([0, *cuts], [*cuts, len(tokens)]):
        sent += text.reveal([Reveal(index=p, token_id=tokens[p], confidence=1.0) for p in order[start:end]])
        assert sent == text.sent
    sent += text.finish(tokens)
    expected, finish_reason = answer_text(codec, tokens, stops, stop_strings)
    assert sent == expected
    assert text.finish_reason == finish_reason


# A SentencePiece-style tokenizer (Llama 2, Mistral): bytes missing from the vocabulary are
# <0xNN> tokens, and its decoder turns a run of them that is not valid UTF-8 into one U+FFFD per
# byte, so a longer prefix can decode to a text that does not extend a shorter one's.
EOS, WORD_A = 1, 2


def byte_token(byte: int) -> int:
    return 3 + byte


@pytest.fixture(scope="module")
def byte_fallback_codec() -> TextCodec:
    vocab = {"<unk>": 0, "</s>": EOS, "\u2581a": WORD_A, **{f"<0x{b:02X}>": byte_token(b) for b in range(256)}}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True))
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    return TextCodec(PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="</s>", unk_token="<unk>"))


def stream_in_order(codec: TextCodec, tokens: list[int]) -> str:
    """Reveal the answer left to right, one token a step, then finish it: the pieces sent."""
    text = CommittedText(codec, (EOS,), (), len(tokens), ())
    sent = "".join(reveal(text, p, tokens=tokens) for p in range(len(tokens)))
    return sent + text.finish(tokens)


def test_a_byte_fallback_character_that_completes_is_waited_for_and_adds_up(byte_fallback_codec):
    tokens = [byte_token(b) for b in "é€".encode()] + [WORD_A]
    # Three of these prefixes decode to U+FFFDs that replace the "é" already sent.
    assert byte_fallback_codec.decode(tokens[:3]) == "\ufffd" * 3
    expected, _ = answer_text(byte_fallback_codec, tokens, (EOS,), ())
    assert expected == "é€ a"
    assert stream_in_order(byte_fallback_codec, tokens) == expected


def test_a_streamed_text_the_answer_does_not_extend_ends_in_an_error_not_a_wrong_text(byte_fallback_codec):
    # "é" is sent; a lone lead byte then turns it into U+FFFDs for good.
    tokens = [byte_token(b) for b in "é".encode()] + [byte_token(0xE2), WORD_A]
    assert answer_text(byte_fallback_codec, tokens, (EOS,), ())[0] == "\ufffd" * 3 + " a"
    with pytest.raises(ApiError) as raised:
        stream_in_order(byte_fallback_codec, tokens)
    assert (raised.value.status, raised.value.code) == (500, "stream_text_diverged")
