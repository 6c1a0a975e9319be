"""Engine benchmark: the batched denoiser against the plain reference loop, in one run.

    python -m loadtests.bench_engine --json bench_engine.json      # CPU, float32 (about 5 min on 2 cores)
    python -m loadtests.bench_engine --device cuda --dtype bfloat16

Throughput, over the same --requests chat prompts at temperature 0 (so the answers must agree),
the median of --repeats repetitions: the reference loop (tests/reference/sampler.py, full logits
every step, one request at a time), the engine at batch 1 (`generate_batch` per request) and at
batch N (one `generate_batch` of all). tokens/s = requests * gen_length / wall time. On CPU each
run's time is split into the model body, the LM head and the rest.

Peak memory of one request (gen_length --mem-gen-length), each measurement in a fresh child
process: on CPU the peak RSS (VmHWM, reset after the model is built and warmed up) above that
point; on CUDA torch.cuda.max_memory_allocated above the memory allocated at that point.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import torch

from loadtests.common import add_model_args, bench_config, describe_model, finish, machine_info, model_argv
from server.engine.demo import build_demo
from server.engine.denoiser import generate_batch
from server.engine.devices import resolve_device, resolve_dtype
from server.engine.loader import LoadedModel
from server.engine.sampling_params import SamplingParams
from tests.reference.sampler import reference_generate_for
from tests.support import REPO_ROOT

FAR_BELOW = 0.25  # "far below the reference's peak memory": at most a quarter of it

# Prompt contents of varied length; the chat template adds about 23 tokens around each (the demo
# tokenizer is byte-level, one token per byte).
PROMPT_TEXTS = [
    "Hi there.",
    "Write a haiku about the sea.",
    "What is the capital of France, and why?",
    "Explain in two sentences how a diffusion language model writes text.",
    "List five prime numbers greater than one hundred and say how you checked each one of them.",
    "Summarise the plot of a story in which a lighthouse keeper finds a message in a bottle "
    "that was written by his grandfather.",
    "You are a careful assistant. Translate the following sentence into French, then into German, "
    "then explain any differences: the early bird catches the worm.",
    "Here is a short list of groceries: apples, bread, milk, eggs, rice, beans, tomatoes, onions, "
    "garlic, olive oil, salt and pepper. Group them by aisle and suggest a dinner that uses most of them.",
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--requests", type=int, default=8, help="requests, and the batch of the batched run")
    p.add_argument("--gen-length", type=int, default=64)
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--block-length", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3, help="repetitions of the runs; the median is reported")
    p.add_argument("--mem-gen-length", type=int, default=512)
    p.add_argument("--mem-steps", type=int, default=16)
    p.add_argument("--skip-memory", action="store_true")
    p.add_argument("--json", dest="json_path", default=None, help="write the figures to this file")
    # internal: one memory measurement in this (child) process, printed as a JSON line
    p.add_argument("--measure-memory", choices=("reference", "engine"), help=argparse.SUPPRESS)
    p.add_argument("--mem-block-length", type=int, help=argparse.SUPPRESS)
    p.add_argument("--mem-temperature", type=float, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def build(args: argparse.Namespace) -> LoadedModel:
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    return build_demo(bench_config(args), seed=args.model_seed, dtype=resolve_dtype(args.dtype, device), device=device)


def prompts_for(loaded: LoadedModel, n: int) -> list[list[int]]:
    texts = [PROMPT_TEXTS[i % len(PROMPT_TEXTS)] for i in range(n)]
    return [loaded.codec.encode_chat([{"role": "user", "content": t}]) for t in texts]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_reference(loaded: LoadedModel, prompts: list[list[int]], params: SamplingParams) -> list[list[int]]:
    def logits_fn(ids: torch.Tensor) -> torch.Tensor:
        return loaded.model.full_logits(ids.to(loaded.device))

    return [reference_generate_for(logits_fn, prompt, params, loaded.special) for prompt in prompts]


def run_engine(loaded: LoadedModel, prompts: list[list[int]], params: SamplingParams) -> list[list[int]]:
    return generate_batch(loaded, prompts, [params] * len(prompts))


class PartTimer:
    """Seconds in the model body (`forward`) and the LM head (`logits`), by wrapping both on the
    model instance (the reference and the engine call the same two). CPU only: on CUDA the
    synchronisations it would need change what it measures."""

    def __init__(self, model: torch.nn.Module):
        self.seconds: Counter = Counter()
        self.calls: Counter = Counter()
        for name in ("forward", "logits"):
            setattr(model, name, self._timed(name, getattr(model, name)))

    def _timed(self, name: str, fn: Callable) -> Callable:
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[name] += time.perf_counter() - start
                self.calls[name] += 1

        return timed


def throughput(args: argparse.Namespace, loaded: LoadedModel) -> dict:
    device = loaded.device
    prompts = prompts_for(loaded, args.requests)
    params = SamplingParams(
        gen_length=args.gen_length, steps=args.steps, block_length=args.block_length, temperature=0.0, seed=0
    )
    # warm-up: one full request through both paths (allocator, BLAS / cuBLAS initialisation); a
    # shorter one left the first timed run measurably slower on CPU
    with torch.inference_mode():
        run_reference(loaded, prompts[:1], params)
        run_engine(loaded, prompts[:2], params)
    timer = PartTimer(loaded.model) if device.type == "cpu" else None
    names = ("reference", "engine_batch_1", f"engine_batch_{args.requests}")
    walls: dict[str, list[float]] = {name: [] for name in names}
    parts: dict[str, Counter] = {name: Counter() for name in names}
    answers: dict[str, list[list[int]]] = {}

    def timed(name: str, fn: Callable[[], list[list[int]]]) -> tuple[list[list[int]], float]:
        seconds, calls = (timer.seconds.copy(), timer.calls.copy()) if timer else (Counter(), Counter())
        sync(device)
        start = time.perf_counter()
        out = fn()
        sync(device)
        wall = time.perf_counter() - start
        if timer:
            parts[name]["body_s"] += timer.seconds["forward"] - seconds["forward"]
            parts[name]["lm_head_s"] += timer.seconds["logits"] - seconds["logits"]
            parts[name]["forwards"] += timer.calls["forward"] - calls["forward"]
        return out, wall

    with torch.inference_mode():
        for rep in range(args.repeats):
            # the reference and engine batch 1 alternate request by request, so load that comes
            # and goes on a shared machine weighs on both alike
            print(f"  repetition {rep + 1}/{args.repeats} ...", flush=True)
            rep_wall: Counter = Counter()
            rep_answers: dict[str, list[list[int]]] = {name: [] for name in names}
            for prompt in prompts:
                for name, run in ((names[0], run_reference), (names[1], run_engine)):
                    out, wall = timed(name, lambda run=run, prompt=prompt: run(loaded, [prompt], params))
                    rep_wall[name] += wall
                    rep_answers[name] += out
            rep_answers[names[2]], rep_wall[names[2]] = timed(names[2], lambda: run_engine(loaded, prompts, params))
            for name in names:
                walls[name].append(rep_wall[name])
                answers.setdefault(name, rep_answers[name])

    tokens = args.requests * args.gen_length
    runs = {}
    for name in names:
        wall = statistics.median(walls[name])
        run = {"wall_s": round(wall, 3), "tokens_per_s": round(tokens / wall, 2)}
        run["vs_reference"] = round(run["tokens_per_s"] / runs.get("reference", run)["tokens_per_s"], 2)
        pairs = list(zip(answers[name], answers["reference"]))
        run["equal_answers"] = sum(a == r for a, r in pairs)
        run["differing_tokens"] = sum(x != y for a, r in pairs for x, y in zip(a, r))
        if timer:
            body, head = parts[name]["body_s"] / args.repeats, parts[name]["lm_head_s"] / args.repeats
            run["forwards"] = parts[name]["forwards"] // args.repeats
            run["body_s"], run["lm_head_s"] = round(body, 3), round(head, 3)
            run["rest_s"] = round(statistics.mean(walls[name]) - body - head, 3)
        run["wall_s_each_repetition"] = [round(w, 3) for w in walls[name]]
        runs[name] = run
    return {
        "settings": {
            "requests": args.requests,
            "gen_length": args.gen_length,
            "steps": args.steps,
            "block_length": args.block_length,
            "temperature": 0.0,
            "repeats": args.repeats,
        },
        "prompt_lengths": [len(p) for p in prompts],
        "runs": runs,
    }


def measure_memory_child(args: argparse.Namespace) -> dict:
    loaded = build(args)
    device = loaded.device
    prompt = prompts_for(loaded, 1)[0]
    params = SamplingParams(
        gen_length=args.mem_gen_length,
        steps=args.mem_steps,
        block_length=args.mem_block_length,
        temperature=args.mem_temperature,
        seed=0,
    )
    # one tiny forward first, so library initialisation (thread pools, BLAS, cuBLAS workspace) is
    # part of the baseline and charged to neither sampler
    with torch.inference_mode():
        loaded.model.full_logits(torch.tensor([prompt[:4]], device=device))
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    else:
        try:  # ru_maxrss cannot be reset, and the model's build may have peaked above the run
            Path("/proc/self/clear_refs").write_text("5")
        except OSError as exc:
            raise SystemExit(f"cannot reset the RSS high-water mark ({exc}): run with --skip-memory") from None
        base = rss_high_water()
    with torch.inference_mode():
        (run_reference if args.measure_memory == "reference" else run_engine)(loaded, [prompt], params)
    sync(device)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else rss_high_water()
    return {"prompt_length": len(prompt), "peak_mib": round((peak - base) / 2**20, 1)}


def rss_high_water() -> int:
    """This process's VmHWM, in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise SystemExit("no VmHWM in /proc/self/status: run with --skip-memory")


def memory(args: argparse.Namespace, loaded: LoadedModel) -> dict:
    gen = args.mem_gen_length
    # block_length = gen_length is the worst case (every answer position a candidate at the first
    # step); temperature > 0 adds the float64 Gumbel work, which the reference draws on the CPU
    cases = [(gen, 0.0)] if loaded.device.type == "cuda" else [(gen, 0.0), (gen, 1.0), (min(32, gen), 1.0)]
    rows = []
    for block, temperature in dict.fromkeys(cases):
        row = {"block_length": block, "temperature": temperature}
        for which in ("reference", "engine"):
            print(f"  peak memory: {which}, block_length {block}, temperature {temperature:g} ...", flush=True)
            command = [sys.executable, "-m", "loadtests.bench_engine", "--measure-memory", which, *model_argv(args)]
            command += ["--mem-gen-length", str(gen), "--mem-steps", str(args.mem_steps)]
            command += ["--mem-block-length", str(block), "--mem-temperature", str(temperature)]
            proc = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(f"memory child failed:\n{proc.stderr[-4000:]}")
            child = json.loads(proc.stdout.strip().splitlines()[-1])
            row[f"{which}_mib"] = child["peak_mib"]
        row["engine_over_reference"] = round(row["engine_mib"] / row["reference_mib"], 2)
        rows.append(row)
    length = child["prompt_length"] + gen
    vocab = loaded.config.vocab_size
    return {
        "settings": {"prompt_length": child["prompt_length"], "gen_length": gen, "steps": args.mem_steps},
        "peaks": rows,
        # for scale: the published sampler's [rows, L, V] float64 tensor, and full logits [L, V]
        "published_sampler_L_V_float64_mib": round(length * vocab * 8 / 2**20, 1),
        "full_logits_L_V_float32_mib": round(length * vocab * 4 / 2**20, 1),
    }


def goals(result: dict) -> list[dict]:
    runs = result["throughput"]["runs"]
    requests = result["throughput"]["settings"]["requests"]
    batch_1, batch_n = runs["engine_batch_1"]["vs_reference"], runs[f"engine_batch_{requests}"]["vs_reference"]
    equal = [run["equal_answers"] for name, run in runs.items() if name != "reference"]
    out = [
        {"goal": "engine batch 1 at least as fast as the reference loop", "measured": batch_1, "met": batch_1 >= 1},
        {
            "goal": f"engine batch {requests} at least 3x the reference loop's tokens/s",
            "measured": batch_n,
            "met": batch_n >= 3,
        },
        {
            "goal": f"answers of engine batch 1 and batch {requests} equal to the reference's",
            "measured": " and ".join(f"{n}/{requests}" for n in equal),
            "met": all(n == requests for n in equal),
        },
    ]
    for row in result.get("memory", {}).get("peaks", []):
        out.append(
            {
                "goal": f"peak memory at most {FAR_BELOW}x the reference's "
                f"(block_length {row['block_length']}, temperature {row['temperature']:g})",
                "measured": row["engine_over_reference"],
                "met": row["engine_over_reference"] <= FAR_BELOW,
            }
        )
    return out


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.measure_memory:
        print(json.dumps(measure_memory_child(args)), flush=True)
        return
    started = time.perf_counter()
    loaded = build(args)
    result = {
        "command": "python -m loadtests.bench_engine " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": machine_info(loaded.device),
        "dtype": str(loaded.dtype).removeprefix("torch."),
        "model": describe_model(loaded.model, loaded.config),
        "throughput": throughput(args, loaded),
    }
    if not args.skip_memory:
        result["memory"] = memory(args, loaded)
    result["goals"] = goals(result)
    finish(result, started, args.json_path)


if __name__ == "__main__":
    main()
