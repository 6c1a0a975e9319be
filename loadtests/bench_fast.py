"""Fast decoding benchmark: exact, prefix and dual, each with and without a threshold, at batch 1
(the engine in process) and for 8 concurrent clients over HTTP, against the tests' plain reference
of the same algorithm run one request at a time, in one run.

    python -m loadtests.bench_fast --json fast.json            # CPU, float32 (long: see --prompts)

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
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

from loadtests.common import add_model_args, bench_config, finish, machine_info
from server.engine.demo import build_demo, save_checkpoint
from server.engine.denoiser import run_jobs, standalone
from server.engine.sampling_params import SamplingParams
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


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--head-scale", type=float, default=1.75, help="multiply the LM head by this (see above)")
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
    loaded = build_demo(bench_config(args), seed=args.model_seed)
    with torch.no_grad():
        loaded.model.model.transformer.ff_out.weight.mul_(args.head_scale)
    return loaded


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


def reference_run(loaded, prompts: list[list[int]], params: SamplingParams) -> dict:
    state = {k: v.detach().float() for k, v in loaded.model.state_dict().items()}
    config = loaded.config.to_json_dict()
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


async def concurrent_http(url: str, prompts: list[list[int]], params: SamplingParams) -> tuple[float, list]:
    body = {
        "gen_length": params.gen_length,
        "steps": params.steps,
        "block_length": params.block_length,
        "cache": params.cache,
        "threshold": params.threshold,
    }
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


def goals(result: dict) -> list[dict]:
    modes = result["modes"]
    goal = modes.get(GOAL_MODE)
    if goal is None:
        return []
    out = []
    if "exact" in modes:
        ratio = goal["batch_1"]["tokens_per_s"] / modes["exact"]["batch_1"]["tokens_per_s"]
        out.append(
            {
                "goal": "dual + threshold at batch 1 >= 5x the exact engine at batch 1",
                "measured": f"{ratio:.2f}x",
                "met": ratio >= 5,
            }
        )
    http, ref = goal.get("http_concurrent"), goal.get("reference")
    if http and ref:
        ratio = http["tokens_per_s"] / ref["tokens_per_s"]
        out.append(
            {
                "goal": "8 concurrent dual + threshold clients >= 3x that reference run sequentially "
                f"(both on {ref['prompts']} prompts)",
                "measured": f"{ratio:.2f}x",
                "met": ratio >= 3,
            }
        )
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
            result["modes"][mode] = {"batch_1": batch_one(loaded, prompts, params_for(args, mode))}
    exact = result["modes"].get("exact", {}).get("batch_1", {}).get("answers")
    with tempfile.TemporaryDirectory(prefix="llada-bench-fast-") as tmp:
        save_checkpoint(loaded, Path(tmp) / "model")
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
            run["reference"] = reference_run(loaded, prompts[:n], params_for(args, mode))
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
    result["goals"] = goals(result)
    finish(result, started, args.json_path)


if __name__ == "__main__":
    main()
