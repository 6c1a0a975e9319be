"""What the benchmarks share: the bench model's flags and shape, the machine they ran on, and
writing the figures out."""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import time
from pathlib import Path

import torch

from loadtests.report import render
from server.engine.demo import demo_config
from server.engine.model_config import ModelConfig
from tests.support import REPO_ROOT

# The demo architecture at a size where the model's compute, not Python, dominates a CPU step.
BENCH_SHAPE = {"d_model": 512, "n_layers": 6, "n_heads": 8, "n_kv_heads": 8, "mlp_hidden_size": 1408}
LLADA_8B_SHAPE = {"d_model": 4096, "n_layers": 32, "n_heads": 32, "n_kv_heads": 32, "mlp_hidden_size": 12288}
MODEL_FLAGS = ("device", "dtype", "threads", *BENCH_SHAPE, "model_seed")


def add_model_args(p: argparse.ArgumentParser) -> None:
    """--device, --dtype, --threads and the bench model's shape and seed."""
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default cpu)")
    p.add_argument(
        "--dtype", default="auto", help="auto (float32 on CPU, bfloat16 on CUDA), bfloat16, float16, float32"
    )
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    for name, default in BENCH_SHAPE.items():
        p.add_argument("--" + name.replace("_", "-"), type=int, default=default)
    p.add_argument("--model-seed", type=int, default=0)


def model_argv(args: argparse.Namespace) -> list[str]:
    """The flags of add_model_args with args' values: the same model in a child process."""
    values = [(name, getattr(args, name)) for name in MODEL_FLAGS]
    return [arg for name, value in values if value is not None for arg in ("--" + name.replace("_", "-"), str(value))]


def bench_config(args: argparse.Namespace) -> ModelConfig:
    return demo_config(**{name: getattr(args, name) for name in BENCH_SHAPE})


def lm_head_share(config: ModelConfig) -> float:
    """The LM head's share of the weights a full-logits forward multiplies per position: what the
    engine saves by running the head on the current block's masked positions only."""
    d, kv = config.d_model, config.n_kv_heads * config.head_dim
    body = config.n_layers * (2 * d * d + 2 * d * kv + 3 * d * config.mlp_hidden_size)
    head = d * config.vocab_size
    return round(head / (body + head), 3)


def describe_model(model: torch.nn.Module, config: ModelConfig) -> dict:
    return {
        **{name: getattr(config, name) for name in BENCH_SHAPE},
        "vocab_size": config.vocab_size,
        "parameters": sum(p.numel() for p in model.parameters()),
        "lm_head_share_of_full_forward": lm_head_share(config),
        "same_share_in_llada_8b": lm_head_share(demo_config(**LLADA_8B_SHAPE)),
    }


def _proc_field(path: str, key: str) -> str | None:
    try:
        lines = Path(path).read_text().splitlines()
    except OSError:
        return None
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith(key)), None)


def load_average() -> list[float] | None:
    """Other work on the machine: the figures mean little when this is well above zero."""
    return [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None


def machine_info(device: torch.device) -> dict:
    memory = _proc_field("/proc/meminfo", "MemTotal")
    info = {
        "cpu": _proc_field("/proc/cpuinfo", "model name") or platform.processor() or "unknown",
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory_gib": memory and round(int(memory.split()[0]) / 2**20, 1),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    info["git_commit"] = _git("rev-parse", "--short", "HEAD")
    dirty = _git("status", "--porcelain", "--", "server")
    info["server_code_modified"] = None if dirty is None else bool(dirty)
    info["load_average_at_start"] = load_average()
    return info


def _git(*argv: str) -> str | None:
    try:
        proc = subprocess.run(["git", *argv], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout.strip() if proc.returncode == 0 else None


def finish(result: dict, started: float, json_path: str | None) -> None:
    """Write the figures (when asked) and print them, from the same JSON."""
    result["load_average_at_end"] = load_average()
    result["total_wall_s"] = round(time.perf_counter() - started, 1)
    text = json.dumps(result, indent=2)
    if json_path:
        Path(json_path).write_text(text)
    print(render(json.loads(text)))
    if json_path:
        print(f"figures written to {json_path}")
