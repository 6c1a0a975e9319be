"""Resolution of the `--device` and `--dtype` settings, batch invariance on CUDA, and which
device errors end the engine."""

from __future__ import annotations

import os

import torch

from server.engine.errors import DeviceError

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


class DeviceFailure(RuntimeError):
    """A device error after which the device cannot be trusted (the injected `fatal` fault)."""


# torch >= 2.8 raises device errors as AcceleratorError; older ones as a RuntimeError that says so
_DEVICE_ERRORS = (DeviceFailure, *[e for e in (getattr(torch, "AcceleratorError", None),) if e is not None])


def is_fatal(exc: BaseException) -> bool:
    """Whether an error poisons the device context: on CUDA any device error but out of memory
    (an illegal address or a device-side assert leaves every later call failing)."""
    if isinstance(exc, torch.OutOfMemoryError):
        return False
    if isinstance(exc, _DEVICE_ERRORS):
        return True
    return isinstance(exc, RuntimeError) and "CUDA error" in str(exc)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise DeviceError(f"device {name!r} was asked for but no CUDA device is available; use --device cpu or auto")
    if name != "cpu" and not name.startswith("cuda"):
        raise DeviceError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N")
    return torch.device(name)


def set_batch_invariance(device: torch.device, on: bool) -> None:
    """`--batch-invariant` on CUDA, set once before the first product runs: on, a row computes the
    same numbers in any batch; off, PyTorch picks the fastest kernels. CPU is batch-invariant
    either way (oneDNN linears with padded row counts, attention per sequence).

    cuBLAS splits a product's reduction in its workspace (split-K) depending on the matrix shape,
    so a row's numbers would depend on how many rows share the forward; without the workspace they
    do not (read when cuBLAS starts). Attention runs per sequence (models/layers.py), so a row's
    attention never depends on the others; cuDNN's kernel is still kept off, as it builds a graph
    for every new shape (75 ms median, 0.9 s worst on an H200) and a server sees new lengths all
    the time."""
    if device.type != "cuda":
        return
    if on:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":0:0")
    torch.backends.cuda.enable_cudnn_sdp(False)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise DeviceError(f"unknown dtype {name!r}; use auto, {', '.join(DTYPES)}")
    return DTYPES[name]
