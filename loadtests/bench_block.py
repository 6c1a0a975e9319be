"""Block-diffusion benchmark (LLaDA2): tokens per forward, tokens/s at batch 1 (the engine in
process) and for 8 concurrent clients over HTTP, against the tests' plain reference of the model's
own `generate` (tests/reference/llada2.py: the whole window recomputed at every iteration, no
cache) run one request at a time, in one run.

    python -m loadtests.bench_block --json block.json
    python -m loadtests.bench_block --modes llada2.0,llada2.1 --prompts 8

The model: a bench-shaped LLaDA2 (tests/family.py LLADA2_BENCH_SHAPE: hidden 256, 4 layers, 64
experts, 8 per token, 4 groups, its 157,184 vocabulary, the head scaled so that threshold 0.95
commits several tokens per iteration) written in the published layout and loaded by the real
loader. Requests: 8 chat prompts of 64 to 256 tokens, gen_length 256, block 32, temperature 0;
llada2.0: threshold 0.95, steps 32 (the authors' defaults); llada2.1: threshold 0.7, editing 0.5
(the quality mode). Tokens are answer tokens (each answer ends at its first EOS).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

import torch

from loadtests.bench_fast import chat_prompts, concurrent_http
from loadtests.common import finish, machine_info
from server.engine.denoiser import run_jobs
from server.engine.loader import load_checkpoint
from server.engine.sampling_params import SamplingParams
from tests.family import LLADA2_BENCH_SHAPE, write_llada2_checkpoint
from tests.reference.llada2 import LLaDA2Reference, generate_for
from tests.support import ServerProcess

# the /v1/generate fields of a block-diffusion request
FIELDS = ("gen_length", "steps", "block_length", "threshold", "editing_threshold", "max_post_steps")
MODES = {
    "llada2.0": {"threshold": 0.95, "steps": 32},
    "llada2.1": {"threshold": 0.7, "editing_threshold": 0.5},
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--model-seed", type=int, default=0)
    p.add_argument("--prompts", type=int, default=8, help="how many of the 8 prompts to run")
    p.add_argument("--gen-length", type=int, default=256)
    p.add_argument("--modes", default="llada2.0")
    p.add_argument("--json", dest="json_path")
    return p.parse_args(argv)


def params_for(args: argparse.Namespace, mode: str) -> SamplingParams:
    return SamplingParams(gen_length=args.gen_length, block_length=32, **MODES[mode])


def batch_one(loaded, prompts: list[list[int]], params: SamplingParams) -> dict:
    answers, forwards, wall = [], 0, 0.0
    for prompt in prompts:
        start = time.perf_counter()
        (job,) = run_jobs(loaded, [prompt], [params])
        wall += time.perf_counter() - start
        answers.append(job.answer)
        forwards += job.steps_done
    tokens = sum(map(len, answers))
    return {
        "tokens_per_s": round(tokens / wall, 2),
        "wall_s": round(wall, 2),
        "answer_tokens": tokens,
        "tokens_per_forward": round(tokens / forwards, 2),
        "answers": answers,
    }


def reference_run(folder: Path, loaded, prompts: list[list[int]], params: SamplingParams) -> dict:
    model = LLaDA2Reference.from_folder(folder)
    special = loaded.special
    start, answers = time.perf_counter(), []
    for prompt in prompts:
        answers.append(generate_for(model, prompt, params, special.mask, special.eos))
    wall = time.perf_counter() - start
    return {"tokens_per_s": round(sum(map(len, answers)) / wall, 3), "wall_s": round(wall, 1), "answers": answers}


def goals(result: dict) -> list[dict]:
    out, clients = [], len(result["settings"]["prompt_tokens"])
    for mode, run in result["modes"].items():
        reference = run["reference"]["tokens_per_s"]
        for name, measured, bound in (
            ("batch 1", run["batch_1"]["tokens_per_s"], 3),
            (f"{clients} concurrent clients", run["http_concurrent"]["tokens_per_s"], 5),
        ):
            ratio = measured / reference
            goal = f"{mode} {name} >= {bound}x the reference run sequentially"
            out.append({"goal": goal, "measured": f"{ratio:.2f}x", "met": ratio >= bound})
    return out


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="llada2-bench-") as tmp:
        folder = write_llada2_checkpoint(Path(tmp) / "llada2-bench", shape=LLADA2_BENCH_SHAPE, seed=args.model_seed)
        loaded = load_checkpoint(folder, device=args.device, dtype=args.dtype)
        prompts = chat_prompts(loaded, args.prompts)
        modes = args.modes.split(",")
        result = {
            "command": "python -m loadtests.bench_block " + " ".join(sys.argv[1:] if argv is None else argv),
            "machine": machine_info(loaded.device),
            "settings": {
                "shape": {k: v for k, v in LLADA2_BENCH_SHAPE.items() if k != "bos_token_id"},
                "prompt_tokens": [len(p) for p in prompts],
                "gen_length": args.gen_length,
                "block_length": 32,
                "modes": {mode: MODES[mode] for mode in modes},
                "temperature": 0,
            },
            "modes": {},
        }
        with torch.inference_mode():
            for mode in modes:
                print(f"  batch 1: {mode} ...", flush=True)
                result["modes"][mode] = {"batch_1": batch_one(loaded, prompts, params_for(args, mode))}
        server = ServerProcess(
            ["--model", str(folder), "--max-batch-rows", "16", "--log-level", "warning", "--max-gen-length", "4096"],
            Path(tmp) / "server.log",
        )
        try:
            server.wait_ready(timeout=300)
            asyncio.run(concurrent_http(server.url, prompts[:2], params_for(args, modes[0]), FIELDS))  # warm-up
            for mode in modes:
                print(f"  {len(prompts)} concurrent HTTP clients: {mode} ...", flush=True)
                wall, answers = asyncio.run(concurrent_http(server.url, prompts, params_for(args, mode), FIELDS))
                run = result["modes"][mode]
                run["http_concurrent"] = {
                    "tokens_per_s": round(run["batch_1"]["answer_tokens"] / wall, 2),
                    "wall_s": round(wall, 2),
                    "answers_equal_batch_1": answers == run["batch_1"]["answers"],
                }
        finally:
            server.stop()
        with torch.inference_mode():
            for mode in modes:
                print(f"  reference, {len(prompts)} prompts one at a time: {mode} ...", flush=True)
                run = result["modes"][mode]
                run["reference"] = reference_run(folder, loaded, prompts, params_for(args, mode))
                run["reference"]["answers_equal_engine"] = run["reference"].pop("answers") == run["batch_1"]["answers"]
                del run["batch_1"]["answers"]
    result["goals"] = goals(result)
    finish(result, started, args.json_path)


if __name__ == "__main__":
    main()
