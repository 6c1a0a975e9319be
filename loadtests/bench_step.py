"""What one denoising step costs the host: operator calls and device-to-host transfers per step,
and steps per second, at batch 1, 8 and 16, for this tree and a baseline tree in the same run.

    git worktree add /tmp/llada-base 4929eca
    python -m loadtests.bench_step --baseline /tmp/llada-base --json step.json

Each tree runs in its own child process with that tree first on sys.path, on the same models:
the tiny model (d_model 64, 2 layers, LLaDA's vocabulary) and the bench model of bench_engine.
The step is `Denoiser(loaded).step(jobs)` (the API both trees share), at temperature 0,
gen_length 64, block_length 32, steps 64, prompts of the same length.

- operator calls: `aten::` events recorded by torch.profiler over one step (nested calls
  included), the mean of --profile-steps steps;
- device-to-host transfers: the calls that would wait for a GPU (Tensor.tolist, .item, bool/int/
  float of a tensor, .cpu, .numpy, and aten::nonzero, whose output size is read back), counted by
  wrapping them while the steps run;
- host time per job-step: the wall time of the profiled steps less the time inside their
  outermost operators (aten::, mkldnn::; on the CPU they hold the device's work: the matmuls),
  per step and per job: what the Python around the operators costs, the part a GPU step cannot
  hide (the profiler's own per-operator cost lands in it for both trees alike);
- steps/s: --timed-steps steps after one warm-up step, wall time; the trees take turns for
  --rounds rounds (a child process each) and the median is reported, so that load that comes
  and goes on a shared machine weighs on both alike.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

BATCHES = (1, 8, 16)
# "bench" is common.BENCH_SHAPE, repeated: a child runs against another tree, whose loadtests differ.
MODELS = {
    "tiny": dict(d_model=64, n_layers=2, n_heads=4, n_kv_heads=4, mlp_hidden_size=176),
    "bench": dict(d_model=512, n_layers=6, n_heads=8, n_kv_heads=8, mlp_hidden_size=1408),
}
READBACKS = ("tolist", "item", "__bool__", "__int__", "__float__", "cpu", "numpy")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--baseline", type=Path, help="a worktree of the commit to compare with (e.g. 4929eca)")
    p.add_argument("--models", default="tiny,bench")
    p.add_argument("--profile-steps", type=int, default=3)
    p.add_argument("--timed-steps", type=int, default=20)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", dest="json_path")
    p.add_argument("--child", type=Path, help=argparse.SUPPRESS)  # measure the tree at this path
    p.add_argument("--timing-only", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def measure_tree(args: argparse.Namespace) -> dict:
    """In the child: the tree at args.child is first on sys.path."""
    import torch

    from server.engine.demo import build_demo, demo_config
    from server.engine.denoiser import Denoiser
    from server.engine.sampling_params import SamplingParams

    if args.threads:
        torch.set_num_threads(args.threads)
    try:  # what a server process of the tree sets on the CPU (a baseline tree may not have it)
        from server.engine.cpu_kernels import keep_freed_memory

        keep_freed_memory()
    except ImportError:
        pass
    params = SamplingParams(gen_length=64, steps=64, block_length=32, temperature=0.0)
    out = {}
    for model_name in args.models.split(","):
        loaded = build_demo(demo_config(**MODELS[model_name]), seed=0)
        prompt = list(b"Tell me about diffusion models, please. " * 2)
        rows = {}
        for batch in BATCHES:
            denoiser = Denoiser(loaded)
            jobs = [denoiser.new_job(prompt, params) for _ in range(batch)]
            denoiser.step(jobs)  # warm-up
            if args.timing_only:  # the same steps, unprofiled: every round times the same point of the block
                for _ in range(args.profile_steps):
                    denoiser.step(jobs)
            else:
                rows[str(batch)] = profile_steps(denoiser, jobs, args.profile_steps)
            start = time.perf_counter()
            for _ in range(args.timed_steps):
                denoiser.step(jobs)
            wall = time.perf_counter() - start
            assert not any(job.finished for job in jobs), "the measured steps ran past the answer"
            rows.setdefault(str(batch), {})["steps_per_s"] = round(args.timed_steps / wall, 2)
        out[model_name] = rows
    return out


def profile_steps(denoiser, jobs, steps: int) -> dict:
    """aten:: events and read-backs per step, over `steps` steps."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    readbacks = {"n": 0}
    originals = {name: getattr(torch.Tensor, name) for name in READBACKS}

    def counting(original):
        def wrapper(self, *a, **k):
            readbacks["n"] += 1
            return original(self, *a, **k)

        return wrapper

    for name, original in originals.items():
        setattr(torch.Tensor, name, counting(original))
    try:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            start = time.perf_counter()
            for _ in range(steps):
                denoiser.step(jobs)
            wall = time.perf_counter() - start
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)
    events = [e.name for e in prof.events()]
    aten = sum(1 for name in events if name.startswith("aten::"))
    nonzero = sum(1 for name in events if name == "aten::nonzero")
    return {
        "aten_ops_per_step": round(aten / steps, 1),
        "readbacks_per_step": round((readbacks["n"] + nonzero) / steps, 2),
        "host_us_per_job_step": round(1e6 * (wall - in_operators(prof.events())) / steps / len(jobs), 1),
    }


def in_operators(events) -> float:
    """Seconds inside outermost operators (aten::, mkldnn::, ...: their union): on the CPU the
    device's work, kernels included. The rest of a step's wall time is the host's: Python,
    bookkeeping, the profiler's own cost (alike in both trees)."""
    spans = sorted(
        (e.time_range.start, e.time_range.end)
        for e in events
        if "::" in e.name and not (e.cpu_parent and "::" in e.cpu_parent.name)
    )
    total, reach = 0.0, float("-inf")
    for begin, end in spans:
        if end > reach:
            total += end - max(begin, reach)
            reach = end
    return total / 1e6


def run_child(tree: Path, args: argparse.Namespace, timing_only: bool = False) -> dict:
    """This file run as a script (so `server` comes from the tree on PYTHONPATH, not from here)."""
    command = [sys.executable, __file__, "--child", str(tree), "--models", args.models]
    command += ["--timing-only"] if timing_only else []
    command += ["--profile-steps", str(args.profile_steps), "--timed-steps", str(args.timed_steps)]
    if args.threads:
        command += ["--threads", str(args.threads)]
    env = {**os.environ, "PYTHONPATH": str(tree)}
    proc = subprocess.run(command, cwd=tree, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"measuring {tree} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def tree_rates(measured: dict) -> dict:
    return {(model, batch): row["steps_per_s"] for model, rows in measured.items() for batch, row in rows.items()}


def rates_by_key(rounds: list[dict]) -> dict:
    return {key: [r[key] for r in rounds] for key in rounds[0]}


def compare(current: dict, baseline: dict) -> dict:
    """Per model and batch: this tree / the baseline, and the ops each added job costs."""
    out = {}
    for model, rows in current.items():
        out[model] = {}
        for batch, row in rows.items():
            base = baseline[model][batch]
            out[model][batch] = {
                "steps_per_s_ratio": round(row["steps_per_s"] / base["steps_per_s"], 2),
                "aten_ops_ratio": round(row["aten_ops_per_step"] / base["aten_ops_per_step"], 3),
                "host_time_ratio": round(row["host_us_per_job_step"] / base["host_us_per_job_step"], 2),
            }
        first, last = rows[str(BATCHES[0])], rows[str(BATCHES[-1])]
        out[model]["ops_per_added_job"] = round(
            (last["aten_ops_per_step"] - first["aten_ops_per_step"]) / (BATCHES[-1] - BATCHES[0]), 2
        )
    return out


def goals(current: dict, baseline: dict | None) -> list[dict]:
    """The transfers goal, and the operator-count and host-time goals where the tiny model ran
    (--models; host time against a --baseline)."""
    worst_readbacks = max(row["readbacks_per_step"] for rows in current.values() for row in rows.values())
    transfers = {
        "goal": "at most 2 device-to-host transfers per step at any batch",
        "measured": worst_readbacks,
        "met": worst_readbacks <= 2,
    }
    if "tiny" not in current:
        return [transfers]
    tiny = current["tiny"]
    per_job = (tiny["16"]["aten_ops_per_step"] - tiny["1"]["aten_ops_per_step"]) / 15
    host = []
    if baseline is not None:
        ratio = tiny["16"]["host_us_per_job_step"] / baseline["tiny"]["16"]["host_us_per_job_step"]
        host = [
            {
                "goal": "host time per job-step at batch 16 at most half the baseline's (tiny model)",
                "measured": round(ratio, 2),
                "met": ratio <= 0.5,
            }
        ]
    return host + [
        {
            "goal": "at most 10 more operator calls per added job (tiny model)",
            "measured": round(per_job, 2),
            "met": per_job <= 10,
        },
        {
            "goal": "batch 16 within 700 operator calls per step (tiny model)",
            "measured": tiny["16"]["aten_ops_per_step"],
            "met": tiny["16"]["aten_ops_per_step"] <= 700,
        },
        transfers,
    ]


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(measure_tree(args)))
        return
    import torch

    from loadtests.common import REPO_ROOT, finish, machine_info

    started = time.perf_counter()
    trees = {"this_tree": REPO_ROOT, **({"baseline_tree": args.baseline} if args.baseline else {})}
    measured = {name: run_child(tree, args) for name, tree in trees.items()}
    rates = {name: [tree_rates(measured[name])] for name in trees}
    for _ in range(args.rounds - 1):
        for name, tree in trees.items():
            rates[name].append(tree_rates(run_child(tree, args, timing_only=True)))
    for name in trees:
        for key, values in rates_by_key(rates[name]).items():
            model, batch = key
            measured[name][model][batch]["steps_per_s"] = statistics.median(values)
            measured[name][model][batch]["steps_per_s_rounds"] = values
    result = {
        "command": "python -m loadtests.bench_step " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": machine_info(torch.device("cpu")),
        "settings": {
            "temperature": 0,
            "gen_length": 64,
            "block_length": 32,
            "steps": 64,
            "batches": BATCHES,
            "rounds": args.rounds,
        },
        "this_tree": measured["this_tree"],
    }
    if args.baseline:
        result["baseline_tree"] = {"path": str(args.baseline), **measured["baseline_tree"]}
        result["this_over_baseline"] = compare(result["this_tree"], measured["baseline_tree"])
    result["goals"] = goals(result["this_tree"], measured.get("baseline_tree"))
    finish(result, started, args.json_path)


if __name__ == "__main__":
    main()
