"""Stop strings (OpenAI's `stop`, lm-eval's `until`): where an answer's text ends.

The text ends before the stop string that completes first, reading left to right: the one whose
last character comes earliest (on a tie, the longer one). That is where an autoregressive model
would have stopped, and it is decided by the text up to that character alone, so a stream can
settle it from a prefix and agree with the whole answer."""

from __future__ import annotations


def cut_at_stop(text: str, stops: tuple[str, ...]) -> tuple[str, bool]:
    """The text before the first stop string to complete, and whether one was found."""
    best: tuple[int, int] | None = None  # (end, start)
    for stop in stops:
        start = text.find(stop)
        if start >= 0 and (best is None or (start + len(stop), start) < best):
            best = (start + len(stop), start)
    if best is None:
        return text, False
    return text[: best[1]], True


def undecided_tail(text: str, stops: tuple[str, ...]) -> int:
    """How many characters at the end of `text` could be the start of a stop string that more
    text would complete (0 when none): a stream holds them back until it knows."""
    longest = 0
    for stop in stops:
        for size in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:size]):
                longest = size
                break
    return longest
