"""Test-only fault injection (`--inject-faults` / LLADA_INJECT_FAULTS), never set in production.

Spec: comma-separated items `KIND@N` or `KIND@N-M`, optionally with the suffix `:head`. N counts
model forwards from 1 (every forward: a step whose rows run in two length groups is two
forwards; a retry is a new forward). `KIND@N` hits forward N, `KIND@N-M` every forward from N to
M. Without a suffix the forward itself raises; with `:head` the forward runs and the step's last
LM-head call (and its token choice) raises instead: when a step's candidates need several head
calls, the earlier ones have already chosen their jobs' tokens, the case a step's transaction
must undo. KIND: `error` (RuntimeError), `oom` (torch.OutOfMemoryError, which the engine retries
as smaller groups) or `die` (the engine thread itself dies, as a bug outside the per-forward
isolation would make it).
"""

from __future__ import annotations

import re

import torch

KINDS = ("error", "oom", "die")
ITEM = re.compile(r"(?P<kind>[a-z]+)@(?P<first>\d+)(?:-(?P<last>\d+))?(?P<head>:head)?")


class InjectedFault(RuntimeError):
    pass


class InjectedDeath(BaseException):
    """Not an Exception, so no per-forward handler catches it: the loop dies."""


def _raise(kind: str, where: str) -> None:
    if kind == "error":
        raise InjectedFault(f"injected failure at {where}")
    if kind == "oom":
        raise torch.OutOfMemoryError(f"injected out-of-memory at {where}")
    raise InjectedDeath(f"injected engine death at {where}")


class FaultInjector:
    def __init__(self, spec: str | None):
        self.forwards = 0
        self.plan: list[tuple[str, int, int, bool]] = []  # kind, first, last, in the head
        self._head_due: tuple[str, int] | None = None
        for item in filter(None, (part.strip() for part in (spec or "").split(","))):
            match = ITEM.fullmatch(item)
            first = int(match["first"]) if match else 0
            last = int(match["last"] or first) if match else 0
            if match is None or match["kind"] not in KINDS or first < 1 or last < first:
                raise ValueError(
                    f"bad fault {item!r}: use KIND@N or KIND@N-M (1 <= N <= M), optionally with ':head', "
                    f"KIND in {KINDS}"
                )
            self.plan.append((match["kind"], first, last, bool(match["head"])))

    def _planned(self, in_head: bool) -> str | None:
        for kind, first, last, head in self.plan:
            if head == in_head and first <= self.forwards <= last:
                return kind
        return None

    def step_started(self) -> None:
        self._head_due = None

    def before_forward(self) -> None:
        self.forwards += 1
        kind = self._planned(in_head=False)
        if kind is not None:
            _raise(kind, f"forward {self.forwards}")
        kind = self._planned(in_head=True)
        if kind is not None:
            self._head_due = (kind, self.forwards)

    def before_head(self, last: bool) -> None:
        if last and self._head_due is not None:
            kind, forward = self._head_due
            self._head_due = None
            _raise(kind, f"the LM head after forward {forward}")
