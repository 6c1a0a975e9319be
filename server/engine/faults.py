"""Test-only fault injection (`--inject-faults` / LLADA_INJECT_FAULTS), never set in production:
the engine wraps its model in a `FaultyModel` at start-up, so no production code path knows.

Spec: comma-separated items `KIND@N` or `KIND@N-M`, optionally with the suffix `:head`. N counts
model forwards from 1 (one per step; a retry is a new forward). `KIND@N` hits forward N,
`KIND@N-M` every forward from N to M. Without a suffix the forward itself raises; with `:head`
the forward runs and the step's last LM-head call (the one that reads the forward's last rows)
raises instead: when a step's candidates need several head calls, the earlier ones have already
chosen their jobs' tokens, the case a step's transaction must undo. KIND: `error`
(RuntimeError), `oom` (torch.OutOfMemoryError, which the engine retries as smaller groups),
`die` (the engine thread itself dies, as a bug outside the per-step isolation would make it) or
`fatal` (a device error that poisons the context, as an illegal address does on CUDA: this
forward and every later one raise it, and the engine must end).
"""

from __future__ import annotations

import re

import torch

from server.engine.devices import DeviceFailure

KINDS = ("error", "oom", "die", "fatal")
ITEM = re.compile(r"(?P<kind>[a-z]+)@(?P<first>\d+)(?:-(?P<last>\d+))?(?P<head>:head)?")


class InjectedFault(RuntimeError):
    pass


class InjectedDeath(BaseException):
    """Not an Exception, so no per-step handler catches it: the loop dies."""


def _raise(kind: str, where: str) -> None:
    if kind == "error":
        raise InjectedFault(f"injected failure at {where}")
    if kind == "oom":
        raise torch.OutOfMemoryError(f"injected out-of-memory at {where}")
    if kind == "fatal":
        raise DeviceFailure(f"injected device failure at {where}: the device context is lost")
    raise InjectedDeath(f"injected engine death at {where}")


class FaultInjector:
    def __init__(self, spec: str | None):
        self.forwards = 0
        self.plan: list[tuple[str, int, int, bool]] = []  # kind, first, last, in the head
        self._head_due: tuple[str, int] | None = None
        self._rows_left = 0  # rows of the last forward not yet through the LM head
        self._poisoned: int | None = None
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

    def before_forward(self) -> None:
        self.forwards += 1
        self._head_due = None
        if self._poisoned is not None:
            _raise("fatal", f"forward {self.forwards} (poisoned since forward {self._poisoned})")
        kind = self._planned(in_head=False)
        if kind == "fatal":
            self._poisoned = self.forwards
        if kind is not None:
            _raise(kind, f"forward {self.forwards}")
        kind = self._planned(in_head=True)
        if kind is not None:
            self._head_due = (kind, self.forwards)

    def after_forward(self, rows: int) -> None:
        self._rows_left = rows

    def before_head(self, rows: int) -> None:
        self._rows_left -= rows
        if self._head_due is not None and self._rows_left <= 0:
            kind, forward = self._head_due
            self._head_due = None
            if kind == "fatal":
                self._poisoned = forward
            _raise(kind, f"the LM head after forward {forward}")


class FaultyModel:
    """The model, with the plan's faults before its forwards and LM-head calls."""

    def __init__(self, model: torch.nn.Module, faults: FaultInjector):
        self.model = model
        self.faults = faults

    def __getattr__(self, name: str):
        return getattr(self.model, name)

    def __call__(self, batch):
        self.faults.before_forward()
        hidden = self.model(batch)
        self.faults.after_forward(hidden.shape[0])
        return hidden

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        self.faults.before_head(hidden.shape[0])
        return self.model.logits(hidden)
