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

REPO_ROOT = Path(__file__).resolve().parent.parent


def add_model_args(p: argparse.ArgumentParser) -> None:
    """--device, --dtype, --threads and the bench configuration's shape."""
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default cpu)")
    p.add_argument(
        "--dtype", default="auto", help="auto (float32 on CPU, bfloat16 on CUDA), bfloat16, float16, float32"
    )
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--d-model", type=int, default=512)
    p.add_argument("--n-layers", type=int, default=6)
    p.add_argument("--n-heads", type=int, default=8)
    p.add_argument("--n-kv-heads", type=int, default=8)
    p.add_argument("--mlp-hidden-size", type=int, default=1408)
    p.add_argument("--model-seed", type=int, default=0)


def add_request_set_args(p: argparse.ArgumentParser, requests: int, clients: int) -> None:
    """The fixed request set of the HTTP benchmarks, and the server's batch bound."""
    p.add_argument("--max-batch-rows", type=int, default=16)
    p.add_argument("--requests", type=int, default=requests, help=f"requests in the fixed set (default {requests})")
    p.add_argument("--clients", type=int, default=clients, help=f"concurrent clients (default {clients})")
    p.add_argument("--prompt-tokens", type=int, default=48, help="prompt length of the fixed set, in tokens")
    p.add_argument("--gen-length", type=int, default=64)
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--block-length", type=int, default=32)
    p.add_argument("--stream-share", type=float, default=0.5, help="share of the fixed-set requests sent streamed")


def bench_config(args: argparse.Namespace):
    return demo_config(
        d_model=args.d_model,
        n_layers=args.n_layers,
        n_heads=args.n_heads,
        n_kv_heads=args.n_kv_heads,
        mlp_hidden_size=args.mlp_hidden_size,
    )


def machine_info(device: torch.device) -> dict:
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gib = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem_gib = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "cpu_cores": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_threads": torch.get_num_threads(),
        "memory_gib": mem_gib,
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
    return info


def _git(*argv: str) -> str | None:
    try:
        proc = subprocess.run(["git", *argv], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout.strip() if proc.returncode == 0 else None


def finish(result: dict, started: float, json_path: str | None) -> None:
    """Write the figures (when asked) and print them, from the same JSON."""
    result["total_wall_s"] = round(time.perf_counter() - started, 1)
    text = json.dumps(result, indent=2)
    if json_path:
        Path(json_path).write_text(text)
    print(render(json.loads(text)))
    if json_path:
        print(f"figures written to {json_path}")
