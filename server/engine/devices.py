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
        make_cuda_batch_invariant()
    return device


def make_cuda_batch_invariant() -> None:
    """Process-wide CUDA settings under which a row computes the same numbers in any batch; set
    once, when a CUDA device is resolved (before the model loads).

    cuBLAS splits a product's reduction in its workspace (split-K) depending on the matrix shape,
    so a row's numbers would depend on how many rows share the forward; without the workspace they
    do not (read when cuBLAS starts). Attention: one kernel (memory-efficient, math as fallback)
    serves padded rows (key mask) and unpadded ones alike. Flash attention takes no mask, and
    cuDNN's, which PyTorch prefers on recent GPUs, also builds a graph for every new shape (75 ms
    median, 0.9 s worst on an H200), and a server sees new lengths all the time. CPU keeps
    PyTorch's choice, batch-invariant as is.
    """
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":0:0")
    torch.backends.cuda.enable_flash_sdp(False)
    torch.backends.cuda.enable_cudnn_sdp(False)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise DeviceError(f"unknown dtype {name!r}; use auto, {', '.join(DTYPES)}")
    return DTYPES[name]
