"""The model a server starts with: the configured checkpoint folder, or the built-in trained demo."""

from __future__ import annotations

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
