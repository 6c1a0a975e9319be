"""The CPU-only swap applied at load: the model's linears run through oneDNN on CPU.

oneDNN's fp32 and bf16 kernels are about twice as fast as MKL's sgemm on CPUs where MKL takes
its AVX2 path (AMD's); torch.compile's CPU backend calls the same op. Model files stay plain
PyTorch: `use_onednn_linears` changes the class of their nn.Linear modules (same parameters,
same names, same state dict) once the weights are on the CPU. Also here: `keep_freed_memory`,
the heap setting a CPU server process makes once (startup.prepare_process).
"""

from __future__ import annotations

import ctypes

import torch
from torch import nn

_ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
# glibc's mallopt parameters, and the largest block kept in the heap (the most mallopt takes)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_HEAP_BLOCK_BYTES = 2**31 - 1


def padded_rows(rows: int) -> int:
    """rows rounded up to one of 8 sizes per power of two above 16, and at least 2."""
    if rows <= 16:
        return max(rows, 2)
    step = 1 << (rows.bit_length() - 4)
    return -(-rows // step) * step


class OneDNNLinear(nn.Linear):
    """nn.Linear whose inference on CPU runs through oneDNN. Whatever autograd records keeps
    F.linear: the oneDNN op has no backward.

    oneDNN builds and keeps a kernel for every row count it sees (about 0.6 MB each, and more
    than its cache's 1024: memory grew by 4 GB over 3000 counts), so the rows are zero-padded to
    padded_rows (at most 12.5 % more): a bounded set of counts whatever the traffic. A row's
    numbers do not depend on the count from two rows on (one row takes another kernel), so a job
    computes the same alone as in any batch."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        recorded = torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad)
        if x.device.type != "cpu" or x.dtype != self.weight.dtype or recorded:
            return super().forward(x)
        return onednn_linear(x, self.weight, self.bias)


def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear through oneDNN, the rows zero-padded to padded_rows (see OneDNNLinear)."""
    rows = x.numel() // x.shape[-1]
    flat = x.reshape(rows, x.shape[-1])
    if padded_rows(rows) != rows:
        flat = torch.cat([flat, flat.new_zeros(padded_rows(rows) - rows, flat.shape[1])])
    out = torch.ops.mkldnn._linear_pointwise(flat, weight, bias, "none", [], "")
    return out[:rows].view(*x.shape[:-1], out.shape[-1])


def onednn_runs(dtype: torch.dtype) -> bool:
    """Whether this CPU has oneDNN's kernels for the dtype (bf16 needs AVX-512 or AMX)."""
    if dtype == torch.bfloat16:
        return _ONEDNN and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    return _ONEDNN and dtype == torch.float32


def use_onednn_linears(model: nn.Module) -> nn.Module:
    """On CPU, every nn.Linear of the model becomes a OneDNNLinear (in place) where this CPU has
    the kernels for its dtype; elsewhere a no-op."""
    for module in model.modules():
        if type(module) is nn.Linear and module.weight.device.type == "cpu" and onednn_runs(module.weight.dtype):
            module.__class__ = OneDNNLinear
    return model


def keep_freed_memory() -> bool:
    """Freed blocks of up to 2 GB stay in the process's heap for the next step, as CUDA's caching
    allocator keeps them on a GPU. By default glibc maps each block above its threshold (32 MB at
    most) afresh and unmaps it when freed, so a step's logits ([candidates, vocabulary] floats:
    259 MB at batch 16 with LLaDA's vocabulary) were mapped, faulted in page by page and unmapped
    at every step: a quarter of a batch-16 step of the tiny model (docs/BENCHMARKS.md, engine
    v3). Freed memory is not returned to the system; the peak is what it was. Returns whether
    the C library took the setting (only glibc has these knobs)."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, _HEAP_BLOCK_BYTES)) and bool(mallopt(_M_TRIM_THRESHOLD, _HEAP_BLOCK_BYTES))
