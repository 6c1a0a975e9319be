"""Fast decoding benchmark: exact, prefix and dual, each with and without a threshold, at batch 1
(the engine in process) and for 8 concurrent clients over HTTP, against the tests' plain reference
of the same algorithm run one request at a time, in one run.

    python -m loadtests.bench_fast --json fast.json            # CPU, float32 (long: see --prompts)
    python -m loadtests.bench_fast --family llada_moe --modes exact,dual_threshold --skip-memory

The model is the bench configuration of bench_engine (random weights, LLaDA's vocabulary) with its
LM head scaled by --head-scale: on random weights confidences rarely pass 0.9, so a threshold
would reveal one token per step and show nothing; the scale is chosen so that threshold 0.9
reveals a few tokens per step (the measured tokens per step are reported). Requests: 8 chat
prompts of 64 to 256 tokens, gen_length 256, block_length 32, steps 256 (the fixed schedule
reveals one token per step), temperature 0.

Per mode: tokens/s and nfe at batch 1; the answers' agreement with the exact answer (identical
tokens); tokens/s of 8 concurrent HTTP clients (whose answers must equal the batch-1 ones); and
tokens/s of the reference (tests/reference/fast_sampler.py, plain fp32, one sequence) on the
first --reference-prompts prompts; dual + threshold, whose 8-client goal is a ratio over its
reference, runs the reference on all the prompts the clients sent. Then, in a child process, the
peak memory of 16 cached jobs at gen_length 1024 (dual cache, threshold), held for --memory-steps
steps.

`--family llada_moe`: the same on a bench-shaped LLaDA-MoE (MOE_BENCH_SHAPE: hidden 256, 4
layers, 64 experts, 8 per token, its 157,184 vocabulary; the LM head scaled the same way), also
reporting the share of batch-1 step time spent in the MoE layers (router, dispatch, experts).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import torch
from safetensors.torch import save_file

from loadtests.common import add_model_args, bench_config, finish, machine_info
from server.engine.demo import build_demo, save_checkpoint
from server.engine.denoiser import run_jobs, standalone
from server.engine.loader import load_checkpoint
from server.engine.models.llada_moe import SparseMoE
from server.engine.sampling_params import SamplingParams
from tests.family import llada_moe_config, write_llada_moe_checkpoint
from tests.reference.fast_sampler import reference_fast_generate_for
from tests.support import REPO_ROOT, ServerProcess

MODES = {
    "exact": {},
    "exact_threshold": {"threshold": 0.9},
    "prefix": {"cache": "prefix"},
    "prefix_threshold": {"cache": "prefix", "threshold": 0.9},
    "dual": {"cache": "dual"},
    "dual_threshold": {"cache": "dual", "threshold": 0.9},
}
PASSAGE = (
    "A diffusion language model writes an answer as a row of masks and fills it in over many "
    "steps, keeping at each step the predictions it trusts most. "
)
PROMPT_TOKENS = (64, 88, 112, 136, 160, 184, 208, 256)
GOAL_MODE = "dual_threshold"
# FAMILY.md's LLaDA-MoE at bench size: hidden 256 (two heads of 128), 4 layers, 64 experts, 8 per
# token, expert FFN 128, its 157,184 vocabulary.
MOE_BENCH_SHAPE = dict(
    hidden_size=256,
    num_hidden_layers=4,
    num_attention_heads=2,
    num_key_value_heads=2,
    num_experts=64,
    num_experts_per_tok=8,
    expert_intermediate_size=128,
    dense_intermediate_size=512,
    vocab_size=157184,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--head-scale", type=float, default=1.75, help="multiply the LM head by this (see above)")
    p.add_argument(
        "--family",
        choices=("llada", "llada_moe"),
        default="llada",
        help="llada: the bench model above; llada_moe: a bench-shaped LLaDA-MoE (MOE_BENCH_SHAPE, its vocabulary, "
        "written in its published layout by tests/family.py and loaded by the real loader)",
    )
    p.add_argument("--prompts", type=int, default=8, help="how many of the 8 prompts to run")
    p.add_argument(
        "--reference-prompts",
        type=int,
        default=2,
        help="prompts for the reference of every mode but dual_threshold, which runs all of them",
    )
    p.add_argument("--gen-length", type=int, default=256)
    p.add_argument("--block-length", type=int, default=32)
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--memory-jobs", type=int, default=16)
    p.add_argument("--memory-gen-length", type=int, default=1024)
    p.add_argument("--memory-steps", type=int, default=4)
    p.add_argument("--skip-memory", action="store_true")
    p.add_argument("--json", dest="json_path")
    p.add_argument("--measure-memory", action="store_true", help=argparse.SUPPRESS)  # the child
    return p.parse_args(argv)


def build(args: argparse.Namespace):
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.family == "llada_moe":
        folder = write_llada_moe_checkpoint(
            Path(tempfile.mkdtemp(prefix="llada-moe-bench-")), args.model_seed, shape=MOE_BENCH_SHAPE
        )
        loaded = load_checkpoint(folder, device=args.device, dtype=args.dtype)
        head = loaded.model.lm_head.weight
    else:
        loaded = build_demo(bench_config(args), seed=args.model_seed)
        head = loaded.model.model.transformer.ff_out.weight
    with torch.no_grad():
        head.mul_(args.head_scale)
    return loaded


def config_json(loaded, args: argparse.Namespace) -> dict:
    """The model's config.json, for the reference."""
    return llada_moe_config(shape=MOE_BENCH_SHAPE) if args.family == "llada_moe" else loaded.config.to_json_dict()


def write_served(loaded, args: argparse.Namespace, folder: Path) -> Path:
    """The (head-scaled) bench model as a checkpoint folder for the server."""
    if args.family == "llada":
        return save_checkpoint(loaded, folder)
    write_llada_moe_checkpoint(folder, args.model_seed, shape=MOE_BENCH_SHAPE)
    # cloned: the experts' published tensors are views of stacked weights (models/moe.py)
    save_file({k: v.clone() for k, v in loaded.model.state_dict().items()}, str(folder / "model.safetensors"))
    return folder


@contextlib.contextmanager
def expert_time() -> Iterator[list[float]]:
    """Seconds spent in the MoE layers (router, dispatch and experts) while the block runs."""
    spent = [0.0]
    forward = SparseMoE.forward

    def timed(self, x):
        start = time.perf_counter()
        try:
            return forward(self, x)
        finally:
            spent[0] += time.perf_counter() - start

    SparseMoE.forward = timed
    try:
        yield spent
    finally:
        SparseMoE.forward = forward


def chat_prompts(loaded, count: int) -> list[list[int]]:
    """Chat prompts of the PROMPT_TOKENS lengths (the demo tokenizer is one token per byte)."""
    template = len(loaded.codec.encode_chat([{"role": "user", "content": ""}]))
    prompts = []
    for tokens in PROMPT_TOKENS[:count]:
        text = (PASSAGE * 4)[: tokens - template].strip()
        prompts.append(loaded.codec.encode_chat([{"role": "user", "content": text}]))
    return prompts


def params_for(args: argparse.Namespace, mode: str, gen_length: int | None = None) -> SamplingParams:
    gen_length = gen_length or args.gen_length
    return SamplingParams(gen_length=gen_length, steps=gen_length, block_length=args.block_length, **MODES[mode])


def batch_one(loaded, prompts: list[list[int]], params: SamplingParams) -> dict:
    answers, nfe, wall = [], [], 0.0
    for prompt in prompts:
        start = time.perf_counter()
        (job,) = run_jobs(loaded, [prompt], [params])
        wall += time.perf_counter() - start
        answers.append(job.answer)
        nfe.append(job.steps_done)
    tokens = len(prompts) * params.gen_length
    return {
        "tokens_per_s": round(tokens / wall, 2),
        "wall_s": round(wall, 2),
        "nfe_mean": sum(nfe) / len(nfe),
        "tokens_per_step": round(tokens / sum(nfe), 2),
        "answers": answers,
    }


def reference_run(loaded, prompts: list[list[int]], params: SamplingParams, config: dict) -> dict:
    state = {k: v.detach().float() for k, v in loaded.model.state_dict().items()}
    start, answers = time.perf_counter(), []
    for prompt in prompts:
        answers.append(reference_fast_generate_for(state, config, prompt, params, loaded.special)[0])
    wall = time.perf_counter() - start
    return {
        "tokens_per_s": round(len(prompts) * params.gen_length / wall, 3),
        "wall_s": round(wall, 1),
        "prompts": len(prompts),
        "answers": answers,
    }


async def concurrent_http(
    url: str,
    prompts: list[list[int]],
    params: SamplingParams,
    fields: tuple[str, ...] = ("gen_length", "steps", "block_length", "cache", "threshold"),
) -> tuple[float, list]:
    """Every prompt at once to /v1/generate with params' given fields: the wall time and the answers."""
    body = {name: getattr(params, name) for name in fields}
    async with httpx.AsyncClient(timeout=3600, trust_env=False) as client:
        start = time.perf_counter()
        responses = await asyncio.gather(
            *(client.post(url + "/v1/generate", json={**body, "input_ids": prompt}) for prompt in prompts)
        )
        wall = time.perf_counter() - start
    for response in responses:
        response.raise_for_status()
    return wall, [r.json()["token_ids"] for r in responses]


def agreement(answers: list[list[int]], exact: list[list[int]]) -> dict:
    same = sum(a == e for a, e in zip(answers, exact))
    tokens = sum(x == y for a, e in zip(answers, exact) for x, y in zip(a, e))
    return {"identical_answers": f"{same}/{len(exact)}", "identical_tokens": round(tokens / sum(map(len, exact)), 3)}


def measure_memory(args: argparse.Namespace) -> dict:
    """In a child: RSS high-water mark of memory_jobs cached jobs at memory_gen_length."""
    loaded = build(args)
    prompts = (chat_prompts(loaded, len(PROMPT_TOKENS)) * 4)[: args.memory_jobs]
    params = SamplingParams(
        gen_length=args.memory_gen_length,
        steps=args.memory_gen_length,
        block_length=args.block_length,
        cache="dual",
        threshold=0.9,
    )
    with torch.inference_mode():
        loaded.model.full_logits(torch.tensor([prompts[0][:4]]))
    Path("/proc/self/clear_refs").write_text("5")
    before = _vm_kib("VmHWM")
    denoiser, jobs = standalone(loaded, prompts, [params] * len(prompts))
    for _ in range(args.memory_steps):
        denoiser.step([job for job in jobs if not job.finished])
    return {
        "jobs": len(jobs),
        "gen_length": args.memory_gen_length,
        "sequence_lengths": [len(job.canvas) for job in jobs],
        "kv_cache_mib": round(denoiser.pool.bytes / 2**20, 1),
        "peak_rss_delta_mib": round((_vm_kib("VmHWM") - before) / 1024, 1),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "method": "VmHWM after the steps - RSS after the model is built (high-water mark reset there)",
    }


def _vm_kib(field: str) -> int:
    line = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith(field))
    return int(line.split()[1])


def _goal(text: str, ratio: float, bound: float) -> dict:
    return {"goal": text, "measured": f"{ratio:.2f}x", "met": ratio >= bound}


def goals(result: dict, family: str) -> list[dict]:
    """Engine v3's goals for the LLaDA bench model, the full-attention family issue's for the
    MoE one (each a ratio measured in this run)."""
    modes, out = result["modes"], []
    exact, fast = modes.get("exact"), modes.get(GOAL_MODE)
    if family == "llada_moe":
        for name, run, bound in (("exact", exact, 2), ("dual + threshold", fast, 5)):
            if run and "http_concurrent" in run and "reference" in run:
                ratio = run["http_concurrent"]["tokens_per_s"] / run["reference"]["tokens_per_s"]
                out.append(
                    _goal(f"8 concurrent {name} clients >= {bound}x the reference run sequentially", ratio, bound)
                )
        return out
    if exact and fast:
        ratio = fast["batch_1"]["tokens_per_s"] / exact["batch_1"]["tokens_per_s"]
        out.append(_goal("dual + threshold at batch 1 >= 6.5x the exact engine at batch 1", ratio, 6.5))
    if fast and "http_concurrent" in fast and "reference" in fast:
        ratio = fast["http_concurrent"]["tokens_per_s"] / fast["reference"]["tokens_per_s"]
        prompts = fast["reference"]["prompts"]
        out.append(_goal(f"8 concurrent dual + threshold clients >= 5x that reference ({prompts} prompts)", ratio, 5))
    if exact and "http_concurrent" in exact:
        ratio = exact["http_concurrent"]["tokens_per_s"] / exact["batch_1"]["tokens_per_s"]
        out.append(_goal("8 concurrent exact clients >= 1.0x the exact engine at batch 1", ratio, 1.0))
    return out


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.measure_memory:
        print(json.dumps(measure_memory(args)))
        return
    started = time.perf_counter()
    loaded = build(args)
    prompts = chat_prompts(loaded, args.prompts)
    result = {
        "command": "python -m loadtests.bench_fast " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": machine_info(loaded.device),
        "settings": {
            "family": args.family,
            "head_scale": args.head_scale,
            "prompt_tokens": [len(p) for p in prompts],
            "gen_length": args.gen_length,
            "steps": args.gen_length,
            "block_length": args.block_length,
            "threshold": 0.9,
            "temperature": 0,
        },
        "modes": {},
    }
    modes = args.modes.split(",")
    with torch.inference_mode():
        for mode in modes:
            print(f"  batch 1: {mode} ...", flush=True)
            with expert_time() as experts:
                result["modes"][mode] = {"batch_1": batch_one(loaded, prompts, params_for(args, mode))}
            if args.family == "llada_moe":
                share = experts[0] / result["modes"][mode]["batch_1"]["wall_s"]
                result["modes"][mode]["batch_1"]["expert_share_of_step_time"] = round(share, 3)
    exact = result["modes"].get("exact", {}).get("batch_1", {}).get("answers")
    with tempfile.TemporaryDirectory(prefix="llada-bench-fast-") as tmp:
        write_served(loaded, args, Path(tmp) / "model")
        server = ServerProcess(
            [
                "--model",
                str(Path(tmp) / "model"),
                "--max-batch-rows",
                "16",
                "--log-level",
                "warning",
                "--max-gen-length",
                "4096",
                "--max-steps",
                "4096",
            ],
            Path(tmp) / "server.log",
        )
        try:
            server.wait_ready(timeout=300)
            asyncio.run(concurrent_http(server.url, prompts[:2], params_for(args, "dual_threshold", 32)))  # warm-up
            for mode in modes:
                print(f"  {len(prompts)} concurrent HTTP clients: {mode} ...", flush=True)
                wall, answers = asyncio.run(concurrent_http(server.url, prompts, params_for(args, mode)))
                run = result["modes"][mode]
                run["http_concurrent"] = {
                    "tokens_per_s": round(len(prompts) * args.gen_length / wall, 2),
                    "wall_s": round(wall, 2),
                    "answers_equal_batch_1": answers == run["batch_1"]["answers"],
                }
        finally:
            server.stop()
    with torch.inference_mode():
        for mode in modes:
            # the goal compares 8 clients with this reference, so they must have run the same prompts
            n = len(prompts) if mode == GOAL_MODE else args.reference_prompts
            print(f"  reference, {n} prompts one at a time: {mode} ...", flush=True)
            run = result["modes"][mode]
            run["reference"] = reference_run(loaded, prompts[:n], params_for(args, mode), config_json(loaded, args))
            engine_answers = run["batch_1"]["answers"][:n]
            run["reference"]["answers_equal_engine"] = run["reference"].pop("answers") == engine_answers
    for run in result["modes"].values():
        if exact is not None:
            run["agreement_with_exact"] = agreement(run["batch_1"]["answers"], exact)
        del run["batch_1"]["answers"]
    if not args.skip_memory:
        print(
            f"  memory: {args.memory_jobs} cached jobs at gen_length {args.memory_gen_length} (child) ...", flush=True
        )
        child = [sys.executable, "-m", "loadtests.bench_fast", "--measure-memory", *(argv or sys.argv[1:])]
        proc = subprocess.run(child, cwd=REPO_ROOT, capture_output=True, text=True, check=True)
        result["memory"] = json.loads(proc.stdout.strip().splitlines()[-1])
    result["goals"] = goals(result, args.family)
    finish(result, started, args.json_path)


if __name__ == "__main__":
    main()
