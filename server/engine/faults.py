"""Test-only fault injection (`--inject-faults` / LLADA_INJECT_FAULTS), never set in production.

Spec: comma-separated `KIND@N` where N counts forward passes from 1 and KIND is `error` (the
forward raises RuntimeError), `oom` (it raises torch.OutOfMemoryError) or `die` (the engine
thread itself dies, as a bug outside the per-batch isolation would make it); `oom@3` fails only
the third forward, so the retry as smaller batches goes through.
"""

from __future__ import annotations

import torch

KINDS = ("error", "oom", "die")


class InjectedFault(RuntimeError):
    pass


class InjectedDeath(BaseException):
    """Not an Exception, so no per-batch handler catches it: the loop dies."""


class FaultInjector:
    def __init__(self, spec: str | None):
        self.forwards = 0
        self.plan: dict[int, str] = {}
        for item in filter(None, (part.strip() for part in (spec or "").split(","))):
            kind, _, number = item.partition("@")
            if kind not in KINDS or not number.isdigit() or int(number) < 1:
                raise ValueError(f"bad fault {item!r}: use KIND@N with KIND in {KINDS} and N >= 1")
            self.plan[int(number)] = kind

    def before_forward(self) -> None:
        self.forwards += 1
        kind = self.plan.get(self.forwards)
        if kind == "error":
            raise InjectedFault(f"injected forward failure at forward {self.forwards}")
        if kind == "oom":
            raise torch.OutOfMemoryError(f"injected out-of-memory at forward {self.forwards}")
        if kind == "die":
            raise InjectedDeath(f"injected engine death at forward {self.forwards}")
