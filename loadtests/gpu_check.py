"""The one-command GPU check: what a step costs the host, which attention kernels run, whether a
batch changes anyone's answer, and how fast a LLaDA-8B-shaped model serves, in one run.

    python -m loadtests.gpu_check --json gpu.json                       # one H100/H200, < 8 minutes
    python -m loadtests.gpu_check --device cpu --small --json smoke.json  # CPU smoke (tests/test_gpu_check.py)
    python -m loadtests.report gpu.json                                 # print a saved run again

It prints one JSON (also written to --json) and the same figures as a table. Every section runs
on its own: one that raises records {"error": ...} and the others still run; --sections picks
some. A time budget (--budget-s) bounds the whole run: what would pass it is skipped and says so.

The model is the demo architecture with random weights made on the device (LLADA_8B_SHAPE: 32
layers, d_model 4096, LLaDA's vocabulary; --small: d_model 64, 2 layers), bf16 on CUDA and fp32
on CPU. On random weights confidences rarely pass 0.9, so its LM head is scaled (as bench_fast
does) by the smallest of a few factors with which threshold 0.9 commits --target-tokens-per-step
tokens per step over a block (--head-scale N fixes it instead); the chosen scale and the tokens
per step it gave are reported. Prompts are chat prompts (one token per byte).

Sections and what each figure means:

- syncs_per_step (CUDA only): host-device synchronisations per denoising step, counted with
  torch.cuda.set_sync_debug_mode("warn") (each warning is one synchronising call: a read-back,
  a blocking copy, a stream sync) while run_jobs runs a small batch to the end. Two runs that
  differ only in gen_length (one block, three blocks) are counted and the difference of their
  warnings is divided by the difference of their steps, so that once-per-run setup does not
  count. Expected: 1 (the step's one read-back). `sites` says where the warnings came from.
- attention_kernels: the attention operators (aten::) and, on CUDA, device kernels whose names
  say flash / efficient / fmha / cutlass / cudnn / math / varlen / bmm / softmax, recorded by
  torch.profiler over one step of each kind: the exact full forward, and the dual cache's cached
  step (a dual run of two steps minus the run of its first, full, step), for one prompt and for
  two prompts of different lengths. `verdict` names the attention implementation seen.
- batch_invariance: 8 requests of different prompt lengths (exact, and dual cache + threshold
  0.9) submitted together to an in-process Engine, against each run alone: `equal` when every
  answer is the same token for token (judged with batch invariance on).
  Batch invariance is a per-process switch (server.engine.devices.set_batch_invariance, the
  server's --batch-invariant: cuBLAS without split-K, read once when cuBLAS starts), set here
  before the model's first product, so this process runs with it on (--batch-invariant) and a
  child process repeats --off-sections with it off; its rows are merged in (batch_invariant
  "off") as figures only. On the CPU the switch does nothing (CPU is batch-invariant either way).
- throughput: tokens/s of the in-process Engine, exact and dual + threshold 0.9, for 1 and
  --prompts (16) concurrent jobs (gen_length 256, block 32, steps 256, prompts of ~128 tokens,
  temperature 0), batch_invariant on and off. Tokens are the reveals the engine reported (one
  GenerationStep per job per step), over the wall time from start to the last of them; a run
  still going after --time-box-s stops there (`time_boxed`). `tokens_per_step` is per job.
  `peak_memory_gib`: torch.cuda.max_memory_allocated over the run (model and KV pool included).
  `reference`: the tests' plain sampler (tests/reference/sampler.py, exact, one prompt, full
  logits every step, the published forward written out on the device in the model's dtype: what
  running the authors' sampler by hand costs), time-boxed the same way; `ratios` compare with it.
  `answer_equals_engine` when it finished (in bf16 the two sets of kernels may flip a near-tie);
  on the CPU, `forward_vs_oracle_max_abs_diff` checks that forward against tests/reference/model.py.
- llada_moe: a LLaDA-MoE-7B-A1B-shaped model (FAMILY.md; random weights drawn on the device in
  the model's dtype, its LM head scaled as above; --small: the tests' tiny LLaDA-MoE) through the
  loader's kernel swaps: `expert_kernels` names the experts' class that ran (GroupedExperts: two
  grouped GEMMs per layer, offsets on the device), `syncs_per_step` for dual + threshold (CUDA;
  expected 1, as LLaDA's: a MoE layer reads nothing back), and tokens/s of 1 and --prompts
  concurrent dual + threshold jobs (issue 21's GPU figure), with peak memory.
- goals (booleans, not asserts): dual + threshold at batch 1 >= 8x the exact engine at batch 1;
  >= 1000 tokens/s for 16 concurrent dual + threshold jobs; one sync per step; batch-invariant
  answers equal.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import warnings
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from loadtests.common import LLADA_8B_SHAPE, add_model_args, bench_config, finish, machine_info
from server.engine.demo import build_demo, demo_config
from server.engine.denoiser import run_jobs
from server.engine.devices import set_batch_invariance
from server.engine.engine import Engine, EngineSettings
from server.engine.events import GenerationDone, GenerationStep, JobFailed
from server.engine.kv_cache import bytes_per_token
from server.engine.loader import load_checkpoint, ready
from server.engine.models import build_model as build_architecture
from server.engine.models.moe import Experts
from server.engine.sampling_params import SamplingParams
from tests.family import write_llada_moe_checkpoint
from tests.reference.sampler import reference_generate_for
from tests.support import REPO_ROOT

SMALL_SHAPE = {"d_model": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 4, "mlp_hidden_size": 176}
MODES = {"exact": {}, "dual_threshold": {"cache": "dual", "threshold": 0.9}}
SECTIONS = ("syncs_per_step", "attention_kernels", "batch_invariance", "throughput", "llada_moe")
# FAMILY.md's LLaDA-MoE-7B-A1B: 16 layers, hidden 2048, 16 heads, 64 experts, 8 per token, FFN 1024
MOE_7B_SHAPE = dict(
    hidden_size=2048,
    num_hidden_layers=16,
    num_attention_heads=16,
    num_key_value_heads=16,
    num_experts=64,
    num_experts_per_tok=8,
    expert_intermediate_size=1024,
    vocab_size=157184,
)
HEAD_SCALES = (1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 4.0, 6.0)
UNBOXED_LIMIT_S = 300.0
CHILD_FLAGS = ("--json", "--sections", "--head-scale", "--off-sections", "--budget-s", "--batch-invariant")
PASSAGE = (
    "A diffusion language model writes an answer as a row of masks and fills it in over many "
    "steps, keeping at each step the predictions it trusts most. "
)
ATTENTION_WORDS = ("flash", "efficient", "fmha", "attention", "sdpa", "cudnn", "varlen", "bmm", "softmax")
CUBLAS_ENV = "CUBLAS_WORKSPACE_CONFIG"  # what devices.set_batch_invariance sets for the process


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------- arguments


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    # The shape flags of add_model_args default to LLaDA-8B's (or, with --small, the tiny shape).
    p.set_defaults(device="auto", **{name: None for name in LLADA_8B_SHAPE})
    p.add_argument("--small", action="store_true", help="tiny model and short answers: the CPU smoke run")
    p.add_argument("--json", dest="json_path")
    p.add_argument("--sections", default=",".join(SECTIONS), help="which sections to run (default all)")
    p.add_argument("--head-scale", default="auto", help="'auto' (see above) or a factor for the LM head")
    p.add_argument("--target-tokens-per-step", type=float, default=3.0)
    p.add_argument("--gen-length", type=int, default=None, help="throughput runs (default 256; --small 64)")
    p.add_argument("--block-length", type=int, default=32)
    p.add_argument("--prompt-tokens", type=int, default=None, help="~prompt length (default 128; --small 32)")
    p.add_argument("--prompts", type=int, default=None, help="concurrent jobs of the throughput runs (16; --small 4)")
    p.add_argument("--invariance-gen-length", type=int, default=None, help="default 64; --small 8")
    p.add_argument("--time-box-s", type=float, default=None, help="most seconds per measured run (20; --small 3)")
    p.add_argument("--budget-s", type=float, default=420.0, help="skip what would start after this many seconds")
    p.add_argument("--skip-reference", action="store_true")
    p.add_argument("--batch-invariant", choices=("on", "off"), default="on", help="this process's setting")
    p.add_argument(
        "--off-sections",
        default=None,
        help="sections run again with batch invariance off, in a child process "
        "(default batch_invariance,throughput; --small: batch_invariance; 'none' to skip)",
    )
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)  # the batch-invariant-off run
    args = p.parse_args(argv)
    shape = SMALL_SHAPE if args.small else LLADA_8B_SHAPE
    for name, value in shape.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    small = args.small
    args.gen_length = args.gen_length or (64 if small else 256)
    args.prompt_tokens = args.prompt_tokens or (32 if small else 128)
    args.prompts = args.prompts or (4 if small else 16)
    args.invariance_gen_length = args.invariance_gen_length or (8 if small else 64)
    args.time_box_s = args.time_box_s or (3.0 if small else 20.0)
    args.off_sections = args.off_sections or ("batch_invariance" if small else "batch_invariance,throughput")
    return args


def resolve(args: argparse.Namespace) -> tuple[torch.device, torch.dtype]:
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if args.dtype == "auto":
        return device, torch.bfloat16 if device.type == "cuda" else torch.float32
    return device, getattr(torch, args.dtype)


class Clock:
    """The run's time budget."""

    def __init__(self, budget_s: float):
        self.started = time.perf_counter()
        self.budget_s = budget_s

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def remaining(self) -> float:
        return self.budget_s - self.elapsed()


# ---------------------------------------------------------------------------------- the model


def build_model(args: argparse.Namespace, device: torch.device, dtype: torch.dtype):
    """The demo architecture at args' shape with random weights drawn on the device itself (an 8B
    model drawn on the CPU would take minutes): the tiny demo lends its tokenizer, special ids and
    model class."""
    template = build_demo(demo_config(), seed=args.model_seed)
    config = bench_config(args)
    with torch.device("meta"):
        model = type(template.model)(config)
    model = randomize(model.to(dtype=dtype).to_empty(device=device), template, args.model_seed)
    return dataclasses.replace(template, model=model, config=config, name="random-" + describe_shape(args))


def build_moe(args: argparse.Namespace, device: torch.device, dtype: torch.dtype):
    """LLaDA-MoE-7B-A1B's shape (MOE_7B_SHAPE; --small: the tests' tiny LLaDA-MoE) with random
    weights drawn on the device; the tests' tiny LLaDA-MoE folder lends its tokenizer and special
    ids. The loader's kernel swaps are applied (on CUDA in bf16: grouped-GEMM experts)."""
    folder = write_llada_moe_checkpoint(Path(tempfile.mkdtemp(prefix="gpu-check-moe-")), args.model_seed)
    template = load_checkpoint(folder, device="cpu", dtype="float32")
    config = template.config if args.small else dataclasses.replace(template.config, moe_layer_freq=(), **MOE_7B_SHAPE)
    with torch.device("meta"):
        model = build_architecture(config)
    model = randomize(model.to(dtype=dtype).to_empty(device=device), template, args.model_seed)
    return dataclasses.replace(template, model=ready(model), config=config, name="random-llada-moe")


def randomize(model: torch.nn.Module, template, seed: int) -> torch.nn.Module:
    """The same scheme as demo.init_weights: norm weights 1, embeddings N(0, 1), matrices
    N(0, gain^2 / fan_in), an LM head that favours printable ASCII, newline, EOS and EOT."""
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 1:
                param.fill_(1.0)
            elif param is model.embedding.weight:
                param.normal_(0.0, 1.0, generator=generator)
            else:
                gain = 3.0 if ("q_proj" in name or "k_proj" in name) else 2.0
                param.normal_(0.0, gain * param.shape[-1] ** -0.5, generator=generator)
        head = model.head.weight
        emitted = torch.zeros(head.shape[0], dtype=torch.bool, device=device)
        special = template.special
        emitted[[*template.codec.encode("".join(map(chr, range(32, 127))) + "\n"), special.eos, special.eot]] = True
        head.mul_(2.0).masked_fill_(~emitted[:, None], 0.0)
    return model.eval().requires_grad_(False)


def describe_shape(args: argparse.Namespace) -> str:
    return f"d{args.d_model}-l{args.n_layers}"


def chat_prompts(loaded, lengths: list[int]) -> list[list[int]]:
    """Chat prompts of about these lengths in tokens (the demo tokenizer is one token per byte),
    each a different stretch of the passage."""
    template = len(loaded.codec.encode_chat([{"role": "user", "content": ""}]))
    text = PASSAGE * (2 + max(lengths) // len(PASSAGE))
    prompts = []
    for i, tokens in enumerate(lengths):
        start = (i * 17) % len(PASSAGE)
        content = text[start : start + max(1, tokens - template)].strip() or "Hello"
        prompts.append(loaded.codec.encode_chat([{"role": "user", "content": content}]))
    return prompts


def params_for(mode: str, gen_length: int, block_length: int, steps: int | None = None) -> SamplingParams:
    return SamplingParams(
        gen_length=gen_length, steps=steps or gen_length, block_length=min(block_length, gen_length), **MODES[mode]
    )


def set_head_scale(loaded, args: argparse.Namespace, prompts: list[list[int]]) -> dict:
    """Scale the LM head; 'auto': the smallest of HEAD_SCALES with which dual + threshold 0.9
    commits at least the target tokens per step over one block of these prompts, searched from
    the largest down (a larger scale, fewer steps: the cheap end first) until one falls short."""
    head = loaded.model.head.weight
    block = args.block_length
    params = params_for("dual_threshold", block, block)
    scales = sorted(HEAD_SCALES, reverse=True) if args.head_scale == "auto" else [float(args.head_scale)]
    current, chosen, tried = 1.0, None, []
    with torch.no_grad():
        for scale in scales:
            head.mul_(scale / current)
            current = scale
            jobs = run_jobs(loaded, prompts, [params] * len(prompts))
            per_step = len(prompts) * block / sum(job.steps_done for job in jobs)
            tried.append({"head_scale": scale, "tokens_per_step": round(per_step, 2)})
            if per_step < args.target_tokens_per_step:
                chosen = scale if chosen is None else chosen  # even the largest fell short: keep it
                break
            chosen = scale
        head.mul_(chosen / current)
    return {"head_scale": chosen, "calibration": tried}


# ---------------------------------------------------------------------------------- the engine


def setting_name(batch_invariant: bool) -> str:
    return "on" if batch_invariant else "off"


def cache_bytes_for(loaded, prompts: list[list[int]], gen_length: int) -> int:
    """A KV pool that holds these jobs with room to spare (not a share of the whole device)."""
    return len(prompts) * (max(map(len, prompts)) + gen_length + 64) * bytes_per_token(loaded.config, loaded.dtype)


def run_requests(
    loaded, batch_invariant: bool, prompts: list[list[int]], params: SamplingParams, time_box_s: float | None
) -> dict:
    """Submit every request to a fresh Engine before it starts (so all share its first step), then
    count the reveals of every step until all finish or time_box_s passes (None: all must finish,
    within UNBOXED_LIMIT_S), and stop the engine."""
    settings = EngineSettings(
        max_batch_rows=max(16, len(prompts) * params.rows),
        max_queue=max(64, len(prompts)),
        max_cache_bytes=cache_bytes_for(loaded, prompts, params.gen_length),
    )
    engine = Engine(loaded, settings)
    lock = threading.Lock()
    ended = threading.Semaphore(0)
    tally = {"tokens": 0, "last": None}
    steps = [0] * len(prompts)
    answers: list[list[int] | None] = [None] * len(prompts)
    failures: list[str] = []

    def sink_for(i: int) -> Callable[[object], None]:
        def sink(event: object) -> None:
            now = time.perf_counter()
            with lock:
                if isinstance(event, GenerationStep):
                    tally["tokens"] += len(event.reveals)
                    tally["last"] = now
                    steps[i] += 1
                elif isinstance(event, GenerationDone):
                    answers[i] = list(event.token_ids)
                elif isinstance(event, JobFailed):
                    failures.append(f"{event.code}: {event.message}")
            if isinstance(event, (GenerationDone, JobFailed)):
                ended.release()

        return sink

    for i, prompt in enumerate(prompts):
        engine.submit_generate(prompt, params, sink_for(i), report_steps=True)
    if loaded.device.type == "cuda":
        torch.cuda.synchronize(loaded.device)
        torch.cuda.reset_peak_memory_stats(loaded.device)
    start = time.perf_counter()
    engine.start()
    deadline = start + (UNBOXED_LIMIT_S if time_box_s is None else time_box_s)
    finished = 0
    try:
        while finished < len(prompts):
            if not ended.acquire(timeout=max(0.0, deadline - time.perf_counter())):
                break
            finished += 1
        with lock:
            tokens, last, job_steps, done = tally["tokens"], tally["last"], list(steps), list(answers)
        alive = engine.alive
    finally:
        engine.stop()
    peak = None
    if loaded.device.type == "cuda":
        peak = round(torch.cuda.max_memory_allocated(loaded.device) / 2**30, 2)
    del engine
    gc.collect()
    real_failures = [f for f in failures if not f.startswith("shutdown")]
    if real_failures or not alive:
        raise RuntimeError(f"the engine failed a request: {real_failures[:1] or 'engine died'}")
    if time_box_s is None and finished < len(prompts):
        raise TimeoutError(f"{len(prompts) - finished} request(s) unfinished after {UNBOXED_LIMIT_S}s")
    wall = (last - start) if last is not None else time.perf_counter() - start
    return {
        "jobs": len(prompts),
        "tokens": tokens,
        "wall_s": round(wall, 3),
        "tokens_per_s": round(tokens / wall, 2) if wall > 0 else None,
        "tokens_per_step": round(tokens / sum(job_steps), 2) if sum(job_steps) else None,
        "engine_steps": max(job_steps),
        "finished_jobs": sum(a is not None for a in done),
        "time_boxed": finished < len(prompts),
        "peak_memory_gib": peak,
        "answers": done,
    }


# ---------------------------------------------------------------------------------- sections


def count_syncs(loaded, args: argparse.Namespace, modes: tuple[str, ...] = tuple(MODES)) -> dict:
    """Synchronisations per step from two runs that differ in gen_length only (see above)."""
    prompts = chat_prompts(loaded, [args.prompt_tokens - 8 * i for i in range(4)])
    block = args.block_length
    out = {}
    for mode in modes:
        run_jobs(loaded, prompts, [params_for(mode, block, block)] * len(prompts))  # warm-up
        short = syncs_of_run(loaded, prompts, params_for(mode, block, block))
        long = syncs_of_run(loaded, prompts, params_for(mode, 3 * block, block))
        steps, syncs = long["steps"] - short["steps"], long["syncs"] - short["syncs"]
        out[mode] = {
            "syncs_per_step": round(syncs / steps, 3) if steps else None,
            "steps": steps,
            "syncs": syncs,
            "with_setup_per_step": round(long["syncs"] / long["steps"], 3),
            "sites": dict(long["sites"].most_common(8)),
        }
    out["expected"] = 1
    out["batch"] = len(prompts)
    return out


def syncs_of_run(loaded, prompts: list[list[int]], params: SamplingParams) -> dict:
    """run_jobs to the end with CUDA's sync debug mode warning on every synchronising call; the
    steps that ran (every unfinished job is in every step, so the longest job's count)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("warn")
        try:
            jobs = run_jobs(loaded, prompts, [params] * len(prompts))
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message).lower()]
    return {
        "steps": max(job.steps_done for job in jobs),
        "syncs": len(syncs),
        "sites": Counter(f"{short_path(w.filename)}:{w.lineno}" for w in syncs),
    }


def llada_moe(args: argparse.Namespace, device: torch.device, dtype: torch.dtype, flag: bool) -> dict:
    """LLaDA-MoE-7B-A1B's shape in the model's dtype: which expert kernel runs, syncs per dual +
    threshold step (CUDA), and tokens/s of 1 and --prompts concurrent dual + threshold jobs."""
    built = time.perf_counter()
    loaded = build_moe(args, device, dtype)
    try:
        out: dict = {
            "shape": "tests' tiny LLaDA-MoE" if args.small else "LLaDA-MoE-7B-A1B (MOE_7B_SHAPE)",
            "parameters": sum(p.numel() for p in loaded.model.parameters()),
            "build_s": round(time.perf_counter() - built, 1),
            "expert_kernels": sorted({type(m).__name__ for m in loaded.model.modules() if isinstance(m, Experts)}),
            **set_head_scale(loaded, args, chat_prompts(loaded, [args.prompt_tokens])),
        }
        if device.type == "cuda":
            out["syncs_per_step"] = count_syncs(loaded, args, modes=("dual_threshold",))
        params = params_for("dual_threshold", args.gen_length, args.block_length)
        out["runs"] = []
        for batch in sorted({1, args.prompts}):
            prompts = chat_prompts(loaded, [args.prompt_tokens - 4 * i for i in range(batch)])
            run = run_requests(loaded, flag, prompts, params, args.time_box_s)
            run.pop("answers")
            out["runs"].append({"mode": "dual_threshold", "batch": batch, **run})
        return out
    finally:
        del loaded
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def short_path(filename: str) -> str:
    path = Path(filename)
    try:
        return str(path.resolve().relative_to(REPO_ROOT.resolve()))
    except ValueError:
        return "/".join(path.parts[-2:])


def attention_kernels(loaded, args: argparse.Namespace) -> dict:
    """The attention operators and kernels of one step of each kind (see above)."""
    block = args.block_length
    one = chat_prompts(loaded, [args.prompt_tokens])
    two = chat_prompts(loaded, [args.prompt_tokens, args.prompt_tokens // 2])
    cuda = loaded.device.type == "cuda"
    out = {}
    for label, prompts in (("1_prompt", one), ("2_prompt_lengths", two)):
        exact = profile_names(loaded, prompts, params_for("exact", block, block, steps=1))
        dual_first = profile_names(loaded, prompts, dual_params(block, steps=1))
        dual_two = profile_names(loaded, prompts, dual_params(block, steps=2))
        cached = {kind: dual_two[kind] - dual_first[kind] for kind in dual_two}  # Counter: positive counts
        out[f"exact_full_forward_{label}"] = describe_kernels(exact, cuda)
        out[f"dual_cached_step_{label}"] = describe_kernels(cached, cuda)
    return out


def dual_params(block: int, steps: int) -> SamplingParams:
    """One block of the dual cache on the fixed schedule: step 1 is the full forward that fills
    the cache, step 2 a cached step."""
    return SamplingParams(gen_length=block, steps=steps, block_length=block, cache="dual")


def profile_names(loaded, prompts: list[list[int]], params: SamplingParams) -> dict[str, Counter]:
    """Operator and device-kernel names (with counts) of run_jobs over these params, profiled."""
    from torch.profiler import ProfilerActivity, profile

    run_jobs(loaded, prompts, [params] * len(prompts))  # warm-up: kernels chosen, caches made
    cuda = loaded.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        run_jobs(loaded, prompts, [params] * len(prompts))
        if cuda:
            torch.cuda.synchronize(loaded.device)
    ops, kernels = Counter(), Counter()
    for event in prof.events():
        name = event.name
        if not is_attention_name(name):
            continue
        if event.device_type == torch.autograd.DeviceType.CUDA:
            kernels[name[:160]] += 1
        elif name.startswith("aten::"):
            ops[name] += 1
    return {"ops": ops, "kernels": kernels}


def is_attention_name(name: str) -> bool:
    lower = name.lower()
    if "gemm" in lower and not any(w in lower for w in ("fmha", "attention", "flash")):
        return False  # a cutlass / cuBLAS GEMM of a linear layer
    return any(word in lower for word in ATTENTION_WORDS) or "cutlass" in lower


def describe_kernels(names: dict[str, Counter], cuda: bool) -> dict:
    ops = {k: v for k, v in names["ops"].items() if v > 0}
    kernels = {k: v for k, v in names["kernels"].items() if v > 0}
    every = " ".join([*ops, *kernels]).lower()
    if "cudnn" in every:  # before flash: cuDNN's attention kernels have "flash" in their names
        verdict = "cudnn"
    elif "flash" in every:
        verdict = "flash"
    elif "efficient" in every or "fmha" in every:
        verdict = "memory-efficient (cutlass fmha)"
    elif "_scaled_dot_product_attention_math" in every or "bmm" in every:
        verdict = "math (bmm + softmax)"
    else:
        verdict = "none seen"
    return {"verdict": verdict, "ops": ops, "kernels": kernels if cuda else "n/a on cpu"}


def batch_invariance(loaded, args: argparse.Namespace, clock: Clock, batch_invariant: bool) -> dict:
    """8 requests together against each alone, per mode, at this process's setting."""
    gen = args.invariance_gen_length
    prompts = chat_prompts(loaded, [args.prompt_tokens // 2 + 13 * i for i in range(8)])
    checks = []
    for mode in MODES:
        if clock.remaining() < 30:
            checks.append({"batch_invariant": setting_name(batch_invariant), "mode": mode, "skipped": "budget"})
            continue
        log(f"  batch invariance: {mode}, batch_invariant {setting_name(batch_invariant)} ...")
        params = params_for(mode, gen, args.block_length)
        alone = [run_requests(loaded, batch_invariant, [p], params, None)["answers"][0] for p in prompts]
        together = run_requests(loaded, batch_invariant, prompts, params, None)["answers"]
        same = [a == t for a, t in zip(alone, together)]
        first_diff = next(
            (
                {"request": i, "position": next((j for j, (x, y) in enumerate(zip(a, t)) if x != y), None)}
                for i, (a, t) in enumerate(zip(alone, together))
                if a != t and a is not None and t is not None
            ),
            None,
        )
        checks.append(
            {
                "batch_invariant": setting_name(batch_invariant),
                "mode": mode,
                "equal_answers": f"{sum(same)}/{len(same)}",
                "equal": all(same),
                "first_difference": first_diff,
            }
        )
    judged = [c for c in checks if c["batch_invariant"] in ("on", "default") and "equal" in c]
    return {
        "dtype": str(loaded.dtype).removeprefix("torch."),
        "prompt_tokens": [len(p) for p in prompts],
        "gen_length": gen,
        "block_length": args.block_length,
        "checks": checks,
        "equal": bool(judged) and all(c["equal"] for c in judged),
    }


def throughput(loaded, args: argparse.Namespace, clock: Clock, calibration: dict, batch_invariant: bool) -> dict:
    gen, block = args.gen_length, args.block_length
    lengths = [args.prompt_tokens - args.prompts + 2 * i for i in range(args.prompts)]
    prompts = chat_prompts(loaded, [max(8, n) for n in lengths])
    runs = []
    exact_answer = None
    for mode in MODES:
        for batch in (1, len(prompts)):
            row = {"mode": mode, "batch": batch, "batch_invariant": setting_name(batch_invariant)}
            if clock.remaining() < args.time_box_s + 15:
                runs.append({**row, "skipped": "budget"})
                continue
            log(f"  throughput: {mode}, {batch} job(s), batch_invariant {setting_name(batch_invariant)} ...")
            chosen = prompts[:batch]
            warm = params_for(mode, block, block, steps=None if mode != "exact" else 4)
            run_requests(loaded, batch_invariant, chosen, warm, args.time_box_s)
            measured = run_requests(loaded, batch_invariant, chosen, params_for(mode, gen, block), args.time_box_s)
            answers = measured.pop("answers")
            if mode == "exact" and batch == 1 and exact_answer is None:
                exact_answer = answers[0]
            runs.append({**row, **measured})
    result = {
        "model": describe_shape(args),
        "dtype": str(loaded.dtype).removeprefix("torch."),
        "gen_length": gen,
        "block_length": block,
        "steps": gen,
        "threshold": 0.9,
        "prompt_tokens": [len(p) for p in prompts],
        **calibration,
        "runs": runs,
    }
    if args.skip_reference:
        result["reference"] = "skipped (--skip-reference)"
    elif clock.remaining() < args.time_box_s + 10:
        result["reference"] = "skipped (budget)"
    else:
        log("  reference sampler, one prompt ...")
        result["reference"] = reference_run(loaded, prompts[0], params_for("exact", gen, block), args.time_box_s)
        if exact_answer is not None and result["reference"]["answer"] is not None:
            result["reference"]["answer_equals_engine"] = result["reference"]["answer"] == exact_answer
        result["reference"].pop("answer")
        if loaded.device.type == "cpu":
            result["reference"]["forward_vs_oracle_max_abs_diff"] = forward_vs_oracle(loaded, prompts[0], gen)
    result["ratios"] = ratios(result)
    return result


class TimeUp(Exception):
    pass


def reference_run(loaded, prompt: list[int], params: SamplingParams, time_box_s: float) -> dict:
    """tests/reference/sampler.py on one prompt with the published forward on the device; stopped
    at the first forward that would start after time_box_s. Steps == gen_length: one token each."""
    forward = plain_forward(loaded)
    forward(torch.tensor([prompt + [loaded.special.mask] * params.gen_length]))  # warm-up
    calls = {"n": 0}
    start = time.perf_counter()
    deadline = start + time_box_s

    def logits_fn(x: torch.Tensor) -> torch.Tensor:
        if time.perf_counter() > deadline:
            raise TimeUp
        calls["n"] += 1
        return forward(x)

    answer = None
    try:
        answer = reference_generate_for(logits_fn, prompt, params, loaded.special)
    except TimeUp:  # raised as the next step began: every forward so far has committed its tokens
        pass
    wall = time.perf_counter() - start
    tokens = calls["n"] * params.gen_length // params.steps
    return {
        "sampler": "tests/reference/sampler.py (exact), batch 1",
        "tokens": tokens,
        "wall_s": round(wall, 3),
        "tokens_per_s": round(tokens / wall, 2) if wall > 0 else None,
        "time_boxed": answer is None,
        "answer": answer,
    }


def forward_vs_oracle(loaded, prompt: list[int], gen_length: int) -> float:
    """The largest logit difference between plain_forward and the tests' fp32 oracle
    (tests/reference/model.py) on the prompt and a masked answer: on the CPU only (the oracle
    copies every weight to the CPU in fp32)."""
    from tests.reference.model import reference_logits

    ids = torch.tensor([prompt + [loaded.special.mask] * gen_length])
    state = {k: v.detach().float() for k, v in loaded.model.state_dict().items()}
    want = reference_logits(state, loaded.config.to_json_dict(), ids)
    got = plain_forward(loaded)(ids).float().cpu()
    return float((got - want).abs().max())


def plain_forward(loaded) -> Callable[[torch.Tensor], torch.Tensor]:
    """LLaDA's published forward pass (LLADA.md), written out from the checkpoint's tensors on the
    model's device and dtype, for one unpadded sequence: ids [1, L] -> logits [1, L, vocab]."""
    state = loaded.model.state_dict()
    c = loaded.config
    device, hd = loaded.device, c.head_dim
    inv_freq = 1.0 / c.rope_theta ** (torch.arange(0, hd, 2, device=device, dtype=torch.float32) / hd)

    def w(name: str) -> torch.Tensor:
        return state["model.transformer." + name]

    def rms(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + c.rms_norm_eps)).to(x.dtype) * weight

    def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x1, x2 = x32.chunk(2, dim=-1)
        return (x32 * cos + torch.cat([-x2, x1], dim=-1) * sin).to(x.dtype)

    @torch.inference_mode()
    def forward(input_ids: torch.Tensor) -> torch.Tensor:
        ids = input_ids.to(device)[0]
        length = ids.shape[0]
        angles = torch.outer(torch.arange(length, device=device, dtype=torch.float32), inv_freq)
        cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()
        x = w("wte.weight")[ids]
        for i in range(c.n_layers):
            b = f"blocks.{i}."
            h = rms(x, w(b + "attn_norm.weight"))
            q = F.linear(h, w(b + "q_proj.weight")).view(length, c.n_heads, hd).transpose(0, 1)
            k = F.linear(h, w(b + "k_proj.weight")).view(length, c.n_kv_heads, hd).transpose(0, 1)
            v = F.linear(h, w(b + "v_proj.weight")).view(length, c.n_kv_heads, hd).transpose(0, 1)
            q, k = rope(q, cos, sin), rope(k, cos, sin)
            if c.n_kv_heads < c.n_heads:
                k = k.repeat_interleave(c.n_heads // c.n_kv_heads, dim=0)
                v = v.repeat_interleave(c.n_heads // c.n_kv_heads, dim=0)
            att = F.scaled_dot_product_attention(q[None], k[None], v[None])[0]  # no mask: bidirectional
            x = x + F.linear(att.transpose(0, 1).reshape(length, -1), w(b + "attn_out.weight"))
            h = rms(x, w(b + "ff_norm.weight"))
            gated = F.silu(F.linear(h, w(b + "ff_proj.weight"))) * F.linear(h, w(b + "up_proj.weight"))
            x = x + F.linear(gated, w(b + "ff_out.weight"))
        return F.linear(rms(x, w("ln_f.weight")), w("ff_out.weight"))[None]

    return forward


def find_run(runs: list[dict], mode: str, batch: int, setting: str) -> dict | None:
    return next(
        (
            r
            for r in runs
            if (r["mode"], r["batch"], r["batch_invariant"]) == (mode, batch, setting) and "tokens_per_s" in r
        ),
        None,
    )


def ratio(a: dict | None, b: dict | None) -> float | None:
    if not a or not b or not a.get("tokens_per_s") or not b.get("tokens_per_s"):
        return None
    return round(a["tokens_per_s"] / b["tokens_per_s"], 2)


def ratios(result: dict) -> dict:
    runs, many = result["runs"], max(r["batch"] for r in result["runs"])
    reference = result["reference"] if isinstance(result["reference"], dict) else None
    out = {}
    for setting in dict.fromkeys(r["batch_invariant"] for r in runs):
        exact_1, dual_1 = find_run(runs, "exact", 1, setting), find_run(runs, "dual_threshold", 1, setting)
        dual_n = find_run(runs, "dual_threshold", many, setting)
        out[f"batch_invariant_{setting}"] = {
            "dual_threshold_b1_over_exact_b1": ratio(dual_1, exact_1),
            "exact_b1_over_reference": ratio(exact_1, reference),
            "dual_threshold_b1_over_reference": ratio(dual_1, reference),
            f"dual_threshold_b{many}_over_reference": ratio(dual_n, reference),
        }
    return out


def goals(result: dict, batch_invariant: bool) -> list[dict]:
    out = []
    setting = setting_name(batch_invariant)
    tp = result.get("throughput")
    if isinstance(tp, dict) and "runs" in tp:
        r = ratio(find_run(tp["runs"], "dual_threshold", 1, setting), find_run(tp["runs"], "exact", 1, setting))
        out.append(
            {
                "goal": f"dual + threshold at batch 1 >= 8x the exact engine at batch 1 (batch_invariant {setting})",
                "measured": None if r is None else f"{r}x",
                "met": r is not None and r >= 8,
            }
        )
        many = max(run["batch"] for run in tp["runs"])
        run = find_run(tp["runs"], "dual_threshold", many, setting)
        rate = run["tokens_per_s"] if run else None
        out.append(
            {
                "goal": f">= 1000 tokens/s for {many} concurrent dual + threshold jobs (batch_invariant {setting})",
                "measured": rate,
                "met": rate is not None and rate >= 1000,
            }
        )
    syncs = result.get("syncs_per_step")
    if isinstance(syncs, dict) and all(isinstance(syncs.get(m), dict) for m in MODES):
        worst = max(syncs[m]["syncs_per_step"] or 0 for m in MODES)
        out.append(
            {"goal": "one host-device sync per step (exact, dual + threshold)", "measured": worst, "met": worst <= 1}
        )
    inv = result.get("batch_invariance")
    if isinstance(inv, dict) and "equal" in inv:
        out.append(
            {
                "goal": f"8 concurrent requests answer as alone (batch_invariant {setting}, {inv['dtype']})",
                "measured": ", ".join(
                    f"{c['mode']} {c.get('equal_answers', '-')}"
                    for c in inv["checks"]
                    if c["batch_invariant"] == setting
                ),
                "met": inv["equal"],
            }
        )
    return out


# ---------------------------------------------------------------------------------- main


def run_section(name: str, clock: Clock, fn: Callable[[], object]) -> object:
    """A section's figures, or what stopped it: one section's failure keeps the others."""
    log(f"{name} ({clock.elapsed():.0f}s) ...")
    start = time.perf_counter()
    try:
        value = fn()
    except Exception as exc:  # noqa: BLE001 - recorded in the JSON, the run goes on
        log(traceback.format_exc())
        value = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-2000:]}
    if isinstance(value, dict):
        value["section_wall_s"] = round(time.perf_counter() - start, 1)
    return value


def run_off_child(args: argparse.Namespace, argv: list[str], clock: Clock, head_scale: float | None, env: dict) -> dict:
    """This script again in a child process with batch invariance off (the switch is per process):
    the same model (same seed and head scale), --off-sections only, no reference."""
    with tempfile.TemporaryDirectory(prefix="llada-gpu-check-") as tmp:
        out = Path(tmp) / "off.json"
        command = [sys.executable, "-m", "loadtests.gpu_check", *inherited(argv), "--child", "--batch-invariant", "off"]
        command += ["--head-scale", "auto" if head_scale is None else str(head_scale), "--skip-reference"]
        command += ["--sections", args.off_sections, "--budget-s", str(int(clock.remaining())), "--json", str(out)]
        proc = subprocess.run(
            command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=clock.remaining() + 120
        )
        if proc.returncode != 0:
            raise RuntimeError(f"the batch-invariant-off child failed:\n{proc.stderr[-3000:]}")
        return json.loads(out.read_text())


def inherited(argv: list[str]) -> list[str]:
    """The parent's flags but those the child is given anew (argparse would take the later ones
    anyway; this keeps the child's recorded command plain)."""
    out, skip_value = [], False
    for arg in argv:
        if skip_value:
            skip_value = False
        elif arg.split("=", 1)[0] in CHILD_FLAGS:
            skip_value = "=" not in arg
        else:
            out.append(arg)
    return out


def merge_off(result: dict, off: dict) -> dict:
    """The child's checks and runs joined to this run's sections; what is left to report of it."""
    for section, key in (("batch_invariance", "checks"), ("throughput", "runs")):
        mine, theirs = result.get(section), off.get(section)
        if isinstance(mine, dict) and key in mine and isinstance(theirs, dict) and key in theirs:
            mine[key] += theirs[key]
    if isinstance(result.get("throughput"), dict) and "runs" in result["throughput"]:
        result["throughput"]["ratios"] = ratios(result["throughput"])
    errors = {name: off[name]["error"] for name in SECTIONS if isinstance(off.get(name), dict) and "error" in off[name]}
    return {"command": off["command"], "total_wall_s": off["total_wall_s"], "errors": errors or None}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    clock = Clock(args.budget_s)
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = resolve(args)
    cuda = device.type == "cuda"
    wanted = set(args.sections.split(","))
    # Batch invariance is set for the process before its first product, as the server does.
    env_before = dict(os.environ)
    flag = args.batch_invariant == "on"
    set_batch_invariance(device, flag)
    log(f"building the {describe_shape(args)} model on {device} ({dtype}) ...")
    built = time.perf_counter()
    loaded = build_model(args, device, dtype)
    if cuda:
        torch.cuda.synchronize(device)
    result: dict = {
        "command": "python -m loadtests.gpu_check " + " ".join(argv),
        "machine": machine_info(device),
        "model": {
            "shape": describe_shape(args),
            **{name: getattr(args, name) for name in LLADA_8B_SHAPE},
            "vocab_size": loaded.config.vocab_size,
            "dtype": str(dtype).removeprefix("torch."),
            "parameters": sum(p.numel() for p in loaded.model.parameters()),
            "build_s": round(time.perf_counter() - built, 1),
            "memory_gib": round(torch.cuda.memory_allocated(device) / 2**30, 2) if cuda else None,
        },
        "batch_invariant": setting_name(flag),
    }
    log("scaling the LM head ...")
    try:
        calibration = set_head_scale(loaded, args, chat_prompts(loaded, [args.prompt_tokens]))
        log(f"  head scale {calibration['head_scale']} ({calibration['calibration']})")
    except Exception as exc:  # noqa: BLE001 - the engine cannot run: every section will say so too
        log(traceback.format_exc())
        calibration = {"head_scale": None, "calibration": f"failed: {type(exc).__name__}: {exc}"}

    def skipped(name: str) -> str | None:
        if name not in wanted:
            return "skipped (--sections)"
        if clock.remaining() < 20:
            return "skipped (budget)"
        return None

    na = "n/a on cpu"
    result["syncs_per_step"] = skipped("syncs_per_step") or (
        run_section("syncs_per_step", clock, lambda: count_syncs(loaded, args)) if cuda else na
    )
    result["attention_kernels"] = skipped("attention_kernels") or run_section(
        "attention_kernels", clock, lambda: attention_kernels(loaded, args)
    )
    result["batch_invariance"] = skipped("batch_invariance") or run_section(
        "batch_invariance", clock, lambda: batch_invariance(loaded, args, clock, flag)
    )
    result["throughput"] = skipped("throughput") or run_section(
        "throughput", clock, lambda: throughput(loaded, args, clock, calibration, flag)
    )
    result["llada_moe"] = skipped("llada_moe") or run_section(
        "llada_moe", clock, lambda: llada_moe(args, device, dtype, flag)
    )
    if not args.child and flag and args.off_sections != "none":
        if clock.remaining() < 60:
            result["batch_invariant_off"] = "skipped (budget)"
        else:
            del loaded
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()  # the child builds its own copy of the model
            off = run_section(
                "batch_invariant_off (child process)",
                clock,
                lambda: run_off_child(args, argv, clock, calibration["head_scale"], env_before),
            )
            result["batch_invariant_off"] = off if "error" in off else merge_off(result, off)
    result["goals"] = goals(result, flag)
    finish(result, clock.started, args.json_path)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
