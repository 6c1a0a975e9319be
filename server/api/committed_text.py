"""An answer's text as a diffusion stream settles it, for the OpenAI routes' chunks.

A denoising step reveals positions anywhere in the current block, so text is only final from the
answer's start up to the first position still masked: the committed prefix (with LLaDA2.1's
token editing, only up to the start of the block being decoded, which the engine reports). Each step sends the
part of it not sent yet, minus what is still undecided: a trailing UTF-8 character whose bytes
are not all revealed (byte-level tokens), and a tail that may begin a stop string. The answer is
decided once the prefix holds EOS/EOT or a stop string, or covers the whole answer; the pieces
sent then add up to exactly the text the same request gets without streaming.

This relies on the tokenizer decoding a longer prefix to an extension of a shorter one's text,
apart from an unfinished character (true of byte-level BPE, which does no clean-up of spaces).
A tokenizer may break that for a while (SentencePiece's byte fallback decodes "é", then, with the
first byte of a next character, three U+FFFD until that character is whole): the stream then
waits. If the decided text still does not extend what was sent (that character never completed),
sent text cannot be taken back, so the stream ends with an error rather than with pieces that
silently add up to another text.
"""

from __future__ import annotations

from collections.abc import Iterable

from server.api.errors import ApiError
from server.api.stop_strings import cut_at_stop, undecided_tail
from server.engine.events import Reveal
from server.engine.text_codec import TextCodec

UNFINISHED_CHARACTER = "\ufffd"  # what decoding makes of the first bytes of a multi-byte character


def answer_text(
    codec: TextCodec, token_ids: list[int], stop_tokens: tuple[int, ...], stop_strings: tuple[str, ...]
) -> tuple[str, str]:
    """The whole answer's text and finish_reason: cut at the first EOS/EOT, then at the first stop
    string to complete; "stop" if either cut it, else "length"."""
    text, stopped = codec.answer_text(token_ids, stop_tokens)
    text, cut = cut_at_stop(text, stop_strings)
    return text, "stop" if stopped or cut else "length"


class CommittedText:
    def __init__(
        self,
        codec: TextCodec,
        stop_tokens: tuple[int, ...],
        stop_strings: tuple[str, ...],
        gen_length: int,
        constraints: tuple[tuple[int, int], ...],
    ):
        self.codec = codec
        self.stop_tokens = stop_tokens
        self.stop_strings = stop_strings
        # Constraints are written before the first step and never reported as reveals.
        self.tokens: list[int | None] = [None] * gen_length
        for position, token in constraints:
            self.tokens[position] = token
        self.committed = 0  # length of the revealed prefix
        self.sent = ""
        self.finish_reason: str | None = None  # set once the text is decided

    def reveal(self, reveals: Iterable[Reveal], settled: int | None = None) -> str:
        """Record one step's reveals (edits overwrite); returns the text to send now ("" when none).
        settled: how far no later step can change the answer (token editing), if not up to the
        first mask."""
        if self.finish_reason is not None:
            return ""
        for reveal in reveals:
            self.tokens[reveal.index] = reveal.token_id
        start = self.committed
        end = len(self.tokens) if settled is None else settled
        while self.committed < end and self.tokens[self.committed] is not None:
            self.committed += 1
        if self.committed == start:
            return ""
        if self.committed == len(self.tokens):
            return self.finish(self.tokens)
        text, stopped = self.codec.answer_text(self.tokens[: self.committed], self.stop_tokens)
        if not stopped:
            text = text.rstrip(UNFINISHED_CHARACTER)
        cut, found = cut_at_stop(text, self.stop_strings)
        if stopped or found:
            return self._decide(cut, "stop")
        return self._send(text[: len(text) - undecided_tail(text, self.stop_strings)])

    def finish(self, token_ids: list[int]) -> str:
        """The job's final canvas: returns what is left to send, and the answer is decided."""
        if self.finish_reason is not None:
            return ""
        return self._decide(*answer_text(self.codec, token_ids, self.stop_tokens, self.stop_strings))

    def _decide(self, text: str, finish_reason: str) -> str:
        self.finish_reason = finish_reason
        if not text.startswith(self.sent):
            raise ApiError(
                500,
                "the text already streamed is not the start of the answer's text (this tokenizer decoded "
                "a longer prefix differently); ask again without stream",
                code="stream_text_diverged",
            )
        return self._send(text)

    def _send(self, text: str) -> str:
        if not text.startswith(self.sent):  # not an extension yet (see the module docstring)
            return ""
        delta, self.sent = text[len(self.sent) :], text
        return delta
