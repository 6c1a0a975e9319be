"""What happens around every forward and LM-head call of the engine: test-only fault injection and
the per-forward metrics (rows, duration). The denoiser and the scorer call these; so faults and
metrics count forwards, not steps."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from server.engine.faults import FaultInjector
from server.metrics import Metrics


class ForwardHooks:
    def __init__(self, faults: FaultInjector | None = None, metrics: Metrics | None = None):
        self.faults = faults or FaultInjector(None)
        self.metrics = metrics
        self._cuda_timings: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []

    def step_started(self) -> None:
        self.faults.step_started()

    @contextmanager
    def forward(self, rows: int, device: torch.device) -> Iterator[None]:
        """One forward of `rows` rows, counted and timed whether or not it raises (the fault plan
        may make it). On CUDA the time comes from events read after the step's one device-to-host
        copy (`step_finished`), so timing adds no synchronisation."""
        if self.metrics is not None:
            self.metrics.batch_rows.observe(rows)
        if self.metrics is None or device.type != "cuda":
            began = time.perf_counter()
            try:
                self.faults.before_forward()
                yield
            finally:
                if self.metrics is not None:
                    self.metrics.forward_duration_seconds.observe(time.perf_counter() - began)
            return
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        try:
            self.faults.before_forward()
            yield
        finally:
            end.record()
            self._cuda_timings.append((start, end))

    def before_head(self, last: bool) -> None:
        """Before each LM-head call of the step; `last` for its final one."""
        self.faults.before_head(last)

    def step_finished(self) -> None:
        """After the step (successful or not). Past the step's device-to-host copy every recorded
        CUDA event has completed, so the wait below costs nothing; only a failed step waits."""
        for start, end in self._cuda_timings:
            end.synchronize()
            self.metrics.forward_duration_seconds.observe(start.elapsed_time(end) / 1000)
        self._cuda_timings.clear()
