"""Host lists to device tensors without a synchronisation."""

from __future__ import annotations

import torch


def to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on the device without waiting for the device: a copy from pageable memory
    would first drain the stream (a synchronisation), one from pinned memory does not."""
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host


def index(values: list[int], device: torch.device) -> torch.Tensor:
    return to_device(torch.tensor(values, dtype=torch.long), device)
