"""The model a server starts with: the configured checkpoint folder, or the built-in trained demo."""

from __future__ import annotations

import torch

from server.engine.cpu_kernels import keep_freed_memory
from server.engine.demo import load_demo
from server.engine.devices import resolve_device, resolve_dtype, set_batch_invariance
from server.engine.loader import LoadedModel, load_checkpoint


def load_model(
    model: str | None, device: str = "auto", dtype: str = "auto", batch_invariant: bool = True
) -> LoadedModel:
    """batch_invariant: `--batch-invariant`, set before the model's first product (devices.py)."""
    target = resolve_device(device)
    set_batch_invariance(target, batch_invariant)
    if model:
        return load_checkpoint(model, str(target), dtype)
    return load_demo(dtype=resolve_dtype(dtype, target), device=target)


def prepare_process(device: torch.device) -> None:
    """What a server process sets once for its device: on the CPU, glibc keeps freed blocks for the
    next step (cpu_kernels.keep_freed_memory). Not at load: a process that loads many models and
    forks servers (the test suite) would keep every freed block and run out of memory to fork."""
    if device.type == "cpu":
        keep_freed_memory()
