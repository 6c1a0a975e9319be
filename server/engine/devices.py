"""Resolution of the `--device` and `--dtype` settings."""

from __future__ import annotations

import os

import torch

from server.engine.errors import DeviceError

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise DeviceError(f"device {name!r} was asked for but no CUDA device is available; use --device cpu or auto")
    if name != "cpu" and not name.startswith("cuda"):
        raise DeviceError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N")
    device = torch.device(name)
    if device.type == "cuda":
        # cuBLAS splits a product's reduction in its workspace (split-K) depending on the matrix
        # shape, so a row's numbers would depend on how many rows share the forward. Without the
        # workspace they do not. Read when cuBLAS starts, so it is set before the model loads.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":0:0")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise DeviceError(f"unknown dtype {name!r}; use auto, {', '.join(DTYPES)}")
    return DTYPES[name]
