"""Engine benchmark: the batched denoiser against the plain reference loop, in one run.

    python -m loadtests.bench_engine                       # CPU, float32 (about 5 min on 2 cores)
    python -m loadtests.bench_engine --device cuda --dtype bfloat16
    python -m loadtests.bench_engine --json bench.json      # also write the figures

Three throughput runs over the same N requests (temperature 0, so answers must agree):
  1. the reference loop (tests/reference/sampler.py, full logits every step), one request at a time;
  2. the engine at batch 1: each request alone through `generate_batch`;
  3. the engine at batch N: all requests in one `generate_batch`.
tokens/s = answer tokens (N * gen_length) / wall time of the run.

Then the peak memory of one long fixed-length request (gen_length 512, block_length 512: every
answer position is a candidate at the first step), each measurement in a fresh child process
(`--measure-memory ref|engine`): on CPU the peak RSS (ru_maxrss, and VmHWM after a reset) minus the
figure right after the model is built; on CUDA torch.cuda.max_memory_allocated minus the memory
allocated after the build.

The model is the demo architecture at a "bench configuration" (random weights, LLaDA's vocabulary
of 126464): big enough that the model's compute, not Python, dominates a step on CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from loadtests.common import REPO_ROOT, add_model_args, bench_config, finish, machine_info, print_goals
from server.engine.demo import build_demo, demo_config
from server.engine.denoiser import generate_batch
from server.engine.devices import resolve_device, resolve_dtype
from server.engine.padding import pad_rows
from server.engine.sampling_params import SamplingParams
from tests.reference.sampler import reference_generate_for

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


# ---------------------------------------------------------------------------------------------
# setup


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    # throughput runs
    p.add_argument("--requests", type=int, default=8, help="number of requests (batch size of the batched run)")
    p.add_argument("--gen-length", type=int, default=64)
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--block-length", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3, help="repetitions of the three runs; the median is reported")
    p.add_argument(
        "--breakdown",
        choices=("auto", "on", "off"),
        default="auto",
        help="time model body / LM head / rest per run (auto: on for CPU; on CUDA it adds syncs)",
    )
    # memory runs
    p.add_argument("--mem-gen-length", type=int, default=512)
    p.add_argument("--mem-steps", type=int, default=16)
    p.add_argument(
        "--mem-cases",
        default="512:0,512:1,32:1",
        help="comma list of BLOCK_LENGTH:TEMPERATURE; one reference and one engine child per case "
        "(block_length = gen_length is the fixed-length worst case; temperature > 0 adds the "
        "float64 Gumbel work; on CUDA only temperature 0 is run: the reference draws on CPU)",
    )
    p.add_argument("--skip-memory", action="store_true")
    p.add_argument("--skip-throughput", action="store_true")
    p.add_argument("--json", dest="json_path", default=None, help="write the figures to this file")
    # internal: one isolated memory measurement, printed as a JSON line
    p.add_argument("--measure-memory", choices=("ref", "engine"), default=None, help=argparse.SUPPRESS)
    p.add_argument("--mem-temperature", type=float, default=0.0, help=argparse.SUPPRESS)
    p.add_argument("--mem-block-length", type=int, default=512, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def build(args: argparse.Namespace):
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    return build_demo(bench_config(args), seed=args.model_seed, dtype=dtype, device=device)


def prompts_for(loaded, n: int) -> list[list[int]]:
    texts = [PROMPT_TEXTS[i % len(PROMPT_TEXTS)] for i in range(n)]
    return [loaded.codec.encode_chat([{"role": "user", "content": t}]) for t in texts]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def flops_share(config) -> dict:
    """Multiply-adds per token of the transformer body and of the LM head (weights only)."""
    d, h, kv = config.d_model, config.mlp_hidden_size, config.n_kv_heads * config.head_dim
    body = config.n_layers * (2 * d * d + 2 * d * kv + 3 * d * h)
    head = d * config.vocab_size
    return {
        "body_params_per_token": body,
        "head_params_per_token": head,
        "head_share_of_full_forward": round(head / (body + head), 3),
    }


# ---------------------------------------------------------------------------------------------
# timing of model parts (instance-level wrappers; server code is not touched)


class PartTimer:
    """Wraps loaded.model.forward (body) and loaded.model.logits (final norm + LM head)."""

    def __init__(self, loaded, enabled: bool):
        self.model = loaded.model
        self.device = loaded.device
        self.enabled = enabled
        self.body = self.head = 0.0
        self.forwards = 0
        if enabled:
            self._install()

    def _install(self) -> None:
        model, device = self.model, self.device
        orig_forward, orig_logits = model.forward, model.logits

        def forward(*a, **k):
            sync(device)
            t = time.perf_counter()
            out = orig_forward(*a, **k)
            sync(device)
            self.body += time.perf_counter() - t
            self.forwards += 1
            return out

        def logits(*a, **k):
            sync(device)
            t = time.perf_counter()
            out = orig_logits(*a, **k)
            sync(device)
            self.head += time.perf_counter() - t
            return out

        model.forward, model.logits = forward, logits

    def reset(self) -> None:
        self.body = self.head = 0.0
        self.forwards = 0

    def parts(self, wall: float) -> dict | None:
        if not self.enabled:
            return None
        return {
            "forwards": self.forwards,
            "body_s": round(self.body, 3),
            "lm_head_s": round(self.head, 3),
            "rest_s": round(wall - self.body - self.head, 3),
        }


# ---------------------------------------------------------------------------------------------
# the runs


def run_reference(loaded, prompts, params: SamplingParams) -> list[list[int]]:
    device = loaded.device

    def logits_fn(ids: torch.Tensor) -> torch.Tensor:
        return loaded.model.full_logits(ids.to(device))

    return [reference_generate_for(logits_fn, prompt, params, loaded.special) for prompt in prompts]


def run_engine(loaded, prompts, params: SamplingParams, batch: int) -> list[list[int]]:
    answers = []
    for i in range(0, len(prompts), batch):
        chunk = prompts[i : i + batch]
        answers.extend(generate_batch(loaded, chunk, [params] * len(chunk)))
    return answers


def timed(fn, device):
    sync(device)
    t = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - t


def throughput(args, loaded) -> dict:
    device = loaded.device
    prompts = prompts_for(loaded, args.requests)
    params = SamplingParams(
        gen_length=args.gen_length, steps=args.steps, block_length=args.block_length, temperature=0.0, seed=0
    )
    breakdown = args.breakdown == "on" or (args.breakdown == "auto" and device.type != "cuda")

    # warm-up: one full request through both paths (allocator, BLAS / cuBLAS initialisation);
    # a shorter warm-up left the first timed run measurably slower on CPU
    with torch.inference_mode():
        run_reference(loaded, prompts[:1], params)
        run_engine(loaded, prompts[:2], params, batch=2)

    timer = PartTimer(loaded, breakdown)
    tokens = args.requests * args.gen_length
    batch_name = f"engine_batch_{args.requests}"
    names = ("reference", "engine_batch_1", batch_name)
    # Per repetition: reference and engine-batch-1 alternate request by request, then the batched
    # run; on a shared machine load that comes and goes then weighs on all three alike.
    walls = {n: [] for n in names}
    cpus = {n: [] for n in names}
    parts_acc = {n: {"forwards": 0, "body_s": 0.0, "lm_head_s": 0.0} for n in names}
    answers: dict[str, list[list[int]]] = {}
    load_before = os.getloadavg() if hasattr(os, "getloadavg") else None

    def one(name, fn):
        timer.reset()
        cpu0 = time.process_time()
        out, wall = timed(fn, device)
        cpu = time.process_time() - cpu0
        if timer.enabled:
            acc = parts_acc[name]
            acc["forwards"] += timer.forwards
            acc["body_s"] += timer.body
            acc["lm_head_s"] += timer.head
        return out, wall, cpu

    with torch.inference_mode():
        for rep in range(args.repeats):
            print(
                f"  repetition {rep + 1}/{args.repeats}: reference and engine batch 1, request by request ...",
                flush=True,
            )
            rep_wall = {names[0]: 0.0, names[1]: 0.0}
            rep_cpu = {names[0]: 0.0, names[1]: 0.0}
            rep_answers = {names[0]: [], names[1]: []}
            for prompt in prompts:
                for name, fn in (
                    (names[0], lambda p=prompt: run_reference(loaded, [p], params)),
                    (names[1], lambda p=prompt: run_engine(loaded, [p], params, batch=1)),
                ):
                    out, wall, cpu = one(name, fn)
                    rep_wall[name] += wall
                    rep_cpu[name] += cpu
                    rep_answers[name].extend(out)
            print(f"  repetition {rep + 1}/{args.repeats}: engine batch {args.requests} ...", flush=True)
            out, wall, cpu = one(batch_name, lambda: run_engine(loaded, prompts, params, batch=args.requests))
            rep_wall[batch_name], rep_cpu[batch_name], rep_answers[batch_name] = wall, cpu, out
            for name in names:
                walls[name].append(rep_wall[name])
                cpus[name].append(rep_cpu[name])
                answers.setdefault(name, rep_answers[name])
    load_after = os.getloadavg() if hasattr(os, "getloadavg") else None

    runs = {}
    for name in names:
        wall = statistics.median(walls[name])
        run = {
            "wall_s": round(wall, 3),
            "tokens": tokens,
            "tokens_per_s": round(tokens / wall, 2),
            "process_cpu_s": round(statistics.median(cpus[name]), 3),
            "wall_s_each_repetition": [round(w, 3) for w in walls[name]],
            "parts": None,
        }
        if timer.enabled:
            acc = parts_acc[name]
            reps = args.repeats
            body, head = acc["body_s"] / reps, acc["lm_head_s"] / reps
            mean_wall = sum(walls[name]) / reps
            run["parts"] = {
                "forwards": acc["forwards"] // reps,
                "body_s": round(body, 3),
                "lm_head_s": round(head, 3),
                "rest_s": round(mean_wall - body - head, 3),
            }
        runs[name] = run
    ref_tps = runs["reference"]["tokens_per_s"]
    for run in runs.values():
        run["vs_reference"] = round(run["tokens_per_s"] / ref_tps, 2)
    agree = {}
    for name in runs:
        if name == "reference":
            continue
        same = [a == r for a, r in zip(answers[name], answers["reference"])]
        differing = sum(x != y for a, r in zip(answers[name], answers["reference"]) for x, y in zip(a, r))
        agree[name] = {"equal_requests": sum(same), "requests": len(same), "differing_tokens": differing}
    lengths = [len(p) + args.gen_length for p in prompts]
    return {
        "prompt_lengths": [len(p) for p in prompts],
        # positions per forward of the batched run: real ones, and computed ones once right-padded
        # to the longest row (the batched forward's body does the padded amount of work)
        "batched_forward_positions": {
            "real": sum(lengths),
            "padded": len(lengths) * max(lengths),
            "padding_overhead": round(len(lengths) * max(lengths) / sum(lengths) - 1, 3),
        },
        "settings": {
            "requests": args.requests,
            "gen_length": args.gen_length,
            "steps": args.steps,
            "block_length": args.block_length,
            "temperature": 0.0,
            "remasking": "low_confidence",
        },
        "repeats": args.repeats,
        "loadavg_before": load_before,
        "loadavg_after": load_after,
        "runs": runs,
        "answers_equal_reference": agree,
    }


def diagnostics(args, loaded) -> dict:
    """Where the batched run's time goes: the body of one step as the batched forward runs it
    (right-padded, key mask), without the mask, and as single rows; the LM head per call by
    candidate count, and for every job's candidates in one call. Best of 3 each."""
    device = loaded.device
    model = loaded.model
    mask_id, pad_id = loaded.special.mask, loaded.special.eos
    prompts = prompts_for(loaded, args.requests)
    rows = [torch.tensor(p + [mask_id] * args.gen_length, device=device) for p in prompts]

    def best(fn, n=3):
        fn()
        times = []
        for _ in range(n):
            sync(device)
            t = time.perf_counter()
            fn()
            sync(device)
            times.append(time.perf_counter() - t)
        return round(min(times) * 1000, 2)

    out = {}
    with torch.inference_mode():
        ids, key_mask = pad_rows(rows, pad_id, device)
        out["body_ms_batched_padded_masked"] = best(lambda: model(ids, key_mask))
        out["body_ms_batched_padded_nomask"] = best(lambda: model(ids))
        out["body_ms_single_rows_summed"] = round(sum(best(lambda r=r: model(r[None])) for r in rows), 2)
        hidden = model(rows[-1][None])[0]
        start = len(prompts[-1])
        per_job = min(args.block_length, args.gen_length)
        for k in sorted({1, per_job // 2, per_job}):
            if k > 0:
                out[f"lm_head_ms_{k}_candidates"] = best(lambda k=k: model.logits(hidden[start : start + k]))
        # every job's half-block of candidates in one call, the shape a shared head call would have
        k_all = args.requests * max(1, per_job // 2)
        stacked = hidden[start : start + max(1, per_job // 2)].repeat(args.requests, 1)[:k_all]
        out[f"lm_head_ms_{k_all}_candidates_one_call"] = best(lambda: model.logits(stacked))
    return out


# ---------------------------------------------------------------------------------------------
# memory (child process per measurement)


def _vm_hwm_kib() -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_hwm() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def measure_memory_child(args) -> dict:
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
    # part of the baseline and not charged to either sampler
    with torch.inference_mode():
        loaded.model.full_logits(torch.tensor([prompt[:4]], device=device))
    result = {
        "which": args.measure_memory,
        "block_length": args.mem_block_length,
        "temperature": args.mem_temperature,
        "prompt_length": len(prompt),
    }
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    else:
        base_maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
        hwm_ok = _reset_hwm()
        base_hwm = _vm_hwm_kib()
    t = time.perf_counter()
    with torch.inference_mode():
        if args.measure_memory == "ref":
            if device.type == "cuda" and args.mem_temperature > 0:
                raise SystemExit("the reference draws its noise on CPU: use temperature 0 on CUDA")
            run_reference(loaded, [prompt], params)
        else:
            run_engine(loaded, [prompt], params, batch=1)
    sync(device)
    result["wall_s"] = round(time.perf_counter() - t, 3)
    if device.type == "cuda":
        result["peak_delta_mib"] = round((torch.cuda.max_memory_allocated(device) - base) / 2**20, 1)
        result["method"] = "torch.cuda.max_memory_allocated - memory_allocated after build and a tiny warm-up forward"
    else:
        peak_maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        result["baseline_maxrss_mib"] = round(base_maxrss / 1024, 1)
        result["peak_maxrss_mib"] = round(peak_maxrss / 1024, 1)
        result["maxrss_delta_mib"] = round((peak_maxrss - base_maxrss) / 1024, 1)
        if hwm_ok and base_hwm is not None:
            # ru_maxrss cannot be reset, so a transient during the build hides part of the run's
            # peak; VmHWM is reset right after the build and measures the run alone.
            result["hwm_delta_mib"] = round((_vm_hwm_kib() - base_hwm) / 1024, 1)
            result["peak_delta_mib"] = result["hwm_delta_mib"]
            result["method"] = (
                "VmHWM after run - RSS after build and a tiny warm-up forward (high-water mark reset there)"
            )
        else:
            result["peak_delta_mib"] = result["maxrss_delta_mib"]
            result["method"] = "ru_maxrss after run - ru_maxrss after build and a tiny warm-up forward"
    return result


def child_args(args) -> list[str]:
    out = [
        "--device",
        args.device,
        "--dtype",
        args.dtype,
        "--d-model",
        str(args.d_model),
        "--n-layers",
        str(args.n_layers),
        "--n-heads",
        str(args.n_heads),
        "--n-kv-heads",
        str(args.n_kv_heads),
        "--mlp-hidden-size",
        str(args.mlp_hidden_size),
        "--model-seed",
        str(args.model_seed),
        "--mem-gen-length",
        str(args.mem_gen_length),
        "--mem-steps",
        str(args.mem_steps),
    ]
    if args.threads:
        out += ["--threads", str(args.threads)]
    return out


def memory(args, loaded) -> dict:
    vocab = loaded.config.vocab_size
    prompt_len = len(prompts_for(loaded, 1)[0])
    length = prompt_len + args.mem_gen_length
    cases = []
    for item in args.mem_cases.split(","):
        if item.strip():
            block, temp = item.split(":")
            cases.append((min(int(block), args.mem_gen_length), float(temp)))
    if loaded.device.type == "cuda":
        cases = [c for c in cases if c[1] == 0] or [(args.mem_gen_length, 0.0)]
    measurements = []
    for block, temp in cases:
        for which in ("ref", "engine"):
            print(
                f"  measuring memory: {which}, block_length {block}, temperature {temp:g} (child process) ...",
                flush=True,
            )
            cmd = [
                sys.executable,
                "-m",
                "loadtests.bench_engine",
                "--measure-memory",
                which,
                "--mem-block-length",
                str(block),
                "--mem-temperature",
                str(temp),
                *child_args(args),
            ]
            proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(f"memory child failed:\n{proc.stderr[-4000:]}")
            measurements.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    largest_block = max(b for b, _ in cases)
    theory = {
        "sequence_length": length,
        # what the published generate() holds per step: [rows, L, V] float64 (Gumbel path, temperature > 0)
        "published_reference_rows_L_V_float64_mib": round(1 * length * vocab * 8 / 2**20, 1),
        "published_reference_rows_L_V_float64_mib_cfg": round(2 * length * vocab * 8 / 2**20, 1),
        "full_logits_L_V_float32_mib": round(length * vocab * 4 / 2**20, 1),
        # what a candidate-only sampler needs at the first step of the largest block: [block, V]
        "largest_block": largest_block,
        "candidates_V_float32_mib": round(largest_block * vocab * 4 / 2**20, 1),
        "candidates_V_float64_mib": round(largest_block * vocab * 8 / 2**20, 1),
    }
    return {
        "settings": {"gen_length": args.mem_gen_length, "steps": args.mem_steps, "prompt_length": prompt_len},
        "measurements": measurements,
        "theoretical": theory,
    }


# ---------------------------------------------------------------------------------------------
# report


def print_report(result: dict) -> None:
    m, cfg = result["machine"], result["config"]
    print("\n== machine")
    for k, v in m.items():
        print(f"  {k:15s} {v}")
    print(f"  dtype           {result['dtype']}")
    print("\n== bench configuration")
    print("  " + ", ".join(f"{k}={v}" for k, v in cfg.items()))
    share = result["flops"]
    print(
        f"  LM head share of a full-logits forward: bench config {share['bench']['head_share_of_full_forward']:.1%}, "
        f"LLaDA-8B shape {share['llada_8b']['head_share_of_full_forward']:.1%}"
    )
    if "throughput" in result:
        t = result["throughput"]
        s = t["settings"]
        print(
            f"\n== throughput: {s['requests']} requests, gen_length {s['gen_length']}, steps {s['steps']}, "
            f"block_length {s['block_length']}, temperature 0; prompt lengths {t['prompt_lengths']}"
        )
        bp = t["batched_forward_positions"]
        print(
            f"  batched forward: {bp['real']} real positions, {bp['padded']} once right-padded "
            f"(+{bp['padding_overhead']:.0%} work in the body)"
        )
        print(
            f"  repeats {t['repeats']} (median reported); load average before {t['loadavg_before']}, "
            f"after {t['loadavg_after']}"
        )
        print(
            f"  {'run':18s} {'wall s':>8s} {'cpu s':>8s} {'tokens/s':>9s} {'vs ref':>7s}   "
            f"parts (body / LM head / rest, s)"
        )
        for name, r in t["runs"].items():
            parts = r["parts"]
            ptxt = (
                (
                    f"{parts['body_s']:.2f} / {parts['lm_head_s']:.2f} / {parts['rest_s']:.2f}"
                    f"  ({parts['forwards']} forwards)"
                )
                if parts
                else "-"
            )
            print(
                f"  {name:18s} {r['wall_s']:8.2f} {r['process_cpu_s']:8.2f} {r['tokens_per_s']:9.2f} "
                f"{r['vs_reference']:6.2f}x   {ptxt}"
            )
        for name, a in t["answers_equal_reference"].items():
            verdict = "EQUAL" if a["equal_requests"] == a["requests"] else "DIFFERENT"
            print(
                f"  answers {name} vs reference: {verdict} ({a['equal_requests']}/{a['requests']} requests, "
                f"{a['differing_tokens']} differing tokens)"
            )
    if "diagnostics" in result:
        print(
            f"\n== diagnostics (best of 3, ms; the {result['throughput']['settings']['requests']} "
            f"throughput prompts with their masked answers)"
        )
        for k, v in result["diagnostics"].items():
            print(f"  {k:42s} {v:10.2f}")
    if "memory" in result:
        mem = result["memory"]
        s = mem["settings"]
        print(
            f"\n== peak memory: one request, prompt {s['prompt_length']}, gen_length {s['gen_length']}, "
            f"steps {s['steps']}"
        )
        for r in mem["measurements"]:
            extra = f"  (ru_maxrss delta {r['maxrss_delta_mib']:.1f} MiB)" if "maxrss_delta_mib" in r else ""
            print(
                f"  {r['which']:6s} block_length {r['block_length']:4d}, temperature {r['temperature']:g}: "
                f"peak delta {r['peak_delta_mib']:8.1f} MiB"
                f"{extra}  [{r['wall_s']:.1f} s]"
            )
        print(f"  method: {mem['measurements'][0]['method']}")
        th = mem["theoretical"]
        print(
            f"  theoretical: published reference's [rows, L={th['sequence_length']}, V] float64 = "
            f"{th['published_reference_rows_L_V_float64_mib']:.1f} MiB per tensor (x2 rows with CFG: "
            f"{th['published_reference_rows_L_V_float64_mib_cfg']:.1f} MiB); full logits [L, V] float32 = "
            f"{th['full_logits_L_V_float32_mib']:.1f} MiB; [{th['largest_block']} candidates, V] float32 / float64 = "
            f"{th['candidates_V_float32_mib']:.1f} / {th['candidates_V_float64_mib']:.1f} MiB"
        )
    print_goals(result)


def goals(result: dict) -> list[dict]:
    out = []
    t = result.get("throughput")
    if t:
        runs = t["runs"]
        b1 = runs["engine_batch_1"]["vs_reference"]
        bn_name = [n for n in runs if n.startswith("engine_batch_") and n != "engine_batch_1"][0]
        bn = runs[bn_name]["vs_reference"]
        out.append(
            {"goal": "engine batch 1 at least as fast as the reference", "met": b1 >= 1.0, "measured": f"{b1:.2f}x"}
        )
        out.append(
            {"goal": f"{bn_name} at least 3x the reference's tokens/s", "met": bn >= 3.0, "measured": f"{bn:.2f}x"}
        )
    mem = result.get("memory")
    if mem:
        by = {(r["which"], r["block_length"], r["temperature"]): r["peak_delta_mib"] for r in mem["measurements"]}
        for _, block, temp in sorted((k for k in by if k[0] == "ref"), key=lambda k: (-k[1], k[2])):
            ref, eng = by.get(("ref", block, temp)), by.get(("engine", block, temp))
            if ref is None or eng is None:
                continue
            ratio = eng / ref if ref > 0 else float("nan")
            out.append(
                {
                    "goal": f"peak memory far below the reference's, taken as <= {FAR_BELOW}x "
                    f"(block_length {block}, temperature {temp:g})",
                    "met": ratio <= FAR_BELOW,
                    "measured": f"engine {eng:.1f} MiB vs reference {ref:.1f} MiB ({ratio:.2f}x)",
                }
            )
    return out


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.measure_memory:
        print(json.dumps(measure_memory_child(args)), flush=True)
        return
    t0 = time.perf_counter()
    loaded = build(args)
    config = bench_config(args)
    result = {
        "command": "python -m loadtests.bench_engine " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": machine_info(loaded.device),
        "dtype": str(loaded.dtype).replace("torch.", ""),
        "config": {
            "d_model": config.d_model,
            "n_layers": config.n_layers,
            "n_heads": config.n_heads,
            "n_kv_heads": config.n_kv_heads,
            "head_dim": config.head_dim,
            "mlp_hidden_size": config.mlp_hidden_size,
            "vocab_size": config.vocab_size,
            "parameters": sum(p.numel() for p in loaded.model.parameters()),
        },
        "flops": {
            "bench": flops_share(config),
            "llada_8b": flops_share(
                demo_config(d_model=4096, n_layers=32, n_heads=32, n_kv_heads=32, mlp_hidden_size=12288)
            ),
        },
    }
    print("bench configuration:", result["config"], flush=True)
    if not args.skip_throughput:
        result["throughput"] = throughput(args, loaded)
        print("  diagnostics ...", flush=True)
        result["diagnostics"] = diagnostics(args, loaded)
    if not args.skip_memory:
        result["memory"] = memory(args, loaded)
    result["goals"] = goals(result)
    finish(result, t0, args.json_path, print_report)


if __name__ == "__main__":
    main()
