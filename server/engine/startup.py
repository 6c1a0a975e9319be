"""The model a server starts with: the configured checkpoint folder, or the built-in trained demo."""

from __future__ import annotations

from server.engine.demo import load_demo
from server.engine.devices import resolve_device, resolve_dtype
from server.engine.loader import LoadedModel, load_checkpoint


def load_model(model: str | None, device: str = "auto", dtype: str = "auto") -> LoadedModel:
    if model:
        return load_checkpoint(model, device, dtype)
    target = resolve_device(device)
    return load_demo(dtype=resolve_dtype(dtype, target), device=target)
